"""Shared pytest fixtures and helpers for the idid_kernels test suite."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported; with a GPU the same tests run natively.
# Likewise the CUDA kernels run on CPU tensors under the CUDA-execution emulator (csrc/emu), in a
# seeded random order of blocks and threads: a missing barrier that the forward order hides changes
# the results there (tests/test_cuda_emulator.py shows three such mutants caught only off forward).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("IDID_KERNELS_CUDA_EMULATE", "1")
    os.environ.setdefault("IDID_KERNELS_CUDA_EMULATE_ORDER", "random:20261202")

GPU = torch.cuda.is_available()
# In CI a backend that should run here and does not is a failure, not a skip.
REQUIRE_EXT = os.environ.get("IDID_KERNELS_REQUIRE_EXT") == "1"


@pytest.fixture(autouse=True)
def _fresh_chunk_budget():
    """The chunk budget (IDID_KERNELS_CHUNK_MB) is read once and cached: a test that changes the
    variable reloads it, and after every test (autouse, so after monkeypatch has restored the
    environment) the next use reads the environment again."""
    yield
    from idid_kernels import _chunks
    _chunks.reset()


# ---------------------------------------------------------------------------------------------
# Numerical comparison helpers (used by test_reference.py, test_grads.py, test_idid_properties.py)
# ---------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the ARCHITECTURE.md gradient metric).

    When ``b`` is exactly zero the absolute error ||a|| is returned instead, so that comparing
    two all-zero gradients gives 0 and a non-zero ``a`` against a zero ``b`` still fails.
    """
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    den = torch.linalg.vector_norm(b)
    num = torch.linalg.vector_norm(a - b)
    return float(num / den) if den > 0 else float(num)


def make_gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (explicit, so tests never touch the global RNG)."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded CPU generator (seed 0)."""
    return make_gen(0)


# ---------------------------------------------------------------------------------------------
# Backends: the conformance suites (tests/test_<op>.py) run one contract per op over every backend
# that runs here, each on its own device: reference and cpp on the CPU; cuda and triton natively on
# a GPU, or on CPU tensors under the emulator / Triton's interpreter without one.
# ---------------------------------------------------------------------------------------------


def backend_device(backend: str) -> torch.device:
    """The device whose tensors ``backend`` takes in the conformance suites."""
    if backend in ("cuda", "triton") and GPU:
        return torch.device("cuda")
    return torch.device("cpu")


def is_slow(backend: str) -> bool:
    """Whether ``backend`` runs its kernels emulated or interpreted here (about 10^3 times slower
    than native): such backends take the small shapes of :func:`sized`."""
    return backend in ("cuda", "triton") and not GPU


def sized(backend: str, small, big):
    """``small`` for an emulated/interpreted backend, ``big`` otherwise."""
    return small if is_slow(backend) else big


def kernel_ops(backend: str):
    """The torch.ops library holding ``backend``'s kernels on its device, for opcheck and direct-op
    tests: torch.ops.idid_triton for triton, torch.ops.idid_kernels_emu for the emulated CUDA
    kernels, else torch.ops.idid_kernels (cpp and native cuda)."""
    from idid_kernels import _backends
    if backend == "triton":
        import importlib
        for op in ("cm_margin", "idid_loss", "class_density", "pairwise_cosine", "norm_contraction"):
            importlib.import_module(f"idid_kernels.triton.{op}")  # each module registers its ops
        return torch.ops.idid_triton
    return getattr(torch.ops, _backends.op_namespace(backend, backend_device(backend)))


def _skip_reason(backend: str, op: str | None) -> str | None:
    from idid_kernels import _backends
    why = _backends.missing(backend)
    if why is not None:
        return why
    if op is not None and backend not in _backends.IMPLEMENTED[op]:
        return f"{backend} has no kernel for {op}"
    return None


def backend_params(op: str | None = None, *, include=("reference", "cpp", "cuda", "triton")):
    """pytest params over ``include``: each one a backend id; a backend that cannot run here is a
    skip that says why. (tests/test_backends_here.py fails CI when an expected backend is missing,
    so the skips here are never silent there.)"""
    params = []
    for b in include:
        why = _skip_reason(b, op)
        marks = [pytest.mark.skip(reason=f"backend {b!r}: {why}")] if why else []
        params.append(pytest.param(b, id=b, marks=marks))
    return params


def fused_backends(op: str | None = None):
    """:func:`backend_params` without the reference (tests comparing a kernel against it)."""
    return backend_params(op, include=("cpp", "cuda", "triton"))


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled) for the block (warn_only: cuBLAS, which the cuda
    backend's GEMMs use, would otherwise raise without CUBLAS_WORKSPACE_CONFIG on a GPU)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


class OpLog(TorchDispatchMode):
    """Records the idid custom ops that run (below autograd) while active."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("idid_"):
            self.ops.add(name.split(".")[1])
        return func(*args, **(kwargs or {}))
