"""The analytic backward formulas in idid_kernels.reference.grads against autograd of the
reference forward, in float64, to relative error <= 1e-10."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_gen, rel_err
from idid_kernels.reference import (
    class_density,
    cm_margin_loss,
    idid_loss,
    norm_contraction,
    pairwise_cosine,
    phi,
    phi_grad,
    resolve_margin,
)
from idid_kernels.reference.grads import (
    class_density_backward,
    cm_margin_backward,
    idid_backward,
    norm_contraction_backward,
    pairwise_cosine_backward,
)

F64 = torch.float64
IGNORE = -100
TOL = 1e-10

MARGIN_CONFIGS = {
    "none": dict(margin="none"),
    "cosface": dict(margin="cosface", m=0.35),
    "arcface": dict(margin="arcface", m=0.5),
    "arcface_easy": dict(margin="arcface", m=0.5, easy_margin=True),
    "combined": dict(margin="combined", m1=1.2, m2=0.3, m3=0.1),
    "combined_easy": dict(margin="combined", m1=1.0, m2=0.4, m3=0.05, easy_margin=True),
    "sphereface": dict(margin="sphereface", m=4),
    "sphereface_lambda2": dict(margin="sphereface", m=4, sphere_lambda=2.0),
}

_CW = (0.5, 2.0, 1.0, 0.25, 3.0, 1.5)

# Each entry: keyword arguments for the loss plus test-only keys
#   n_ignore  -- how many trailing rows get ignore_index
#   upstream  -- "one" (implicit 1), "scalar" (random scalar), "vector" (random, reduction="none")
#   degenerate -- put c = +1, c = -1 and a zero row into the batch
CM_OPTIONS = {
    "default": dict(),
    "contraction_none": dict(contraction="none"),
    "offset_temperature": dict(norm_offset=1.5, norm_temperature=0.7),
    "detach_norm": dict(detach_norm=True),
    "straight_through": dict(margin_grad="straight_through"),
    "straight_through_contraction_none": dict(margin_grad="straight_through", contraction="none"),
    "class_weight": dict(class_weight=_CW),
    "ignore_rows": dict(n_ignore=3),
    "ignore_rows_class_weight": dict(n_ignore=2, class_weight=_CW),
    "all_ignored_mean": dict(n_ignore=8),
    "all_ignored_sum": dict(n_ignore=8, reduction="sum"),
    "mean_scalar_upstream": dict(upstream="scalar"),
    "sum_scalar_upstream": dict(reduction="sum", upstream="scalar"),
    "sum_class_weight_ignore": dict(reduction="sum", upstream="scalar", class_weight=_CW, n_ignore=2),
    "none_vector_upstream": dict(reduction="none", upstream="vector"),
    "none_vector_upstream_ignore_cw": dict(reduction="none", upstream="vector", n_ignore=2, class_weight=_CW),
    "degenerate_rows": dict(degenerate=True),
    "degenerate_rows_contraction_none": dict(degenerate=True, contraction="none", upstream="scalar"),
}


def cm_case(seed, n=8, c=6, d=5, n_ignore=0, degenerate=False):
    g = make_gen(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(c, d, generator=g, dtype=F64)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])
    w_hat = F.normalize(w, dim=1)
    # a few rows on arcface's hard-fallback branch / SphereFace's large-k branches
    x[3] = -1.4 * w_hat[labels[3]] + 0.2 * torch.randn(d, generator=g, dtype=F64)
    x[4] = 0.9 * w_hat[labels[4]] + 0.1 * torch.randn(d, generator=g, dtype=F64)
    if degenerate:
        x[0] = 2.0 * w[0]    # c = +1
        x[1] = -0.3 * w[1]   # c = -1
        x[2] = 0.0           # zero row
    if n_ignore:
        labels[n - n_ignore:] = IGNORE
    return x.requires_grad_(), w.requires_grad_(), labels


@pytest.mark.parametrize("option", list(CM_OPTIONS))
@pytest.mark.parametrize("name", list(MARGIN_CONFIGS))
def test_cm_margin_backward(name, option):
    opts = dict(CM_OPTIONS[option])
    n_ignore = opts.pop("n_ignore", 0)
    upstream = opts.pop("upstream", "one")
    degenerate = opts.pop("degenerate", False)
    if "class_weight" in opts:
        opts["class_weight"] = torch.tensor(opts["class_weight"], dtype=F64)
    x, w, labels = cm_case(50, n_ignore=n_ignore, degenerate=degenerate)
    margin_kw = MARGIN_CONFIGS[name]
    s = 4.0 if not degenerate else 30.0

    loss = cm_margin_loss(x, w, labels, s=s, **margin_kw, **opts)
    g = make_gen(51)
    if upstream == "vector":
        grad_out = torch.randn(loss.shape, generator=g, dtype=F64)
    elif upstream == "scalar":
        grad_out = torch.randn((), generator=g, dtype=F64)
    else:
        grad_out = torch.ones((), dtype=F64)
    ax, aw = torch.autograd.grad(loss, (x, w), grad_outputs=grad_out)

    params = resolve_margin(**margin_kw)
    dx, dw = cm_margin_backward(grad_out, x.detach(), w.detach(), labels, params, s=s, **opts)
    assert dx.shape == x.shape and dw.shape == w.shape
    if n_ignore >= x.shape[0]:
        # all rows ignored: F.cross_entropy's zero gradients (even though mean gives NaN)
        assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))
        assert torch.equal(ax, torch.zeros_like(ax))
        return
    assert ax.abs().max() > 0 and aw.abs().max() > 0
    assert rel_err(dx, ax) <= TOL, rel_err(dx, ax)
    assert rel_err(dw, aw) <= TOL, rel_err(dw, aw)


@pytest.mark.parametrize("name", [k for k in MARGIN_CONFIGS if k not in ("none", "cosface")])
def test_phi_grad_matches_autograd_of_phi(name):
    """phi'(c) of the backward equals autograd of phi, on a grid including c = +-1 and both
    sides of every branch (the clamp passes the gradient straight through)."""
    params = resolve_margin(**MARGIN_CONFIGS[name])
    c = torch.cat([torch.linspace(-1.0, 1.0, 401, dtype=F64),
                   torch.tensor([-1 + 1e-9, 1 - 1e-9, -0.8776, -0.8775, -0.7154, -0.7153, 0.0], dtype=F64)])
    c.requires_grad_()
    auto, = torch.autograd.grad(phi(c, params).sum(), c)
    analytic = phi_grad(c.detach(), params)
    assert torch.isfinite(analytic).all()
    assert rel_err(analytic, auto) <= 1e-12
    torch.testing.assert_close(phi_grad(c.detach(), params, "straight_through"), torch.ones_like(c),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# idid_backward
# ------------------------------------------------------------------------------------------------

LABEL_PATTERNS = {
    "mixed": [0, 1, 0, 2, 1, 0, 3, 2],
    "all_singletons": [3, 0, 4, 1, 2],
    "all_one_class": [2, 2, 2, 2, 2, 2],
    "some_ignored": [0, IGNORE, 1, 0, IGNORE, 1, 3, 0],
    "all_ignored": [IGNORE] * 5,
    "absent_class": [0, 1, 0, 1, 3, 3, 0],  # classes 2 and 4 absent
}


@pytest.mark.parametrize("pattern", list(LABEL_PATTERNS))
@pytest.mark.parametrize("distillation,diversity,adaptive_weight,class_balanced",
                         list(itertools.product([True, False], repeat=4)))
def test_idid_backward(distillation, diversity, adaptive_weight, class_balanced, pattern):
    labels = torch.tensor(LABEL_PATTERNS[pattern])
    g = make_gen(60)
    b, c, d = labels.numel(), 5, 4
    x = torch.randn(b, d, generator=g, dtype=F64, requires_grad=True)
    proxies = torch.randn(c, d, generator=g, dtype=F64, requires_grad=True)
    sim = torch.randn(c, c, generator=g, dtype=F64, requires_grad=True)
    grad_out = torch.randn((), generator=g, dtype=F64)
    kw = dict(alpha=6.0, tau=1.3, t=1.5, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.7, class_balanced=class_balanced)

    loss = idid_loss(x, proxies, sim, labels, **kw)
    assert torch.isfinite(loss)
    auto = torch.autograd.grad(loss, (x, proxies, sim), grad_outputs=grad_out,
                               allow_unused=True, materialize_grads=True)
    analytic = idid_backward(grad_out, x.detach(), proxies.detach(), sim.detach(), labels, **kw)
    for name, a, e in zip(("x", "proxies", "similarity"), analytic, auto):
        assert a.shape == e.shape, name
        assert rel_err(a, e) <= TOL, (name, rel_err(a, e))
    if pattern == "all_ignored":
        for a in analytic:
            assert torch.equal(a, torch.zeros_like(a))
    else:
        assert auto[0].abs().max() > 0 and auto[1].abs().max() > 0
    if distillation and pattern != "all_ignored":
        assert auto[2].abs().max() > 0


# ------------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_y", [True, False])
def test_pairwise_cosine_backward(with_y):
    g = make_gen(70)
    x = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True) if with_y else None
    out = pairwise_cosine(x, y)
    grad = torch.randn(out.shape, generator=g, dtype=F64)
    if with_y:
        ax, ay = torch.autograd.grad(out, (x, y), grad_outputs=grad)
        dx, dy = pairwise_cosine_backward(grad, x.detach(), y.detach())
        assert rel_err(dx, ax) <= TOL and rel_err(dy, ay) <= TOL
    else:
        ax, = torch.autograd.grad(out, (x,), grad_outputs=grad)
        dx, dy = pairwise_cosine_backward(grad, x.detach())
        assert dy is None
        assert rel_err(dx, ax) <= TOL


def test_pairwise_cosine_backward_zero_and_tiny_rows():
    g = make_gen(71)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    x[2] = 0.0
    x[0] *= 1e-13  # below F.normalize's 1e-12 floor: no radial projection there
    x.requires_grad_()
    y = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    grad = torch.randn(4, 5, generator=g, dtype=F64)
    ax, ay = torch.autograd.grad(pairwise_cosine(x, y), (x, y), grad_outputs=grad)
    dx, dy = pairwise_cosine_backward(grad, x.detach(), y.detach())
    assert rel_err(dx, ax) <= TOL and rel_err(dy, ay) <= TOL


@pytest.mark.parametrize("t", [2.0, 0.5])
def test_class_density_backward(t):
    g = make_gen(72)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 4])  # class 2, 4 singletons, class 3 absent
    x = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)
    out = class_density(x, labels, 5, t=t)
    grad = torch.randn(5, generator=g, dtype=F64)
    ax, = torch.autograd.grad(out, (x,), grad_outputs=grad)
    dx = class_density_backward(grad, x.detach(), labels, t=t)
    assert rel_err(dx, ax) <= TOL
    # singleton rows get no gradient
    assert torch.equal(dx[3], torch.zeros(4, dtype=F64)) and torch.equal(dx[6], torch.zeros(4, dtype=F64))


@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (1.5, 0.7)])
def test_norm_contraction_backward(offset, temperature):
    g = make_gen(73)
    x = torch.randn(6, 5, generator=g, dtype=F64)
    x[4] = 0.0
    x.requires_grad_()
    out = norm_contraction(x, offset=offset, temperature=temperature)
    grad = torch.randn(6, generator=g, dtype=F64)
    ax, = torch.autograd.grad(out, (x,), grad_outputs=grad)
    dx = norm_contraction_backward(grad, x.detach(), offset=offset, temperature=temperature)
    assert rel_err(dx, ax) <= TOL
    assert torch.equal(dx[4], torch.zeros(5, dtype=F64))
    assert torch.isfinite(dx).all()
    # spelled out for a non-zero row: grad * sig (1 - sig) / T * x / ||x||
    r = x[0].detach().norm()
    sig = 1 / (1 + math.exp(-(r.item() - offset) / temperature))
    expected = grad[0] * sig * (1 - sig) / temperature * x[0].detach() / r
    torch.testing.assert_close(dx[0], expected, rtol=1e-13, atol=0)


def test_cm_mean_with_zero_total_weight_is_nan_like_cross_entropy():
    # Non-ignored rows whose class weights sum to 0: F.cross_entropy's mean is 0/0, loss and grads NaN.
    g = make_gen(11)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, -100])
    cw = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    loss = cm_margin_loss(x, w, labels, s=3.0, class_weight=cw)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert torch.isnan(loss)
    ax, aw = cm_margin_backward(torch.tensor(1.0, dtype=F64), x.detach(), w.detach(), labels,
                                resolve_margin("cosface"), s=3.0, class_weight=cw)
    assert torch.isnan(dx[:3]).all() and torch.isnan(dw).any()
    assert torch.equal(torch.isnan(ax), torch.isnan(dx)) and torch.equal(torch.isnan(aw), torch.isnan(dw))
    torch.testing.assert_close(ax[3], dx[3])  # the ignored row: exactly zero in both
