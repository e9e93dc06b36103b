"""Reference contraction-mapped margin softmax (spec/cm_margin.md), pure PyTorch.

Source: W. Liu, X. Liu, H. Li, C. Lin, "Contraction mapping of feature norms for data quality
imbalance learning", Pattern Recognition Letters 185 (2024) 232-238, doi:10.1016/j.patrec.2024.08.016.
The authors' public head multiplies CosFace logits row-wise by sigmoid(||x||): with s = 30,
m = 0.4 and sigmoid contraction :func:`cm_margin_loss` is exactly that head, and with
``margin="none"`` it is their CM-M-Softmax. The other margins, the contraction options and the
gradients are this package's own derivation.

Math, per row n and class j:

    r_n = ||x_n||,  u_n = x_n / max(r_n, 1e-12),  w^_j = w_j / max(||w_j||, 1e-12)
    c_nj = <u_n, w^_j>
    a_n = s * sigmoid((r_n - offset) / T)        (contraction="sigmoid"; a_n = s for "none")
    z_nj = a_n * c_nj  (j != y_n),   z_n,y_n = a_n * phi(c_n,y_n)
    loss_n = logsumexp_j z_nj - z_n,y_n = softplus(logsumexp_{j != y_n} z_nj - z_n,y_n),
             reduced exactly like F.cross_entropy (weight, ignore_index)

The second form of loss_n is the one computed: the first cancels in float32 once the loss falls
below ~1e-6 (lse and z_y agree to all their digits), the softplus of the off-target logsumexp does
not.

This module materialises the (N, C) logits: it is the oracle and the fallback, not the fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .margins import MarginParams, phi, phi_straight_through, resolve_row_margins
from .primitives import normalize, row_norm

CONTRACTIONS = ("sigmoid", "none")
REDUCTIONS = ("mean", "sum", "none")


def contraction_scale(x: torch.Tensor, s: float, contraction: str = "sigmoid", norm_offset: float = 0.0,
                      norm_temperature: float = 1.0, detach_norm: bool = False) -> torch.Tensor:
    """a_n = s * g(||x_n||), shape (N,); constant s when ``contraction="none"``."""
    if contraction == "none":
        return torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)
    r = row_norm(x)
    if detach_norm:
        r = r.detach()
    return scale_of_norm(r, s, True, norm_offset, norm_temperature)


def scale_of_norm(r: torch.Tensor, s: float, contraction: bool, norm_offset: float,
                  norm_temperature: float) -> torch.Tensor:
    """a_n = s sigmoid((r_n - offset) / T) from the row norms r (the kernels' saved x_norm), or s."""
    if not contraction:
        return torch.full_like(r, s)
    return s * torch.sigmoid((r - norm_offset) / norm_temperature)


def cm_logits(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, params: MarginParams, *,
              s: float = 30.0, contraction: str = "sigmoid", norm_offset: float = 0.0,
              norm_temperature: float = 1.0, detach_norm: bool = False, margin_grad: str = "exact",
              ignore_index: int = -100) -> torch.Tensor:
    """The (N, C) margin logits z of the module docstring; ignored rows get no margin."""
    cos = normalize(x) @ normalize(weight).transpose(0, 1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target_cos = cos.gather(1, safe[:, None]).squeeze(1)
    target_fn = phi_straight_through if margin_grad == "straight_through" else phi
    target = torch.where(valid, target_fn(target_cos, params), target_cos)
    onehot = F.one_hot(safe, cos.shape[1]).to(torch.bool) & valid[:, None]
    psi = torch.where(onehot, target[:, None], cos)
    scale = contraction_scale(x, s, contraction, norm_offset, norm_temperature, detach_norm)
    return scale[:, None] * psi


def cm_margin_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, s: float = 30.0,
                   margin: str = "cosface", m: float | None = None, m1: float = 1.0, m2: float = 0.0,
                   m3: float = 0.0, sphere_lambda: float = 0.0, easy_margin: bool = False,
                   contraction: str = "sigmoid", norm_offset: float = 0.0, norm_temperature: float = 1.0,
                   detach_norm: bool = False, margin_grad: str = "exact",
                   class_weight: torch.Tensor | None = None, ignore_index: int = -100,
                   reduction: str = "mean") -> torch.Tensor:
    """Contraction-mapped margin-softmax loss; see the module docstring for the math.

    Shapes: x (N, d), weight (C, d), labels (N,) int64, class_weight (C,) or None; ``m2``/``m3``
    floats or (N,) per-row tensors (``margin="combined"``).
    Returns a scalar for ``reduction`` "mean"/"sum" and (N,) for "none" (0 on ignored rows).
    ``mean`` of a batch whose rows are all ignored is NaN, as in ``F.cross_entropy``.
    """
    params = resolve_row_margins(margin, m, m1, m2, m3, sphere_lambda, easy_margin)
    return cm_margin_loss_params(x, weight, labels, params=params, s=s, contraction=contraction,
                                 norm_offset=norm_offset, norm_temperature=norm_temperature, detach_norm=detach_norm,
                                 margin_grad=margin_grad, class_weight=class_weight, ignore_index=ignore_index,
                                 reduction=reduction)


def cm_margin_loss_params(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, params: MarginParams,
                          s: float, contraction: str, norm_offset: float, norm_temperature: float, detach_norm: bool,
                          margin_grad: str, class_weight: torch.Tensor | None, ignore_index: int,
                          reduction: str) -> torch.Tensor:
    """:func:`cm_margin_loss` for a margin already resolved to :class:`MarginParams` (the form every
    backend takes; the heads of :mod:`idid_kernels.nn` build theirs directly)."""
    z = cm_logits(x, weight, labels, params, s=s, contraction=contraction, norm_offset=norm_offset,
                  norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                  ignore_index=ignore_index)
    return softmax_cross_entropy(z, labels, class_weight, ignore_index, reduction)


def softmax_cross_entropy(z: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None,
                          ignore_index: int, reduction: str) -> torch.Tensor:
    """``F.cross_entropy(z, labels, weight=class_weight, ignore_index=..., reduction=...)`` with each
    row's loss computed as softplus(logsumexp_{j != y} z_j - z_y), exact where the loss is tiny.

    Same semantics: row weights w_n = class_weight[y_n] (1 without), 0 on ignored rows; "none" gives
    w_n loss_n, "sum" their sum, "mean" the sum over sum_n w_n (NaN for a batch with no weight)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = F.one_hot(safe, z.shape[1]).to(torch.bool)
    z_y = z.gather(1, safe[:, None]).squeeze(1)
    lse_off = torch.logsumexp(z.masked_fill(target, float("-inf")), dim=1)
    rows = torch.logaddexp(torch.zeros_like(z_y), lse_off - z_y)  # softplus, exact for tiny losses
    weight = torch.ones_like(z_y) if class_weight is None else class_weight.to(z.dtype)[safe]
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    rows = torch.where(valid, rows, torch.zeros_like(rows)) * weight
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / weight.sum()
