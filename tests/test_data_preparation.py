"""Data preparation: batched tokenisation, the Arrow data path, bad input, per-prompt transforms, scored tokens."""

import math
import warnings
from importlib.metadata import version

import numpy as np
import pytest
import torch
from accelerate import PartialState
from datasets import Dataset, IterableDataset
from test_trainer import as_dataset, config, make_rows

from trl_qrpo import QRPOTrainer
from trl_qrpo.collator import DataCollatorForQRPO
from trl_qrpo.data import scored_completion_tokens
from trl_qrpo.tokenization import tokenize_batch, tokenize_row
from trl_qrpo.transforms import Transform, register_transform


def trainer_for(tiny_model_dir, tmp_path, rows, **kwargs):
    return QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path, **kwargs), train_dataset=as_dataset(rows))


# ---------------------------------------------------------------------------------------------------------------------
# Batched tokenisation gives the per-row path's ids
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversational", [False, True])
def test_batched_tokenization_gives_the_per_row_ids(tiny_tokenizer, conversational):
    PartialState()  # the boundary warning goes through accelerate's logger, as in a trainer
    rows = make_rows(12, conversational=conversational)
    batch = {
        "prompt": [r["prompt"] for r in rows],
        "completions": [[r["chosen"], r["rejected"]] for r in rows],
    }
    if not conversational:  # tokens merge across the boundary: the completion starts where they diverge
        batch["prompt"][0], batch["completions"][0] = "Th", ["e sky", "e sea"]
    eos = None if conversational else tiny_tokenizer.eos_token
    batched = tokenize_batch(batch, tiny_tokenizer, eos)
    for i in range(len(rows)):
        row = tokenize_row({key: values[i] for key, values in batch.items()}, tiny_tokenizer, eos)
        assert batched["prompt_ids"][i] == row["prompt_ids"]
        assert batched["completion_ids"][i] == row["completion_ids"]
    if not conversational:
        assert batched["prompt_ids"][0] == []  # "Th" + "e sky" tokenizes as "The" + " sky"


def test_rows_with_their_own_tools_take_the_per_row_path(tiny_tokenizer):
    rows = make_rows(3)
    batch = {
        "prompt": [r["prompt"] for r in rows],
        "completions": [[r["chosen"]] for r in rows],
        "chat_template_kwargs": [None, {"custom": 1}, None],
    }
    batched = tokenize_batch(batch, tiny_tokenizer, None)
    for i in range(3):
        row = tokenize_row({key: values[i] for key, values in batch.items()}, tiny_tokenizer, None)
        assert batched["prompt_ids"][i] == row["prompt_ids"]
        assert batched["completion_ids"][i] == row["completion_ids"]


# ---------------------------------------------------------------------------------------------------------------------
# The Arrow data path: row order, iterable datasets, ragged lists
# ---------------------------------------------------------------------------------------------------------------------


def test_shuffled_and_iterable_datasets_get_the_same_targets(tiny_model_dir, tmp_path):
    rows = make_rows(10, paired=False, conversational=False)
    plain = trainer_for(tiny_model_dir, tmp_path, rows).train_dataset
    order = list(np.random.default_rng(0).permutation(10))
    shuffled = QRPOTrainer(
        model=str(tiny_model_dir), args=config(tmp_path), train_dataset=as_dataset(rows).select(order)
    ).train_dataset  # an indices mapping over the Arrow table
    assert shuffled["target"] == [plain["target"][i] for i in order]
    assert shuffled["prompt_ids"] == [plain["prompt_ids"][i] for i in order]
    iterable = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path),
        train_dataset=IterableDataset.from_generator(lambda: iter(rows)),
    ).train_dataset
    got = list(iterable)
    assert [r["target"] for r in got] == plain["target"]
    assert [r["completion_ids"] for r in got] == plain["completion_ids"]


def test_reference_lists_of_different_lengths_train_with_a_warning(tiny_model_dir, tmp_path):
    rows = make_rows(8, paired=False, num_refs=6)
    for i, row in enumerate(rows):
        row["ref_rewards"] = row["ref_rewards"][: 3 + i % 4]  # 3 to 6 rewards
    with pytest.warns(UserWarning) as record:
        trainer = trainer_for(tiny_model_dir, tmp_path, rows)
    message = next(str(w.message) for w in record if "different lengths" in str(w.message))
    assert "3 to 6 rewards" in message and "of 8 rows" in message and "num_ref_rewards" in message
    for i, row in enumerate(rows):  # each quantile over its own row's references, counted here
        expected = sum(r <= row["reward"] for r in row["ref_rewards"]) / len(row["ref_rewards"])
        assert trainer.train_dataset["quantile"][i][0] == pytest.approx(expected)
        # identity, beta = 0.1: log Z = log int_0^1 exp(t / 0.1) dt = log(0.1 (e^10 - 1))
        assert trainer.train_dataset["target"][i][0] == pytest.approx(expected - 0.1 * math.log(0.1 * math.expm1(10)))
    trainer.train()
    with warnings.catch_warnings(record=True) as record:  # num_ref_rewards: the same n for every row, no warning
        warnings.simplefilter("always")
        trainer_for(tiny_model_dir, tmp_path, rows, num_ref_rewards=3)
    assert not [w for w in record if "different lengths" in str(w.message)]


def test_constant_reference_rewards_warning_names_the_rows(tiny_model_dir, tmp_path):
    rows = make_rows(8, paired=False)
    for i in (2, 5):
        rows[i]["ref_rewards"] = [0.5] * 5
    with pytest.warns(UserWarning, match=r"2 of 8 rows have reference rewards that are all equal \(rows 2, 5\)"):
        trainer_for(tiny_model_dir, tmp_path, rows)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: refused before training, naming the column, the row and the fix
# ---------------------------------------------------------------------------------------------------------------------


def test_a_reward_that_is_not_a_number_is_refused(tiny_model_dir, tmp_path):
    rows = make_rows(6)
    for row in rows:
        row["chosen_reward"] = str(row["chosen_reward"])
    rows[3]["chosen_reward"] = "high"
    with pytest.raises(ValueError) as excinfo:
        trainer_for(tiny_model_dir, tmp_path, rows)
    text = str(excinfo.value)
    assert "Column 'chosen_reward'" in text and "row 3" in text and "'high' is not a number" in text
    assert "map these values to numbers" in text


def test_rewards_stored_as_numeric_text_are_refused_with_the_cast(tiny_model_dir, tmp_path):
    rows = make_rows(4, paired=False)
    for row in rows:
        row["reward"] = f"{row['reward']:.3f}"
    with pytest.raises(ValueError) as excinfo:
        trainer_for(tiny_model_dir, tmp_path, rows)
    text = str(excinfo.value)
    assert "Column 'reward' holds its rewards as text" in text and "row 0" in text
    assert "dataset.cast_column('reward', Value('float64'))" in text
    # The cast the message gives fixes it.
    from datasets import Value

    fixed = as_dataset(rows).cast_column("reward", Value("float64"))
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=config(tmp_path), train_dataset=fixed)
    assert trainer.train_dataset["reward"][0][0] == pytest.approx(float(rows[0]["reward"]))


def test_reference_rewards_stored_as_text_are_refused(tiny_model_dir, tmp_path):
    rows = make_rows(4, paired=False)
    for row in rows:
        row["ref_rewards"] = [str(v) for v in row["ref_rewards"]]
    rows[2]["ref_rewards"][1] = "n/a"
    with pytest.raises(
        ValueError, match=r"Column 'ref_rewards', row 2 \(0-based\): the reference reward .* is not a number"
    ):
        trainer_for(tiny_model_dir, tmp_path, rows)


@pytest.mark.parametrize("conversational", [False, True])
def test_an_empty_prompt_is_refused(tiny_model_dir, tmp_path, conversational):
    rows = make_rows(5, conversational=conversational)
    rows[4]["prompt"] = [] if conversational else ""
    with pytest.raises(ValueError) as excinfo:
        trainer_for(tiny_model_dir, tmp_path, rows)
    text = str(excinfo.value)
    assert "Column 'prompt', row 4 (0-based): the prompt is empty" in text and "fill in the prompt" in text


# ---------------------------------------------------------------------------------------------------------------------
# normalize_beta_by_length divides by the tokens the loss scores
# ---------------------------------------------------------------------------------------------------------------------


def scored_by_collator(trainer, dataset):
    collator = trainer.data_collator
    batch = collator([dataset[i] for i in range(len(dataset))])
    return batch["completion_mask"][:, 1:].sum(dim=1), batch["beta"]


@pytest.mark.parametrize(
    "case,kwargs",
    [
        ("plain", {}),
        ("keep_end cuts into the completion", {"max_length": 4, "truncation_mode": "keep_end"}),
        ("keep_end cuts the prompt", {"max_length": 30, "truncation_mode": "keep_end"}),
        ("keep_start cuts the completion", {"max_length": 20}),
    ],
)
def test_length_normalised_beta_divides_by_the_scored_tokens(tiny_model_dir, tmp_path, case, kwargs):
    rows = make_rows(6, conversational=False)
    trainer = trainer_for(tiny_model_dir, tmp_path, rows, normalize_beta_by_length=True, beta=0.5, **kwargs)
    scored, beta = scored_by_collator(trainer, trainer.train_dataset)
    assert (scored > 0).all()
    assert torch.allclose(beta.double(), 0.5 / scored.double(), rtol=1e-6)
    kept = torch.tensor([len(c) for r in trainer.train_dataset["completion_ids"] for c in r])
    if case != "plain":
        assert (scored < kept - 1).any()  # the truncation is exercised


def test_length_normalised_beta_with_an_empty_tokenized_prompt(tiny_model_dir, tmp_path):
    rows = make_rows(4, paired=False, conversational=False)
    rows[0]["prompt"], rows[0]["completion"] = "Th", "e sky is blue."  # "The": the prompt's tokens merge away
    trainer = trainer_for(tiny_model_dir, tmp_path, rows, normalize_beta_by_length=True, beta=0.5)
    assert trainer.train_dataset["prompt_ids"][0] == []
    scored, beta = scored_by_collator(trainer, trainer.train_dataset)
    assert scored[0] == len(trainer.train_dataset["completion_ids"][0][0]) - 1  # the first token has no log-prob
    assert torch.allclose(beta.double(), 0.5 / scored.double(), rtol=1e-6)


def test_scored_completion_tokens_equal_the_collators_count():
    rng = np.random.default_rng(0)
    for mode in ("keep_start", "keep_end"):
        for max_length in (None, 1, 2, 3, 5, 8):
            prompts = [list(rng.integers(3, 50, size=rng.integers(0, 5))) for _ in range(40)]
            completions = [[list(rng.integers(3, 50, size=rng.integers(1, 6)))] for _ in range(40)]
            collator = DataCollatorForQRPO(pad_token_id=0, max_length=max_length, truncation_mode=mode)
            batch = collator([{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompts, completions)])
            expected = batch["completion_mask"][:, 1:].sum(dim=1).numpy()
            got = scored_completion_tokens(
                [len(p) for p in prompts], [[len(c[0])] for c in completions], max_length, mode
            )[:, 0]
            assert (got == expected).all(), (mode, max_length)


# ---------------------------------------------------------------------------------------------------------------------
# A user-registered per-prompt transform takes part like scaled-normal-icdf
# ---------------------------------------------------------------------------------------------------------------------


class RangeScaledNormalICDF(Transform):
    """f(t) = mu(x) + sigma(x) Phi^{-1}(t): sigma(x) = range(S(x)) / mean range over the training set, mu(x) =
    mean(S(x)) - mean of the means; log Z(x) = mu(x)/beta + sigma(x)^2 / (2 beta^2) (docs/math.md, "Per-prompt
    transforms")."""

    name = "range-scaled-normal-icdf"
    clamp_low = clamp_high = per_prompt = True

    def __init__(self, mu=0.0, sigma=1.0, mean_range=None, mean_mean=None):
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.sigma = torch.as_tensor(sigma, dtype=torch.float64)
        self.mean_range, self.mean_mean = mean_range, mean_mean

    @staticmethod
    def stats(ref):
        ref = torch.as_tensor(ref, dtype=torch.float64)
        span = torch.nan_to_num(ref, nan=-math.inf).amax(1) - torch.nan_to_num(ref, nan=math.inf).amin(1)
        return span, torch.nanmean(ref, dim=1)

    def fit(self, ref_rewards):
        span, mean = self.stats(ref_rewards)
        return RangeScaledNormalICDF(mean_range=float(span.mean()), mean_mean=float(mean.mean()))

    def for_prompts(self, ref_rewards):
        span, mean = self.stats(ref_rewards)
        return RangeScaledNormalICDF(mean - self.mean_mean, span / self.mean_range, self.mean_range, self.mean_mean)

    def f(self, q):
        mu, sigma = self.mu, self.sigma
        if q.dim() == sigma.dim() + 1:
            mu, sigma = mu[..., None], sigma[..., None]
        return mu + sigma * torch.special.ndtri(q)

    def log_partition(self, beta):
        return self.mu / beta + self.sigma**2 / (2.0 * beta**2)


def test_a_registered_per_prompt_transform_is_fitted_and_applied(tiny_model_dir, tmp_path):
    register_transform(RangeScaledNormalICDF.name, RangeScaledNormalICDF)
    train_rows, eval_rows = make_rows(8, num_refs=5), make_rows(4, seed=1, num_refs=5)
    trainer = QRPOTrainer(
        model=str(tiny_model_dir),
        args=config(tmp_path, transform=RangeScaledNormalICDF.name, beta=0.5, eval_strategy="no"),
        train_dataset=as_dataset(train_rows),
        eval_dataset=as_dataset(eval_rows),
    )

    def expected(rows, train):
        ref = torch.tensor([r["ref_rewards"] for r in rows], dtype=torch.float64)
        train_ref = torch.tensor([r["ref_rewards"] for r in train], dtype=torch.float64)
        span, mean = ref.amax(1) - ref.amin(1), ref.mean(1)
        sigma = span / (train_ref.amax(1) - train_ref.amin(1)).mean()
        mu = mean - train_ref.mean(1).mean()
        rewards = torch.tensor([[r["chosen_reward"], r["rejected_reward"]] for r in rows], dtype=torch.float64)
        q = (ref[:, None, :] <= rewards[:, :, None]).double().mean(dim=2).clamp(1 / 5, 4 / 5)  # [P, 2], counted
        beta_log_z = 0.5 * (mu / 0.5 + sigma**2 / (2 * 0.25))
        return mu[:, None] + sigma[:, None] * torch.special.ndtri(q) - beta_log_z[:, None]

    got = torch.tensor(trainer.train_dataset["target"], dtype=torch.float64)
    assert torch.allclose(got, expected(train_rows, train_rows))
    # Evaluation sets reuse the training set's fit.
    got_eval = torch.tensor(trainer.eval_dataset["target"], dtype=torch.float64)
    assert torch.allclose(got_eval, expected(eval_rows, train_rows))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_a_per_prompt_transform_needs_reference_rewards(tiny_model_dir, tmp_path):
    rows = [
        {"prompt": "a b", "completion": " c", "quantile": 0.5},
        {"prompt": "d e", "completion": " f", "quantile": 0.2},
    ]
    with pytest.raises(ValueError, match="depends on each prompt's reference rewards"):
        QRPOTrainer(
            model=str(tiny_model_dir),
            args=config(tmp_path, transform="scaled-normal-icdf"),
            train_dataset=Dataset.from_list(rows),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def test_model_card_lists_trl_qrpo_next_to_trl(tiny_model_dir, tmp_path):
    import trl_qrpo

    trainer = trainer_for(tiny_model_dir, tmp_path, make_rows(2))
    trainer.create_model_card(model_name="tiny-qrpo")
    card = (tmp_path / "README.md").read_text()
    lines = card.splitlines()
    at = lines.index(f"- TRL: {version('trl')}")
    assert lines[at + 1] == f"- trl-qrpo: {trl_qrpo.__version__}"
    trainer.create_model_card(model_name="tiny-qrpo")  # again: listed once
    assert (tmp_path / "README.md").read_text().count("- trl-qrpo:") == 1
