"""Autograd and fake kernels of ``idid_kernels::norm_contraction_forward/backward``.

forward(x, offset, T) -> (out, norm): out_n = sigmoid((||x_n|| - offset) / T) in x's dtype,
norm_n = ||x_n|| in float32 (float64 for float64 x), saved for backward.
backward(grad_out, grad_norm?, x, norm, offset, T) -> dx_n = (grad_out_n g'(r_n) + grad_norm_n) x_n / r_n.
"""
from __future__ import annotations

import functools

import torch

from .._autograd import no_double_backward, register_autograd, register_no_double_backward



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(x, offset, temperature):
    n = x.shape[0]
    return x.new_empty((n,)), x.new_empty((n,), dtype=_acc_dtype(x.dtype))


def _backward_fake(grad_out, grad_norm, x, norm, offset, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, offset, temperature = inputs
    _, norm = output
    ctx.save_for_backward(x, norm)
    ctx.offset, ctx.temperature = offset, temperature


def _backward(ns, ctx, grad_out, grad_norm):
    no_double_backward("norm_contraction")
    x, norm = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(norm)
    dx = getattr(torch.ops, ns).norm_contraction_backward(grad_out, grad_norm, x, norm, ctx.offset, ctx.temperature)
    return dx, None, None


def register(ns: str) -> None:
    """The fake kernels and autograd of the ops in the library ``ns`` ("idid_kernels", or
    "idid_kernels_emu" for the CUDA kernels under the emulator: ops/__init__.py)."""
    torch.library.register_fake(f"{ns}::norm_contraction_forward")(_forward_fake)
    torch.library.register_fake(f"{ns}::norm_contraction_backward")(_backward_fake)
    register_autograd(f"{ns}::norm_contraction_forward", functools.partial(_backward, ns),
                      setup_context=_setup_context, public_name="norm_contraction")
    register_no_double_backward(f"{ns}::norm_contraction_backward", "norm_contraction")


def norm_contraction(x: torch.Tensor, offset: float, temperature: float, ns: str = "idid_kernels") -> torch.Tensor:
    """The op's public output only (the saved norm is an implementation detail)."""
    out, _ = getattr(torch.ops, ns).norm_contraction_forward(x, float(offset), float(temperature))
    return out
