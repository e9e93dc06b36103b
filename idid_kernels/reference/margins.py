"""Target-logit margin functions phi(c) and their derivatives phi'(c) (spec/cm_margin.md).

The margin replaces the target column's cosine c = cos(theta) by phi(c):

=============  ================================================================
preset         phi(c)
=============  ================================================================
``none``       c
``cosface``    c - m3                                  (m -> m3, default 0.4)
``arcface``    cos(theta + m2); c - m2 sin(m2) if theta + m2 > pi   (m -> m2, default 0.5)
``combined``   cos(m1 theta + m2) - m3; c - m3 - m2 sin(m2) if m1 theta + m2 > pi
``sphereface`` (lambda c + psi) / (1 + lambda), psi = (-1)^k cos(m1 theta) - 2k,
               k = floor(m1 theta / pi)                (m -> m1, integer, default 4)
=============  ================================================================

``combined`` also takes per-row margins: ``m2`` and ``m3`` may be (N,) tensors (``m1`` stays a
scalar), differentiable when they require grad (a margin computed from ||x|| then differentiates
through the norm). The heads of :mod:`idid_kernels.nn` use two more kinds that have no preset:
``"adaface"`` (AdaFace's clipped angle, below) and per-row ``"cosface"`` (LDAM's per-class margin
gathered per row).

``easy_margin`` (arcface / combined only) keeps phi(c) = c where c <= 0. The angle is computed from
c clamped to [-1 + 1e-7, 1 - 1e-7] so that c = +-1 never yields NaN. Margins are in radians.

Only the authors' CosFace head comes from the paper's public code; the other margins combined with
the norm contraction, and every derivative here, are this package's own derivation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

MARGINS = ("none", "cosface", "arcface", "combined", "sphereface")
MARGIN_GRADS = ("exact", "straight_through")
# theta = arccos(clamp(c, -1 + COS_CLAMP, 1 - COS_CLAMP)); keeps arccos' finite.
COS_CLAMP = 1e-7

_DEFAULT_M = {"cosface": 0.4, "arcface": 0.5, "sphereface": 4}


@dataclass(frozen=True)
class MarginParams:
    """A margin preset resolved to the general parameters every backend consumes.

    ``kind`` is the formula family the kernels branch on:
    ``"none"`` (phi = c), ``"cosface"`` (phi = c - m3, no arccos),
    ``"angular"`` (arcface and combined: cos(m1 theta + m2) - m3 with the hard fallback),
    ``"sphere"`` (SphereFace's monotone psi with the lambda blend),
    ``"adaface"`` (cos(clip(theta + m2, eps, pi - eps)) - m3 with c clamped to +-(1 - eps),
    eps = :data:`ADAFACE_EPS`; AdaFace's head, used by :class:`idid_kernels.AdaFaceLoss`).
    ``m2`` and ``m3`` are floats or (N,) tensors (per-row margins, :attr:`per_row`); the fused
    backends then receive each row's phi and phi' instead of the formula (margin kind "given").
    """

    preset: str
    kind: str
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0
    sphere_lambda: float = 0.0
    easy_margin: bool = False

    @property
    def per_row(self) -> bool:
        """Whether the margin differs per row (tensor m2/m3, or a kind only Python evaluates)."""
        return self.kind == "adaface" or isinstance(self.m2, torch.Tensor) or isinstance(self.m3, torch.Tensor)


def check_margin_numbers(*, m, m1, m2, m3, sphere_lambda) -> None:
    """None is ``m``'s default (the preset's own margin); ``m1``, ``m2``, ``m3`` and ``sphere_lambda``
    have numeric defaults, so None there is a mistake, reported with the argument's name."""
    for name, value in (("m1", m1), ("m2", m2), ("m3", m3), ("sphere_lambda", sphere_lambda)):
        if value is None:
            raise TypeError(f"{name} must be a real number, got None (None is accepted for m only, where it means "
                            f"the preset's default margin)")


def resolve_margin(
    margin: str = "cosface",
    m: float | None = None,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.0,
    sphere_lambda: float = 0.0,
    easy_margin: bool = False,
) -> MarginParams:
    """Map the public ``margin``/``m``/``m1..m3`` keywords onto :class:`MarginParams`.

    ``m`` is the single margin of the ``cosface``, ``arcface`` and ``sphereface`` presets;
    ``m1, m2, m3`` are read by ``combined`` only. Mixing them up raises instead of being ignored.
    """
    if not isinstance(margin, str) or margin not in MARGINS:
        raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
    check_margin_numbers(m=m, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda)
    explicit_m123 = (m1, m2, m3) != (1.0, 0.0, 0.0)
    if margin in ("none", "combined") and m is not None:
        raise ValueError(
            f"m={m!r} is not used by margin={margin!r}"
            + ("; pass m1, m2, m3 instead" if margin == "combined" else "")
        )
    if margin != "combined" and explicit_m123:
        raise ValueError(
            f"m1/m2/m3 are read by margin='combined' only (got m1={m1}, m2={m2}, m3={m3} "
            f"with margin={margin!r}); use m= for the {margin!r} preset"
        )
    if easy_margin and margin not in ("arcface", "combined"):
        raise ValueError(f"easy_margin applies to margin='arcface' or 'combined', not {margin!r}")
    if sphere_lambda != 0.0 and margin != "sphereface":
        raise ValueError(f"sphere_lambda is read by margin='sphereface' only, not {margin!r}")
    if m is None:
        m = _DEFAULT_M.get(margin)
    for name, value in (("m", m), ("m1", m1), ("m2", m2), ("m3", m3), ("sphere_lambda", sphere_lambda)):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if sphere_lambda < 0:
        raise ValueError(f"sphere_lambda must be >= 0, got {sphere_lambda!r}")

    if margin == "none":
        return MarginParams(margin, "none")
    if margin == "cosface":
        return MarginParams(margin, "cosface", m3=float(m))
    if margin == "arcface":
        return MarginParams(margin, "angular", m2=float(m), easy_margin=bool(easy_margin))
    if margin == "combined":
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0 for margin='combined', got {m1!r}")
        if (m1, m2) == (1.0, 0.0) and not easy_margin:
            # cos(theta) - m3 is c - m3: skip the arccos round trip (and its rounding)
            return MarginParams(margin, "cosface", m3=float(m3))
        return MarginParams(margin, "angular", m1=float(m1), m2=float(m2), m3=float(m3),
                            easy_margin=bool(easy_margin))
    # sphereface
    if float(m) != int(m) or int(m) < 1:
        raise ValueError(f"sphereface needs a positive integer m (m1), got {m!r}")
    return MarginParams(margin, "sphere", m1=float(int(m)), sphere_lambda=float(sphere_lambda))


# AdaFace's eps: its cosines are clamped to +-(1 - eps) and its target angle to [eps, pi - eps].
ADAFACE_EPS = 1e-3
# How a per-row margin reaches the kernels: kind "given", each row's phi and phi' in a (2, N) target.
GIVEN = MarginParams("given", "given")


def rows_with_target(labels: torch.Tensor, ignore_index: int, num_classes: int) -> torch.Tensor:
    """(N,) bool: rows whose label is a class (not ignored, in range), the only ones with a target."""
    return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def resolve_row_margins(margin, m, m1, m2, m3, sphere_lambda, easy_margin) -> MarginParams:
    """:func:`resolve_margin`, where ``m2`` and ``m3`` may also be per-row (N,) tensors (``combined``
    only; shapes and dtypes are checked by the caller, which knows N)."""
    rows2, rows3 = isinstance(m2, torch.Tensor), isinstance(m3, torch.Tensor)
    if not (rows2 or rows3):
        return resolve_margin(margin, m, m1, m2, m3, sphere_lambda, easy_margin)
    if margin != "combined":
        raise ValueError(f"per-row (tensor) m2/m3 are read by margin='combined' only, not {margin!r}")
    # resolve with a stand-in number where a tensor is given: a per-row m2 needs the angular kind
    params = resolve_margin(margin, m, m1, 1.0 if rows2 else m2, 0.0 if rows3 else m3, sphere_lambda, easy_margin)
    return replace(params, m2=m2 if rows2 else params.m2, m3=m3 if rows3 else params.m3)


def _sin(v):
    return torch.sin(v) if isinstance(v, torch.Tensor) else math.sin(v)


def _clamped(c: torch.Tensor) -> torch.Tensor:
    """c clamped to the arccos-safe range in value, with the identity as its gradient.

    The spec evaluates phi'(c) at the clamped angle; passing the gradient straight through the
    clamp makes autograd of :func:`phi` equal that formula even at c = +-1.
    """
    return c - (c - c.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)).detach()


def _compute_dtype(c: torch.Tensor) -> torch.dtype:
    # Margin math (arccos, cos, the clamp) in float32 at least: 1 - 1e-7 rounds to 1 in fp16/bf16.
    return torch.float64 if c.dtype == torch.float64 else torch.float32


def phi(c: torch.Tensor, p: MarginParams) -> torch.Tensor:
    """phi(c), differentiable; its autograd derivative is :func:`phi_grad` (exact mode)."""
    out_dtype = c.dtype
    c = c.to(_compute_dtype(c))
    if p.kind == "none":
        out = c
    elif p.kind == "cosface":
        out = c - p.m3
    elif p.kind == "angular":
        theta = torch.acos(_clamped(c))
        angle = p.m1 * theta + p.m2
        main = torch.cos(angle) - p.m3
        fallback = c - p.m3 - p.m2 * _sin(p.m2)
        out = torch.where(angle.detach() > math.pi, fallback, main)
        if p.easy_margin:
            out = torch.where(c.detach() <= 0, c, out)
    elif p.kind == "adaface":
        theta = torch.acos(c.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        out = torch.cos((theta + p.m2).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)) - p.m3
    else:  # sphere
        theta = torch.acos(_clamped(c))
        k = torch.floor(p.m1 * theta.detach() / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
        psi = sign * torch.cos(p.m1 * theta) - 2.0 * k
        out = (p.sphere_lambda * c + psi) / (1.0 + p.sphere_lambda)
    return out.to(out_dtype)


def phi_grad(c: torch.Tensor, p: MarginParams, margin_grad: str = "exact") -> torch.Tensor:
    """phi'(c) as the fused kernels compute it (spec/cm_margin.md, Backward).

    ``margin_grad="straight_through"`` returns 1 everywhere (InsightFace's behaviour: the margin
    shifts the logit's value but not its gradient).
    """
    out_dtype = c.dtype
    c = c.to(_compute_dtype(c))
    one = torch.ones_like(c)
    if margin_grad == "straight_through" or p.kind in ("none", "cosface"):
        return one.to(out_dtype)
    if p.kind == "adaface":  # zero where the cosine or the angle is clipped, as autograd of the clamps
        cc = c.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS)
        angle = torch.acos(cc) + p.m2
        inside = (cc == c) & (angle >= ADAFACE_EPS) & (angle <= math.pi - ADAFACE_EPS)
        g = torch.where(inside, torch.sin(angle) / torch.sqrt(1.0 - cc * cc), torch.zeros_like(c))
        return g.to(out_dtype)
    cc = c.clamp(-1.0 + COS_CLAMP, 1.0 - COS_CLAMP)
    theta = torch.acos(cc)
    sin_theta = torch.sqrt(1.0 - cc * cc)
    if p.kind == "angular":
        angle = p.m1 * theta + p.m2
        g = torch.where(angle > math.pi, one, p.m1 * torch.sin(angle) / sin_theta)
        if p.easy_margin:
            g = torch.where(c <= 0, one, g)
    else:  # sphere
        k = torch.floor(p.m1 * theta / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        g = (p.sphere_lambda + sign * p.m1 * torch.sin(p.m1 * theta) / sin_theta) / (1.0 + p.sphere_lambda)
    return g.to(out_dtype)


def phi_straight_through(c: torch.Tensor, p: MarginParams) -> torch.Tensor:
    """phi(c) in value with derivative 1 in c: ``phi(stopgrad(c)) + c - stopgrad(c)`` (per-row
    tensor margins keep their own gradient)."""
    return phi(c.detach(), p) + (c - c.detach())


def row_target(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, p: MarginParams, margin_grad: str,
               ignore_index: int) -> torch.Tensor:
    """(2, N) in the accumulation dtype: each row's phi(c_y) and phi'(c_y), what the fused backends
    take for a per-row margin (kind "given") instead of evaluating the formula themselves.

    c_y = <x_n / ||x_n||, w_y / ||w_y||> is computed here in O(N d) (norms floored at 1e-12, as
    F.normalize) from detached inputs: the kernels carry the gradient through c via phi'. phi keeps
    its autograd graph to tensor margins, so d loss / d phi_n, which the kernels return, reaches them.
    Rows that are ignored or whose label is out of range get the values of class 0 (the kernels
    give such rows no loss or a NaN loss, whatever the target holds)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    safe = torch.where(rows_with_target(labels, ignore_index, weight.shape[0]), labels, torch.zeros_like(labels))
    xa = x.detach().to(acc)
    wy = weight.detach()[safe].to(acc)
    eps = 1e-12
    c = (xa * wy).sum(1) / (torch.linalg.vector_norm(xa, dim=1).clamp_min(eps)
                            * torch.linalg.vector_norm(wy, dim=1).clamp_min(eps))
    value = phi(c, p).to(acc)
    slope = phi_grad(c, p, margin_grad).to(acc)
    return torch.stack((value, slope))
