"""Pure-PyTorch oracles for the building blocks: cosine similarity, class density, norm contraction.

Every function is autograd-differentiable and written for clarity; the fused backends are checked
against these in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# F.normalize's floor on the norm: u = x / max(||x||, NORM_EPS).
NORM_EPS = 1e-12


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """||x_n||, shape (N,), without overflow or underflow of the squares (BLAS nrm2's guarantee).

    Each row is divided by its largest magnitude before squaring: in float32 the plain sum of
    squares overflows for norms above ~1.8e19 and underflows to 0 below ~1e-19. The divisor is
    detached; r = m ||x / m|| is homogeneous in x, so the gradient is still x / r. A zero row
    gives 0 (gradient 0, as autograd's norm), an inf entry inf and a NaN entry NaN.
    """
    m = x.detach().abs().amax(dim=1, keepdim=True)
    m = torch.where((m > 0) & (m < float("inf")), m, torch.ones_like(m))
    return torch.linalg.vector_norm(x / m, dim=1) * m.squeeze(1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation with ``F.normalize`` semantics: u = x / max(||x||, 1e-12) (a zero row
    stays zero), with the norm of :func:`row_norm` (F.normalize's own norm overflows in float32
    for rows above ~1.8e19)."""
    return x / row_norm(x).clamp_min(NORM_EPS).unsqueeze(1)


def pairwise_cosine(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """S_ij = <x_i / ||x_i||, y_j / ||y_j||>, shape (N, M); ``y=None`` means ``y = x``.

    Gradient: with U, V the normalised rows and G = dL/dS,
    dU = G V, dV = G^T U, dx_i = (dU_i - <dU_i, u_i> u_i) / ||x_i|| (likewise for y).
    """
    u = normalize(x)
    v = u if y is None else normalize(y)
    return u @ v.transpose(0, 1)


def norm_contraction(x: torch.Tensor, offset: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """g(||x_n||) = sigmoid((||x_n|| - offset) / temperature), shape (N,).

    The contraction mapping of feature norms (Liu et al. 2024): every row's norm is squeezed into
    (0, 1). Gradient: dx_n = grad_n * sig (1 - sig) / T * x_n / ||x_n|| (0 for a zero row).
    """
    return torch.sigmoid((row_norm(x) - offset) / temperature)


def diversity_kernel(u: torch.Tensor, t: float) -> torch.Tensor:
    """kappa_ij = exp(t (<u_i, u_j> - 1)) in (0, 1] for unit rows u, shape (B, B)."""
    return torch.exp(t * (u @ u.transpose(0, 1) - 1.0))


def class_counts(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """n_c over the valid rows, as a float tensor of shape (C,). ``labels`` must be in range
    wherever ``valid`` is true (ignored rows may hold any value in [0, C))."""
    return torch.zeros(num_classes, dtype=dtype, device=labels.device).index_add_(
        0, labels, valid.to(dtype))


def class_density_terms(u: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_classes: int,
                        t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, counts): D_c = sum_{i != j, y_i = y_j = c} kappa_ij / (n_c (n_c - 1)), 0 where n_c < 2.

    ``u`` holds unit rows; rows with ``valid`` false take no part. Works on the masked B x B Gram
    matrix, without boolean indexing, so it traces under ``torch.compile(fullgraph=True)``.
    """
    n = u.shape[0]
    counts = class_counts(labels, valid, num_classes, u.dtype)
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    same &= ~torch.eye(n, dtype=torch.bool, device=u.device)
    kappa = diversity_kernel(u, t)
    row_sums = torch.where(same, kappa, torch.zeros_like(kappa)).sum(dim=1)
    sums = torch.zeros(num_classes, dtype=u.dtype, device=u.device).index_add_(0, labels, row_sums)
    pairs = counts * (counts - 1.0)
    density = torch.where(counts >= 2, sums / pairs.clamp_min(1.0), torch.zeros_like(sums))
    return density, counts


def class_density(x: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float = 2.0) -> torch.Tensor:
    """Per-class density D_c of spec/idid.md, shape (C,).

    D_c = (1 / (n_c (n_c - 1))) sum over ordered pairs i != j of class c of exp(t (cos_ij - 1));
    D_c = 0 for classes with fewer than two samples. High D_c means a tightly packed class; IDID-R1
    minimises the mean over classes to spread features within each class.
    """
    valid = torch.ones_like(labels, dtype=torch.bool)
    density, _ = class_density_terms(normalize(x), labels, valid, num_classes, t)
    return density
