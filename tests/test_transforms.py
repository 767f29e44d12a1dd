"""trl_qrpo.transforms: closed-form log partition functions against independent high-precision quadrature (mpmath),
the quadrature of plain functions (SciPy's tanh-sinh and our end-mass check), and the registry."""

import math
from statistics import NormalDist

import mpmath
import pytest
import torch

from trl_qrpo import get_transform, register_transform
from trl_qrpo.transforms import (
    CallableTransform,
    ScaledNormalICDF,
    Transform,
    list_transforms,
    quadrature_log_partition,
)

mpmath.mp.dps = 40
BETAS = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]

UNIT_INTERVAL_TRANSFORMS = {
    "identity": lambda t: t,
    "log": mpmath.log,
    "square": lambda t: t**2,
    "sqrt": mpmath.sqrt,
}


def mp_log_z_unit(f, beta):
    """log int_0^1 exp(f(t)/beta) dt in arbitrary precision, the peak at t=1 split out for small beta."""
    beta = mpmath.mpf(beta)
    shift = f(mpmath.mpf(1)) / beta  # every transform here is increasing: the integrand peaks at 1
    g = lambda t: mpmath.exp(f(t) / beta - shift)  # noqa: E731
    points = [0] + [1 - c * beta for c in (200, 50, 10, 1) if c * beta < 1] + [1]
    return float(shift + mpmath.log(mpmath.quad(g, points)))


def mp_log_z_normal(mu, sigma, beta):
    """log E[exp((mu + sigma Z)/beta)], Z standard normal, by quadrature in z around the integrand's peak."""
    beta = mpmath.mpf(beta)
    peak = sigma / beta  # exp(sigma z / beta - z^2 / 2) peaks at z = sigma / beta

    def g(z):
        return mpmath.exp(sigma * z / beta - z**2 / 2 - (sigma * peak / beta - peak**2 / 2)) / mpmath.sqrt(
            2 * mpmath.pi
        )

    integral = mpmath.quad(g, [-mpmath.inf, peak - 10, peak, peak + 10, mpmath.inf])
    return float(mu / beta + (sigma * peak / beta - peak**2 / 2) + mpmath.log(integral))


@pytest.mark.parametrize("name", sorted(UNIT_INTERVAL_TRANSFORMS))
@pytest.mark.parametrize("beta", BETAS)
def test_closed_form_log_z_matches_quadrature(name, beta):
    expected = mp_log_z_unit(UNIT_INTERVAL_TRANSFORMS[name], beta)
    got = get_transform(name).log_partition(beta)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-10)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (0.5, 2.0), (-1.0, 0.3)])
def test_normal_icdf_log_z_matches_quadrature(beta, mu, sigma):
    expected = mp_log_z_normal(mu, sigma, beta)
    if (mu, sigma) == (0.0, 1.0):
        assert get_transform("normal-icdf").log_partition(beta) == pytest.approx(expected, rel=1e-12)
    got = get_transform("affine-normal-icdf", mu=mu, sigma=sigma).log_partition(beta)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-10)


def test_scaled_normal_icdf_is_per_prompt():
    ref = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.5, 1.0], [3.0, 3.0, 3.0]])
    transform = ScaledNormalICDF.from_ref_rewards(ref)
    std = ref.double().std(dim=1)
    assert torch.allclose(transform.sigma, std / std.mean())
    beta = 0.1
    log_z = transform.log_partition(beta)
    assert log_z.shape == (3,)
    for i in range(3):
        expected = mp_log_z_normal(0.0, float(transform.sigma[i]), beta) if transform.sigma[i] > 0 else 0.0
        assert float(log_z[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    q = torch.tensor([0.5, 0.9, 0.9], dtype=torch.float64)
    inv_cdf = torch.tensor([NormalDist().inv_cdf(p) for p in q.tolist()], dtype=torch.float64)
    assert torch.allclose(transform(q), transform.sigma * inv_cdf, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", ["identity", "log", "square", "sqrt", "normal-icdf", "affine-normal-icdf"])
def test_log_z_finite_without_overflow_at_tiny_beta(name):
    for beta in (3e-4, 1e-4):
        value = get_transform(name).log_partition(beta)
        assert math.isfinite(value)
        assert math.isfinite(beta * value)


def test_identity_exact_against_the_reference_codes_approximation():
    """The paper's code uses log beta + 1/beta; the exact log Z differs from it by log1p(-exp(-1/beta)), which is
    negligible at small beta and not at beta near 1 (docs/math.md, "identity")."""
    identity = get_transform("identity")
    for beta in (0.05, 0.1, 0.5, 1.0):
        exact_gap = identity.log_partition(beta) - (math.log(beta) + 1 / beta)
        assert exact_gap == pytest.approx(math.log1p(-math.exp(-1 / beta)), rel=1e-9, abs=1e-15)
        # The same gap derived in 40 digits: log int_0^1 exp(t/beta) dt - (log beta + 1/beta).
        b = mpmath.mpf(beta)
        derived = mpmath.log(mpmath.quad(lambda t, b=b: mpmath.exp(t / b), [0, 1])) - (mpmath.log(b) + 1 / b)
        assert exact_gap == pytest.approx(float(derived), rel=1e-9, abs=1e-15)
    assert abs(identity.log_partition(0.05) - (math.log(0.05) + 20)) < 1e-8  # exp(-20): the paper's form is exact
    assert identity.log_partition(1.0) - (math.log(1.0) + 1) < -0.4  # log(1 - 1/e) = -0.459


@pytest.mark.parametrize("name", sorted(UNIT_INTERVAL_TRANSFORMS))
@pytest.mark.parametrize("beta", BETAS)
def test_callable_quadrature_matches_closed_forms(name, beta):
    closed = get_transform(name)
    user = get_transform(lambda q: closed(q))  # a plain callable: log Z by quadrature
    assert isinstance(user, CallableTransform)
    assert user.log_partition(beta) == pytest.approx(closed.log_partition(beta), abs=1e-6, rel=1e-9)


@pytest.mark.parametrize("beta", [0.5, 1.0, 3.0, 10.0])
def test_callable_quadrature_handles_singular_endpoints(beta):
    """Phi^{-1} is infinite at both ends: tanh-sinh nodes still integrate exp(Phi^{-1}(t)/beta) to 1e-6."""
    user = get_transform(lambda q: torch.special.ndtri(q))
    assert user.log_partition(beta) == pytest.approx(1 / (2 * beta**2), abs=1e-6)


def test_quadrature_refuses_when_the_mass_is_beyond_float64():
    with pytest.raises(ValueError, match="closed-form log partition function"):
        quadrature_log_partition(torch.special.ndtri, 0.05)


def test_quadrature_refuses_functions_that_are_not_finite_or_not_elementwise():
    with pytest.raises(ValueError, match="NaN or \\+inf at t="):
        quadrature_log_partition(lambda q: torch.where(q > 0.5, torch.nan, q), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        quadrature_log_partition(lambda q: q.sum(), 1.0)
    with pytest.raises(ValueError, match="beta must be positive"):
        quadrature_log_partition(lambda q: q, 0.0)


@pytest.mark.parametrize("beta", [0.1, 1e-3])
@pytest.mark.parametrize("wrap", ["get_transform", "CallableTransform"])
def test_plain_normal_icdf_is_refused_where_quadrature_cannot_resolve_it(beta, wrap):
    """Phi^-1(q)/beta peaks at 1 - Phi(1/beta) < 1e-16 from 1 here: beyond float64; refused, never used wrong."""

    def ndtri(q):
        return torch.special.ndtri(q)

    user = get_transform(ndtri) if wrap == "get_transform" else CallableTransform(ndtri, name="my-ndtri")
    with pytest.raises(ValueError) as error:
        user.log_partition(beta)
    message = str(error.value)
    assert repr(user.name) in message and f"beta={beta}" in message  # the transform and the beta
    assert "off by at least" in message  # the estimated error
    assert "log_partition(beta)" in message and "register_transform" in message  # the fix
    assert "normal-icdf" in message


def _estimated_error(message):
    import re

    return float(re.search(r"(?:error of|at least) ([0-9.e+-]+)", message).group(1))


@pytest.mark.parametrize("beta", [0.2, 0.3])
def test_quadrature_error_estimate_bounds_the_actual_error(beta):
    """Where Phi^-1's mass is partly beyond float64, the error in the message is the actual error, within 3x."""
    actual = abs(quadrature_log_partition(torch.special.ndtri, beta, max_error=math.inf) - 1 / (2 * beta**2))
    with pytest.raises(ValueError) as error:
        quadrature_log_partition(torch.special.ndtri, beta)
    estimated = _estimated_error(str(error.value))
    assert actual <= estimated <= 3 * actual


@pytest.mark.parametrize(
    "fn, log_z, betas",
    [
        (torch.special.ndtri, lambda beta: 1 / (2 * beta**2), [0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 1.0, 10.0]),
        # -log(1 - q): Z = beta / (beta - 1) for beta > 1, infinite below
        (lambda q: -torch.log1p(-q), lambda beta: math.log(beta / (beta - 1)), [1.1, 1.5, 2.0, 3.0, 10.0]),
        (lambda q: -torch.log1p(-q), lambda beta: math.inf, [0.5, 1.0]),
    ],
)
def test_quadrature_returns_only_values_it_can_vouch_for(fn, log_z, betas):
    """Near the edge of what float64 resolves: either within max_error of the truth, or refused."""
    for beta in betas:
        try:
            value = quadrature_log_partition(fn, beta)
        except ValueError as error:
            assert "closed-form" in str(error)
            continue
        assert abs(value - log_z(beta)) <= 1e-7, beta


@pytest.mark.parametrize("name", ["identity", "sqrt", "square", "log"])
@pytest.mark.parametrize("beta", BETAS)
def test_plain_functions_match_the_closed_forms_tightly(name, beta):
    """The same functions as plain callables (no closed form known to the quadrature), at beta 1e-3 .. 10."""
    fns = {"identity": lambda q: q, "sqrt": torch.sqrt, "square": lambda q: q * q, "log": torch.log}
    user = CallableTransform(fns[name])
    assert user.log_partition(beta) == pytest.approx(get_transform(name).log_partition(beta), rel=1e-11, abs=1e-10)


def test_registry_by_name_import_path_and_errors():
    assert {"identity", "log", "square", "sqrt", "normal-icdf", "affine-normal-icdf", "scaled-normal-icdf"} <= set(
        list_transforms()
    )
    register_transform("cube", lambda q: q**3)
    cube = get_transform("cube")
    # E[exp(U^3 / beta)] by mpmath
    assert cube.log_partition(0.2) == pytest.approx(mp_log_z_unit(lambda t: t**3, 0.2), abs=1e-9)
    assert get_transform("math:sqrt").name == "sqrt"  # import path "module:function"
    with pytest.raises(ValueError, match="Unknown transform 'nope'"):
        get_transform("nope")
    with pytest.raises(ValueError, match="Invalid parameters"):
        get_transform("identity", mu=1.0)

    class Shifted(Transform):
        name = "shifted"

        def f(self, q):
            return q + 1.0

        def log_partition(self, beta):
            return 1.0 / beta + get_transform("identity").log_partition(beta)

    register_transform("shifted", Shifted)
    assert isinstance(get_transform("shifted"), Shifted)
    assert get_transform("shifted").log_partition(0.5) == pytest.approx(
        quadrature_log_partition(Shifted().f, 0.5), abs=1e-9
    )
