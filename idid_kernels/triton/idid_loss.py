"""Fused Triton kernels of the IDID-R1 loss (spec/idid.md; oracle: reference/idid.py, analytic
backward: reference/grads.py ``idid_backward``), registered as the torch.library ops
``idid_kernels::triton_idid_loss_forward`` / ``triton_idid_loss_backward`` with fake kernels and
autograd, so the loss works under ``torch.compile(fullgraph=True)``.

Notation: u_i = x_i / ||x_i||, v_c = w_c / ||w_c||, z_ic = alpha <u_i, v_c>, rows bucketed by label
(see :mod:`._idid_common`), a_i the sample weight, r the teacher, q the student (spec/idid.md).

Forward (8 launches after the sort; no (B, C) or (B, B) matrix is ever stored):
  1. row norms of x and of the proxies;
  2. K_B, K_2 (classes with >= 1 and >= 2 rows) from the class offsets;
  3. teacher log r_kc = Phi_kc - logsumexp_{c' != k} Phi_kc', Phi = (Theta + Theta^T) / 2 (C x C,
     diagonal stored as 0), with distillation;
  4. the push/distillation pass: each program owns BLOCK_M rows and streams the class tiles, the
     tile of cosines from ``tl.dot`` over feature chunks, keeping per-row online statistics only:
     L_i = logsumexp_{c != y_i} z_ic, lse^tau_i = logsumexp_{c != y_i} z_ic / tau, the target logit
     and sum_c r (log r - z / tau). Then lse_i = logaddexp(L_i, z_iy), ce_i = softplus(L_i - z_iy)
     (no cancellation when the target dominates) and kd_i = sum_c r (log r - z / tau) + lse^tau_i;
  5. the diversity pass: per row the sum of kappa over its same-class partners;
  6. one program sums L_IC = sum_i a_i (ce_i + kd_i) and L_ID = sum_i rowsum_i / (K_2 n_i (n_i - 1))
     in a fixed order and forms lambda = L_IC / (L_ID + eps) (0 if K_2 = 0) and the loss.
  Saved: per-row statistics (sorted order), the norms, log r, the row layout.

Backward (grad_ic, grad_id: the upstream coefficients of L_IC and L_ID, device scalars), recomputing
each logits tile from x and the proxies:
  - rows pass, grid (row blocks, feature chunks): G_ic = grad_ic a_i [p_ic - Y_ic + (q_ic - r_ic)/tau]
    per tile (p_iy - 1 as -exp(L_i - lse_i)), dU += alpha G V; then the diversity pull
    dU_i += grad_id 2t / (K_2 n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j; each program owns
    its rows, so dU needs no reduction;
  - columns pass, grid (class tiles, feature chunks, row splits): dV += alpha G^T U over the split's
    rows. With one split it is a plain store; with several, the default adds the splits with
    relaxed ``tl.atomic_add`` (only the next launch reads dV, so no ordering is needed) and
    ``torch.use_deterministic_algorithms(True)`` writes one partial buffer per split, summed in a
    fixed order by the normalisation pass (bitwise reproducible);
  - F.normalize backward for x and the proxies;
  - dTheta without atomics: since a_i is constant within a class,
        dPhi_kc = grad_ic r_kc [A_k log r_kc - (alpha / tau) <M_k, v_c> + B'_k],   c != k,
    with per-class sums A_k = sum_{y_i = k} a_i, B'_k = sum a_i (lse^tau_i - kd_i) and
    M_k = sum a_i u_i (a segmented pass over the sorted rows), and dTheta = (dPhi + dPhi^T) / 2 is
    formed tile by tile from two (C x C x d) products: no per-row scatter into a C x C matrix.

Precision: float32 accumulation (float64 for float64 inputs); float32 dots are exact-precision
(``input_precision="ieee"``) unless ``IDID_KERNELS_TRITON_TF32=1``. bf16/fp16 inputs feed the tensor
cores directly and produce gradients in the input dtype.

Determinism: the forward pass and dx, dTheta use no atomics and fixed reduction orders; only dW's
cross-split sum uses atomics, and not under ``torch.use_deterministic_algorithms(True)``.

Grids are one-dimensional: the (row block, feature chunk), (class tile, feature chunk, split) and
(class tile, class tile) grids are folded onto axis 0 (2^31 - 1 programs), since axes 1 and 2 stop
at 65,535 (reached at d > ~2M with 32-wide chunks).

Labels out of range (reachable only when functional's label check is skipped: torch.compile, graph
capture, ``IDID_KERNELS_CHECK_LABELS=0``): never used as an index; loss, L_IC, L_ID and lambda are
NaN, and so is every element of dx, dproxies and dsimilarity (:mod:`._idid_common`, "Labels out of
range").

No host synchronisation: counts, K_B, K_2, lambda and the loop bounds stay on the device, and every
launch size depends on (B, C, d) only, so the op can be captured in a CUDA graph once the autotuner
has run (call it once before capturing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import DEVICE_AUTOGRAD_KEYS, register_autograd, register_no_double_backward
from . import _rows
from ..reference.idid import IDIDTerms
from ._idid_common import (
    BF16_DOT_AS_F32, INTERPRET, acc_dtype, accumulate_pull, bad_labels, bucket_rows, by_dtype, check_dtype, configs, dot_precision,
    dot_rows, log_add_exp, no_double_backward, normalize_backward, pair_row_sums, pick, row_norms, scaled_rows,
    softplus, split_f64, tl_acc,
)

_FWD = "idid_kernels::triton_idid_loss_forward"
_BWD = "idid_kernels::triton_idid_loss_backward"

# Rows of the saved per-row statistics (sorted order), (ROW_STATS, B).
A, LSE, LNT, LSE_T, KD, CE, PAIR_SUM, DIV_COEF = range(8)
ROW_STATS = 8

_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_GRAD_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D")
_HALF = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _class_stats_kernel(offs_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """out = (K_B, K_2): classes with at least one / two rows."""
    kb = tl.full((BLOCK,), 0, tl.int64)
    k2 = tl.full((BLOCK,), 0, tl.int64)
    for c0 in range(0, C, BLOCK):
        cs = c0 + tl.arange(0, BLOCK)
        m = cs < C
        n = tl.load(offs_ptr + cs + 1, mask=m, other=0) - tl.load(offs_ptr + cs, mask=m, other=0)
        kb += (n >= 1).to(tl.int64)
        k2 += (n >= 2).to(tl.int64)
    tl.store(out_ptr, tl.sum(kb, axis=0))
    tl.store(out_ptr + 1, tl.sum(k2, axis=0))


@triton.jit
def _teacher_kernel(th_ptr, lr_ptr, C, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows k of log r: Phi_kc - logsumexp_{c' != k} Phi_kc', Phi = (Theta + Theta^T) / 2; 0 at c = k."""
    ks = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    km = ks < C
    mv = tl.full((BLOCK_R, BLOCK_C), -1.0e30, ACC)   # per-lane online logsumexp
    sv = tl.full((BLOCK_R, BLOCK_C), 0, ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        inb = km[:, None] & (cs < C)[None, :]
        valid = inb & (cs[None, :] != ks[:, None])
        phi = 0.5 * (tl.load(th_ptr + ks[:, None] * C + cs[None, :], mask=inb, other=0.0).to(ACC)
                     + tl.load(th_ptr + cs.to(tl.int64)[None, :] * C + ks[:, None], mask=inb, other=0.0).to(ACC))
        m_new = tl.maximum(mv, tl.where(valid, phi, -1.0e30))
        sv = sv * tl.exp(mv - m_new) + tl.where(valid, tl.exp(tl.where(valid, phi, m_new) - m_new), 0.0)
        mv = m_new
    hi = tl.max(mv, axis=1)
    lse = hi + tl.log(tl.where(km, tl.sum(sv * tl.exp(mv - hi[:, None]), axis=1), 1.0))
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        inb = km[:, None] & (cs < C)[None, :]
        phi = 0.5 * (tl.load(th_ptr + ks[:, None] * C + cs[None, :], mask=inb, other=0.0).to(ACC)
                     + tl.load(th_ptr + cs.to(tl.int64)[None, :] * C + ks[:, None], mask=inb, other=0.0).to(ACC))
        tl.store(lr_ptr + ks[:, None] * C + cs[None, :], tl.where(cs[None, :] != ks[:, None], phi - lse[:, None], 0.0),
                 mask=inb)


# Autotune configs per input dtype (_rows.per_dtype), none of which spills registers on sm_90 or
# sm_80 (`python -m idid_kernels compile-check`): bf16/fp16 tiles go to the tensor cores; float32
# (exact products: FMA) and float64 (two registers an element) hold smaller tiles in 255 registers.
_IC_FORWARD_CONFIGS = configs({
    _HALF: [(64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 128, 32, 8, 3), (128, 64, 64, 8, 3), (32, 64, 64, 4, 3)],
    torch.float32: [(64, 64, 32, 8, 3), (64, 64, 16, 8, 3), (32, 32, 16, 4, 3)],
    torch.float64: [(64, 32, 32, 8, 3), (32, 64, 32, 8, 3), (64, 32, 16, 8, 3), (32, 32, 32, 4, 3), (32, 32, 16, 4, 3)],
}, (8, 8, 32, 1, 1), _TILE_NAMES)


@triton.autotune(configs=_IC_FORWARD_CONFIGS, key=["C", "D"], prune_configs_by=by_dtype("x_ptr"))
@triton.jit
def _ic_forward_kernel(x_ptr, w_ptr, xn_ptr, wn_ptr, lay_ptr, offs_ptr, cls_ptr, lr_ptr, rs_ptr, B, C, D,
                       alpha_hi, alpha_mid, alpha_lo, itau_hi, itau_mid, itau_lo, DISTILL: tl.constexpr,
                       UNIT_TAU: tl.constexpr, BALANCED: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row statistics of the push and distillation terms (module docstring, forward step 4)."""
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_mid, ACC) + tl.cast(alpha_lo, ACC)  # split_f64 parts
    inv_tau = tl.cast(itau_hi, ACC) + tl.cast(itau_mid, ACC) + tl.cast(itau_lo, ACC)  # split_f64 parts
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    Bv = tl.load(offs_ptr + C)
    rmask = rows < Bv
    src = tl.load(lay_ptr + rows, mask=rmask, other=0)
    y = tl.load(lay_ptr + B + rows, mask=rmask, other=0)
    xn = tl.load(xn_ptr + src, mask=rmask, other=1.0)
    zscale = alpha * (1.0 / tl.where(xn < 1e-12, 1e-12, xn))

    m_nt = tl.full((BLOCK_M,), -1.0e30, ACC)   # running max / sum of exp over the non-targets of z
    s_nt = tl.full((BLOCK_M,), 0, ACC)
    m_t = tl.full((BLOCK_M,), -1.0e30, ACC)    # the same for z / tau (tau != 1)
    s_t = tl.full((BLOCK_M,), 0, ACC)
    z_y = tl.full((BLOCK_M,), 0, ACC)
    kd_sum = tl.full((BLOCK_M,), 0, ACC)   # sum_{c != y} r (log r - z / tau)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        s = dot_rows(x_ptr, src, rmask, w_ptr, cols, cmask, D, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        wn = tl.load(wn_ptr + cols, mask=cmask, other=1.0)
        inw = 1.0 / tl.where(wn < 1e-12, 1e-12, wn)
        z = s * zscale[:, None] * inw[None, :]
        is_t = cols[None, :] == y[:, None]
        nt = cmask[None, :] & (cols[None, :] != y[:, None])
        z_y += tl.sum(tl.where(is_t, z, 0.0), axis=1)
        m_new = tl.maximum(m_nt, tl.max(tl.where(nt, z, -1.0e30), axis=1))
        s_nt = s_nt * tl.exp(m_nt - m_new) + tl.sum(tl.where(nt, tl.exp(tl.where(nt, z, 0.0) - m_new[:, None]), 0.0),
                                                     axis=1)
        m_nt = m_new
        if DISTILL:
            zt = z * inv_tau
            if not UNIT_TAU:
                mt_new = tl.maximum(m_t, tl.max(tl.where(nt, zt, -1.0e30), axis=1))
                s_t = s_t * tl.exp(m_t - mt_new) + tl.sum(
                    tl.where(nt, tl.exp(tl.where(nt, zt, 0.0) - mt_new[:, None]), 0.0), axis=1)
                m_t = mt_new
            lr = tl.load(lr_ptr + y[:, None] * C + cols[None, :], mask=nt & rmask[:, None], other=0.0)
            kd_sum += tl.sum(tl.where(nt, tl.exp(lr) * (lr - zt), 0.0), axis=1)

    lnt = m_nt + tl.log(s_nt)
    lse = log_add_exp(lnt, z_y)
    ce = softplus(lnt - z_y)
    if DISTILL and not UNIT_TAU:
        lse_t = m_t + tl.log(s_t)
    else:
        lse_t = lnt  # tau = 1, or unused without distillation
    if DISTILL:
        kd = kd_sum + lse_t
    else:
        kd = tl.full((BLOCK_M,), 0, ACC)
    n = (tl.load(offs_ptr + y + 1, mask=rmask, other=1) - tl.load(offs_ptr + y, mask=rmask, other=0)).to(ACC)
    if BALANCED:
        a = 1.0 / (tl.maximum(tl.load(cls_ptr), 1).to(ACC) * n)
    else:
        a = 1.0 / tl.maximum(Bv, 1).to(ACC) + tl.full((BLOCK_M,), 0, ACC)
    k2 = tl.maximum(tl.load(cls_ptr + 1), 1).to(ACC)
    div_coef = tl.where(n >= 2, 1.0 / (k2 * n * tl.maximum(n - 1.0, 1.0)), 0.0)

    inb = rows < B
    zero = tl.full((BLOCK_M,), 0, ACC)
    tl.store(rs_ptr + 0 * B + rows, tl.where(rmask, a, 0.0), mask=inb)
    tl.store(rs_ptr + 1 * B + rows, tl.where(rmask, lse, 0.0), mask=inb)
    tl.store(rs_ptr + 2 * B + rows, tl.where(rmask, lnt, 0.0), mask=inb)
    tl.store(rs_ptr + 3 * B + rows, tl.where(rmask, lse_t, 0.0), mask=inb)
    tl.store(rs_ptr + 4 * B + rows, tl.where(rmask, kd, 0.0), mask=inb)
    tl.store(rs_ptr + 5 * B + rows, tl.where(rmask, ce, 0.0), mask=inb)
    tl.store(rs_ptr + 6 * B + rows, zero, mask=inb)
    tl.store(rs_ptr + 7 * B + rows, tl.where(rmask, div_coef, 0.0), mask=inb)


@triton.jit
def _finalize_kernel(rs_ptr, offs_ptr, cls_ptr, lay_ptr, loss_ptr, lic_ptr, lid_ptr, lam_ptr, B, C, eps_hi, eps_mid,
                     eps_lo, dw_hi, dw_mid, dw_lo, DIVERSITY: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr):
    """One program: L_IC, L_ID, lambda and the loss, summed over the rows in a fixed order; all four
    NaN when a label is out of range."""
    Bv = tl.load(offs_ptr + C)
    l_ic = tl.full((BLOCK,), 0, ACC)
    l_id = tl.full((BLOCK,), 0, ACC)
    for r0 in range(0, Bv, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        m = rows < Bv
        a = tl.load(rs_ptr + 0 * B + rows, mask=m, other=0.0)
        kd = tl.load(rs_ptr + 4 * B + rows, mask=m, other=0.0)
        ce = tl.load(rs_ptr + 5 * B + rows, mask=m, other=0.0)
        l_ic += a * (ce + kd)
        if DIVERSITY:
            l_id += tl.load(rs_ptr + 6 * B + rows, mask=m, other=0.0) * tl.load(rs_ptr + 7 * B + rows, mask=m,
                                                                                 other=0.0)
    ic = tl.sum(l_ic, axis=0)
    idv = tl.sum(l_id, axis=0)
    if DIVERSITY:
        if ADAPTIVE:
            eps = tl.cast(eps_hi, ACC) + tl.cast(eps_mid, ACC) + tl.cast(eps_lo, ACC)
            lam = tl.where(tl.load(cls_ptr + 1) > 0, ic / (idv + eps), 0.0)
        else:
            lam = tl.cast(dw_hi, ACC) + tl.cast(dw_mid, ACC) + tl.cast(dw_lo, ACC) + 0.0 * ic
    else:
        lam = 0.0 * ic
    loss = ic + lam * idv
    bad = bad_labels(lay_ptr, B, C)
    loss = tl.where(bad, float("nan"), loss)
    ic = tl.where(bad, float("nan"), ic)
    idv = tl.where(bad, float("nan"), idv)
    lam = tl.where(bad, float("nan"), lam)
    out_t = loss_ptr.dtype.element_ty
    tl.store(loss_ptr, loss.to(out_t))
    tl.store(lic_ptr, ic.to(out_t))
    tl.store(lid_ptr, idv.to(out_t))
    tl.store(lam_ptr, lam.to(out_t))


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ic_logit_grad(z, y, cols, cmask, rmask, lse, lnt, lse_t, lr_ptr, C, inv_tau, DISTILL: tl.constexpr):
    """dL_IC/dz_ic / a_i on one tile: p - Y + (q - r) / tau (0 on padded rows and columns). The
    target column p_iy - 1 = -(sum of the other p) = -exp(L_i - lse_i), without cancellation."""
    is_t = cols[None, :] == y[:, None]
    nt = cmask[None, :] & (cols[None, :] != y[:, None]) & rmask[:, None]
    g = tl.where(nt, tl.exp(tl.where(nt, z, 0.0) - lse[:, None]), 0.0)
    g = tl.where(is_t & rmask[:, None], -tl.exp(lnt - lse)[:, None], g)
    if DISTILL:
        q = tl.exp(tl.where(nt, z * inv_tau - lse_t[:, None], 0.0))
        lr = tl.load(lr_ptr + y[:, None] * C + cols[None, :], mask=nt, other=0.0)
        g += tl.where(nt, (q - tl.exp(lr)) * inv_tau, 0.0)
    return g


# BLOCK_D is the feature chunk of dU each program owns: the logits tile is recomputed once per chunk,
# so wide chunks trade registers for fewer recomputations (configs that do not fit are skipped).
_GRAD_ROWS_CONFIGS = configs({
    _HALF: [(64, 64, 32, 64, 8, 2), (64, 64, 32, 128, 8, 2), (64, 32, 64, 128, 8, 2), (32, 64, 32, 256, 8, 2),
            (64, 32, 32, 256, 8, 2), (32, 32, 32, 256, 8, 2)],
    torch.float32: [(32, 32, 32, 128, 8, 2), (64, 32, 32, 64, 8, 2), (32, 32, 16, 128, 4, 2), (64, 64, 16, 32, 8, 2),
                    (32, 64, 16, 64, 8, 2)],
    torch.float64: [(32, 32, 32, 64, 8, 2), (32, 32, 32, 32, 8, 2), (16, 32, 16, 64, 8, 2), (32, 32, 16, 64, 8, 2)],
}, (8, 8, 32, 32, 1, 1), _GRAD_NAMES)


@triton.autotune(configs=_GRAD_ROWS_CONFIGS, key=["C", "D"], prune_configs_by=by_dtype("x_ptr"))
@triton.jit
def _grad_rows_kernel(x_ptr, w_ptr, xn_ptr, wn_ptr, lay_ptr, offs_ptr, rs_ptr, lr_ptr, gic_ptr, gid_ptr, du_ptr,
                      B, C, D, alpha_hi, alpha_mid, alpha_lo, itau_hi, itau_mid, itau_lo, t_hi, t_mid, t_lo,
                      DISTILL: tl.constexpr, DIVERSITY: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/du_i[dcols] = alpha sum_c G_ic v_c + grad_id coef_i sum_j kappa_ij u_j, written in batch row
    order (0 for ignored rows)."""
    DT = x_ptr.dtype.element_ty
    if BF16_DOT_AS_F32 and DT == tl.bfloat16:
        DT = tl.float32
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_mid, ACC) + tl.cast(alpha_lo, ACC)  # split_f64 parts
    inv_tau = tl.cast(itau_hi, ACC) + tl.cast(itau_mid, ACC) + tl.cast(itau_lo, ACC)  # split_f64 parts
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
    a = tl.load(rs_ptr + 0 * B + rows, mask=rmask, other=0.0)
    lse = tl.load(rs_ptr + 1 * B + rows, mask=rmask, other=0.0)
    lnt = tl.load(rs_ptr + 2 * B + rows, mask=rmask, other=0.0)
    lse_t = tl.load(rs_ptr + 3 * B + rows, mask=rmask, other=0.0)
    gscale = alpha * tl.load(gic_ptr).to(ACC) * a
    acc = tl.full((BLOCK_M, BLOCK_D), 0, ACC)
    for c0 in range(0, C, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        cmask = cols < C
        wn = tl.load(wn_ptr + cols, mask=cmask, other=1.0)
        inw = 1.0 / tl.where(wn < 1e-12, 1e-12, wn)
        s = dot_rows(x_ptr, src, rmask, w_ptr, cols, cmask, D, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        z = s * (alpha * inx)[:, None] * inw[None, :]
        g = _ic_logit_grad(z, y, cols, cmask, rmask, lse, lnt, lse_t, lr_ptr, C, inv_tau, DISTILL) * gscale[:, None]
        wv = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                     other=0.0)
        v = wv.to(ACC) * inw[:, None]
        acc = tl.dot(g.to(DT), v.to(DT), acc, input_precision=DOT_PREC)
    if DIVERSITY:
        coef = 2.0 * t * tl.load(gid_ptr).to(ACC) * tl.load(rs_ptr + 7 * B + rows, mask=rmask, other=0.0)
        acc = accumulate_pull(acc, x_ptr, xn_ptr, lay_ptr, offs_ptr, r0, rows, rmask, src, y, inx, coef, dcols, dmask,
                              B, Bv, D, t, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.where(bad_labels(lay_ptr, B, C), float("nan"), acc)
    tl.store(du_ptr + src.to(tl.int64)[:, None] * D + dcols[None, :], acc, mask=inb[:, None] & dmask[None, :])


_GRAD_COLS_CONFIGS = configs({
    _HALF: [(64, 64, 32, 64, 8, 2), (64, 64, 32, 128, 8, 2), (32, 64, 64, 128, 8, 2), (64, 32, 64, 128, 8, 2),
            (32, 32, 32, 512, 8, 2)],
    torch.float32: [(64, 64, 16, 32, 8, 2), (64, 32, 32, 64, 8, 2), (32, 32, 32, 128, 8, 2), (32, 32, 16, 128, 8, 2)],
    torch.float64: [(32, 32, 32, 64, 8, 2), (16, 32, 16, 64, 8, 2)],
}, (8, 8, 32, 32, 1, 1), _GRAD_NAMES)


@triton.autotune(configs=_GRAD_COLS_CONFIGS, key=["C", "D"], reset_to_zero=["dv_ptr"],
                 prune_configs_by=by_dtype("x_ptr"))
@triton.jit
def _grad_cols_kernel(x_ptr, w_ptr, xn_ptr, wn_ptr, lay_ptr, offs_ptr, rs_ptr, lr_ptr, gic_ptr, dv_ptr, B, C, D,
                      rows_per_split, alpha_hi, alpha_mid, alpha_lo, itau_hi, itau_mid, itau_lo, DISTILL: tl.constexpr,
                      ATOMIC: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """dL/dv_c[dcols] = alpha sum_i G_ic u_i over the rows of one split: added into dv
    (ATOMIC) or stored to the split's own (C, D) slice of dv."""
    DT = x_ptr.dtype.element_ty
    if BF16_DOT_AS_F32 and DT == tl.bfloat16:
        DT = tl.float32
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_mid, ACC) + tl.cast(alpha_lo, ACC)  # split_f64 parts
    inv_tau = tl.cast(itau_hi, ACC) + tl.cast(itau_mid, ACC) + tl.cast(itau_lo, ACC)  # split_f64 parts
    # (class tile, feature chunk, split) folded onto axis 0, class tiles fastest
    pid = tl.program_id(0)
    class_tiles = tl.cdiv(C, BLOCK_N)
    chunks = tl.cdiv(D, BLOCK_D)
    cols = (pid % class_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    dcols = ((pid // class_tiles) % chunks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    split = pid // (class_tiles * chunks)
    wn = tl.load(wn_ptr + cols, mask=cmask, other=1.0)
    inw = 1.0 / tl.where(wn < 1e-12, 1e-12, wn)
    Bv = tl.load(offs_ptr + C)
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, Bv)
    gi = alpha * tl.load(gic_ptr).to(ACC)
    acc = tl.full((BLOCK_N, BLOCK_D), 0, ACC)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < r_end
        src = tl.load(lay_ptr + rows, mask=rmask, other=0)
        y = tl.load(lay_ptr + B + rows, mask=rmask, other=0)
        xn = tl.load(xn_ptr + src, mask=rmask, other=1.0)
        inx = 1.0 / tl.where(xn < 1e-12, 1e-12, xn)
        a = tl.load(rs_ptr + 0 * B + rows, mask=rmask, other=0.0)
        lse = tl.load(rs_ptr + 1 * B + rows, mask=rmask, other=0.0)
        lnt = tl.load(rs_ptr + 2 * B + rows, mask=rmask, other=0.0)
        lse_t = tl.load(rs_ptr + 3 * B + rows, mask=rmask, other=0.0)
        s = dot_rows(x_ptr, src, rmask, w_ptr, cols, cmask, D, ACC, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        z = s * (alpha * inx)[:, None] * inw[None, :]
        g = _ic_logit_grad(z, y, cols, cmask, rmask, lse, lnt, lse_t, lr_ptr, C, inv_tau, DISTILL) * (gi * a)[:, None]
        xv = tl.load(x_ptr + src.to(tl.int64)[:, None] * D + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        u = xv.to(ACC) * inx[:, None]
        acc = tl.dot(tl.trans(g).to(DT), u.to(DT), acc, input_precision=DOT_PREC)
    acc = tl.where(bad_labels(lay_ptr, B, C), float("nan"), acc)
    out = cols.to(tl.int64)[:, None] * D + dcols[None, :]
    omask = cmask[:, None] & dmask[None, :]
    if ATOMIC:
        tl.atomic_add(dv_ptr + out, acc, mask=omask, sem="relaxed")
    else:
        tl.store(dv_ptr + split.to(tl.int64) * C * D + out, acc, mask=omask)


@triton.jit
def _class_sums_kernel(x_ptr, xn_ptr, lay_ptr, offs_ptr, rs_ptr, m_ptr, ab_ptr, B, C, D, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Class k: M_k = sum_{y_i = k} a_i u_i, A_k = sum a_i and B'_k = sum a_i (lse^tau_i - kd_i), over the
    class's rows in sorted (batch) order."""
    k = tl.program_id(0).to(tl.int64)
    start = tl.load(offs_ptr + k)
    end = tl.load(offs_ptr + k + 1)
    a_sum = tl.full((BLOCK_M,), 0, ACC)
    b_sum = tl.full((BLOCK_M,), 0, ACC)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rm = rows < end
        a = tl.load(rs_ptr + 0 * B + rows, mask=rm, other=0.0)
        a_sum += a
        b_sum += a * (tl.load(rs_ptr + 3 * B + rows, mask=rm, other=0.0) - tl.load(rs_ptr + 4 * B + rows, mask=rm,
                                                                                  other=0.0))
    tl.store(ab_ptr + k, tl.sum(a_sum, axis=0))
    tl.store(ab_ptr + C + k, tl.sum(b_sum, axis=0))
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        dmask = dcols < D
        mk = tl.full((BLOCK_D,), 0, ACC)
        for r0 in range(start, end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            rm = rows < end
            src = tl.load(lay_ptr + rows, mask=rm, other=0)
            a = tl.load(rs_ptr + 0 * B + rows, mask=rm, other=0.0)
            xv = tl.load(x_ptr + src[:, None] * D + dcols[None, :], mask=rm[:, None] & dmask[None, :], other=0.0)
            xn = tl.load(xn_ptr + src, mask=rm, other=1.0)
            inx = 1.0 / tl.where(xn < 1e-12, 1e-12, xn)
            mk += tl.sum(xv.to(ACC) * (a * inx)[:, None], axis=0)
        tl.store(m_ptr + k * D + dcols, mk, mask=dmask)


@triton.jit
def _dtheta_kernel(m_ptr, ab_ptr, w_ptr, wn_ptr, lr_ptr, gic_ptr, lay_ptr, out_ptr, B, C, D, alpha_hi, alpha_mid,
                   alpha_lo, itau_hi, itau_mid, itau_lo, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """dTheta tile (K, Cc) = (f(k, c) + f(c, k)) / 2, f(k, c) = grad_ic r_kc [A_k log r_kc
    - (alpha / tau) <M_k, v_c> + B'_k] for c != k (module docstring); NaN when a label is out of range."""
    pid = tl.program_id(0)  # (row tile, column tile) folded onto axis 0
    tiles = tl.cdiv(C, BLOCK_T)
    ks = (pid % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = (pid // tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    km = ks < C
    cm = cs < C
    mw = tl.full((BLOCK_T, BLOCK_T), 0, ACC)   # <M_k, w_c>
    wm = tl.full((BLOCK_T, BLOCK_T), 0, ACC)   # <w_k, M_c>
    for k0 in range(0, D, BLOCK_K):
        f = k0 + tl.arange(0, BLOCK_K)
        fm = f < D
        m_k = tl.load(m_ptr + ks.to(tl.int64)[:, None] * D + f[None, :], mask=km[:, None] & fm[None, :], other=0.0)
        m_c = tl.load(m_ptr + cs.to(tl.int64)[:, None] * D + f[None, :], mask=cm[:, None] & fm[None, :], other=0.0)
        w_k = tl.load(w_ptr + ks.to(tl.int64)[:, None] * D + f[None, :], mask=km[:, None] & fm[None, :],
                      other=0.0).to(ACC)
        w_c = tl.load(w_ptr + cs.to(tl.int64)[:, None] * D + f[None, :], mask=cm[:, None] & fm[None, :],
                      other=0.0).to(ACC)
        mw = tl.dot(m_k, tl.trans(w_c), mw, input_precision=DOT_PREC)
        wm = tl.dot(w_k, tl.trans(m_c), wm, input_precision=DOT_PREC)
    alpha = tl.cast(alpha_hi, ACC) + tl.cast(alpha_mid, ACC) + tl.cast(alpha_lo, ACC)
    inv_tau = tl.cast(itau_hi, ACC) + tl.cast(itau_mid, ACC) + tl.cast(itau_lo, ACC)
    wn_c = tl.load(wn_ptr + cs, mask=cm, other=1.0)
    inw_c = 1.0 / tl.where(wn_c < 1e-12, 1e-12, wn_c)
    wn_k = tl.load(wn_ptr + ks, mask=km, other=1.0)
    inw_k = 1.0 / tl.where(wn_k < 1e-12, 1e-12, wn_k)
    mv = mw * (alpha * inv_tau * inw_c)[None, :]   # (alpha / tau) <M_k, v_c>
    vm = wm * (alpha * inv_tau * inw_k)[:, None]   # (alpha / tau) <v_k, M_c>
    off = km[:, None] & cm[None, :] & (ks[:, None] != cs[None, :])
    lr_kc = tl.load(lr_ptr + ks.to(tl.int64)[:, None] * C + cs[None, :], mask=off, other=0.0)
    lr_ck = tl.load(lr_ptr + cs.to(tl.int64)[None, :] * C + ks[:, None], mask=off, other=0.0)
    a_k = tl.load(ab_ptr + ks, mask=km, other=0.0)
    b_k = tl.load(ab_ptr + C + ks, mask=km, other=0.0)
    a_c = tl.load(ab_ptr + cs, mask=cm, other=0.0)
    b_c = tl.load(ab_ptr + C + cs, mask=cm, other=0.0)
    f_kc = tl.exp(lr_kc) * (a_k[:, None] * lr_kc - mv + b_k[:, None])
    f_ck = tl.exp(lr_ck) * (a_c[None, :] * lr_ck - vm + b_c[None, :])
    out = tl.where(off, (0.5 * tl.load(gic_ptr).to(ACC)) * (f_kc + f_ck), 0.0)
    out = tl.where(bad_labels(lay_ptr, B, C), float("nan"), out)
    tl.store(out_ptr + ks.to(tl.int64)[:, None] * C + cs[None, :], out.to(out_ptr.dtype.element_ty),
             mask=km[:, None] & cm[None, :])


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}
# Budget of the deterministic path's per-split dW buffers.
_PARTIAL_BYTES = 256 << 20


def _column_splits(b: int, c: int, d: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of the columns pass: enough programs to fill the GPU (the class
    tiles alone are few when C is small), from the shapes only (no sync). Under the interpreter,
    8-row splits, so that small test batches exercise the cross-split reduction."""
    if INTERPRET or device.type != "cuda":
        rows = 8
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        tiles = triton.cdiv(c, 64) * triton.cdiv(d, 128)
        want = min(triton.cdiv(2 * _SM_COUNT[index], tiles), triton.cdiv(b, 128),
                   max(1, _PARTIAL_BYTES // max(4 * c * d, 1)))
        rows = triton.cdiv(triton.cdiv(b, max(want, 1)), 64) * 64
    return triton.cdiv(b, rows), rows


def _forward_impl(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
                  diversity_weight, class_balanced, ignore_index):
    check_dtype("idid_loss", x)
    with _rows.on_device(x):  # Triton launches on the current device, not the tensors'
        x, w = x.contiguous(), proxies.contiguous()
        b, d = x.shape
        c = w.shape[0]
        acc, ACC, prec = acc_dtype(x.dtype), tl_acc(x.dtype), dot_precision(x.dtype)
        layout, offsets = bucket_rows(labels, c, ignore_index)
        x_norm, w_norm = row_norms(x), row_norms(w)
        xs, xs_norm = scaled_rows(x, x_norm)  # the rows every cosine kernel reads (see _idid_common)
        cls = torch.empty(2, dtype=torch.int64, device=x.device)
        _class_stats_kernel[(1,)](offsets, cls, c, BLOCK=pick(1024, 8))
        if distillation:
            teacher = torch.empty((c, c), dtype=acc, device=x.device)
            block_r = pick(8, 8)
            _teacher_kernel[(triton.cdiv(c, block_r),)](similarity.contiguous(), teacher, c, ACC=ACC, BLOCK_R=block_r,
                                                        BLOCK_C=pick(128, 8))
        else:
            teacher = torch.empty((0, 0), dtype=acc, device=x.device)
        row_stats = torch.empty((ROW_STATS, b), dtype=acc, device=x.device)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]),)  # noqa: E731
        _ic_forward_kernel[grid](xs, w, xs_norm, w_norm, layout, offsets, cls, teacher if distillation else w_norm,
                                 row_stats, b, c, d, *split_f64(alpha), *split_f64(1.0 / tau), DISTILL=distillation,
                                 UNIT_TAU=tau == 1.0, BALANCED=class_balanced, ACC=ACC, DOT_PREC=prec)
        if diversity:
            pair_row_sums(xs, xs_norm, layout, offsets, c, t, row_stats[PAIR_SUM])
        loss, l_ic, l_id, lam = (torch.empty((), dtype=x.dtype, device=x.device) for _ in range(4))
        _finalize_kernel[(1,)](row_stats, offsets, cls, layout, loss, l_ic, l_id, lam, b, c, *split_f64(eps),
                               *split_f64(diversity_weight), DIVERSITY=diversity, ADAPTIVE=adaptive_weight, ACC=ACC,
                               BLOCK=pick(1024, 8))
        return loss, l_ic, l_id, lam, row_stats, x_norm, w_norm, teacher, layout, offsets


def _backward_impl(grad_ic, grad_id, x, proxies, row_stats, x_norm, w_norm, teacher, layout, offsets, alpha, tau, t,
                   distillation, diversity, similarity_grad):
    check_dtype("idid_loss", x)
    with _rows.on_device(x):  # Triton launches on the current device, not the tensors'
        x, w = x.contiguous(), proxies.contiguous()
        b, d = x.shape
        c = w.shape[0]
        acc, ACC, prec = acc_dtype(x.dtype), tl_acc(x.dtype), dot_precision(x.dtype)
        gic = grad_ic.to(acc).reshape(1)
        gid = grad_id.to(acc).reshape(1)
        lr = teacher if distillation else w_norm
        scalars = (*split_f64(alpha), *split_f64(1.0 / tau))

        xs, xs_norm = scaled_rows(x, x_norm)  # recomputed (O(B d)), as in the forward
        du = torch.empty((b, d), dtype=acc, device=x.device)
        grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]),)  # noqa: E731
        _grad_rows_kernel[grid](xs, w, xs_norm, w_norm, layout, offsets, row_stats, lr, gic, gid, du, b, c, d, *scalars,
                                *split_f64(t), DISTILL=distillation, DIVERSITY=diversity, ACC=ACC, DOT_PREC=prec)
        dx = normalize_backward(du, x, x_norm)

        splits, rows_per_split = _column_splits(b, c, d, x.device)
        atomic = splits > 1 and not torch.are_deterministic_algorithms_enabled()
        dv = (torch.zeros if atomic else torch.empty)((1 if atomic else splits, c, d), dtype=acc, device=x.device)
        grid = lambda m: (triton.cdiv(c, m["BLOCK_N"]) * triton.cdiv(d, m["BLOCK_D"]) * splits,)  # noqa: E731
        _grad_cols_kernel[grid](xs, w, xs_norm, w_norm, layout, offsets, row_stats, lr, gic, dv, b, c, d,
                                rows_per_split, *scalars, DISTILL=distillation, ATOMIC=atomic, ACC=ACC, DOT_PREC=prec)
        dw = normalize_backward(dv, w, w_norm, nsplit=1 if atomic else splits)

        if not (distillation and similarity_grad):  # no (C, C) buffer for a similarity that takes no gradient
            dsim = torch.empty((0, 0), dtype=x.dtype, device=x.device)
        # With C = 2 the teacher distribution over the one non-target class is the constant 1: no gradient.
        elif c > 2:
            sums = torch.empty((c, d), dtype=acc, device=x.device)
            ab = torch.empty((2, c), dtype=acc, device=x.device)
            _class_sums_kernel[(c,)](xs, xs_norm, layout, offsets, row_stats, sums, ab, b, c, d, ACC=ACC,
                                     BLOCK_M=pick(32, 8), BLOCK_D=pick(128, 32))
            dsim = torch.empty((c, c), dtype=x.dtype, device=x.device)
            block_t = pick(32, 8)
            _dtheta_kernel[(triton.cdiv(c, block_t) ** 2,)](
                sums, ab, w, w_norm, teacher, gic, layout, dsim, b, c, d, *scalars, ACC=ACC,
                DOT_PREC="ieee" if ACC == tl.float32 and prec == "ieee" else "tf32", BLOCK_T=block_t,
                BLOCK_K=pick(16, 32))  # 32 spills on sm_90 (float64) and sm_80 (float32)
        else:
            dsim = torch.zeros((c, c), dtype=x.dtype, device=x.device)
            dsim.masked_fill_(layout[1, -1] > c, float("nan"))  # a label out of range (see bad_labels)
        return dx, dw, dsim


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op(_FWD, mutates_args=())
def _forward_op(x: Tensor, proxies: Tensor, similarity: Tensor, labels: Tensor, alpha: float, tau: float, t: float,
                eps: float, distillation: bool, diversity: bool, adaptive_weight: bool, diversity_weight: float,
                class_balanced: bool, ignore_index: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, l_ic, l_id, lam, row_stats, x_norm, w_norm, teacher_log_prob, layout, offsets)."""
    return _forward_impl(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
                         diversity_weight, class_balanced, ignore_index)


@_forward_op.register_fake
def _forward_fake(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
                  diversity_weight, class_balanced, ignore_index):
    b, c = x.shape[0], proxies.shape[0]
    acc = acc_dtype(x.dtype)
    scalars = [x.new_empty(()) for _ in range(4)]
    teacher = x.new_empty((c, c) if distillation else (0, 0), dtype=acc)
    return (*scalars, x.new_empty((ROW_STATS, b), dtype=acc), x.new_empty((b,), dtype=acc),
            x.new_empty((c,), dtype=acc), teacher, labels.new_empty((2, b), dtype=torch.int64),
            labels.new_empty((c + 1,), dtype=torch.int64))


@torch.library.custom_op(_BWD, mutates_args=())
def _backward_op(grad_ic: Tensor, grad_id: Tensor, x: Tensor, proxies: Tensor, row_stats: Tensor, x_norm: Tensor,
                 w_norm: Tensor, teacher_log_prob: Tensor, layout: Tensor, offsets: Tensor, alpha: float, tau: float,
                 t: float, distillation: bool, diversity: bool, similarity_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dproxies, dsimilarity) of grad_ic * L_IC + grad_id * L_ID; dsimilarity is (0, 0) unless
    ``distillation and similarity_grad``."""
    return _backward_impl(grad_ic, grad_id, x, proxies, row_stats, x_norm, w_norm, teacher_log_prob, layout, offsets,
                          alpha, tau, t, distillation, diversity, similarity_grad)


@_backward_op.register_fake
def _backward_fake(grad_ic, grad_id, x, proxies, row_stats, x_norm, w_norm, teacher_log_prob, layout, offsets, alpha,
                   tau, t, distillation, diversity, similarity_grad):
    c = proxies.shape[0] if distillation and similarity_grad else 0
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(proxies, memory_format=torch.contiguous_format), proxies.new_empty((c, c)))


def _setup_context(ctx, inputs, output):
    x, proxies, _sim, _labels, alpha, tau, t, _eps, distillation, diversity, *_ = inputs
    _, _, _, lam, row_stats, x_norm, w_norm, teacher, layout, offsets = output
    ctx.save_for_backward(x, proxies, lam, row_stats, x_norm, w_norm, teacher, layout, offsets)
    ctx.config = (alpha, tau, t, distillation, diversity)
    ctx.mark_non_differentiable(lam, row_stats, x_norm, w_norm, teacher, layout, offsets)
    # The saved state gets no gradient: without this autograd would hand backward a zero tensor for
    # each of those outputs, the (C, C) teacher's a full C^2 fill per step.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_ic, g_id, *_):
    no_double_backward("idid_loss")
    x, proxies, lam, row_stats, x_norm, w_norm, teacher, layout, offsets = ctx.saved_tensors
    acc = acc_dtype(x.dtype)
    zero = torch.zeros((), dtype=acc, device=x.device)
    g_loss, g_ic, g_id = (zero if g is None else g.to(acc) for g in (g_loss, g_ic, g_id))
    grad_ic = g_loss + g_ic
    grad_id = g_loss * lam.to(acc) + g_id
    distillation = ctx.config[3]
    similarity_grad = distillation and ctx.needs_input_grad[2]
    dx, dw, ds = _backward_op(grad_ic, grad_id, x, proxies, row_stats, x_norm, w_norm, teacher, layout, offsets,
                              *ctx.config, similarity_grad)
    return (dx, dw, ds if similarity_grad else None) + (None,) * 11


# At the per-device autograd keys, through the torch.func-capable registration (idid_kernels/_autograd.py).
register_autograd(_FWD, _backward, setup_context=_setup_context, public_name="idid_loss",
                  keys=DEVICE_AUTOGRAD_KEYS)
register_no_double_backward(_BWD, "idid_loss", keys=DEVICE_AUTOGRAD_KEYS)


def idid_loss(x, proxies, similarity, labels, *, alpha, tau, t, eps, distillation, diversity, adaptive_weight,
              diversity_weight, class_balanced, ignore_index, return_terms):
    """The loss, or :class:`IDIDTerms` with ``return_terms`` (arguments validated by functional)."""
    loss, l_ic, l_id, lam, *_ = _forward_op(x, proxies, similarity, labels, float(alpha), float(tau), float(t),
                                            float(eps), bool(distillation), bool(diversity), bool(adaptive_weight),
                                            float(diversity_weight), bool(class_balanced), int(ignore_index))
    if return_terms:
        return IDIDTerms(loss, l_ic, l_id, lam)
    return loss
