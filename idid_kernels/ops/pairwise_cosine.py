"""Autograd and fake kernels of ``idid_kernels::pairwise_cosine_forward/backward``.

forward(x, y?) -> (out, norm_x, norm_y): out_ij = <u_i, v_j> in x's dtype, with u = x / max(||x||,
eps) and v likewise from y (v = u when y is None); norm_x, norm_y = per-row ||.|| in float32
(float64 for float64 x), saved for backward; norm_y is empty when y is None.
backward(grad, x, y?, norm_x, norm_y, output_mask) -> (dx, dy): with G = grad,
dU = G V, dV = G^T U (y None: dU = (G + G^T) U), dx_i = (dU_i - <dU_i, u_i> u_i) / max(||x_i||, eps)
(the radial term dropped where ||x_i|| <= eps), likewise dy. An output not asked for by
output_mask, and dy when y is None, is an empty (0, d) tensor.
"""
from __future__ import annotations

import functools

import torch

from .._autograd import no_double_backward, register_autograd, register_no_double_backward



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(x, y):
    n = x.shape[0]
    m = n if y is None else y.shape[0]
    acc = _acc_dtype(x.dtype)
    return x.new_empty((n, m)), x.new_empty((n,), dtype=acc), x.new_empty((0 if y is None else m,), dtype=acc)


def _backward_fake(grad, x, y, norm_x, norm_y, output_mask):
    def grad_of(t, wanted):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else x.new_empty((0, x.shape[1]))

    return grad_of(x, output_mask[0]), grad_of(y, y is not None and output_mask[1])


def _setup_context(ctx, inputs, output):
    x, y = inputs
    _, norm_x, norm_y = output
    # The norms are saved statistics, not results: no gradient flows into them.
    ctx.mark_non_differentiable(norm_x, norm_y)
    ctx.save_for_backward(x, y, norm_x, norm_y)


def _backward(ns, ctx, grad, _grad_norm_x, _grad_norm_y):
    no_double_backward("pairwise_cosine")
    x, y, norm_x, norm_y = ctx.saved_tensors
    need_x, need_y = ctx.needs_input_grad
    need_y = need_y and y is not None
    dx, dy = getattr(torch.ops, ns).pairwise_cosine_backward(grad, x, y, norm_x, norm_y, [need_x, need_y])
    return (dx if need_x else None), (dy if need_y else None)


def register(ns: str) -> None:
    """The fake kernels and autograd of the ops in the library ``ns`` ("idid_kernels", or
    "idid_kernels_emu" for the CUDA kernels under the emulator: ops/__init__.py)."""
    torch.library.register_fake(f"{ns}::pairwise_cosine_forward")(_forward_fake)
    torch.library.register_fake(f"{ns}::pairwise_cosine_backward")(_backward_fake)
    register_autograd(f"{ns}::pairwise_cosine_forward", functools.partial(_backward, ns),
                      setup_context=_setup_context, public_name="pairwise_cosine")
    register_no_double_backward(f"{ns}::pairwise_cosine_backward", "pairwise_cosine")


def pairwise_cosine(x: torch.Tensor, y: torch.Tensor | None = None, ns: str = "idid_kernels") -> torch.Tensor:
    """The op's public output only (the saved norms are an implementation detail)."""
    out, _, _ = getattr(torch.ops, ns).pairwise_cosine_forward(x, y)
    return out
