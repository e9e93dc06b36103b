"""What is specific to the cuda backend on a GPU (the CUDA kernels of idid_kernels._C run natively):
the backend is available there, ``backend="auto"`` leaves it alone until it is verified, the kernels
never synchronise with the host, and the class_density op refuses labels on another device. The ops'
contract on this backend (emulated on CPU tensors without a GPU, native with one) is in the
conformance suites (tests/test_<op>.py).

GPU-only: the whole module is skipped where torch sees no CUDA device. On a machine with a GPU it
runs as is: ``python -m pytest -q tests/test_cuda_backend.py`` after building the extension with a
CUDA build of torch and nvcc on PATH.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import make_gen
from idid_kernels import _backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only test: no CUDA device is visible to torch, and the CUDA kernels "
                                       "cannot run natively without one")

DEV = torch.device("cuda")
OPS = ("norm_contraction", "pairwise_cosine", "class_density")


def test_cuda_backend_is_available_on_a_gpu():
    # A GPU machine whose extension lacks CUDA would otherwise skip every cuda parametrization of
    # the conformance suites less clearly.
    assert _backends.missing("cuda") is None, _backends.missing("cuda")
    for name in ("norm_contraction_forward", "pairwise_cosine_forward", "class_density_forward"):
        assert hasattr(torch.ops.idid_kernels, name), name


@pytest.mark.parametrize("op", OPS)
def test_auto_leaves_unverified_cuda_alone(op):
    # Until the CUDA kernels have passed the suites natively on a GPU, "auto" does not pick them
    # (README, Status); backend="cuda" must still run them on request.
    assert _backends.select_backend(op, "auto", DEV) == "reference"
    assert _backends.select_backend(op, "cuda", DEV) == "cuda"


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _density_big_case():
    g = make_gen(14)
    labels = torch.cat([torch.full((700,), 5, dtype=torch.int64), torch.randint(0, 40, (1300,), generator=g)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = torch.randn(labels.numel(), 64, generator=g)
    return x.to(DEV), labels.to(DEV), 40, torch.randn(40, generator=g).to(DEV)


def test_class_density_does_not_synchronise():
    # Sort, class offsets and kernels all stay on the device: no count is read on the host. The op
    # is called directly (the public function validates labels first, which synchronises).
    x, labels, c, up = _density_big_case()
    ops = torch.ops.idid_kernels
    with _sync_is_an_error():
        density, norm = ops.class_density_forward(x, labels, c, 2.0)
        dx = ops.class_density_backward(up, x, labels, norm, 2.0)
    assert density.shape == (c,) and dx.shape == x.shape and torch.isfinite(dx).all()


def test_pairwise_cosine_and_norm_contraction_do_not_synchronise():
    g = make_gen(15)
    x = torch.randn(300, 96, generator=g).to(DEV)
    y = torch.randn(257, 96, generator=g).to(DEV)
    grad = torch.randn(300, 257, generator=g).to(DEV)
    up = torch.randn(300, generator=g).to(DEV)
    ops = torch.ops.idid_kernels
    with _sync_is_an_error():
        out, norm_x, norm_y = ops.pairwise_cosine_forward(x, y)
        dx, dy = ops.pairwise_cosine_backward(grad, x, y, norm_x, norm_y, [True, True])
        contracted, norm = ops.norm_contraction_forward(x, 0.5, 2.0)
        dx_nc = ops.norm_contraction_backward(up, None, x, norm, 0.5, 2.0)
    assert out.shape == (300, 257) and dx.shape == x.shape and dy.shape == y.shape
    assert contracted.shape == (300,) and dx_nc.shape == x.shape
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all() and torch.isfinite(dx_nc).all()


def test_class_density_direct_op_rejects_mismatched_devices():
    x = torch.randn(4, 3, device=DEV)
    ops = torch.ops.idid_kernels
    with pytest.raises(RuntimeError, match="labels must be on x's device"):
        ops.class_density_forward(x, torch.tensor([0, 1, 2, 1]), 3, 2.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.class_density_forward(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32, device=DEV), 3, 2.0)
