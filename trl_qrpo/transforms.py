"""Reward transforms f and their exact partition functions.

A quantile reward q is Uniform(0, 1) under the reference policy, so for any transform f the partition function of
the KL-regularised optimum is known: ``Z_f(beta) = E_U[exp(f(U) / beta)]``. This module holds a registry of named
transforms, each with ``log Z`` in closed, numerically stable form (computed in float64 on the host, never forming
``exp(1 / beta)``), a quadrature for user-supplied callables (:func:`scipy.integrate.tanhsinh` in log space, with a
check of the mass float64 cannot sample), and the exact partition function of the discrete n-reference estimate.
The derivations are in docs/math.md ("Transforms and their log Z", "The discrete partition function").

This module imports no trainer and no TRL.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import integrate, special

__all__ = [
    "Transform",
    "get_transform",
    "list_transforms",
    "quadrature_log_partition",
    "register_transform",
]


class Transform:
    """A reward transform ``f: [0, 1] -> R`` applied to quantile rewards, with its exact log partition function.

    Calling the transform maps a tensor of quantiles to ``f(q)`` (same shape, float64 unless the input is another
    floating dtype). ``log_partition(beta)`` returns ``log E_U[exp(f(U) / beta)]`` for ``U ~ Uniform(0, 1)`` as a
    Python float, or as a float64 tensor (one value per prompt) for transforms that depend on the prompt.

    Subclasses set:
        name (`str`): registry name.
        clamp_low (`bool`): f is infinite at 0, so quantiles are clamped to at least ``1/n`` before applying f.
        clamp_high (`bool`): f is infinite at 1, so quantiles are clamped to at most ``(n-1)/n``.
        per_prompt (`bool`): f and log Z carry one parameter per prompt (tensor-valued ``log_partition``), computed
            from each prompt's reference rewards by :meth:`for_prompts`.

    Per-prompt transforms (statistics of the reference rewards). Two methods, both no-ops (``return self``) for
    ordinary transforms, let a transform derive its parameters from the data without the data pipeline or the trainer
    knowing its formula:

    - ``fit(ref_rewards) -> Transform``: called once with the training set's reference-reward matrix ``[P, n]``
      (float64, NaN-padded when lists differ in length; the rows that train, after ``num_ref_rewards`` and dropped
      rows), returns the transform fitted to it (data-set-level statistics, e.g. a normaliser). Evaluation sets reuse
      the training set's fitted transform.
    - ``for_prompts(ref_rewards) -> Transform``: called with a batch's reference rewards ``[B, n]`` (same layout),
      returns the transform for those rows: its ``f`` maps quantiles ``[B]`` or ``[B, k]`` row by row and its
      ``log_partition`` / ``discrete_log_partition`` return one value per row (float64 tensors ``[B]``).

    Data preparation calls both only when ``per_prompt`` is True (it then keeps the reference rewards until targets
    are computed), so a transform registered with :func:`register_transform` takes part the same way as the built-in
    ``scaled-normal-icdf``.
    """

    name: str = "custom"
    clamp_low: bool = False
    clamp_high: bool = False
    per_prompt: bool = False

    def fit(self, ref_rewards: torch.Tensor) -> Transform:
        """The transform fitted to a training set's reference rewards ``[P, n]`` (NaN-padded). Default: ``self``."""
        return self

    def for_prompts(self, ref_rewards: torch.Tensor) -> Transform:
        """The transform for rows whose reference rewards are ``ref_rewards`` ``[B, n]``. Default: ``self``."""
        return self

    def f(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(q)
        if not q.is_floating_point():
            q = q.to(torch.float64)
        return self.f(q)

    def log_partition(self, beta: float) -> float | torch.Tensor:
        """``log Z_f(beta) = log E_U[exp(f(U) / beta)]`` for the continuous uniform quantile."""
        return quadrature_log_partition(self.f, beta)

    # --- helpers shared by the trainer's target computation -------------------------------------------------------

    def clamp(self, q: torch.Tensor, n: torch.Tensor | int | None) -> torch.Tensor:
        """Clamp quantiles away from the endpoints where f is infinite, as the paper's code does.

        With ``n`` reference rewards, quantiles are clamped to ``[1/n, (n-1)/n]`` on the sides where f is infinite.
        ``n=None`` (precomputed quantiles of unknown resolution) leaves them unchanged.
        """
        if n is None or not (self.clamp_low or self.clamp_high):
            return q
        n = torch.as_tensor(n, dtype=q.dtype, device=q.device)
        if self.clamp_low:
            q = torch.maximum(q, 1.0 / n)
        if self.clamp_high:
            q = torch.minimum(q, (n - 1.0) / n)
        return q

    def discrete_log_partition(self, beta: float, n: int, includes_self: bool = False) -> float | torch.Tensor:
        """Exact log partition function of the n-reference estimate ``f(clamp(q_hat))``.

        With continuous rewards and n references, ``n * q_hat`` is uniform on ``{0, ..., n}`` for a fresh completion
        (marginally over the reference draws) and on ``{1, ..., n}`` when the completion is itself one of the
        references (its own reward counted). Then ``log Z_n = logsumexp_k f(clamp(k/n)) / beta - log |K|``.
        """
        if n < 1:
            raise ValueError(f"The discrete partition function needs at least one reference reward, got n={n}.")
        k = torch.arange(1 if includes_self else 0, n + 1, dtype=torch.float64)
        values = self(self.clamp(k / n, n))
        if not torch.isfinite(values).all():
            raise ValueError(
                f"Transform {self.name!r} is not finite on the quantile grid k/{n} even after clamping; use more "
                "reference rewards (num_ref_rewards) or another transform."
            )
        logits = values.double() / beta  # [..., |K|] or [|K|]
        if values.dim() > 1:  # per-prompt transforms: values [P, |K|]
            return torch.logsumexp(logits, dim=-1) - math.log(len(k))
        return float(torch.logsumexp(logits, dim=-1)) - math.log(len(k))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Identity(Transform):
    """``f(t) = t``; ``log Z = log beta + 1/beta + log1p(-exp(-1/beta))``.

    Exact; the paper's code drops the last term.
    """

    name = "identity"

    def f(self, q):
        return q

    def log_partition(self, beta):
        beta = float(beta)
        return math.log(beta) + 1.0 / beta + math.log1p(-math.exp(-1.0 / beta))


class Log(Transform):
    """``f(t) = log t``; ``Z = beta / (beta + 1)``. Quantiles are clamped to at least ``1/n``."""

    name = "log"
    clamp_low = True

    def f(self, q):
        return torch.log(q)

    def log_partition(self, beta):
        beta = float(beta)
        return math.log(beta) - math.log1p(beta)


class Square(Transform):
    """``f(t) = t^2``; ``log Z = 0.5 log beta + 1/beta + log D(1/sqrt(beta))`` with D Dawson's function."""

    name = "square"

    def f(self, q):
        return q * q

    def log_partition(self, beta):
        beta = float(beta)
        return 0.5 * math.log(beta) + 1.0 / beta + math.log(float(special.dawsn(1.0 / math.sqrt(beta))))


class Sqrt(Transform):
    """``f(t) = sqrt(t)``; ``log Z = log(2 beta) + 1/beta + log1p(beta * expm1(-1/beta))``."""

    name = "sqrt"

    def f(self, q):
        return torch.sqrt(q)

    def log_partition(self, beta):
        beta = float(beta)
        return math.log(2.0 * beta) + 1.0 / beta + math.log1p(beta * math.expm1(-1.0 / beta))


class AffineNormalICDF(Transform):
    """``f(t) = mu + sigma * Phi^{-1}(t)``; ``log Z = mu/beta + sigma^2 / (2 beta^2)``.

    Quantiles are clamped to ``[1/n, (n-1)/n]`` (Phi^{-1} is infinite at both ends).
    """

    name = "affine-normal-icdf"
    clamp_low = True
    clamp_high = True

    def __init__(self, mu: float = 0.0, sigma: float = 1.0):
        if not (math.isfinite(mu) and math.isfinite(sigma)) or sigma < 0:
            raise ValueError(
                f"affine-normal-icdf needs a finite mu and a finite sigma >= 0, got mu={mu}, sigma={sigma}."
            )
        self.mu = float(mu)
        self.sigma = float(sigma)

    def f(self, q):
        return self.mu + self.sigma * torch.special.ndtri(q)

    def log_partition(self, beta):
        beta = float(beta)
        return self.mu / beta + self.sigma**2 / (2.0 * beta**2)

    def __repr__(self):
        return f"{type(self).__name__}(mu={self.mu}, sigma={self.sigma})"


class NormalICDF(AffineNormalICDF):
    """``f(t) = Phi^{-1}(t)``; ``log Z = 1 / (2 beta^2)``. Quantiles are clamped to ``[1/n, (n-1)/n]``."""

    name = "normal-icdf"

    def __init__(self):
        super().__init__(0.0, 1.0)

    def __repr__(self):
        return "NormalICDF()"


class ScaledNormalICDF(Transform):
    """``f(t) = sigma(x) * Phi^{-1}(t)`` with one ``sigma(x)`` per prompt; ``log Z(x) = sigma(x)^2 / (2 beta^2)``.

    As in the paper's code, ``sigma(x) = std(S(x)) / mean_x std(S(x))`` where ``S(x)`` are the prompt's reference
    rewards: prompts whose references disagree more get a wider target range. Build it with
    :meth:`from_ref_rewards`, or pass ``sigma`` (a tensor, one value per row) directly. Calling it expects quantiles
    shaped ``[P]`` or ``[P, k]`` aligned with ``sigma``.

    In training, :meth:`fit` sets ``mean_std`` = mean over the training set's prompts of ``std(S(x))``, and
    :meth:`for_prompts` gives each batch its ``sigma(x) = std(S(x)) / mean_std`` (evaluation sets reuse the training
    set's ``mean_std``).
    """

    name = "scaled-normal-icdf"
    clamp_low = True
    clamp_high = True
    per_prompt = True

    def __init__(self, sigma: torch.Tensor | np.ndarray | list[float] | float = 1.0, mean_std: float | None = None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError("scaled-normal-icdf needs finite, non-negative per-prompt scales `sigma`.")
        self.sigma = sigma
        self.mean_std = mean_std

    def fit(self, ref_rewards) -> ScaledNormalICDF:
        """Fitted to a training set: ``mean_std`` = the mean over its rows of ``std(S)``."""
        _, mean_std = self.prompt_scales(ref_rewards)
        return type(self)(self.sigma, mean_std=mean_std)

    def for_prompts(self, ref_rewards) -> ScaledNormalICDF:
        """One ``sigma = std(S) / mean_std`` per row of ``ref_rewards`` (``mean_std`` from :meth:`fit`)."""
        if self.mean_std is None:
            raise ValueError(
                "scaled-normal-icdf normalises each prompt's reward spread by its mean over the training set: call "
                "fit(training reference rewards) before for_prompts(...)."
            )
        scales, _ = self.prompt_scales(ref_rewards, mean_std=self.mean_std)
        return type(self)(scales, mean_std=self.mean_std)

    @staticmethod
    def prompt_scales(ref_rewards: torch.Tensor, mean_std: float | None = None) -> tuple[torch.Tensor, float]:
        """Per-row ``std(S)`` normalised by its mean over rows (or by a given ``mean_std``, e.g. the training set's).

        Returns the scales and the normaliser, so an evaluation set can reuse the training set's normaliser.
        ``ref_rewards`` is ``[P, n]``; ``inf`` entries pad shorter lists and are ignored.
        """
        ref = torch.as_tensor(ref_rewards, dtype=torch.float64)
        if ref.dim() == 1:
            ref = ref[:, None]
        valid = torch.isfinite(ref)
        count = valid.sum(dim=1)
        filled = torch.where(valid, ref, torch.zeros((), dtype=ref.dtype))
        mean = filled.sum(dim=1) / count.clamp(min=1)
        var = (torch.where(valid, ref - mean[:, None], torch.zeros((), dtype=ref.dtype)) ** 2).sum(dim=1)
        std = torch.sqrt(var / (count - 1).clamp(min=1))  # unbiased, as torch.std
        std = torch.where(count > 1, std, torch.zeros_like(std))
        if mean_std is None:
            mean_std = float(std.mean()) if std.numel() else 0.0
        if not mean_std > 0:
            raise ValueError(
                "scaled-normal-icdf: the mean standard deviation of the reference rewards is 0 (every prompt's "
                "references have equal rewards, or each prompt has a single reference). Use at least 2 reference "
                "rewards per prompt with varying values, or another transform."
            )
        return std / mean_std, mean_std

    @classmethod
    def from_ref_rewards(cls, ref_rewards, mean_std: float | None = None) -> ScaledNormalICDF:
        scales, _ = cls.prompt_scales(ref_rewards, mean_std)
        return cls(scales)

    def f(self, q):
        sigma = self.sigma.to(q.device)
        if q.dim() == sigma.dim() + 1:
            sigma = sigma[..., None]
        return sigma * torch.special.ndtri(q)

    def log_partition(self, beta):
        beta = float(beta)
        return self.sigma**2 / (2.0 * beta**2)

    def discrete_log_partition(self, beta, n, includes_self=False):
        k = torch.arange(1 if includes_self else 0, n + 1, dtype=torch.float64)
        q = self.clamp(k / n, n)
        base = torch.special.ndtri(q)
        if not torch.isfinite(base).all():
            raise ValueError(
                f"Transform {self.name!r} is not finite on the quantile grid k/{n} even after clamping; use at least "
                "2 reference rewards."
            )
        logits = self.sigma[:, None] * base[None, :] / float(beta)
        return torch.logsumexp(logits, dim=-1) - math.log(len(k))

    def __repr__(self):
        return f"ScaledNormalICDF(sigma=<{self.sigma.numel()} per-prompt scales>)"


class CallableTransform(Transform):
    """A user-supplied ``f`` on ``[0, 1]``; its log Z is computed once per beta by quadrature in log space.

    Args:
        fn (`Callable[[torch.Tensor], torch.Tensor]`): maps a float64 tensor of quantiles to ``f(q)``.
        name (`str`, *optional*): a name for logs.
        clamp_low / clamp_high (`bool`): whether f is infinite at 0 / 1, so quantiles get clamped as for the
            built-in log and normal-icdf transforms.
    """

    def __init__(self, fn: Callable, name: str | None = None, clamp_low: bool = False, clamp_high: bool = False):
        if not callable(fn):
            raise TypeError(f"A transform must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")
        self.clamp_low = clamp_low
        self.clamp_high = clamp_high
        self._cache: dict[float, float] = {}

    def f(self, q):
        out = self.fn(q)
        return torch.as_tensor(out, dtype=q.dtype if q.is_floating_point() else torch.float64, device=q.device)

    def log_partition(self, beta):
        beta = float(beta)
        if beta not in self._cache:
            self._cache[beta] = quadrature_log_partition(self.f, beta, name=self.name)
        return self._cache[beta]


# ---------------------------------------------------------------------------------------------------------------------
# Quadrature for user transforms
# ---------------------------------------------------------------------------------------------------------------------


def _end_error(values: np.ndarray, distance: np.ndarray, beta: float, log_z: float) -> tuple[float, bool]:
    """Estimated mass of ``exp(f(t) / beta)`` between the node closest to one end of [0, 1] and that end.

    ``values`` and ``distance`` (to that end, as evaluated in float64) run from the inside to the end. In the variable
    ``s = -log(distance)`` the integrand's mass density is ``m(s) = exp(f(t) / beta) * distance``; beyond the last node
    it is extrapolated from the last two nodes at distinct distances as ``m_L * exp(-r (s - s_L))``, so the missing
    mass is ``m_L / r``. Returns the resulting error of log Z, and whether the density still grows (``r <= 0``: the
    mass beyond float64's reach is unbounded by this estimate; the error returned is then only the lower bound
    ``m_L``, valid when f does not decrease towards the end). See docs/math.md, "Transforms given as plain functions".
    """
    with np.errstate(divide="ignore"):
        log_m = values / beta + np.log(distance)
    last = len(distance) - 1
    before = last - 1
    while before >= 0 and distance[before] == distance[last]:
        before -= 1
    if last < 0 or not np.isfinite(log_m[last]):
        return 0.0, False
    if before < 0:
        return math.inf, True
    rate = (log_m[before] - log_m[last]) / (math.log(distance[before]) - math.log(distance[last]))
    if not rate > 0:
        return float(np.log1p(np.exp(min(log_m[last] - log_z, 700.0)))), True
    return float(np.log1p(np.exp(min(log_m[last] - math.log(rate) - log_z, 700.0)))), False


def _transform_name(fn) -> str:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, Transform):
        return owner.name
    return getattr(fn, "__name__", type(fn).__name__)


def quadrature_log_partition(
    fn: Callable[[torch.Tensor], torch.Tensor],
    beta: float,
    tol: float = 1e-12,
    max_error: float = 1e-7,
    name: str | None = None,
) -> float:
    """``log int_0^1 exp(f(t) / beta) dt`` by tanh-sinh quadrature in log space (:func:`scipy.integrate.tanhsinh`).

    SciPy integrates the log-integrand ``f(t) / beta`` with ``log=True`` (a log-sum-exp over the nodes, so
    ``exp(1 / beta)`` is never formed) until its error estimate falls below ``tol`` relative to Z, refining at most 10
    times. Nodes that round to exactly 0 or 1 in float64 are not evaluated (f may be infinite there). The error of
    log Z is then taken as the largest of:

    - refinement: SciPy's error estimate, relative to Z;
    - the ends: float64 cannot represent a quantile within about 1.1e-16 of 1 (nor 5e-324 of 0), so the mass of
      ``exp(f(t) / beta)`` beyond the outermost nodes is never sampled, and SciPy's estimate cannot see it. It is
      extrapolated from the decay of the integrand's mass towards each end (see ``_end_error``); when the mass still
      grows at the last representable quantile (Phi^{-1} for beta below about 0.12, where the integrand peaks at
      1 - Phi(1/beta) < 1e-16), it is unbounded.

    Raises ``ValueError`` (naming the transform, beta, the estimated error and the fix) when the estimated error of
    log Z exceeds ``max_error`` (default 1e-7: the closed forms are matched to 1e-6 with the estimate's margin), and
    never returns a value it cannot vouch for. Well-behaved transforms (bounded on [0, 1], or singular with little
    mass at the end, like log t) reach 1e-12 or better for beta in [1e-3, 10]. See docs/math.md, "Transforms given
    as plain functions".
    """
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}.")
    name = name or _transform_name(fn)
    nodes, values = [], []

    def log_integrand(t: np.ndarray) -> np.ndarray:
        flat = t.reshape(-1)
        inside = (flat > 0) & (flat < 1)
        x = flat[inside]
        f = torch.as_tensor(fn(torch.as_tensor(x, dtype=torch.float64)), dtype=torch.float64)
        f = f.detach().cpu().numpy()
        if f.shape != x.shape:
            raise ValueError(
                f"A transform must map a tensor of quantiles to a tensor of the same shape, got {f.shape}."
            )
        bad = np.isnan(f) | np.isposinf(f)
        if bad.any():
            raise ValueError(f"The transform {name!r} is NaN or +inf at t={x[bad][0]!r}; it must be finite on (0, 1).")
        nodes.append(x)
        values.append(f)
        out = np.full(flat.shape, -np.inf)
        out[inside] = f / beta
        return out.reshape(t.shape)

    with np.errstate(divide="ignore", invalid="ignore"):  # log(0) weights of the nodes that round to 0 or 1
        result = integrate.tanhsinh(log_integrand, 0.0, 1.0, log=True, rtol=math.log(tol))
    estimate = float(np.real(result.integral))
    if not math.isfinite(estimate):
        raise ValueError(
            f"The quadrature of log Z for transform {name!r} at beta={beta} gave {estimate}: exp(f(q)/beta) must be "
            "integrable and not zero on (0, 1)."
        )
    refinement_error = math.exp(min(float(np.real(result.error)) - estimate, 700.0))
    if math.isnan(refinement_error):
        refinement_error = math.inf
    nodes, values = np.concatenate(nodes), np.concatenate(values)
    order = np.argsort(nodes)
    nodes, values = nodes[order], values[order]
    upper = nodes >= 0.5
    high_error, high_grows = _end_error(values[upper], 1.0 - nodes[upper], beta, estimate)
    low_error, low_grows = _end_error(values[~upper][::-1], nodes[~upper][::-1], beta, estimate)
    error = max(refinement_error, high_error, low_error)
    if error <= max_error:
        return estimate
    if high_grows or low_grows:
        end = "1 (q > 1 - 1.2e-16)" if high_grows else "0 (q < 5e-324)"
        reason = (
            f"exp(f(q)/beta) still grows at the quantile closest to {end} that float64 can represent, so its mass "
            f"lies where no quadrature in float64 can sample it; log Z is off by at least {error:.3g}"
        )
    elif max(high_error, low_error) >= refinement_error:
        reason = (
            f"the mass of exp(f(q)/beta) beyond the quantiles float64 can represent near "
            f"{'1' if high_error >= low_error else '0'} is estimated at an error of {error:.3g} in log Z"
        )
    else:
        reason = f"successive refinements still differ by {refinement_error:.3g} in log Z"
    raise ValueError(
        f"Cannot compute log Z of transform {name!r} at beta={beta} by quadrature: {reason} (at most {max_error:g} "
        "is accepted). Give the transform a closed-form log partition function: subclass trl_qrpo.Transform with "
        "f(q) and log_partition(beta) and register it with register_transform(name, YourTransform) (for "
        "mu + sigma * Phi^-1(q) use the built-in 'normal-icdf' or 'affine-normal-icdf'); or use a larger beta, or "
        "partition_mode='discrete' (exact for the n-reference quantile, no quadrature)."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Transform]] = {
    "identity": Identity,
    "log": Log,
    "square": Square,
    "sqrt": Sqrt,
    "normal-icdf": NormalICDF,
    "affine-normal-icdf": AffineNormalICDF,
    "scaled-normal-icdf": ScaledNormalICDF,
}


def register_transform(
    name: str, factory: Callable[..., Transform] | Callable[[torch.Tensor], torch.Tensor], **kwargs
):
    """Register a transform under ``name`` so that configs can refer to it by name.

    ``factory`` is either a :class:`Transform` subclass (or any callable returning a Transform; give it a
    closed-form ``log_partition`` for exactness at small beta), or a plain function ``f(q) -> tensor``, which is
    wrapped in a :class:`CallableTransform` (log Z by quadrature; ``kwargs`` are passed to it, e.g. ``clamp_low``).
    Returns ``factory`` so it can be used as a decorator argument.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("A transform name must be a non-empty string.")
    if isinstance(factory, type) and issubclass(factory, Transform):
        _REGISTRY[name] = factory
    else:

        def make(**params):
            return CallableTransform(factory, name=name, **{**kwargs, **params})

        _REGISTRY[name] = make
    return factory


def list_transforms() -> list[str]:
    """Names of the registered transforms."""
    return sorted(_REGISTRY)


def get_transform(name: str | Callable | Transform, **params: Any) -> Transform:
    """Return a transform by registry name (with its parameters), or wrap a callable.

    Examples:
        ``get_transform("identity")``, ``get_transform("affine-normal-icdf", mu=0.5, sigma=2.0)``,
        ``get_transform("scaled-normal-icdf", sigma=torch.tensor([...]))``, ``get_transform(lambda q: q**3)``.
        A string ``"package.module:function"`` imports the function and wraps it (for YAML recipes).
    """
    if isinstance(name, Transform):
        if params:
            raise ValueError("Parameters cannot be given with a Transform instance.")
        return name
    if isinstance(name, str):
        if name in _REGISTRY:
            try:
                return _REGISTRY[name](**params)
            except TypeError as e:
                raise ValueError(f"Invalid parameters {params} for transform {name!r}: {e}") from e
        if ":" in name:
            import importlib

            module_name, _, attr = name.partition(":")
            try:
                fn = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"Could not import the transform {name!r}: {e}") from e
            return get_transform(fn, **params)
        raise ValueError(
            f"Unknown transform {name!r}. Registered transforms: {', '.join(list_transforms())}; or pass a callable, "
            "or an import path 'package.module:function'."
        )
    if isinstance(name, type) and issubclass(name, Transform):
        return name(**params)
    if callable(name):
        return CallableTransform(name, **params)
    raise TypeError(f"A transform is a registered name, a Transform or a callable; got {type(name).__name__}.")
