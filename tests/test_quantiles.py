"""Quantile rewards against a brute-force count, ties and leave-one-out included."""

import warnings

import pytest
import torch

from trl_qrpo import quantile_rewards


def brute_force(rewards, ref, ties):
    out = torch.empty(rewards.shape, dtype=torch.float64)
    for i in range(rewards.shape[0]):
        refs = [x for x in ref[i].tolist() if x == x]  # drop NaN padding
        for j in range(rewards.shape[1]):
            r = rewards[i, j].item()
            below = sum(x < r for x in refs)
            equal = sum(x == r for x in refs)
            out[i, j] = (below + equal if ties == "le" else below + 0.5 * equal) / len(refs)
    return out


@pytest.mark.parametrize("ties", ["le", "midrank"])
@pytest.mark.parametrize("k,n", [(1, 1), (1, 7), (2, 5), (16, 40)])  # k=16: the sort + searchsorted path
def test_quantiles_match_brute_force_with_ties(ties, k, n):
    g = torch.Generator().manual_seed(k * 100 + n)
    rewards = torch.randint(0, 6, (300, k), generator=g).double()  # small integers: many ties
    ref = torch.randint(0, 6, (300, n), generator=g).double()
    got = quantile_rewards(rewards, ref, ties=ties, warn_constant=False)
    assert torch.equal(got, brute_force(rewards, ref, ties))
    if k == 1:
        assert torch.equal(quantile_rewards(rewards[:, 0], ref, ties=ties, warn_constant=False), got[:, 0])


def test_ragged_reference_lists_padded_with_nan():
    ref = torch.tensor([[0.1, 0.5, float("nan")], [0.2, 0.4, 0.6]])
    q, n = quantile_rewards(torch.tensor([0.3, 0.3]), ref, return_num_refs=True)
    assert q.tolist() == [0.5, 1 / 3]
    assert n.tolist() == [2, 3]


def test_num_ref_rewards_uses_the_first_n():
    ref = torch.tensor([[0.1, 0.9, 0.2, 0.3]])
    assert quantile_rewards(torch.tensor([0.5]), ref, num_ref_rewards=2).item() == 0.5
    assert quantile_rewards(torch.tensor([0.5]), ref).item() == 0.75
    with pytest.raises(ValueError, match="fewer than num_ref_rewards=5"):
        quantile_rewards(torch.tensor([0.5]), ref, num_ref_rewards=5)


def test_random_tie_breaking_restores_the_uniform_law():
    """Binary rewards: with '<=' ties the quantile of a fresh sample is far from uniform; random tie-breaking makes
    n * q uniform on {0..n} exactly (checked by a chi-square bound over many draws)."""
    n, draws = 4, 40_000
    g = torch.Generator().manual_seed(0)
    p = 0.3
    ref = (torch.rand(draws, n, generator=g) < p).double()
    fresh = (torch.rand(draws, generator=g) < p).double()
    counts_le = torch.bincount((quantile_rewards(fresh, ref, warn_constant=False) * n).round().long(), minlength=n + 1)
    q = quantile_rewards(fresh, ref, ties="random", generator=g, warn_constant=False)
    counts = torch.bincount((q * n).round().long(), minlength=n + 1).double()
    expected = draws / (n + 1)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0  # 4 degrees of freedom: P(chi2 > 25) < 1e-4
    chi2_le = ((counts_le.double() - expected) ** 2 / expected).sum().item()
    assert chi2_le > 1000.0


def test_leave_one_out_for_completions_among_their_references():
    ref = torch.tensor([[0.1, 0.5, 0.9, 0.5]])
    own = torch.tensor([0.5])
    # Counting itself: #{<= 0.5} = 3 of 4. Leave one out: 2 of 3 (the other 0.5 still ties).
    assert quantile_rewards(own, ref).item() == 0.75
    q, n = quantile_rewards(own, ref, in_ref_rewards=torch.tensor([True]), return_num_refs=True)
    assert q.item() == pytest.approx(2 / 3) and n.item() == 3
    with pytest.raises(ValueError, match="no reference reward equals its reward"):
        quantile_rewards(torch.tensor([0.7]), ref, in_ref_rewards=torch.tensor([True]))


def test_warns_with_the_count_of_constant_reference_rows():
    ref = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0], [2.0, 2.0, 2.0]])
    with pytest.warns(UserWarning, match="2 of 3 rows have reference rewards that are all equal"):
        quantile_rewards(torch.zeros(3), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantile_rewards(torch.zeros(1), ref[1:2])


def test_fresh_sample_quantile_is_uniform_on_the_grid():
    """For continuous rewards, n * q_hat of a fresh draw is uniform on {0..n} (qrpo-math.md section 2)."""
    n, draws = 3, 40_000
    g = torch.Generator().manual_seed(1)
    q = quantile_rewards(torch.randn(draws, generator=g), torch.randn(draws, n, generator=g))
    counts = torch.bincount((q * n).round().long(), minlength=n + 1).double()
    expected = draws / (n + 1)
    assert (((counts - expected) ** 2) / expected).sum().item() < 22.0  # 3 dof, P < 1e-4
