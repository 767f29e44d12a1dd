"""QRPOTrainer on a tiny offline Llama: data layouts, reference paths, errors, metrics, model card."""

import math
import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_qrpo import QRPOConfig, QRPOTrainer, get_transform, quantile_rewards
from trl_qrpo.transforms import ScaledNormalICDF

WORDS = "happy good day sky blue sad bad dog cat runs park bright great awful".split()


def make_rows(n=8, seed=0, conversational=True, paired=True, num_refs=5):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def completion(k):
        return [{"role": "assistant", "content": text(k)}] if conversational else " " + text(k)

    rows = []
    for i in range(n):
        prompt = (
            [{"role": "user", "content": f"Tell me {text(2)} {i}"}] if conversational else f"Tell me {text(2)} {i}:"
        )
        row = {"prompt": prompt, "ref_rewards": [rng.gauss(0, 1) for _ in range(num_refs)]}
        if paired:
            row.update(
                chosen=completion(rng.randint(1, 6)),
                rejected=completion(rng.randint(1, 6)),
                chosen_reward=rng.gauss(0.5, 1),
                rejected_reward=rng.gauss(-0.5, 1),
            )
        else:
            row.update(completion=completion(rng.randint(1, 6)), reward=rng.gauss(0, 1))
        rows.append(row)
    return rows


def as_dataset(rows):
    return Dataset.from_list(rows)


def unpair(rows):
    """Pointwise rows from pairs, ordered [chosen..., rejected...] like a paired batch's sequences."""
    out = []
    for side in ("chosen", "rejected"):
        for row in rows:
            out.append(
                {
                    "prompt": row["prompt"],
                    "completion": row[side],
                    "reward": row[f"{side}_reward"],
                    "ref_rewards": row["ref_rewards"],
                }
            )
    return out


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=4,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        beta=0.1,
        learning_rate=1e-3,
    )
    defaults.update(kwargs)
    return QRPOConfig(**defaults)


def first_batch_loss(trainer, dataset=None, n_rows=None):
    """Loss of the first n rows of the prepared dataset, without shuffling, in eval mode (no dropout anyway)."""
    dataset = trainer.train_dataset if dataset is None else dataset
    rows = [dataset[i] for i in range(n_rows or len(dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item(), batch


def test_paired_data_gives_the_loss_of_its_pointwise_rows(tiny_model_dir, tmp_path):
    rows = make_rows(4)
    paired = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path / "p"), train_dataset=as_dataset(rows))
    pointwise = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path / "u"), train_dataset=as_dataset(unpair(rows))
    )
    # Move the policy away from the reference so that the log-ratios are not all zero.
    for trainer in (paired, pointwise):
        torch.manual_seed(0)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    loss_paired, batch_paired = first_batch_loss(paired)
    loss_pointwise, batch_pointwise = first_batch_loss(pointwise)
    assert torch.allclose(batch_paired["target"], batch_pointwise["target"])
    assert torch.equal(batch_paired["input_ids"], batch_pointwise["input_ids"])
    assert loss_paired == pytest.approx(loss_pointwise, rel=1e-6)
    assert loss_paired > 0


@pytest.mark.parametrize("precompute", [False, True])
def test_step_zero_logratio_is_zero_for_every_row(tiny_model_dir, tmp_path, precompute):
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, precompute_ref_log_probs=precompute, precompute_ref_batch_size=3),
        train_dataset=as_dataset(make_rows(7)),
    )
    for batch in trainer.get_eval_dataloader(trainer.train_dataset):
        batch = trainer._prepare_inputs(batch)
        with torch.no_grad():
            logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, batch)
        assert (logps < -1).all()  # real log-probabilities of multi-token completions
        beta_logratio = batch["beta"] * (logps - ref_logps)
        assert beta_logratio.abs().max().item() < 1e-5


def test_targets_match_the_math_module(tiny_model_dir, tmp_path):
    rows = make_rows(6)
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, transform="log", beta=0.05), train_dataset=as_dataset(rows)
    )
    rewards = torch.tensor([[r["chosen_reward"], r["rejected_reward"]] for r in rows], dtype=torch.float64)
    refs = torch.tensor([r["ref_rewards"] for r in rows], dtype=torch.float64)
    q = quantile_rewards(rewards, refs).quantiles
    log_z = math.log(0.05) - math.log1p(0.05)
    expected = torch.log(q.clamp(min=1 / 5)) - 0.05 * log_z
    assert torch.allclose(torch.tensor(trainer.train_dataset["target"], dtype=torch.float64), expected)
    assert torch.allclose(torch.tensor(trainer.train_dataset["quantile"], dtype=torch.float64), q)


def test_dpo_documentation_script_with_two_names_swapped(tiny_model_dir, tmp_path):
    """TRL's DPO quick-start example, with QRPOConfig/QRPOTrainer and reward columns (UltraFeedback aliases)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = make_rows(8)
    for row in rows:  # trl-lib/ultrafeedback_binarized names its rewards score_chosen / score_rejected
        row["score_chosen"], row["score_rejected"] = row.pop("chosen_reward"), row.pop("rejected_reward")
    train_dataset = Dataset.from_list(rows)

    training_args = QRPOConfig(output_dir=str(tmp_path), bf16=False, max_steps=2, report_to="none", logging_steps=1)
    trainer = QRPOTrainer(model=model, args=training_args, processing_class=tokenizer, train_dataset=train_dataset)
    trainer.train()
    assert trainer.state.global_step == 2
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_metrics_are_logged_under_stable_names(tiny_model_dir, tmp_path):
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, max_steps=3), train_dataset=as_dataset(make_rows(8))
    )
    trainer.train()
    logged = trainer.state.log_history[1]
    for name in [
        "loss",
        "target/mean",
        "quantile/mean",
        "reward/mean",
        "implicit_reward/mean",
        "residual/mean",
        "residual/rms",
        "beta_log_z",
        "implicit_reward/length_spearman",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "target/chosen",
        "target/rejected",
        "residual/chosen_rms",
        "residual/rejected_rms",
        "entropy",
        "num_tokens",
    ]:
        assert name in logged, name
    # the per-side targets average to the batch's (equal numbers of chosen and rejected completions)
    assert (logged["target/chosen"] + logged["target/rejected"]) / 2 == pytest.approx(logged["target/mean"], rel=1e-5)
    assert logged["beta_log_z"] == pytest.approx(0.1 * get_transform("identity").log_partition(0.1), rel=1e-5)
    assert 0.0 <= logged["rewards/accuracies"] <= 1.0


def test_plain_text_pointwise_data_trains_and_eval_is_prepared_once(tiny_model_dir, tmp_path):
    train = as_dataset(make_rows(8, conversational=False, paired=False))
    evaluation = as_dataset(make_rows(4, seed=1, conversational=False, paired=False))
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2),
        train_dataset=train,
        eval_dataset=evaluation,
    )
    eos = trainer.processing_class.eos_token_id
    assert all(ids[0][-1] == eos for ids in trainer.train_dataset["completion_ids"])  # EOS added to plain text
    trainer.train()
    metrics = trainer.evaluate(as_dataset(make_rows(3, seed=2, conversational=False, paired=False)))
    assert "eval_loss" in metrics and "eval_target/mean" in metrics
    assert (
        trainer._prepare_dataset(trainer.train_dataset, trainer.processing_class, trainer.args, "x")
        is trainer.train_dataset
    )


@pytest.mark.parametrize("selector,k", [("both", 2), ("chosen", 1), ("rejected", 1), ("random", 1)])
def test_sample_selector(tiny_model_dir, tmp_path, selector, k):
    rows = make_rows(10)
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, sample_selector=selector), train_dataset=as_dataset(rows)
    )
    rewards = trainer.train_dataset["reward"]
    assert all(len(r) == k for r in rewards)
    if selector == "chosen":
        assert [r[0] for r in rewards] == [row["chosen_reward"] for row in rows]
    if selector == "random":
        kept_chosen = [r[0] == row["chosen_reward"] for r, row in zip(rewards, rows)]
        assert any(kept_chosen) and not all(kept_chosen)
        again = QRPOTrainer(
            model=str(tiny_model_dir), args=config(tmp_path, sample_selector=selector), train_dataset=as_dataset(rows)
        )
        assert again.train_dataset["reward"] == rewards  # seeded
    trainer.train()


def test_precomputed_quantiles_aliases_and_num_ref_rewards(tiny_model_dir, tmp_path):
    rows = make_rows(6, paired=False)
    with_quantiles = [
        {"prompt": r["prompt"], "completion": r["completion"], "quantile_reward": q}
        for r, q in zip(rows, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ]
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, transform="log", num_ref_rewards=5),
        train_dataset=as_dataset(with_quantiles),
    )
    targets = [t[0] for t in trainer.train_dataset["target"]]
    assert targets[0] == pytest.approx(targets[1])  # q=0 clamped to 1/5
    # The first n reference rewards only.
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, num_ref_rewards=2), train_dataset=as_dataset(rows)
    )
    expected = quantile_rewards(
        torch.tensor([r["reward"] for r in rows]), torch.tensor([r["ref_rewards"][:2] for r in rows])
    ).quantiles
    assert torch.allclose(
        torch.tensor([q[0] for q in trainer.train_dataset["quantile"]], dtype=torch.float64), expected
    )


def test_self_inclusion_leave_one_out_and_discrete_support(tiny_model_dir, tmp_path):
    rows = make_rows(4, paired=False)
    for row in rows:  # the completion is reference 2, its reward among the references
        row["reward"] = row["ref_rewards"][2]
        row["in_ref_rewards"] = True
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, partition_mode="discrete"), train_dataset=as_dataset(rows)
    )
    refs = torch.tensor([r["ref_rewards"] for r in rows], dtype=torch.float64)
    others = torch.cat([refs[:, :2], refs[:, 3:]], dim=1)
    expected_q = quantile_rewards(refs[:, 2], others).quantiles
    assert torch.allclose(
        torch.tensor([q[0] for q in trainer.train_dataset["quantile"]], dtype=torch.float64), expected_q
    )
    identity = get_transform("identity")
    expected_log_z = identity.discrete_log_partition(0.1, 4, includes_self=False)
    assert trainer.train_dataset["beta_log_z"][0][0] == pytest.approx(0.1 * expected_log_z)
    kept = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, partition_mode="discrete", self_inclusion="keep"),
        train_dataset=as_dataset(rows),
    )
    assert kept.train_dataset["beta_log_z"][0][0] == pytest.approx(
        0.1 * identity.discrete_log_partition(0.1, 5, includes_self=True)
    )


def test_length_normalised_beta_and_loss(tiny_model_dir, tmp_path):
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, normalize_beta_by_length=True, normalize_loss_by_length=True, beta=0.5),
        train_dataset=as_dataset(make_rows(6)),
    )
    row = trainer.train_dataset[0]
    identity = get_transform("identity")
    for j in range(2):
        beta_j = 0.5 / len(row["completion_ids"][j])
        assert row["beta"][j] == pytest.approx(beta_j)
        assert row["target"][j] == pytest.approx(row["quantile"][j] - beta_j * identity.log_partition(beta_j))
    trainer.train()


def test_scaled_normal_icdf_uses_per_prompt_scales(tiny_model_dir, tmp_path):
    rows = make_rows(6)
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, transform="scaled-normal-icdf", beta=0.5),
        train_dataset=as_dataset(rows),
    )
    refs = torch.tensor([r["ref_rewards"] for r in rows], dtype=torch.float64)
    sigma = ScaledNormalICDF.from_ref_rewards(refs).sigma
    assert torch.allclose(
        torch.tensor([b[0] for b in trainer.train_dataset["beta_log_z"]], dtype=torch.float64),
        0.5 * sigma**2 / (2 * 0.25),
    )
    trainer.train()


@pytest.mark.parametrize(
    "mutate,column,message",
    [
        (lambda r: r.update(chosen_reward=None), "chosen_reward", "missing or not finite"),
        (lambda r: r.update(rejected_reward=float("nan")), "rejected_reward", "missing or not finite"),
        (lambda r: r.update(chosen_reward=float("inf")), "chosen_reward", "missing or not finite"),
        (lambda r: r.update(ref_rewards=[]), "ref_rewards", "the list is empty"),
        (lambda r: r.update(ref_rewards=[0.1, float("nan"), 0.3, 0.2, 0.1]), "ref_rewards", "non-finite"),
        (lambda r: r.update(ref_rewards=[0.1, 0.2]), "ref_rewards", "fewer than num_ref_rewards=3"),
    ],
)
def test_bad_input_raises_before_training_with_column_row_and_fix(tiny_model_dir, tmp_path, mutate, column, message):
    rows = make_rows(6)
    mutate(rows[3])
    with pytest.raises(ValueError) as excinfo:
        QRPOTrainer(
            model=str(tiny_model_dir), args=config(tmp_path, num_ref_rewards=3), train_dataset=as_dataset(rows)
        )
    text = str(excinfo.value)
    assert f"Column '{column}'" in text and "row 3" in text and message in text


def test_missing_columns_are_explained(tiny_model_dir, tmp_path):
    rows = [{k: v for k, v in r.items() if k != "ref_rewards"} for r in make_rows(3)]
    with pytest.raises(ValueError, match="no 'ref_rewards' column"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows))
    rows = [{k: v for k, v in r.items() if k != "rejected_reward"} for r in make_rows(3)]
    with pytest.raises(ValueError, match="rejected_reward"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows))


@pytest.mark.parametrize(
    "field,value",
    [
        ("sync_ref_model", True),
        ("f_divergence_type", "forward_kl"),
        ("ld_alpha", 0.5),
        ("use_weighting", True),
        ("loss_weights", [1.0]),
        ("label_smoothing", 0.1),
        ("loss_type", "sigmoid"),
        ("partition_mode", "exact"),
    ],
)
def test_config_refuses_what_breaks_qrpo(tmp_path, field, value):
    with pytest.raises(ValueError, match=field if field != "loss_type" else "loss_type"):
        QRPOConfig(output_dir=str(tmp_path), bf16=False, **{field: value})


def test_dpo_config_is_refused_with_a_fix(tiny_model_dir, tmp_path):
    from trl import DPOConfig

    with pytest.raises(TypeError, match="QRPOConfig"):
        QRPOTrainer(
            model=str(tiny_model_dir),
            args=DPOConfig(str(tmp_path), bf16=False),
            train_dataset=as_dataset(make_rows(2)),
        )


def test_model_card_names_qrpo_and_cites_the_paper(tiny_model_dir, tmp_path):
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(make_rows(2)))
    trainer.create_model_card(model_name="tiny-qrpo")
    card = (tmp_path / "README.md").read_text()
    assert "QRPO" in card and "2507.08068" in card and "matrenok2025quantile" in card


def test_sequence_log_probs_are_fp32_in_training_for_bf16_models(tiny_model_dir, tmp_path):
    """The trainer's policy and reference sums are float32 (trl_qrpo.logps; the sum itself: tests/test_logps.py)."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    trainer = QRPOTrainer(model=model, ref_model=ref, args=config(tmp_path), train_dataset=as_dataset(make_rows(4)))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    with torch.no_grad():
        logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, batch)
    assert logps.dtype == torch.float32 and ref_logps.dtype == torch.float32
    assert (logps - ref_logps).abs().max().item() == 0.0


@pytest.mark.slow
def test_precompute_and_lora_give_the_first_step_loss_of_the_plain_path(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    rows = make_rows(8)

    def first_loss(**kwargs):
        peft_config = kwargs.pop("peft_config", None)
        trainer = QRPOTrainer(
            model=str(tiny_model_dir),
            args=config(tmp_path / str(len(kwargs)), max_steps=2, per_device_train_batch_size=4, **kwargs),
            train_dataset=as_dataset(rows),
            peft_config=peft_config,
        )
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    plain = first_loss()
    precomputed = first_loss(precompute_ref_log_probs=True)
    lora = first_loss(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora_precomputed = first_loss(
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), precompute_ref_log_probs=True
    )
    assert precomputed[0] == pytest.approx(plain[0], rel=1e-5)
    assert lora[0] == pytest.approx(plain[0], rel=1e-5)  # LoRA B starts at zero: the policy is the reference
    assert lora_precomputed[0] == pytest.approx(plain[0], rel=1e-5)
    assert precomputed[1] == pytest.approx(plain[1], rel=1e-4)  # same data order, same update
    assert lora[1] != pytest.approx(plain[1], rel=1e-6)  # LoRA trains other parameters


def test_rebel_baseline_on_paired_data(tiny_model_dir, tmp_path):
    from trl_qrpo import rebel_loss

    rows = make_rows(4)
    trainer = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path, loss_type="rebel"), train_dataset=as_dataset(rows)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, batch = first_batch_loss(trainer)
    with torch.no_grad():
        logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, batch)
    lr = logps - ref_logps
    expected = rebel_loss(
        lr[:4],
        lr[4:],
        torch.tensor([r["chosen_reward"] for r in rows]),
        torch.tensor([r["rejected_reward"] for r in rows]),
        0.1,
    ).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sample_selector='both'"):
        config(tmp_path, loss_type="rebel", sample_selector="chosen")


def test_canonical_reward_columns_win_over_aliases(tiny_model_dir, tmp_path, caplog):
    rows = make_rows(4)
    for row in rows:  # e.g. UltraFeedback's original ratings kept next to new rewards
        row["score_chosen"], row["score_rejected"] = 100.0, -100.0
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows))
    assert [r[0] for r in trainer.train_dataset["reward"]] == [row["chosen_reward"] for row in rows]
    rows = make_rows(2)
    for row in rows:
        row["score_chosen"] = row["chosen_rewards"] = row.pop("chosen_reward")
    with pytest.raises(ValueError, match="several aliases of 'chosen_reward'"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows))


def test_reference_pass_toggles_checkpointing_without_deprecation_warnings(tiny_model_dir):
    """The reference forward turns activation checkpointing off and on again through transformers' current names."""
    import warnings

    from transformers import AutoModelForCausalLM

    from trl_qrpo.trainer import _activation_checkpointing_off

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.activation_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _activation_checkpointing_off(model, None):
            assert not model.is_activation_checkpointing
        assert model.is_activation_checkpointing
    assert not [w for w in caught if "checkpointing" in str(w.message)]


def test_bad_data_fails_before_any_model_is_loaded(tmp_path):
    """Validation needs only the data: the model path below does not exist, and the data error comes first."""
    rows = make_rows(3, paired=False)
    rows[1]["reward"] = None
    with pytest.raises(ValueError, match=r"Column 'reward', row 1"):
        QRPOTrainer(model=str(tmp_path / "no-such-model"), args=config(tmp_path), train_dataset=as_dataset(rows))


def test_generate_and_score_output_trains_pointwise_on_every_reference(tiny_model_dir, tmp_path):
    """`trl qrpo generate` + `score` output (prompt, ref_completions, ref_rewards) trains as it is: one pointwise row
    per reference, its quantile taken among the prompt's other references (leave-one-out)."""
    rows = make_rows(4, paired=False)
    data = [
        {
            "prompt": r["prompt"],
            "ref_completions": [r["completion"]] * 4,
            "ref_rewards": [0.1 * (i + 1) * (j + 1) for j in range(4)],
        }
        for i, r in enumerate(rows)
    ]
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(data))
    assert len(trainer.train_dataset) == 16
    # Rewards rank 1st..4th within each prompt: among the 3 others, the quantiles are 0, 1/3, 2/3, 1.
    quantiles = sorted(q[0] for q in trainer.train_dataset["quantile"])
    assert quantiles == pytest.approx(sorted([0.0, 1 / 3, 2 / 3, 1.0] * 4))
    assert math.isfinite(trainer.train().training_loss)


def test_references_without_rewards_name_the_command_that_scores_them(tiny_model_dir, tmp_path):
    data = [{"prompt": "The sky is", "ref_completions": [" blue.", " grey."]}]
    with pytest.raises(ValueError, match="trl qrpo score"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(data))


def _sampled_rows(tiny_model_dir, n=8):
    """Pointwise rows whose completions come as the token ids they were "sampled" as, with pi_ref's log-prob of them
    (computed here by trl_qrpo.logps on the prompt as the sampler tokenises it)."""
    from transformers import AutoTokenizer

    from trl_qrpo.logps import sequence_logps
    from trl_qrpo.tokenization import tokenize_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    rng = random.Random(1)
    rows = make_rows(n, paired=False)
    for row in rows:
        row["completion_ids"] = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(2, 7))]
    prompts = [tokenize_prompt(tokenizer, row) for row in rows]
    logps = sequence_logps(model, prompts, [r["completion_ids"] for r in rows], pad_token_id=tokenizer.pad_token_id)
    return rows, prompts, logps


def test_sampled_ids_are_trained_as_sampled(tiny_model_dir, tmp_path):
    """One token sequence: a completion given with its sampled ids is trained on exactly those ids after the prompt
    as the sampler tokenised it (no end-of-turn appended, nothing re-tokenised)."""
    rows, prompts, _ = _sampled_rows(tiny_model_dir, n=4)
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows))
    prepared = trainer.train_dataset
    for i, row in enumerate(rows):
        assert prepared[i]["prompt_ids"] + prepared[i]["completion_ids"][0] == prompts[i] + row["completion_ids"]


def test_stored_reference_log_probs_train_like_a_live_reference_model(tiny_model_dir, tmp_path, caplog):
    """Rows that carry pi_ref's log-probs train with no reference model, with the losses of a live one, step for
    step; the start-up check recomputes a few rows and finds them equal."""
    rows, _, logps = _sampled_rows(tiny_model_dir)
    stored_rows = [dict(row, ref_logp=logp) for row, logp in zip(rows, logps, strict=True)]
    args = dict(max_steps=3, learning_rate=1e-2)
    live = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path / "l", **args), train_dataset=as_dataset(rows))
    with caplog.at_level("INFO"):
        stored = QRPOTrainer(
            model=str(tiny_model_dir), args=config(tmp_path / "s", **args), train_dataset=as_dataset(stored_rows)
        )
    assert live.ref_model is not None and stored.ref_model is None
    assert "largest difference" in caplog.text and "above ref_logps_tolerance" not in caplog.text
    losses = []
    for trainer in (live, stored):
        torch.manual_seed(0)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)


def test_stored_reference_log_probs_for_other_tokens_are_reported(tiny_model_dir, tmp_path, caplog):
    rows, _, logps = _sampled_rows(tiny_model_dir, n=4)
    wrong = [dict(row, ref_logp=logp - 3.0) for row, logp in zip(rows, logps, strict=True)]
    with caplog.at_level("WARNING"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(wrong))
    assert "largest difference 3" in caplog.text and "above ref_logps_tolerance" in caplog.text
    missing = [dict(row, ref_logp=None if i == 2 else logp) for i, (row, logp) in enumerate(zip(rows, logps))]
    with pytest.raises(ValueError, match=r"Column 'ref_logp', row 2.*missing"):
        QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(missing))


def test_a_prepared_dataset_is_taken_as_it_is(tiny_model_dir, tmp_path):
    """A dataset another QRPOTrainer prepared (tokenised, targets computed) trains again without being re-prepared."""
    first = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path / "a"), train_dataset=as_dataset(make_rows(4)))
    prepared = first.train_dataset
    second = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path / "b"), train_dataset=prepared)
    assert second.train_dataset["target"] == prepared["target"]
    assert second.train_dataset["completion_ids"] == prepared["completion_ids"]


def test_evaluating_a_new_set_after_training_on_stored_log_probs_is_refused(tiny_model_dir, tmp_path):
    """No reference model is kept: a new evaluation set after training cannot get reference log-probs (TRL's refusal,
    not a silent use of the trained policy as the reference)."""
    rows, _, logps = _sampled_rows(tiny_model_dir, n=4)
    stored = [dict(row, ref_logp=logp) for row, logp in zip(rows, logps, strict=True)]
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(stored))
    trainer.train()
    with pytest.raises(ValueError, match="after training has started"):
        trainer.evaluate(as_dataset(make_rows(2, paired=False)))
