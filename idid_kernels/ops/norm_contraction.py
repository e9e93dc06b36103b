"""Autograd and fake kernels of ``idid_kernels::norm_contraction_forward/backward``.

forward(x, offset, T) -> (out, norm): out_n = sigmoid((||x_n|| - offset) / T) in x's dtype,
norm_n = ||x_n|| in float32 (float64 for float64 x), saved for backward.
backward(grad_out, grad_norm?, x, norm, offset, T) -> dx_n = (grad_out_n g'(r_n) + grad_norm_n) x_n / r_n.
"""
from __future__ import annotations

import torch

from .._autograd import no_double_backward, register_autograd, register_no_double_backward

_OP = "idid_kernels::norm_contraction_forward"
_BWD = "idid_kernels::norm_contraction_backward"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake(_OP)
def _forward_fake(x, offset, temperature):
    n = x.shape[0]
    return x.new_empty((n,)), x.new_empty((n,), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake(_BWD)
def _backward_fake(grad_out, grad_norm, x, norm, offset, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, offset, temperature = inputs
    _, norm = output
    ctx.save_for_backward(x, norm)
    ctx.offset, ctx.temperature = offset, temperature


def _backward(ctx, grad_out, grad_norm):
    no_double_backward("norm_contraction")
    x, norm = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(norm)
    dx = torch.ops.idid_kernels.norm_contraction_backward(grad_out, grad_norm, x, norm, ctx.offset, ctx.temperature)
    return dx, None, None


register_autograd(_OP, _backward, setup_context=_setup_context, public_name="norm_contraction")
register_no_double_backward(_BWD, "norm_contraction")


def norm_contraction(x: torch.Tensor, offset: float, temperature: float) -> torch.Tensor:
    """The op's public output only (the saved norm is an implementation detail)."""
    out, _ = torch.ops.idid_kernels.norm_contraction_forward(x, float(offset), float(temperature))
    return out
