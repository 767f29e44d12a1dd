"""One round of N steps against three rounds of N/3 steps, on the same samples and steps, over several seeds.

    python recipes/iterative/compare_rounds.py OUTPUT_DIR [--seeds 0 1 2] [--config recipes/iterative/iterate.yaml]
    python recipes/iterative/compare_rounds.py OUTPUT_DIR --report      # the table and plot of the runs done so far

For each seed, `trl qrpo iterate` runs the recipe twice: three rounds of `prompts_per_round` fresh prompts (as the
recipe says), and one round of three times as many prompts (`--num_rounds 1 --prompts_per_round 3N`): the same number
of samples (prompts x num_generations) and of training steps, the same held-out prompts and evaluation seeds. The
seed changes the samples and the training (`--seed`). Runs already done are kept (each run resumes). Then the report:
each arm's final reward and KL to the starting model, mean and standard error over seeds, the per-seed paired
difference of rewards, `comparison.md`, `comparison.json` and (with matplotlib) `comparison.png`, reward against KL
to the starting model for every round. Run several seeds at once with one process per seed (`--seeds 1`), then
`--report`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

ARMS = {"three-rounds": "3 rounds x N/3 steps", "one-round": "1 round x N steps"}


def run_arm(arm: str, seed: int, config: Path, out: Path, per_round: int, evaluate_start: bool) -> None:
    flags = ["--seed", str(seed), "--output_dir", str(out / f"{arm}-seed{seed}")]
    if arm == "one-round":
        flags += ["--num_rounds", "1", "--prompts_per_round", str(3 * per_round)]
    # Every stage in this run's process: a 135M model fits, and each stage saves a process start-up (~10 s on 2 cores).
    flags += ["--evaluate_start", str(evaluate_start).lower(), "--stage_processes", "false"]
    command = [sys.executable, "-m", "trl_qrpo", "iterate", "--config", str(config), *flags]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def report(out: Path) -> dict:
    runs = {arm: {} for arm in ARMS}
    start = None
    for arm in ARMS:
        for folder in sorted(out.glob(f"{arm}-seed*")):
            summary_file = folder / "summary.json"
            if not summary_file.is_file():
                continue
            policies = json.loads(summary_file.read_text())["policies"]
            rounds = [p for p in policies if p["round"] is not None]
            if start is None:
                start = next((p for p in policies if p["round"] is None), None)
            expected = 3 if arm == "three-rounds" else 1
            if len(rounds) == expected:
                runs[arm][int(folder.name.rsplit("seed", 1)[1])] = rounds
    result = {"start": start, "arms": {}, "paired": None}
    for arm, by_seed in runs.items():
        if not by_seed:
            continue
        final = [rounds[-1] for rounds in by_seed.values()]
        points = []
        for r in range(len(next(iter(by_seed.values())))):
            rewards = [rounds[r]["mean_reward"] for rounds in by_seed.values()]
            kls = [rounds[r]["kl_to_start"] for rounds in by_seed.values()]
            points.append({"round": r, "reward": mean_stderr(rewards), "kl_to_start": mean_stderr(kls)})
        result["arms"][arm] = {
            "seeds": sorted(by_seed),
            "final_reward": mean_stderr([p["mean_reward"] for p in final]),
            "final_kl_to_start": mean_stderr([p["kl_to_start"] for p in final]),
            "final_mean_num_tokens": mean_stderr([p["mean_num_tokens"] for p in final]),
            "per_seed": {
                seed: {"reward": rounds[-1]["mean_reward"], "kl_to_start": rounds[-1]["kl_to_start"]}
                for seed, rounds in sorted(by_seed.items())
            },
            "rounds": points,
        }
    both = sorted(set(runs["three-rounds"]) & set(runs["one-round"]))
    if both:
        diffs = [runs["three-rounds"][s][-1]["mean_reward"] - runs["one-round"][s][-1]["mean_reward"] for s in both]
        kl_diffs = [runs["three-rounds"][s][-1]["kl_to_start"] - runs["one-round"][s][-1]["kl_to_start"] for s in both]
        result["paired"] = {"seeds": both, "reward": mean_stderr(diffs), "kl_to_start": mean_stderr(kl_diffs)}
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    (out / "comparison.md").write_text(markdown(result))
    plot(result, out / "comparison.png")
    return result


def _cell(pair, digits=3) -> str:
    mean, stderr = pair
    return f"{mean:+.{digits}f}" + ("" if stderr is None else f" ± {stderr:.{digits}f}")


def markdown(result: dict) -> str:
    lines = ["| arm | seeds | final reward | KL to start (nats) | tokens |", "|---|---|---|---|---|"]
    if result["start"] is not None:
        lines.append(
            f"| starting model | - | {result['start']['mean_reward']:+.3f} ± {result['start']['stderr_reward']:.3f} "
            f"(over samples) | 0 | {result['start']['mean_num_tokens']:.1f} |"
        )
    for arm, data in result["arms"].items():
        lines.append(
            f"| {ARMS[arm]} | {len(data['seeds'])} | {_cell(data['final_reward'])} | "
            f"{_cell(data['final_kl_to_start'], 2)} | {data['final_mean_num_tokens'][0]:.1f} |"
        )
    if result["paired"]:
        paired = result["paired"]
        lines += [
            "",
            (
                f"Three rounds minus one round, paired by seed ({len(paired['seeds'])} seeds): reward "
                f"{_cell(paired['reward'])}, KL to start {_cell(paired['kl_to_start'], 2)} nats (± standard errors "
                "over seeds)."
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, data in result["arms"].items():
        xs = [0.0] + [p["kl_to_start"][0] for p in data["rounds"]]
        ys = [result["start"]["mean_reward"] if result["start"] else math.nan] + [
            p["reward"][0] for p in data["rounds"]
        ]
        xerr = [0.0] + [p["kl_to_start"][1] or 0 for p in data["rounds"]]
        yerr = [0.0] + [p["reward"][1] or 0 for p in data["rounds"]]
        ax.errorbar(
            xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=f"{ARMS[arm]} ({len(data['seeds'])} seeds)"
        )
    ax.set_xlabel("KL to the starting model (nats)")
    ax.set_ylabel("reward of the policy's own samples")
    ax.set_title("Iterative QRPO: one round against three (± s.e. over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("iterate.yaml"))
    parser.add_argument("--report", action="store_true", help="Only write the report of the runs done so far.")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if not args.report:
        per_round = yaml.safe_load(args.config.read_text())["prompts_per_round"]
        for seed in args.seeds:
            for arm in ARMS:
                # The starting model is evaluated once (seed 0's first run): the same prompts and seeds every time.
                run_arm(arm, seed, args.config, args.output_dir, per_round, seed == 0 and arm == "three-rounds")
    print(markdown(report(args.output_dir)), end="")


if __name__ == "__main__":
    main()
