"""Shared pytest fixtures and helpers for the idid_kernels test suite."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be
# set before triton is first imported; with a GPU the same tests run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
