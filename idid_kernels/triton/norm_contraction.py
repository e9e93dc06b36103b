"""norm_contraction on Triton: out_n = sigmoid((||x_n|| - offset) / T), shape (N,).

Ops (``torch.library`` custom ops, so autograd and ``torch.compile(fullgraph=True)`` see them):

- ``idid_triton::norm_contraction_forward(x, offset, T) -> (out, norm)``: one pass over each row
  block; ``out`` in x's dtype, ``norm`` = ||x_n|| in float32 (float64 for float64 x), saved for
  backward and not differentiable. The norm never squares an element (nrm2 with an online rescale,
  :func:`._rows.nrm2_step`): rows of 1e-30 or of 1e30 per element keep their norms in float32.
- ``idid_triton::norm_contraction_backward(grad_out, x, norm, offset, T) -> dx``:
  dx_n = grad_n g'(r_n) u_n with u_n = x_n / r_n (0 for a zero row), with g'(r) = sig(z) sig(-z) / T evaluated as
  e / (1 + e)^2 / T, e = exp(-|z|): both factors keep full precision where sig(z) rounds to 1.

The scalars offset and 1/T (computed in double on the host) reach the kernels as the bit patterns of
their float64 values (:func:`~idid_kernels.triton._rows.f64_bits`): plain launch arguments, exact for
float64 inputs and rounded once for the others, with no per-call allocation, fill or host-to-device
copy (the op can be captured in a CUDA graph).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._autograd import DEVICE_AUTOGRAD_KEYS, register_autograd, register_no_double_backward
from . import _rows
from ._rows import f64_value, no_double_backward, nrm2_finish, nrm2_step

_NS = "idid_triton"


@triton.jit(do_not_specialize=["offset_bits", "inv_t_bits"])
def _forward_kernel(x_ptr, out_ptr, norm_ptr, offset_bits, inv_t_bits, N, D, stride_n, stride_d,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_n
    scale = tl.zeros([BLOCK_N], ACC)
    ssq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(base + cols[None, :] * stride_d, mask=rmask[:, None] & (cols[None, :] < D), other=0.0).to(ACC)
        scale, ssq = nrm2_step(scale, ssq, v)
    r = nrm2_finish(scale, ssq)
    offset = f64_value(offset_bits, ACC)
    inv_t = f64_value(inv_t_bits, ACC)
    z = (r - offset) * inv_t
    # overflow-free logistic: exp of a non-positive argument only
    e = tl.exp(-tl.abs(z))
    sig = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    tl.store(norm_ptr + rows, r, mask=rmask)
    tl.store(out_ptr + rows, sig.to(out_ptr.dtype.element_ty), mask=rmask)


@triton.jit(do_not_specialize=["offset_bits", "inv_t_bits"])
def _backward_kernel(grad_ptr, x_ptr, norm_ptr, offset_bits, inv_t_bits, dx_ptr, N, D, stride_n, stride_d,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    r = tl.load(norm_ptr + rows, mask=rmask, other=1.0)
    g = tl.load(grad_ptr + rows, mask=rmask, other=0.0).to(ACC)
    offset = f64_value(offset_bits, ACC)
    inv_t = f64_value(inv_t_bits, ACC)
    e = tl.exp(-tl.abs((r - offset) * inv_t))
    one_e = 1.0 + e
    coef = g * (e / (one_e * one_e) * inv_t)
    # dx = coef u with u = x / r (|u| <= 1 whatever the row's scale; 0 for a zero row, NaN for a NaN
    # norm): coef / r and coef x / r would overflow or underflow for rows of norm 1e-30 or 1e30
    r_div = tl.where(r == 0, 1.0, r)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(x_ptr + r64[:, None] * stride_n + cols[None, :] * stride_d, mask=m, other=0.0).to(ACC)
        dx = coef[:, None] * (x / r_div[:, None])
        tl.store(dx_ptr + r64[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


def _params(offset: float, temperature: float) -> tuple[int, int]:
    # (offset, 1/T) as float64 bit patterns, 1/T computed in double on the host
    return _rows.f64_bits(offset), _rows.f64_bits(1.0 / temperature)


@torch.library.custom_op(f"{_NS}::norm_contraction_forward", mutates_args=())
def norm_contraction_forward(x: torch.Tensor, offset: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = x.shape
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    norm = torch.empty(n, dtype=_rows.acc_dtype(x.dtype), device=x.device)
    block_n, block_d = _rows.row_block(d, dtype=x.dtype)
    with _rows.on_device(x):
        _forward_kernel[(triton.cdiv(n, block_n),)](x, out, norm, *_params(offset, temperature), n, d, x.stride(0),
                                                    x.stride(1), BLOCK_N=block_n, BLOCK_D=block_d,
                                                    ACC=_rows.tl_acc(x.dtype))
    return out, norm


@norm_contraction_forward.register_fake
def _(x, offset, temperature):
    n = x.shape[0]
    return x.new_empty((n,)), x.new_empty((n,), dtype=_rows.acc_dtype(x.dtype))


@torch.library.custom_op(f"{_NS}::norm_contraction_backward", mutates_args=())
def norm_contraction_backward(grad_out: torch.Tensor, x: torch.Tensor, norm: torch.Tensor, offset: float,
                              temperature: float) -> torch.Tensor:
    n, d = x.shape
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    block_n, block_d = _rows.row_block(d, dtype=x.dtype)
    with _rows.on_device(x):
        _backward_kernel[(triton.cdiv(n, block_n),)](grad_out.contiguous(), x, norm, *_params(offset, temperature),
                                                     dx, n, d, x.stride(0), x.stride(1), BLOCK_N=block_n,
                                                     BLOCK_D=block_d, ACC=_rows.tl_acc(x.dtype))
    return dx


@norm_contraction_backward.register_fake
def _(grad_out, x, norm, offset, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, offset, temperature = inputs
    _, norm = output
    ctx.mark_non_differentiable(norm)
    ctx.save_for_backward(x, norm)
    ctx.offset, ctx.temperature = offset, temperature


def _backward(ctx, grad_out, _grad_norm):
    no_double_backward("norm_contraction")
    x, norm = ctx.saved_tensors
    return torch.ops.idid_triton.norm_contraction_backward(grad_out, x, norm, ctx.offset, ctx.temperature), None, None


# At the per-device autograd keys, through the torch.func-capable registration (idid_kernels/_autograd.py).
register_autograd(f"{_NS}::norm_contraction_forward", _backward, setup_context=_setup_context,
                  public_name="norm_contraction", keys=DEVICE_AUTOGRAD_KEYS)
register_no_double_backward(f"{_NS}::norm_contraction_backward", "norm_contraction", keys=DEVICE_AUTOGRAD_KEYS)


def norm_contraction(x: torch.Tensor, offset: float, temperature: float) -> torch.Tensor:
    """The public output only; arguments already validated by ``functional``."""
    _rows.check_dtype("norm_contraction", x=x)
    out, _ = torch.ops.idid_triton.norm_contraction_forward(x, float(offset), float(temperature))
    return out
