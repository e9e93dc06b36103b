"""cm_margin_loss on the cpp backend against the float64 reference: gradcheck, float32/bf16
tolerances, edge shapes (C > 65536 included), ignore rows, reductions, every requires_grad
combination, determinism, opcheck and torch.compile."""
import itertools
import os

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _chunks, reference
from idid_kernels.reference.margins import resolve_margin

pytestmark = pytest.mark.skipif(
    "cpp" not in ik.available_backends() and os.environ.get("IDID_KERNELS_REQUIRE_EXT") != "1",
    reason="idid_kernels._C is not built")

MARGINS = {
    "none": dict(margin="none"),
    "cosface": dict(margin="cosface"),
    "arcface": dict(margin="arcface"),
    "arcface_easy": dict(margin="arcface", easy_margin=True),
    "combined": dict(margin="combined", m1=1.2, m2=0.3, m3=0.1),
    "sphereface": dict(margin="sphereface", m=4),
    "sphereface_lambda": dict(margin="sphereface", m=4, sphere_lambda=2.0),
}
OPTIONS = {
    "default": {},
    "no_contraction": dict(contraction="none"),
    "offset_temperature": dict(norm_offset=1.0, norm_temperature=2.0),
    "detach_norm": dict(detach_norm=True),
    "straight_through": dict(margin_grad="straight_through"),
}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def within(a, b, tol):
    """Relative error <= tol, or an absolute one below float32 resolution when b itself is ~0
    (a saturated softmax gives a loss of 1e-15 that float32 rounds to 0)."""
    diff = float(torch.linalg.vector_norm(a.detach().double() - b.detach().double()))
    return rel(a, b) <= tol or diff <= 1e-6


def make(n, c, d, seed=0, ignore=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignore] = -100
    return x.to(dtype), w.to(dtype), y


def loss_and_grads(backend, x, w, y, upstream_seed=7, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = ik.cm_margin_loss(x, w, y, backend=backend, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
    dx, dw = torch.autograd.grad(loss, (x, w), up.to(loss.dtype))
    return loss.detach(), dx, dw


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_gradcheck_float64(margin, option):
    kw = {**MARGINS[margin], **OPTIONS[option], "s": 4.0}
    x, w, y = make(6, 5, 4, seed=hash((margin, option)) % 1000, ignore=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    if option in ("detach_norm", "straight_through"):
        # These change the gradient on purpose: finite differences cannot see them. Compare with the
        # reference's autograd instead (it implements them with detach()).
        for red in ("mean", "none"):
            ours = loss_and_grads("cpp", x, w, y, reduction=red, **kw)
            ref = loss_and_grads("reference", x, w, y, reduction=red, **kw)
            for a, b in zip(ours, ref):
                assert rel(a, b) <= 1e-12
        return
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda a, b: ik.cm_margin_loss(a, b, y, backend="cpp", reduction=red, **kw),
                                        (x, w))


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference_tightly(margin, reduction):
    x, w, y = make(37, 29, 16, seed=3, ignore=4, scale=2.0)
    cw = torch.rand(29, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    kw = dict(MARGINS[margin], reduction=reduction, class_weight=cw, s=30.0)
    for a, b in zip(loss_and_grads("cpp", x, w, y, **kw), loss_and_grads("reference", x, w, y, **kw)):
        assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("shape", [(1, 2, 3), (7, 3, 5), (31, 127, 17), (64, 129, 33), (129, 128, 64)])
def test_float32_within_tolerance(margin, shape):
    n, c, d = shape
    # s=16 keeps the rows off saturation, so every gradient is large enough for a relative test
    x, w, y = make(n, c, d, seed=sum(shape), ignore=1 if n > 3 else 0, scale=1.0)
    kw = dict(MARGINS[margin], s=16.0)
    truth = loss_and_grads("reference", x, w, y, **kw)
    ours = loss_and_grads("cpp", x.float(), w.float(), y, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert within(ours[0], truth[0], 1e-5)
    assert rel(ours[1], truth[1]) <= 1e-4 and rel(ours[2], truth[2]) <= 1e-4


def test_one_feature_dimension():
    # d = 1: every cosine is +-1 and the spherical gradient vanishes; compare absolutely.
    x, w, y = make(5, 3, 1, seed=21)
    truth = loss_and_grads("reference", x, w, y)
    ours = loss_and_grads("cpp", x.float(), w.float(), y)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_large_class_count_over_65536():
    x, w, y = make(24, 70000, 32, seed=11, ignore=2, scale=2.0)
    y[5] = 69999
    truth = loss_and_grads("reference", x, w, y, margin="arcface")
    ours = loss_and_grads("cpp", x.float(), w.float(), y, margin="arcface")
    assert rel(ours[0], truth[0]) <= 1e-5
    assert rel(ours[1], truth[1]) <= 1e-4 and rel(ours[2], truth[2]) <= 1e-4


@pytest.mark.parametrize("chunk_mb", ["0.0001", "0.002"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_many_chunks_equal_one_chunk(monkeypatch, chunk_mb, reduction):
    # C=50 float64 classes are 400 bytes a row: 0.0001 MiB gives 1-row chunks, 0.002 MiB 5-row chunks
    # (N = 83 is prime). The budget is read once, so the test reloads it after setting it.
    x, w, y = make(83, 50, 12, seed=2, ignore=5)
    kw = dict(margin="combined", m1=1.1, m2=0.2, m3=0.05, reduction=reduction)
    ref = loss_and_grads("reference", x, w, y, **kw)
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", chunk_mb)
    _chunks.reload()
    assert _chunks.rows_for(50, 8, "cpu") == {"0.0001": 1, "0.002": 5}[chunk_mb]
    ours = loss_and_grads("cpp", x, w, y, **kw)
    for a, b in zip(ours, ref):
        assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_rows(ignored, reduction):
    x, w, y = make(10, 6, 5, seed=4)
    if ignored == "some":
        y[[0, 3, 9]] = -1
    elif ignored == "all":
        y[:] = -1
    kw = dict(ignore_index=-1, reduction=reduction, margin="arcface")
    ours = loss_and_grads("cpp", x, w, y, **kw)
    ref = loss_and_grads("reference", x, w, y, **kw)
    if ignored == "all" and reduction == "mean":
        assert torch.isnan(ours[0]) and torch.isnan(ref[0])  # F.cross_entropy's 0/0
        assert torch.count_nonzero(ours[1]) == 0 and torch.count_nonzero(ours[2]) == 0
        return
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_all_labels_equal_and_every_class_a_singleton():
    x, w, _ = make(12, 12, 6, seed=8)
    for y in (torch.full((12,), 3), torch.randperm(12, generator=torch.Generator().manual_seed(0))):
        for a, b in zip(loss_and_grads("cpp", x, w, y), loss_and_grads("reference", x, w, y)):
            assert rel(a, b) <= 1e-12


def test_zero_row_and_aligned_vectors_finite():
    x, w, y = make(5, 4, 3, seed=1)
    x[0] = 0.0
    x[1] = 2.0 * w[y[1]]     # c = +1 on the target
    x[2] = -3.0 * w[y[2]]    # c = -1 on the target
    for margin in MARGINS.values():
        ours = loss_and_grads("cpp", x, w, y, **margin)
        ref = loss_and_grads("reference", x, w, y, **margin)
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_eager_error(dtype):
    x, w, y = make(33, 41, 16, seed=9, ignore=2, scale=2.0)
    kw = dict(margin="cosface", s=16.0)
    truth = loss_and_grads("reference", x, w, y, **kw)
    eager = loss_and_grads("reference", x.to(dtype), w.to(dtype), y, **kw)
    ours = loss_and_grads("cpp", x.to(dtype), w.to(dtype), y, **kw)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for o, e, t in zip(ours, eager, truth):
        assert rel(o, t) <= 2 * rel(e, t) + 1e-2


@pytest.mark.parametrize("x_grad,w_grad", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_combinations(x_grad, w_grad, reduction):
    x, w, y = make(9, 7, 5, seed=6, ignore=1)
    results = {}
    for backend in ("cpp", "reference"):
        xb, wb = x.clone().requires_grad_(x_grad), w.clone().requires_grad_(w_grad)
        loss = ik.cm_margin_loss(xb, wb, y, backend=backend, reduction=reduction)
        grads = []
        if loss.requires_grad:
            up = torch.ones_like(loss)
            grads = torch.autograd.grad(loss, [t for t in (xb, wb) if t.requires_grad], up)
        results[backend] = (loss.detach(), grads)
    torch.testing.assert_close(results["cpp"][0], results["reference"][0], rtol=1e-12, atol=0)
    assert len(results["cpp"][1]) == len(results["reference"][1]) == int(x_grad) + int(w_grad)
    for a, b in zip(results["cpp"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_no_grad_path_matches():
    x, w, y = make(20, 9, 6, seed=12, ignore=3)
    with torch.no_grad():
        for red in ("mean", "sum", "none"):
            torch.testing.assert_close(ik.cm_margin_loss(x, w, y, backend="cpp", reduction=red),
                                       reference.cm_margin_loss(x, w, y, reduction=red), rtol=1e-12, atol=0)


def test_bitwise_deterministic():
    x, w, y = make(300, 1000, 64, seed=13, ignore=3, dtype=torch.float32)
    runs = [loss_and_grads("cpp", x, w, y, margin="arcface") for _ in range(2)]
    runs += [loss_and_grads("cpp", x, w, y, margin="arcface", reduction="none") for _ in range(2)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[2], runs[3]):
        assert torch.equal(a, b)


def test_inputs_not_modified():
    x, w, y = make(11, 5, 4, seed=14, ignore=2, dtype=torch.float32)
    cw = torch.rand(5)
    before = [t.clone() for t in (x, w, y, cw)]
    loss_and_grads("cpp", x, w, y, class_weight=cw)
    for a, b in zip(before, (x, w, y, cw)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    from idid_kernels.ops.cm_margin import config_args
    x, w, y = make(7, 6, 5, seed=15, ignore=1, dtype=dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    cfg = config_args(resolve_margin("arcface"), s=10.0, contraction="sigmoid", norm_offset=0.0,
                      norm_temperature=1.0, detach_norm=False, margin_grad="exact", ignore_index=-100,
                      num_classes=6)
    ops = torch.ops.idid_kernels
    torch.library.opcheck(ops.cm_margin_forward.default, (x, w, y, *cfg))
    loss_rows, stats, xn, wn = ops.cm_margin_forward(x.detach(), w.detach(), y, *cfg)
    torch.library.opcheck(ops.cm_margin_backward.default, (torch.rand_like(xn), x.detach(), w.detach(), y, stats, xn,
                                                           wn, *cfg))
    torch.library.opcheck(ops.cm_margin_fused.default, (x, w, y, torch.rand(7, dtype=xn.dtype), *cfg))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    x, w, y = make(15, 8, 6, seed=16, ignore=2, dtype=torch.float32)

    def f(x, w):
        out = ik.cm_margin_loss(x, w, y, backend="cpp", margin="arcface", reduction=reduction)
        return out.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss_c = compiled(xs, ws)
    loss_c.backward()
    loss_e = f(xe, we)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(xs.grad, xe.grad)
    torch.testing.assert_close(ws.grad, we.grad)


def test_direct_op_call_rejects_out_of_range_label():
    from idid_kernels.ops.cm_margin import config_args
    x, w, y = make(4, 3, 2, dtype=torch.float32)
    y[1] = 3
    cfg = config_args(resolve_margin("cosface"), s=30.0, contraction="sigmoid", norm_offset=0.0,
                      norm_temperature=1.0, detach_norm=False, margin_grad="exact", ignore_index=-100,
                      num_classes=3)
    with pytest.raises(RuntimeError, match=r"labels\[1\] = 3 out of range"):
        torch.ops.idid_kernels.cm_margin_forward(x, w, y, *cfg)


def test_all_requires_grad_and_reduction_pairs_cover_fused_and_rows_paths():
    # The fused path (mean/sum with grad) and the rows path (none, or no grad) agree with each other.
    x, w, y = make(17, 10, 7, seed=17, ignore=2)
    for margin, red in itertools.product(("cosface", "sphereface"), ("mean", "sum")):
        fused = loss_and_grads("cpp", x, w, y, margin=margin, reduction=red)
        rows = loss_and_grads("cpp", x, w, y, margin=margin, reduction="none", upstream_seed=0)
        # reduce the rows path by hand with the same upstream scalar as the fused path
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        per_row = ik.cm_margin_loss(xr, wr, y, margin=margin, reduction="none", backend="cpp")
        total = per_row.sum() / (y != -100).sum() if red == "mean" else per_row.sum()
        up = torch.randn((), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        dx, dw = torch.autograd.grad(total, (xr, wr), up)
        torch.testing.assert_close(total.detach(), fused[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(dx, fused[1], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(dw, fused[2], rtol=1e-10, atol=1e-14)
        assert rows[0].shape == (17,)
