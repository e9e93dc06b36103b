"""The C++ extension's pairwise_cosine and class_density (cpp backend) against the float64
reference, plus the op plumbing: gradcheck, opcheck, torch.compile, bitwise determinism, edge shapes
(1, primes, the 128-row tile size +- 1), zero rows, label layouts and low-precision dtypes."""
from __future__ import annotations

import os

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends
from idid_kernels import reference as ref
from idid_kernels.reference import grads as ref_grads

HAVE_EXT = "cpp" in ik.available_backends()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="idid_kernels._C is not built (IDID_KERNELS_NO_EXT)")
OPS = torch.ops.idid_kernels if HAVE_EXT else None

OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 oracle (ARCHITECTURE.md)


def test_primitive_ops_registered_when_required():
    # .ci/run sets IDID_KERNELS_REQUIRE_EXT=1: there a missing extension is a failure, not a skip.
    if os.environ.get("IDID_KERNELS_REQUIRE_EXT") == "1":
        assert HAVE_EXT, _backends.missing("cpp")
    if HAVE_EXT:
        for name in ("pairwise_cosine_forward", "pairwise_cosine_backward", "class_density_forward",
                     "class_density_backward"):
            assert hasattr(torch.ops.idid_kernels, name)


def _feats(g, n, d, dtype=torch.float64):
    return torch.randn(n, d, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------ pairwise_cosine
def _cosine_case(g, n, m, d, with_y):
    """float64 (x, y or None, upstream grad) for an (n, m) cosine matrix (m = n without y)."""
    x = 2 * _feats(g, n, d)
    y = 0.5 * _feats(g, m, d) if with_y else None
    up = torch.randn(n, m if with_y else n, generator=g, dtype=torch.float64)
    return x, y, up


def _cosine_truth(x, y, up):
    out = ref.pairwise_cosine(x, y)
    dx, dy = ref_grads.pairwise_cosine_backward(up, x, y)
    return out, dx, dy


def _cosine_run(x, y, up, backend="cpp"):
    """(out, dx, dy) through the public function; dy is None without y."""
    x = x.clone().requires_grad_(True)
    y = None if y is None else y.clone().requires_grad_(True)
    out = ik.pairwise_cosine(x, y, backend=backend)
    grads = torch.autograd.grad(out, [x] if y is None else [x, y], up.to(out.dtype))
    return out.detach(), grads[0], (grads[1] if y is not None else None)


@needs_ext
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_gradcheck_float64(with_y):
    g = make_gen(0)
    x = _feats(g, 7, 5).requires_grad_(True)
    if with_y:
        y = _feats(g, 4, 5).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: ik.pairwise_cosine(a, b, backend="cpp"), (x, y))
    else:
        assert torch.autograd.gradcheck(lambda a: ik.pairwise_cosine(a, backend="cpp"), (x,))


@needs_ext
@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_pairwise_cosine_gradcheck_one_side(needs):
    # Only the input that requires grad gets one (the backward skips the other GEMM).
    g = make_gen(1)
    x = _feats(g, 6, 4).requires_grad_(needs[0])
    y = _feats(g, 5, 4).requires_grad_(needs[1])
    assert torch.autograd.gradcheck(lambda a, b: ik.pairwise_cosine(a, b, backend="cpp"), (x, y))
    out = ik.pairwise_cosine(x, y, backend="cpp")
    out.sum().backward()
    assert (x.grad is not None) == needs[0] and (y.grad is not None) == needs[1]


SHAPES = [(1, 1, 1), (1, 5, 3), (2, 3, 7), (31, 17, 13), (127, 128, 129), (128, 129, 64), (129, 127, 32),
          (257, 1, 33)]


@needs_ext
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pairwise_cosine_float32_matches_float64_reference(shape, with_y):
    n, m, d = shape
    x, y, up = _cosine_case(make_gen(sum(shape)), n, m, d, with_y)
    truth = _cosine_truth(x, y, up)
    out, dx, dy = _cosine_run(x.float(), None if y is None else y.float(), up)
    assert out.dtype == dx.dtype == torch.float32
    assert out.shape == truth[0].shape
    assert rel_err(out, truth[0]) <= OUT_TOL
    if n == 1 and not with_y:
        # S = [[1]] whatever x is: the true gradient is exactly 0, so only rounding noise is left;
        # bound it on the natural scale ||G|| / ||x|| of this gradient instead.
        assert float(dx.norm()) <= 1e-6 * float(up.norm() / x.norm())
    else:
        assert rel_err(dx, truth[1]) <= GRAD_TOL
    if with_y:
        assert dy.dtype == torch.float32 and rel_err(dy, truth[2]) <= GRAD_TOL


@needs_ext
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_cosine_zero_rows(dtype, with_y):
    # F.normalize semantics: a zero row has zero cosines; its gradient is dU / eps (no radial term).
    g = make_gen(2)
    x, y, up = _cosine_case(g, 9, 6, 5, with_y)
    x[[0, 4]] = 0
    if with_y:
        y[3] = 0
    out, dx, dy = _cosine_run(x.to(dtype), None if y is None else y.to(dtype), up)
    # autograd of the reference is the oracle here (the analytic formula is the same function)
    xr = x.clone().requires_grad_(True)
    yr = None if y is None else y.clone().requires_grad_(True)
    out_r = ref.pairwise_cosine(xr, yr)
    grads_r = torch.autograd.grad(out_r, [xr] if yr is None else [xr, yr], up)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    tol = (1e-12, 1e-11) if dtype == torch.float64 else (OUT_TOL, GRAD_TOL)
    assert rel_err(out, out_r) <= tol[0]
    assert rel_err(dx, grads_r[0]) <= tol[1]
    if with_y:
        assert rel_err(dy, grads_r[1]) <= tol[1]


@needs_ext
def test_pairwise_cosine_y_is_x_equals_y_none():
    # Passing x as y gives the same values, and autograd adds both paths into x.grad.
    g = make_gen(3)
    x, _, up = _cosine_case(g, 11, 11, 6, False)
    out_a, dx_a, _ = _cosine_run(x, None, up)
    xa = x.clone().requires_grad_(True)
    out_b = ik.pairwise_cosine(xa, xa, backend="cpp")
    (dx_b,) = torch.autograd.grad(out_b, xa, up)
    torch.testing.assert_close(out_b, out_a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-12, atol=1e-14)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_low_precision_within_twice_eager_error(dtype, with_y):
    x, y, up = _cosine_case(make_gen(4), 65, 33, 47, with_y)
    truth = _cosine_truth(x, y, up)

    def errors(backend):
        out, dx, dy = _cosine_run(x.to(dtype), None if y is None else y.to(dtype), up, backend)
        assert out.dtype == dx.dtype == dtype
        errs = [rel_err(out, truth[0]), rel_err(dx, truth[1])]
        if with_y:
            errs.append(rel_err(dy, truth[2]))
        return errs

    for ours, eager in zip(errors("cpp"), errors("reference")):
        assert ours <= 2 * eager + 1e-2


@needs_ext
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_bitwise_deterministic(with_y):
    x, y, up = _cosine_case(make_gen(5), 300, 257, 96, with_y)
    x, y, up = x.float(), None if y is None else y.float(), up.float()
    first, second = _cosine_run(x, y, up), _cosine_run(x, y, up)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_ext
def test_pairwise_cosine_noncontiguous_inputs_and_no_inplace():
    g = make_gen(6)
    x = _feats(g, 12, 20)[:, ::2]                                  # (12, 10), strided columns
    y = _feats(g, 10, 9).t()                                       # (9, 10), transposed storage
    up = torch.randn(9, 12, generator=g, dtype=torch.float64).t()  # (12, 9), transposed storage
    assert not x.is_contiguous() and not y.is_contiguous() and not up.is_contiguous()
    before = (x.clone(), y.clone(), up.clone())
    out, dx, dy = _cosine_run(x, y, up)
    truth = _cosine_truth(x, y, up)
    assert rel_err(out, truth[0]) <= 1e-13
    assert rel_err(dx, truth[1]) <= 1e-12 and rel_err(dy, truth[2]) <= 1e-12
    for a, b in zip(before, (x, y, up)):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_opcheck(dtype, with_y):
    g = make_gen(7)
    x = _feats(g, 9, 6, dtype).requires_grad_(True)
    y = _feats(g, 5, 6, dtype).requires_grad_(True) if with_y else None
    torch.library.opcheck(OPS.pairwise_cosine_forward.default, (x, y))
    _, norm_x, norm_y = OPS.pairwise_cosine_forward(x.detach(), None if y is None else y.detach())
    grad = _feats(g, 9, 5 if with_y else 9, dtype)
    masks = [[True, True], [True, False], [False, True]] if with_y else [[True, False]]
    for mask in masks:
        torch.library.opcheck(OPS.pairwise_cosine_backward.default,
                              (grad, x.detach(), None if y is None else y.detach(), norm_x, norm_y, mask))


@needs_ext
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_compiles_fullgraph(with_y):
    def f(x, y):
        s = ik.pairwise_cosine(x, y, backend="cpp")
        return (s * s.detach().sign() + s ** 2).sum()

    g = make_gen(8)
    x = _feats(g, 17, 8, torch.float32).requires_grad_(True)
    y = _feats(g, 13, 8, torch.float32).requires_grad_(True) if with_y else None
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    y2 = y.detach().clone().requires_grad_(True) if with_y else None
    loss2 = f(x2, y2)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(x.grad, x2.grad)
    if with_y:
        torch.testing.assert_close(y.grad, y2.grad)


@needs_ext
def test_pairwise_cosine_direct_op_rejects_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="y has dtype"):
        OPS.pairwise_cosine_forward(x, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="columns"):
        OPS.pairwise_cosine_forward(x, torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        OPS.pairwise_cosine_forward(x[0], None)


# ------------------------------------------------------------------------------ class_density
def _density_run(x, labels, num_classes, t, up, backend="cpp"):
    x = x.clone().requires_grad_(True)
    out = ik.class_density(x, labels, num_classes, t=t, backend=backend)
    (dx,) = torch.autograd.grad(out, x, up.to(out.dtype))
    return out.detach(), dx


def _density_truth(x, labels, num_classes, t, up):
    return ref.class_density(x, labels, num_classes, t), ref_grads.class_density_backward(up, x, labels, t)


def _labels_layout(g, layout, n):
    """(labels, num_classes) for a named layout of n rows."""
    if layout == "random":
        return torch.randint(0, 7, (n,), generator=g), 9  # classes 7 and 8 are absent
    if layout == "all_equal":
        return torch.full((n,), 2, dtype=torch.int64), 4
    if layout == "singletons":
        return torch.randperm(n, generator=g), n + 1  # class n is absent
    if layout == "huge_class":  # one class of 600 rows (five tiles) among small ones
        labels = torch.cat([torch.full((600,), 3, dtype=torch.int64), torch.randint(0, 3, (n,), generator=g)])
        return labels[torch.randperm(labels.numel(), generator=g)], 5
    if layout == "many_classes":  # C > 65536: mostly absent classes, a few pairs and triples
        some = torch.randint(0, 70_000, (n // 2,), generator=g)
        labels = torch.cat([some, some[: n - n // 2 - 1], torch.tensor([69_999])])
        return labels[torch.randperm(n, generator=g)], 70_000
    raise ValueError(layout)


DENSITY_CASES = [("random", 1), ("random", 2), ("random", 31), ("random", 127), ("random", 128), ("random", 129),
                 ("all_equal", 1), ("all_equal", 2), ("all_equal", 127), ("all_equal", 128), ("all_equal", 129),
                 ("all_equal", 257), ("singletons", 13), ("huge_class", 41), ("many_classes", 211)]


@needs_ext
@pytest.mark.parametrize("layout", ["random", "all_equal", "huge_class", "singletons"])
def test_class_density_gradcheck_float64(layout):
    g = make_gen(10)
    n = 3 if layout == "huge_class" else 23
    labels, c = _labels_layout(g, layout, n)
    if layout == "huge_class":  # gradcheck is O(B d) forward passes: keep the class big but the check short
        labels, c = torch.cat([torch.full((140,), 1, dtype=torch.int64), torch.tensor([0, 0, 2])]), 3
    x = _feats(g, labels.numel(), 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ik.class_density(a, labels, c, t=1.5, backend="cpp"), (x,))


@needs_ext
@pytest.mark.parametrize("t", [0.5, 2.0, 8.0])
@pytest.mark.parametrize("layout,n", DENSITY_CASES, ids=lambda v: str(v))
def test_class_density_float32_matches_float64_reference(layout, n, t):
    g = make_gen(n + int(10 * t))
    labels, c = _labels_layout(g, layout, n)
    x = 3 * _feats(g, labels.numel(), 37)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    truth = _density_truth(x, labels, c, t, up)
    out, dx = _density_run(x.float(), labels, c, t, up)
    assert out.dtype == dx.dtype == torch.float32 and out.shape == (c,)
    assert rel_err(out, truth[0]) <= OUT_TOL
    assert rel_err(dx, truth[1]) <= GRAD_TOL
    counts = torch.bincount(labels, minlength=c)
    assert torch.equal(out[counts < 2], torch.zeros_like(out[counts < 2]))


@needs_ext
def test_class_density_both_gram_paths_match_reference():
    # Classes with little Gram work (n_c^2 d <= 2^15) use direct dot products, larger ones tiles of
    # GEMMs; sizes 2..40 at d = 32 straddle the switch (n_c = 32), and 129..131 span two tiles.
    g = make_gen(18)
    sizes = list(range(2, 41)) + [129, 130, 131]
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = _feats(g, labels.numel(), 32)
    up = torch.randn(len(sizes), generator=g, dtype=torch.float64)
    out, dx = _density_run(x, labels, len(sizes), 2.0, up)
    truth = _density_truth(x, labels, len(sizes), 2.0, up)
    assert rel_err(out, truth[0]) <= 1e-13 and rel_err(dx, truth[1]) <= 1e-12


@needs_ext
def test_class_density_singletons_and_absent_classes_give_zero():
    g = make_gen(11)
    labels, c = _labels_layout(g, "singletons", 10)
    out, dx = _density_run(_feats(g, 10, 6), labels, c, 2.0, torch.randn(c, generator=g, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(c, dtype=torch.float64))
    assert torch.equal(dx, torch.zeros_like(dx))


@needs_ext
def test_class_density_identical_rows_is_one():
    # kappa = 1 for identical directions: a class of copies has D_c = 1 (rows rescaled: invariant).
    x = torch.randn(1, 8, dtype=torch.float64).repeat(5, 1) * torch.arange(1, 6, dtype=torch.float64)[:, None]
    out = ik.class_density(x, torch.zeros(5, dtype=torch.int64), 2, t=3.0, backend="cpp")
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0], dtype=torch.float64), rtol=1e-14, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_density_zero_rows(dtype):
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
    assert rel_err(out, out_r) <= tol[0] and rel_err(dx, dx_r) <= tol[1]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,n", [("random", 97), ("huge_class", 20)])
def test_class_density_low_precision_within_twice_eager_error(dtype, layout, n):
    g = make_gen(13)
    labels, c = _labels_layout(g, layout, n)
    x = _feats(g, labels.numel(), 40)
    up = torch.randn(c, generator=g, dtype=torch.float64)
    truth = _density_truth(x, labels, c, 2.0, up)
    ours = _density_run(x.to(dtype), labels, c, 2.0, up)
    eager = _density_run(x.to(dtype), labels, c, 2.0, up, backend="reference")
    assert ours[0].dtype == ours[1].dtype == dtype
    for a, b, truth_t in zip(ours, eager, truth):
        assert rel_err(a, truth_t) <= 2 * rel_err(b, truth_t) + 1e-2


def _density_big_case():
    g = make_gen(14)
    labels = torch.cat([torch.full((700,), 5, dtype=torch.int64), torch.randint(0, 40, (1300,), generator=g)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    x = _feats(g, labels.numel(), 64, torch.float32)
    return x, labels, 40, torch.randn(40, generator=g)


@needs_ext
def test_class_density_bitwise_deterministic():
    x, labels, c, up = _density_big_case()
    first, second = _density_run(x, labels, c, 2.0, up), _density_run(x, labels, c, 2.0, up)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@needs_ext
def test_class_density_same_bits_for_any_thread_count():
    # Tiles are scheduled dynamically but summed in a fixed order: the thread count cannot matter.
    x, labels, c, up = _density_big_case()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _density_run(x, labels, c, 2.0, up)
    finally:
        torch.set_num_threads(threads)
    multi = _density_run(x, labels, c, 2.0, up)
    assert torch.equal(single[0], multi[0]) and torch.equal(single[1], multi[1])


@needs_ext
def test_class_density_noncontiguous_inputs_and_no_inplace():
    g = make_gen(15)
    x = _feats(g, 30, 16)[:, ::2]
    labels = torch.randint(0, 4, (60,), generator=g)[::2]
    up = torch.randn(8, generator=g, dtype=torch.float64)[::2]
    assert not x.is_contiguous() and not labels.is_contiguous() and not up.is_contiguous()
    before = (x.clone(), labels.clone(), up.clone())
    out, dx = _density_run(x, labels, 4, 2.0, up)
    truth = _density_truth(x, labels, 4, 2.0, up)
    assert rel_err(out, truth[0]) <= 1e-13 and rel_err(dx, truth[1]) <= 1e-12
    for a, b in zip(before, (x, labels, up)):
        assert torch.equal(a, b)


@needs_ext
def test_class_density_under_inference_mode():
    # The tile GEMMs run on worker threads, which do not inherit inference mode.
    x, labels, c, _ = _density_big_case()
    expected = ik.class_density(x, labels, c, backend="cpp")
    with torch.inference_mode():
        got = ik.class_density(x, labels, c, backend="cpp")
    assert torch.equal(got, expected)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_density_opcheck(dtype):
    g = make_gen(16)
    x = _feats(g, 12, 5, dtype).requires_grad_(True)
    labels = torch.tensor([0, 1, 1, 3, 3, 3, 0, 1, 4, 3, 3, 1])
    torch.library.opcheck(OPS.class_density_forward.default, (x, labels, 6, 2.0))
    _, norm = OPS.class_density_forward(x.detach(), labels, 6, 2.0)
    torch.library.opcheck(OPS.class_density_backward.default,
                          (torch.randn(6, generator=g, dtype=dtype), x.detach(), labels, norm, 2.0))


@needs_ext
def test_class_density_compiles_fullgraph():
    def f(x, labels, w):
        return (ik.class_density(x, labels, 6, t=2.5, backend="cpp") * w).sum()

    g = make_gen(17)
    x = _feats(g, 19, 8, torch.float32).requires_grad_(True)
    labels = torch.randint(0, 5, (19,), generator=g)
    w = torch.randn(6, generator=g)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, labels, w)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    loss2 = f(x2, labels, w)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(x.grad, x2.grad)


@needs_ext
def test_class_density_direct_op_rejects_bad_labels():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"labels\[2\] = 7 is out of range"):
        OPS.class_density_forward(x, torch.tensor([0, 1, 7, 1]), 3, 2.0)
    with pytest.raises(RuntimeError, match="int64"):
        OPS.class_density_forward(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32), 3, 2.0)


# ------------------------------------------------------------------------------ dispatch
@needs_ext
def test_auto_picks_cpp_on_cpu_for_primitives():
    for op in ("pairwise_cosine", "class_density"):
        assert _backends.select_backend(op, "auto", torch.device("cpu")) == "cpp"
