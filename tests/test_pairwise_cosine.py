"""Conformance of ``pairwise_cosine`` (S_ij = <x_i/||x_i||, y_j/||y_j||>; y = x when None) on every
backend.

One contract, parametrized over the backends that run here: float64 agreement with the reference
(values and both gradients for a random upstream gradient), float32 and bf16/fp16 tolerances,
float64 gradcheck, with and without y, every requires_grad combination of x and y, zero rows
(F.normalize semantics), y = x against y = None, shapes of 1, primes and the kernels' tile sizes
+- 1, bitwise determinism (with and without torch.use_deterministic_algorithms), strided inputs and
upstream gradients left unmodified, opcheck on each backend's ops, torch.compile(fullgraph=True),
double backward and bad input to the kernels.

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

OP = "pairwise_cosine"
ALL = backend_params(OP)
FUSED = fused_backends(OP)
EXT = backend_params(OP, include=("cpp", "cuda"))  # the C++ ops (ops/pairwise_cosine.py)

F64_TOL = 1e-10                 # float64 vs the float64 reference
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 reference (ARCHITECTURE.md)


def _shapes(backend):
    """(N, M, d): 1, primes, and the tile sizes +- 1 (cpp: 128-row tiles; the interpreter's blocks
    are 16 wide; GPU tiles 32..128)."""
    if is_slow(backend):
        return [(1, 1, 1), (1, 5, 3), (2, 3, 7), (17, 16, 33), (33, 18, 15)]
    shapes = [(1, 1, 1), (1, 5, 3), (2, 3, 7), (31, 17, 13), (127, 128, 129), (128, 129, 64), (129, 127, 32),
              (257, 1, 33)]
    if backend_device(backend).type == "cuda":
        shapes += [(1000, 1025, 256)]
    return shapes


def _case(g, n, m, d, with_y):
    """float64 (x, y or None, upstream gradient) for an (n, m) cosine matrix (m = n without y)."""
    x = 2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    y = 0.5 * torch.randn(m, d, generator=g, dtype=torch.float64) if with_y else None
    up = torch.randn(n, m if with_y else n, generator=g, dtype=torch.float64)
    return x, y, up


def _truth(x, y, up):
    dx, dy = ref_grads.pairwise_cosine_backward(up, x, y)
    return ref.pairwise_cosine(x, y), dx, dy


def _run(backend, x, y, up, dtype=None, needs=(True, True)):
    """(out, dx, dy) through the public function on the backend's device, returned on the CPU; a
    gradient that is not asked for (or dy without y) is None."""
    dev = backend_device(backend)
    xt = x.to(dev, dtype or x.dtype).detach().requires_grad_(needs[0])
    yt = None if y is None else y.to(dev, dtype or y.dtype).detach().requires_grad_(needs[1])
    out = ik.pairwise_cosine(xt, yt, backend=backend)
    wrt = [t for t in (xt, yt) if t is not None and t.requires_grad]
    if not wrt:
        assert not out.requires_grad
        return out.cpu(), None, None
    grads = iter(torch.autograd.grad(out, wrt, up.to(dev, out.dtype)))
    dx = next(grads).cpu() if xt.requires_grad else None
    dy = next(grads).cpu() if yt is not None and yt.requires_grad else None
    return out.detach().cpu(), dx, dy


def _check_dx(dx, truth_dx, x, up, with_y, tol):
    if x.shape[0] == 1 and not with_y:
        # S = [[1]] whatever x is: the true gradient is exactly 0 and only rounding noise is left;
        # bound it on the natural scale ||G|| / ||x|| of this gradient instead.
        assert float(dx.norm()) <= tol * 1e-2 * float(up.norm() / x.norm())
    else:
        assert rel_err(dx, truth_dx) <= tol



# ------------------------------------------------------------------------------ values, gradients
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("backend", ALL)
def test_float64_matches_reference(backend, with_y):
    for n, m, d in _shapes(backend):
        x, y, up = _case(make_gen(n + m + d), n, m, d, with_y)
        out, dx, dy = _run(backend, x, y, up)
        truth = _truth(x, y, up)
        assert out.dtype == dx.dtype == torch.float64 and out.shape == truth[0].shape and dx.shape == x.shape
        assert rel_err(out, truth[0]) <= F64_TOL, (n, m, d)
        _check_dx(dx, truth[1], x, up, with_y, F64_TOL)
        if with_y:
            assert dy.shape == y.shape and rel_err(dy, truth[2]) <= F64_TOL, (n, m, d)


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_float32_matches_float64_reference(backend, with_y):
    for n, m, d in _shapes(backend):
        x, y, up = _case(make_gen(n + m + d), n, m, d, with_y)
        out, dx, dy = _run(backend, x, y, up, torch.float32)
        truth = _truth(x, y, up)
        assert out.dtype == dx.dtype == torch.float32 and out.shape == truth[0].shape
        assert rel_err(out, truth[0]) <= OUT_TOL, (n, m, d)
        _check_dx(dx, truth[1], x, up, with_y, GRAD_TOL)
        if with_y:
            assert dy.dtype == torch.float32 and rel_err(dy, truth[2]) <= GRAD_TOL, (n, m, d)


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_float64(backend, with_y):
    g = make_gen(0)
    dev = backend_device(backend)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
    if with_y:
        y = torch.randn(4, 5, generator=g, dtype=torch.float64).to(dev).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: ik.pairwise_cosine(a, b, backend=backend), (x, y),
                                        fast_mode=is_slow(backend))
    else:
        assert torch.autograd.gradcheck(lambda a: ik.pairwise_cosine(a, backend=backend), (x,),
                                        fast_mode=is_slow(backend))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["x_and_y", "x_only", "y_only", "neither"])
@pytest.mark.parametrize("backend", ALL)
def test_every_requires_grad_combination(backend, needs):
    # Only an input that requires grad gets one (the fused backwards skip the other GEMM); with
    # neither the output needs no graph. The values are those of the full computation.
    x, y, up = _case(make_gen(1), 6, 5, 4, True)
    out, dx, dy = _run(backend, x, y, up, needs=needs)
    truth = _truth(x, y, up)
    assert (dx is not None) == needs[0] and (dy is not None) == needs[1]
    assert rel_err(out, truth[0]) <= 1e-13
    if needs[0]:
        assert rel_err(dx, truth[1]) <= 1e-12
    if needs[1]:
        assert rel_err(dy, truth[2]) <= 1e-12
    if needs[0] or needs[1]:
        assert torch.autograd.gradcheck(
            lambda *a: ik.pairwise_cosine(*a, backend=backend),
            tuple(t.to(backend_device(backend)).detach().requires_grad_(n) for t, n in zip((x, y), needs)),
            fast_mode=is_slow(backend))
    out_x, dx_x, _ = _run(backend, x, None, torch.randn(6, 6, generator=make_gen(2), dtype=torch.float64),
                          needs=(needs[0], False))
    assert (dx_x is not None) == needs[0]
    assert rel_err(out_x, ref.pairwise_cosine(x)) <= 1e-13


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ALL)
def test_zero_rows(backend, dtype, with_y):
    # F.normalize semantics: a zero row has zero cosines; its gradient is dU / eps (no radial term).
    g = make_gen(2)
    x, y, up = _case(g, 9, 6, 5, with_y)
    x[[0, 4]] = 0
    if with_y:
        y[3] = 0
    out, dx, dy = _run(backend, x, y, up, dtype)
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


@pytest.mark.parametrize("backend", ALL)
def test_y_is_x_equals_y_none(backend):
    # Passing x as y gives the same values, and autograd adds both paths into x.grad.
    x, _, up = _case(make_gen(3), 11, 11, 6, False)
    out_a, dx_a, _ = _run(backend, x, None, up)
    xa = x.to(backend_device(backend)).detach().requires_grad_(True)
    out_b = ik.pairwise_cosine(xa, xa, backend=backend)
    (dx_b,) = torch.autograd.grad(out_b, xa, up.to(xa.device))
    torch.testing.assert_close(out_b.detach().cpu(), out_a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dx_b.cpu(), dx_a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_within_twice_eager_error(backend, dtype, with_y):
    big = (1000, 1025, 256) if backend_device(backend).type == "cuda" else (65, 33, 47)
    n, m, d = sized(backend, (33, 18, 15), big)
    x, y, up = _case(make_gen(4), n, m, d, with_y)
    truth = _truth(x, y, up)
    dev = backend_device(backend)
    xe = x.to(dev, dtype).requires_grad_(True)
    ye = None if y is None else y.to(dev, dtype).requires_grad_(True)
    out_e = ref.pairwise_cosine(xe, ye)
    eager = (out_e.detach(),) + torch.autograd.grad(out_e, [xe] if ye is None else [xe, ye], up.to(dev, dtype))
    ours = _run(backend, x, y, up, dtype)
    ours = ours if with_y else ours[:2]
    assert all(t.dtype == dtype for t in ours)
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e.cpu(), t) + 1e-2


# ------------------------------------------------------------------------------ determinism, inputs
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_bitwisedeterministic(backend, with_y):
    n, m, d = sized(backend, (33, 18, 15), (300, 257, 96))
    x, y, up = _case(make_gen(5), n, m, d, with_y)
    x, y, up = x.float(), None if y is None else y.float(), up.float()
    runs = []
    for flag in (False, False, True):
        with deterministic(flag):
            runs.append(_run(backend, x, y, up))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_strided_inputs_and_upstream_not_modified(backend):
    # x, y read through their strides; the upstream gradient of a sum is an expanded (stride-0)
    # tensor and a transposed one is not contiguous either. Nothing is written in place.
    g = make_gen(6)
    dev = backend_device(backend)
    x = torch.randn(12, 20, generator=g, dtype=torch.float64).to(dev)[:, ::2]    # (12, 10), strided columns
    y = torch.randn(10, 9, generator=g, dtype=torch.float64).to(dev).t()          # (9, 10), column-major
    transposed = torch.randn(9, 12, generator=g, dtype=torch.float64).to(dev).t()  # (12, 9)
    expanded = torch.ones((), dtype=torch.float64, device=dev).expand(12, 9)
    assert not x.is_contiguous() and not y.is_contiguous() and not transposed.is_contiguous()
    before = (x.clone(), y.clone(), transposed.clone())
    for up in (transposed, expanded):
        out, dx, dy = _run(backend, x, y, up)
        truth = _truth(x.cpu(), y.cpu(), up.cpu())
        assert rel_err(out, truth[0]) <= 1e-13
        assert rel_err(dx, truth[1]) <= 1e-12 and rel_err(dy, truth[2]) <= 1e-12
    for a, b in zip(before, (x, y, transposed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_no_grad_and_inference_mode_give_the_same_values(backend):
    x, y, up = _case(make_gen(7), 17, 13, 8, True)
    x, y = x.float().to(backend_device(backend)), y.float().to(backend_device(backend))
    with_grad = ik.pairwise_cosine(x.clone().requires_grad_(True), y, backend=backend)
    with torch.no_grad():
        no_grad = ik.pairwise_cosine(x.clone().requires_grad_(True), y, backend=backend)
    with torch.inference_mode():
        inference = ik.pairwise_cosine(x, y, backend=backend)
    assert with_grad.requires_grad and not no_grad.requires_grad and not inference.requires_grad
    assert torch.equal(no_grad, with_grad.detach()) and torch.equal(inference, with_grad.detach())


@pytest.mark.parametrize("backend", FUSED)
def test_chunk_budget_does_not_change_the_result(backend, monkeypatch):
    # The cosine matrix is the op's output, not a chunked intermediate: a tiny IDID_KERNELS_CHUNK_MB
    # leaves the bits unchanged.
    x, y, up = _case(make_gen(8), 33, 18, 15, True)
    default = _run(backend, x.float(), y.float(), up)
    monkeypatch.setenv(_chunks.ENV, "0.0001")
    _chunks.reload()
    tiny = _run(backend, x.float(), y.float(), up)
    for a, b in zip(default, tiny):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_rejects_an_unsupported_dtype(backend):
    # functional rejects integer x first; the kernels refuse it too when called directly.
    x = torch.ones(3, 2, dtype=torch.int64, device=backend_device(backend))
    if backend == "triton":
        from idid_kernels.triton import pairwise_cosine as tpc
        with pytest.raises(TypeError, match=r"pairwise_cosine \(triton backend\): x has dtype torch.int64"):
            tpc.pairwise_cosine(x)
        return
    with pytest.raises(RuntimeError, match="x must be floating point"):
        kernel_ops(backend).pairwise_cosine_forward(x, None)


@pytest.mark.parametrize("backend", EXT)
def test_direct_op_rejects_bad_input(backend):
    # The C++ ops check their inputs themselves (the triton ops leave that to functional).
    ops = kernel_ops(backend)
    x = torch.randn(4, 3, device=backend_device(backend))
    with pytest.raises(RuntimeError, match="y has dtype"):
        ops.pairwise_cosine_forward(x, torch.randn(2, 3, dtype=torch.float64, device=x.device))
    with pytest.raises(RuntimeError, match="columns"):
        ops.pairwise_cosine_forward(x, torch.randn(2, 4, device=x.device))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        ops.pairwise_cosine_forward(x[0], None)


# ------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, dtype, with_y):
    g = make_gen(9)
    dev = backend_device(backend)
    x = torch.randn(9, 6, generator=g, dtype=dtype).to(dev).requires_grad_(True)
    y = torch.randn(5, 6, generator=g, dtype=dtype).to(dev).requires_grad_(True) if with_y else None
    yd = None if y is None else y.detach()
    ops = torch.ops.idid_triton if backend == "triton" else kernel_ops(backend)
    torch.library.opcheck(ops.pairwise_cosine_forward.default, (x, y))
    _, norm_x, norm_y = ops.pairwise_cosine_forward(x.detach(), yd)
    grad = torch.randn(9, 5 if with_y else 9, generator=g, dtype=dtype).to(dev)
    masks = [[True, True], [True, False], [False, True]] if with_y else [[True, False]]
    for mask in masks:
        extra = tuple(mask) if backend == "triton" else (mask,)
        torch.library.opcheck(ops.pairwise_cosine_backward.default, (grad, x.detach(), yd, norm_x, norm_y, *extra))


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("backend", ALL)
def test_compiles_fullgraph(backend, with_y):
    def f(x, y):
        s = ik.pairwise_cosine(x, y, backend=backend)
        return (s * s.detach().sign() + s ** 2).sum() + ik.pairwise_cosine(x, backend=backend).sum()

    g = make_gen(10)
    dev = backend_device(backend)
    x = torch.randn(17, 8, generator=g).to(dev).requires_grad_(True)
    y = torch.randn(13, 8, generator=g).to(dev).requires_grad_(True) if with_y else None
    wrt = [x] if y is None else [x, y]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    got = torch.autograd.grad(loss, wrt)
    loss2 = f(x, y)
    want = torch.autograd.grad(loss2, wrt)
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ALL)
def test_double_backward(backend):
    # The fused backwards are not differentiable: create_graph=True is refused, naming the op; the
    # reference is plain autograd and gives second derivatives.
    x = torch.randn(4, 3, generator=make_gen(11), dtype=torch.float64).to(backend_device(backend))
    x.requires_grad_(True)
    if backend == "reference":
        assert torch.autograd.gradgradcheck(lambda a: ik.pairwise_cosine(a, backend=backend), (x,))
        return
    out = ik.pairwise_cosine(x, backend=backend).sum()
    with pytest.raises(NotImplementedError, match="pairwise_cosine.*double backward"):
        torch.autograd.grad(out, x, create_graph=True)
