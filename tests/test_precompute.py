"""Pre-computation phase on tiny offline models: generate, score, off-policy rows, shards/resume/merge, evaluate, CLI.

Every model here is the session's tiny Llama (hidden size 32): a handful of prompts, a few tokens each.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from trl_qrpo.precompute import (
    BuildOffPolicyConfig,
    EvaluateConfig,
    GenerateConfig,
    ScoreConfig,
    build_offpolicy_dataset,
    evaluate_policy,
    generate_references,
    merge_shards,
    read_manifest,
    score_dataset,
    sequence_logps,
)
from trl_qrpo.precompute import chunks as chunks_module
from trl_qrpo.precompute.samples import decode_completion
from trl_qrpo.tokenization import tokenize_prompt
from trl_qrpo.scripts.precompute_cli import SUBCOMMANDS

PROMPTS = [
    "hello",
    "Tell me a story about a cat",
    "What is the capital of France?",
    "Write a poem",
    "Numbers: 1 2",
    "The sky is",
]
GEN = dict(num_generations=3, max_new_tokens=5, batch_size=4, chunk_size=2, seed=7)


def conversational_dataset(n=None):
    n = len(PROMPTS) if n is None else n
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:n]],
            "completion": [[{"role": "assistant", "content": f"answer {i}"}] for i in range(n)],
            "source": [f"s{i}" for i in range(n)],
        }
    )


def plain_dataset(n=4):
    return Dataset.from_dict(
        {
            "prompt": PROMPTS[:n],
            "chosen": [" good day"] * n,
            "rejected": [" bad"] * n,
        }
    )


# Reward functions with TRL's signature, importable as `test_precompute.<name>` (tests/ is on sys.path).
def length_reward(prompts, completions, **kwargs):
    return [float(len(c[-1]["content"] if isinstance(c, list) else c)) for c in completions]


def source_reward(prompts, completions, source, **kwargs):
    return [float(s[1:]) for s in source]


def partial_reward(prompts, completions, **kwargs):
    return [None] * len(completions)


@pytest.fixture(scope="module")
def refs(tiny_model_dir):
    """A conversational dataset with references (in memory)."""
    return generate_references(conversational_dataset(), GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN))


def rows_of(dataset):
    return [dict(row) for row in dataset]


# ---------------------------------------------------------------- generate


def test_generate_shapes_and_formats(refs, tiny_model_dir):
    assert len(refs) == len(PROMPTS)
    assert {"prompt", "completion", "source", "ref_completions", "ref_truncated", "ref_num_tokens"} <= set(
        refs.column_names
    )
    for row in refs:
        assert len(row["ref_completions"]) == len(row["ref_truncated"]) == len(row["ref_num_tokens"]) == 3
        for ref, truncated, num_tokens in zip(
            row["ref_completions"], row["ref_truncated"], row["ref_num_tokens"], strict=True
        ):
            assert isinstance(ref, list) and len(ref) == 1 and ref[0]["role"] == "assistant"
            assert 1 <= num_tokens <= GEN["max_new_tokens"]
            if truncated:
                assert num_tokens == GEN["max_new_tokens"]

    plain = generate_references(plain_dataset(2), GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN))
    assert all(isinstance(ref, str) for row in plain["ref_completions"] for ref in row)
    assert plain["chosen"] == [" good day"] * 2  # the dataset's own columns are untouched


def test_generate_is_seeded_per_completion(refs, tiny_model_dir):
    # Same seed, different batch size and chunking: same references (seeds are per row and sample, not a stream).
    again = generate_references(
        conversational_dataset(),
        GenerateConfig(model_name_or_path=str(tiny_model_dir), **dict(GEN, batch_size=1, chunk_size=5)),
    )
    assert again["ref_completions"] == refs["ref_completions"]
    other = generate_references(
        conversational_dataset(), GenerateConfig(model_name_or_path=str(tiny_model_dir), **dict(GEN, seed=8))
    )
    assert other["ref_completions"] != refs["ref_completions"]
    # The three samples of one prompt differ from each other (independent seeds).
    assert any(len({r[0]["content"] for r in row}) > 1 for row in refs["ref_completions"])


def test_generate_matches_model_distribution_tokens(tiny_model_dir):
    """The sampled tokens are the model's own: decoding them after the training-time prompt reproduces the text."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = generate_references(
        plain_dataset(2), GenerateConfig(model_name_or_path=str(tiny_model_dir), **dict(GEN, max_new_tokens=8))
    )
    row = out[0]
    prompt_ids = tokenize_prompt(tokenizer, row)
    assert prompt_ids == tokenizer(row["prompt"])["input_ids"]
    for text in row["ref_completions"]:
        ids = tokenizer(row["prompt"] + text)["input_ids"]
        assert decode_completion(tokenizer, prompt_ids, ids[len(prompt_ids) :]) == text


def eos_loving_model(model_dir, bias=5.0):
    """The tiny model with a bias towards EOS in its LM head, so that some completions stop early."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[model.config.eos_token_id] = bias
    model.lm_head = head
    return model


def test_generate_stops_at_eos_and_flags_truncation(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = generate_references(
        conversational_dataset(),
        GenerateConfig(**dict(GEN, max_new_tokens=4)),
        eos_loving_model(tiny_model_dir),
        tokenizer,
    )
    flags = [t for row in out["ref_truncated"] for t in row]
    assert 0 < sum(flags) < len(flags)  # both kinds occur, deterministically under the seed
    for row in out:
        for ref, truncated, num_tokens in zip(
            row["ref_completions"], row["ref_truncated"], row["ref_num_tokens"], strict=True
        ):
            text = ref[0]["content"]
            assert "<|im_end|>" not in text
            # Rendered as training renders it, the stopped completion ends exactly where the model stopped.
            full = tokenizer.apply_chat_template(row["prompt"] + ref, tokenize=False)
            assert full.endswith(text + "<|im_end|>\n")
            if truncated:
                assert num_tokens == 4
            else:
                assert num_tokens <= 4


def test_generate_refuses_bad_input(tiny_model_dir):
    with pytest.raises(ValueError, match="'prompt'"):
        generate_references(
            Dataset.from_dict({"text": ["a"]}), GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN)
        )
    with pytest.raises(ValueError, match="ref_completions"):
        generate_references(
            Dataset.from_dict({"prompt": ["a"], "ref_completions": [["b"]]}),
            GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN),
        )
    with pytest.raises(ValueError, match="temperature"):
        generate_references(
            plain_dataset(1), GenerateConfig(model_name_or_path=str(tiny_model_dir), **dict(GEN, temperature=0.0))
        )


def test_generate_extracts_an_implicit_prompt(tiny_model_dir):
    conversation = [{"role": "user", "content": "hello"}]
    data = Dataset.from_dict(
        {
            "chosen": [conversation + [{"role": "assistant", "content": "good"}]],
            "rejected": [conversation + [{"role": "assistant", "content": "bad"}]],
        }
    )
    out = generate_references(data, GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN))
    assert out[0]["prompt"] == conversation and out[0]["chosen"] == [{"role": "assistant", "content": "good"}]
    assert len(out[0]["ref_completions"]) == 3


# ---------------------------------------------------------------- shards, resume, merge


def test_killed_run_resumes_to_the_same_rows(tiny_model_dir, tmp_path, monkeypatch, refs):
    out = tmp_path / "run"
    real_save = Dataset.save_to_disk
    calls = {"n": 0}

    def dying_save(self, path, *args, **kwargs):
        if ".tmp-" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # killed while writing the second chunk: half a folder is left behind
                Path(path).mkdir(parents=True)
                (Path(path) / "partial").write_text("x")
                raise KeyboardInterrupt
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", dying_save)
    with pytest.raises(KeyboardInterrupt):
        generate_references(
            conversational_dataset(),
            GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(out), **GEN),
        )
    monkeypatch.setattr(Dataset, "save_to_disk", real_save)
    finished = sorted(p.name for p in (out / "chunks").iterdir())
    assert finished[0] == "chunk-000000" and any(".tmp-" in name for name in finished) and len(finished) == 2
    assert not read_manifest(out)["complete"]

    resumed = generate_references(
        conversational_dataset(), GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(out), **GEN)
    )
    assert rows_of(resumed) == rows_of(refs)
    assert read_manifest(out)["complete"] and not (out / "chunks").exists()
    assert rows_of(load_from_disk(str(out))) == rows_of(refs)

    with pytest.raises(ValueError, match="other settings"):  # a restart with other parameters is refused
        generate_references(
            conversational_dataset(),
            GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(out), **dict(GEN, seed=1)),
        )


def test_merged_shards_equal_unsharded_run(tiny_model_dir, tmp_path, refs):
    dirs = []
    for index in (1, 0):  # any order
        d = tmp_path / f"shard{index}"
        part = generate_references(
            conversational_dataset(),
            GenerateConfig(
                model_name_or_path=str(tiny_model_dir), output_dir=str(d), num_shards=2, shard_index=index, **GEN
            ),
        )
        assert 0 < len(part) < len(PROMPTS)
        dirs.append(str(d))
    with pytest.raises(ValueError, match=r"Missing shard\(s\) \[0\]"):
        merge_shards(dirs[:1])
    with pytest.raises(ValueError, match="more than once"):
        merge_shards(dirs + dirs[:1])
    merged = merge_shards(dirs, tmp_path / "merged")
    assert rows_of(merged) == rows_of(refs)
    assert read_manifest(tmp_path / "merged")["num_shards"] == 1


@pytest.mark.slow
def test_data_parallel_workers_equal_single_process(tiny_model_dir, tmp_path, refs):
    """Two worker processes (spawned, CPU) share the chunks; the assembled output is the single-process one."""
    out = generate_references(
        conversational_dataset(),
        GenerateConfig(
            model_name_or_path=str(tiny_model_dir),
            output_dir=str(tmp_path / "dp"),
            data_parallel_size=2,
            backend="transformers",
            **GEN,
        ),
    )
    assert rows_of(out) == rows_of(refs)


def test_shard_plan_covers_every_row_once():
    seen = []
    for index in range(3):
        plan = chunks_module.ShardPlan(num_rows=23, chunk_size=4, num_shards=3, shard_index=index)
        seen += [r for c in plan.chunks for r in plan.chunk_rows(c)]
    assert seen == list(range(23))
    with pytest.raises(ValueError, match="num_shards"):
        chunks_module.ShardPlan(num_rows=3, chunk_size=2, num_shards=3, shard_index=0)


# ---------------------------------------------------------------- score


def test_score_with_reward_model_matches_one_by_one(refs, tiny_reward_model_dir):
    scored = score_dataset(
        refs, ScoreConfig(reward_model_name_or_path=str(tiny_reward_model_dir), reward_batch_size=3, chunk_size=4)
    )
    assert "reward" in scored.column_names and "ref_rewards" in scored.column_names
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    for i in (0, len(PROMPTS) - 1):
        row = scored[i]
        assert len(row["ref_rewards"]) == 3
        pairs = [(row["completion"], row["reward"])] + list(
            zip(row["ref_completions"], row["ref_rewards"], strict=True)
        )
        for completion, reward in pairs:
            text = tokenizer.apply_chat_template(row["prompt"] + completion, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                expected = model(**ids).logits[0, 0].item()
            assert reward == pytest.approx(expected, abs=1e-4)
    assert len({r for row in scored["ref_rewards"] for r in row}) > 3  # not one constant


def test_score_with_reward_functions_and_weights(tiny_model_dir):
    data = generate_references(plain_dataset(3), GenerateConfig(model_name_or_path=str(tiny_model_dir), **GEN))
    data = data.add_column("source", ["s1", "s2", "s3"])
    scored = score_dataset(
        data, ScoreConfig(reward_funcs=["test_precompute.length_reward", source_reward], reward_weights=[1.0, 10.0])
    )
    for i, row in enumerate(scored):
        assert row["chosen_reward"] == len(" good day") + 10.0 * (i + 1)
        assert row["rejected_reward"] == len(" bad") + 10.0 * (i + 1)
        assert row["ref_rewards"] == [len(c) + 10.0 * (i + 1) for c in row["ref_completions"]]
    # A function returning None everywhere is skipped in the sum; alone, it is an error naming the column and row.
    same = score_dataset(data, ScoreConfig(reward_funcs=[length_reward, partial_reward], columns=["chosen"]))
    assert same["chosen_reward"] == [float(len(" good day"))] * 3
    with pytest.raises(ValueError, match=r"Column 'chosen', row 0"):
        score_dataset(data, ScoreConfig(reward_funcs=[partial_reward], columns=["chosen"]))
    with pytest.raises(ValueError, match="reward weights"):
        score_dataset(data, ScoreConfig(reward_funcs=[length_reward], reward_weights=[1.0, 2.0]))


def failing_reward(prompts, completions, **kwargs):
    if any("boom" in (c[-1]["content"] if isinstance(c, list) else c) for c in completions):
        raise KeyError("no score for this completion")
    return [1.0] * len(completions)


def test_a_reward_function_that_raises_is_named_with_its_rows(tmp_path, capsys):
    data = Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": [" ok", " boom", " ok"]})
    with pytest.raises(ValueError) as error:
        score_dataset(data, ScoreConfig(reward_funcs=[failing_reward], reward_batch_size=1, chunk_size=1))
    message = str(error.value)
    assert "'failing_reward' raised KeyError" in message and "no score for this completion" in message
    assert "rows 1 " in message and "0-based" in message
    # On the command line: one line, exit 2; the failed run's empty output does not block a rerun with another reward.
    source = tmp_path / "data.jsonl"
    data.to_json(str(source), lines=True)
    argv = ["--dataset_name", str(source), "--output_dir", str(tmp_path / "scored")]
    assert SUBCOMMANDS["score"](argv + ["--reward_funcs", "test_precompute.failing_reward"], "trl qrpo score") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and "failing_reward" in err[0] and "Traceback" not in err[0]
    assert SUBCOMMANDS["score"](argv + ["--reward_funcs", "test_precompute.length_reward"], "trl qrpo score") == 0
    assert load_from_disk(str(tmp_path / "scored"))["reward"] == [3.0, 5.0, 3.0]


def test_score_names_the_bad_row():
    data = Dataset.from_dict({"prompt": ["a", "b"], "ref_completions": [["x", "y"], []]})
    with pytest.raises(ValueError, match=r"'ref_completions', row 1"):
        score_dataset(data, ScoreConfig(reward_funcs=[length_reward]))


# ---------------------------------------------------------------- off-policy rows


def offpolicy_input():
    return Dataset.from_dict(
        {
            "prompt": ["p0", "p1"],
            "ref_completions": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
            "ref_rewards": [[0.3, 0.9, 0.1, 0.5], [2.0, 1.0, 3.0, 0.0]],
            "ref_truncated": [[False, True, False, False], [False] * 4],
            "tools": ["t0", "t1"],
            "reward": [0.0, 0.0],  # the dataset's own reward is not carried over
        }
    )


def test_offpolicy_pointwise_keeps_own_reward_first():
    rows = build_offpolicy_dataset(offpolicy_input(), BuildOffPolicyConfig(mode="pointwise"))
    assert len(rows) == 8
    assert set(rows.column_names) == {
        "prompt",
        "completion",
        "reward",
        "ref_rewards",
        "in_ref_rewards",
        "ref_index",
        "truncated",
        "tools",
    }
    for row in rows:
        refs = offpolicy_input()[0 if row["prompt"] == "p0" else 1]
        j = row["ref_index"]
        assert row["completion"] == refs["ref_completions"][j] and row["reward"] == refs["ref_rewards"][j]
        assert row["in_ref_rewards"] is True and row["truncated"] == refs["ref_truncated"][j]
        assert row["ref_rewards"][0] == row["reward"]
        assert sorted(row["ref_rewards"]) == sorted(refs["ref_rewards"])  # the full list, own reward included


def test_offpolicy_best_worst_and_random_pairs():
    pairs = build_offpolicy_dataset(offpolicy_input(), BuildOffPolicyConfig(mode="best_worst", num_candidates=3))
    first = pairs[0]  # candidates a, b, c with 0.3, 0.9, 0.1
    assert (first["chosen"], first["rejected"]) == ("b", "c")
    assert (first["chosen_reward"], first["rejected_reward"]) == (0.9, 0.1)
    assert first["chosen_in_ref_rewards"] and first["rejected_in_ref_rewards"]
    # Own rewards first, then the reference that was not a candidate (d), then the other candidate (a).
    assert first["ref_rewards"] == [0.9, 0.1, 0.5, 0.3]
    assert pairs[1]["chosen"] == "g" and pairs[1]["rejected"] == "f"

    random_pairs = build_offpolicy_dataset(offpolicy_input(), BuildOffPolicyConfig(mode="random_pairs", seed=3))
    assert (
        random_pairs[:]
        == build_offpolicy_dataset(offpolicy_input(), BuildOffPolicyConfig(mode="random_pairs", seed=3))[:]
    )
    for row in random_pairs:
        assert row["chosen_ref_index"] != row["rejected_ref_index"]
        assert row["chosen_reward"] >= row["rejected_reward"]
    draws = {
        tuple(
            build_offpolicy_dataset(offpolicy_input(), BuildOffPolicyConfig(mode="random_pairs", seed=s))[
                "chosen_ref_index"
            ]
        )
        for s in range(8)
    }
    assert len(draws) > 1


def test_offpolicy_refuses_mismatched_lists():
    bad = offpolicy_input().map(
        lambda r, i: {"ref_rewards": r["ref_rewards"][:3] if i == 1 else r["ref_rewards"]}, with_indices=True
    )
    with pytest.raises(ValueError, match="Row 1: 'ref_completions' has 4 entries but 'ref_rewards' has 3"):
        build_offpolicy_dataset(bad, BuildOffPolicyConfig(mode="pointwise"))


# ---------------------------------------------------------------- evaluate


def test_evaluate_policy_kl_and_logps(tiny_model_dir, tiny_reward_model_dir, tmp_path):
    data = conversational_dataset(3)
    samples, summary = evaluate_policy(
        data,
        EvaluateConfig(
            model_name_or_path=str(tiny_model_dir),
            ref_model_name_or_path=str(tiny_model_dir),
            reward_model_name_or_path=str(tiny_reward_model_dir),
            num_samples=2,
            max_new_tokens=6,
            output_dir=str(tmp_path / "eval"),
            chunk_size=2,
        ),
    )
    assert len(samples) == 6 and summary["num_samples"] == 6 and summary["num_prompts"] == 3
    assert summary["kl"] == 0.0  # policy == reference: the log-ratio is exactly zero
    assert summary["mean_reward"] == pytest.approx(sum(samples["reward"]) / 6)
    assert summary["mean_num_tokens"] == pytest.approx(sum(samples["num_tokens"]) / 6)
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["num_samples"] == 6

    # The policy log-probability is the model's: recompute one sample by hand.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    row = samples[0]
    prompt_ids = tokenize_prompt(tokenizer, {"prompt": row["prompt"]})
    completion_ids = row["completion_ids"]
    assert len(completion_ids) == row["num_tokens"]
    assert (
        decode_completion(tokenizer, prompt_ids, completion_ids[: 6 if row["truncated"] else -1])
        == (row["completion"][0]["content"])
    )
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    expected = logps[len(prompt_ids) - 1 :].sum().item()
    assert row["policy_logp"] == pytest.approx(expected, abs=1e-4)

    # Another policy: the log-ratios are not all zero, and batching does not change log-probabilities.
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples2, summary2 = evaluate_policy(
        data,
        EvaluateConfig(
            ref_model_name_or_path=str(tiny_model_dir), reward_funcs=[length_reward], num_samples=2, max_new_tokens=6
        ),
        model=other,
        processing_class=tokenizer,
    )
    assert any(abs(x) > 1e-3 for x in samples2["logratio"])
    assert summary2["kl"] == pytest.approx(sum(samples2["logratio"]) / 6)
    p_ids = [prompt_ids, prompt_ids[:-2]]
    c_ids = [completion_ids, completion_ids[:2]]
    batched = sequence_logps(model, p_ids, c_ids, pad_token_id=tokenizer.pad_token_id, batch_size=2)
    single = [
        sequence_logps(model, [p], [c], pad_token_id=tokenizer.pad_token_id)[0]
        for p, c in zip(p_ids, c_ids, strict=True)
    ]
    assert batched == pytest.approx(single, abs=1e-4)


# ---------------------------------------------------------------- command line and the trainer


def test_cli_generate_score_build_merge(tiny_model_dir, tiny_reward_model_dir, tmp_path, refs, capsys):
    src = tmp_path / "prompts.jsonl"
    conversational_dataset().to_json(str(src), lines=True)
    config = tmp_path / "generate.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\nnum_generations: 3\nmax_new_tokens: 5\nbatch_size: 4\n"
        f"chunk_size: 2\nseed: 7\nbackend: transformers\n"
    )
    shards = []
    for index in range(2):
        out = tmp_path / f"gen{index}"
        code = SUBCOMMANDS["generate"](
            [
                "--config",
                str(config),
                "--dataset_name",
                str(src),
                "--output_dir",
                str(out),
                "--num_shards",
                "2",
                "--shard_index",
                str(index),
            ],
            "trl qrpo generate",
        )
        assert code == 0
        shards.append(str(out))
    assert SUBCOMMANDS["merge"](["--shard_dirs", *shards, "--output_dir", str(tmp_path / "gen")], "merge") == 0
    assert load_from_disk(str(tmp_path / "gen"))["ref_completions"] == refs["ref_completions"]

    code = SUBCOMMANDS["score"](
        [
            "--dataset_name",
            str(tmp_path / "gen"),
            "--output_dir",
            str(tmp_path / "scored"),
            "--reward_model_name_or_path",
            str(tiny_reward_model_dir),
            "--reward_funcs",
            "test_precompute.length_reward",
            "--reward_weights",
            "1",
            "0.5",
            "--output_file",
            str(tmp_path / "scored.parquet"),
        ],
        "trl qrpo score",
    )
    assert code == 0
    scored = load_from_disk(str(tmp_path / "scored"))
    assert len(scored["ref_rewards"][0]) == 3 and (tmp_path / "scored.parquet").exists()

    code = SUBCOMMANDS["build-offpolicy"](
        ["--dataset_name", str(tmp_path / "scored"), "--mode", "best_worst", "--output_dir", str(tmp_path / "train")],
        "build",
    )
    assert code == 0 and len(load_from_disk(str(tmp_path / "train"))) == len(PROMPTS)

    # Bad input is a one-line error with exit code 2, not a traceback.
    code = SUBCOMMANDS["build-offpolicy"](["--dataset_name", str(src), "--output_dir", str(tmp_path / "x")], "build")
    assert code == 2 and "ref_completions" in capsys.readouterr().err


def test_cli_evaluate(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    conversational_dataset(2).to_json(str(src), lines=True)
    code = SUBCOMMANDS["evaluate"](
        [
            "--dataset_name",
            str(src),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--ref_model_name_or_path",
            str(tiny_model_dir),
            "--reward_funcs",
            "test_precompute.length_reward",
            "--max_new_tokens",
            "4",
            "--num_samples",
            "2",
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        "trl qrpo evaluate",
    )
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_samples"] == 4 and summary["kl"] == 0.0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 4


def test_output_feeds_qrpo_trainer(refs, tiny_model_dir, tiny_reward_model_dir, tmp_path):
    from trl_qrpo import QRPOConfig, QRPOTrainer

    scored = score_dataset(refs, ScoreConfig(reward_model_name_or_path=str(tiny_reward_model_dir)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for name, train in {
        "scored": scored,  # the dataset's own completions, references for the quantiles
        "pointwise": build_offpolicy_dataset(scored, BuildOffPolicyConfig(mode="pointwise")),
        "best_worst": build_offpolicy_dataset(scored, BuildOffPolicyConfig(mode="best_worst")),
    }.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = QRPOConfig(
            output_dir=str(tmp_path / name),
            bf16=False,
            use_cpu=True,
            max_steps=2,
            per_device_train_batch_size=2,
            report_to="none",
            beta=0.1,
            save_strategy="no",
        )
        trainer = QRPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        result = trainer.train()
        assert math.isfinite(result.training_loss), name


# ---------------------------------------------------------------- the first hour: Ctrl-C, early errors, quiet output


def test_ctrl_c_says_how_to_resume_and_the_rerun_loses_nothing(tiny_model_dir, tmp_path, monkeypatch, capsys, refs):
    from trl_qrpo.precompute import transformers_sampler as sampling

    src = tmp_path / "prompts.jsonl"
    conversational_dataset().to_json(str(src), lines=True)
    argv = [
        "--dataset_name",
        str(src),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    argv += [f"--{k}={v}" for k, v in GEN.items()] + ["--backend", "transformers"]
    real_sample = sampling.TransformersSampler.sample
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(sampling.TransformersSampler, "sample", interrupted)
    assert SUBCOMMANDS["generate"](argv, "trl qrpo generate") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again" in err and "Traceback" not in err
    monkeypatch.setattr(sampling.TransformersSampler, "sample", real_sample)
    assert SUBCOMMANDS["generate"](argv, "trl qrpo generate") == 0
    assert rows_of(load_from_disk(str(tmp_path / "o"))) == rows_of(refs)


def test_push_to_hub_without_an_id_fails_before_any_work(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    conversational_dataset(1).to_json(str(src), lines=True)
    out = tmp_path / "never"
    argv = ["--dataset_name", str(src), "--model_name_or_path", "no/such-model", "--output_dir", str(out)]
    assert SUBCOMMANDS["generate"](argv + ["--push_to_hub"], "trl qrpo generate") == 2
    assert "--hub_dataset_id" in capsys.readouterr().err and not out.exists()
    merge = ["--shard_dirs", str(tmp_path), "--output_dir", str(out), "--push_to_hub"]
    assert SUBCOMMANDS["merge"](merge, "trl qrpo merge") == 2


def test_generate_shows_no_nested_progress_bars_and_no_spurious_warning(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """datasets' own "Saving the dataset" bars are off while chunks are written under the run's bar, then restored."""
    import datasets

    real_save = Dataset.save_to_disk
    bars_on = []

    def recording_save(self, path, *args, **kwargs):
        bars_on.append(datasets.is_progress_bar_enabled())
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", recording_save)
    assert datasets.is_progress_bar_enabled()
    out = generate_references(
        conversational_dataset(),
        GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(tmp_path / "o"), **GEN),
    )
    assert len(out) == len(PROMPTS)
    assert len(bars_on) == 4 and not any(bars_on)  # 3 chunks and the assembled result
    assert datasets.is_progress_bar_enabled()
    assert not [r for r in caplog.records if "ignored" in r.getMessage()]  # e.g. vllm_kwargs on transformers


def test_a_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    argv = ["--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")]
    assert SUBCOMMANDS["score"](argv + ["--reward_funcs", "test_precompute.length_reward"], "trl qrpo score") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_evaluation_and_training_compute_the_same_log_ratios(tiny_model_dir, tmp_path):
    """One log-prob path: evaluate's logratio equals the trainer's policy - reference log-probs on the same tokens."""
    from trl_qrpo import QRPOConfig, QRPOTrainer
    from trl_qrpo.columns import COMPLETION_IDS, PROMPT_IDS

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    samples, _ = evaluate_policy(
        conversational_dataset(3),
        EvaluateConfig(ref_model_name_or_path=str(tiny_model_dir), num_samples=2, max_new_tokens=6, seed=3),
        model=policy,
        processing_class=tokenizer,
        reward_funcs=[length_reward],
    )
    train = Dataset.from_dict(
        {"prompt": ["a"], "completion": [" b"], "reward": [0.5], "ref_rewards": [[0.1, 0.9]]}
    )  # only to build the trainer: the sequences compared are the evaluation's
    args = QRPOConfig(output_dir=str(tmp_path / "t"), bf16=False, use_cpu=True, report_to="none", beta=0.1)
    trainer = QRPOTrainer(model=policy, args=args, train_dataset=train, processing_class=tokenizer)
    prompt_ids = {i: tokenize_prompt(tokenizer, row) for i, row in enumerate(conversational_dataset(3))}
    rows = [{PROMPT_IDS: prompt_ids[r["row_index"]], COMPLETION_IDS: [r["completion_ids"]]} for r in samples]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        logps, ref_logps, _ = trainer.sequence_log_probs(trainer.model, batch)
    assert (logps - ref_logps).tolist() == pytest.approx(samples["logratio"], abs=1e-5)
    assert logps.tolist() == pytest.approx(samples["policy_logp"], abs=1e-5)
    assert any(abs(x) > 1e-3 for x in samples["logratio"])


def test_mixed_plain_and_conversational_rows_are_named_before_any_model_loads(tmp_path):
    source = tmp_path / "mixed.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "Say hi."}], "completion": [{"role": "assistant", "content": "Hi"}]},
        {"prompt": "Say something.", "completion": " ok"},
    ]
    source.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    from trl_qrpo.loading import load_split

    data = load_split(str(source))
    for call in (
        lambda: generate_references(data, GenerateConfig(model_name_or_path="no/such-model")),
        lambda: score_dataset(data, ScoreConfig(reward_funcs=[length_reward])),
    ):
        with pytest.raises(ValueError, match=r"Column 'prompt', row 1 \(0-based; line 2 .*\) is plain text"):
            call()


# ---------------------------------------------------------------- one token sequence, reference log-probs


@pytest.mark.parametrize("conversational", [True, False], ids=["chatml", "plain"])
def test_sampled_tokens_and_log_probs_reach_training_unchanged(tiny_model_dir, tmp_path, conversational):
    """generate keeps each completion's token ids and pi_ref's log-prob of them; training on generate + score output
    scores exactly those tokens (a truncated sample gets no end-of-turn, a stopped one keeps its stop token), its
    reference log-probs equal the training forward's (within 1e-4 nats), and no reference model is loaded."""
    from trl_qrpo import QRPOConfig, QRPOTrainer

    from collections import Counter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    data = conversational_dataset() if conversational else plain_dataset()
    data = data.remove_columns([c for c in ("completion", "chosen", "rejected") if c in data.column_names])
    # A second stop token the model often samples (as Llama 3's <|eot_id|> in its generation config), so that
    # stopped and truncated samples both occur.
    probe = generate_references(data, GenerateConfig(**dict(GEN, max_new_tokens=4)), model, tokenizer)
    counts = Counter(t for row in probe["ref_completion_ids"] for ids in row for t in ids)
    stops = {tokenizer.eos_token_id, counts.most_common(1)[0][0]}
    model.generation_config.eos_token_id = sorted(stops)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    refs = generate_references(data, GenerateConfig(**dict(GEN, max_new_tokens=4)), model, tokenizer)
    flags = [t for row in refs["ref_truncated"] for t in row]
    assert 0 < sum(flags) < len(flags)  # stopped and truncated samples both occur
    for row in refs:
        prompt_ids = tokenize_prompt(tokenizer, row)
        expected = sequence_logps(model, [prompt_ids] * 3, row["ref_completion_ids"], pad_token_id=0)
        assert row["ref_logps"] == pytest.approx(expected, abs=1e-4)
        for ids, truncated in zip(row["ref_completion_ids"], row["ref_truncated"], strict=True):
            assert (ids[-1] in stops) != truncated
    scored = score_dataset(refs, ScoreConfig(reward_funcs=[length_reward]))
    args = QRPOConfig(
        output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to="none", max_steps=1, beta=0.1
    )
    trainer = QRPOTrainer(model=str(tmp_path / "model"), args=args, train_dataset=scored)
    assert trainer.ref_model is None and len(trainer.train_dataset) == 3 * len(scored)
    prepared = trainer.train_dataset
    for i in range(len(prepared)):
        row, j = divmod(i, 3)
        sampled = refs[row]["ref_completion_ids"][j]
        assert prepared[i]["prompt_ids"] + prepared[i]["completion_ids"][0] == (
            tokenize_prompt(tokenizer, refs[row]) + sampled
        )
    recomputed = trainer._reference_log_probs(prepared, "train", 4)
    assert [r[0] for r in recomputed] == pytest.approx([r[0] for r in prepared["ref_sequence_logps"]], abs=1e-4)


@pytest.mark.parametrize("conversational", [True, False], ids=["chatml", "plain"])
def test_ref_logps_lets_text_pairs_train_without_a_reference_model(tiny_model_dir, tmp_path, conversational):
    """`ref-logps` scores rows no sampler produced with the trainer's own tokenisation (EOS for plain text, the chat
    template, max_length truncation): training from them holds no reference model, and the start-up check finds the
    training forward's values (within 1e-4 nats)."""
    from trl_qrpo import QRPOConfig, QRPOTrainer
    from trl_qrpo.precompute import RefLogpsConfig, compute_ref_logps

    n = 4
    max_length = 40 if conversational else 12  # the ChatML prompts alone are longer than 12 tokens
    if conversational:
        data = Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:n]],
                "chosen": [[{"role": "assistant", "content": "a fine answer"}]] * n,
                "rejected": [[{"role": "assistant", "content": "bad"}]] * n,
            }
        )
    else:
        data = plain_dataset(n)
    data = data.add_column("chosen_reward", [1.0] * n).add_column("rejected_reward", [0.0] * n)
    data = data.add_column("ref_rewards", [[0.2, 0.5, 0.8]] * n)
    out = compute_ref_logps(
        data, RefLogpsConfig(model_name_or_path=str(tiny_model_dir), max_length=max_length, chunk_size=3)
    )
    assert {"chosen_ref_logp", "rejected_ref_logp"} <= set(out.column_names)
    args = QRPOConfig(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        max_steps=1,
        beta=0.1,
        max_length=max_length,
    )
    trainer = QRPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=out)
    assert trainer.ref_model is None and trainer.precompute_ref_logps
    prepared = trainer.train_dataset
    recomputed = trainer._reference_log_probs(prepared, "train", 4)
    flat = [x for row in recomputed for x in row]
    assert flat == pytest.approx([x for row in prepared["ref_sequence_logps"] for x in row], abs=1e-4)
    # On the command line, sharded and merged like the other steps.
    source = tmp_path / "pairs.jsonl"
    data.to_json(str(source), lines=True)
    base = [
        "--dataset_name",
        str(source),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--max_length",
        str(max_length),
    ]
    for index in range(2):
        argv = base + ["--num_shards", "2", "--shard_index", str(index), "--chunk_size", "2"]
        assert (
            SUBCOMMANDS["ref-logps"](argv + ["--output_dir", str(tmp_path / f"s{index}")], "trl qrpo ref-logps") == 0
        )
    merged = merge_shards([tmp_path / "s0", tmp_path / "s1"])
    assert merged["chosen_ref_logp"] == pytest.approx(out["chosen_ref_logp"], abs=1e-5)


@pytest.mark.slow
def test_generate_and_ref_logps_under_a_two_process_launcher_equal_one_process(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2` runs one shard per process and merges them: the output equals one process's."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "prompts.jsonl"
    conversational_dataset().to_json(str(source), lines=True)
    gen = [f"--{k}={v}" for k, v in GEN.items()] + ["--backend", "transformers"]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    outputs = {}
    for name, launcher in (("one", [sys.executable, "-m"]), ("two", [torchrun, "--nproc_per_node", "2", "-m"])):
        common = ["--model_name_or_path", str(tiny_model_dir)]
        steps = [
            ["generate", "--dataset_name", str(source), *gen, "--output_dir", str(tmp_path / name / "refs")],
            [
                "ref-logps",
                "--dataset_name",
                str(tmp_path / name / "refs"),
                "--chunk_size",
                "2",
                "--output_dir",
                str(tmp_path / name / "lp"),
            ],
        ]
        for step in steps:
            result = subprocess.run(
                [*launcher, "trl_qrpo", *step, *common], capture_output=True, text=True, timeout=600, cwd=tmp_path
            )
            assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = load_from_disk(str(tmp_path / name / "lp"))
    one, two = outputs["one"], outputs["two"]
    assert (tmp_path / "two" / "refs" / "shards").is_dir()
    assert one["ref_completion_ids"] == two["ref_completion_ids"] and one["prompt"] == two["prompt"]
    flat = [[x for row in d["ref_logps"] for x in row] for d in (one, two)]
    assert flat[1] == pytest.approx(flat[0], abs=1e-4)
    assert two["ref_logp"] == pytest.approx(one["ref_logp"], abs=1e-4)


@pytest.mark.slow
def test_evaluate_under_a_two_process_launcher_equals_one_process(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m trl_qrpo evaluate`: one shard per process, merged by rank 0 with the summary
    of every sample; samples and summary equal one process's."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    source = tmp_path / "prompts.jsonl"
    conversational_dataset().to_json(str(source), lines=True)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = ["--dataset_name", str(source), "--model_name_or_path", str(tiny_model_dir), "--ref_model_name_or_path"]
    args += [str(tiny_model_dir), "--reward_funcs", "test_precompute.length_reward", "--num_samples", "2"]
    args += ["--max_new_tokens", "5", "--chunk_size", "2", "--backend", "transformers"]
    for name, launcher in (("one", [sys.executable, "-m"]), ("two", [torchrun, "--nproc_per_node", "2", "-m"])):
        command = [*launcher, "trl_qrpo", "evaluate", *args, "--output_dir", str(tmp_path / name)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = (load_from_disk(str(tmp_path / name)) for name in ("one", "two"))
    assert (tmp_path / "two" / "shards").is_dir() and len(two) == len(one) == 2 * len(conversational_dataset())
    assert two["completion_ids"] == one["completion_ids"] and two["reward"] == one["reward"]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")]
    assert summaries[1]["num_samples"] == summaries[0]["num_samples"]
    assert summaries[1]["mean_reward"] == pytest.approx(summaries[0]["mean_reward"])
    assert summaries[1]["kl"] == pytest.approx(summaries[0]["kl"], abs=1e-4)


def test_status_names_the_missing_chunks_and_the_command_that_finishes_them(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    real_save = Dataset.save_to_disk
    calls = {"n": 0}

    def dying_save(self, path, *args, **kwargs):
        if ".tmp-" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # killed while writing the second chunk
                raise KeyboardInterrupt
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", dying_save)
    monkeypatch.setattr("sys.argv", ["trl", "qrpo", "generate", "--config", "gen.yaml"])
    with pytest.raises(KeyboardInterrupt):
        generate_references(
            conversational_dataset(),
            GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(out), **GEN),
        )
    monkeypatch.setattr(Dataset, "save_to_disk", real_save)
    assert SUBCOMMANDS["status"]([str(out)], "trl qrpo status") == 1
    line = capsys.readouterr().out.strip()
    chunks = -(-len(conversational_dataset()) // GEN["chunk_size"])
    assert f"generate: 1 of {chunks} chunks done, missing chunks 1-{chunks - 1}" in line
    assert f"(rows {GEN['chunk_size']}-{len(conversational_dataset()) - 1})" in line
    assert line.endswith("Finish with: trl qrpo generate --config gen.yaml")
    generate_references(
        conversational_dataset(), GenerateConfig(model_name_or_path=str(tiny_model_dir), output_dir=str(out), **GEN)
    )
    assert SUBCOMMANDS["status"]([str(out)], "trl qrpo status") == 0
    assert "complete" in capsys.readouterr().out
    assert SUBCOMMANDS["status"]([str(tmp_path)], "trl qrpo status") == 1


def test_evaluate_reports_a_length_controlled_reward_from_the_reference_samples(tiny_model_dir):
    """With the prompts' reference samples (`ref_rewards`, `ref_num_tokens`), each sample also gets
    reward - slope x (length - the prompt's mean reference length), the slope fitted within prompts on the references."""
    data = conversational_dataset(3).remove_columns(["completion"])
    lengths = [[2, 4, 6], [3, 5, 10], [1, 4, 7]]
    data = data.add_column("ref_num_tokens", lengths)
    data = data.add_column("ref_rewards", [[0.5 * n + 3.0 * i for n in row] for i, row in enumerate(lengths)])
    samples, summary = evaluate_policy(
        data,
        EvaluateConfig(
            model_name_or_path=str(tiny_model_dir), reward_funcs=[length_reward], num_samples=2, max_new_tokens=6
        ),
    )
    assert summary["meta"]["length_slope"] == pytest.approx(0.5)
    for row in samples:
        mean_ref = sum(lengths[row["row_index"]]) / 3
        expected = row["reward"] - 0.5 * (row["num_tokens"] - mean_ref)
        assert row["length_controlled_reward"] == pytest.approx(expected)
    assert summary["mean_length_controlled_reward"] == pytest.approx(
        sum(samples["length_controlled_reward"]) / len(samples)
    )
