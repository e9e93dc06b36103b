"""cm_margin_loss on Triton: the cosine GEMM and the softmax epilogue fused, the (N, C) logits never
written to memory (spec/cm_margin.md; the math is in :mod:`idid_kernels.reference.cm_margin`).

Forward, ``idid_triton::cm_margin_forward(x, weight, labels, *cfg) -> (loss_rows, row_stats, w_norm)``:

1. row kernels: ||w_j|| for every class and ||x_n|| per row (overflow-free, :func:`._rows.row_norms`);
   the GEMM operand x_n 2^k_n with an exact power of two near 1 / ||x_n|| (:func:`._rows.scaled_rows`,
   so that no dot overflows or underflows whatever the norms); the target cosine c_n = <u_n, w^_{y_n}>.
2. per row, on (N,) vectors: a_n = s g(r_n) and the margined target cosine psi_ny = phi(c_n). The
   margin functions are the reference's :func:`~idid_kernels.reference.margins.phi` (one definition
   of every preset's branches); only the target column carries a margin, so this is O(N) work.
3. ``_forward_kernel``: one program per block of rows streams the class tiles. Each tile is a
   tl.dot over d tiles of the scaled rows, scaled by the inverse norms into cosines. The online
   softmax runs in cosine units: psi_nj = c_nj off target and phi(c_n) on it, z = a_n psi, and since
   a_n > 0 the running max of z is a_n m_n with m_n the running max of psi. Exponents are
   a_n (c_nj - m_n), a product after a subtraction: exact to rounding even for s = 1e12, where a c
   alone would round by thousands of units (and an FMA contraction of a c - m by more). Alongside,
   P_n = sum_{j != y} exp(a (c_nj - m_n)) and S_n = the same weighted by c_nj, rescaled with the max.
   With t_n = a_n (m_n - psi_ny) >= 0 the row loss lse - z_y is t + log(P + exp(-t)), evaluated as
   log1p(P) when t = 0 (the target is the max) and directly otherwise (then P >= 1): no
   cancellation, so a loss of 1e-8 keeps float32 precision (``lse - z_y`` would lose it all).
   Saved per row (``row_stats``, 6 x N): ||x_n||, c_n, the shift m_n, log_sum_n = log(P + exp(-t))
   (so lse = a m + log_sum), and the off-target mass and its cosine-weighted sum as probabilities,
   P_n / (P_n + exp(-t_n)) and S_n / (P_n + exp(-t_n)).

Backward, ``idid_triton::cm_margin_backward(grad_rows, x, weight, labels, row_stats, w_norm, *cfg, need_x,
need_w) -> (dx, dw)``, with g_n the upstream gradient of row n (0 on ignored rows) and P_n, S_n the
saved probabilities:

- G_nj = a_n g_n p_nj off target, p_nj = exp(a_n (c_nj - m_n) - log_sum_n) from the saved shift (not
  exp(a c - lse), garbage for huge s); on target a_n g_n (p_ny - 1) phi'(c_n) = -a_n g_n P_n phi'(c_n)
  (the off-target mass is exact where p_ny rounds to 1). Each tile of G is recomputed.
- Bx_n = sum_j G_nj w^_j and Bw_j = sum_n G_nj u_n accumulate in float32 buffers (tl.dot of the tile
  of G, scaled by the inverse norms and rounded to the input dtype, with the (scaled) raw rows).
- dx_n = (Bx_n - <Bx_n, u_n> u_n) / max(r_n, eps) + s g'(r_n) R_n u_n with the radial term
  R_n = g_n (S_n - P_n phi(c_n)) = g_n (sum_j p_nj psi_nj - psi_ny); dW_j likewise from Bw_j
  (the shared projection kernel of :mod:`._rows`). Q_n and K_j of the spec are these projections.

dW reduction. By default one kernel over (row blocks x class groups) adds each tile's dX and dW
contributions with ``tl.atomic_add``: all tiles in flight, but the float32 summation order varies
run to run. The adds are relaxed (``sem="relaxed"``): no program reads the sums, which only later
kernels read, after the launch boundary, so no acquire/release ordering is needed. Under
``torch.use_deterministic_algorithms(True)`` there are no atomics: one program per row block owns
its dX rows and sweeps every class tile, then one program per class block owns its dW rows and
sweeps every row block, recomputing the cosine tiles (one more GEMM's worth of work); results are
then bitwise reproducible.

No host synchronisation anywhere (labels are validated by ``functional`` before the call, and an
out-of-range label reaching the kernel gives a NaN loss row and no gradient, as on the cuda backend,
instead of a memory access), so the op can be captured in a CUDA graph once the autotuner has run.
Precision and TF32 are documented in :mod:`._rows`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._autograd import DEVICE_AUTOGRAD_KEYS, register_autograd, register_no_double_backward
from ..reference.cm_margin import scale_of_norm
from ..reference.margins import GIVEN, MarginParams, phi, phi_grad, row_target, rows_with_target
from . import _rows
from ._rows import dot_operand, log1p, no_double_backward

_NS = "idid_triton"
# rows of the forward's saved statistics
_R, _COS, _SHIFT, _LOG_SUM, _MASS, _MASS_COS = range(6)
_NUM_STATS = 6

# Autotune configs per input dtype (_rows.per_dtype), none of which spills registers on sm_90 or sm_80
# (`python -m idid_kernels compile-check`): bf16/fp16 tiles go to the tensor cores and take the
# large tiles; float32 (exact products: FMA, no tensor cores) and float64 (two registers an element)
# hold smaller tiles in a thread's 255 registers.
_HALF = (torch.bfloat16, torch.float16)
_FWD_CONFIGS = _rows.configs(
    gpu={_HALF: [dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=2),
                 dict(BLOCK_N=128, BLOCK_C=64, BLOCK_D=64, num_warps=8, num_stages=3),
                 dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
                 dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=64, num_warps=4, num_stages=4),
                 dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=32, num_warps=4, num_stages=2)],
         torch.float32: [dict(BLOCK_N=128, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=16, num_warps=8, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=32, num_warps=4, num_stages=2)],
         torch.float64: [dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=32, num_warps=4, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=16, num_warps=4, num_stages=2)]},
    interpreter=dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16))
# The backward holds a tile of G besides the GEMM operands: smaller tiles than the forward.
_BWD_CONFIGS = _rows.configs(
    gpu={_HALF: [dict(BLOCK_N=128, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
                 dict(BLOCK_N=64, BLOCK_C=128, BLOCK_D=32, num_warps=8, num_stages=3),
                 dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=64, num_warps=8, num_stages=3),
                 dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=32, num_warps=4, num_stages=2)],
         torch.float32: [dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=16, num_warps=4, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=16, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=32, num_warps=8, num_stages=2)],
         torch.float64: [dict(BLOCK_N=64, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=3),
                         dict(BLOCK_N=64, BLOCK_C=32, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_N=32, BLOCK_C=32, BLOCK_D=16, num_warps=4, num_stages=2)]},
    interpreter=dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16))


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _target_cos_kernel(x_ptr, w_ptr, labels_ptr, w_norm_ptr, x_norm_ptr, cos_ptr, N, C, D, ignore_index,
                       stride_xn, stride_xd, stride_wc, stride_wd,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """c_n = <x_n, w_{y_n}> / (max(||x_n||, eps) max(||w_{y_n}||, eps)); 0 on ignored rows.

    Takes the scaled rows of :func:`._rows.scaled_rows` (x_n 2^k and its floor max(r_n, eps) 2^k in
    x_norm_ptr), so every product is at most |w| and the dot cannot overflow."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
    has_target = rmask & (y != ignore_index) & (y >= 0) & (y < C)
    y = tl.where(has_target, y, 0)
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_base = w_ptr + y.to(tl.int64)[:, None] * stride_wc
    dot = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds[None, :] < D
        xv = tl.load(x_base + ds[None, :] * stride_xd, mask=rmask[:, None] & dmask, other=0.0).to(ACC)
        wv = tl.load(w_base + ds[None, :] * stride_wd, mask=has_target[:, None] & dmask, other=0.0).to(ACC)
        dot += xv * wv
    eps = tl.full([BLOCK_N], 1e-12, ACC)
    x_norm = tl.load(x_norm_ptr + rows, mask=rmask, other=1.0)
    w_norm = tl.load(w_norm_ptr + y, mask=has_target, other=1.0)
    # max(., eps) written so that a NaN norm stays NaN
    cos = tl.sum(dot, 1) / (tl.where(x_norm < eps, eps, x_norm) * tl.where(w_norm < eps, eps, w_norm))
    tl.store(cos_ptr + rows, tl.where(has_target, cos, 0.0), mask=rmask)


@triton.jit
def _cosine_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, inv_x, inv_w, D, stride_xn, stride_xd, stride_wc, stride_wd,
                 PREC: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_N, BLOCK_C) cosines: the raw-row GEMM over d tiles, scaled by the inverse norms."""
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    w_base = w_ptr + cls.to(tl.int64)[:, None] * stride_wc
    acc = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds[None, :] < D
        xt = tl.load(x_base + ds[None, :] * stride_xd, mask=rmask[:, None] & dmask, other=0.0)
        wt = tl.load(w_base + ds[None, :] * stride_wd, mask=cmask[:, None] & dmask, other=0.0)
        acc = tl.dot(xt.to(DOT_DT), tl.trans(wt.to(DOT_DT)), acc, input_precision=PREC, out_dtype=ACC)
    return acc * inv_x[:, None] * inv_w[None, :]


@triton.autotune(configs=_FWD_CONFIGS, key=["C", "D"], prune_configs_by=_rows.by_dtype("x_ptr"))
@triton.jit
def _forward_kernel(x_ptr, w_ptr, labels_ptr, x_norm_ptr, w_norm_ptr, scale_ptr, target_ptr,
                    loss_ptr, shift_ptr, log_sum_ptr, mass_ptr, mass_cos_ptr, N, C, D, ignore_index,
                    stride_xn, stride_xd, stride_wc, stride_wd,
                    PREC: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax in cosine units (module docstring): per row the running max m of psi_j and
    P = sum_{j != y} exp(a (c_j - m)), S = sum_{j != y} exp(a (c_j - m)) c_j."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    y = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index)
    valid = y != ignore_index
    has_target = valid & (y >= 0) & (y < C)
    eps_n = tl.full([BLOCK_N], 1e-12, ACC)
    eps_c = tl.full([BLOCK_C], 1e-12, ACC)
    x_norm = tl.load(x_norm_ptr + rows, mask=rmask, other=1.0)
    inv_x = 1.0 / tl.where(x_norm < eps_n, eps_n, x_norm)
    a = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    psi_target = tl.load(target_ptr + rows, mask=rmask, other=0.0)

    m = tl.full([BLOCK_N], float("-inf"), ACC)  # running max of psi
    mass = tl.zeros([BLOCK_N], ACC)              # sum_{j != y} exp(a (c_j - m))
    mass_cos = tl.zeros([BLOCK_N], ACC)          # sum_{j != y} exp(a (c_j - m)) c_j
    for c0 in range(0, C, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < C
        w_norm = tl.load(w_norm_ptr + cls, mask=cmask, other=1.0)
        inv_w = 1.0 / tl.where(w_norm < eps_c, eps_c, w_norm)
        cos = _cosine_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, inv_x, inv_w, D, stride_xn, stride_xd, stride_wc,
                           stride_wd, PREC, DOT_DT, ACC, BLOCK_N, BLOCK_C, BLOCK_D)
        is_target = (cls[None, :] == y[:, None]) & valid[:, None]
        psi = tl.where(is_target, psi_target[:, None], cos)
        m_new = tl.maximum(m, tl.max(tl.where(cmask[None, :], psi, float("-inf")), 1))
        # before the first tile m = -inf and the sums are 0 (a may be 0, and 0 * -inf is NaN)
        first = m == float("-inf")
        rescale = tl.where(first, 0.0, tl.exp(a * tl.where(first, 0.0, m - m_new)))
        # a product after a subtraction: no a c - m rounding (or FMA contraction) when s is huge
        off = cmask[None, :] & ~is_target
        e = tl.where(off, tl.exp(a[:, None] * (cos - m_new[:, None])), 0.0)
        mass = mass * rescale + tl.sum(e, 1)
        mass_cos = mass_cos * rescale + tl.sum(e * cos, 1)
        m = m_new
    # t = a (m - psi_y) >= 0 is the target's distance below the max, exactly 0 when it is the max
    t = tl.where(has_target, a * (m - psi_target), 0.0)
    target_max = has_target & (t == 0.0)
    denom = mass + tl.where(has_target, tl.exp(-t), 0.0)  # sum_j exp(a (psi_j - m))
    # loss = lse - a psi_y = t + log(P + exp(-t)): log1p(P) when t = 0, else P >= 1 (the max is off
    # target): no cancellation either way
    log_sum = tl.where(target_max, log1p(mass), tl.log(denom))
    loss = tl.where(valid, tl.where(target_max, log_sum, t + log_sum), 0.0)
    # a label outside [0, C) that is not ignore_index (only possible through a direct op call)
    loss = tl.where(valid & ((y < 0) | (y >= C)), float("nan"), loss)
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(shift_ptr + rows, m, mask=rmask)
    tl.store(log_sum_ptr + rows, log_sum, mask=rmask)
    tl.store(mass_ptr + rows, mass / denom, mask=rmask)
    tl.store(mass_cos_ptr + rows, mass_cos / denom, mask=rmask)


@triton.jit
def _grad_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, y, inv_x, inv_w, a, shift, log_sum, ag, g_target, D,
               stride_xn, stride_xd, stride_wc, stride_wd,
               PREC: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """G_nj = dL/dc_nj for one tile (0 on padding and ignored rows, where ag = 0), with
    p_nj = exp(a (c_nj - m_n) - log_sum_n): exp(a c - lse) would carry the rounding of a c, thousands
    of units when s is 1e10 or more."""
    cos = _cosine_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, inv_x, inv_w, D, stride_xn, stride_xd, stride_wc,
                       stride_wd, PREC, DOT_DT, ACC, BLOCK_N, BLOCK_C, BLOCK_D)
    p = tl.exp(a[:, None] * (cos - shift[:, None]) - log_sum[:, None])
    grad = tl.where(cls[None, :] == y[:, None], g_target[:, None], ag[:, None] * p)
    return tl.where(cmask[None, :], grad, 0.0)


@triton.jit
def _load_rows(labels_ptr, x_norm_ptr, scale_ptr, shift_ptr, log_sum_ptr, ag_ptr, g_target_ptr, rows, rmask,
               BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    y = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    eps = tl.full([BLOCK_N], 1e-12, ACC)
    x_norm = tl.load(x_norm_ptr + rows, mask=rmask, other=1.0)
    inv_x = 1.0 / tl.where(x_norm < eps, eps, x_norm)
    a = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    shift = tl.load(shift_ptr + rows, mask=rmask, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=rmask, other=0.0)
    ag = tl.load(ag_ptr + rows, mask=rmask, other=0.0)
    g_target = tl.load(g_target_ptr + rows, mask=rmask, other=0.0)
    return y, inv_x, a, shift, log_sum, ag, g_target


@triton.autotune(configs=_BWD_CONFIGS, key=["C", "D"], reset_to_zero=["bx_ptr", "bw_ptr"],
                 prune_configs_by=_rows.by_dtype("x_ptr"))
@triton.jit
def _backward_rows_kernel(x_ptr, w_ptr, labels_ptr, x_norm_ptr, w_norm_ptr, scale_ptr, shift_ptr, log_sum_ptr, ag_ptr,
                          g_target_ptr, bx_ptr, bw_ptr, N, C, D, stride_xn, stride_xd, stride_wc, stride_wd,
                          NEED_X: tl.constexpr, NEED_W: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
                          IN_DT: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (row block, class group): sweeps the group's class tiles, adds G W^ into Bx and (with
    NEED_W, atomics only) G^T U into Bw. Without ATOMIC the grid has one group: Bx rows are owned."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    y, inv_x, a, shift, log_sum, ag, g_target = _load_rows(labels_ptr, x_norm_ptr, scale_ptr, shift_ptr, log_sum_ptr,
                                                           ag_ptr, g_target_ptr, rows, rmask, BLOCK_N, ACC)
    num_tiles = tl.cdiv(C, BLOCK_C)
    per_group = tl.cdiv(num_tiles, tl.num_programs(1))
    t_begin = tl.program_id(1) * per_group
    t_end = tl.minimum(t_begin + per_group, num_tiles)
    eps_c = tl.full([BLOCK_C], 1e-12, ACC)
    for t in range(t_begin, t_end):
        cls = t * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cls < C
        c64 = cls.to(tl.int64)
        w_norm = tl.load(w_norm_ptr + cls, mask=cmask, other=1.0)
        inv_w = 1.0 / tl.where(w_norm < eps_c, eps_c, w_norm)
        grad = _grad_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, y, inv_x, inv_w, a, shift, log_sum, ag, g_target, D,
                          stride_xn, stride_xd, stride_wc, stride_wd, PREC, DOT_DT, ACC, BLOCK_N, BLOCK_C, BLOCK_D)
        if NEED_X:
            gx = dot_operand(grad * inv_w[None, :], IN_DT, DOT_DT)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds[None, :] < D
                wt = tl.load(w_ptr + c64[:, None] * stride_wc + ds[None, :] * stride_wd, mask=cmask[:, None] & dmask,
                             other=0.0)
                part = tl.dot(gx, wt.to(DOT_DT), input_precision=PREC, out_dtype=ACC)
                out = bx_ptr + r64[:, None] * D + ds[None, :]
                omask = rmask[:, None] & dmask
                if ATOMIC:
                    tl.atomic_add(out, part, mask=omask, sem="relaxed")
                else:
                    tl.store(out, tl.load(out, mask=omask, other=0.0) + part, mask=omask)
            if not ATOMIC:
                # the next class tile reads these rows again, possibly through other threads
                tl.debug_barrier()
        if NEED_W:
            gw = dot_operand(tl.trans(grad * inv_x[:, None]), IN_DT, DOT_DT)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                dmask = ds[None, :] < D
                xt = tl.load(x_ptr + r64[:, None] * stride_xn + ds[None, :] * stride_xd, mask=rmask[:, None] & dmask,
                             other=0.0)
                part = tl.dot(gw, xt.to(DOT_DT), input_precision=PREC, out_dtype=ACC)
                tl.atomic_add(bw_ptr + c64[:, None] * D + ds[None, :], part, mask=cmask[:, None] & dmask,
                              sem="relaxed")


@triton.autotune(configs=_BWD_CONFIGS, key=["C", "D"], reset_to_zero=["bw_ptr"],
                 prune_configs_by=_rows.by_dtype("x_ptr"))
@triton.jit
def _backward_classes_kernel(x_ptr, w_ptr, labels_ptr, x_norm_ptr, w_norm_ptr, scale_ptr, shift_ptr, log_sum_ptr,
                             ag_ptr,
                             g_target_ptr, bw_ptr, N, C, D, stride_xn, stride_xd, stride_wc, stride_wd,
                             PREC: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (class block): owns its Bw rows and sweeps every row block in order (no atomics)."""
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    c64 = cls.to(tl.int64)
    eps_c = tl.full([BLOCK_C], 1e-12, ACC)
    w_norm = tl.load(w_norm_ptr + cls, mask=cmask, other=1.0)
    inv_w = 1.0 / tl.where(w_norm < eps_c, eps_c, w_norm)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        rmask = rows < N
        r64 = rows.to(tl.int64)
        y, inv_x, a, shift, log_sum, ag, g_target = _load_rows(labels_ptr, x_norm_ptr, scale_ptr, shift_ptr,
                                                               log_sum_ptr, ag_ptr, g_target_ptr, rows, rmask,
                                                               BLOCK_N, ACC)
        grad = _grad_tile(x_ptr, w_ptr, rows, cls, rmask, cmask, y, inv_x, inv_w, a, shift, log_sum, ag, g_target, D,
                          stride_xn, stride_xd, stride_wc, stride_wd, PREC, DOT_DT, ACC, BLOCK_N, BLOCK_C, BLOCK_D)
        gw = dot_operand(tl.trans(grad * inv_x[:, None]), IN_DT, DOT_DT)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds[None, :] < D
            xt = tl.load(x_ptr + r64[:, None] * stride_xn + ds[None, :] * stride_xd, mask=rmask[:, None] & dmask,
                         other=0.0)
            part = tl.dot(gw, xt.to(DOT_DT), input_precision=PREC, out_dtype=ACC)
            out = bw_ptr + c64[:, None] * D + ds[None, :]
            omask = cmask[:, None] & dmask
            tl.store(out, tl.load(out, mask=omask, other=0.0) + part, mask=omask)
        # the next row block reads these rows again, possibly through other threads
        tl.debug_barrier()


# ------------------------------------------------------------------------------------- host side
def _margin_params(kind, m1, m2, m3, sphere_lambda, easy_margin) -> MarginParams:
    return MarginParams(kind, kind, m1=m1, m2=m2, m3=m3, sphere_lambda=sphere_lambda, easy_margin=easy_margin)


def _scale_grad(x_norm: torch.Tensor, s: float, offset: float, temperature: float) -> torch.Tensor:
    """s g'(r) with g'(r) = sig sig(-z) / T as e / (1 + e)^2 / T, e = exp(-|z|): no 1 - sig rounding."""
    e = torch.exp(-((x_norm - offset) / temperature).abs())
    return (s / temperature) * e / (1.0 + e).square()


def _launch_meta(x: torch.Tensor) -> dict:
    return dict(PREC=_rows.dot_precision(x.dtype), DOT_DT=_rows.dot_dtype(x.dtype), ACC=_rows.tl_acc(x.dtype))


@torch.library.custom_op(f"{_NS}::cm_margin_forward", mutates_args=())
def cm_margin_forward(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, s: float, kind: str, m1: float,
                      m2: float, m3: float, sphere_lambda: float, easy_margin: bool, exact_grad: bool,
                      contraction: bool, norm_offset: float, norm_temperature: float, detach_norm: bool,
                      ignore_index: int, target: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_rows (N,), row_stats (6, N), w_norm (C,)), statistics in the accumulation dtype.
    kind "given": ``target`` (2, N) holds each row's phi(c_y) and phi'(c_y) (per-row margins)."""
    _check_target(kind, target, x)
    n, d = x.shape
    c = weight.shape[0]
    acc = _rows.acc_dtype(x.dtype)
    labels = labels.contiguous()
    stats = torch.empty((_NUM_STATS, n), dtype=acc, device=x.device)
    loss = torch.empty(n, dtype=acc, device=x.device)
    block_n, block_d = _rows.row_block(d, dtype=x.dtype)
    with _rows.on_device(x):
        w_norm = _rows.row_norms(weight)
        r = _rows.row_norms(x, out=stats[_R])
        xs, xs_norm = _rows.scaled_rows(x, r)
        _target_cos_kernel[(triton.cdiv(n, block_n),)](
            xs, weight, labels, w_norm, xs_norm, stats[_COS], n, c, d, ignore_index, xs.stride(0), xs.stride(1),
            weight.stride(0), weight.stride(1), BLOCK_N=block_n, BLOCK_D=block_d, ACC=_rows.tl_acc(x.dtype))
        scale = scale_of_norm(r, s, contraction, norm_offset, norm_temperature)
        psi_target = _target_phi(stats[_COS], kind, m1, m2, m3, sphere_lambda, easy_margin, target).contiguous()
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _forward_kernel[grid](xs, weight, labels, xs_norm, w_norm, scale, psi_target, loss, stats[_SHIFT],
                              stats[_LOG_SUM], stats[_MASS], stats[_MASS_COS], n, c, d, ignore_index, xs.stride(0),
                              xs.stride(1), weight.stride(0), weight.stride(1), **_launch_meta(x))
    return loss, stats, w_norm


@cm_margin_forward.register_fake
def _(x, weight, labels, *cfg):
    acc = _rows.acc_dtype(x.dtype)
    n = x.shape[0]
    return (x.new_empty((n,), dtype=acc), x.new_empty((_NUM_STATS, n), dtype=acc),
            x.new_empty((weight.shape[0],), dtype=acc))


@torch.library.custom_op(f"{_NS}::cm_margin_backward", mutates_args=())
def cm_margin_backward(grad_rows: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       row_stats: torch.Tensor, w_norm: torch.Tensor, s: float, kind: str, m1: float, m2: float,
                       m3: float, sphere_lambda: float, easy_margin: bool, exact_grad: bool, contraction: bool,
                       norm_offset: float, norm_temperature: float, detach_norm: bool, ignore_index: int,
                       target: Optional[torch.Tensor], need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); a gradient not asked for is an empty (0, d) tensor."""
    _check_target(kind, target, x)
    n, d = x.shape
    c = weight.shape[0]
    acc = _rows.acc_dtype(x.dtype)
    labels = labels.contiguous()
    empty = x.new_empty((0, d))
    if not (need_x or need_w):
        return empty, empty.clone()
    r, cos, shift, log_sum, mass, mass_cos = row_stats.unbind(0)
    # ignored rows: no gradient, whatever the upstream holds (a mean over no rows gives 0 * inf there);
    # nor rows whose label is out of range (their loss is NaN; the cuda backend does the same)
    valid = rows_with_target(labels, ignore_index, c)
    g = torch.where(valid, grad_rows.to(acc), torch.zeros((), dtype=acc, device=x.device))
    scale = scale_of_norm(r, s, contraction, norm_offset, norm_temperature)
    ag = (scale * g).contiguous()
    if target is not None:
        psi_target, dphi = target.to(acc).unbind(0)
    else:
        params = _margin_params(kind, m1, m2, m3, sphere_lambda, easy_margin)
        psi_target = phi(cos, params)
        dphi = phi_grad(cos, params, "exact" if exact_grad else "straight_through")
    g_target = (-ag * mass * dphi).contiguous()
    shift, log_sum = shift.contiguous(), log_sum.contiguous()
    meta = _launch_meta(x)
    meta["IN_DT"] = _rows.tl_dtype(x.dtype)
    deterministic = torch.are_deterministic_algorithms_enabled()
    dx, dw = empty, empty.clone()
    with _rows.on_device(x):
        # the GEMM operands of the forward (recomputed: O(N d), not saved)
        xs, xs_norm = _rows.scaled_rows(x, r)
        args = (xs, weight, labels, xs_norm, w_norm, scale, shift, log_sum, ag, g_target)
        strides = (xs.stride(0), xs.stride(1), weight.stride(0), weight.stride(1))
        bx = torch.zeros((n, d), dtype=acc, device=x.device) if need_x else r.new_empty((0,))
        bw = torch.zeros((c, d), dtype=acc, device=x.device) if need_w else r.new_empty((0,))
        if need_x or not deterministic:
            if deterministic:
                groups = lambda meta: 1  # noqa: E731
            else:
                def groups(meta):
                    row_blocks = triton.cdiv(n, meta["BLOCK_N"])
                    tiles = triton.cdiv(c, meta["BLOCK_C"])
                    return max(1, min(tiles, _rows.parallel_programs(x.device) // row_blocks))
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), groups(meta))  # noqa: E731
            _backward_rows_kernel[grid](*args, bx, bw, n, c, d, *strides, NEED_X=need_x,
                                        NEED_W=need_w and not deterministic, ATOMIC=not deterministic, **meta)
        if need_w and deterministic:
            grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]),)  # noqa: E731
            _backward_classes_kernel[grid](*args, bw, n, c, d, *strides, **meta)
    if need_x:
        radial = None
        if contraction and not detach_norm:
            # s g'(r) R_n, R_n = g_n (sum_j p psi - psi_y) = g_n (S_n - P_n phi(c_n))
            radial = _scale_grad(r, s, norm_offset, norm_temperature) * g * (mass_cos - mass * psi_target)
            radial = radial.contiguous()
        dx = _rows.project_rows(bx, x, r.contiguous(), radial)
    if need_w:
        dw = _rows.project_rows(bw, weight, w_norm)
    return dx, dw


@cm_margin_backward.register_fake
def _(grad_rows, x, weight, labels, row_stats, w_norm, *cfg_and_needs):
    need_x, need_w = cfg_and_needs[-2:]
    empty = x.new_empty((0, x.shape[1]))
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else empty
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else empty.clone()
    return dx, dw


def _check_target(kind: str, target, x: torch.Tensor) -> None:
    """A (2, N) target on x's device for kind "given", none otherwise (the C++ driver's checks)."""
    n = x.shape[0]
    if kind != "given":
        if target is not None:
            raise ValueError(f"cm_margin: a target is read by margin kind 'given' only, got kind {kind!r}")
        return
    if target is None:
        raise ValueError("cm_margin: margin kind 'given' needs the (2, N) target of per-row phi and phi'")
    if target.shape != (2, n) or target.device != x.device or not target.dtype.is_floating_point:
        raise ValueError(f"cm_margin: target must be a floating (2, {n}) tensor on {x.device}, got "
                         f"{tuple(target.shape)} {target.dtype} on {target.device}")


def _target_phi(cos, kind, m1, m2, m3, sphere_lambda, easy_margin, target):
    """The target's psi = phi(c_y) per row: the given row 0 of ``target``, or the margin formula."""
    if kind == "given":
        return target[0].to(cos.dtype)
    return phi(cos, _margin_params(kind, m1, m2, m3, sphere_lambda, easy_margin))


def _setup_context(ctx, inputs, output):
    x, weight, labels, *cfg = inputs
    _, row_stats, w_norm = output
    ctx.mark_non_differentiable(row_stats, w_norm)
    ctx.save_for_backward(x, weight, labels, row_stats, w_norm)
    ctx.cfg = cfg


def _backward(ctx, grad_rows, _grad_stats, _grad_w_norm):
    no_double_backward("cm_margin_loss")
    x, weight, labels, row_stats, w_norm = ctx.saved_tensors
    need_x, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if grad_rows is None:
        grad_rows = torch.zeros_like(row_stats[0])
    dx, dw = torch.ops.idid_triton.cm_margin_backward(grad_rows, x, weight, labels, row_stats, w_norm, *ctx.cfg,
                                                      need_x, need_w)
    d_target = None
    if ctx.needs_input_grad[-1]:  # kind "given": d loss / d phi_n = grad_n a_n (p_ny - 1) = -a_n grad_n P_n
        s, contraction, offset, temperature, ignore_index = ctx.cfg[0], ctx.cfg[8], ctx.cfg[9], ctx.cfg[10], ctx.cfg[12]
        r, mass = row_stats[_R], row_stats[_MASS]
        valid = rows_with_target(labels, ignore_index, weight.shape[0])
        g = torch.where(valid, grad_rows.to(r.dtype), torch.zeros((), dtype=r.dtype, device=r.device))
        d_phi = -scale_of_norm(r, s, contraction, offset, temperature) * g * mass
        d_target = torch.stack((d_phi, torch.zeros_like(d_phi)))
    return (dx if need_x else None, dw if need_w else None, None) + (None,) * (len(ctx.cfg) - 1) + (d_target,)


# At the per-device autograd keys, through the torch.func-capable registration (idid_kernels/_autograd.py).
register_autograd(f"{_NS}::cm_margin_forward", _backward, setup_context=_setup_context,
                  public_name="cm_margin_loss", keys=DEVICE_AUTOGRAD_KEYS)
register_no_double_backward(f"{_NS}::cm_margin_backward", "cm_margin_loss", keys=DEVICE_AUTOGRAD_KEYS)


def config_args(params: MarginParams, *, s, contraction, norm_offset, norm_temperature, detach_norm, margin_grad,
                ignore_index, target=None) -> tuple:
    """The ops' trailing arguments, in schema order (``target``: kind "given" only)."""
    return (float(s), params.kind, float(params.m1), float(params.m2), float(params.m3), float(params.sphere_lambda),
            bool(params.easy_margin), margin_grad == "exact", contraction == "sigmoid", float(norm_offset),
            float(norm_temperature), bool(detach_norm), int(ignore_index), target)


def cm_margin_loss(x, weight, labels, params: MarginParams, *, s, contraction, norm_offset, norm_temperature,
                   detach_norm, margin_grad, class_weight, ignore_index, reduction):
    """The loss through the Triton ops; arguments already validated by ``functional``.

    The class weights and the reduction act on (N,) vectors here, as in the cpp path
    (``ops/cm_margin.py``): loss = sum_n w_n loss_n (/ sum_n w_n for "mean"), w_n = class_weight[y_n]
    and 0 on ignored rows, exactly ``F.cross_entropy``'s semantics (a mean over no weight is NaN).
    """
    _rows.check_dtype("cm_margin_loss", x=x, weight=weight)
    target = None
    if params.per_row:  # each row's phi and phi' on (N,) vectors, as the cpp path (ops/cm_margin.py)
        target = row_target(x, weight, labels, params, margin_grad, ignore_index)
        params = GIVEN
    cfg = config_args(params, s=s, contraction=contraction, norm_offset=norm_offset,
                      norm_temperature=norm_temperature, detach_norm=detach_norm, margin_grad=margin_grad,
                      ignore_index=ignore_index, target=target)
    loss_rows, _, _ = torch.ops.idid_triton.cm_margin_forward(x, weight, labels, *cfg)
    acc = loss_rows.dtype
    valid = labels != ignore_index
    # a label out of range (possible when functional's check is skipped) must not index class_weight:
    # its row's loss is NaN whatever its weight
    safe = torch.where(valid & (labels >= 0) & (labels < weight.shape[0]), labels, torch.zeros_like(labels))
    w_rows = (torch.ones(labels.shape, dtype=acc, device=x.device) if class_weight is None
              else class_weight.to(acc)[safe])
    w_rows = torch.where(valid, w_rows, torch.zeros_like(w_rows))
    weighted = loss_rows * w_rows
    if reduction == "none":
        return weighted.to(x.dtype)
    total = weighted.sum()
    return (total / w_rows.sum() if reduction == "mean" else total).to(x.dtype)
