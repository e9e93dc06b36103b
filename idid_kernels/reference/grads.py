"""Analytic backward passes of every op, in plain PyTorch (no autograd).

These are the formulas of spec/cm_margin.md and spec/idid.md, written once over full matrices so
that they can be checked against autograd of the reference in float64 (tests/test_grads.py). Every
fused kernel implements the same formulas tile by tile; when a kernel disagrees with the oracle,
comparing its intermediates with these functions localises the bug.
"""
from __future__ import annotations

import torch

from .cm_margin import contraction_scale
from .idid import sample_weights, student_log_probs, teacher_log_probs
from .margins import MarginParams, phi, phi_grad
from .primitives import NORM_EPS, class_density_terms, diversity_kernel, normalize, row_norm


def normalize_backward(grad_u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL/dx for u = x / max(||x||, 1e-12) given dL/du: (dU - <dU, u> u) / max(||x||, 1e-12).

    Below the floor the denominator is a constant, so the radial projection is dropped there,
    exactly as autograd of ``F.normalize`` does.
    """
    r = row_norm(x).unsqueeze(1)
    u = x / r.clamp_min(NORM_EPS)
    radial = torch.where(r > NORM_EPS, (grad_u * u).sum(dim=1, keepdim=True), torch.zeros_like(r))
    return (grad_u - radial * u) / r.clamp_min(NORM_EPS)


def norm_backward(grad_r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dL/dx for r = ||x|| given dL/dr, shape (N,): grad_r x / r, and 0 on a zero row."""
    r = row_norm(x).unsqueeze(1)
    unit = torch.where(r > 0, x / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(x))
    return grad_r[:, None] * unit


def sigmoid_contraction_grad(r: torch.Tensor, offset: float, temperature: float) -> torch.Tensor:
    """g'(r) = sig(z) (1 - sig(z)) / T, z = (r - offset) / T, as sig(z) sig(-z) / T.

    1 - sig(z) = sig(-z) exactly; evaluating it directly keeps full precision where sig(z) rounds
    to nearly 1 (the kernels use the equivalent e / (1 + e)^2, e = exp(-|z|))."""
    z = (r - offset) / temperature
    return torch.sigmoid(z) * torch.sigmoid(-z) / temperature


def norm_contraction_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: float = 0.0,
                              temperature: float = 1.0) -> torch.Tensor:
    """dx for out_n = sigmoid((||x_n|| - offset) / T): grad_n g'(r_n) x_n / r_n."""
    r = row_norm(x)
    return norm_backward(grad_out * sigmoid_contraction_grad(r, offset, temperature), x)


def pairwise_cosine_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None):
    """(dx, dy) for S = U V^T (dy is None when ``y`` is None, and dx then has both paths)."""
    u = normalize(x)
    if y is None:
        return normalize_backward(grad @ u + grad.transpose(0, 1) @ u, x), None
    v = normalize(y)
    return normalize_backward(grad @ v, x), normalize_backward(grad.transpose(0, 1) @ u, y)


def class_density_backward(grad: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, t: float = 2.0):
    """dx for D = class_density(x, labels, C, t) given dL/dD of shape (C,).

    dD_c/du_i = 2 t / (n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j (kappa symmetric).
    """
    u = normalize(x)
    num_classes = grad.shape[0]
    valid = torch.ones_like(labels, dtype=torch.bool)
    _, counts = class_density_terms(u, labels, valid, num_classes, t)
    coef = torch.where(counts >= 2, 2.0 * t * grad / (counts * (counts - 1.0)).clamp_min(1.0),
                       torch.zeros_like(counts))
    return normalize_backward(_same_class_pull(u, labels, valid, t) * coef[labels][:, None], x)


def _same_class_pull(u: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, t: float) -> torch.Tensor:
    """sum_{j same class, j != i, both valid} kappa_ij u_j, shape (B, d)."""
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    same &= ~torch.eye(u.shape[0], dtype=torch.bool, device=u.device)
    kappa = torch.where(same, diversity_kernel(u, t), torch.zeros((), dtype=u.dtype, device=u.device))
    return kappa @ u


def cm_row_weights(grad_out: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None,
                   ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """g_n w_{y_n} (/ sum of weights for ``mean``): the factor in front of (p - onehot), (N,).

    Exactly ``F.cross_entropy``: ignored rows get 0 (so an all-ignored ``mean`` has zero grads), and
    a ``mean`` whose non-ignored rows weigh 0 in total is 0/0 = NaN, in the loss and the grads.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    w = torch.ones(labels.shape, dtype=dtype, device=labels.device) if class_weight is None \
        else class_weight.to(dtype)[safe]
    zero = torch.zeros_like(w)
    w = torch.where(valid, w, zero)
    if reduction == "mean":
        w = torch.where(valid, w / w.sum(), zero)
    return grad_out.to(dtype) * w


def cm_margin_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       params: MarginParams, *, s: float = 30.0, contraction: str = "sigmoid",
                       norm_offset: float = 0.0, norm_temperature: float = 1.0, detach_norm: bool = False,
                       margin_grad: str = "exact", class_weight: torch.Tensor | None = None,
                       ignore_index: int = -100, reduction: str = "mean"):
    """(dx, dweight) of :func:`~idid_kernels.reference.cm_margin.cm_margin_loss` (spec Backward).

        delta = gw (p - onehot),  G = a delta psi',  R_n = sum_j delta psi,  Q_n = sum_j G c,
        K_j = sum_n G c,
        dx_n = s g'(r_n) R_n u_n + (sum_j G_nj w^_j - Q_n u_n) / max(r_n, eps)
        dw_j = (sum_n G_nj u_n - K_j w^_j) / max(||w_j||, eps)
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    u, w_hat = normalize(x), normalize(weight)
    cos = u @ w_hat.transpose(0, 1)
    onehot = torch.nn.functional.one_hot(safe, cos.shape[1]).to(torch.bool) & valid[:, None]
    target_cos = cos.gather(1, safe[:, None]).squeeze(1)
    psi = torch.where(onehot, phi(target_cos, params)[:, None], cos)
    psi_prime = torch.where(onehot, phi_grad(target_cos, params, margin_grad)[:, None], torch.ones_like(cos))
    scale = contraction_scale(x, s, contraction, norm_offset, norm_temperature)

    p = torch.softmax(scale[:, None] * psi, dim=1)
    gw = cm_row_weights(grad_out, labels, class_weight, ignore_index, reduction, x.dtype)
    delta = gw[:, None] * (p - onehot.to(p.dtype))
    g = scale[:, None] * delta * psi_prime
    r_sum = (delta * psi).sum(dim=1)

    # Spherical part: dL/du through the cosines, projected (normalize_backward applies the Q, K terms).
    dx = normalize_backward(g @ w_hat, x)
    dw = normalize_backward(g.transpose(0, 1) @ u, weight)
    if contraction == "sigmoid" and not detach_norm:
        r = row_norm(x)
        radial = s * sigmoid_contraction_grad(r, norm_offset, norm_temperature) * r_sum
        dx = dx + norm_backward(radial, x)
    return dx, dw


def idid_backward(grad_out: torch.Tensor, x: torch.Tensor, proxies: torch.Tensor, similarity: torch.Tensor,
                  labels: torch.Tensor, *, alpha: float = 16.0, tau: float = 1.0, t: float = 2.0,
                  eps: float = 1e-8, distillation: bool = True, diversity: bool = True,
                  adaptive_weight: bool = True, diversity_weight: float = 1.0, class_balanced: bool = True,
                  ignore_index: int = -100):
    """(dx, dproxies, dsimilarity) of the IDID-R1 loss (spec/idid.md Backward), ``grad_out`` scalar.

        G_ic = a_i [p_ic - Y_ic + (Q_ic - R_ic) / tau],  dU = alpha G V + lambda H,  dV = alpha G^T U
        h_i = 2t / (K_2 n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j
        dPhi_kc = sum_{i: y_i = k} a_i r_kc (log r_kc - log q_ic - kd_i),  dTheta = (dPhi + dPhi^T) / 2
    """
    num_classes = proxies.shape[0]
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    a_raw, counts = sample_weights(y, valid, num_classes, x.dtype, class_balanced)
    a = a_raw * grad_out
    u, v = normalize(x), normalize(proxies)
    z = alpha * (u @ v.transpose(0, 1))
    onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
    g = torch.softmax(z, dim=1) - onehot
    d_sim = torch.zeros_like(similarity)
    ce = torch.logsumexp(z, dim=1) - (z * onehot).sum(dim=1)
    kd = torch.zeros_like(ce)
    if distillation:
        nontarget = onehot == 0
        log_r = teacher_log_probs(similarity)
        log_r_y = torch.where(nontarget, log_r[y], torch.zeros_like(z))
        log_q = torch.where(nontarget, student_log_probs(z, y, tau), torch.zeros_like(z))
        r_y, q = log_r_y.exp() * nontarget, log_q.exp() * nontarget
        g = g + (q - r_y) / tau
        kd = (r_y * (log_r_y - log_q)).sum(dim=1)
        d_phi_rows = a[:, None] * r_y * (log_r_y - log_q - kd[:, None])
        d_phi = torch.zeros_like(similarity).index_add_(0, y, d_phi_rows)
        d_sim = 0.5 * (d_phi + d_phi.transpose(0, 1))
    g = a[:, None] * g
    d_u = alpha * (g @ v)
    d_v = alpha * (g.transpose(0, 1) @ u)

    if diversity:
        multi = (counts >= 2).sum()
        if adaptive_weight:
            l_ic = (a_raw * (ce + kd)).sum()
            density, _ = class_density_terms(u, y, valid, num_classes, t)
            l_id = density.sum() / multi.clamp_min(1).to(x.dtype)
            lam = torch.where(multi > 0, l_ic / (l_id + eps), torch.zeros_like(l_ic))
        else:
            lam = torch.as_tensor(diversity_weight, dtype=x.dtype, device=x.device)
        coef = torch.where(counts >= 2, 2.0 * t / (multi.clamp_min(1) * counts * (counts - 1.0)).clamp_min(1.0),
                           torch.zeros_like(counts))
        d_u = d_u + (grad_out * lam) * coef[y][:, None] * _same_class_pull(u, y, valid, t)
    return normalize_backward(d_u, x), normalize_backward(d_v, proxies), d_sim
