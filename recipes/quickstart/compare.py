"""Before/after table of the QRPO quick start: the reward of each model's own samples on held-out prompts.

    python recipes/quickstart/compare.py EVAL_REFERENCE_DIR EVAL_POLICY_DIR [--json]

Reads what `trl qrpo evaluate` wrote: `summary.json` in each folder, and the samples exported next to it
(`<folder>.jsonl`, from `--output_file`) when they exist. Both runs use the same prompts and the same per-sample seeds,
so the samples pair up; the paired difference of rewards is what the noise estimate uses. Standard library only.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path


def load(folder: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((folder / "summary.json").read_text())
    samples_file = folder.with_name(folder.name + ".jsonl")
    samples = []
    if samples_file.is_file():
        samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return summary, samples


def text(value) -> str:
    if isinstance(value, str):
        return value
    return "\n".join(m.get("content") or "" for m in value if isinstance(m, dict))


def paired_difference(reference: list[dict], policy: list[dict]) -> tuple[float, float, int] | None:
    """Mean and standard error of policy - reference reward over samples with the same prompt and seed."""
    ref = {(s["row_index"], s["sample_index"]): s["reward"] for s in reference}
    diffs = [s["reward"] - ref[key] for s in policy if (key := (s["row_index"], s["sample_index"])) in ref]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs)), len(diffs)


def compare(reference_dir: str, policy_dir: str) -> dict:
    ref_summary, ref_samples = load(Path(reference_dir))
    pol_summary, pol_samples = load(Path(policy_dir))
    result = {
        "num_prompts": pol_summary["num_prompts"],
        "num_samples": pol_summary["num_samples"],
        "reference": {
            k: ref_summary.get(k) for k in ("mean_reward", "stderr_reward", "mean_num_tokens", "truncated_fraction")
        },
        "policy": {
            k: pol_summary.get(k)
            for k in ("mean_reward", "stderr_reward", "kl", "kl_stderr", "mean_num_tokens", "truncated_fraction")
        },
        "reward_gain": pol_summary["mean_reward"] - ref_summary["mean_reward"],
    }
    paired = paired_difference(ref_samples, pol_samples)
    if paired is not None:
        result["reward_gain_stderr"] = paired[1]
    result["examples"] = examples(ref_samples, pol_samples)
    return result


def examples(reference: list[dict], policy: list[dict], count: int = 3) -> list[dict]:
    """The first sample of the first `count` prompts, from both models."""
    by_key = {(s["row_index"], s["sample_index"]): s for s in reference}
    out = []
    for sample in policy:
        if sample["sample_index"] != 0 or (sample["row_index"], 0) not in by_key:
            continue
        ref = by_key[(sample["row_index"], 0)]
        out.append(
            {
                "prompt": text(sample["prompt"]),
                "reference": (text(ref["completion"]), ref["reward"]),
                "policy": (text(sample["completion"]), sample["reward"]),
            }
        )
        if len(out) == count:
            break
    return out


def _pm(value, error, digits=2, sign="+") -> str:
    if value is None:
        return "-"
    return f"{value:{sign}.{digits}f}" + (f" ± {error:.{digits}f}" if error is not None else "")


def report(result: dict) -> str:
    ref, pol = result["reference"], result["policy"]
    rows = [
        ("", "reference model", "QRPO policy"),
        (
            "mean reward (VADER, -1..1)",
            _pm(ref["mean_reward"], ref["stderr_reward"]),
            _pm(pol["mean_reward"], pol["stderr_reward"]),
        ),
        ("KL to the reference (nats)", "0", _pm(pol["kl"], pol["kl_stderr"], 1, sign="")),
        ("mean length (tokens)", f"{ref['mean_num_tokens']:.1f}", f"{pol['mean_num_tokens']:.1f}"),
        ("cut at max_new_tokens", f"{ref['truncated_fraction']:.0%}", f"{pol['truncated_fraction']:.0%}"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"Held-out prompts: {result['num_prompts']}, {result['num_samples']} samples per model "
        "(same prompts and seeds for both; ± is a standard error)."
    ]
    lines += ["  " + "   ".join(cell.ljust(width[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    gain = f"Reward of the policy's own samples: {result['reward_gain']:+.2f}"
    if "reward_gain_stderr" in result:
        gain += f" ± {result['reward_gain_stderr']:.2f} (paired standard error)"
    lines += ["", gain]
    for example in result["examples"]:
        lines += ["", f"  prompt:    {example['prompt']}"]
        for name in ("reference", "policy"):
            completion, reward = example[name]
            wrapped = textwrap.shorten(" ".join(completion.split()), 96, placeholder=" ...")
            lines.append(f"  {name + ':':<10} [{reward:+.2f}] {wrapped}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--json"]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    result = compare(*args)
    print(json.dumps(result, indent=2) if "--json" in argv else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
