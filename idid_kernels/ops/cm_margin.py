"""Autograd, fake kernels and the loss wrapper of the ``idid_kernels::cm_margin_*`` ops.

Two paths over one kernel driver (csrc/cpu/cm_margin.cpp):

- ``cm_margin_fused`` for ``reduction`` "mean"/"sum" when a gradient is needed: the per-row weights
  g_n = w_{y_n} (/ sum of weights) are known before backward, so the kernel forms dx and dW in the
  forward pass while each row of cosines is in cache, and backward only scales them by the
  upstream scalar. The cosines are computed once.
- ``cm_margin_forward_grad`` / ``cm_margin_rows_dweight`` for ``reduction="none"`` with a gradient
  (or a per-row margin target that needs one, as MagFace's) when the whole batch fits one chunk (N x C accumulation-dtype values within
  ``IDID_KERNELS_CHUNK_MB``): the forward forms, for an upstream gradient of 1 on every row, dx and
  the (N, C) logit gradients G', and keeps G' (that one chunk) for backward, where the gradients for
  the upstream g are g_n dx_n and dW from one GEMM over G'. Three GEMMs, as the fused path.
- ``cm_margin_forward`` / ``cm_margin_backward`` otherwise (``reduction="none"`` on a batch over the
  budget, no gradient, torch.func): per-row losses plus saved statistics (each row's shift and
  log-sum-exp, norms); backward recomputes each chunk's cosines (a fourth GEMM).

The class weights and the reduction live here, on O(N) vectors; the kernels see one weight per row.
"""
from __future__ import annotations

import functools

import torch

from .. import _chunks
from ..reference.cm_margin import scale_of_norm
from ..reference.margins import GIVEN, MarginParams, row_target, rows_with_target
from .._autograd import functorch_active, no_double_backward, register_autograd, register_no_double_backward

_KIND = {"none": 0, "cosface": 1, "angular": 2, "sphere": 3, "given": 4}


def chunk_rows(num_classes: int, itemsize: int = 4, device_type: str = "cpu") -> int:
    """Rows per chunk: the (rows x C) accumulation-dtype cosine buffer within ``IDID_KERNELS_CHUNK_MB``."""
    return _chunks.rows_for(num_classes, itemsize, device_type)


def config_args(params: MarginParams, *, s, contraction, norm_offset, norm_temperature, detach_norm, margin_grad,
                ignore_index, num_classes, acc_itemsize=4, device_type="cpu", target=None) -> tuple:
    """The ops' trailing arguments, in schema order; ``target`` is the (2, N) per-row phi and phi'
    of kind "given" (reference.margins.row_target), None for the other kinds."""
    return (float(s), _KIND[params.kind], float(params.m1), float(params.m2), float(params.m3),
            float(params.sphere_lambda), bool(params.easy_margin), margin_grad == "exact", contraction == "sigmoid",
            float(norm_offset), float(norm_temperature), bool(detach_norm), int(ignore_index),
            chunk_rows(num_classes, acc_itemsize, device_type), target)


def target_grad(grad_rows, loss_rows, x_norm, labels, num_classes, cfg):
    """d loss / d target (2, N) for the forward op's per-row losses: row 0 is
    grad_n a_n (p_ny - 1) = grad_n a_n expm1(-loss_n) (p_ny = exp(-loss_n)) on the rows with a
    target (0 elsewhere, whatever the upstream holds: a mean over no rows gives 0 * NaN), row 1
    (phi') none."""
    s, contraction, offset, temperature, ignore_index = cfg[0], cfg[8], cfg[9], cfg[10], cfg[12]
    a = scale_of_norm(x_norm, s, contraction, offset, temperature)
    d_phi = torch.where(rows_with_target(labels, ignore_index, num_classes),
                        grad_rows.to(a.dtype) * a * torch.expm1(-loss_rows), torch.zeros((), dtype=a.dtype,
                                                                                           device=a.device))
    return torch.stack((d_phi, torch.zeros_like(d_phi)))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(x, weight, labels, *cfg):
    acc = _acc(x.dtype)
    n, c = x.shape[0], weight.shape[0]
    # loss_rows, row_stats (2, N: each row's shift and log-sum-exp), x_norm, w_norm
    return (x.new_empty(n, dtype=acc), x.new_empty((2, n), dtype=acc), x.new_empty(n, dtype=acc),
            x.new_empty(c, dtype=acc))


def _backward_fake(grad_rows, x, weight, labels, row_stats, x_norm, w_norm, *cfg):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fused_fake(x, weight, labels, row_weight, *cfg):
    return (x.new_empty((), dtype=_acc(x.dtype)), torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _forward_grad_fake(x, weight, labels, *cfg):
    acc = _acc(x.dtype)
    n, c = x.shape[0], weight.shape[0]
    # loss_rows, x_norm, w_norm, dx_rows (accumulation dtype), grad_logits (N, C)
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(c, dtype=acc),
            x.new_empty(x.shape, dtype=acc), x.new_empty((n, c), dtype=acc))


def _rows_dweight_fake(grad_rows, grad_logits, x, weight, x_norm, w_norm):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _shard_forward_fake(x, weight, labels, class_offset, *cfg):
    acc = _acc(x.dtype)
    n, c = x.shape[0], weight.shape[0]
    return tuple(x.new_empty(n, dtype=acc) for _ in range(4)) + (x.new_empty(c, dtype=acc),)


def _shard_backward_fake(grad_rows, x, weight, labels, class_offset, lse, x_norm, w_norm, *cfg):
    acc = _acc(x.dtype)
    n = x.shape[0]
    return (x.new_empty(x.shape, dtype=acc), x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _forward_setup(ctx, inputs, output):
    x, weight, labels, *cfg = inputs
    loss_rows, row_stats, x_norm, w_norm = output
    ctx.save_for_backward(x, weight, labels, loss_rows, row_stats, x_norm, w_norm)
    ctx.cfg = cfg
    # The statistics get no gradient: None rather than zero tensors (w_norm alone is C values).
    ctx.set_materialize_grads(False)


def _forward_backward(ns, ctx, grad_rows, grad_stats, grad_x_norm, grad_w_norm):
    # Only loss_rows is meant to be differentiated; the statistics are saved state.
    no_double_backward("cm_margin_loss")
    x, weight, labels, loss_rows, row_stats, x_norm, w_norm = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(x_norm)
    dx = dw = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:  # (learnable margins alone need neither)
        dx, dw = getattr(torch.ops, ns).cm_margin_backward(grad_rows, x, weight, labels, row_stats, x_norm,
                                                           w_norm, *ctx.cfg)
    # the per-row target (kind "given", the last argument) gets d loss / d phi
    d_target = (target_grad(grad_rows, loss_rows, x_norm, labels, weight.shape[0], ctx.cfg)
                if ctx.needs_input_grad[-1] else None)
    return (dx, dw, None) + (None,) * (len(ctx.cfg) - 1) + (d_target,)


def _forward_grad_setup(ctx, inputs, output):
    x, weight, labels, *cfg = inputs
    loss_rows, x_norm, w_norm, dx_rows, grad_logits = output
    ctx.save_for_backward(x, weight, labels, loss_rows, x_norm, w_norm, dx_rows, grad_logits)
    ctx.cfg = cfg
    ctx.mark_non_differentiable(x_norm, w_norm, dx_rows, grad_logits)
    ctx.set_materialize_grads(False)


def _forward_grad_backward(ns, ctx, grad_rows, grad_x_norm, grad_w_norm, grad_dx, grad_logits_in):
    no_double_backward("cm_margin_loss")
    x, weight, labels, loss_rows, x_norm, w_norm, dx_rows, grad_logits = ctx.saved_tensors
    if grad_rows is None:
        grad_rows = torch.zeros_like(x_norm)
    # An ignored row gets no gradient whatever its upstream holds (a mean over no rows gives it
    # 0 * NaN), as in the backward op, whose kernel skips such rows.
    g = torch.where(labels != ctx.cfg[12], grad_rows.to(dx_rows.dtype), torch.zeros((), dtype=dx_rows.dtype,
                                                                                     device=dx_rows.device))
    # every part of dx_n is linear in row n's upstream gradient
    dx = (g.unsqueeze(1) * dx_rows).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = (getattr(torch.ops, ns).cm_margin_rows_dweight(g, grad_logits, x, weight, x_norm, w_norm)
          if ctx.needs_input_grad[1] else None)
    d_target = (target_grad(grad_rows, loss_rows, x_norm, labels, weight.shape[0], ctx.cfg)
                if ctx.needs_input_grad[-1] else None)
    return (dx, dw, None) + (None,) * (len(ctx.cfg) - 1) + (d_target,)


def _fused_setup(ctx, inputs, output):
    _, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.num_cfg = len(inputs) - 4
    # dx and dw are saved state: nothing flows into them, and zero-filled upstream gradients for them
    # (the engine's default) would cost a C x d allocation and fill per step.
    ctx.mark_non_differentiable(dx, dw)
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_loss, grad_dx, grad_dw):
    no_double_backward("cm_margin_loss")
    dx, dw = ctx.saved_tensors
    rest = (None, None) + (None,) * ctx.num_cfg
    if grad_loss is not None and _graph_released() and _is_host_one(grad_loss):
        # loss.backward() seeds 1: the gradients are the saved ones as they are. Handing them over
        # saves a pass over (and a fresh allocation of) the C x d dW. Only where the graph is freed
        # after this backward: a retained graph could run again, and accumulating into a .grad that
        # is the saved tensor would change it.
        return (dx, dw) + rest
    g = grad_loss if grad_loss is not None else torch.zeros((), dtype=dx.dtype, device=dx.device)
    return (g.to(dx.dtype) * dx, g.to(dw.dtype) * dw) + rest


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _graph_released() -> bool:
    """Whether the running backward frees the graph (retain_graph=False); False when unknown."""
    return _keep_graph is not None and not torch.compiler.is_compiling() and not _keep_graph()


def _is_host_one(g: torch.Tensor) -> bool:
    """Whether ``g`` is a CPU scalar equal to 1, read without a device sync and outside any tracing
    (compile, fake or functional tensors, a dispatch mode that would record the branch)."""
    return (type(g) is torch.Tensor and g.device.type == "cpu" and g.numel() == 1
            and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and g.item() == 1)


def register(ns: str) -> None:
    """The fake kernels and autograd of the ops in the library ``ns`` ("idid_kernels", or
    "idid_kernels_emu" for the CUDA kernels under the emulator: ops/__init__.py)."""
    for name, fake in (("forward", _forward_fake), ("backward", _backward_fake), ("fused", _fused_fake),
                       ("forward_grad", _forward_grad_fake), ("rows_dweight", _rows_dweight_fake),
                       ("shard_forward", _shard_forward_fake), ("shard_backward", _shard_backward_fake)):
        torch.library.register_fake(f"{ns}::cm_margin_{name}")(fake)
    register_autograd(f"{ns}::cm_margin_forward", functools.partial(_forward_backward, ns),
                      setup_context=_forward_setup, public_name="cm_margin_loss")
    register_autograd(f"{ns}::cm_margin_fused", _fused_backward, setup_context=_fused_setup,
                      public_name="cm_margin_loss")
    register_autograd(f"{ns}::cm_margin_forward_grad", functools.partial(_forward_grad_backward, ns),
                      setup_context=_forward_grad_setup, public_name="cm_margin_loss")
    register_no_double_backward(f"{ns}::cm_margin_backward", "cm_margin_loss")
    register_no_double_backward(f"{ns}::cm_margin_rows_dweight", "cm_margin_loss")


def cm_margin_loss(x, weight, labels, params: MarginParams, *, s, contraction, norm_offset, norm_temperature,
                   detach_norm, margin_grad, class_weight, ignore_index, reduction, ns="idid_kernels"):
    """The loss through the C++/CUDA ops; arguments already validated by ``functional``.

    A per-row margin (``params.per_row``) runs as kind "given": its (2, N) phi and phi' are formed
    on O(N) vectors first (reference.margins.row_target)."""
    target = None
    if params.per_row:
        target = row_target(x, weight, labels, params, margin_grad, ignore_index)
        params = GIVEN
    cfg = config_args(params, s=s, contraction=contraction, norm_offset=norm_offset,
                      norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                      ignore_index=ignore_index, num_classes=weight.shape[0],
                      acc_itemsize=8 if x.dtype == torch.float64 else 4, device_type=x.device.type, target=target)
    acc = _acc(x.dtype)
    valid = labels != ignore_index
    if class_weight is None:
        w_rows = valid.to(acc)
    else:
        # The index into class_weight stays in range even for labels the (skippable) label check
        # would have refused: the kernels give such rows a NaN loss, never an out-of-bounds read here.
        in_range = valid & (labels >= 0) & (labels < weight.shape[0])
        safe = torch.where(in_range, labels, torch.zeros_like(labels))
        w_rows = torch.where(valid, class_weight.to(acc)[safe], torch.zeros((), dtype=acc, device=x.device))
    # The fused path's backward scales gradients formed in the forward pass, which nothing could
    # differentiate again; under torch.func transforms the forward/backward ops are used, whose
    # backward op refuses a second derivative instead of giving a silently wrong one.
    # A target that needs a gradient (margins with grad) does not take the fused op: it returns no
    # per-row losses to form d loss / d phi from.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and not functorch_active()
    if (reduction != "none" and needs_grad and not (target is not None and target.requires_grad)):
        # mean: w / sum(w), 0/0 = NaN for a batch with no weight, exactly F.cross_entropy.
        row_weight = w_rows / w_rows.sum() if reduction == "mean" else w_rows
        loss, _, _ = getattr(torch.ops, ns).cm_margin_fused(x, weight, labels, row_weight, *cfg)
        return loss.to(x.dtype)
    # "none", or a target that needs its gradient (the fused op has no per-row losses to form it
    # from), with the batch in one chunk (cfg[13]: chunk_rows): the logit gradients are kept
    if needs_grad and cfg[13] >= x.shape[0]:
        loss_rows = getattr(torch.ops, ns).cm_margin_forward_grad(x, weight, labels, *cfg)[0]
    else:
        loss_rows = getattr(torch.ops, ns).cm_margin_forward(x, weight, labels, *cfg)[0]
    weighted = loss_rows * w_rows
    if reduction == "none":
        return weighted.to(x.dtype)
    total = weighted.sum()
    return (total / w_rows.sum() if reduction == "mean" else total).to(x.dtype)
