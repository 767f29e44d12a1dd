"""Tests of experiments/powered.py: the statistics of the powered matched-KL comparison (per-prompt means,
length-controlled rewards, curve interpolation, the paired prompt bootstrap, the matched-KL grid). Small numpy data,
expected values from closed forms or brute-force loops."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from powered import (
    curve_at_kl,
    length_controlled_rewards,
    matched_kl_bootstrap,
    matched_kl_grid,
    per_prompt_means,
)

from trl_qrpo.metrics import within_prompt_length_slope


def _records(rng, num_prompts, samples, kl, reward_mean, prompt_effect, noise, kl_noise=0.0):
    """Sample records of one run: logratio = kl (+ noise), reward = reward_mean + prompt_effect[p] + noise."""
    rows = np.repeat(np.arange(num_prompts), samples)
    logratio = kl + kl_noise * rng.standard_normal(rows.size)
    reward = reward_mean + prompt_effect[rows] + noise * rng.standard_normal(rows.size)
    lengths = rng.integers(10, 50, rows.size)
    return [
        {"row_index": int(r), "reward": float(w), "num_tokens": int(n), "logratio": float(x)}
        for r, w, n, x in zip(rows, reward, lengths, logratio)
    ]


def _method_runs(rng, num_prompts, kls, seeds, intercept, slope, prompt_effect, noise=0.5, samples=3, kl_noise=0.0):
    """Runs of one method whose true curve is reward = intercept + slope * KL, one beta per KL."""
    return [
        {
            "beta": float(beta),
            "seed": seed,
            "records": _records(rng, num_prompts, samples, kl, intercept + slope * kl, prompt_effect, noise, kl_noise),
        }
        for beta, kl in zip(np.arange(len(kls)) + 1.0, kls)
        for seed in seeds
    ]


# ----------------------------------------------------------------------------------------------------------------
# per_prompt_means
# ----------------------------------------------------------------------------------------------------------------


def test_per_prompt_means_matches_a_loop():
    rng = np.random.default_rng(1)
    records = [
        {"row_index": int(rng.integers(0, 7)), "reward": float(rng.normal()), "logratio": float(rng.normal())}
        for _ in range(200)
    ]
    records += [{"row_index": p, "reward": 1.0, "logratio": 0.0} for p in range(7)]  # every prompt has a sample
    for key in ("reward", "logratio"):
        expected = []
        for p in range(7):
            values = [r[key] for r in records if r["row_index"] == p]
            expected.append(sum(values) / len(values))
        got = per_prompt_means(records, 7, key)
        assert got.shape == (7,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_per_prompt_means_names_the_missing_prompt():
    records = [{"row_index": p, "reward": 1.0} for p in (0, 1, 3, 4)]
    with pytest.raises(ValueError, match="row_index 2"):
        per_prompt_means(records, 5, "reward")
    with pytest.raises(ValueError, match="row_index 5"):
        per_prompt_means(records + [{"row_index": 5, "reward": 0.0}], 5, "reward")


# ----------------------------------------------------------------------------------------------------------------
# length_controlled_rewards
# ----------------------------------------------------------------------------------------------------------------


def test_length_controlled_rewards_recovers_the_slope():
    rng = np.random.default_rng(2)
    intercepts = rng.normal(size=6)
    reference = []
    for seed in range(2):  # two reference seeds, pooled
        for p in range(6):
            for _ in range(4):
                n = int(rng.integers(5, 80))
                reference.append({"row_index": p, "num_tokens": n, "reward": intercepts[p] + 0.1 * n, "seed": seed})
    by_prompt = [[r for r in reference if r["row_index"] == p] for p in range(6)]
    slope = within_prompt_length_slope(
        [[r["reward"] for r in rs] for rs in by_prompt], [[r["num_tokens"] for r in rs] for rs in by_prompt]
    )
    assert slope == pytest.approx(0.1, abs=1e-12)

    policy = [
        {"row_index": int(rng.integers(0, 6)), "num_tokens": int(rng.integers(1, 200)), "reward": float(rng.normal())}
        for _ in range(30)
    ]
    mean_length = [np.mean([r["num_tokens"] for r in rs]) for rs in by_prompt]
    expected = [r["reward"] - 0.1 * (r["num_tokens"] - mean_length[r["row_index"]]) for r in policy]
    got = length_controlled_rewards(policy, reference)
    assert got.shape == (30,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    # On the reference's own samples the correction removes length entirely: each prompt's LC reward is constant,
    # equal to intercept + 0.1 * the prompt's mean reference length.
    got_reference = length_controlled_rewards(reference, reference)
    for r, value in zip(reference, got_reference):
        assert value == pytest.approx(intercepts[r["row_index"]] + 0.1 * mean_length[r["row_index"]], abs=1e-10)


def test_length_controlled_rewards_constant_lengths_gives_raw_rewards():
    rng = np.random.default_rng(3)
    reference = [{"row_index": p, "num_tokens": 10 + p, "reward": float(rng.normal())} for p in range(4) for _ in "ab"]
    policy = [{"row_index": p % 4, "num_tokens": 3 * p + 1, "reward": float(rng.normal())} for p in range(9)]
    np.testing.assert_array_equal(length_controlled_rewards(policy, reference), [r["reward"] for r in policy])


def test_length_controlled_rewards_needs_the_prompt_in_the_reference():
    reference = [{"row_index": 0, "num_tokens": n, "reward": 0.1 * n} for n in (3, 7)]
    with pytest.raises(ValueError, match="row_index 4"):
        length_controlled_rewards([{"row_index": 4, "num_tokens": 5, "reward": 1.0}], reference)


# ----------------------------------------------------------------------------------------------------------------
# curve_at_kl
# ----------------------------------------------------------------------------------------------------------------


def test_curve_at_kl_interpolates_linearly_between_sorted_points():
    kls, rewards = [3.0, 0.0, 1.0], [4.0, 1.0, 3.0]  # unsorted: (0, 1), (1, 3), (3, 4)
    for kl in np.linspace(0, 3, 13):
        expected = 1 + 2 * kl if kl <= 1 else 3 + (kl - 1) / 2
        assert curve_at_kl(kls, rewards, kl) == pytest.approx(expected, abs=1e-12)
    assert curve_at_kl(kls, rewards, 0.0) == 1.0 and curve_at_kl(kls, rewards, 3.0) == 4.0
    assert curve_at_kl(kls, rewards, -1e-9) is None
    assert curve_at_kl(kls, rewards, 3.0 + 1e-9) is None


def test_curve_at_kl_single_point():
    assert curve_at_kl([2.0], [5.0], 2.0) == 5.0
    assert curve_at_kl([2.0], [5.0], 2.1) is None


# ----------------------------------------------------------------------------------------------------------------
# matched_kl_bootstrap
# ----------------------------------------------------------------------------------------------------------------


def test_constant_shift_gives_that_difference_and_a_zero_width_ci():
    rng = np.random.default_rng(4)
    num_prompts = 30
    b_runs = _method_runs(
        rng, num_prompts, [0.5, 1.5, 3.0], [0, 1], 0.0, 0.3, rng.normal(size=num_prompts), kl_noise=1
    )
    a_runs = [
        {**run, "records": [{**r, "reward": r["reward"] + 0.2} for r in run["records"]]} for run in b_runs
    ]  # same logratios, so the same KLs in every draw
    rows, points = matched_kl_bootstrap(
        {"A": a_runs, "B": b_runs}, num_prompts, [1.0, 2.0], [("A", "B"), ("B", "A")], num_bootstrap=300
    )
    assert len(rows) == 4 and len(points) == 6
    for row in rows:
        sign = 1 if row["a"] == "A" else -1
        assert row["difference"] == pytest.approx(0.2 * sign, abs=1e-12)
        assert row["ci_low"] == pytest.approx(0.2 * sign, abs=1e-12)
        assert row["ci_high"] == pytest.approx(0.2 * sign, abs=1e-12)
        assert row["p_a_better"] == (1.0 if sign > 0 else 0.0)
        assert 0 < row["draws_used"] <= 300
        assert row["num_prompts"] == num_prompts and row["seeds_a"] == [0, 1] and row["seeds_b"] == [0, 1]


def test_bootstrap_matches_a_brute_force_loop():
    """Points, point estimate, CI and p from the vectorised bootstrap equal a draw-by-draw loop with the same draws."""
    rng = np.random.default_rng(5)
    num_prompts, num_bootstrap = 12, 300  # more draws than one chunk
    effect = rng.normal(size=num_prompts)
    runs = {
        "A": _method_runs(rng, num_prompts, [0.5, 1.5, 2.5], [0, 1], 0.1, 0.4, effect, kl_noise=0.5),
        "B": _method_runs(rng, num_prompts, [0.3, 2.0], [0, 1, 2], 0.0, 0.5, effect, kl_noise=0.5),
    }
    runs["B"] = runs["B"][:-1]  # beta 2 of B has two seeds, beta 1 three
    grid = [1.0, 1.5]
    rows, points = matched_kl_bootstrap(runs, num_prompts, grid, [("A", "B")], num_bootstrap=num_bootstrap, seed=9)

    def means(run, key):
        return np.array([np.mean([r[key] for r in run["records"] if r["row_index"] == p]) for p in range(num_prompts)])

    def curve(method, index):
        betas = sorted({run["beta"] for run in runs[method]})
        kls, rewards, seeds = [], [], []
        for beta in betas:
            members = [run for run in runs[method] if run["beta"] == beta]
            kls.append(np.mean([means(run, "logratio")[index].mean() for run in members]))
            rewards.append(np.mean([means(run, "reward")[index].mean() for run in members]))
            seeds.append(sorted(run["seed"] for run in members))
        return betas, kls, rewards, seeds

    everything = np.arange(num_prompts)
    expected_points = []
    for method in ("A", "B"):
        betas, kls, rewards, seeds = curve(method, everything)
        expected_points += [(method, b, s, k, r) for b, s, k, r in zip(betas, seeds, kls, rewards)]
    assert [(q["method"], q["beta"], q["seeds"]) for q in points] == [e[:3] for e in expected_points]
    np.testing.assert_allclose([q["kl"] for q in points], [e[3] for e in expected_points], atol=1e-12)
    np.testing.assert_allclose([q["reward"] for q in points], [e[4] for e in expected_points], atol=1e-12)

    draws = np.random.default_rng(9).integers(0, num_prompts, size=(num_bootstrap, num_prompts))
    full = [curve(method, everything)[1:3] for method in ("A", "B")]
    resampled = [[curve(method, index)[1:3] for method in ("A", "B")] for index in draws]
    for g, kl in enumerate(grid):
        estimate = curve_at_kl(*full[0], kl) - curve_at_kl(*full[1], kl)
        differences = []
        for curve_a, curve_b in resampled:
            a, b = curve_at_kl(*curve_a, kl), curve_at_kl(*curve_b, kl)
            if a is not None and b is not None:
                differences.append(a - b)
        row = rows[g]
        assert row["kl"] == kl and row["difference"] == pytest.approx(estimate, abs=1e-10)
        assert 0 < row["draws_used"] == len(differences)
        assert [row["ci_low"], row["ci_high"]] == pytest.approx(np.percentile(differences, [2.5, 97.5]), abs=1e-10)
        assert row["p_a_better"] == pytest.approx(np.mean(np.array(differences) > 0))


def test_points_standard_errors_over_seeds():
    rng = np.random.default_rng(6)
    effect = rng.normal(size=8)
    runs = _method_runs(rng, 8, [1.0, 2.0], [0, 1, 2], 0.0, 1.0, effect, kl_noise=0.3)
    runs = runs[:4]  # beta 1: seeds 0, 1, 2; beta 2: seed 0 only
    _, points = matched_kl_bootstrap({"M": runs}, 8, [], [], num_bootstrap=10, key="reward")
    assert [(q["beta"], q["seeds"]) for q in points] == [(1.0, [0, 1, 2]), (2.0, [0])]
    per_seed = [
        (np.mean([r["logratio"] for r in run["records"]]), np.mean([r["reward"] for r in run["records"]]))
        for run in runs[:3]
    ]  # equal samples per prompt: the mean of per-prompt means is the plain mean
    kl, reward = np.array(per_seed).T
    assert points[0]["kl"] == pytest.approx(kl.mean()) and points[0]["reward"] == pytest.approx(reward.mean())
    assert points[0]["kl_se"] == pytest.approx(np.sqrt(np.sum((kl - kl.mean()) ** 2) / 2 / 3))
    assert points[0]["reward_se"] == pytest.approx(np.sqrt(np.sum((reward - reward.mean()) ** 2) / 2 / 3))
    assert points[1]["kl_se"] is None and points[1]["reward_se"] is None


def _simulated_comparison(rng, num_prompts, grid, num_bootstrap, prompt_sd=1.0):
    """Two methods with known linear curves: A = 0.3 + 0.2 KL, B = 0.1 + 0.4 KL (difference 0.2 - 0.2 KL)."""
    effect = prompt_sd * rng.normal(size=num_prompts)
    runs = {
        "A": _method_runs(rng, num_prompts, [0.5, 1.5, 3.0], [0, 1], 0.3, 0.2, effect, noise=1.0),
        "B": _method_runs(rng, num_prompts, [0.25, 2.0, 3.5], [0, 1], 0.1, 0.4, effect, noise=1.0),
    }
    seed = int(rng.integers(1 << 30))
    rows, _ = matched_kl_bootstrap(runs, num_prompts, grid, [("A", "B")], num_bootstrap=num_bootstrap, seed=seed)
    return rows


def test_ci_covers_the_true_difference_and_shrinks_with_prompts():
    rng = np.random.default_rng(7)
    grid = [1.0, 2.5]
    truth = {kl: 0.2 - 0.2 * kl for kl in grid}
    covered = total = 0
    for _ in range(30):
        for row in _simulated_comparison(rng, 40, grid, 300):
            total += 1
            covered += row["ci_low"] <= truth[row["kl"]] <= row["ci_high"]
    assert 0.8 <= covered / total <= 1.0

    widths = {}
    for num_prompts in (60, 240):
        rows = _simulated_comparison(rng, num_prompts, grid, 1000)
        widths[num_prompts] = np.array([row["ci_high"] - row["ci_low"] for row in rows])
        assert all(row["ci_low"] <= truth[row["kl"]] <= row["ci_high"] for row in rows)
    ratio = widths[240] / widths[60]
    assert np.all((0.35 < ratio) & (ratio < 0.7)), ratio


def test_pairing_removes_the_shared_prompt_effect():
    rng = np.random.default_rng(8)
    num_prompts = 200
    effect = 3.0 * rng.normal(size=num_prompts)  # large, shared by both methods
    runs = {
        "A": _method_runs(rng, num_prompts, [1.0], [0], 0.1, 0.0, effect, noise=0.3, samples=4),
        "B": _method_runs(rng, num_prompts, [1.0], [0], 0.0, 0.0, effect, noise=0.3, samples=4),
    }
    rows, _ = matched_kl_bootstrap(runs, num_prompts, [1.0], [("A", "B")], num_bootstrap=2000, seed=1)
    (row,) = rows
    a = per_prompt_means(runs["A"][0]["records"], num_prompts, "reward")
    b = per_prompt_means(runs["B"][0]["records"], num_prompts, "reward")
    assert row["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert row["draws_used"] == 2000
    paired = row["ci_high"] - row["ci_low"]
    # The paired bootstrap of a mean difference: about 2 * 1.96 * sd(a - b) / sqrt(T).
    assert paired == pytest.approx(2 * 1.96 * np.std(a - b) / np.sqrt(num_prompts), rel=0.15)

    # Resampling A's and B's prompts independently, by hand.
    draws = np.random.default_rng(2)
    independent = np.array(
        [
            a[draws.integers(0, num_prompts, num_prompts)].mean()
            - b[draws.integers(0, num_prompts, num_prompts)].mean()
            for _ in range(2000)
        ]
    )
    independent_width = np.subtract(*np.percentile(independent, [97.5, 2.5]))
    assert independent_width == pytest.approx(2 * 1.96 * np.sqrt((np.var(a) + np.var(b)) / num_prompts), rel=0.15)
    assert paired < 0.15 * independent_width


def test_kl_outside_a_curve_gives_no_difference():
    rng = np.random.default_rng(10)
    effect = rng.normal(size=20)
    runs = {
        "A": _method_runs(rng, 20, [0.5, 2.0], [0], 0.0, 0.1, effect, kl_noise=1.0),
        "B": _method_runs(rng, 20, [1.0, 4.0], [0], 0.0, 0.1, effect, kl_noise=1.0),
    }
    _, points = matched_kl_bootstrap(runs, 20, [], [], num_bootstrap=10)
    edge = max(q["kl"] for q in points if q["method"] == "A")  # A's highest KL: covered in about half the draws
    rows, _ = matched_kl_bootstrap(runs, 20, [0.0, edge, 5.0], [("A", "B")], num_bootstrap=400)
    for row in (rows[0], rows[2]):
        assert row["difference"] is None and row["ci_low"] is None and row["ci_high"] is None
        assert row["p_a_better"] is None and row["draws_used"] == 0
    assert rows[1]["difference"] is not None and 80 < rows[1]["draws_used"] < 320


def test_default_grid_and_unknown_method():
    rng = np.random.default_rng(11)
    effect = rng.normal(size=5)
    runs = {
        "A": _method_runs(rng, 5, [0.2, 1.7], [0], 0.0, 0.1, effect),
        "B": _method_runs(rng, 5, [0.9, 2.6], [0], 0.0, 0.1, effect),
    }
    rows, _ = matched_kl_bootstrap(runs, 5, None, [("A", "B")], num_bootstrap=20)
    assert [row["kl"] for row in rows] == pytest.approx([1.0, 1.5])
    with pytest.raises(ValueError, match="'C'"):
        matched_kl_bootstrap(runs, 5, [1.0], [("A", "C")], num_bootstrap=20)


# ----------------------------------------------------------------------------------------------------------------
# matched_kl_grid
# ----------------------------------------------------------------------------------------------------------------


def test_matched_kl_grid():
    assert matched_kl_grid({"A": [0.2, 1.7, 3.1], "B": [0.9, 2.6]}) == [1.0, 1.5, 2.0, 2.5]
    assert matched_kl_grid({"A": [{"kl": 0.5}, {"kl": 2.0}], "B": [{"kl": 1.0}, {"kl": 3.0}]}) == [1.0, 1.5, 2.0]
    flat = [
        {"method": "A", "kl": 0.5},
        {"method": "A", "kl": 2.0},
        {"method": "B", "kl": 1.0},
        {"method": "B", "kl": 3},
    ]
    assert matched_kl_grid(flat, step=0.25) == [1.0, 1.25, 1.5, 1.75, 2.0]
    assert matched_kl_grid({"A": [0.1, 0.9], "B": [1.2, 3.0]}) == []
    assert matched_kl_grid({"A": [0.6, 0.9], "B": [0.0, 3.0]}) == []  # overlap without a multiple of 0.5
    assert matched_kl_grid({"A": [1.0], "B": [0.0, 3.0]}) == [1.0]
    assert matched_kl_grid({}) == []


# ----------------------------------------------------------------------------------------------------------------
# report.powered_report: each comparison at the KLs its own two curves cover, pi_ref's row
# ----------------------------------------------------------------------------------------------------------------


def test_powered_report_compares_each_pair_over_its_own_overlap(tmp_path):
    """QRPO covers KL 1-6, DPO best/worst 4-9, DPO all pairs 5.5-12: QRPO vs best/worst is compared at 4-6 (not only
    where all three overlap, 5.5-6), QRPO vs all pairs at 5.5-6; the difference read at a KL is the two curves' linear
    interpolation (sample noise 0 here, so the bootstrap interval is that point); pi_ref's row is its mean over seeds."""
    import json

    from config import load_config
    from report import POWERED_LABELS, powered_report

    num_prompts, seeds = 4, [0, 1]
    cfg = load_config(
        REPO / "experiments" / "config.yaml",
        "powered",
        ("--split_num_eval", str(num_prompts), "--powered_bootstrap", "20", "--eval_seeds", "0", "1"),
    )
    rng = np.random.default_rng(0)
    effect = rng.normal(size=num_prompts)
    arms = {  # (method, data) -> (KL of each beta, intercept, slope of the true reward-KL line)
        ("qrpo", "pointwise"): ([1.0, 6.0], 0.1, 0.05),
        ("dpo", "pairs"): ([4.0, 9.0], 0.2, 0.01),
        ("dpo", "all_pairs"): ([5.5, 12.0], 0.0, 0.02),
    }
    for (method, data), (kls, intercept, slope) in arms.items():
        for run in _method_runs(rng, num_prompts, kls, seeds, intercept, slope, effect, noise=0.0):
            folder = tmp_path / "runs" / f"powered-{method}-{data}-b{run['beta']}-s{run['seed']}"
            folder.mkdir(parents=True)
            result = {"method": method, "data": data, "beta": run["beta"], "seed": run["seed"], "learning_rate": 3e-5}
            (folder / "result.json").write_text(json.dumps(result))
            (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run["records"]))
    reference_means = []
    for seed in seeds:
        records = _records(rng, num_prompts, 3, 0.0, 0.05 * seed, effect, 0.3)
        reference_means.append(np.mean([r["reward"] for r in records]))
        (tmp_path / "eval" / f"reference-s{seed}").mkdir(parents=True)
        (tmp_path / "eval" / f"reference-s{seed}" / "samples.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )

    (tmp_path / "results").mkdir()
    out = powered_report(cfg, tmp_path, tmp_path / "results")
    qrpo, best_worst, all_pairs = (POWERED_LABELS[arm] for arm in arms)
    grids = out["reward"]["kl_grid"]
    assert grids == {f"{qrpo} vs {best_worst}": [4.0, 4.5, 5.0, 5.5, 6.0], f"{qrpo} vs {all_pairs}": [5.5, 6.0]}
    truth = {label: arms[arm] for arm, label in POWERED_LABELS.items()}
    for row in out["reward"]["comparisons"]:
        (_, a0, a1), (_, b0, b1) = truth[row["a"]], truth[row["b"]]
        expected = (a0 + a1 * row["kl"]) - (b0 + b1 * row["kl"]) + 0.0
        assert row["difference"] == pytest.approx(expected, abs=1e-9)
        assert row["ci_low"] == pytest.approx(expected, abs=1e-9) and row["ci_high"] == pytest.approx(
            expected, abs=1e-9
        )
    assert len(out["reward"]["comparisons"]) == 7
    assert out["reference"]["seeds"] == 2
    assert out["reference"]["reward"] == pytest.approx(np.mean(reference_means))
    assert out["reference"]["reward_se"] == pytest.approx(np.std(reference_means, ddof=1) / np.sqrt(2))
    table = (tmp_path / "results" / "powered_table.md").read_text()
    assert "| pi_ref | – | 2 | 0 |" in table and table.count(f"| {qrpo} - {best_worst} | ") == 2 * 5


def test_plots_say_how_many_seeds_each_point_averages():
    """The plots' titles give the seed count: one count when every point has it, the range when they differ."""
    from report import seeds_label

    assert seeds_label([4, 4, 4]) == "4 seeds"
    assert seeds_label([1, 3, 3, 1]) == "1-3 seeds"
    assert seeds_label([1]) == "1 seed"
    assert seeds_label([]) == "no seeds"
