"""The ``cuda`` backend (the CUDA kernels of idid_kernels._C) against the float64 reference: float32
tolerances, float64 gradcheck, edge layouts, low-precision dtypes, bitwise determinism, opcheck,
torch.compile, and the absence of host synchronisation.

GPU-only: the whole module is skipped where torch sees no CUDA device, since these kernels cannot run
on a CPU (CPU-only machines check that they compile with nvcc instead). On a machine with a GPU it
runs as is: ``python -m pytest -q tests/test_cuda_backend.py`` after building the extension with a
CUDA build of torch and nvcc on PATH.
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends
from idid_kernels import reference as ref
from idid_kernels.reference import grads as ref_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only test: no CUDA device is visible to torch, and the CUDA kernels "
                                       "cannot run without one")

DEV = torch.device("cuda")
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 oracle (ARCHITECTURE.md)


def test_cuda_backend_is_available_on_a_gpu():
    # A GPU machine whose extension lacks CUDA would otherwise fail every test below less clearly.
    assert _backends.missing("cuda") is None, _backends.missing("cuda")


def _feats(g, n, d, dtype=torch.float64):
    """(n, d) features drawn on the CPU (reproducible everywhere), in float64 unless told."""
    return torch.randn(n, d, generator=g, dtype=dtype)


# ---- class_density
def _density_run(x, labels, num_classes, t, up, backend="cuda"):
    """(D, dx) through the public function on the GPU for upstream gradient ``up``; CPU inputs are
    moved to the GPU, results come back on the GPU."""
    x = x.to(DEV).clone().requires_grad_(True)
    out = ik.class_density(x, labels.to(DEV), num_classes, t=t, backend=backend)
    (dx,) = torch.autograd.grad(out, x, up.to(device=DEV, dtype=out.dtype))
    return out.detach(), dx


def _density_truth(x, labels, num_classes, t, up):
    """float64 reference (D, dx) on the CPU."""
    return ref.class_density(x, labels, num_classes, t), ref_grads.class_density_backward(up, x, labels, t)


def _labels_layout(g, layout, n):
    """(labels, num_classes) on the CPU for a named layout of n rows."""
    if layout == "random":
        return torch.randint(0, 7, (n,), generator=g), 9  # classes 7 and 8 are absent
    if layout == "all_equal":
        return torch.full((n,), 2, dtype=torch.int64), 4
    if layout == "singletons":
        return torch.randperm(n, generator=g), n + 1  # class n is absent
    if layout == "huge_class":  # one class of 600 rows among small ones
        labels = torch.cat([torch.full((600,), 3, dtype=torch.int64), torch.randint(0, 3, (n,), generator=g)])
        return labels[torch.randperm(labels.numel(), generator=g)], 5
    if layout == "many_classes":  # C > 65536: mostly absent classes, a few pairs and triples
        some = torch.randint(0, 70_000, (n // 2,), generator=g)
        labels = torch.cat([some, some[: n - n // 2 - 1], torch.tensor([69_999])])
        return labels[torch.randperm(n, generator=g)], 70_000
    raise ValueError(layout)


# Row counts around the kernels' sizes: 32 rows j per backward chunk, 256 threads per block.
DENSITY_CASES = [("random", 1), ("random", 2), ("random", 31), ("random", 127), ("random", 257),
                 ("all_equal", 1), ("all_equal", 2), ("all_equal", 32), ("all_equal", 33), ("all_equal", 65),
                 ("all_equal", 257), ("singletons", 13), ("huge_class", 41), ("many_classes", 211)]


@pytest.mark.parametrize("t", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("layout,n", DENSITY_CASES, ids=lambda v: str(v))
def test_class_density_cuda_float32_matches_float64_reference(layout, n, t):
    g = make_gen(n + int(10 * t))
    labels, c = _labels_layout(g, layout, n)
    x = 3 * _feats(g, labels.numel(), 37)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    truth = _density_truth(x, labels, c, t, up)
    out, dx = _density_run(x.float(), labels, c, t, up)
    assert out.dtype == dx.dtype == torch.float32 and out.shape == (c,) and dx.shape == x.shape
    assert out.device.type == dx.device.type == "cuda"
    assert rel_err(out.cpu(), truth[0]) <= OUT_TOL
    assert rel_err(dx.cpu(), truth[1]) <= GRAD_TOL
    counts = torch.bincount(labels, minlength=c)
    assert torch.equal(out.cpu()[counts < 2], torch.zeros_like(out.cpu()[counts < 2]))


@pytest.mark.parametrize("layout", ["random", "all_equal", "singletons", "two_chunks"])
def test_class_density_cuda_gradcheck_float64(layout):
    g = make_gen(10)
    if layout == "two_chunks":  # a 40-row class: the backward's second chunk of rows j is partial
        labels, c = torch.cat([torch.full((40,), 1, dtype=torch.int64), torch.tensor([0, 0, 2])]), 3
    else:
        labels, c = _labels_layout(g, layout, 23)
    x = _feats(g, labels.numel(), 4).to(DEV).requires_grad_(True)
    labels = labels.to(DEV)
    assert torch.autograd.gradcheck(lambda a: ik.class_density(a, labels, c, t=1.5, backend="cuda"), (x,))


def test_class_density_cuda_float64_tight_across_block_and_chunk_sizes():
    # Class sizes 2..40 and 64..66 straddle the 32-row chunks; d = 300 exceeds the 256 threads per
    # block, so threads own more than one column.
    g = make_gen(18)
    sizes = list(range(2, 41)) + [64, 65, 66]
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = _feats(g, labels.numel(), 300)
    up = torch.randn(len(sizes), generator=g, dtype=torch.float64)
    out, dx = _density_run(x, labels, len(sizes), 2.0, up)
    truth = _density_truth(x, labels, len(sizes), 2.0, up)
    assert out.dtype == dx.dtype == torch.float64
    assert rel_err(out.cpu(), truth[0]) <= 1e-13 and rel_err(dx.cpu(), truth[1]) <= 1e-12


def test_class_density_cuda_matches_cpp_backend():
    g = make_gen(19)
    labels, c = _labels_layout(g, "huge_class", 30)
    x = _feats(g, labels.numel(), 24)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    ours = _density_run(x, labels, c, 2.0, up)
    xc = x.clone().requires_grad_(True)
    cpp = ik.class_density(xc, labels, c, t=2.0, backend="cpp")
    (dx_cpp,) = torch.autograd.grad(cpp, xc, up)
    assert rel_err(ours[0].cpu(), cpp) <= 1e-13 and rel_err(ours[1].cpu(), dx_cpp) <= 1e-12


def test_class_density_cuda_singletons_and_absent_classes_give_zero():
    g = make_gen(11)
    labels, c = _labels_layout(g, "singletons", 10)
    out, dx = _density_run(_feats(g, 10, 6), labels, c, 2.0, torch.randn(c, generator=g, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(c, dtype=torch.float64, device=DEV))
    assert torch.equal(dx, torch.zeros_like(dx))


def test_class_density_cuda_absent_classes_beside_pairs():
    # Classes 0, 2, 4 absent, 1 a singleton: exact zeros there and for the singleton's gradient.
    g = make_gen(20)
    labels = torch.tensor([3, 5, 1, 3, 5, 5, 3])
    x = _feats(g, 7, 5)
    up = torch.randn(6, generator=g, dtype=torch.float64)
    out, dx = _density_run(x, labels, 6, 2.0, up)
    truth = _density_truth(x, labels, 6, 2.0, up)
    assert torch.equal(out.cpu()[[0, 1, 2, 4]], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(dx[2], torch.zeros(5, dtype=torch.float64, device=DEV))
    assert rel_err(out.cpu(), truth[0]) <= 1e-13 and rel_err(dx.cpu(), truth[1]) <= 1e-12


def test_class_density_cuda_identical_rows_is_one():
    x = torch.randn(1, 8, dtype=torch.float64).repeat(5, 1) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    out = ik.class_density(x.to(DEV), torch.zeros(5, dtype=torch.int64, device=DEV), 2, t=3.0, backend="cuda")
    torch.testing.assert_close(out.cpu(), torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_density_cuda_zero_rows(dtype):
    g = make_gen(12)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = _feats(g, 9, 5)
    x[[1, 5]] = 0
    up = torch.randn(3, generator=g, dtype=torch.float64)
    out, dx = _density_run(x.to(dtype), labels, 3, 2.0, up)
    xr = x.clone().requires_grad_(True)
    out_r = ref.class_density(xr, labels, 3, 2.0)
    (dx_r,) = torch.autograd.grad(out_r, xr, up)
    tol = (1e-12, 1e-11) if dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert rel_err(out.cpu(), out_r) <= tol[0] and rel_err(dx.cpu(), dx_r) <= tol[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,n", [("random", 97), ("huge_class", 20)])
def test_class_density_cuda_low_precision_within_twice_eager_error(dtype, layout, n):
    g = make_gen(13)
    labels, c = _labels_layout(g, layout, n)
    x = _feats(g, labels.numel(), 40)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    truth = _density_truth(x, labels, c, 2.0, up)
    ours = _density_run(x.to(dtype), labels, c, 2.0, up)
    eager = _density_run(x.to(dtype), labels, c, 2.0, up, backend="reference")
    assert ours[0].dtype == ours[1].dtype == dtype
    for a, b, truth_t in zip(ours, eager, truth):
        assert rel_err(a.cpu(), truth_t) <= 2 * rel_err(b.cpu(), truth_t) + 1e-2


def _density_big_case():
    g = make_gen(14)
    labels = torch.cat([torch.full((700,), 5, dtype=torch.int64), torch.randint(0, 40, (1300,), generator=g)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    return _feats(g, labels.numel(), 64, torch.float32), labels, 40, torch.randn(40, generator=g)


def test_class_density_cuda_bitwise_deterministic():
    # No atomics and fixed summation orders: repeated runs give the same bits.
    x, labels, c, up = _density_big_case()
    first = _density_run(x, labels, c, 2.0, up)
    for _ in range(3):
        again = _density_run(x, labels, c, 2.0, up)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_class_density_cuda_big_case_matches_reference():
    x, labels, c, up = _density_big_case()
    out, dx = _density_run(x, labels, c, 2.0, up)
    truth = _density_truth(x.double(), labels, c, 2.0, up.double())
    assert rel_err(out.cpu(), truth[0]) <= OUT_TOL and rel_err(dx.cpu(), truth[1]) <= GRAD_TOL


def test_class_density_cuda_does_not_synchronise():
    # Sort, class offsets and kernels all stay on the device: no count is read on the host. The op
    # is called directly (the public function validates labels first, which may synchronise).
    x, labels, c, up = _density_big_case()
    x, labels, up = x.to(DEV), labels.to(DEV), up.to(DEV)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        density, norm = torch.ops.idid_kernels.class_density_forward(x, labels, c, 2.0)
        dx = torch.ops.idid_kernels.class_density_backward(up, x, labels, norm, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert density.shape == (c,) and dx.shape == x.shape and torch.isfinite(dx).all()


def test_class_density_cuda_noncontiguous_inputs_and_no_inplace():
    g = make_gen(15)
    x = _feats(g, 30, 16).to(DEV)[:, ::2]
    labels = torch.randint(0, 4, (60,), generator=g).to(DEV)[::2]
    up = torch.randn(8, generator=g, dtype=torch.float64).to(DEV)[::2]
    assert not x.is_contiguous() and not labels.is_contiguous() and not up.is_contiguous()
    before = (x.clone(), labels.clone(), up.clone())
    out, dx = _density_run(x, labels, 4, 2.0, up)
    truth = _density_truth(x.cpu(), labels.cpu(), 4, 2.0, up.cpu())
    assert rel_err(out.cpu(), truth[0]) <= 1e-13 and rel_err(dx.cpu(), truth[1]) <= 1e-12
    for a, b in zip(before, (x, labels, up)):
        assert torch.equal(a, b)
    # The op itself on the strided views (the public path may copy them first).
    ops = torch.ops.idid_kernels
    density, norm = ops.class_density_forward(x, labels, 4, 2.0)
    dx_op = ops.class_density_backward(up, x, labels, norm, 2.0)
    assert torch.equal(density, out) and torch.equal(dx_op, dx)
    for a, b in zip(before, (x, labels, up)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_density_cuda_opcheck(dtype):
    g = make_gen(16)
    x = _feats(g, 12, 5, dtype).to(DEV).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 4, 3, 3, 1], device=DEV)
    ops = torch.ops.idid_kernels
    torch.library.opcheck(ops.class_density_forward.default, (x, labels, 6, 2.0))
    _, norm = ops.class_density_forward(x.detach(), labels, 6, 2.0)
    torch.library.opcheck(ops.class_density_backward.default,
                          (torch.randn(6, generator=g, dtype=dtype).to(DEV), x.detach(), labels, norm, 2.0))


def test_class_density_cuda_compiles_fullgraph():
    def f(x, labels, w):
        return (ik.class_density(x, labels, 6, t=2.5, backend="cuda") * w).sum()

    g = make_gen(17)
    x = _feats(g, 19, 8, torch.float32).to(DEV).requires_grad_(True)
    labels = torch.randint(0, 5, (19,), generator=g).to(DEV)
    w = torch.randn(6, generator=g).to(DEV)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels, w)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    loss2 = f(x2, labels, w)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(x.grad, x2.grad)


def test_class_density_cuda_direct_op_rejects_mismatched_devices():
    x = torch.randn(4, 3, device=DEV)
    with pytest.raises(RuntimeError, match="labels must be on x's device"):
        torch.ops.idid_kernels.class_density_forward(x, torch.tensor([0, 1, 2, 1]), 3, 2.0)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.idid_kernels.class_density_forward(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32, device=DEV),
                                                     3, 2.0)


def test_class_density_auto_leaves_unverified_cuda_alone():
    # Until the CUDA kernels have passed this file on a GPU, "auto" does not pick them (README, Status);
    # backend="cuda" must still run them on request.
    assert _backends.select_backend("class_density", "auto", DEV) == "reference"
    assert _backends.select_backend("class_density", "cuda", DEV) == "cuda"
