"""Targets with the continuous and the discrete partition functions (Monte Carlo over reference draws), the loss."""

import math

import pytest
import torch

from trl_qrpo import get_transform, qrpo_loss, qrpo_targets, quantile_rewards, rebel_loss


def monte_carlo_log_z(transform, beta, n, includes_self, draws=200_000, seed=0):
    """log E[exp(f(clamp(q_hat))/beta)] over fresh reference draws, with its standard error in log space.

    includes_self: the completion is one of the n references and its own reward counts (q_hat in {1/n..1}).
    """
    g = torch.Generator().manual_seed(seed)
    if includes_self:
        ref = torch.randn(draws, n, generator=g, dtype=torch.float64)
        rewards = ref[:, 0]
    else:
        ref = torch.randn(draws, n, generator=g, dtype=torch.float64)
        rewards = torch.randn(draws, generator=g, dtype=torch.float64)
    q = quantile_rewards(rewards, ref, warn_constant=False)
    values = torch.exp(transform(transform.clamp(q, n)) / beta)
    mean = values.mean()
    stderr = values.std() / math.sqrt(draws)
    return math.log(mean.item()), (stderr / mean).item()


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


def test_discrete_gap_figures_from_the_math_notes():
    identity, normal = get_transform("identity"), get_transform("normal-icdf")
    gap = 0.01 * (identity.discrete_log_partition(0.01, 3) - identity.log_partition(0.01))
    assert abs(gap) == pytest.approx(0.032, abs=0.002)
    gap = 0.1 * (identity.discrete_log_partition(0.1, 1) - identity.log_partition(0.1))
    assert abs(gap) == pytest.approx(0.16, abs=0.01)
    assert 0.1 * normal.log_partition(0.1) == pytest.approx(5.0)
    assert 0.1 * normal.discrete_log_partition(0.1, 6) == pytest.approx(0.84, abs=0.01)
    assert 0.1 * normal.discrete_log_partition(0.1, 50) == pytest.approx(1.73, abs=0.01)
    # log with one reference: every quantile is clamped to 1, the reward is always 0.
    targets, _ = qrpo_targets(torch.tensor([0.0, 1.0]), "log", 0.1, num_refs=1, partition_mode="discrete")
    assert torch.allclose(targets, torch.zeros(2, dtype=torch.float64))


def test_targets_are_f_of_clamped_q_minus_beta_log_z():
    q = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    beta = 0.05
    targets, beta_log_z = qrpo_targets(q, "log", beta, num_refs=4)
    expected_log_z = math.log(beta) - math.log1p(beta)
    assert torch.allclose(beta_log_z, torch.full((3,), beta * expected_log_z, dtype=torch.float64))
    assert torch.allclose(targets, torch.log(q.clamp(min=0.25)) - beta * expected_log_z)
    targets, _ = qrpo_targets(q, "normal-icdf", beta, num_refs=4)
    assert torch.isfinite(targets).all()
    with pytest.raises(ValueError, match="not finite for the quantile of row 0"):
        qrpo_targets(q, "log", beta)  # unknown n: nothing to clamp with


def test_length_normalised_beta_gives_per_completion_log_z():
    q = torch.tensor([0.5, 0.5], dtype=torch.float64)
    betas = torch.tensor([0.1 / 10, 0.1 / 40], dtype=torch.float64)
    targets, beta_log_z = qrpo_targets(q, "identity", betas, num_refs=8)
    identity = get_transform("identity")
    for i in range(2):
        b = betas[i].item()
        assert beta_log_z[i].item() == pytest.approx(b * identity.log_partition(b))
        assert targets[i].item() == pytest.approx(0.5 - b * identity.log_partition(b))


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
