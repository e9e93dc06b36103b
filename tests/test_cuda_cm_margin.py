"""The cuda backend of cm_margin_loss, pairwise_cosine and norm_contraction against the float64
reference. GPU-only: these run where torch sees a CUDA device and the extension was built with
CUDA (on a CPU-only machine the whole module is skipped, which is the correct outcome there)."""
import pytest
import torch

import idid_kernels as ik
from idid_kernels import reference

pytestmark = pytest.mark.skipif("cuda" not in ik.available_backends(),
                                reason="GPU-only tests: no CUDA device, or the extension was built without CUDA")

MARGINS = {
    "none": dict(margin="none"),
    "cosface": dict(margin="cosface"),
    "arcface": dict(margin="arcface"),
    "arcface_easy": dict(margin="arcface", easy_margin=True),
    "combined": dict(margin="combined", m1=1.2, m2=0.3, m3=0.1),
    "sphereface": dict(margin="sphereface", m=4, sphere_lambda=1.0),
}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def make(n, c, d, seed=0, ignore=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignore] = -100
    return x, w, y


def run(backend, x, w, y, dtype, device, **kw):
    xb = x.to(device=device, dtype=dtype).requires_grad_(True)
    wb = w.to(device=device, dtype=dtype).requires_grad_(True)
    loss = ik.cm_margin_loss(xb, wb, y.to(device), backend=backend, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dx, dw = torch.autograd.grad(loss, (xb, wb), up.to(device=device, dtype=loss.dtype))
    return loss, dx, dw


@pytest.mark.parametrize("margin", list(MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(1, 2, 3), (37, 129, 64), (300, 70000, 32)])
def test_cm_float32_matches_float64_reference(margin, reduction, shape):
    x, w, y = make(*shape, seed=sum(shape), ignore=2 if shape[0] > 2 else 0, scale=1.0)
    kw = dict(MARGINS[margin], reduction=reduction, s=16.0)  # rows off saturation: gradients are O(1)
    truth = run("reference", x, w, y, torch.float64, "cpu", **kw)
    ours = run("cuda", x, w, y, torch.float32, "cuda", **kw)
    assert rel(ours[0], truth[0]) <= 1e-5 or float((ours[0].cpu().double() - truth[0]).abs().max()) <= 1e-6
    assert rel(ours[1], truth[1]) <= 1e-4 and rel(ours[2], truth[2]) <= 1e-4


@pytest.mark.parametrize("margin", list(MARGINS))
def test_cm_gradcheck_float64(margin):
    x, w, y = make(6, 5, 4, seed=1, ignore=1, scale=1.0)
    xc = x.cuda().requires_grad_(True)
    wc = w.cuda().requires_grad_(True)
    yc = y.cuda()
    for red in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: ik.cm_margin_loss(a, b, yc, backend="cuda", s=4.0, reduction=red, **MARGINS[margin]),
            (xc, wc))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cm_low_precision_within_twice_eager_error(dtype):
    x, w, y = make(257, 1031, 128, seed=5, ignore=3)
    truth = run("reference", x, w, y, torch.float64, "cpu")
    eager = run("reference", x, w, y, dtype, "cuda")
    ours = run("cuda", x, w, y, dtype, "cuda")
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for o, e, t in zip(ours, eager, truth):
        assert rel(o, t) <= 2 * rel(e, t) + 1e-2


def test_cm_ignore_all_rows_mean_is_nan_with_zero_grads():
    x, w, y = make(8, 6, 4, seed=2)
    y[:] = -100
    loss, dx, dw = run("cuda", x, w, y, torch.float32, "cuda")
    assert torch.isnan(loss) and torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0


def test_cm_bitwise_deterministic_and_compiles():
    x, w, y = make(513, 4099, 96, seed=7, ignore=4)
    a = run("cuda", x, w, y, torch.float32, "cuda", margin="arcface")
    b = run("cuda", x, w, y, torch.float32, "cuda", margin="arcface")
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    xc, wc, yc = x.float().cuda().requires_grad_(True), w.float().cuda().requires_grad_(True), y.cuda()
    f = torch.compile(lambda p, q: ik.cm_margin_loss(p, q, yc, backend="cuda"), fullgraph=True)
    loss = f(xc, wc)
    loss.backward()
    torch.testing.assert_close(loss, ik.cm_margin_loss(xc.detach(), wc.detach(), yc, backend="cuda"))


def test_cm_opcheck():
    from idid_kernels.ops.cm_margin import config_args
    from idid_kernels.reference.margins import resolve_margin
    x, w, y = make(7, 6, 5, seed=15, ignore=1)
    x, w, y = x.float().cuda().requires_grad_(True), w.float().cuda().requires_grad_(True), y.cuda()
    cfg = config_args(resolve_margin("arcface"), s=10.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0,
                      detach_norm=False, margin_grad="exact", ignore_index=-100, num_classes=6, device_type="cuda")
    ops = torch.ops.idid_kernels
    torch.library.opcheck(ops.cm_margin_forward.default, (x, w, y, *cfg))
    torch.library.opcheck(ops.cm_margin_fused.default, (x, w, y, torch.rand(7, device="cuda"), *cfg))


@pytest.mark.parametrize("with_y", [False, True])
def test_pairwise_cosine_and_norm_contraction(with_y):
    g = torch.Generator().manual_seed(9)
    x64 = torch.randn(129, 33, generator=g, dtype=torch.float64)
    y64 = torch.randn(65, 33, generator=g, dtype=torch.float64) if with_y else None
    x = x64.float().cuda().requires_grad_(True)
    y = y64.float().cuda().requires_grad_(True) if with_y else None
    out = ik.pairwise_cosine(x, y, backend="cuda")
    truth = reference.pairwise_cosine(x64, y64)
    assert rel(out, truth) <= 1e-5
    xd = x64.cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ik.pairwise_cosine(t, None, backend="cuda"), (xd[:7, :5].detach()
                                                                                            .requires_grad_(True),))
    nc = ik.norm_contraction(x, offset=0.5, temperature=2.0, backend="cuda")
    assert rel(nc, reference.norm_contraction(x64, 0.5, 2.0)) <= 1e-5
    assert torch.autograd.gradcheck(lambda t: ik.norm_contraction(t, backend="cuda"), (xd[:7, :5].detach()
                                                                                        .requires_grad_(True),))
