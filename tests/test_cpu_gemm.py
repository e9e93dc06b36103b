"""The CPU kernels' GEMM engine (csrc/cpu/gemm.h, idid_kernels.cpu_gemm): each engine multiplies
exactly enough (float64 against torch.mm, float32 against float64), the fused ops keep their
float32 contract under each engine at shapes whose GEMMs are big enough to take oneDNN, and the
GEMMs there really run through the engine asked for."""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _backends, _gemm, reference

HAVE_EXT = "cpp" in ik.available_backends()
pytestmark = pytest.mark.skipif(not HAVE_EXT, reason="idid_kernels._C is not built (IDID_KERNELS_NO_EXT)")
ENGINES = ["aten"] + (["onednn"] if HAVE_EXT and _gemm.onednn_available() else [])


@pytest.fixture
def engine(request):
    before = _backends.extension().cpu_gemm()
    ik.cpu_gemm(request.param)
    yield request.param
    ik.cpu_gemm("auto")
    assert ik.cpu_gemm() == before


def _onednn_calls() -> int:
    return int(_backends.extension().onednn_calls())


def _rel(a, b):
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_setting_is_validated():
    assert ik.cpu_gemm() in ("aten", "onednn")
    with pytest.raises(ValueError, match="engine must be one of"):
        ik.cpu_gemm("mkl")


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("shape", [(8, 5, 3), (256, 128, 192)])  # under and over oneDNN's size floor
def test_cpu_mm_matches_torch(engine, layout, shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=g, dtype=torch.float64) if layout[0] == "n" else \
        torch.randn(k, m, generator=g, dtype=torch.float64).t()
    b = torch.randn(k, n, generator=g, dtype=torch.float64) if layout[1] == "n" else \
        torch.randn(n, k, generator=g, dtype=torch.float64).t()
    truth = a @ b
    assert torch.equal(torch.ops.idid_kernels.cpu_mm(a, b), truth)  # float64: always torch.mm's BLAS
    into = torch.full((m, n), float("nan"), dtype=torch.float64)
    torch.ops.idid_kernels.cpu_mm_out(a, b, into)
    assert torch.equal(into, truth)
    big = m * n * k >= 128 ** 3
    for out_variant in (False, True):
        before = _onednn_calls()
        if out_variant:
            out = torch.full((m, n), float("nan"))
            torch.ops.idid_kernels.cpu_mm_out(a.float(), b.float(), out)
        else:
            out = torch.ops.idid_kernels.cpu_mm(a.float(), b.float())
        assert out.dtype == torch.float32 and out.shape == (m, n)
        assert _rel(out, truth) < 1e-6
        assert _onednn_calls() - before == (1 if engine == "onednn" and big else 0)


def test_cpu_mm_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.idid_kernels.cpu_mm(torch.ones(3, 4), torch.ones(5, 2))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.idid_kernels.cpu_mm(torch.ones(3, 4), torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected"):
        torch.ops.idid_kernels.cpu_mm_out(torch.ones(3, 4), torch.ones(5, 2), torch.empty(3, 2))
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.idid_kernels.cpu_mm_out(torch.ones(3, 4), torch.ones(4, 2), torch.empty(2, 3))
    with pytest.raises(RuntimeError, match="out is"):
        torch.ops.idid_kernels.cpu_mm_out(torch.ones(3, 4), torch.ones(4, 2), torch.empty(3, 2, dtype=torch.float64))
    a = torch.ones(4, 4)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.idid_kernels.cpu_mm_out(a, torch.ones(4, 4), a)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_bench_floor_runs_in_the_kernels_engine(engine):
    """The bench's floor multiplies in the engine the kernels use, so its fraction counts only the work
    around their GEMMs; float64 floors keep torch.mm."""
    from idid_kernels.bench.cases import _linear_gemms, floor_mm

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(256, 128, generator=g), torch.randn(192, 128, generator=g)
    assert (floor_mm(x) is torch.mm) == (engine == "aten")
    assert floor_mm(x.double()) is torch.mm
    a, b = x[:64], w.t()
    assert _rel(floor_mm(x)(a, b), a.double() @ b.double()) < 1e-6
    run = _linear_gemms([x, w])
    before = _onednn_calls()
    run()
    assert _onednn_calls() - before == (3 if engine == "onednn" else 0)
    from idid_kernels.bench.runner import _gemm_line
    line = _gemm_line(torch.device("cpu"))
    assert ("oneDNN" in line) == (engine == "onednn") and "floor" in line
    assert "oneDNN (" not in _gemm_line(torch.device("cpu"), torch.float64)  # a float64 floor is torch.mm's


def test_binding_takes_an_engine_index():
    ext = _backends.extension()
    with pytest.raises(ValueError, match="engine index"):
        ext.cpu_gemm(3)
    with pytest.raises(ValueError, match="engine index"):
        ext.cpu_gemm(-1)
    with pytest.raises(TypeError):
        ext.cpu_gemm("aten")
    assert ext.cpu_gemm() in ("aten", "onednn")


def _cm(x, w, y, backend):
    return ik.cm_margin_loss(x, w, y, margin="cosface", m=0.4, s=16.0, backend=backend) if backend else \
        reference.cm_margin_loss(x, w, y, margin="cosface", m=0.4, s=16.0)


def _idid(x, p, theta, y, backend):
    return ik.idid_loss(x, p, theta, y, alpha=16.0, backend=backend) if backend else \
        reference.idid_loss(x, p, theta, y, alpha=16.0)


def _pairwise(x, y, backend):
    return ik.pairwise_cosine(x, y, backend=backend) if backend else reference.pairwise_cosine(x, y)


def _inputs(op, g):
    if op == "cm":
        return [torch.randn(128, 128, generator=g), torch.randn(512, 128, generator=g)], \
            [torch.randint(0, 512, (128,), generator=g)], _cm
    if op == "idid":
        return [torch.randn(128, 128, generator=g), torch.randn(256, 128, generator=g),
                0.1 * torch.randn(256, 256, generator=g)], [torch.randint(0, 256, (128,), generator=g)], _idid
    return [torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)], [], _pairwise


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("op", ["cm", "idid", "pairwise"])
def test_fused_ops_keep_the_float32_contract(engine, op):
    g = torch.Generator().manual_seed(7)
    diff, const, fn = _inputs(op, g)
    x64 = [t.double().requires_grad_() for t in diff]
    truth = fn(*x64, *const, None)
    up = torch.randn(truth.shape, generator=g, dtype=torch.float64)
    grads64 = torch.autograd.grad(truth, x64, up)
    x32 = [t.float().requires_grad_() for t in diff]
    before = _onednn_calls()
    out = fn(*x32, *const, "cpp")
    grads = torch.autograd.grad(out, x32, up.float())
    used = _onednn_calls() - before
    assert used > 0 if engine == "onednn" else used == 0
    assert _rel(out.detach(), truth.detach()) < 1e-5
    assert max(_rel(a, b) for a, b in zip(grads, grads64)) < 1e-4
