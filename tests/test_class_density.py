"""Conformance of ``class_density`` (D_c: mean of exp(t (cos_ij - 1)) over ordered same-class pairs
i != j, 0 for classes of fewer than two rows; spec/idid.md) on every backend.

One contract, parametrized over the backends that run here: float64 agreement with the reference
(values and gradients for a random upstream gradient), float32 and bf16/fp16 tolerances, float64
gradcheck, the sharpness t, label layouts (random with absent classes, all rows one class, a single
class, every class a singleton, one huge class among small ones, skewed, C > 65536), class sizes
straddling each backend's tiles, zero rows, identical rows, bitwise determinism (with and without
torch.use_deterministic_algorithms, any thread count), requires_grad on and off, CUDA-graph replay
on a GPU, non-contiguous inputs left unmodified, opcheck on each backend's ops,
torch.compile(fullgraph=True), double backward, and out-of-range labels with the label check off
(IDID_KERNELS_CHECK_LABELS=0), where each backend has its documented outcome.

Without a GPU the cuda and triton backends run on CPU tensors (emulator, interpreter) at small
shapes (conftest.sized); on a GPU the same tests run natively at larger ones.
"""
from __future__ import annotations


import pytest
import torch

import idid_kernels as ik
from conftest import (
    backend_device, backend_params, deterministic, fused_backends, is_slow, kernel_ops, make_gen, rel_err, sized,
)
from idid_kernels import _chunks
from idid_kernels import reference as ref
from idid_kernels.reference import grads as ref_grads

OP = "class_density"
ALL = backend_params(OP)
FUSED = fused_backends(OP)
EXT = backend_params(OP, include=("cpp", "cuda"))  # the C++ ops (ops/class_density.py)

F64_TOL = 1e-10                 # float64 vs the float64 reference
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 reference (ARCHITECTURE.md)
LAYOUTS = ["random", "all_equal", "one_class", "singletons", "huge_class", "skewed", "absent_beside_pairs",
           "many_classes"]


def _layout(g, name, n, backend):
    """(labels, num_classes) on the CPU for a named layout of about n rows."""
    if name == "random":
        return torch.randint(0, 7, (n,), generator=g), 9  # classes 7 and 8 are absent
    if name == "all_equal":
        return torch.full((n,), 2, dtype=torch.int64), 4
    if name == "one_class":  # num_classes = 1
        return torch.zeros(n, dtype=torch.int64), 1
    if name == "singletons":
        return torch.randperm(n, generator=g), n + 1  # class n is absent
    if name == "huge_class":  # one class spanning many row tiles among small ones
        huge = sized(backend, 40, 600)
        labels = torch.cat([torch.full((huge,), 3, dtype=torch.int64), torch.randint(0, 3, (n,), generator=g)])
        return labels[torch.randperm(labels.numel(), generator=g)], 5
    if name == "skewed":  # one large class, two singletons (3, 4), absent classes (0, 2)
        labels = torch.full((n,), 1, dtype=torch.int64)
        labels[-2:] = torch.tensor([3, 4])
        return labels[torch.randperm(n, generator=g)], 5
    if name == "absent_beside_pairs":  # classes 0, 2, 4 absent, 1 a singleton
        return torch.tensor([3, 5, 1, 3, 5, 5, 3]), 6
    if name == "many_classes":  # mostly absent classes, a few pairs and triples; C > 65536 where fast
        c = sized(backend, 100, 70_000)
        some = torch.randint(0, c, (n // 2,), generator=g)
        labels = torch.cat([some, some[: n - n // 2 - 1], torch.tensor([c - 1])])
        return labels[torch.randperm(n, generator=g)], c
    raise ValueError(name)


def _rows(backend, name):
    """Rows of a layout: fewer for the emulated/interpreted backends."""
    small = {"random": 19, "all_equal": 17, "one_class": 9, "singletons": 13, "huge_class": 5, "skewed": 19,
             "many_classes": 31}
    big = {"random": 129, "all_equal": 257, "one_class": 33, "singletons": 13, "huge_class": 41, "skewed": 129,
           "many_classes": 211}
    return sized(backend, small, big).get(name, 7)


def _run(backend, x, labels, c, t, up, dtype=None, requires_grad=True):
    """(D, dx) through the public function on the backend's device, returned on the CPU."""
    dev = backend_device(backend)
    xt = x.to(dev, dtype or x.dtype).detach().requires_grad_(requires_grad)
    out = ik.class_density(xt, labels.to(dev), c, t=t, backend=backend)
    if not requires_grad:
        assert not out.requires_grad
        return out.cpu(), None
    (dx,) = torch.autograd.grad(out, xt, up.to(dev, out.dtype))
    return out.detach().cpu(), dx.cpu()


def _truth(x, labels, c, t, up):
    return ref.class_density(x, labels, c, t), ref_grads.class_density_backward(up, x, labels, t)



def _zero_where_fewer_than_two(out, dx, labels, c):
    counts = torch.bincount(labels, minlength=c)
    assert torch.equal(out[counts < 2], torch.zeros_like(out[counts < 2]))
    alone = counts[labels] < 2
    assert torch.equal(dx[alone], torch.zeros_like(dx[alone]))


# ------------------------------------------------------------------------------ values, gradients
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ALL)
def test_float64_matches_reference(backend, layout):
    # (the emulated/interpreted backends take the other t values in the float32 test only)
    for t in sized(backend, (1.7,), (0.5, 1.7, 8.0)):
        g = make_gen(len(layout) + int(10 * t))
        labels, c = _layout(g, layout, _rows(backend, layout), backend)
        x = 3 * torch.randn(labels.numel(), 37, generator=g, dtype=torch.float64)
        up = torch.randn(c, generator=g, dtype=torch.float64)
        out, dx = _run(backend, x, labels, c, t, up)
        truth = _truth(x, labels, c, t, up)
        assert out.dtype == dx.dtype == torch.float64 and out.shape == (c,) and dx.shape == x.shape
        assert rel_err(out, truth[0]) <= F64_TOL, t
        assert rel_err(dx, truth[1]) <= F64_TOL, t
        _zero_where_fewer_than_two(out, dx, labels, c)


def _float32_cases(backend):
    if is_slow(backend):
        return [("random", 1), ("random", 2), ("random", 19), ("all_equal", 2), ("all_equal", 17),
                ("singletons", 13), ("huge_class", 5), ("skewed", 19), ("many_classes", 31)]
    # Row counts around the kernels' sizes: cpp 128-row tiles; cuda 32 rows j per backward chunk and
    # 256 threads per block; triton 32..128-row tiles on a GPU. many_classes has C > 65536.
    return [("random", 1), ("random", 2), ("random", 31), ("random", 127), ("random", 128), ("random", 129),
            ("random", 257), ("all_equal", 1), ("all_equal", 2), ("all_equal", 32), ("all_equal", 33),
            ("all_equal", 65), ("all_equal", 127), ("all_equal", 128), ("all_equal", 129), ("all_equal", 257),
            ("one_class", 33), ("singletons", 13), ("huge_class", 41), ("skewed", 129), ("many_classes", 211)]


T_VALUES = [0.5, 2.0, 8.0]


@pytest.mark.parametrize("t", T_VALUES)
@pytest.mark.parametrize("backend", FUSED)
def test_float32_matches_float64_reference(backend, t):
    cases = _float32_cases(backend)
    if is_slow(backend):  # every case once, the t values taken in turn
        cases = cases[T_VALUES.index(t)::len(T_VALUES)]
    for layout, n in cases:
        g = make_gen(n + int(10 * t))
        labels, c = _layout(g, layout, n, backend)
        x = 3 * torch.randn(labels.numel(), 37, generator=g, dtype=torch.float64)
        up = torch.randn(c, generator=g, dtype=torch.float64)
        out, dx = _run(backend, x, labels, c, t, up, torch.float32)
        truth = _truth(x, labels, c, t, up)
        assert out.dtype == dx.dtype == torch.float32 and out.shape == (c,)
        assert rel_err(out, truth[0]) <= OUT_TOL, (layout, n)
        assert rel_err(dx, truth[1]) <= GRAD_TOL, (layout, n)
        _zero_where_fewer_than_two(out, dx, labels, c)


def _uniform_shapes(backend):
    """(B, C, d) with uniformly drawn labels: B = 1, C = 1, many absent classes; larger where fast
    (a thousand classes; on a GPU also 4099 rows of d = 512 in three classes)."""
    shapes = [(1, 2, 3), (6, 13, 16), (19, 1, 33)]
    if not is_slow(backend):
        shapes.append((257, 1001, 64))
    if backend_device(backend).type == "cuda":
        shapes.append((4099, 3, 512))
    return shapes


@pytest.mark.parametrize("backend", FUSED)
def test_float32_uniform_labels(backend):
    for b, c, d in _uniform_shapes(backend):
        g = make_gen(b + c + d)
        labels = torch.randint(0, c, (b,), generator=g)
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        up = torch.randn(c, generator=g, dtype=torch.float64)
        out, dx = _run(backend, x, labels, c, 2.0, up, torch.float32)
        truth = _truth(x, labels, c, 2.0, up)
        assert out.dtype == dx.dtype == torch.float32 and out.shape == (c,)
        assert rel_err(out, truth[0]) <= OUT_TOL, (b, c, d)
        assert rel_err(dx, truth[1]) <= GRAD_TOL, (b, c, d)


@pytest.mark.parametrize("layout", ["random", "all_equal", "singletons", "huge_class", "absent_beside_pairs"])
@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_float64(backend, layout):
    g = make_gen(10)
    if layout == "huge_class":
        # one class over several tiles (cpp 128 rows, cuda 32-row backward chunks), beside a pair and
        # a singleton; gradcheck is O(B d) forward passes, so d stays small
        big = 40 if backend == "reference" else sized(backend, 17, 140)
        labels, c = torch.cat([torch.full((big,), 1, dtype=torch.int64), torch.tensor([0, 0, 2])]), 3
    else:
        labels, c = _layout(g, layout, sized(backend, 11, 23), backend)
    x = torch.randn(labels.numel(), 4, generator=g, dtype=torch.float64).to(backend_device(backend))
    x.requires_grad_(True)
    labels = labels.to(x.device)
    assert torch.autograd.gradcheck(lambda a: ik.class_density(a, labels, c, t=1.5, backend=backend), (x,),
                                    atol=1e-8, rtol=1e-6, fast_mode=is_slow(backend))


def _tile_case(backend):
    """(class sizes, d) that straddle the backend's tiles."""
    if backend == "cpp":
        # direct dot products for small classes (n_c^2 d <= 2^15: n_c = 32 at d = 32), tiles of GEMMs
        # above; 129..131 span two 128-row tiles
        return list(range(2, 41)) + [129, 130, 131], 32
    if backend == "cuda":
        # 32-row backward chunks; d > 256 threads per block: a thread owns more than one column
        return sized(backend, ([2, 3, 31, 32, 33, 64, 65], 257), (list(range(2, 41)) + [64, 65, 66], 300))
    if backend == "triton":
        # 8-row, 32-feature blocks in the interpreter; 16..128 on a GPU
        return sized(backend, ([2, 7, 8, 9, 16, 17], 33), ([2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129], 129))
    return [2, 3, 31, 32, 33], 9


@pytest.mark.parametrize("backend", ALL)
def test_float64_tight_across_tile_sizes(backend):
    g = make_gen(18)
    sizes, d = _tile_case(backend)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = torch.randn(labels.numel(), d, generator=g, dtype=torch.float64)
    up = torch.randn(len(sizes), generator=g, dtype=torch.float64)
    out, dx = _run(backend, x, labels, len(sizes), 2.0, up)
    truth = _truth(x, labels, len(sizes), 2.0, up)
    assert out.dtype == dx.dtype == torch.float64
    assert rel_err(out, truth[0]) <= 1e-13 and rel_err(dx, truth[1]) <= 1e-12


@pytest.mark.parametrize("backend", ALL)
def test_singletons_and_absent_classes_give_exact_zeros(backend):
    g = make_gen(11)
    labels, c = _layout(g, "singletons", 10, backend)
    out, dx = _run(backend, torch.randn(10, 6, generator=g, dtype=torch.float64), labels, c, 2.0,
                   torch.randn(c, generator=g, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(c, dtype=torch.float64))
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("backend", ALL)
def test_identical_rows_give_one(backend):
    # kappa = 1 for identical directions: a class of copies has D_c = 1 (rows rescaled: invariant).
    x = torch.randn(1, 8, generator=make_gen(19), dtype=torch.float64).repeat(5, 1)
    x = x * torch.arange(1, 6, dtype=torch.float64)[:, None]
    dev = backend_device(backend)
    out = ik.class_density(x.to(dev), torch.zeros(5, dtype=torch.int64, device=dev), 2, t=3.0, backend=backend)
    torch.testing.assert_close(out.cpu(), torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ALL)
def test_zero_rows(backend, dtype):
    # F.normalize semantics: a zero row has u = 0 (kappa = exp(-t) with every partner) and a finite
    # gradient; autograd of the reference is the oracle.
    g = make_gen(12)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    x[[1, 5]] = 0
    up = torch.randn(3, generator=g, dtype=torch.float64)
    out, dx = _run(backend, x, labels, 3, 2.0, up, dtype)
    xr = x.clone().requires_grad_(True)
    out_r = ref.class_density(xr, labels, 3, 2.0)
    (dx_r,) = torch.autograd.grad(out_r, xr, up)
    tol = (1e-12, 1e-11) if dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert rel_err(out, out_r) <= tol[0] and rel_err(dx, dx_r) <= tol[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["random", "huge_class"])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_within_twice_eager_error(backend, layout, dtype):
    g = make_gen(13)
    labels, c = _layout(g, layout, sized(backend, 19, 97) if layout == "random" else sized(backend, 5, 20), backend)
    x = torch.randn(labels.numel(), 40, generator=g, dtype=torch.float64)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    truth = _truth(x, labels, c, 2.0, up)
    ours = _run(backend, x, labels, c, 2.0, up, dtype)
    dev = backend_device(backend)
    xe = x.to(dev, dtype).requires_grad_(True)
    out_e = ref.class_density(xe, labels.to(dev), c, 2.0)
    eager = (out_e.detach().cpu(), torch.autograd.grad(out_e, xe, up.to(dev, dtype))[0].cpu())
    assert ours[0].dtype == ours[1].dtype == dtype
    for a, b, truth_t in zip(ours, eager, truth):
        assert rel_err(a, truth_t) <= 2 * rel_err(b, truth_t) + 1e-2


def _big_case(backend):
    """float32: one class of 700 rows (12 where slow) among 40 classes."""
    g = make_gen(14)
    huge, rest = sized(backend, (12, 28), (700, 1300))
    labels = torch.cat([torch.full((huge,), 5, dtype=torch.int64), torch.randint(0, 40, (rest,), generator=g)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = torch.randn(labels.numel(), sized(backend, 24, 64), generator=g)
    return x, labels, 40, torch.randn(40, generator=g)


@pytest.mark.parametrize("backend", FUSED)
def test_big_case_matches_reference(backend):
    x, labels, c, up = _big_case(backend)
    out, dx = _run(backend, x, labels, c, 2.0, up)
    truth = _truth(x.double(), labels, c, 2.0, up.double())
    assert rel_err(out, truth[0]) <= OUT_TOL and rel_err(dx, truth[1]) <= GRAD_TOL


# ------------------------------------------------------------------------------ determinism, inputs
@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic_in_either_mode_and_for_any_thread_count(backend):
    # No atomics and fixed summation orders (cpp: tiles scheduled dynamically but summed in order):
    # repeated runs, torch.use_deterministic_algorithms and the CPU thread count leave the bits alone.
    x, labels, c, up = _big_case(backend)
    runs = []
    for flag in (False, False, True):
        with deterministic(flag):
            runs.append(_run(backend, x, labels, c, 2.0, up))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs.append(_run(backend, x, labels, c, 2.0, up))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


@pytest.mark.parametrize("backend", ALL)
def test_noncontiguous_inputs_not_modified(backend):
    g = make_gen(15)
    dev = backend_device(backend)
    x = torch.randn(30, 16, generator=g, dtype=torch.float64).to(dev)[:, ::2]
    labels = torch.randint(0, 4, (60,), generator=g).to(dev)[::2]
    up = torch.randn(8, generator=g, dtype=torch.float64).to(dev)[::2]
    assert not x.is_contiguous() and not labels.is_contiguous() and not up.is_contiguous()
    before = (x.clone(), labels.clone(), up.clone())
    out, dx = _run(backend, x, labels, 4, 2.0, up)
    truth = _truth(x.cpu(), labels.cpu(), 4, 2.0, up.cpu())
    assert rel_err(out, truth[0]) <= 1e-13 and rel_err(dx, truth[1]) <= 1e-12
    for a, b in zip(before, (x, labels, up)):
        assert torch.equal(a, b)
    if backend in ("cpp", "cuda"):
        # the op itself on the strided views (the public path may copy them first)
        ops = kernel_ops(backend)
        density, norm = ops.class_density_forward(x, labels, 4, 2.0)
        dx_op = ops.class_density_backward(up, x, labels, norm, 2.0)
        assert torch.equal(density.cpu(), out) and torch.equal(dx_op.cpu(), dx)
        for a, b in zip(before, (x, labels, up)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_no_grad_and_inference_mode_give_the_same_values(backend):
    # (cpp: the tile GEMMs run on worker threads, which do not inherit inference mode.)
    x, labels, c, up = _big_case(backend)
    with_grad, _ = _run(backend, x, labels, c, 2.0, up)
    without, _ = _run(backend, x, labels, c, 2.0, up, requires_grad=False)
    dev = backend_device(backend)
    with torch.no_grad():
        no_grad = ik.class_density(x.to(dev).detach().requires_grad_(True), labels.to(dev), c, backend=backend)
    with torch.inference_mode():
        inference = ik.class_density(x.to(dev), labels.to(dev), c, backend=backend)
    assert not no_grad.requires_grad and not inference.requires_grad
    for other in (without, no_grad.cpu(), inference.cpu()):
        assert torch.equal(other, with_grad)


@pytest.mark.parametrize("backend", backend_params(OP, include=("cuda", "triton")))
def test_cuda_graph_replays_with_new_features_and_labels(backend):
    # Forward and backward captured once (the label check is skipped during capture), then replayed
    # on new features and new labels (other class sizes): the results of eager calls on those.
    if backend_device(backend).type != "cuda":
        pytest.skip("CUDA graph capture needs a GPU")
    b, c, d = 1031, 129, 200
    g = make_gen(21)
    x = torch.randn(b, d, generator=g).to("cuda").requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to("cuda")
    up = torch.randn(c, generator=g).to("cuda")

    def step(a, y):
        out = ik.class_density(a, y, c, backend=backend)
        return (out, *torch.autograd.grad(out, a, up))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotuning and lazy initialisation happen before the capture
            step(x, labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x, labels)
    new_x = torch.randn(b, d, generator=g).to("cuda")
    new_labels, _ = _layout(g, "skewed", b, backend)
    new_labels = new_labels.to("cuda")
    with torch.no_grad():
        x.copy_(new_x)
        labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(new_x.clone().requires_grad_(True), new_labels)
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_chunk_budget_does_not_change_the_result(backend, monkeypatch):
    # The pairs are formed per class, not as chunks of logits: a tiny IDID_KERNELS_CHUNK_MB leaves
    # the bits unchanged.
    x, labels, c, up = _big_case(backend)
    default = _run(backend, x, labels, c, 2.0, up)
    monkeypatch.setenv(_chunks.ENV, "0.0001")
    _chunks.reload()
    tiny = _run(backend, x, labels, c, 2.0, up)
    assert torch.equal(default[0], tiny[0]) and torch.equal(default[1], tiny[1])


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_rejects_an_unsupported_dtype(backend):
    # functional rejects integer x first; the kernels refuse it too when called directly.
    dev = backend_device(backend)
    x = torch.ones(4, 3, dtype=torch.int64, device=dev)
    labels = torch.tensor([0, 1, 2, 1], device=dev)
    if backend == "triton":
        from idid_kernels.triton import class_density as tcd
        with pytest.raises(TypeError, match="class_density: the triton backend takes float32"):
            tcd.class_density(x, labels, 3, 2.0)
        return
    with pytest.raises(RuntimeError, match="x must be floating point"):
        kernel_ops(backend).class_density_forward(x, labels, 3, 2.0)


@pytest.mark.parametrize("backend", EXT)
def test_direct_op_rejects_bad_labels(backend):
    # The C++ ops check the labels' dtype and shape themselves; cpp also their range (cuda reads no
    # label on the host: see test_out_of_range_labels_without_the_check).
    ops = kernel_ops(backend)
    dev = backend_device(backend)
    x = torch.randn(4, 3, device=dev)
    with pytest.raises(RuntimeError, match="int64"):
        ops.class_density_forward(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32, device=dev), 3, 2.0)
    with pytest.raises(RuntimeError, match=r"labels must have shape \(4,\)"):
        ops.class_density_forward(x, torch.tensor([0, 1, 2], device=dev), 3, 2.0)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match=r"labels\[2\] = 7 is out of range"):
            ops.class_density_forward(x, torch.tensor([0, 1, 7, 1]), 3, 2.0)


# ------------------------------------------------------------------------------ out-of-range labels
C_BAD = 5
BASE = [0, 1, 0, 2, 1, 0, 0, 3, 0, 1, 4, 2, 2, 0, 1, 3, 0, 1, 0]  # 19 rows; row 4 is made out of range
BAD = [-100, -5, -1, C_BAD, C_BAD + 7]  # class_density has no ignore_index: -100 is out of range too


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", ALL)
def test_out_of_range_labels_without_the_check(backend, bad, monkeypatch):
    # functional rejects such labels before any launch (a ValueError on every backend); that check
    # reads the labels on the host and is skipped under torch.compile, during CUDA-graph capture and
    # with IDID_KERNELS_CHECK_LABELS=0. Then each backend has its documented outcome
    # (idid_kernels/triton/_idid_common.py, "Labels out of range"): the reference's index_select
    # raises IndexError; the cpp kernels check the labels themselves (a RuntimeError naming the
    # row); the cuda kernels sort the row outside every class, so it takes no part (D and the other
    # rows' gradients are those of the batch without it, its own gradient is 0); the triton kernels
    # never index with it and poison the result: NaN for every class and every gradient element,
    # whatever the upstream gradient.
    dev = backend_device(backend)
    g = make_gen(5)
    x = torch.randn(len(BASE), 6, generator=g, dtype=torch.float64).to(dev, torch.float32)
    up = torch.randn(C_BAD, generator=make_gen(6), dtype=torch.float64).to(dev, torch.float32)
    labels = torch.tensor(BASE)
    labels[4] = bad
    labels = labels.to(dev)
    with pytest.raises(ValueError, match=rf"labels\[4\] = {bad} is out of range"):
        ik.class_density(x, labels, C_BAD, backend=backend)

    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")

    def run(lab, x=x, upstream=up):
        xt = x.detach().clone().requires_grad_(True)
        density = ik.class_density(xt, lab, C_BAD, backend=backend)
        (dx,) = torch.autograd.grad(density, xt, upstream)
        return density, dx

    if backend == "reference":
        with pytest.raises(IndexError):
            run(labels)
    elif backend == "cpp":
        with pytest.raises(RuntimeError, match=rf"class_density: labels\[4\] = {bad} is out of range"):
            run(labels)
    elif backend == "cuda":
        density, dx = run(labels)
        keep = [i for i in range(len(BASE)) if i != 4]
        density_kept, dx_kept = run(labels[keep], x=x[keep])
        assert torch.equal(density, density_kept)
        assert torch.equal(dx[keep], dx_kept) and torch.count_nonzero(dx[4]) == 0
    else:
        for upstream in (up, torch.zeros_like(up)):
            density, dx = run(labels, upstream=upstream)
            assert torch.isnan(density).all() and torch.isnan(dx).all()
    # control: the same batch with the row in range is finite
    ok = labels.clone()
    ok[4] = 3
    density, dx = run(ok)
    assert torch.isfinite(density).all() and torch.isfinite(dx).all()


# ------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, dtype):
    g = make_gen(16)
    dev = backend_device(backend)
    x = torch.randn(12, 5, generator=g, dtype=dtype).to(dev).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 4, 3, 3, 1], device=dev)  # 2 and 5 absent, 4 a singleton
    grad = torch.randn(6, generator=g, dtype=dtype).to(dev)
    if backend == "triton":
        import idid_kernels.triton.class_density  # noqa: F401  (registers the ops)
        ops = torch.ops.idid_kernels
        torch.library.opcheck(ops.triton_class_density_forward.default, (x, labels, 6, 2.0))
        with torch.no_grad():
            _, norm, layout, offsets = ops.triton_class_density_forward(x, labels, 6, 2.0)
        torch.library.opcheck(ops.triton_class_density_backward.default,
                              (grad, x.detach(), norm, layout, offsets, 2.0))
        return
    ops = kernel_ops(backend)
    torch.library.opcheck(ops.class_density_forward.default, (x, labels, 6, 2.0))
    _, norm = ops.class_density_forward(x.detach(), labels, 6, 2.0)
    torch.library.opcheck(ops.class_density_backward.default, (grad, x.detach(), labels, norm, 2.0))


@pytest.mark.parametrize("backend", ALL)
def test_compiles_fullgraph(backend):
    def f(x, labels, w):
        return (ik.class_density(x, labels, 6, t=2.5, backend=backend) * w).sum()

    g = make_gen(17)
    dev = backend_device(backend)
    x = torch.randn(19, 8, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, 5, (19,), generator=g).to(dev)
    w = torch.randn(6, generator=g).to(dev)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels, w)
    (dx,) = torch.autograd.grad(loss, x)
    loss2 = f(x, labels, w)
    (dx2,) = torch.autograd.grad(loss2, x)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(dx, dx2)


@pytest.mark.parametrize("backend", ALL)
def test_double_backward(backend):
    # The fused backwards are not differentiable: create_graph=True is refused, naming the op; the
    # reference is plain autograd and gives second derivatives.
    dev = backend_device(backend)
    x = torch.randn(6, 3, generator=make_gen(20), dtype=torch.float64).to(dev).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1, 1, 2], device=dev)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(lambda a: ik.class_density(a, labels, 3, backend=backend), (x,))
        return
    out = ik.class_density(x, labels, 3, backend=backend).sum()
    with pytest.raises(NotImplementedError, match="class_density.*double backward"):
        torch.autograd.grad(out, x, create_graph=True)
