"""Pieces shared by the Triton kernels of ``idid_loss`` and ``class_density`` (spec/idid.md).

Row layout. Both ops need per-class reductions over a batch whose labels can be arbitrarily
imbalanced. The rows are bucketed by label once, on the device and without a host sync: a stable
``torch.sort`` of the labels (ignored rows get the key C and sort to the end) gives ``perm`` (sorted
position -> batch row) and ``torch.searchsorted`` gives the class offsets, so class c owns sorted
positions [offsets[c], offsets[c + 1]) and offsets[C] is the number of rows taking part. Every
kernel reads the batch through ``perm`` (no permuted copy of x), and every per-class sum walks its
class's contiguous positions in order: reductions have a fixed order and need no atomics.

Labels out of range. functional.py rejects a label outside [0, C) (other than ignore_index) before
any launch, but that check reads the labels on the host and is skipped under torch.compile, during
CUDA-graph capture and with ``IDID_KERNELS_CHECK_LABELS=0``. The kernels then never index with such
a label: it sorts last, with the key C + 1, after the ignored rows (key C), so it belongs to no class
and takes no part. It poisons the results instead (:func:`bad_labels`): idid_loss returns NaN for
the loss and every term, class_density NaN for every class, and both backward passes NaN for every
gradient element, whatever the upstream gradient. Nothing is read out of bounds and nothing is left
unwritten. (The reference and cpp backends raise on such labels; the cuda backend drops the rows,
with NaN for idid_loss's loss and L_IC.)

Same-class pairs. The diversity kernel kappa_ij = exp(t (<u_i, u_j> - 1)) is needed only for pairs
of one class. A block of sorted rows [r0, r0 + BLOCK_M) spans the classes y(r0) .. y(r_last), whose
partners lie in the contiguous range [offsets[y(r0)], offsets[y(r_last) + 1]); the kernels tile that
range only, so the work is sum_c n_c^2 d (plus block-boundary slack), never B^2 d, however skewed
the classes are.

Scaled rows. The kernels that form cosines or unit rows read x through the pair
(x_i 2^k_i, max(||x_i||, 1e-12) 2^k_i) of :func:`._rows.scaled_rows` in place of (x, ||x||), with
2^k_i an exact power of two near 1 / ||x_i||: every expression they evaluate, x_i / max(||x_i||, eps)
and <x_i, .> / max(||x_i||, eps), is unchanged (the power of two cancels exactly), while the dots
stay O(1) in magnitude, so rows of norm 1e20 (a raw dot of 1e40, above float32's max) or 1e-21 do not
overflow or underflow. Row norms never square an element (nrm2 with an online rescale), and norm
floors are written ``tl.where(r < eps, eps, r)`` so that a NaN norm stays NaN (``tl.maximum``
drops it). The F.normalize backward reads the raw rows.

Numerics: statistics, norms and reductions in float32 (float64 for float64 inputs); ``tl.dot``
operands stay in the input dtype (bf16/fp16 on tensor cores, float64 as float64) with float32
(float64) accumulation. float32 dots are exact-precision (``input_precision="ieee"``) unless the
environment variable ``IDID_KERNELS_TRITON_TF32=1`` allows TF32 (about 1e-3 relative error in the
cosines: outside ARCHITECTURE.md's float32 tolerances, hence opt-in).

Under ``TRITON_INTERPRET=1`` every autotuned kernel has one small configuration: the interpreter
runs each program in Python, where autotuning would only cost time, and small blocks make the tiny
test shapes span several row, class and feature tiles. The interpreter re-patches triton.language
on every call of a nested @triton.jit function (tl.zeros included), about a millisecond each, so
one-line helpers are written inline and tensors are created with ``tl.full``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .._autograd import no_double_backward  # noqa: F401  (re-exported: one refusal for every backend)
from . import _rows
from ._rows import (  # noqa: F401  (by_dtype, scaled_rows: re-exported)
    by_dtype, nrm2_finish, nrm2_step, per_dtype, scaled_rows, trim_configs,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# F.normalize's floor on the norm: u = x / max(||x||, NORM_EPS).
NORM_EPS = 1e-12
# The online logsumexp's "minus infinity": finite, so that exp(m_old - m_new) is never NaN.
NEG = -1.0e30

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_dtype(op: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: the triton backend takes float32, float64, bfloat16 or float16 inputs, got {x.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the float32 dots: "ieee" unless IDID_KERNELS_TRITON_TF32=1. Other dtypes
    take Triton's default (the option only affects float32 operands)."""
    if dtype == torch.float32 and os.environ.get("IDID_KERNELS_TRITON_TF32") != "1":
        return "ieee"
    return "tf32"


def split_f64(value: float) -> tuple[float, float, float]:
    """(hi, mid, lo): float32 numbers with hi + mid + lo = value exactly (3 x 24 >= 53 bits).

    Triton passes Python floats to kernels as float32 scalars; the kernels rebuild their parameters
    (alpha, 1/tau, t, ...) as ``tl.cast(hi, ACC) + tl.cast(mid, ACC) + tl.cast(lo, ACC)``, so the
    float64 path does not compute with rounded ones (in float32 the sum rounds back to hi)."""
    hi = float(np.float32(value))
    mid = float(np.float32(value - hi))
    return hi, mid, float(np.float32(value - hi - mid))


def configs(gpu: list[tuple] | dict, interp: tuple, names: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configurations: tuples of block sizes (``names``) then num_warps and num_stages.
    Under the interpreter only ``interp``; on a GPU the first ``IDID_KERNELS_TRITON_MAX_CONFIGS``
    entries of each list when that variable is set (:func:`._rows.max_configs`, read at import).
    ``gpu`` may map input dtypes (a torch dtype or a tuple of them) to such lists, for kernels
    autotuned with ``prune_configs_by=by_dtype(arg)`` (:func:`._rows.per_dtype`)."""
    n = len(names)

    def make(rows):
        return [triton.Config(dict(zip(names, r[:n])), num_warps=r[n], num_stages=r[n + 1]) for r in rows]

    if INTERPRET:
        return make([interp])
    if isinstance(gpu, dict):
        return per_dtype({dtypes: make(trim_configs(rows)) for dtypes, rows in gpu.items()})
    return make(trim_configs(gpu))


def pick(gpu, interp):
    """A fixed block size: ``gpu`` natively, ``interp`` under the interpreter."""
    return interp if INTERPRET else gpu


def bucket_rows(labels: torch.Tensor, num_classes: int, ignore_index: int | None = None):
    """(layout, offsets) of the module docstring, on the labels' device, without a host sync.

    layout: (2, B) int64, row 0 ``perm`` (sorted position -> batch row), row 1 the sorted keys: the
    label, C for ignored rows, C + 1 for a label out of range (see "Labels out of range" in the
    module docstring). offsets: (C + 1,) int64 class starts in sorted order; offsets[C] = rows
    taking part, every one with a key in [0, C). The sort is stable, so rows of one class keep their
    batch order.
    """
    # masked_fill takes the fill value as a kernel argument (torch.where with a Python number would
    # materialise it as a device tensor first: one more launch per call)
    key = labels.masked_fill((labels < 0) | (labels >= num_classes), num_classes + 1)
    if ignore_index is not None:
        key = key.masked_fill(labels == ignore_index, num_classes)
    sorted_key, perm = torch.sort(key, stable=True)
    bounds = torch.arange(num_classes + 1, device=labels.device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds)
    return torch.stack((perm, sorted_key)), offsets


# ----------------------------------------------------------------------------------------------
# @triton.jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def bad_labels(lay_ptr, B, C):
    """Whether some label is out of range: it sorts last with the key C + 1 (:func:`bucket_rows`)."""
    return tl.load(lay_ptr + 2 * B - 1, mask=B > 0, other=0) > C


@triton.jit
def softplus(v):
    """log(1 + exp(v)) = max(v, 0) + log1p(exp(-|v|)), log1p(e) = log(w) e / (w - 1), w = 1 + e
    (exact to rounding even where e is below the unit roundoff; Triton's interpreter has no log1p)."""
    e = tl.exp(-tl.abs(v))
    w = 1.0 + e
    tiny = w == 1.0
    log1p = tl.where(tiny, e, tl.log(w) * e / tl.where(tiny, 1.0, w - 1.0))
    return tl.maximum(v, 0.0) + log1p


@triton.jit
def log_add_exp(a, b):
    hi = tl.maximum(a, b)
    return hi + softplus(tl.minimum(a, b) - hi)


# Triton's interpreter multiplies bfloat16 tiles wrongly in tl.dot (off by orders of magnitude; the
# same tiles cast to float32 are exact): there the bfloat16 products run in float32, as in
# _rows.dot_dtype. Compiled kernels multiply in bfloat16 (the branch is folded away).
BF16_DOT_AS_F32: tl.constexpr = tl.constexpr(_rows.interpreted())


@triton.jit
def dot_rows(a_ptr, a_rows, a_mask, b_ptr, b_rows, b_mask, D, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_A, BLOCK_B) raw dot products <a_i, b_j> of rows of two row-major (., D) matrices,
    accumulated over D in chunks of BLOCK_K; masked rows give 0."""
    acc = tl.full((BLOCK_A, BLOCK_B), 0, ACC)
    a_base = a_ptr + a_rows.to(tl.int64)[:, None] * D
    b_base = b_ptr + b_rows.to(tl.int64)[:, None] * D
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        a = tl.load(a_base + ks[None, :], mask=a_mask[:, None] & km[None, :], other=0.0)
        b = tl.load(b_base + ks[None, :], mask=b_mask[:, None] & km[None, :], other=0.0)
        if BF16_DOT_AS_F32 and a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def same_class_span(lay_ptr, offs_ptr, r0, B, Bv, BLOCK_M: tl.constexpr):
    """[start, end) of the sorted positions holding the same-class partners of block rows
    [r0, r0 + BLOCK_M); empty for a block past the rows taking part."""
    has = r0 < Bv
    last = tl.maximum(tl.minimum(r0 + BLOCK_M, Bv) - 1, 0)
    y_first = tl.load(lay_ptr + B + r0, mask=has, other=0)
    y_last = tl.load(lay_ptr + B + last, mask=has, other=0)
    start = tl.load(offs_ptr + y_first)
    end = tl.where(has, tl.load(offs_ptr + y_last + 1), start)
    return start, end


@triton.jit
def pair_kernel_tile(x_ptr, xn_ptr, lay_ptr, rows, rmask, src, y, inx, j0, end, B, D, t,
                     ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """kappa_ij = exp(t (<u_i, u_j> - 1)) for the block rows i and the sorted positions
    j in [j0, j0 + BLOCK_N), zero unless y_i = y_j, i != j and both take part.
    Returns (kappa, src_j, inx_j, mask_j)."""
    cj = j0 + tl.arange(0, BLOCK_N)
    jm = cj < end
    srcj = tl.load(lay_ptr + cj, mask=jm, other=0)
    yj = tl.load(lay_ptr + B + cj, mask=jm, other=-1)
    xnj = tl.load(xn_ptr + srcj, mask=jm, other=1.0)
    inxj = 1.0 / tl.where(xnj < 1e-12, 1e-12, xnj)
    gram = dot_rows(x_ptr, src, rmask, x_ptr, srcj, jm, D, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    cos = gram * inx[:, None] * inxj[None, :]
    same = (y[:, None] == yj[None, :]) & (rows[:, None] != cj[None, :]) & rmask[:, None] & jm[None, :]
    kappa = tl.exp(t * (tl.where(same, cos, 1.0) - 1.0))
    return tl.where(same, kappa, 0.0), srcj, inxj, jm


@triton.jit
def accumulate_pull(acc, x_ptr, xn_ptr, lay_ptr, offs_ptr, r0, rows, rmask, src, y, inx, coef, dcols, dmask,
                    B, Bv, D, t, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_i += coef_i sum_{j same class, j != i} kappa_ij u_j[dcols] (the diversity pull of
    dD_c/du_i, spec/idid.md: dD_c/du_i = 2t / (n_c (n_c - 1)) sum_j kappa_ij u_j)."""
    DT = x_ptr.dtype.element_ty
    if BF16_DOT_AS_F32 and DT == tl.bfloat16:
        DT = tl.float32
    start, end = same_class_span(lay_ptr, offs_ptr, r0, B, Bv, BLOCK_M)
    for j0 in range(start, end, BLOCK_N):
        kappa, srcj, inxj, jm = pair_kernel_tile(x_ptr, xn_ptr, lay_ptr, rows, rmask, src, y, inx, j0, end, B, D,
                                                 t, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        xj = tl.load(x_ptr + srcj.to(tl.int64)[:, None] * D + dcols[None, :], mask=jm[:, None] & dmask[None, :],
                     other=0.0)
        uj = xj.to(ACC) * inxj[:, None]
        acc = tl.dot((kappa * coef[:, None]).to(DT), uj.to(DT), acc, input_precision=DOT_PREC)
    return acc


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def row_norms_kernel(x_ptr, out_ptr, N, D, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out_i = ||x_i|| in the accumulation dtype, without overflow or underflow of the squares
    (:func:`._rows.nrm2_step`: rows of norm 1e20 or 1e-21 in float32 keep their norms)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    base = x_ptr + rows.to(tl.int64)[:, None] * D
    scale = tl.full((BLOCK_R,), 0, ACC)
    ssq = tl.full((BLOCK_R, BLOCK_K), 0, ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(base + ks[None, :], mask=rm[:, None] & (ks < D)[None, :], other=0.0).to(ACC)
        scale, ssq = nrm2_step(scale, ssq, v)
    tl.store(out_ptr + rows, nrm2_finish(scale, ssq), mask=rm)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i|| (B,) of a contiguous x, in the accumulation dtype."""
    n, d = x.shape
    out = torch.empty(n, dtype=acc_dtype(x.dtype), device=x.device)
    # float64: 1024-element tiles (4096 spill registers on sm_90, see _rows.row_block)
    block_r, block_k = pick(8 if x.dtype == torch.float64 else 32, 8), pick(128, 32)
    with _rows.on_device(x):
        row_norms_kernel[(triton.cdiv(n, block_r),)](x, out, n, d, ACC=tl_acc(x.dtype), BLOCK_R=block_r,
                                                     BLOCK_K=block_k)
    return out


# Autotune configs per input dtype (_rows.per_dtype), none of which spills registers on sm_90 or
# sm_80 (`python -m idid_kernels compile-check`): bf16/fp16 tiles go to the tensor cores; float32
# (exact products: FMA) and float64 (two registers an element) hold smaller tiles in 255 registers.
_PAIR_ROW_SUMS_CONFIGS = configs({
    (torch.bfloat16, torch.float16): [(64, 64, 32, 4, 3), (32, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 32, 64, 4, 3)],
    torch.float32: [(128, 64, 32, 8, 3), (64, 64, 16, 8, 3), (32, 64, 32, 4, 3), (64, 32, 32, 4, 3)],
    torch.float64: [(64, 64, 16, 8, 3), (64, 32, 32, 8, 3), (32, 64, 32, 4, 3), (32, 32, 32, 4, 3)],
}, (8, 8, 32, 1, 1), ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


@triton.autotune(configs=_PAIR_ROW_SUMS_CONFIGS, key=["C", "D"], prune_configs_by=by_dtype("x_ptr"))
@triton.jit
def pair_row_sums_kernel(x_ptr, xn_ptr, lay_ptr, offs_ptr, out_ptr, B, C, D, t_hi, t_mid, t_lo, ACC: tl.constexpr,
                         DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """out[p] = sum_{j same class, j != i} kappa_ij for the row i at sorted position p (0 for rows
    that take no part)."""
    t = tl.cast(t_hi, ACC) + tl.cast(t_mid, ACC) + tl.cast(t_lo, ACC)  # split_f64 parts
    r0 = tl.program_id(0) * BLOCK_M
    rows = r0 + tl.arange(0, BLOCK_M)
    Bv = tl.load(offs_ptr + C)
    rmask = rows < Bv
    src = tl.load(lay_ptr + rows, mask=rmask, other=0)
    y = tl.load(lay_ptr + B + rows, mask=rmask, other=0)
    xn = tl.load(xn_ptr + src, mask=rmask, other=1.0)
    inx = 1.0 / tl.where(xn < 1e-12, 1e-12, xn)
    sums = tl.full((BLOCK_M,), 0, ACC)
    start, end = same_class_span(lay_ptr, offs_ptr, r0, B, Bv, BLOCK_M)
    for j0 in range(start, end, BLOCK_N):
        kappa, _, _, _ = pair_kernel_tile(x_ptr, xn_ptr, lay_ptr, rows, rmask, src, y, inx, j0, end, B, D, t, ACC,
                                          DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        sums += tl.sum(kappa, axis=1)
    tl.store(out_ptr + rows, sums, mask=rows < B)


def pair_row_sums(x, x_norm, layout, offsets, num_classes, t, out):
    """Launch :func:`pair_row_sums_kernel` writing into ``out`` (B,) (sorted order)."""
    b, d = x.shape
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)  # noqa: E731
    with _rows.on_device(x):
        pair_row_sums_kernel[grid](x, x_norm, layout, offsets, out, b, num_classes, d, *split_f64(t),
                                   ACC=tl_acc(x.dtype), DOT_PREC=dot_precision(x.dtype))


@triton.jit
def normalize_backward_kernel(g_ptr, x_ptr, xn_ptr, out_ptr, N, D, NSPLIT, split_stride, ACC: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """F.normalize backward: out_i = (g_i - <g_i, u_i> u_i) / max(||x_i||, 1e-12), the radial term
    dropped where ||x_i|| <= 1e-12 (the floor is a constant there). g = sum of NSPLIT partial
    buffers ``split_stride`` apart, added in a fixed order (the second pass of the atomic-free
    reduction). u_i = x_i / ||x_i|| is formed by a division (|u| <= 1: no overflow or underflow
    whatever the scale of the row), and a NaN norm gives a NaN row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    r = tl.load(xn_ptr + rows, mask=rm, other=1.0)
    inv = 1.0 / tl.where(r < 1e-12, 1e-12, r)  # max(r, eps), NaN kept
    r_div = tl.where(r == 0, 1.0, r)  # u = x / r, 0 for a zero row
    base = rows.to(tl.int64)[:, None] * D
    radial = tl.full((BLOCK_R,), 0, ACC)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rm[:, None] & (ks < D)[None, :]
        g = tl.full((BLOCK_R, BLOCK_K), 0, ACC)
        for s in range(0, NSPLIT):
            g += tl.load(g_ptr + s * split_stride + base + ks[None, :], mask=m, other=0.0)
        u = tl.load(x_ptr + base + ks[None, :], mask=m, other=0.0).to(ACC) / r_div[:, None]
        radial += tl.sum(g * u, axis=1)
    radial = tl.where(r > 1e-12, radial, 0.0)  # <g, u> above the floor
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = rm[:, None] & (ks < D)[None, :]
        g = tl.full((BLOCK_R, BLOCK_K), 0, ACC)
        for s in range(0, NSPLIT):
            g += tl.load(g_ptr + s * split_stride + base + ks[None, :], mask=m, other=0.0)
        u = tl.load(x_ptr + base + ks[None, :], mask=m, other=0.0).to(ACC) / r_div[:, None]
        out = (g - radial[:, None] * u) * inv[:, None]
        tl.store(out_ptr + base + ks[None, :], out.to(out_ptr.dtype.element_ty), mask=m)


def normalize_backward(grad_u: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor, nsplit: int = 1) -> torch.Tensor:
    """dx (x's dtype) from dL/du held as ``nsplit`` stacked partial buffers (nsplit, N, D)."""
    n, d = x.shape
    out = torch.empty_like(x)
    block_r, block_k = pick(16, 8), pick(128, 32)
    with _rows.on_device(x):
        normalize_backward_kernel[(triton.cdiv(n, block_r),)](grad_u, x, x_norm, out, n, d, nsplit, n * d,
                                                              ACC=tl_acc(x.dtype), BLOCK_R=block_r, BLOCK_K=block_k)
    return out
