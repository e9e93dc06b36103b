"""Numerical edge cases, one contract over every backend that runs here (reference, cpp, triton
interpreted on the CPU or native on a GPU, cuda where it runs):

- per-row losses exact down to tiny values (no ``lse - z_y`` cancellation): on rows with losses
  from 1e-8 to 10, each backend's float32 per-row error is at most float32 ``F.cross_entropy``'s
  on the same logits (or the error the float32 rounding of the cosines alone implies);
- feature norms computed without overflow or underflow of the squares (BLAS nrm2 semantics):
  rows with norms of 1e20 or 1e-21 in float32/bfloat16;
- very large logit scales ``s``;
- NaN inputs propagate where they flow, and nothing is finite but wrong.

Every expectation is the float64 reference's answer.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import reference as ref
from idid_kernels.reference.margins import resolve_margin

GPU = torch.cuda.is_available()
F32, F64 = torch.float32, torch.float64


def _backends():
    out = []
    for name in ("reference", "cpp", "cuda", "triton"):
        if name not in ik.available_backends():
            continue
        if name == "cpp" and GPU:
            out.append(pytest.param(name, torch.device("cpu"), id=name))
        elif name == "cpp":
            out.append(pytest.param(name, torch.device("cpu"), id=name))
        elif name in ("cuda", "triton"):
            out.append(pytest.param(name, torch.device("cuda" if GPU else "cpu"), id=name))
        else:
            out.append(pytest.param(name, torch.device("cpu"), id=name))
    return out


BACKENDS = _backends()


def _to(t, dev, dtype=None, grad=False):
    t = t.to(dev, dtype or t.dtype).detach()
    return t.requires_grad_(True) if grad else t


# ----------------------------------------------------------------------------- per-row losses
def _graded_rows(seed: int, c: int, d: int, s: float):
    """Rows whose float64 losses span ~1e-9 .. ~10: x_n leans towards its class by a graded amount."""
    g = make_gen(seed)
    w = torch.randn(c, d, generator=g, dtype=F64)
    n = 48
    y = torch.randint(0, c, (n,), generator=g)
    w_hat = F.normalize(w, dim=1)
    # lean k from 0 (a random direction) to ~1 (the class direction itself)
    lean = torch.linspace(0.0, 1.0, n, dtype=F64) ** 0.35
    noise = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    x = lean[:, None] * w_hat[y] * 4.0 + (1.0 - lean[:, None]) * noise * 4.0 + 0.01 * noise
    return x, w, y


ROW_CASES = [
    # (margin, contraction, s, C, d)
    ("none", "none", 30.0, 2, 3),
    ("none", "none", 30.0, 17, 8),
    ("none", "sigmoid", 30.0, 9, 16),
    ("cosface", "sigmoid", 30.0, 9, 16),
    ("arcface", "none", 40.0, 5, 8),
]


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("margin,contraction,s,c,d", ROW_CASES)
def test_row_losses_float32_at_most_cross_entropy_error(backend, dev, margin, contraction, s, c, d):
    kw = dict(margin=margin, contraction=contraction, s=s, reduction="none")
    if margin == "cosface":
        kw["m"] = 0.1
    if margin == "arcface":
        kw["m"] = 0.05
    x, w, y = _graded_rows(3, c, d, s)
    exact = ref.cm_margin_loss(x, w, y, **kw)
    assert exact.min() < 1e-7 and exact.max() > 3.0, "the rows must span tiny to large losses"
    got = ik.cm_margin_loss(_to(x, dev, F32), _to(w, dev, F32), y.to(dev), backend=backend, **kw)
    got = got.double().cpu()
    # float32 F.cross_entropy on the float32 logits of the same rows
    params = resolve_margin(margin, kw.get("m"), 1.0, 0.0, 0.0, 0.0, False)
    z32 = ref.cm_margin.cm_logits(x.float(), w.float(), y, params, s=s, contraction=contraction)
    ce = F.cross_entropy(z32, y, reduction="none").double()
    err = (got - exact).abs() / exact
    err_ce = (ce - exact).abs() / exact
    # the float32 cosines carry ~1e-7 relative error; s times that is the loss's own conditioning
    floor = 4 * s * 2.0 ** -23
    bad = err > torch.clamp(err_ce, min=floor)
    assert not bad.any(), (f"rows {bad.nonzero().flatten().tolist()}: loss {exact[bad].tolist()} "
                           f"error {err[bad].tolist()} vs F.cross_entropy {err_ce[bad].tolist()}")
    # the comparison has teeth: on the smallest rows float32 cross-entropy loses most digits
    assert err_ce.max() > 1e-2


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_row_loss_issue_example_two_classes(backend, dev):
    """N=1, d=3, C=2, no margin, no contraction, s=30: a loss of ~1e-6 to float32 precision."""
    g = make_gen(11)
    for _ in range(20):
        x = 3 * torch.randn(1, 3, generator=g, dtype=F64)
        w = torch.randn(2, 3, generator=g, dtype=F64)
        y = torch.tensor([0])
        kw = dict(margin="none", contraction="none", s=30.0, reduction="none")
        exact = ref.cm_margin_loss(x, w, y, **kw)
        got = ik.cm_margin_loss(_to(x, dev, F32), _to(w, dev, F32), y.to(dev), backend=backend, **kw)
        assert abs(float(got) - float(exact)) <= 1e-5 * float(exact) + 1e-30, (float(got), float(exact))


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_small_loss_gradients_float32(backend, dev, reduction):
    """Gradients on rows with tiny losses keep the float32 gradient tolerance."""
    x, w, y = _graded_rows(5, 9, 16, 30.0)
    kw = dict(margin="cosface", m=0.1, s=30.0, reduction=reduction)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    up = torch.rand(x.shape[0], generator=make_gen(2), dtype=F64) if reduction == "none" else None
    out = ref.cm_margin_loss(xr, wr, y, **kw)
    gx, gw = torch.autograd.grad(out, [xr, wr], up)
    xt, wt = _to(x, dev, F32, True), _to(w, dev, F32, True)
    out_t = ik.cm_margin_loss(xt, wt, y.to(dev), backend=backend, **kw)
    tx, tw = torch.autograd.grad(out_t, [xt, wt], None if up is None else up.to(dev, F32))
    assert rel_err(tx.cpu(), gx) <= 1e-4 and rel_err(tw.cpu(), gw) <= 1e-4


# --------------------------------------------------------------------------- huge / tiny norms
def _cm_case(seed=0, n=8, c=5, d=16):
    g = make_gen(seed)
    return (torch.randn(n, d, generator=g, dtype=F64), torch.randn(c, d, generator=g, dtype=F64),
            torch.randint(0, c, (n,), generator=g))


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("x_scale,w_scale", [(1e20, 1.0), (1e20, 1e20), (1.0, 1e20), (1e-21, 1.0), (1e-21, 1e20)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cm_margin_extreme_norms_float32(backend, dev, x_scale, w_scale, reduction):
    x, w, y = _cm_case()
    x, w = x * x_scale, w * w_scale
    kw = dict(margin="arcface", reduction=reduction)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    exact = ref.cm_margin_loss(xr, wr, y, **kw)
    up = torch.rand(exact.shape, generator=make_gen(1), dtype=F64)
    gx, gw = torch.autograd.grad(exact, [xr, wr], up)
    xt, wt = _to(x, dev, F32, True), _to(w, dev, F32, True)
    got = ik.cm_margin_loss(xt, wt, y.to(dev), backend=backend, **kw)
    tx, tw = torch.autograd.grad(got, [xt, wt], up.to(dev, F32))
    assert rel_err(got.detach().cpu(), exact) <= 1e-5
    # dL/dx scales as 1/||x||: compare relative to the float64 gradient's own size
    assert rel_err(tx.cpu(), gx) <= 1e-4
    assert rel_err(tw.cpu(), gw) <= 1e-4


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("scale", [1e20, 1e-21])
def test_pairwise_cosine_extreme_norms_float32(backend, dev, scale):
    g = make_gen(4)
    x = torch.randn(6, 9, generator=g, dtype=F64) * scale
    up = torch.randn(6, 6, generator=g, dtype=F64)
    xr = x.clone().requires_grad_()
    exact = ref.pairwise_cosine(xr)
    (gx,) = torch.autograd.grad(exact, [xr], up)
    xt = _to(x, dev, F32, True)
    got = ik.pairwise_cosine(xt, backend=backend)
    (tx,) = torch.autograd.grad(got, [xt], up.to(dev, F32))
    assert rel_err(got.detach().cpu(), exact) <= 1e-5
    assert rel_err(tx.cpu(), gx) <= 1e-4
    if scale > 1:
        assert torch.allclose(got.detach().diagonal().cpu().double(), torch.ones(6, dtype=F64), atol=1e-6)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e20, 1e-21, 1e-30])
def test_norm_contraction_extreme_norms(backend, dev, dtype, scale):
    g = make_gen(6)
    x = torch.randn(5, 7, generator=g, dtype=F64) * scale
    xq = x.to(dtype).double()  # the values the low-precision input actually holds
    xr = xq.clone().requires_grad_()
    exact = ref.norm_contraction(xr, offset=0.0, temperature=1.0)
    (gx,) = torch.autograd.grad(exact, [xr], torch.ones(5, dtype=F64))
    xt = _to(x, dev, dtype, True)
    got = ik.norm_contraction(xt, backend=backend)
    (tx,) = torch.autograd.grad(got, [xt], torch.ones(5, device=dev, dtype=dtype))
    tol = 1e-5 if dtype == F32 else 1e-2
    assert rel_err(got.detach().cpu(), exact) <= tol
    assert rel_err(tx.cpu(), gx) <= 10 * tol
    if scale < 1:  # the gradient tends to sigmoid'(0) x / ||x|| = 0.25 x / ||x||
        unit = xq / torch.linalg.vector_norm(xq, dim=1, keepdim=True)
        assert rel_err(tx.cpu(), 0.25 * unit) <= 10 * tol


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_norms_of_huge_float32_rows_are_finite(backend, dev):
    """||x|| of a float32 row at 1e30 per element is 1e30 sqrt(d), far above float32's sqrt(max)."""
    x = torch.full((3, 4), 1e30, dtype=F32)
    got = ik.norm_contraction(_to(x, dev), offset=2e30, temperature=1e30, backend=backend)
    expected = torch.sigmoid(torch.tensor((2e30 - 2e30) / 1e30))
    assert torch.allclose(got.cpu(), expected.expand(3).float(), rtol=1e-5)


@pytest.mark.parametrize("x_scale,w_scale", [(1e20, 1.0), (1e20, 1e20), (1.0, 1e20), (1e-21, 1.0), (1e-21, 1e20),
                                             (1e-30, 1e-30)])
@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_idid_and_class_density_extreme_norms_float32(backend, dev, x_scale, w_scale):
    g = make_gen(4)
    x = torch.randn(10, 6, generator=g, dtype=F64) * x_scale
    p = torch.randn(4, 6, generator=g, dtype=F64) * w_scale
    sim = torch.randn(4, 4, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, 0, 0, 2, 1, 1])
    rr = [t.clone().requires_grad_() for t in (x, p, sim)]
    exact = ref.idid_loss(*rr, y)
    ex_grads = torch.autograd.grad(exact, rr)
    tt = [t.to(dev, F32).requires_grad_() for t in (x, p, sim)]
    got = ik.idid_loss(*tt, y.to(dev), backend=backend)
    got_grads = torch.autograd.grad(got, tt)
    assert rel_err(got.detach().cpu(), exact) <= 1e-5
    for a, b in zip(got_grads, ex_grads):
        assert rel_err(a.cpu(), b) <= 1e-4
    xr = x.clone().requires_grad_()
    dens = ref.class_density(xr, y, 4)
    up = torch.rand(4, generator=g, dtype=F64)
    (gx,) = torch.autograd.grad(dens, [xr], up)
    xt = x.to(dev, F32).requires_grad_()
    dens_t = ik.class_density(xt, y.to(dev), 4, backend=backend)
    (tx,) = torch.autograd.grad(dens_t, [xt], up.to(dev, F32))
    assert rel_err(dens_t.detach().cpu(), dens) <= 1e-5
    assert rel_err(tx.cpu(), gx) <= 1e-4


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_cm_margin_bfloat16_huge_rows(backend, dev):
    """Both operands at 1e20 in bfloat16 (float32's exponent range): the scaled GEMM stays finite."""
    g = make_gen(5)
    x = (torch.randn(8, 24, generator=g, dtype=F64) * 1e20).to(torch.bfloat16)
    w = (torch.randn(6, 24, generator=g, dtype=F64) * 1e20).to(torch.bfloat16)
    y = torch.randint(0, 6, (8,), generator=g)
    kw = dict(margin="arcface", contraction="none", reduction="mean")
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    exact = ref.cm_margin_loss(xr, wr, y, **kw)
    gx, gw = torch.autograd.grad(exact, [xr, wr])
    xt, wt = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    got = ik.cm_margin_loss(xt, wt, y.to(dev), backend=backend, **kw)
    tx, tw = torch.autograd.grad(got, [xt, wt])
    assert torch.isfinite(got) and torch.isfinite(tx).all() and torch.isfinite(tw).all()
    assert rel_err(got.detach().cpu(), exact) <= 2e-2
    assert rel_err(tx.cpu(), gx) <= 5e-2 and rel_err(tw.cpu(), gw) <= 5e-2


# --------------------------------------------------------------------------------------- large s
@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("s", [1e10, 1e12])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_very_large_scale(backend, dev, s, reduction):
    x = torch.tensor([[0.3, 0.9], [0.8, -0.2], [0.1, 0.1]], dtype=F64)
    w = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.5, 0.5]], dtype=F64)
    y = torch.tensor([0, 0, 2])
    kw = dict(s=s, margin="none", contraction="none", reduction=reduction)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    exact = ref.cm_margin_loss(xr, wr, y, **kw)
    up = torch.ones_like(exact)
    gx, gw = torch.autograd.grad(exact, [xr, wr], up)
    xt, wt = _to(x, dev, F32, True), _to(w, dev, F32, True)
    got = ik.cm_margin_loss(xt, wt, y.to(dev), backend=backend, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got.detach().cpu(), exact) <= 1e-5
    tx, tw = torch.autograd.grad(got, [xt, wt], up.to(dev, F32))
    assert torch.isfinite(tx).all() and torch.isfinite(tw).all()
    assert rel_err(tx.cpu(), gx) <= 1e-4 and rel_err(tw.cpu(), gw) <= 1e-4


# ------------------------------------------------------------------------------------ NaN inputs
def _same_nan_pattern(got: torch.Tensor, exact: torch.Tensor, what: str, rtol=1e-4, finite_may_replace_nan=False):
    """NaN exactly where the reference has NaN, and the finite entries equal. With
    ``finite_may_replace_nan``, an entry the reference makes NaN only by a dense product 0 * NaN may
    be finite (it then is checked nowhere), but never a NaN where the reference is finite."""
    got, exact = got.detach().cpu().double(), exact.detach().cpu().double()
    if finite_may_replace_nan:
        assert not (torch.isnan(got) & ~torch.isnan(exact)).any(), f"{what}: NaN where the reference is finite"
        both = ~torch.isnan(exact) & ~torch.isnan(got)
        assert torch.equal(both, ~torch.isnan(exact)), what
        assert torch.allclose(got[both], exact[both], rtol=rtol, atol=1e-6), what
        return
    assert torch.equal(torch.isnan(got), torch.isnan(exact)), (
        f"{what}: NaN where the reference has {got[torch.isnan(got) & ~torch.isnan(exact)].tolist()[:3]}, "
        f"or finite {got[~torch.isnan(got) & torch.isnan(exact)].tolist()[:3]} where it has NaN")
    fin = ~torch.isnan(exact)
    assert torch.allclose(got[fin], exact[fin], rtol=rtol, atol=1e-6), what


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_nan_row(backend, dev, with_y):
    g = make_gen(8)
    x = torch.randn(5, 4, generator=g, dtype=F64)
    x[2, 1] = float("nan")
    y = torch.randn(3, 4, generator=g, dtype=F64) if with_y else None
    m = 3 if with_y else 5
    up = torch.zeros(5, m, dtype=F64)
    up[0, 0] = 1.0  # only one upstream entry: the NaN row's gradient is NaN, the others finite
    up[2, m - 1] = 1.0
    inputs = [x] if y is None else [x, y]
    xr = [t.clone().requires_grad_() for t in inputs]
    exact = ref.pairwise_cosine(*xr)
    ex_grads = torch.autograd.grad(exact, xr, up)
    xt = [_to(t, dev, F32, True) for t in inputs]
    got = ik.pairwise_cosine(*xt, backend=backend)
    got_grads = torch.autograd.grad(got, xt, up.to(dev, F32))
    _same_nan_pattern(got, exact, "cosines")
    for a, b in zip(got_grads, ex_grads):
        _same_nan_pattern(a, b, "gradient")


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_norm_contraction_nan_row(backend, dev):
    x = torch.randn(4, 3, generator=make_gen(9), dtype=F64)
    x[1, 0] = float("nan")
    xr = x.clone().requires_grad_()
    exact = ref.norm_contraction(xr)
    (gx,) = torch.autograd.grad(exact, [xr], torch.ones(4, dtype=F64))
    xt = _to(x, dev, F32, True)
    got = ik.norm_contraction(xt, backend=backend)
    (tx,) = torch.autograd.grad(got, [xt], torch.ones(4, device=dev))
    _same_nan_pattern(got, exact, "output")
    _same_nan_pattern(tx, gx, "gradient")


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_cm_margin_nan_row(backend, dev):
    x, w, y = _cm_case(seed=2)
    x[3, 2] = float("nan")
    kw = dict(margin="cosface", reduction="none")
    up = torch.zeros(x.shape[0], dtype=F64)
    up[0] = 1.0
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    exact = ref.cm_margin_loss(xr, wr, y, **kw)
    gx, _ = torch.autograd.grad(exact, [xr, wr], up)
    xt, wt = _to(x, dev, F32, True), _to(w, dev, F32, True)
    got = ik.cm_margin_loss(xt, wt, y.to(dev), backend=backend, **kw)
    tx, _ = torch.autograd.grad(got, [xt, wt], up.to(dev, F32))
    _same_nan_pattern(got, exact, "row losses")
    _same_nan_pattern(tx, gx, "dx")


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_idid_nan_row_similarity_gradient(backend, dev):
    """A NaN feature row makes the loss NaN; the similarity's unused diagonal still gets exactly 0.

    The reference's gradients are NaN almost everywhere: its dense masked products multiply the NaN
    row's unit vector by 0 for every row (a pairwise kernel over the whole batch). The fused kernels
    visit only the pairs that take part, so rows of other classes may keep finite gradients."""
    g = make_gen(10)
    x = torch.randn(6, 5, generator=g, dtype=F64)
    x[4, 1] = float("nan")
    p = torch.randn(4, 5, generator=g, dtype=F64)
    sim = torch.randn(4, 4, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    tensors = [x, p, sim]
    rr = [t.clone().requires_grad_() for t in tensors]
    exact = ref.idid_loss(*rr, y)
    ex_grads = torch.autograd.grad(exact, rr)
    tt = [_to(t, dev, F32, True) for t in tensors]
    got = ik.idid_loss(*tt, y.to(dev), backend=backend)
    got_grads = torch.autograd.grad(got, tt)
    _same_nan_pattern(got, exact, "loss")
    assert torch.equal(got_grads[2].detach().diagonal().cpu(), torch.zeros(4)), "dTheta diagonal"
    for a, b, name in zip(got_grads, ex_grads, ("dx", "dproxies", "dsimilarity")):
        _same_nan_pattern(a, b, name, finite_may_replace_nan=True)
