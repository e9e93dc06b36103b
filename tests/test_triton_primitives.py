"""pairwise_cosine and norm_contraction on the triton backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1) at small shapes, including sizes that are not multiples of the interpreter's
16-wide blocks; with a GPU the same tests run natively at larger shapes (block sizes +- 1).
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import reference as ref
from idid_kernels.reference import grads as ref_grads

pytest.importorskip("idid_kernels.triton.pairwise_cosine", reason="triton is not installed")

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 oracle (ARCHITECTURE.md)


def _feats(g, n, d, scale=1.0):
    return scale * torch.randn(n, d, generator=g, dtype=torch.float64)


def _on(t, dtype=None, grad=False):
    if t is None:
        return None
    t = t.to(DEV, dtype or t.dtype)
    return t.requires_grad_(True) if grad else t


# ------------------------------------------------------------------------------ pairwise_cosine
if GPU:
    COSINE_SHAPES = [(1, 1, 1), (1, 5, 3), (2, 3, 7), (31, 17, 13), (127, 128, 129), (129, 64, 65),
                     (257, 1, 33), (1000, 1025, 256)]
else:
    COSINE_SHAPES = [(1, 1, 1), (1, 5, 3), (2, 3, 7), (17, 16, 33), (33, 18, 15)]


def _cosine_run(x, y, up, dtype=None):
    """(out, dx, dy) through the public function on DEV, returned on the CPU; dy None without y."""
    xt, yt = _on(x, dtype, grad=True), _on(y, dtype, grad=True)
    out = ik.pairwise_cosine(xt, yt, backend="triton")
    grads = torch.autograd.grad(out, [xt] if yt is None else [xt, yt], up.to(DEV, out.dtype))
    return out.detach().cpu(), grads[0].cpu(), (grads[1].cpu() if yt is not None else None)


@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_gradcheck_float64(with_y):
    g = make_gen(0)
    x = _on(_feats(g, 7, 5), grad=True)
    if with_y:
        y = _on(_feats(g, 4, 5), grad=True)
        assert torch.autograd.gradcheck(lambda a, b: ik.pairwise_cosine(a, b, backend="triton"), (x, y),
                                        fast_mode=True)
    else:
        assert torch.autograd.gradcheck(lambda a: ik.pairwise_cosine(a, backend="triton"), (x,), fast_mode=True)


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_pairwise_cosine_one_side_gradient(needs):
    # only the input that requires grad gets one (the backward skips the other GEMM)
    g = make_gen(1)
    x0, y0 = _feats(g, 6, 4), _feats(g, 5, 4)
    x, y = _on(x0).requires_grad_(needs[0]), _on(y0).requires_grad_(needs[1])
    up = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ik.pairwise_cosine(x, y, backend="triton").backward(up.to(DEV))
    assert (x.grad is not None) == needs[0] and (y.grad is not None) == needs[1]
    dx, dy = ref_grads.pairwise_cosine_backward(up, x0, y0)
    got, want = (x.grad, dx) if needs[0] else (y.grad, dy)
    assert rel_err(got.cpu(), want) <= 1e-12


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("shape", COSINE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pairwise_cosine_float32_matches_float64_reference(shape, with_y):
    n, m, d = shape
    g = make_gen(sum(shape))
    x = _feats(g, n, d, 2.0)
    y = _feats(g, m, d, 0.5) if with_y else None
    up = torch.randn(n, m if with_y else n, generator=g, dtype=torch.float64)
    truth_out = ref.pairwise_cosine(x, y)
    truth_dx, truth_dy = ref_grads.pairwise_cosine_backward(up, x, y)
    out, dx, dy = _cosine_run(x, y, up, torch.float32)
    assert out.dtype == dx.dtype == torch.float32 and out.shape == truth_out.shape
    assert rel_err(out, truth_out) <= OUT_TOL
    if n == 1 and not with_y:
        # S = [[1]] whatever x is: the true gradient is exactly 0 and only rounding noise is left;
        # bound it on the natural scale ||G|| / ||x|| of this gradient instead.
        assert float(dx.norm()) <= 1e-6 * float(up.norm() / x.norm())
    else:
        assert rel_err(dx, truth_dx) <= GRAD_TOL
    if with_y:
        assert dy.dtype == torch.float32 and rel_err(dy, truth_dy) <= GRAD_TOL


@pytest.mark.parametrize("with_y", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_cosine_zero_rows(dtype, with_y):
    # F.normalize semantics: a zero row has zero cosines; its gradient is dU / eps (no radial term)
    g = make_gen(2)
    x = _feats(g, 9, 5, 2.0)
    y = _feats(g, 6, 5) if with_y else None
    x[[0, 4]] = 0
    if with_y:
        y[3] = 0
    up = torch.randn(9, 6 if with_y else 9, generator=g, dtype=torch.float64)
    out, dx, dy = _cosine_run(x, y, up, dtype)
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


def test_pairwise_cosine_y_is_x_equals_y_none():
    # passing x as y gives the same values, and autograd adds both paths into x.grad
    g = make_gen(3)
    x = _feats(g, 11, 6)
    up = torch.randn(11, 11, generator=g, dtype=torch.float64)
    out_a, dx_a, _ = _cosine_run(x, None, up)
    xa = _on(x, grad=True)
    out_b = ik.pairwise_cosine(xa, xa, backend="triton")
    (dx_b,) = torch.autograd.grad(out_b, xa, up.to(DEV))
    torch.testing.assert_close(out_b.detach().cpu(), out_a, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dx_b.cpu(), dx_a, rtol=1e-12, atol=1e-14)


def test_pairwise_cosine_strided_inputs_and_upstream():
    # x, y read through their strides; the upstream gradient of a sum is an expanded (stride-0)
    # tensor and a transposed one is not contiguous either
    g = make_gen(4)
    x = _feats(g, 10, 16)[:, ::2]
    y = _feats(g, 7, 8).t().contiguous().t()  # column-major (7, 8)
    assert not x.is_contiguous() and not y.is_contiguous()
    expanded = torch.ones((), dtype=torch.float64).expand(10, 7)
    transposed = torch.randn(7, 10, generator=g, dtype=torch.float64).t()
    for up in (expanded, transposed):
        out, dx, dy = _cosine_run(x, y, up)
        truth_dx, truth_dy = ref_grads.pairwise_cosine_backward(up, x, y)
        assert rel_err(out, ref.pairwise_cosine(x, y)) <= 1e-13
        assert rel_err(dx, truth_dx) <= 1e-12 and rel_err(dy, truth_dy) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pairwise_cosine_low_precision(dtype):
    n, m, d = COSINE_SHAPES[-1]
    g = make_gen(5)
    x, y = _feats(g, n, d), _feats(g, m, d)
    up = torch.randn(n, m, generator=g, dtype=torch.float64)
    truth = (ref.pairwise_cosine(x, y),) + ref_grads.pairwise_cosine_backward(up, x, y)
    xe, ye = x.to(DEV, dtype).requires_grad_(True), y.to(DEV, dtype).requires_grad_(True)
    out_e = ref.pairwise_cosine(xe, ye)
    eager = (out_e.detach(),) + torch.autograd.grad(out_e, (xe, ye), up.to(DEV, dtype))
    ours = _cosine_run(x, y, up, dtype)
    assert all(t.dtype == dtype for t in ours)
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e.cpu(), t) + 1e-2


def test_pairwise_cosine_bitwise_deterministic():
    n, m, d = COSINE_SHAPES[-2]
    g = make_gen(6)
    x, y = _feats(g, n, d).float(), _feats(g, m, d).float()
    up = torch.randn(n, m, generator=g, dtype=torch.float64)
    runs = [_cosine_run(x, y, up) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_pairwise_cosine_opcheck_and_compile():
    g = make_gen(7)
    x, y = _on(_feats(g, 6, 5).float(), grad=True), _on(_feats(g, 4, 5).float(), grad=True)
    ops = torch.ops.idid_triton
    torch.library.opcheck(ops.pairwise_cosine_forward.default, (x, y))
    torch.library.opcheck(ops.pairwise_cosine_forward.default, (x, None))
    out, nx, ny = ops.pairwise_cosine_forward(x.detach(), y.detach())
    torch.library.opcheck(ops.pairwise_cosine_backward.default,
                          (torch.rand_like(out), x.detach(), y.detach(), nx, ny, True, True))

    def f(a, b):
        return (ik.pairwise_cosine(a, b, backend="triton") ** 2).sum() + ik.pairwise_cosine(a, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, y), (x, y))
    want = torch.autograd.grad(f(x, y), (x, y))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- norm_contraction
if GPU:
    NORM_SHAPES = [(1, 1), (5, 3), (37, 19), (1000, 513), (4097, 64)]
else:
    NORM_SHAPES = [(1, 1), (5, 3), (37, 19), (17, 70)]


def _contraction_run(x, up, dtype=None, **kw):
    xt = _on(x, dtype, grad=True)
    out = ik.norm_contraction(xt, backend="triton", **kw)
    (dx,) = torch.autograd.grad(out, xt, up.to(DEV, out.dtype))
    return out.detach().cpu(), dx.cpu()


def test_norm_contraction_gradcheck_float64():
    g = make_gen(10)
    x = _on(_feats(g, 6, 4), grad=True)
    assert torch.autograd.gradcheck(lambda a: ik.norm_contraction(a, offset=0.3, temperature=1.7, backend="triton"),
                                    (x,), fast_mode=True)


@pytest.mark.parametrize("params", [dict(), dict(offset=1.0, temperature=0.5), dict(offset=-0.3, temperature=3.0)],
                         ids=["default", "sharp", "soft"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_norm_contraction_float32_matches_float64_reference(shape, params):
    n, d = shape
    g = make_gen(sum(shape))
    x = _feats(g, n, d, 1.0 / max(1.0, d ** 0.5))  # norms around 1: off the sigmoid's saturation
    up = torch.randn(n, generator=g, dtype=torch.float64)
    out, dx = _contraction_run(x, up, torch.float32, **params)
    assert out.dtype == dx.dtype == torch.float32
    assert rel_err(out, ref.norm_contraction(x, **params)) <= OUT_TOL
    assert rel_err(dx, ref_grads.norm_contraction_backward(up, x, **params)) <= GRAD_TOL


@pytest.mark.parametrize("scale", [1.0, 1e-40, 1e300], ids=["unit", "tiny", "huge"])
def test_norm_contraction_float64_exact_with_inexact_parameters(scale):
    # offset and 1/T reach the kernel as float64 values, not rounded to float32, whatever their
    # range: 1/T = 1e40 (tiny) is above float32's max, 1/T = 1e-300 (huge) below its smallest value
    g = make_gen(11)
    x = _feats(g, 23, 7, scale)
    up = torch.randn(23, generator=g, dtype=torch.float64)
    params = dict(offset=0.3 * scale, temperature=1.7 * scale)
    out, dx = _contraction_run(x, up, **params)
    assert rel_err(out, ref.norm_contraction(x, **params)) <= 1e-14
    assert rel_err(dx, ref_grads.norm_contraction_backward(up, x, **params)) <= 1e-13


def test_norm_contraction_zero_rows_and_saturation():
    # a zero row: finite, zero gradient. Large norms: sigmoid is exactly 1 in float32, and the
    # gradient e / (1 + e)^2 keeps full relative precision (1 - sig would be 0).
    g = make_gen(12)
    x = _feats(g, 6, 5)
    x[0] = 0
    x[1:3] *= 25.0 / x[1:3].norm(dim=1, keepdim=True)
    up = torch.randn(6, generator=g, dtype=torch.float64)
    out, dx = _contraction_run(x, up, torch.float32)
    assert torch.isfinite(dx).all() and torch.count_nonzero(dx[0]) == 0
    assert torch.all(out[1:3] == 1.0)
    truth = ref_grads.norm_contraction_backward(up, x)
    assert torch.count_nonzero(dx[1:3]) == 10
    assert rel_err(dx[1:3], truth[1:3]) <= GRAD_TOL and rel_err(dx, truth) <= GRAD_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_contraction_low_precision(dtype):
    n, d = NORM_SHAPES[-1]
    g = make_gen(13)
    x = _feats(g, n, d, 0.2)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    truth = (ref.norm_contraction(x), ref_grads.norm_contraction_backward(up, x))
    xe = x.to(DEV, dtype).requires_grad_(True)
    out_e = ref.norm_contraction(xe)
    eager = (out_e.detach(),) + torch.autograd.grad(out_e, xe, up.to(DEV, dtype))
    ours = _contraction_run(x, up, dtype)
    assert ours[0].dtype == ours[1].dtype == dtype
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e.cpu(), t) + 1e-2


def test_norm_contraction_strided_input_bitwise_and_no_grad():
    g = make_gen(14)
    x = _feats(g, 9, 12).float()[:, 1::3]
    assert not x.is_contiguous()
    up = torch.randn(9, generator=g, dtype=torch.float64)
    runs = [_contraction_run(x, up) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    assert rel_err(runs[0][1], ref_grads.norm_contraction_backward(up, x.double())) <= GRAD_TOL
    with torch.no_grad():
        out = ik.norm_contraction(x.to(DEV), backend="triton")
    assert not out.requires_grad and torch.equal(out.cpu(), runs[0][0])


def test_norm_contraction_opcheck_and_compile():
    g = make_gen(15)
    x = _on(_feats(g, 7, 5).float(), grad=True)
    ops = torch.ops.idid_triton
    torch.library.opcheck(ops.norm_contraction_forward.default, (x, 0.5, 2.0))
    out, norm = ops.norm_contraction_forward(x.detach(), 0.5, 2.0)
    torch.library.opcheck(ops.norm_contraction_backward.default, (torch.rand_like(out), x.detach(), norm, 0.5, 2.0))

    def f(a):
        return (ik.norm_contraction(a, offset=0.5, temperature=2.0, backend="triton") ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(f(x), x)[0])


# ---------------------------------------------------------------------------------- both ops
def test_unsupported_dtype_is_a_type_error():
    from idid_kernels.triton import norm_contraction as tnc
    from idid_kernels.triton import pairwise_cosine as tpc
    x = torch.ones(3, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"pairwise_cosine \(triton backend\): x has dtype torch.int64"):
        tpc.pairwise_cosine(x)
    with pytest.raises(TypeError, match=r"norm_contraction \(triton backend\): x has dtype torch.int64"):
        tnc.norm_contraction(x, 0.0, 1.0)


def test_double_backward_refused():
    g = make_gen(16)
    x = _on(_feats(g, 4, 3), grad=True)
    for out in (ik.pairwise_cosine(x, backend="triton").sum(), ik.norm_contraction(x, backend="triton").sum()):
        with pytest.raises(NotImplementedError, match="double backward"):
            torch.autograd.grad(out, x, create_graph=True)
