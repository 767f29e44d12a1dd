"""trl_qrpo.losses: quantile rewards against a brute-force count (ties and leave-one-out included), targets with the
continuous and the discrete partition functions (Monte Carlo over reference draws, exact sums in mpmath), the losses.
"""

import math
import warnings
from statistics import NormalDist

import mpmath
import pytest
import torch

from trl_qrpo import get_transform, qrpo_loss, qrpo_targets, quantile_rewards, rebel_loss
from trl_qrpo.losses import QuantileResult

mpmath.mp.dps = 40

# ---------------------------------------------------------------------------------------------------------------------
# Quantile rewards
# ---------------------------------------------------------------------------------------------------------------------


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


def quantiles(*args, **kwargs) -> torch.Tensor:
    return quantile_rewards(*args, **kwargs).quantiles


@pytest.mark.parametrize("ties", ["le", "midrank"])
@pytest.mark.parametrize("k,n", [(1, 1), (1, 7), (2, 5), (16, 40)])  # k=16: the sort + searchsorted path
def test_quantiles_match_brute_force_with_ties(ties, k, n):
    g = torch.Generator().manual_seed(k * 100 + n)
    rewards = torch.randint(0, 6, (300, k), generator=g).double()  # small integers: many ties
    ref = torch.randint(0, 6, (300, n), generator=g).double()
    got = quantiles(rewards, ref, ties=ties, warn_constant=False)
    assert torch.equal(got, brute_force(rewards, ref, ties))
    if k == 1:
        assert torch.equal(quantiles(rewards[:, 0], ref, ties=ties, warn_constant=False), got[:, 0])


def test_the_result_type():
    ref = torch.tensor([[0.1, 0.5, float("nan")], [0.2, 0.4, 0.6], [1.0, 1.0, 1.0]])
    result = quantile_rewards(torch.tensor([0.3, 0.3, 1.0]), ref, warn_constant=False)
    assert isinstance(result, QuantileResult)
    assert result.quantiles.dtype == torch.float64 and result.num_refs.dtype == torch.int64
    assert result.constant_rows.tolist() == [False, False, True]
    q, n, constant = result  # a named tuple: unpacks in field order
    assert torch.equal(constant, result.constant_rows)
    assert torch.equal(q, result.quantiles) and torch.equal(n, result.num_refs)
    # Shaped like the rewards: [N, k] in, [N, k] out; the constant rows stay [N].
    paired = quantile_rewards(torch.zeros(3, 2), ref, warn_constant=False)
    assert paired.quantiles.shape == paired.num_refs.shape == (3, 2) and paired.constant_rows.shape == (3,)


def test_ragged_reference_lists_padded_with_nan():
    ref = torch.tensor([[0.1, 0.5, float("nan")], [0.2, 0.4, 0.6]])
    q, n, _ = quantile_rewards(torch.tensor([0.3, 0.3]), ref)
    assert q.tolist() == [0.5, 1 / 3]
    assert n.tolist() == [2, 3]


def test_num_ref_rewards_uses_the_first_n():
    ref = torch.tensor([[0.1, 0.9, 0.2, 0.3]])
    assert quantiles(torch.tensor([0.5]), ref, num_ref_rewards=2).item() == 0.5
    assert quantiles(torch.tensor([0.5]), ref).item() == 0.75
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
    counts_le = torch.bincount((quantiles(fresh, ref, warn_constant=False) * n).round().long(), minlength=n + 1)
    q = quantiles(fresh, ref, ties="random", generator=g, warn_constant=False)
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
    assert quantiles(own, ref).item() == 0.75
    q, n, _ = quantile_rewards(own, ref, in_ref_rewards=torch.tensor([True]))
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
    """For continuous rewards, n * q_hat of a fresh draw is uniform on {0..n} (docs/math.md, "The quantile
    estimator")."""
    n, draws = 3, 40_000
    g = torch.Generator().manual_seed(1)
    q = quantiles(torch.randn(draws, generator=g), torch.randn(draws, n, generator=g))
    counts = torch.bincount((q * n).round().long(), minlength=n + 1).double()
    expected = draws / (n + 1)
    assert (((counts - expected) ** 2) / expected).sum().item() < 22.0  # 3 dof, P < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# Targets and the partition functions
# ---------------------------------------------------------------------------------------------------------------------


def monte_carlo_log_z(transform, beta, n, includes_self, draws=200_000, seed=0):
    """log E[exp(f(clamp(q_hat))/beta)] over fresh reference draws, with its standard error in log space.

    includes_self: the completion is one of the n references and its own reward counts (q_hat in {1/n..1}). The
    quantile is counted here, not with quantile_rewards.
    """
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(draws, n, generator=g, dtype=torch.float64)
    rewards = ref[:, 0] if includes_self else torch.randn(draws, generator=g, dtype=torch.float64)
    q = (ref <= rewards[:, None]).double().mean(dim=1)
    values = torch.exp(transform(transform.clamp(q, n)) / beta)
    mean = values.mean()
    stderr = values.std() / math.sqrt(draws)
    return math.log(mean.item()), (stderr / mean).item()


def mp_ndtri(p):
    """Phi^{-1}(p) in 40 digits, from mpmath's erfinv (independent of torch.special.ndtri)."""
    return mpmath.sqrt(2) * mpmath.erfinv(2 * mpmath.mpf(p) - 1)


def mp_discrete_log_z(f, beta, n, includes_self=False, clamp=(False, False)):
    """log of (1/|K|) sum_{k in K} exp(f(clamp(k/n))/beta), K = {0..n} or {1..n}, summed in 40 digits."""
    ks = range(1 if includes_self else 0, n + 1)
    total = mpmath.mpf(0)
    for k in ks:
        q = mpmath.mpf(k) / n
        if clamp[0]:
            q = max(q, mpmath.mpf(1) / n)
        if clamp[1]:
            q = min(q, mpmath.mpf(n - 1) / n)
        total += mpmath.exp(f(q) / mpmath.mpf(beta))
    return float(mpmath.log(total / len(ks)))


def mp_identity_log_z(beta):
    """log int_0^1 exp(t/beta) dt = log(beta (exp(1/beta) - 1)), in 40 digits."""
    beta = mpmath.mpf(beta)
    return float(mpmath.log(beta * mpmath.expm1(1 / beta)))


@pytest.mark.parametrize("n", [1, 3, 10])
@pytest.mark.parametrize("name,beta", [("identity", 0.3), ("log", 1.0), ("sqrt", 0.5), ("normal-icdf", 1.0)])
@pytest.mark.parametrize("includes_self", [False, True])
def test_discrete_partition_function_against_monte_carlo(n, name, beta, includes_self):
    transform = get_transform(name)
    if name == "normal-icdf" and n == 1:
        with pytest.raises(ValueError):
            qrpo_targets(torch.tensor([0.0]), transform, beta, num_refs=1, partition_mode="discrete")
        return
    expected, rel_err = monte_carlo_log_z(transform, beta, n, includes_self)
    got = transform.discrete_log_partition(beta, n, includes_self=includes_self)
    assert abs(got - expected) < 5 * rel_err + 1e-12
    # The continuous formula is a different number for small n (the point of the discrete mode).
    if name == "identity" and n <= 3:
        assert abs(transform.log_partition(beta) - got) > 10 * rel_err


def test_discrete_gaps_against_their_derivations():
    """The gaps docs/math.md ("The discrete partition function") derives, against exact sums in 40 digits.

    Identity, small beta: both partition functions are dominated by their top, so beta (log Z_n - log Z) tends to
    beta (log(1/beta) - log(n + 1)) (the top grid point carries 1/(n+1) of the mass, the continuous top a width beta).
    """
    identity, normal = get_transform("identity"), get_transform("normal-icdf")
    for beta, n, tail in [(0.01, 3, 1e-12), (0.1, 1, 1e-4)]:  # tail: the terms of order exp(-1/(n beta))
        exact = mp_discrete_log_z(lambda q: q, beta, n) - mp_identity_log_z(beta)
        gap = identity.discrete_log_partition(beta, n) - identity.log_partition(beta)
        assert gap == pytest.approx(exact, rel=1e-12, abs=1e-12)
        assert beta * gap == pytest.approx(beta * (math.log(1 / beta) - math.log(n + 1)), abs=tail)
    # normal-icdf: beta log Z = 1/(2 beta) exactly in the continuous mode; the discrete sum stays far below it
    # because clamp(k/n) never goes past (n-1)/n.
    assert 0.1 * normal.log_partition(0.1) == pytest.approx(1 / (2 * 0.1), rel=1e-15)
    for n in (6, 50):
        exact = mp_discrete_log_z(mp_ndtri, 0.1, n, clamp=(True, True))
        assert normal.discrete_log_partition(0.1, n) == pytest.approx(exact, rel=1e-12)
        # The top term dominates: beta log Z_n ~ Phi^-1((n-1)/n) - beta log(n + 1) + beta log 2 (two clamped ends
        # at the top, k = n-1 and k = n).
        top = float(mp_ndtri(mpmath.mpf(n - 1) / n)) - 0.1 * math.log((n + 1) / 2)
        assert 0.1 * normal.discrete_log_partition(0.1, n) == pytest.approx(top, abs=0.01)
    # log with one reference: every quantile is clamped to 1, the reward is always 0.
    targets, _ = qrpo_targets(torch.tensor([0.0, 1.0]), "log", 0.1, num_refs=1, partition_mode="discrete")
    assert torch.allclose(targets, torch.zeros(2, dtype=torch.float64))


def test_targets_are_f_of_clamped_q_minus_beta_log_z():
    q = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    beta = 0.05
    targets, beta_log_z = qrpo_targets(q, "log", beta, num_refs=4)
    expected_log_z = math.log(1 / 21)  # int_0^1 exp(log(t)/0.05) dt = int_0^1 t^20 dt = 1/21
    assert torch.allclose(beta_log_z, torch.full((3,), beta * expected_log_z, dtype=torch.float64))
    assert torch.allclose(
        targets, torch.tensor([math.log(0.25), math.log(0.25), 0.0], dtype=torch.float64) - beta * expected_log_z
    )
    targets, _ = qrpo_targets(q, "normal-icdf", beta, num_refs=4)
    assert torch.isfinite(targets).all()
    assert targets[1].item() == pytest.approx(NormalDist().inv_cdf(0.25) - beta / (2 * beta**2))
    with pytest.raises(ValueError, match="not finite for the quantile of row 0"):
        qrpo_targets(q, "log", beta)  # unknown n: nothing to clamp with


def test_length_normalised_beta_gives_per_completion_log_z():
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    betas = torch.tensor([0.1 / 10, 0.1 / 40], dtype=torch.float64)
    targets, beta_log_z = qrpo_targets(q, "identity", betas, num_refs=8)
    for i in range(2):
        b = betas[i].item()
        assert beta_log_z[i].item() == pytest.approx(b * mp_identity_log_z(b), rel=1e-12)
        assert targets[i].item() == pytest.approx(0.5 - b * mp_identity_log_z(b), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_mse_mae_and_length_normalisation():
    logratios = torch.tensor([1.0, -2.0, 0.5])
    targets = torch.tensor([0.2, 0.1, -0.3])
    beta = 0.1
    residual = targets - beta * logratios
    assert torch.allclose(qrpo_loss(logratios, targets, beta), residual**2)
    assert torch.allclose(qrpo_loss(logratios, targets, beta, loss_type="mae"), residual.abs())
    lengths = torch.tensor([2, 4, 8])
    assert torch.allclose(
        qrpo_loss(logratios, targets, beta, completion_lengths=lengths, normalize_by_length=True),
        residual**2 / lengths,
    )
    with pytest.raises(ValueError, match="loss_type"):
        qrpo_loss(logratios, targets, beta, loss_type="sigmoid")
    # The loss upcasts bf16 log-ratios to fp32.
    assert qrpo_loss(logratios.bfloat16(), targets, beta).dtype == torch.float32


def test_rebel_loss():
    loss = rebel_loss(torch.tensor([1.0]), torch.tensor([0.5]), torch.tensor([0.9]), torch.tensor([0.4]), beta=0.5)
    assert loss.item() == pytest.approx(((0.9 - 0.4) / 0.5 - (1.0 - 0.5)) ** 2)
