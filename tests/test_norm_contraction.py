"""Conformance of ``norm_contraction`` (out_n = sigmoid((||x_n|| - offset) / T)) on every backend.

One contract, parametrized over the backends that run here: float64 agreement with the reference
(values and gradients for a random upstream gradient), float32 and bf16/fp16 tolerances, float64
gradcheck, every option (offset, temperature) including float64 scalars outside float32's range,
zero rows and saturated rows, requires_grad on and off, bitwise determinism (with and without
torch.use_deterministic_algorithms), non-contiguous inputs left unmodified, opcheck on each
backend's ops, torch.compile(fullgraph=True), double backward and unsupported dtypes.

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

OP = "norm_contraction"
ALL = backend_params(OP)
FUSED = fused_backends(OP)

F64_TOL = 1e-10                 # float64 vs the float64 reference
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 reference (ARCHITECTURE.md)

# (offset, temperature, feature scale): norms near 1 (off the sigmoid's saturation) and the
# unnormalised 3 * randn of large norms with a soft temperature.
PARAMS = {"default": (0.0, 1.0, None), "sharp": (1.0, 0.5, None), "soft": (-0.3, 3.0, None), "wide": (0.5, 2.0, 3.0)}


def _shapes(backend):
    """(N, d): 1, primes, the kernels' row blocks +- 1 (the interpreter's blocks are small)."""
    if is_slow(backend):
        return [(1, 1), (5, 3), (37, 19), (17, 70)]
    shapes = [(1, 1), (1, 64), (2, 3), (31, 17), (37, 19), (127, 128), (129, 255), (1000, 7)]
    if backend_device(backend).type == "cuda":
        shapes += [(1000, 513), (4097, 64)]
    return shapes


def _feats(g, n, d, scale=None):
    """float64 (n, d); ``scale=None`` gives norms around 1."""
    s = 1.0 / max(1.0, d ** 0.5) if scale is None else scale
    return s * torch.randn(n, d, generator=g, dtype=torch.float64)


def _run(backend, x, up, dtype=None, requires_grad=True, **params):
    """(out, dx) through the public function on the backend's device, returned on the CPU."""
    xt = x.to(backend_device(backend), dtype or x.dtype).detach().requires_grad_(requires_grad)
    out = ik.norm_contraction(xt, backend=backend, **params)
    if not requires_grad:
        assert not out.requires_grad
        return out.cpu(), None
    (dx,) = torch.autograd.grad(out, xt, up.to(xt.device, out.dtype))
    return out.detach().cpu(), dx.cpu()


def _truth(x, up, **params):
    return ref.norm_contraction(x, **params), ref_grads.norm_contraction_backward(up, x, **params)



# ------------------------------------------------------------------------------ values, gradients
@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("backend", ALL)
def test_float64_matches_reference(backend, name):
    offset, temperature, scale = PARAMS[name]
    for n, d in _shapes(backend):
        g = make_gen(n + d)
        x = _feats(g, n, d, scale)
        up = torch.randn(n, generator=g, dtype=torch.float64)
        grad_tol = F64_TOL
        if backend == "reference":
            # Eager autograd differentiates sigmoid as s (1 - s): where it saturates ("wide": z up
            # to ~24) 1 - s keeps only eps / (1 - s) relative precision. The fused kernels evaluate
            # e / (1 + e)^2 with e = exp(-|z|), exact to rounding there.
            z = (torch.linalg.vector_norm(x, dim=1) - offset) / temperature
            grad_tol = max(F64_TOL, 8 * torch.finfo(torch.float64).eps / float(torch.sigmoid(-z.abs()).min()))
        out, dx = _run(backend, x, up, offset=offset, temperature=temperature)
        truth = _truth(x, up, offset=offset, temperature=temperature)
        assert out.dtype == dx.dtype == torch.float64 and out.shape == (n,) and dx.shape == (n, d)
        assert rel_err(out, truth[0]) <= F64_TOL, (n, d)
        assert rel_err(dx, truth[1]) <= grad_tol, (n, d)


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("backend", FUSED)
def test_float32_matches_float64_reference(backend, name):
    offset, temperature, scale = PARAMS[name]
    for n, d in _shapes(backend):
        g = make_gen(n + d)
        x = _feats(g, n, d, scale)
        up = torch.randn(n, generator=g, dtype=torch.float64)
        out, dx = _run(backend, x, up, torch.float32, offset=offset, temperature=temperature)
        truth = _truth(x, up, offset=offset, temperature=temperature)
        assert out.dtype == dx.dtype == torch.float32
        assert rel_err(out, truth[0]) <= OUT_TOL, (n, d)
        assert rel_err(dx, truth[1]) <= GRAD_TOL, (n, d)


@pytest.mark.parametrize("scale", [1.0, 1e-40, 1e300], ids=["unit", "tiny", "huge"])
@pytest.mark.parametrize("backend", ALL)
def test_float64_exact_with_parameters_outside_float32_range(backend, scale):
    # offset and 1/T reach the kernels as float64 values, not rounded to float32, whatever their
    # range: 1/T = 1e40 (tiny) is above float32's max, 1/T = 1e-300 (huge) below its smallest value;
    # the norms of rows of 1e300 (or 1e-40) per element neither overflow nor underflow.
    g = make_gen(11)
    x = _feats(g, 23, 7, scale)
    up = torch.randn(23, generator=g, dtype=torch.float64)
    params = dict(offset=0.3 * scale, temperature=1.7 * scale)
    out, dx = _run(backend, x, up, **params)
    truth = _truth(x, up, **params)
    assert rel_err(out, truth[0]) <= 1e-14
    assert rel_err(dx, truth[1]) <= 1e-13


@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (1.5, 0.5), (-2.0, 3.0), (0.3, 1.7)])
@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_float64(backend, offset, temperature):
    x = torch.randn(7, 5, generator=make_gen(10), dtype=torch.float64).to(backend_device(backend))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: ik.norm_contraction(a, offset=offset, temperature=temperature, backend=backend), (x,),
        fast_mode=is_slow(backend))


@pytest.mark.parametrize("backend", ALL)
def test_zero_row_and_saturation_float64(backend):
    # A zero row: sigmoid(-offset / T) = 0.5 and the subgradient 0. ||x|| = 200: sigmoid(200) is
    # exactly 1 in float64, with a finite gradient.
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1] = 100.0
    out, dx = _run(backend, x, torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert out[0] == 0.5 and out[2] == 0.5 and out[1] == 1.0
    assert torch.equal(dx[0], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("backend", FUSED)
def test_zero_row_and_saturation_float32(backend):
    # Norms of 25: sigmoid is exactly 1 in float32, and the fused kernels' gradient e / (1 + e)^2
    # keeps full relative precision there (1 - sigmoid would be 0; the eager reference gives 0).
    g = make_gen(12)
    x = _feats(g, 6, 5, 1.0)
    x[0] = 0
    x[1:3] *= 25.0 / x[1:3].norm(dim=1, keepdim=True)
    up = torch.randn(6, generator=g, dtype=torch.float64)
    out, dx = _run(backend, x, up, torch.float32)
    truth = _truth(x, up)[1]
    assert torch.isfinite(dx).all() and torch.count_nonzero(dx[0]) == 0
    assert torch.all(out[1:3] == 1.0)
    assert torch.count_nonzero(dx[1:3]) == 10
    assert rel_err(dx[1:3], truth[1:3]) <= GRAD_TOL and rel_err(dx, truth) <= GRAD_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_within_twice_eager_error(backend, dtype):
    n, d = sized(backend, (17, 70), (4097, 64) if backend_device(backend).type == "cuda" else (65, 33))
    g = make_gen(13)
    x = _feats(g, n, d, 0.2)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    truth = _truth(x, up)
    xe = x.to(backend_device(backend), dtype).requires_grad_(True)
    out_e = ref.norm_contraction(xe)
    eager = (out_e.detach(),) + torch.autograd.grad(out_e, xe, up.to(xe.device, dtype))
    ours = _run(backend, x, up, dtype)
    assert ours[0].dtype == ours[1].dtype == dtype
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e.cpu(), t) + 1e-2


# ------------------------------------------------------------------------------ autograd plumbing
@pytest.mark.parametrize("backend", ALL)
def test_requires_grad_off_gives_the_same_values(backend):
    g = make_gen(14)
    x = _feats(g, 9, 12)
    up = torch.randn(9, generator=g, dtype=torch.float64)
    with_grad, _ = _run(backend, x, up, torch.float32)
    without, _ = _run(backend, x, up, torch.float32, requires_grad=False)
    with torch.no_grad():
        no_grad = ik.norm_contraction(x.float().to(backend_device(backend)).requires_grad_(True), backend=backend)
    assert not no_grad.requires_grad
    assert torch.equal(without, with_grad) and torch.equal(no_grad.cpu(), with_grad)


@pytest.mark.parametrize("backend", FUSED)
def test_saved_norm_output_of_the_forward_op(backend):
    # The C++ forward's second output (the norm saved for backward) is differentiable, d||x||/dx =
    # x / ||x||; the triton op marks it non-differentiable (it is a statistic, not a result).
    x = torch.randn(6, 5, generator=make_gen(15), dtype=torch.float64).to(backend_device(backend))
    x.requires_grad_(True)
    if backend == "triton":
        out, norm = torch.ops.idid_triton.norm_contraction_forward(x, 0.3, 1.2)
        assert out.requires_grad and not norm.requires_grad
        torch.testing.assert_close(norm, torch.linalg.vector_norm(x.detach(), dim=1), rtol=1e-14, atol=0)
        return
    forward = kernel_ops(backend).norm_contraction_forward
    assert torch.autograd.gradcheck(lambda t: forward(t, 0.3, 1.2)[1], (x,))
    assert torch.autograd.gradcheck(lambda t: sum(forward(t, 0.3, 1.2)), (x,))


@pytest.mark.parametrize("backend", ALL)
def test_double_backward(backend):
    # The fused backwards are not differentiable: create_graph=True is refused, naming the op; the
    # reference is plain autograd and gives second derivatives.
    x = torch.randn(4, 3, generator=make_gen(16), dtype=torch.float64).to(backend_device(backend))
    x.requires_grad_(True)
    out = ik.norm_contraction(x, backend=backend).sum()
    if backend == "reference":
        assert torch.autograd.gradgradcheck(lambda a: ik.norm_contraction(a, backend=backend), (x,))
        return
    with pytest.raises(NotImplementedError, match="norm_contraction.*double backward"):
        torch.autograd.grad(out, x, create_graph=True)


# ------------------------------------------------------------------------------ determinism, inputs
@pytest.mark.parametrize("backend", FUSED)
def test_bitwisedeterministic(backend):
    n, d = sized(backend, (37, 19), (513, 129))
    g = make_gen(17)
    x = torch.randn(n, d, generator=g)
    up = torch.randn(n, generator=g)
    runs = []
    for flag in (False, False, True):
        with deterministic(flag):
            runs.append(_run(backend, x, up, offset=0.2))
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])


@pytest.mark.parametrize("backend", ALL)
def test_noncontiguous_input_not_modified(backend):
    g = make_gen(18)
    base = torch.randn(9, 24, generator=g, dtype=torch.float64).to(backend_device(backend))
    x = base[:, 1::3]                                          # strided columns
    up = torch.randn(18, generator=g, dtype=torch.float64).to(x.device)[::2]
    assert not x.is_contiguous() and not up.is_contiguous()
    before = (base.clone(), up.clone())
    out, dx = _run(backend, x, up, offset=0.2)
    truth = _truth(x.cpu(), up.cpu(), offset=0.2)
    assert rel_err(out, truth[0]) <= 1e-13 and rel_err(dx, truth[1]) <= 1e-12
    assert torch.equal(base, before[0]) and torch.equal(up, before[1])


@pytest.mark.parametrize("backend", FUSED)
def test_chunk_budget_does_not_change_the_result(backend, monkeypatch):
    # A per-row op holds no chunk of logits: a tiny IDID_KERNELS_CHUNK_MB leaves the bits unchanged.
    g = make_gen(19)
    x = torch.randn(37, 19, generator=g)
    up = torch.randn(37, generator=g)
    default = _run(backend, x, up)
    monkeypatch.setenv(_chunks.ENV, "0.0001")
    _chunks.reload()
    tiny = _run(backend, x, up)
    assert torch.equal(default[0], tiny[0]) and torch.equal(default[1], tiny[1])


@pytest.mark.parametrize("backend", FUSED)
def test_kernel_rejects_an_unsupported_dtype(backend):
    # functional rejects integer x first; the kernels refuse it too when called directly.
    x = torch.ones(3, 2, dtype=torch.int64, device=backend_device(backend))
    if backend == "triton":
        from idid_kernels.triton import norm_contraction as tnc
        with pytest.raises(TypeError, match=r"norm_contraction \(triton backend\): x has dtype torch.int64"):
            tnc.norm_contraction(x, 0.0, 1.0)
        return
    with pytest.raises(RuntimeError, match="x must be floating point"):
        kernel_ops(backend).norm_contraction_forward(x, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        kernel_ops(backend).norm_contraction_forward(x[0].double(), 0.0, 1.0)


# ------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, dtype):
    g = make_gen(20)
    dev = backend_device(backend)
    x = torch.randn(9, 6, generator=g, dtype=dtype).to(dev).requires_grad_(True)
    grad = torch.randn(9, generator=g, dtype=dtype).to(dev)
    if backend == "triton":
        ops = torch.ops.idid_triton
        torch.library.opcheck(ops.norm_contraction_forward.default, (x, 0.5, 2.0))
        _, norm = ops.norm_contraction_forward(x.detach(), 0.5, 2.0)
        torch.library.opcheck(ops.norm_contraction_backward.default, (grad, x.detach(), norm, 0.5, 2.0))
        return
    ops = kernel_ops(backend)
    torch.library.opcheck(ops.norm_contraction_forward.default, (x, 0.5, 2.0))
    _, norm = ops.norm_contraction_forward(x.detach(), 0.5, 2.0)
    for grad_norm in (None, torch.randn(9, generator=g, dtype=norm.dtype).to(dev)):
        torch.library.opcheck(ops.norm_contraction_backward.default, (grad, grad_norm, x.detach(), norm, 0.5, 2.0))


@pytest.mark.parametrize("backend", ALL)
def test_compiles_fullgraph(backend):
    def f(a):
        return (ik.norm_contraction(a, offset=0.5, temperature=2.0, backend=backend) ** 2).sum()

    x = torch.randn(17, 8, generator=make_gen(21)).to(backend_device(backend)).requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (dx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    loss2 = f(x2)
    (dx2,) = torch.autograd.grad(loss2, x2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(dx, dx2)
