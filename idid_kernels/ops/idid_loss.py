"""Autograd and fake kernels of ``idid_kernels::idid_loss_forward/backward`` (IDID-R1, spec/idid.md).

forward(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
diversity_weight, class_balanced, ignore_index, chunk_rows)
    -> (loss, l_ic, l_id, lam, row_stats, x_norm, w_norm, teacher_log_prob)

``loss``, ``l_ic`` and ``l_id`` are differentiable outputs, with loss = l_ic + lam * l_id; ``lam`` (the
adaptive weight stopgrad(L_IC) / (stopgrad(L_ID) + eps), or the fixed ``diversity_weight``) and the
saved statistics are not. Backward therefore needs only two scalars, the upstream coefficients of
L_IC and of L_ID:

    grad_ic = g_loss + g_l_ic,   grad_id = g_loss * lam + g_l_id

backward(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm, w_norm, teacher_log_prob, alpha, tau,
t, distillation, diversity, ignore_index, chunk_rows) -> (dx, dproxies, dsimilarity)

with, for the rows i not ignored (a_i the sample weight, Y one-hot, P = softmax(z), Q, R the student
and teacher non-target distributions with a zero target column):

    G = grad_ic * a_i [P - Y + (Q - R) / tau],   dU = alpha G V + grad_id * H,   dV = alpha G^T U
    dPhi_kc = grad_ic * sum_{i: y_i = k} a_i r_kc (log r_kc - log q_ic - kd_i),  dTheta = (dPhi + dPhi^T) / 2

and the F.normalize backward on dU, dV. Every backend implementing these ops (C++ on the CPU,
CUDA on a GPU) shares this autograd and fake registration.

A loss that needs a gradient (grad mode on, an input requiring grad, outside torch.func) takes a
third op instead, ``idid_loss_fused``: the gradient is linear in (grad_ic, grad_id), so the forward
pass forms it at unit coefficients while each chunk of logits is in cache (dx_ic, dx_id, dproxies
and the (min(B, C) on the CPU, else C) x C dPhi) and ``idid_loss_fused_backward`` only combines
them with the upstream coefficients (and symmetrises dPhi). Three GEMMs instead of four, and
backward recomputes nothing. No gradient needed: the forward op alone (one GEMM). Under torch.func
the forward/backward pair, whose backward op refuses a second derivative.

The logits are processed ``chunk_rows`` rows at a time, computed here from the chunk budget
``IDID_KERNELS_CHUNK_MB`` shared with cm_margin (:mod:`idid_kernels._chunks`; 256 MiB by default).
Tests force tiny chunks with :func:`chunk_rows`.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import _chunks
from .._autograd import functorch_active, no_double_backward, register_autograd, register_no_double_backward

from ..reference.idid import IDIDTerms

_chunk_rows = 0  # a positive value set by chunk_rows() overrides the budget


@contextlib.contextmanager
def chunk_rows(rows: int):
    """Within the block, process the logits ``rows`` rows per chunk (0: the default budget)."""
    global _chunk_rows
    if not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be an int >= 0, got {rows!r}")
    saved, _chunk_rows = _chunk_rows, rows
    try:
        yield
    finally:
        _chunk_rows = saved


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(batch: int, num_classes: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows per chunk within the budget. A chunk row of logits holds C accumulation-dtype values
    (csrc/driver/idid_loss_driver.h); the CPU kernel also sizes its class-density Gram blocks
    (rows x n_c, n_c <= B values) with the same count, so a row is charged max(B, C) values."""
    if _chunk_rows > 0:
        return _chunk_rows
    itemsize = 8 if dtype == torch.float64 else 4
    return _chunks.rows_for(max(int(batch), int(num_classes)), itemsize, device_type)


def _forward_fake(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
                  diversity_weight, class_balanced, ignore_index, chunk_rows):
    b, c = x.shape[0], proxies.shape[0]
    acc = _acc_dtype(x.dtype)
    scalars = [x.new_empty(()) for _ in range(4)]
    teacher = x.new_empty((c, c) if distillation else (0, 0), dtype=acc)
    return (*scalars, x.new_empty((5, b), dtype=acc), x.new_empty((b,), dtype=acc), x.new_empty((c,), dtype=acc),
            teacher)


def _backward_fake(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm, w_norm, teacher_log_prob, alpha, tau,
                   t, distillation, diversity, ignore_index, chunk_rows):
    c = proxies.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(proxies, memory_format=torch.contiguous_format), proxies.new_empty((c, c)))


def _fused_fake(ns, x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
                diversity_weight, class_balanced, ignore_index, chunk_rows):
    b, d = x.shape
    c = proxies.shape[0]
    acc = _acc_dtype(x.dtype)
    scalars = [x.new_empty(()) for _ in range(4)]
    # dPhi: one row per class present on the CPU kernels (at most min(B, C)), (C, C) on the CUDA
    # kernels (natively or under the emulator, whose tensors are CPU tensors).
    rows = torch.sym_min(b, c) if ns == "idid_kernels" and x.device.type == "cpu" else c
    dphi = x.new_empty((rows, c) if distillation else (0, 0), dtype=acc)
    return (*scalars, x.new_empty((b, d), dtype=acc), x.new_empty((b if diversity else 0, d), dtype=acc),
            x.new_empty((c, d), dtype=acc), dphi)


def _fused_backward_fake(grad_ic, grad_id, dx_ic, dx_id, dproxies, dphi, labels, ignore_index, similarity_grad,
                         num_classes, dtype):
    c = num_classes if similarity_grad else 0
    return (dx_ic.new_empty(dx_ic.shape, dtype=dtype), dproxies.new_empty(dproxies.shape, dtype=dtype),
            dx_ic.new_empty((c, c), dtype=dtype))


def _coefficients(ref, lam, g_loss, g_ic, g_id):
    """(grad_ic, grad_id), the upstream coefficients of L_IC and L_ID (grad_ic = g_loss + g_l_ic,
    grad_id = g_loss lam + g_l_id), as 0-dim tensors in ``ref``'s accumulation dtype; the common
    case of a gradient of the loss alone costs one multiplication."""
    acc = _acc_dtype(ref.dtype)
    g_loss, g_ic, g_id = (None if g is None else g.to(acc) for g in (g_loss, g_ic, g_id))
    ic = [g for g in (g_loss, g_ic) if g is not None]
    id_ = [g for g in (None if g_loss is None else g_loss * lam.to(acc), g_id) if g is not None]
    zero = None if ic and id_ else torch.zeros((), dtype=acc, device=ref.device)
    grad_ic = ic[0] + ic[1] if len(ic) == 2 else (ic[0] if ic else zero)
    grad_id = id_[0] + id_[1] if len(id_) == 2 else (id_[0] if id_ else zero)
    return grad_ic, grad_id


def _setup_context(ctx, inputs, output):
    (x, proxies, _similarity, labels, alpha, tau, t, _eps, distillation, diversity, _adaptive, _weight, _balanced,
     ignore_index, rows) = inputs
    _, _, _, lam, row_stats, x_norm, w_norm, teacher = output
    ctx.save_for_backward(x, proxies, labels, lam, row_stats, x_norm, w_norm, teacher)
    ctx.config = (alpha, tau, t, distillation, diversity, ignore_index, rows)
    ctx.mark_non_differentiable(lam, row_stats, x_norm, w_norm, teacher)
    # The saved state gets no gradient: without this autograd would hand backward a zero tensor for
    # each of those outputs, the (C, C) teacher's a full C^2 fill per step.
    ctx.set_materialize_grads(False)


def _backward(ns, ctx, g_loss, g_ic, g_id, *_):
    no_double_backward("idid_loss")
    x, proxies, labels, lam, row_stats, x_norm, w_norm, teacher = ctx.saved_tensors
    grad_ic, grad_id = _coefficients(x, lam, g_loss, g_ic, g_id)
    dx, dw, ds = getattr(torch.ops, ns).idid_loss_backward(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm,
                                                           w_norm, teacher, *ctx.config)
    # Without distillation the similarity is not read: no gradient flows to it (None, as the reference
    # and the triton backend give), rather than zeros an optimizer's weight decay would act on.
    distillation = ctx.config[3]
    return (dx, dw, ds if distillation and ctx.needs_input_grad[2] else None) + (None,) * 12


def _fused_setup(ctx, inputs, output):
    x, proxies, _similarity, labels = inputs[:4]
    distillation, ignore_index = inputs[8], inputs[13]
    _, _, _, lam, dx_ic, dx_id, dproxies, dphi = output
    ctx.save_for_backward(labels, lam, dx_ic, dx_id, dproxies, dphi)
    ctx.config = (distillation, ignore_index, proxies.shape[0], x.dtype)
    ctx.mark_non_differentiable(lam, dx_ic, dx_id, dproxies, dphi)
    ctx.set_materialize_grads(False)


def _fused_backward(ns, ctx, g_loss, g_ic, g_id, *_):
    no_double_backward("idid_loss")
    labels, lam, dx_ic, dx_id, dproxies, dphi = ctx.saved_tensors
    distillation, ignore_index, num_classes, dtype = ctx.config
    grad_ic, grad_id = _coefficients(dx_ic, lam, g_loss, g_ic, g_id)
    # Without distillation (or where the similarity needs no gradient) none is formed: None, as the
    # forward/backward pair, the reference and the triton backend give.
    similarity_grad = bool(distillation and ctx.needs_input_grad[2])
    dx, dw, ds = getattr(torch.ops, ns).idid_loss_fused_backward(grad_ic, grad_id, dx_ic, dx_id, dproxies, dphi,
                                                                 labels, ignore_index, similarity_grad, num_classes,
                                                                 dtype)
    return (dx, dw, ds if similarity_grad else None) + (None,) * 12


def register(ns: str) -> None:
    """The fake kernels and autograd of the ops in the library ``ns`` ("idid_kernels", or
    "idid_kernels_emu" for the CUDA kernels under the emulator: ops/__init__.py)."""
    torch.library.register_fake(f"{ns}::idid_loss_forward")(_forward_fake)
    torch.library.register_fake(f"{ns}::idid_loss_backward")(_backward_fake)
    torch.library.register_fake(f"{ns}::idid_loss_fused")(functools.partial(_fused_fake, ns))
    torch.library.register_fake(f"{ns}::idid_loss_fused_backward")(_fused_backward_fake)
    register_autograd(f"{ns}::idid_loss_forward", functools.partial(_backward, ns), setup_context=_setup_context,
                      public_name="idid_loss")
    register_autograd(f"{ns}::idid_loss_fused", functools.partial(_fused_backward, ns), setup_context=_fused_setup,
                      public_name="idid_loss")
    register_no_double_backward(f"{ns}::idid_loss_backward", "idid_loss")
    register_no_double_backward(f"{ns}::idid_loss_fused_backward", "idid_loss")


def idid_loss(x, proxies, similarity, labels, *, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
              diversity_weight, class_balanced, ignore_index, return_terms, ns="idid_kernels"):
    """The public outputs of the op: the loss, or :class:`IDIDTerms` with ``return_terms``. The
    fused op where a gradient will be needed (module docstring), else the forward op."""
    needs_grad = (torch.is_grad_enabled() and (x.requires_grad or proxies.requires_grad or similarity.requires_grad)
                  and not functorch_active())
    op = getattr(torch.ops, ns).idid_loss_fused if needs_grad else getattr(torch.ops, ns).idid_loss_forward
    loss, l_ic, l_id, lam, *_ = op(
        x, proxies, similarity, labels, float(alpha), float(tau), float(t), float(eps), bool(distillation),
        bool(diversity), bool(adaptive_weight), float(diversity_weight), bool(class_balanced), int(ignore_index),
        _rows_per_chunk(x.shape[0], proxies.shape[0], x.dtype, x.device.type))
    if return_terms:
        return IDIDTerms(loss, l_ic, l_id, lam)
    return loss
