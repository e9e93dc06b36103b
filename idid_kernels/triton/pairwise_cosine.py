"""pairwise_cosine on Triton: S_ij = <x_i / ||x_i||, y_j / ||y_j||>, shape (N, M); y = x when None.

Ops (``torch.library`` custom ops; autograd and fake kernels registered below):

- ``idid_triton::pairwise_cosine_forward(x, y?) -> (out, norm_x, norm_y)``: row norms first
  (overflow-free), then one GEMM over (BLOCK_M x BLOCK_N) output tiles of the rows x_i 2^k_i (an
  exact power of two near 1 / ||x_i||, :func:`._rows.scaled_rows`, so that no dot overflows even
  when both rows are huge) and the raw y_j, scaled in the epilogue by 2^-k_i / max(||x_i||, eps)
  and 1 / max(||y_j||, eps) (F.normalize semantics: a zero row has zero cosines). ``norm_y`` is
  empty when y is None. The norms are saved, not differentiable.
- ``idid_triton::pairwise_cosine_backward(grad, x, y?, norm_x, norm_y, need_x, need_y) -> (dx, dy)``:
  with G = dL/dS, dU = G V (y None: (G + G^T) U, both paths into x) and dV = G^T U, each a GEMM
  into a float32 (N x d) buffer that reads G through its strides (no transposed copy), then
  dx_i = (dU_i - <dU_i, u_i> u_i) / max(||x_i||, eps) by the shared projection kernel. A gradient
  not asked for is an empty (0, d) tensor.

No atomics: every output tile has one owner, so results are bitwise reproducible.

Grids are one-dimensional: the (row tile, column tile) and (row tile, feature chunk) pairs are
folded onto axis 0 (limit 2^31 - 1 programs), since axes 1 and 2 stop at 65,535, which a 2-D grid
of column tiles passes at M > ~2.1M (32-wide tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import DEVICE_AUTOGRAD_KEYS, register_autograd, register_no_double_backward
from . import _rows
from ._rows import dot_operand, no_double_backward

_NS = "idid_triton"

# Autotune configs per input dtype (_rows.per_dtype), none of which spills registers on sm_90 or sm_80
# (`python -m idid_kernels compile-check`); float64 takes two registers an element: smaller tiles.
_HALF = (torch.bfloat16, torch.float16)
_FWD_CONFIGS = _rows.configs(
    gpu={_HALF: [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=32, num_warps=8, num_stages=3),
                 dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=4),
                 dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=32, num_warps=4, num_stages=4),
                 dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=4, num_stages=3),
                 dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, num_warps=4, num_stages=2)],
         torch.float32: [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_M=128, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=4),
                         dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=32, num_warps=8, num_stages=4),
                         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=64, num_warps=4, num_stages=2)],
         torch.float64: [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=16, num_warps=4, num_stages=3),
                         dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32, num_warps=4, num_stages=2)]},
    interpreter=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16))

_BWD_CONFIGS = _rows.configs(
    gpu={_HALF: [dict(BLOCK_M=128, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=3),
                 dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=64, num_warps=4, num_stages=3),
                 dict(BLOCK_M=64, BLOCK_K=32, BLOCK_D=128, num_warps=4, num_stages=3),
                 dict(BLOCK_M=32, BLOCK_K=32, BLOCK_D=64, num_warps=4, num_stages=2)],
         torch.float32: [dict(BLOCK_M=128, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=3),
                         dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_K=32, BLOCK_D=128, num_warps=4, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_K=32, BLOCK_D=64, num_warps=4, num_stages=2)],
         torch.float64: [dict(BLOCK_M=64, BLOCK_K=32, BLOCK_D=64, num_warps=8, num_stages=3),
                         dict(BLOCK_M=128, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=3),
                         dict(BLOCK_M=32, BLOCK_K=32, BLOCK_D=128, num_warps=8, num_stages=3),
                         dict(BLOCK_M=64, BLOCK_K=16, BLOCK_D=64, num_warps=8, num_stages=3)]},
    interpreter=dict(BLOCK_M=16, BLOCK_K=16, BLOCK_D=16))


@triton.autotune(configs=_FWD_CONFIGS, key=["N", "M", "D"], prune_configs_by=_rows.by_dtype("x_ptr"))
@triton.jit
def _forward_kernel(x_ptr, y_ptr, norm_x_ptr, norm_y_ptr, out_ptr, N, M, D, stride_xn, stride_xd, stride_yn,
                    stride_yd, PREC: tl.constexpr, DOT_DT: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # (row tile, column tile) folded onto grid axis 0, row tiles fastest (the order of a 2-D grid)
    pid = tl.program_id(0)
    row_tiles = tl.cdiv(N, BLOCK_M)
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < N, cols < M
    x_base = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    y_base = y_ptr + cols.to(tl.int64)[:, None] * stride_yn
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds[None, :] < D
        xt = tl.load(x_base + ds[None, :] * stride_xd, mask=rmask[:, None] & dmask, other=0.0)
        yt = tl.load(y_base + ds[None, :] * stride_yd, mask=cmask[:, None] & dmask, other=0.0)
        acc = tl.dot(xt.to(DOT_DT), tl.trans(yt.to(DOT_DT)), acc, input_precision=PREC, out_dtype=ACC)
    eps_m = tl.full([BLOCK_M], 1e-12, ACC)
    eps_n = tl.full([BLOCK_N], 1e-12, ACC)
    # max(r, eps) written so that a NaN norm stays NaN (tl.maximum drops it)
    norm_x = tl.load(norm_x_ptr + rows, mask=rmask, other=1.0)
    norm_y = tl.load(norm_y_ptr + cols, mask=cmask, other=1.0)
    inv_x = 1.0 / tl.where(norm_x < eps_m, eps_m, norm_x)
    inv_y = 1.0 / tl.where(norm_y < eps_n, eps_n, norm_y)
    out = acc * inv_x[:, None] * inv_y[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * M + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "K", "D"], prune_configs_by=_rows.by_dtype("v_ptr"))
@triton.jit
def _grad_matmul_kernel(g_ptr, stride_gi, stride_gk, v_ptr, stride_vk, stride_vd, norm_v_ptr, out_ptr, N, K, D,
                        SYM: tl.constexpr, PREC: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[i, :] = sum_k A_ik v_k / max(||v_k||, eps), A = G (or G + G^T when SYM), float32 out."""
    pid = tl.program_id(0)  # (row tile, feature chunk) folded onto axis 0, row tiles fastest
    row_tiles = tl.cdiv(N, BLOCK_M)
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    ds = (pid // row_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask, dmask = rows < N, ds < D
    r64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        k64 = ks.to(tl.int64)
        m = rmask[:, None] & kmask[None, :]
        a = tl.load(g_ptr + r64[:, None] * stride_gi + k64[None, :] * stride_gk, mask=m, other=0.0).to(ACC)
        if SYM:
            a += tl.load(g_ptr + k64[None, :] * stride_gi + r64[:, None] * stride_gk, mask=m, other=0.0).to(ACC)
        eps = tl.full([BLOCK_K], 1e-12, ACC)
        norm_v = tl.load(norm_v_ptr + ks, mask=kmask, other=1.0)
        inv_v = 1.0 / tl.where(norm_v < eps, eps, norm_v)
        a = a * inv_v[None, :]
        vt = tl.load(v_ptr + k64[:, None] * stride_vk + ds[None, :] * stride_vd,
                     mask=kmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(dot_operand(a, IN_DT, DOT_DT), vt.to(DOT_DT), acc, input_precision=PREC, out_dtype=ACC)
    tl.store(out_ptr + r64[:, None] * D + ds[None, :], acc, mask=rmask[:, None] & dmask[None, :])


def _grad_wrt(g: torch.Tensor, transpose: bool, sym: bool, other: torch.Tensor, other_norm: torch.Tensor,
              x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """dx for the rows of x: project(A V), A = G, G^T (``transpose``) or G + G^T (``sym``)."""
    n, d = x.shape
    k = other.shape[0]
    stride_gi, stride_gk = (g.stride(1), g.stride(0)) if transpose else (g.stride(0), g.stride(1))
    buf = torch.empty((n, d), dtype=_rows.acc_dtype(x.dtype), device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"]),)  # noqa: E731
    with _rows.on_device(x):
        _grad_matmul_kernel[grid](g, stride_gi, stride_gk, other, other.stride(0), other.stride(1), other_norm, buf,
                                  n, k, d, SYM=sym, PREC=_rows.dot_precision(x.dtype), IN_DT=_rows.tl_dtype(x.dtype),
                                  DOT_DT=_rows.dot_dtype(x.dtype), ACC=_rows.tl_acc(x.dtype))
    return _rows.project_rows(buf, x, x_norm)


@torch.library.custom_op(f"{_NS}::pairwise_cosine_forward", mutates_args=())
def pairwise_cosine_forward(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    n, d = x.shape
    norm_x = _rows.row_norms(x)
    if y is None:
        other, norm_o = x, norm_x
        norm_y = norm_x.new_empty((0,))
    else:
        other = y
        norm_y = norm_o = _rows.row_norms(y)
    m = other.shape[0]
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(m, meta["BLOCK_N"]),)  # noqa: E731
    with _rows.on_device(x):
        # left operand scaled per row by a power of two near 1 / ||x_i||: the dots are O(||y_j||)
        xs, xs_norm = _rows.scaled_rows(x, norm_x)
        _forward_kernel[grid](xs, other, xs_norm, norm_o, out, n, m, d, xs.stride(0), xs.stride(1), other.stride(0),
                              other.stride(1), PREC=_rows.dot_precision(x.dtype), DOT_DT=_rows.dot_dtype(x.dtype),
                              ACC=_rows.tl_acc(x.dtype))
    return out, norm_x, norm_y


@pairwise_cosine_forward.register_fake
def _(x, y):
    n = x.shape[0]
    m = n if y is None else y.shape[0]
    acc = _rows.acc_dtype(x.dtype)
    return x.new_empty((n, m)), x.new_empty((n,), dtype=acc), x.new_empty((0 if y is None else m,), dtype=acc)


@torch.library.custom_op(f"{_NS}::pairwise_cosine_backward", mutates_args=())
def pairwise_cosine_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None, norm_x: torch.Tensor,
                             norm_y: torch.Tensor, need_x: bool, need_y: bool) -> tuple[torch.Tensor, torch.Tensor]:
    empty = x.new_empty((0, x.shape[1]))
    if y is None:
        dx = _grad_wrt(grad, False, True, x, norm_x, x, norm_x) if need_x else empty
        return dx, empty.clone()
    dx = _grad_wrt(grad, False, False, y, norm_y, x, norm_x) if need_x else empty
    dy = _grad_wrt(grad, True, False, x, norm_x, y, norm_y) if need_y else empty.clone()
    return dx, dy


@pairwise_cosine_backward.register_fake
def _(grad, x, y, norm_x, norm_y, need_x, need_y):
    def grad_of(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty((0, x.shape[1]))

    return grad_of(x, need_x), grad_of(y, y is not None and need_y)


def _setup_context(ctx, inputs, output):
    x, y = inputs
    _, norm_x, norm_y = output
    ctx.mark_non_differentiable(norm_x, norm_y)
    ctx.save_for_backward(x, y, norm_x, norm_y)


def _backward(ctx, grad, _grad_norm_x, _grad_norm_y):
    no_double_backward("pairwise_cosine")
    x, y, norm_x, norm_y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad
    need_y = bool(need_y) and y is not None
    dx, dy = torch.ops.idid_triton.pairwise_cosine_backward(grad, x, y, norm_x, norm_y, bool(need_x), need_y)
    return (dx if need_x else None), (dy if need_y else None)


# At the per-device autograd keys, through the torch.func-capable registration (idid_kernels/_autograd.py).
register_autograd(f"{_NS}::pairwise_cosine_forward", _backward, setup_context=_setup_context,
                  public_name="pairwise_cosine", keys=DEVICE_AUTOGRAD_KEYS)
register_no_double_backward(f"{_NS}::pairwise_cosine_backward", "pairwise_cosine", keys=DEVICE_AUTOGRAD_KEYS)


def pairwise_cosine(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The public output only; arguments already validated by ``functional``."""
    _rows.check_dtype("pairwise_cosine", x=x, y=y)
    out, _, _ = torch.ops.idid_triton.pairwise_cosine_forward(x, y)
    return out
