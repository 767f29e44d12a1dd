"""trl_qrpo.metrics: the one Spearman correlation of the package, for tensors, numpy arrays and lists."""

import random

import numpy as np
import pytest
import torch

from trl_qrpo.metrics import spearman_correlation


def ranks(values):
    """1-based ranks, ties sharing the average of their ranks (counted by hand)."""
    return [sum(w < a for w in values) + (sum(w == a for w in values) + 1) / 2 for a in values]


def by_hand(x, y):
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


X = [0.0, 0.5, 0.5, 1.0, 2.0, 2.0, 3.0]
Y = [0.3, 0.1, 0.7, 0.7, 2.5, 1.0, 4.0]


@pytest.mark.parametrize(
    "convert",
    [
        list,
        np.asarray,
        torch.tensor,
        lambda v: torch.tensor(v, dtype=torch.bfloat16),
        lambda v: np.asarray(v)[:, None],
    ],
    ids=["list", "numpy", "tensor", "bf16-tensor", "numpy-2d"],
)
def test_every_input_type_gives_the_hand_counted_value(convert):
    rho = spearman_correlation(convert(X), convert(Y))  # bf16 rounding keeps every order and tie of X and Y
    assert isinstance(rho, float)
    assert rho == pytest.approx(by_hand(X, Y), abs=1e-12)


def test_none_when_undefined_and_an_error_when_lengths_differ():
    assert spearman_correlation([1.0], [2.0]) is None  # fewer than 2 pairs
    assert spearman_correlation([], []) is None
    assert spearman_correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None  # a constant input
    assert spearman_correlation([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0]) is None
    assert spearman_correlation(np.arange(5), np.arange(5) ** 3) == pytest.approx(1.0)  # integers, any increasing map
    with pytest.raises(ValueError, match="same length"):
        spearman_correlation([1.0, 2.0], [1.0, 2.0, 3.0])


def test_spearman_correlation_contract():
    """Tensors in, a float or None out; average ranks for ties (checked against ranks counted by hand)."""

    def by_hand(x, y):
        def ranks(v):  # 1-based rank, ties sharing the average of their ranks
            return [sum(w < a for w in v) + (sum(w == a for w in v) + 1) / 2 for a in v]

        return float(np.corrcoef(ranks(x), ranks(y))[0, 1])

    rng = random.Random(0)
    x = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(30)]  # many ties
    y = [a + rng.gauss(0, 1) for a in x]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rho = spearman_correlation(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype))
        xs, ys = torch.tensor(x, dtype=dtype).double().tolist(), torch.tensor(y, dtype=dtype).double().tolist()
        assert isinstance(rho, float) and rho == pytest.approx(by_hand(xs, ys), abs=1e-12)
    t = torch.arange(6.0)
    assert spearman_correlation(t, t.exp()) == pytest.approx(1.0)  # any increasing map
    assert spearman_correlation(t, -t) == pytest.approx(-1.0)
    assert spearman_correlation(t[:1], t[:1]) is None  # fewer than 2 values
    assert spearman_correlation(t, torch.ones(6)) is None  # a constant input: undefined


def test_within_prompt_length_slope_recovers_the_slope_and_ignores_prompt_effects():
    from trl_qrpo.metrics import within_prompt_length_slope

    rng = np.random.default_rng(0)
    lengths = [rng.integers(5, 60, size=8) for _ in range(20)]
    # reward = 0.02 per token + a large per-prompt offset: a pooled regression without intercepts would be fooled
    rewards = [0.02 * n + 10.0 * i for i, n in enumerate(lengths)]
    assert within_prompt_length_slope(rewards, lengths) == pytest.approx(0.02, abs=1e-12)
    # with noise, the estimate is the least-squares slope of the demeaned data (numpy's polyfit as the oracle)
    noisy = [r + rng.normal(0, 0.1, size=r.shape) for r in rewards]
    demeaned_l = np.concatenate([n - n.mean() for n in lengths])
    demeaned_r = np.concatenate([r - r.mean() for r in noisy])
    assert within_prompt_length_slope(noisy, lengths) == pytest.approx(np.polyfit(demeaned_l, demeaned_r, 1)[0])
    assert within_prompt_length_slope([[1.0, 2.0]], [[3, 3]]) is None  # no length variation: undefined
