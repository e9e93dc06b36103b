"""Reference margin heads that read image quality from the feature norm, and LDAM, pure PyTorch.

Each function is the head's official formula with (N, C) logits, the eager oracle the fused heads
(:func:`idid_kernels.adaface_loss`, :func:`~idid_kernels.magface_loss`,
:func:`~idid_kernels.ldam_loss`) are benchmarked against and the ``reference`` backend:

- AdaFace: M. Kim, A. K. Jain, X. Liu, *AdaFace: Quality Adaptive Margin for Face Recognition*,
  CVPR 2022 (mk-minchul/AdaFace, ``head.py``).
- MagFace: Q. Meng, S. Zhao, Z. Huang, F. Zhou, *MagFace: A Universal Representation for Face
  Recognition and Quality Assessment*, CVPR 2021 (IrvingMeng/MagFace, ``MagLinear`` + ``MagLoss``).
- LDAM: K. Cao, C. Wei, A. Gaidon, N. Arechiga, T. Ma, *Learning Imbalanced Datasets with
  Label-Distribution-Aware Margin Loss*, NeurIPS 2019 (kaidic/LDAM-DRW, ``LDAMLoss``).

The per-row margins are O(N) functions shared with the fused path (:func:`adaface_margins`,
:func:`magface_magnitude`, :func:`magface_margin`, :func:`magface_regularizer`); the cross-entropy
has ``F.cross_entropy``'s ``weight`` / ``ignore_index`` / ``reduction`` semantics.
"""
from __future__ import annotations

import math

import torch

from .cm_margin import softmax_cross_entropy
from .margins import ADAFACE_EPS
from .primitives import normalize


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _onehot(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(N, C) bool, the target column of each row (none for ignored rows)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    return torch.nn.functional.one_hot(safe, num_classes).to(torch.bool) & valid[:, None]


def adaface_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_n|| clipped to [0.001, 100] and detached (AdaFace's ``safe_norms``), accumulation dtype."""
    return torch.linalg.vector_norm(x.detach().to(_acc(x)), dim=1).clip(0.001, 100.0)


def adaface_margins(x: torch.Tensor, batch_mean, batch_std, m: float = 0.4, h: float = 0.333):
    """(g_angle, g_add), each (N,): scaler = clip(h (r - batch_mean) / (batch_std + 1e-3), -1, 1),
    g_angle = -m scaler, g_add = m + m scaler, from the detached clipped norms r."""
    scaler = (h * (adaface_norms(x) - batch_mean) / (batch_std + ADAFACE_EPS)).clip(-1.0, 1.0)
    return -m * scaler, m + m * scaler


def adaface_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, batch_mean=20.0,
                 batch_std=100.0, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 class_weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean") -> torch.Tensor:
    """AdaFace's head and cross-entropy, as its official code: every cosine clamped to
    +-(1 - 1e-3), the target angle theta + g_angle clipped to [1e-3, pi - 1e-3], minus g_add."""
    eps = ADAFACE_EPS
    cosine = (normalize(x) @ normalize(weight).t()).clamp(-1 + eps, 1 - eps)
    g_angle, g_add = adaface_margins(x, batch_mean, batch_std, m, h)
    target = _onehot(labels, weight.shape[0], ignore_index)
    theta = cosine.acos()
    theta_m = torch.clip(theta + target * g_angle[:, None].to(cosine.dtype), min=eps, max=math.pi - eps)
    logits = s * (theta_m.cos() - target * g_add[:, None].to(cosine.dtype))
    return softmax_cross_entropy(logits, labels, class_weight, ignore_index, reduction)


def magface_magnitude(x: torch.Tensor, l_a: float = 10.0, u_a: float = 110.0) -> torch.Tensor:
    """a_n = clamp(||x_n||, l_a, u_a), (N,), differentiable inside the range, accumulation dtype."""
    return torch.linalg.vector_norm(x.to(_acc(x)), dim=1).clamp(l_a, u_a)


def magface_margin(a: torch.Tensor, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                   u_m: float = 0.8) -> torch.Tensor:
    """m(a) = l_m + (u_m - l_m) (a - l_a) / (u_a - l_a)."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(a: torch.Tensor, labels: torch.Tensor, u_a: float, ignore_index: int,
                        reduction: str) -> torch.Tensor:
    """g(a) = a / u_a^2 + 1 / a per row (0 on ignored rows), reduced like the loss: its mean over
    the rows that count ("mean"), their sum ("sum"), or per row ("none")."""
    valid = labels != ignore_index
    g = torch.where(valid, a / u_a ** 2 + 1.0 / a, torch.zeros_like(a))
    if reduction == "none":
        return g
    return g.sum() / valid.sum() if reduction == "mean" else g.sum()


def magface_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0, s: float = 64.0,
                 easy_margin: bool = True, class_weight: torch.Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean") -> torch.Tensor:
    """MagFace's MagLinear + MagLoss, as its official code: cosines clamped to [-1, 1], the target
    cos(theta + m(a)) = c cos m - sqrt(1 - c^2) sin m (easy margin: c where c <= 0; otherwise
    c - m sin(m) where theta + m > pi), loss = CE(s psi) + lambda_g * g(a)."""
    a = magface_magnitude(x, l_a, u_a)
    margin = magface_margin(a, l_a, u_a, l_m, u_m)[:, None]
    cos_theta = (normalize(x) @ normalize(weight).t()).clamp(-1, 1)
    margin = margin.to(cos_theta.dtype)
    sin_theta = torch.sqrt(1.0 - cos_theta ** 2)
    cos_theta_m = cos_theta * torch.cos(margin) - sin_theta * torch.sin(margin)
    if easy_margin:
        cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        threshold = torch.cos(math.pi - margin)
        cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - torch.sin(math.pi - margin) * margin)
    target = _onehot(labels, weight.shape[0], ignore_index)
    logits = s * torch.where(target, cos_theta_m, cos_theta)
    ce = softmax_cross_entropy(logits, labels, class_weight, ignore_index, reduction)
    return ce + (lambda_g * magface_regularizer(a, labels, u_a, ignore_index, reduction)).to(ce.dtype)


def ldam_margins(class_counts: torch.Tensor, max_m: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    """m_j = max_m n_j^(-1/4) / max_k n_k^(-1/4), shape (C,)."""
    margin = class_counts.to(dtype).pow(-0.25)
    return margin * (max_m / margin.max())


def ldam_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, class_margin: torch.Tensor, *,
              s: float = 30.0, class_weight: torch.Tensor | None = None, ignore_index: int = -100,
              reduction: str = "mean") -> torch.Tensor:
    """LDAM over normalised features and class weights, as its official code: the target cosine
    minus its class's margin, logits s * psi, cross-entropy with ``class_weight`` (DRW)."""
    cosine = normalize(x) @ normalize(weight).t()
    target = _onehot(labels, weight.shape[0], ignore_index)
    logits = s * (cosine - target * class_margin.to(cosine.dtype)[None, :])
    return softmax_cross_entropy(logits, labels, class_weight, ignore_index, reduction)
