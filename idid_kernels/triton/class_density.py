"""Triton kernels of ``class_density`` (spec/idid.md; oracle: reference/primitives.py), registered as
the torch.library ops ``idid_kernels::triton_class_density_forward`` / ``triton_class_density_backward``
with fake kernels and autograd.

    D_c = sum_{i != j, y_i = y_j = c} kappa_ij / (n_c (n_c - 1)),  kappa_ij = exp(t (<u_i, u_j> - 1)),
    D_c = 0 for n_c < 2;  dD_c/du_i = 2t / (n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j.

Rows are bucketed by label (see :mod:`._idid_common`) and only same-class pairs are formed:
forward, per row the sum of kappa over its partners, then one program per class adds its rows' sums
in order; backward, per (row block, feature chunk) the kernel-weighted pull of the same-class rows
through ``tl.dot``, then the F.normalize backward. No atomics anywhere: the results are bitwise
reproducible, with or without ``torch.use_deterministic_algorithms``. No host synchronisation.

The backward grid (row blocks x feature chunks) is folded onto axis 0: axes 1 and 2 stop at 65,535.

Labels out of range (reachable only when functional's label check is skipped: torch.compile,
graph capture, ``IDID_KERNELS_CHECK_LABELS=0``): never used as an index; the density is NaN for
every class and dx is NaN everywhere (:mod:`._idid_common`, "Labels out of range").

Precision: float32 accumulation (float64 for float64 inputs); float32 dots are exact-precision
unless ``IDID_KERNELS_TRITON_TF32=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import DEVICE_AUTOGRAD_KEYS, register_autograd, register_no_double_backward
from . import _rows
from ._idid_common import (
    acc_dtype, accumulate_pull, bad_labels, bucket_rows, by_dtype, check_dtype, configs, dot_precision,
    no_double_backward, normalize_backward, pair_row_sums, pick, row_norms, scaled_rows, split_f64, tl_acc,
)

_FWD = "idid_kernels::triton_class_density_forward"
_BWD = "idid_kernels::triton_class_density_backward"


@triton.jit
def _class_sum_kernel(rowsum_ptr, offs_ptr, lay_ptr, out_ptr, B, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """D_c = (sum of the row sums of class c, in row order) / (n_c (n_c - 1)); 0 where n_c < 2; NaN
    for every c when a label is out of range."""
    c = tl.program_id(0)
    start = tl.load(offs_ptr + c)
    end = tl.load(offs_ptr + c + 1)
    acc = tl.full((BLOCK,), 0, ACC)
    for r0 in range(start, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc += tl.load(rowsum_ptr + rows, mask=rows < end, other=0.0)
    n = (end - start).to(ACC)
    density = tl.where(n >= 2, tl.sum(acc, axis=0) / tl.maximum(n * (n - 1.0), 1.0), 0.0)
    density = tl.where(bad_labels(lay_ptr, B, C), float("nan"), density)
    tl.store(out_ptr + c, density.to(out_ptr.dtype.element_ty))


# Autotune configs per input dtype (_rows.per_dtype), none of which spills registers on sm_90 or
# sm_80 (`python -m idid_kernels compile-check`): bf16/fp16 tiles go to the tensor cores; float32
# (exact products: FMA) and float64 (two registers an element) hold smaller tiles in 255 registers.
_PULL_ROWS_CONFIGS = configs({
    (torch.bfloat16, torch.float16): [(64, 64, 32, 64, 8, 2), (64, 64, 32, 128, 8, 2), (32, 64, 64, 128, 8, 2)],
    torch.float32: [(64, 32, 32, 64, 8, 2), (32, 32, 32, 128, 8, 2), (32, 64, 32, 64, 8, 2)],
    torch.float64: [(64, 32, 16, 64, 8, 2), (32, 64, 16, 64, 8, 2), (32, 32, 32, 64, 8, 2), (32, 32, 16, 32, 4, 2)],
}, (8, 8, 32, 32, 1, 1), ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D"))


@triton.autotune(configs=_PULL_ROWS_CONFIGS, key=["C", "D"], prune_configs_by=by_dtype("x_ptr"))
@triton.jit
def _pull_rows_kernel(x_ptr, xn_ptr, lay_ptr, offs_ptr, g_ptr, du_ptr, B, C, D, t_hi, t_mid, t_lo, ACC: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """dL/du_i[dcols] = 2t g_c / (n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j, in batch order:
    every row of du is written (0 for a row outside every class, NaN everywhere when a label is out of
    range)."""
    t = tl.cast(t_hi, ACC) + tl.cast(t_mid, ACC) + tl.cast(t_lo, ACC)  # split_f64 parts
    pid = tl.program_id(0)  # (row block, feature chunk) folded onto axis 0 (axes 1, 2 stop at 65,535)
    row_blocks = tl.cdiv(B, BLOCK_M)
    r0 = (pid % row_blocks) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    dcols = (pid // row_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    Bv = tl.load(offs_ptr + C)
    rmask = rows < Bv
    inb = rows < B
    src = tl.load(lay_ptr + rows, mask=inb, other=0)
    y = tl.load(lay_ptr + B + rows, mask=rmask, other=0)
    xn = tl.load(xn_ptr + src, mask=rmask, other=1.0)
    inx = 1.0 / tl.where(xn < 1e-12, 1e-12, xn)
    n = (tl.load(offs_ptr + y + 1, mask=rmask, other=1) - tl.load(offs_ptr + y, mask=rmask, other=0)).to(ACC)
    g = tl.load(g_ptr + y, mask=rmask, other=0.0).to(ACC)
    coef = tl.where(n >= 2, 2.0 * t * g / (n * tl.maximum(n - 1.0, 1.0)), 0.0)
    acc = tl.full((BLOCK_M, BLOCK_D), 0, ACC)
    acc = accumulate_pull(acc, x_ptr, xn_ptr, lay_ptr, offs_ptr, r0, rows, rmask, src, y, inx, coef, dcols, dmask,
                          B, Bv, D, t, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.where(bad_labels(lay_ptr, B, C), float("nan"), acc)
    tl.store(du_ptr + src.to(tl.int64)[:, None] * D + dcols[None, :], acc, mask=inb[:, None] & dmask[None, :])


def _forward_impl(x, labels, num_classes, t):
    check_dtype("class_density", x)
    with _rows.on_device(x):  # Triton launches on the current device, not the tensors'
        x = x.contiguous()
        b = x.shape[0]
        layout, offsets = bucket_rows(labels, num_classes)
        norm = row_norms(x)
        xs, xs_norm = scaled_rows(x, norm)  # the rows the pair kernels read (see _idid_common)
        rowsum = torch.empty(b, dtype=acc_dtype(x.dtype), device=x.device)
        pair_row_sums(xs, xs_norm, layout, offsets, num_classes, t, rowsum)
        density = torch.empty(num_classes, dtype=x.dtype, device=x.device)
        _class_sum_kernel[(num_classes,)](rowsum, offsets, layout, density, b, num_classes, ACC=tl_acc(x.dtype),
                                          BLOCK=pick(256, 8))
        return density, norm, layout, offsets


def _backward_impl(grad, x, norm, layout, offsets, t):
    check_dtype("class_density", x)
    with _rows.on_device(x):  # Triton launches on the current device, not the tensors'
        x = x.contiguous()
        b, d = x.shape
        c = offsets.shape[0] - 1
        acc = acc_dtype(x.dtype)
        xs, xs_norm = scaled_rows(x, norm)
        du = torch.empty((b, d), dtype=acc, device=x.device)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]),)  # noqa: E731
        _pull_rows_kernel[grid](xs, xs_norm, layout, offsets, grad.to(acc).contiguous(), du, b, c, d, *split_f64(t),
                                ACC=tl_acc(x.dtype), DOT_PREC=dot_precision(x.dtype))
        return normalize_backward(du, x, norm)


Tensor = torch.Tensor


@torch.library.custom_op(_FWD, mutates_args=())
def _forward_op(x: Tensor, labels: Tensor, num_classes: int, t: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (density (C,) in x's dtype, norm (B,), layout (2, B), offsets (C + 1,))."""
    return _forward_impl(x, labels, num_classes, t)


@_forward_op.register_fake
def _forward_fake(x, labels, num_classes, t):
    b = x.shape[0]
    return (x.new_empty((num_classes,)), x.new_empty((b,), dtype=acc_dtype(x.dtype)),
            labels.new_empty((2, b), dtype=torch.int64), labels.new_empty((num_classes + 1,), dtype=torch.int64))


@torch.library.custom_op(_BWD, mutates_args=())
def _backward_op(grad: Tensor, x: Tensor, norm: Tensor, layout: Tensor, offsets: Tensor, t: float) -> Tensor:
    """-> dx for dL/dD = grad (C,)."""
    return _backward_impl(grad, x, norm, layout, offsets, t)


@_backward_op.register_fake
def _backward_fake(grad, x, norm, layout, offsets, t):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, _labels, _num_classes, t = inputs
    _, norm, layout, offsets = output
    ctx.mark_non_differentiable(norm, layout, offsets)
    ctx.save_for_backward(x, norm, layout, offsets)
    ctx.t = t


def _backward(ctx, grad, *_):
    no_double_backward("class_density")
    x, norm, layout, offsets = ctx.saved_tensors
    return _backward_op(grad, x, norm, layout, offsets, ctx.t), None, None, None


# At the per-device autograd keys, through the torch.func-capable registration (idid_kernels/_autograd.py).
register_autograd(_FWD, _backward, setup_context=_setup_context, public_name="class_density",
                  keys=DEVICE_AUTOGRAD_KEYS)
register_no_double_backward(_BWD, "class_density", keys=DEVICE_AUTOGRAD_KEYS)


def class_density(x: Tensor, labels: Tensor, num_classes: int, t: float) -> Tensor:
    """The op's public output (arguments validated by functional)."""
    density, *_ = _forward_op(x, labels, int(num_classes), float(t))
    return density
