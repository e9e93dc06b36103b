"""Autograd and fake kernels of ``idid_kernels::class_density_forward/backward``.

forward(x, labels, C, t) -> (density, norm): density_c = sum_{i != j, y_i = y_j = c} kappa_ij /
(n_c (n_c - 1)) with kappa_ij = exp(t (<u_i, u_j> - 1)), 0 where n_c < 2, in x's dtype; norm =
per-row ||x_i|| in float32 (float64 for float64 x), saved for backward.
backward(grad, x, labels, norm, t) -> dx: dD_c/du_i = 2 t / (n_c (n_c - 1)) sum_{j same class,
j != i} kappa_ij u_j, then dx_i = (dU_i - <dU_i, u_i> u_i) / max(||x_i||, eps). C = grad.shape[0].
"""
from __future__ import annotations

import functools

import torch

from .._autograd import no_double_backward, register_autograd, register_no_double_backward



def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_fake(x, labels, num_classes, t):
    return x.new_empty((num_classes,)), x.new_empty((x.shape[0],), dtype=_acc_dtype(x.dtype))


def _backward_fake(grad, x, labels, norm, t):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, labels, _num_classes, t = inputs
    _, norm = output
    # The norm is a saved statistic, not a result: no gradient flows into it.
    ctx.mark_non_differentiable(norm)
    ctx.save_for_backward(x, labels, norm)
    ctx.t = t


def _backward(ns, ctx, grad, _grad_norm):
    no_double_backward("class_density")
    x, labels, norm = ctx.saved_tensors
    dx = getattr(torch.ops, ns).class_density_backward(grad, x, labels, norm, ctx.t)
    return dx, None, None, None


def register(ns: str) -> None:
    """The fake kernels and autograd of the ops in the library ``ns`` ("idid_kernels", or
    "idid_kernels_emu" for the CUDA kernels under the emulator: ops/__init__.py)."""
    torch.library.register_fake(f"{ns}::class_density_forward")(_forward_fake)
    torch.library.register_fake(f"{ns}::class_density_backward")(_backward_fake)
    register_autograd(f"{ns}::class_density_forward", functools.partial(_backward, ns), setup_context=_setup_context,
                      public_name="class_density")
    register_no_double_backward(f"{ns}::class_density_backward", "class_density")


def class_density(x: torch.Tensor, labels: torch.Tensor, num_classes: int, t: float,
                  ns: str = "idid_kernels") -> torch.Tensor:
    """The op's public output only (the saved norm is an implementation detail)."""
    density, _ = getattr(torch.ops, ns).class_density_forward(x, labels, num_classes, float(t))
    return density
