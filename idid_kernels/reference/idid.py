"""Reference IDID-R1 loss (spec/idid.md), pure PyTorch.

The IDID loss is from J. Du, X. Zhang, P. Liu, C.-M. Vong, T. Wang, "An Adaptive Deep Metric
Learning Loss Function for Class-Imbalance Learning via Intraclass Diversity and Interclass
Distillation", IEEE TNNLS 35(11) (2024) 15372-15386, doi:10.1109/tnnls.2023.3286484.
Only the paper's abstract is public and no code was released: **IDID-R1 is this package's
reconstruction** from the abstract, not the authors' equations. Every part can be switched off for
ablations.

Math (B rows, C classes, rows with label ``ignore_index`` take no part at all):

    u_i = x_i / ||x_i||,  v_c = w_c / ||w_c||,  z_ic = alpha <u_i, v_c>
    a_i = 1 / (K_B n_{y_i})     (class-balanced; K_B classes present, n_c their counts; detached)
    ce_i = logsumexp_c z_ic - z_{i,y_i}                                      (push)
    Phi = (Theta + Theta^T) / 2,  r_k = softmax_{c != k} Phi_kc              (teacher)
    log q_ic = z_ic / tau - logsumexp_{c' != y_i} z_ic' / tau,  c != y_i      (student)
    kd_i = KL(r_{y_i} || q_i)                                                (distillation)
    L_IC = sum_i a_i (ce_i + kd_i)
    kappa_ij = exp(t (<u_i, u_j> - 1)),  D_c = mean over ordered same-class pairs of kappa
    L_ID = mean of D_c over the classes with n_c >= 2 (0 if there are none)   (diversity)
    lambda = stopgrad(L_IC) / (stopgrad(L_ID) + eps)                         (adaptive weight)
    loss = L_IC + lambda L_ID
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .primitives import class_counts, class_density_terms, normalize


class IDIDTerms(NamedTuple):
    """What ``idid_loss(..., return_terms=True)`` returns: the loss and its parts.

    ``l_ic`` and ``l_id`` carry gradients (the loss is ``l_ic + lam * l_id``); ``lam`` is detached.
    """

    loss: torch.Tensor
    l_ic: torch.Tensor
    l_id: torch.Tensor
    lam: torch.Tensor


def sample_weights(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, dtype: torch.dtype,
                   class_balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, counts): a_i = 1 / (K_B n_{y_i}) (or 1 / B), 0 on ignored rows; sums to 1 (0 if none)."""
    counts = class_counts(labels, valid, num_classes, dtype)
    if class_balanced:
        present = (counts > 0).sum().to(dtype)
        denom = present * counts[labels]
    else:
        denom = valid.sum().to(dtype).expand(labels.shape)
    a = torch.where(valid, 1.0 / denom.clamp_min(1.0), torch.zeros_like(denom))
    return a, counts


def teacher_log_probs(similarity: torch.Tensor) -> torch.Tensor:
    """log r, shape (C, C): row k is log softmax over c != k of Phi_kc; the diagonal is -inf."""
    phi = 0.5 * (similarity + similarity.transpose(0, 1))
    eye = torch.eye(phi.shape[0], dtype=torch.bool, device=phi.device)
    return torch.log_softmax(phi.masked_fill(eye, float("-inf")), dim=1)


def student_log_probs(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """log q, shape (B, C): log softmax of z / tau over the non-target classes; target is -inf."""
    target = torch.nn.functional.one_hot(labels, z.shape[1]).to(torch.bool)
    return torch.log_softmax((z / tau).masked_fill(target, float("-inf")), dim=1)


def idid_loss(x: torch.Tensor, proxies: torch.Tensor, similarity: torch.Tensor, labels: torch.Tensor, *,
              alpha: float = 16.0, tau: float = 1.0, t: float = 2.0, eps: float = 1e-8,
              distillation: bool = True, diversity: bool = True, adaptive_weight: bool = True,
              diversity_weight: float = 1.0, class_balanced: bool = True, ignore_index: int = -100,
              return_terms: bool = False):
    """IDID-R1 loss (a reconstruction; see the module docstring), a scalar tensor.

    Shapes: x (B, d), proxies (C, d), similarity (C, C), labels (B,) int64.
    ``distillation=False`` drops kd_i; ``diversity=False`` drops L_ID (lambda = 0);
    ``adaptive_weight=False`` uses the fixed ``lambda = diversity_weight``; ``class_balanced=False``
    uses a_i = 1 / B. With ``return_terms=True`` returns :class:`IDIDTerms`.
    """
    num_classes = proxies.shape[0]
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels))
    a, counts = sample_weights(y, valid, num_classes, x.dtype, class_balanced)

    u, v = normalize(x), normalize(proxies)
    z = alpha * (u @ v.transpose(0, 1))
    per_row = torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)
    if distillation:
        nontarget = ~torch.nn.functional.one_hot(y, num_classes).to(torch.bool)
        log_r = teacher_log_probs(similarity)[y]
        log_q = student_log_probs(z, y, tau)
        # Zero the target column *before* the arithmetic, so no 0 * inf reaches the gradient.
        log_r = torch.where(nontarget, log_r, torch.zeros_like(log_r))
        log_q = torch.where(nontarget, log_q, torch.zeros_like(log_q))
        per_row = per_row + (log_r.exp() * nontarget * (log_r - log_q)).sum(dim=1)
    l_ic = (a * per_row).sum()

    zero = l_ic.new_zeros(())
    if diversity:
        density, _ = class_density_terms(u, y, valid, num_classes, t)
        multi = (counts >= 2).sum()
        l_id = torch.where(multi > 0, density.sum() / multi.clamp_min(1).to(x.dtype), zero)
        if adaptive_weight:
            lam = torch.where(multi > 0, l_ic.detach() / (l_id.detach() + eps), zero)
        else:
            lam = zero + diversity_weight
    else:
        l_id, lam = zero, zero
    loss = l_ic + lam * l_id
    if return_terms:
        return IDIDTerms(loss, l_ic, l_id, lam.detach())
    return loss
