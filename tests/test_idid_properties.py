"""The properties spec/idid.md lists for the IDID-R1 loss, checked on the float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import make_gen, rel_err
from idid_kernels.reference import IDIDTerms, class_density, idid_loss
from idid_kernels.reference.idid import sample_weights

F64 = torch.float64
IGNORE = -100
SWITCHES = list(itertools.product([True, False], repeat=4))  # distillation, diversity, adaptive, balanced


def _kw(distillation=True, diversity=True, adaptive_weight=True, class_balanced=True):
    return dict(alpha=8.0, tau=1.2, t=2.0, distillation=distillation, diversity=diversity,
                adaptive_weight=adaptive_weight, diversity_weight=0.6, class_balanced=class_balanced)


def inputs(seed, labels, c=5, d=4):
    g = make_gen(seed)
    x = torch.randn(len(labels), d, generator=g, dtype=F64, requires_grad=True)
    proxies = torch.randn(c, d, generator=g, dtype=F64, requires_grad=True)
    sim = torch.randn(c, c, generator=g, dtype=F64, requires_grad=True)
    return x, proxies, sim, torch.tensor(labels)


MIXED = [0, 1, 0, 2, 1, 0, 4, 2, 0]


@pytest.mark.parametrize("switches", SWITCHES)
def test_invariant_to_positive_rescaling(switches):
    x, proxies, sim, labels = inputs(80, MIXED)
    kw = _kw(*switches)
    g = make_gen(81)
    rx = torch.rand(x.shape[0], 1, generator=g, dtype=F64) * 10 + 0.05
    rw = torch.rand(proxies.shape[0], 1, generator=g, dtype=F64) * 10 + 0.05
    base = idid_loss(x, proxies, sim, labels, return_terms=True, **kw)
    scaled = idid_loss(x * rx, proxies * rw, sim, labels, return_terms=True, **kw)
    for a, b in zip(base, scaled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the scaled x-gradient is the original divided by the row scale (u depends on x / ||x||)
    gx, = torch.autograd.grad(base.loss, (x,))
    xs = (x.detach() * rx).requires_grad_()
    gxs, = torch.autograd.grad(idid_loss(xs, proxies, sim, labels, **kw), (xs,))
    assert rel_err(gxs * rx, gx) < 1e-12


@pytest.mark.parametrize("switches", SWITCHES)
def test_invariant_to_batch_permutation(switches):
    x, proxies, sim, labels = inputs(82, MIXED + [IGNORE])
    kw = _kw(*switches)
    perm = torch.randperm(x.shape[0], generator=make_gen(83))
    loss = idid_loss(x, proxies, sim, labels, **kw)
    loss_p = idid_loss(x[perm], proxies, sim, labels[perm], **kw)
    torch.testing.assert_close(loss, loss_p, rtol=1e-13, atol=0)
    g = torch.autograd.grad(loss, (x, proxies, sim), allow_unused=True, materialize_grads=True)
    gp = torch.autograd.grad(loss_p, (x, proxies, sim), allow_unused=True, materialize_grads=True)
    assert rel_err(gp[0], g[0]) < 1e-12  # grad w.r.t. x is permuted with its rows (x[perm] indexing)
    assert rel_err(gp[1], g[1]) < 1e-12 and rel_err(gp[2], g[2]) < 1e-12


@pytest.mark.parametrize("class_balanced", [True, False])
def test_two_classes_no_distillation_signal(class_balanced):
    """C = 2: the teacher and student non-target distributions are both a point mass, kd = 0."""
    x, proxies, sim, labels = inputs(84, [0, 1, 1, 0, 1, 1], c=2)
    kw = _kw(class_balanced=class_balanced)
    with_kd = idid_loss(x, proxies, sim, labels, return_terms=True, **kw)
    without = idid_loss(x, proxies, sim, labels, return_terms=True, **dict(kw, distillation=False))
    torch.testing.assert_close(with_kd.l_ic, without.l_ic, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(with_kd.loss, without.loss, rtol=1e-14, atol=1e-15)
    with_kd.loss.backward()
    assert sim.grad is not None
    torch.testing.assert_close(sim.grad, torch.zeros_like(sim), rtol=0, atol=1e-15)


def test_three_classes_distillation_is_active():
    """Control for the C = 2 test: with C = 3 the distillation term and dTheta are non-zero."""
    x, proxies, sim, labels = inputs(85, [0, 1, 2, 0, 1, 2], c=3)
    with_kd = idid_loss(x, proxies, sim, labels, return_terms=True, **_kw())
    without = idid_loss(x, proxies, sim, labels, return_terms=True, **_kw(distillation=False))
    assert with_kd.l_ic > without.l_ic
    with_kd.loss.backward()
    assert sim.grad.abs().max() > 1e-6
    assert torch.equal(sim.grad.diagonal(), torch.zeros(3, dtype=F64))  # diagonal never matters


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [4, 2, IGNORE, 0], [3, IGNORE, 1, IGNORE]])
def test_all_singletons_no_diversity(labels):
    x, proxies, sim, labels = inputs(86, labels)
    out = idid_loss(x, proxies, sim, labels, return_terms=True, **_kw())
    assert isinstance(out, IDIDTerms)
    assert out.lam.item() == 0.0 and out.l_id.item() == 0.0
    torch.testing.assert_close(out.loss, out.l_ic, rtol=0, atol=0)
    assert out.l_ic > 0


@pytest.mark.parametrize("class_balanced", [True, False])
@pytest.mark.parametrize("labels", [MIXED, [0, 1, 2, 3, 4], [2, 2, 2], [0, IGNORE, 0, 3, IGNORE, 1, 1, 1]])
def test_sample_weights_sum_to_one(labels, class_balanced):
    labels = torch.tensor(labels)
    valid = labels != IGNORE
    y = torch.where(valid, labels, torch.zeros_like(labels))
    a, counts = sample_weights(y, valid, 5, F64, class_balanced)
    torch.testing.assert_close(a.sum(), torch.tensor(1.0, dtype=F64), rtol=1e-15, atol=1e-15)
    assert torch.equal(a[~valid], torch.zeros_like(a[~valid]))
    assert counts.tolist() == [float((labels == k).sum()) for k in range(5)]
    if class_balanced:
        # every present class gets the same total weight 1 / K_B
        k_b = int((counts > 0).sum())
        for k in range(5):
            if counts[k] > 0:
                assert a[labels == k].sum().item() == pytest.approx(1.0 / k_b, rel=1e-14)
    else:
        assert torch.allclose(a[valid], torch.full_like(a[valid], 1.0 / int(valid.sum())))


def test_sample_weights_all_ignored_are_zero():
    labels = torch.tensor([IGNORE] * 4)
    valid = labels != IGNORE
    a, _ = sample_weights(torch.zeros_like(labels), valid, 3, F64)
    assert torch.equal(a, torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("distillation", [True, False])
@pytest.mark.parametrize("class_balanced", [True, False])
def test_adaptive_loss_is_twice_l_ic(distillation, class_balanced):
    x, proxies, sim, labels = inputs(87, MIXED)
    out = idid_loss(x, proxies, sim, labels, return_terms=True,
                    **_kw(distillation=distillation, class_balanced=class_balanced))
    assert out.l_id > 0
    assert out.loss.item() == pytest.approx(2 * out.l_ic.item(), rel=1e-6)
    # lambda = L_IC / (L_ID + eps), so the loss is 2 L_IC up to eps / L_ID
    assert out.lam.item() == pytest.approx(out.l_ic.item() / out.l_id.item(), rel=1e-6)
    # with the fixed weight it is not
    fixed = idid_loss(x, proxies, sim, labels, return_terms=True,
                      **_kw(distillation=distillation, adaptive_weight=False, class_balanced=class_balanced))
    assert fixed.lam.item() == 0.6
    torch.testing.assert_close(fixed.loss, fixed.l_ic + 0.6 * fixed.l_id, rtol=1e-14, atol=0)


@pytest.mark.parametrize("switches", SWITCHES)
def test_ignored_rows_equal_dropped_rows(switches):
    kw = _kw(*switches)
    labels_full = [0, IGNORE, 1, 0, 2, IGNORE, 1, 0, IGNORE]
    x, proxies, sim, labels = inputs(88, labels_full)
    keep = labels != IGNORE
    marked = idid_loss(x, proxies, sim, labels, return_terms=True, **kw)
    dropped = idid_loss(x[keep], proxies, sim, labels[keep], return_terms=True, **kw)
    for a, b in zip(marked, dropped):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    gx, = torch.autograd.grad(marked.loss, (x,))
    assert torch.equal(gx[~keep], torch.zeros_like(gx[~keep]))
    # a different ignore_index value works the same way
    labels7 = torch.where(keep, labels, torch.full_like(labels, 7))
    other = idid_loss(x, proxies, sim, labels7, ignore_index=7, **kw)
    torch.testing.assert_close(other, marked.loss, rtol=1e-13, atol=1e-15)


def test_class_density_identical_rows_is_one():
    g = make_gen(89)
    row = torch.randn(1, 4, generator=g, dtype=F64)
    x = torch.cat([row, 3.0 * row, 0.5 * row, torch.randn(2, 4, generator=g, dtype=F64)])
    labels = torch.tensor([0, 0, 0, 1, 2])
    d = class_density(x, labels, 3)
    assert d[0].item() == pytest.approx(1.0, abs=1e-14)
    assert d[1].item() == 0.0 and d[2].item() == 0.0


def test_diversity_decreases_when_class_is_spread():
    """Spreading the rows of a class lowers D_c and L_ID (the diversity term rewards spread)."""
    g = make_gen(90)
    center = F.normalize(torch.randn(1, 5, generator=g, dtype=F64), dim=1)
    noise = torch.randn(4, 5, generator=g, dtype=F64)
    labels = torch.tensor([0, 0, 0, 0])
    proxies = torch.randn(3, 5, generator=g, dtype=F64)
    sim = torch.randn(3, 3, generator=g, dtype=F64)
    densities, l_ids = [], []
    for spread in (0.0, 0.1, 0.5, 2.0, 10.0):
        x = center + spread * noise
        densities.append(class_density(x, labels, 3)[0].item())
        l_ids.append(idid_loss(x, proxies, sim, labels, return_terms=True).l_id.item())
    assert densities[0] == pytest.approx(1.0, abs=1e-14)
    assert all(a > b for a, b in zip(densities, densities[1:]))
    assert l_ids == pytest.approx(densities, rel=1e-13)
    # and the gradient of L_ID w.r.t. the rows points towards spreading them: a small descent step
    x = (center + 0.3 * noise).requires_grad_()
    l_id = idid_loss(x, proxies, sim, labels, return_terms=True).l_id
    gx, = torch.autograd.grad(l_id, (x,))
    stepped = idid_loss(x.detach() - 1e-2 * gx, proxies, sim, labels, return_terms=True).l_id
    assert stepped < l_id
