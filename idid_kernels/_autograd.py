"""Autograd plumbing shared by the op registrations of the fused backends (ops/ for cpp and cuda,
triton/ for triton).

:func:`register_autograd` registers a (backward, setup_context) pair as ``torch.library.register_autograd``
does. The function torch 2.13's ``register_autograd`` generates is an ``autograd.Function`` with the
old ``forward(ctx, ...)`` form, which ``torch.func`` transforms refuse ("must override the
setup_context staticmethod", pytorch/pytorch#170834); this one is a single-level function, as in
the upstream fix of that issue, so the same formula serves plain autograd, ``torch.compile`` and
``torch.func.grad`` / ``vjp`` / ``jacrev`` (and ``vmap`` over them). Forward-mode AD
(``torch.func.jvp``, ``jacfwd``) is refused with a clear error.

The kernels' backward passes are not differentiable themselves. Plain autograd refuses
``create_graph=True`` at once (:func:`no_double_backward`). ``torch.func.grad`` always builds the
backward graph, so there the refusal moves to the backward ops (:func:`register_no_double_backward`):
their outputs carry a node that raises only if something differentiates through them (nested
``grad``, or ``backward()`` through the gradient ``torch.func.grad`` returned).
"""
from __future__ import annotations

import threading

import torch
from torch.autograd import forward_ad

try:  # private torch names (present in the torch 2.x releases this package supports)
    from torch._functorch.utils import enable_single_level_autograd_function
    from torch.autograd.function import _SingleLevelFunction
except ImportError:  # pragma: no cover - another torch: plain register_autograd, without torch.func support
    enable_single_level_autograd_function = _SingleLevelFunction = None

_LIBRARIES: dict[str, torch.library.Library] = {}

# The custom ops of the triton backend (torch.library.custom_op) already hold an autograd kernel at the
# Autograd alias key; registrations at the per-device keys take precedence over it without
# overriding it (which would warn).
DEVICE_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA")


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "IMPL")
    return _LIBRARIES[namespace]


def _refusal(op: str, what: str) -> str:
    return f"{op}: {what} is not supported by the fused backends; use backend='reference'"


# Set while a formula registered here runs the backward of a graph a torch.func transform recorded.
_backward_state = threading.local()


def no_double_backward(op: str) -> None:
    """Refuse ``create_graph=True``: the kernels' backward passes are not themselves differentiable,
    and returning gradients whose own derivative is silently 0 would be wrong. The backward of a
    torch.func transform (grad, vjp, jacrev: they always build the backward graph) goes on: there
    the backward ops refuse, only when something differentiates their outputs."""
    if torch.is_grad_enabled() and not getattr(_backward_state, "func", False):
        raise NotImplementedError(_refusal(op, "double backward (create_graph=True)"))


def _has_tangent(args) -> bool:
    # No dual level entered (forward_ad.dual_level, which torch.func.jvp enters too): no tensor can
    # carry a tangent, and the per-argument unpacking below is skipped.
    if getattr(forward_ad, "_current_level", 0) < 0 or not torch._C._is_fwd_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def register_autograd(qualname: str, backward, *, setup_context=None, public_name: str | None = None,
                      keys=("Autograd",)) -> None:
    """Register ``backward`` (and ``setup_context``, signatures as for ``torch.library.register_autograd``)
    as the autograd formula of the op ``qualname`` ("namespace::name") at the dispatch ``keys``."""
    if _SingleLevelFunction is None:  # pragma: no cover - see the imports
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    label = public_name or qualname

    # The last input of the function is the dispatch key set the kernel was called with; forward
    # re-dispatches below autograd with it (the formula is this function's backward).
    def forward(*args):
        *inputs, keyset = args
        # apply() runs forward with grad mode off, but the levels below (outer torch.func transforms,
        # plain autograd of tensors captured from outside) record this op too: they need it on, as
        # it was when the kernel was entered.
        with torch.enable_grad(), torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *inputs)

    def setup(ctx, inputs, output):
        if setup_context is not None:
            setup_context(ctx, inputs[:-1], output)

    def differentiate(ctx, *grads):
        # A graph of a torch.func transform: the transform is running (grad, jacrev), or its saved
        # tensors are the transform's wrappers (vjp's vjp_fn, called after the transform returned).
        func = torch._C._are_functorch_transforms_active() or any(
            t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in ctx.saved_tensors)
        prev, ctx.needs_input_grad = ctx.needs_input_grad, ctx.needs_input_grad[:-1]
        prev_func, _backward_state.func = getattr(_backward_state, "func", False), func
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = prev
            _backward_state.func = prev_func
        return (*result, None) if isinstance(result, tuple) else (result, None)

    def jvp(ctx, *tangents):
        raise NotImplementedError(_refusal(label, "forward-mode AD (torch.func.jvp, jacfwd, forward_ad)"))

    # A single-level function records its node on the tensors of the transform level it is called
    # at, and its forward re-dispatches to the levels below, which record their own: what ATen ops
    # do under torch.func, and what plain autograd sees as an ordinary autograd.Function.
    function = type(f"{name}_autograd", (_SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup),
        "backward": staticmethod(differentiate), "jvp": staticmethod(jvp)})

    def kernel(keyset, *args):
        if _has_tangent(args):
            raise NotImplementedError(_refusal(label, "forward-mode AD (torch.func.jvp, jacfwd, forward_ad)"))
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            with enable_single_level_autograd_function():
                return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    for key in keys:
        _library(namespace).impl(name, kernel, key, with_keyset=True)


def register_no_double_backward(qualname: str, public_name: str, keys=("Autograd",)) -> None:
    """An autograd formula for a backward op that refuses to be differentiated."""
    def backward(ctx, *grads):
        raise NotImplementedError(_refusal(public_name, "double backward (a gradient of a gradient)"))

    register_autograd(qualname, backward, public_name=public_name, keys=keys)
