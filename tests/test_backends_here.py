"""The backends the conformance suites (tests/test_<op>.py) run over are the ones this machine
should have: in CI (IDID_KERNELS_REQUIRE_EXT=1) a backend that is expected and missing fails here,
so its skipped parametrizations elsewhere are never a silent pass."""
import os

import pytest
import torch

import idid_kernels as ik
from conftest import GPU, REQUIRE_EXT, backend_device, backend_params, kernel_ops
from idid_kernels import _backends


def expected_backends() -> set[str]:
    """What must run here: the reference always; with a required extension the cpp kernels and the
    CUDA kernels (native on a GPU of a CUDA build, else emulated on the CPU); triton when importable."""
    want = {"reference"}
    if REQUIRE_EXT:
        want.add("cpp")
        if GPU or os.environ.get("IDID_KERNELS_NO_CUDA_EMULATOR") != "1":
            want.add("cuda")
    try:
        import triton  # noqa: F401
        want.add("triton")
    except ImportError:
        pass
    return want


def test_every_expected_backend_is_available():
    have = set(ik.available_backends())
    missing = {b: _backends.missing(b) for b in expected_backends() - have}
    assert not missing, f"backends expected here but unavailable: {missing}"


def test_without_a_gpu_cuda_and_triton_run_on_cpu_tensors():
    if GPU:
        pytest.skip("on a GPU the cuda and triton backends run natively (backend_device is cuda)")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert os.environ.get("IDID_KERNELS_CUDA_EMULATE") == "1"
    assert os.environ.get("IDID_KERNELS_CUDA_EMULATE_ORDER", "").startswith("random")
    for b in ("cuda", "triton"):
        assert backend_device(b) == torch.device("cpu")
    if "cuda" in ik.available_backends():
        assert _backends.cuda_emulated()
        assert kernel_ops("cuda") is torch.ops.idid_kernels_emu
    # auto never picks an emulated or interpreted backend
    x = torch.randn(4, 3)
    assert _backends.select_backend("norm_contraction", "auto", x.device) in ("cpp", "reference")


def test_backend_params_skip_says_why():
    params = {p.id: p for p in backend_params("cm_margin_loss")}
    assert list(params) == ["reference", "cpp", "cuda", "triton"]
    for b, p in params.items():
        if b in ik.available_backends():
            assert not p.marks, b
        else:
            (mark,) = p.marks
            assert mark.name == "skip" and b in mark.kwargs["reason"]
