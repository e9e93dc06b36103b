"""Class-parallel cm_margin_loss: per-shard partial statistics combine to the single-device loss."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import idid_kernels as ik
from idid_kernels import class_parallel as cp

from conftest import make_gen, rel_err

pytestmark = pytest.mark.skipif("cpp" not in ik.available_backends(), reason="needs the C++ extension")

MARGINS = [dict(margin="cosface"), dict(margin="arcface"), dict(margin="arcface", easy_margin=True),
           dict(margin="sphereface", m=3.0, sphere_lambda=0.5), dict(margin="none"),
           dict(margin="combined", m1=1.0, m2=0.3, m3=0.2)]


def _inputs(n, d, c, seed, dtype=torch.float64, ignore=()):
    g = make_gen(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype) * 3
    w = torch.randn(c, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    for i in ignore:
        y[i] = -100
    return x, w, y


def _sharded(x, w, y, bounds, g, **kw):
    """Loss rows, dx, dw from the shard ops over the class ranges given by ``bounds``."""
    c = w.shape[0]
    parts = list(zip(bounds, bounds[1:]))
    stats = [cp.shard_stats(x, w[a:b], y, class_offset=a, num_classes=c, **kw) for a, b in parts]
    lse, loss = cp.combine_stats(stats, y)
    grads = [cp.shard_grads(g, x, w[a:b], y, lse, s.x_norm, s.w_norm, class_offset=a, num_classes=c, **kw)
             for (a, b), s in zip(parts, stats)]
    du = sum(q.du for q in grads)
    dx = cp.combine_grads(x, stats[0].x_norm, du, sum(q.radial for q in grads))
    for q in grads:  # Q is <du_k, u> per shard, so the shards' Q add up to <du, u>
        assert q.q.shape == (x.shape[0],)
    u = x.to(du.dtype) / stats[0].x_norm.clamp_min(1e-12).unsqueeze(1)
    torch.testing.assert_close(sum(q.q for q in grads), (du * u).sum(1))
    return loss, dx, torch.cat([q.dweight for q in grads])


def _reference(x, w, y, g, **kw):
    x = x.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    rows = ik.cm_margin_loss(x, w, y, reduction="none", backend="reference", **kw)
    (rows * g.double()).sum().backward()
    return rows.detach(), x.grad, w.grad


@pytest.mark.parametrize("kw", MARGINS, ids=lambda k: "-".join(str(v) for v in k.values()))
@pytest.mark.parametrize("contraction", ["sigmoid", "none"])
def test_shards_combine_to_reference_float64(kw, contraction):
    x, w, y = _inputs(29, 7, 19, seed=1, ignore=(4, 11))
    g = torch.randn(29, generator=make_gen(2), dtype=torch.float64)
    kw = dict(kw, contraction=contraction, norm_offset=1.0, norm_temperature=2.0)
    loss, dx, dw = _sharded(x, w, y, [0, 1, 8, 9, 19], g, **kw)  # shards of 1, 7, 1 and 10 classes
    ref_loss, ref_dx, ref_dw = _reference(x, w, y, g, **kw)
    assert rel_err(loss, ref_loss) < 1e-12
    assert rel_err(dx, ref_dx) < 1e-12
    assert rel_err(dw, ref_dw) < 1e-12


@pytest.mark.parametrize("opts", [dict(detach_norm=True), dict(margin_grad="straight_through", margin="arcface")])
def test_shard_options(opts):
    x, w, y = _inputs(17, 5, 11, seed=3)
    g = torch.randn(17, generator=make_gen(4), dtype=torch.float64)
    loss, dx, dw = _sharded(x, w, y, [0, 6, 11], g, **opts)
    ref_loss, ref_dx, ref_dw = _reference(x, w, y, g, **opts)
    assert rel_err(loss, ref_loss) < 1e-12 and rel_err(dx, ref_dx) < 1e-12 and rel_err(dw, ref_dw) < 1e-12


def test_shards_float32_within_contract():
    x, w, y = _inputs(64, 32, 300, seed=5, dtype=torch.float32)
    g = torch.randn(64, generator=make_gen(6))
    loss, dx, dw = _sharded(x, w, y, [0, 100, 233, 300], g, margin="arcface")
    ref_loss, ref_dx, ref_dw = _reference(x, w, y, g, margin="arcface")
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(dx, ref_dx) < 1e-4 and rel_err(dw, ref_dw) < 1e-4


def test_rows_whose_target_is_elsewhere_have_zero_target_logit():
    x, w, y = _inputs(10, 4, 6, seed=7)
    stats = cp.shard_stats(x, w[3:], y, class_offset=3, num_classes=6)
    assert torch.all(stats.target_logit[y < 3] == 0)
    assert torch.all(stats.target_logit[y >= 3] != 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_process_loss_matches_cm_margin_loss(reduction):
    x, w, y = _inputs(23, 9, 13, seed=8, dtype=torch.float32, ignore=(0, 5))
    cw = torch.rand(13, generator=make_gen(9)) + 0.5
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = cp.cm_margin_loss_class_parallel(xa, wa, y, class_offset=0, num_classes=13, class_weight=cw,
                                           reduction=reduction, margin="arcface")
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = ik.cm_margin_loss(xb, wb, y, class_weight=cw, reduction=reduction, margin="arcface")
    grad = torch.randn(out.shape, generator=make_gen(10))
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert rel_err(xa.grad, xb.grad) < 1e-5 and rel_err(wa.grad, wb.grad) < 1e-5


def test_all_ignored_mean_is_nan_with_zero_grads():
    x, w, y = _inputs(5, 4, 3, seed=11)
    y[:] = -100
    x.requires_grad_()
    w.requires_grad_()
    loss = cp.cm_margin_loss_class_parallel(x, w, y, class_offset=0, num_classes=3)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


def test_gradcheck_float64():
    x, w, y = _inputs(6, 4, 5, seed=12, ignore=(2,))
    x.requires_grad_()
    w.requires_grad_()
    fn = lambda a, b: cp.cm_margin_loss_class_parallel(a, b, y, class_offset=0, num_classes=5, reduction="none",  # noqa: E731
                                                        margin="combined", m1=1.0, m2=0.2, m3=0.1, s=4.0)
    assert torch.autograd.gradcheck(fn, (x, w))


def test_bad_shards_raise():
    x, w, y = _inputs(4, 3, 5, seed=13)
    with pytest.raises(ValueError, match=r"shard's classes \[3, 8\) exceed num_classes=5"):
        cp.shard_stats(x, w, y, class_offset=3, num_classes=5)
    with pytest.raises(ValueError, match="class_offset must be >= 0"):
        cp.shard_stats(x, w, y, class_offset=-1, num_classes=5)
    y[0] = 5
    with pytest.raises(ValueError, match="labels"):
        cp.shard_stats(x, w, y, class_offset=0, num_classes=5)
    y[0] = 0
    with pytest.raises(ValueError, match="must hold all 9 classes"):
        cp.cm_margin_loss_class_parallel(x, w, y, class_offset=0, num_classes=9)
    with pytest.raises(TypeError, match="unexpected keyword"):
        cp.cm_margin_loss_class_parallel(x, w, y, class_offset=0, num_classes=5, bogus=1)


# ----------------------------------------------------------------- two processes, gloo
def _worker(rank, world, init_file, bounds, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, w, y = _inputs(21, 6, 11, seed=14, dtype=torch.float64, ignore=(3,))
        a, b = bounds[rank], bounds[rank + 1]
        xr, wr = x.clone().requires_grad_(), w[a:b].clone().requires_grad_()
        loss = cp.cm_margin_loss_class_parallel(xr, wr, y, class_offset=a, num_classes=11, margin="arcface")
        loss.backward()
        torch.save({"loss": loss.detach(), "dx": xr.grad, "dw": wr.grad}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_single_device():
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    bounds = [0, 4, 11]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), bounds, tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    x, w, y = _inputs(21, 6, 11, seed=14, dtype=torch.float64, ignore=(3,))
    x.requires_grad_()
    w.requires_grad_()
    ref = ik.cm_margin_loss(x, w, y, margin="arcface", backend="reference")
    ref.backward()
    for r, res in enumerate(results):
        assert abs(float(res["loss"] - ref.detach())) < 1e-12
        assert rel_err(res["dx"], x.grad) < 1e-12
        assert rel_err(res["dw"], w.grad[bounds[r]:bounds[r + 1]]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shard_ops_opcheck(dtype):
    from idid_kernels.ops.cm_margin import config_args
    from idid_kernels.reference.margins import resolve_margin
    x, w, y = _inputs(9, 5, 7, seed=15, dtype=dtype, ignore=(1,))
    cfg = config_args(resolve_margin("arcface", None, 1.0, 0.0, 0.0, 0.0, False), s=8.0, contraction="sigmoid",
                      norm_offset=0.0, norm_temperature=1.0, detach_norm=False, margin_grad="exact",
                      ignore_index=-100, num_classes=4)
    ops = torch.ops.idid_kernels
    torch.library.opcheck(ops.cm_margin_shard_forward.default, (x, w[3:], y, 3, *cfg))
    row_max, sum_exp, target, x_norm, w_norm = ops.cm_margin_shard_forward(x, w[3:], y, 3, *cfg)
    lse = row_max + torch.log(sum_exp)
    g = torch.rand(9, dtype=lse.dtype)
    torch.library.opcheck(ops.cm_margin_shard_backward.default, (g, x, w[3:], y, 3, lse, x_norm, w_norm, *cfg))


@pytest.mark.parametrize("kw", [dict(margin="none", contraction="none"), dict(margin="cosface", m=0.1)])
def test_small_row_losses_keep_their_digits_float32(kw):
    """Rows with losses from ~1e-9 up: the combined float32 loss is exact to the float32 cosines'
    own conditioning (no lse - z_y cancellation across shards)."""
    import torch.nn.functional as F
    g = make_gen(12)
    c, d, n = 9, 16, 40
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    lean = torch.linspace(0.0, 1.0, n, dtype=torch.float64)[:, None] ** 0.35
    noise = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    x = 4 * (lean * F.normalize(w, dim=1)[y] + (1 - lean) * noise)
    exact = ik.cm_margin_loss(x, w, y, reduction="none", backend="reference", **kw)
    assert exact.min() < 1e-7
    stats = [cp.shard_stats(x.float(), w[a:b].float(), y, class_offset=a, num_classes=c, **kw)
             for a, b in ((0, 4), (4, 5), (5, 9))]
    _, loss = cp.combine_stats(stats, y)
    err = (loss.double() - exact).abs() / exact
    assert err.max() <= 4 * 30.0 * 2.0 ** -23, err.max()
    rows = cp.cm_margin_loss_class_parallel(x.float(), w.float(), y, class_offset=0, num_classes=c,
                                            reduction="none", **kw)
    assert ((rows.double() - exact).abs() / exact).max() <= 4 * 30.0 * 2.0 ** -23


def test_per_row_margins_are_refused_clearly():
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(NotImplementedError, match="per-row"):
        cp.cm_margin_loss_class_parallel(x, w, y, class_offset=0, num_classes=5, margin="combined",
                                         m2=torch.zeros(4, dtype=torch.float64))
