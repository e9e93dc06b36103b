"""The pure-PyTorch oracles in idid_kernels.reference: float64 gradcheck, hand-written formulas,
and equality with torch.nn.functional.cross_entropy where the math says they must agree."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from conftest import make_gen, rel_err
from idid_kernels.reference import (
    MarginParams,
    class_density,
    cm_logits,
    cm_margin_loss,
    idid_loss,
    norm_contraction,
    pairwise_cosine,
    phi,
    resolve_margin,
)

F64 = torch.float64
IGNORE = -100

# Every margin preset the spec lists, with the parameters the brief asks for.
MARGIN_CONFIGS = {
    "none": dict(margin="none"),
    "cosface": dict(margin="cosface", m=0.35),
    "arcface": dict(margin="arcface", m=0.5),
    "arcface_easy": dict(margin="arcface", m=0.5, easy_margin=True),
    "combined": dict(margin="combined", m1=1.2, m2=0.3, m3=0.1),
    "sphereface": dict(margin="sphereface", m=4),
    "sphereface_lambda2": dict(margin="sphereface", m=4, sphere_lambda=2.0),
}

# Target cosines where some phi above is discontinuous (finite differences are meaningless there):
# arcface's hard fallback at theta + 0.5 = pi, combined's at 1.2 theta + 0.3 = pi, easy_margin at 0.
KINKS = (math.cos(math.pi - 0.5), math.cos((math.pi - 0.3) / 1.2), 0.0)
KINK_GAP = 0.05


def _target_cos(x, w, labels):
    valid = labels != IGNORE
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    return cos[valid, labels[valid]]


def cm_inputs(seed: int, n: int = 6, c: int = 5, d: int = 4, n_ignore: int = 0):
    """(x, w, labels), float64 leaves with requires_grad, every valid target cosine at least
    KINK_GAP away from every kink in KINKS and from +-1.

    Row 0 is nearly anti-parallel to its class weight (c ~ -0.95: the arcface/combined hard
    fallback branch and SphereFace k = 3); row 1 is nearly parallel (c ~ 0.95).
    """
    g = make_gen(seed)
    for _ in range(500):
        w = torch.randn(c, d, generator=g, dtype=F64)
        x = torch.randn(n, d, generator=g, dtype=F64)
        labels = torch.randint(0, c, (n,), generator=g)
        w_hat = F.normalize(w, dim=1)
        x[0] = -1.5 * w_hat[labels[0]] + 0.2 * torch.randn(d, generator=g, dtype=F64)
        x[1] = 1.2 * w_hat[labels[1]] + 0.2 * torch.randn(d, generator=g, dtype=F64)
        if n_ignore:
            labels[n - n_ignore:] = IGNORE
        tc = _target_cos(x, w, labels)
        far_from_kinks = all(bool(((tc - k).abs() > KINK_GAP).all()) for k in KINKS)
        if far_from_kinks and bool((tc.abs() < 1 - KINK_GAP).all()):
            return x.requires_grad_(), w.requires_grad_(), labels
    raise AssertionError("no kink-free draw found")  # pragma: no cover


def _gradcheck(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, raise_exception=True)


# ------------------------------------------------------------------------------------------------
# gradcheck of the primitives
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_y", [True, False])
def test_gradcheck_pairwise_cosine(with_y):
    g = make_gen(1)
    x = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    if with_y:
        y = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
        _gradcheck(lambda a, b: pairwise_cosine(a, b), (x, y))
        assert pairwise_cosine(x, y).shape == (5, 3)
    else:
        _gradcheck(lambda a: pairwise_cosine(a), (x,))
        assert pairwise_cosine(x).shape == (5, 5)


def test_pairwise_cosine_values():
    g = make_gen(2)
    x = torch.randn(5, 3, generator=g, dtype=F64)
    y = torch.randn(4, 3, generator=g, dtype=F64)
    expected = F.cosine_similarity(x[:, None, :], y[None, :, :], dim=2)
    torch.testing.assert_close(pairwise_cosine(x, y), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairwise_cosine(x), pairwise_cosine(x, x), rtol=0, atol=1e-15)


@pytest.mark.parametrize("t", [2.0, 0.7])
def test_gradcheck_class_density(t):
    g = make_gen(3)
    # class 0: 3 rows, class 1: 2 rows, class 2: singleton, class 3: absent
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    x = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    _gradcheck(lambda a: class_density(a, labels, 4, t=t), (x,))
    d = class_density(x, labels, 4, t=t)
    assert d.shape == (4,)
    assert d[2] == 0 and d[3] == 0 and (d[:2] > 0).all()


def test_class_density_by_hand():
    g = make_gen(4)
    labels = torch.tensor([1, 0, 1, 1, 0])
    x = torch.randn(5, 3, generator=g, dtype=F64)
    u = F.normalize(x, dim=1)
    t = 1.7
    expected = torch.zeros(3, dtype=F64)
    for cls in (0, 1):
        idx = [i for i in range(5) if labels[i] == cls]
        n = len(idx)
        total = sum(math.exp(t * (float(u[i] @ u[j]) - 1.0)) for i in idx for j in idx if i != j)
        expected[cls] = total / (n * (n - 1))
    torch.testing.assert_close(class_density(x, labels, 3, t=t), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (1.5, 0.7), (-0.5, 2.5)])
def test_gradcheck_norm_contraction(offset, temperature):
    g = make_gen(5)
    x = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    _gradcheck(lambda a: norm_contraction(a, offset=offset, temperature=temperature), (x,))
    expected = torch.sigmoid((x.detach().norm(dim=1) - offset) / temperature)
    torch.testing.assert_close(norm_contraction(x, offset=offset, temperature=temperature), expected,
                               rtol=1e-14, atol=0)


# ------------------------------------------------------------------------------------------------
# gradcheck of cm_margin_loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contraction", ["sigmoid", "none"])
@pytest.mark.parametrize("name", list(MARGIN_CONFIGS))
def test_gradcheck_cm_margin_presets(name, contraction):
    x, w, labels = cm_inputs(10)
    kw = dict(MARGIN_CONFIGS[name], s=4.0, contraction=contraction)
    _gradcheck(lambda a, b: cm_margin_loss(a, b, labels, **kw), (x, w))


CM_OPTIONS = {
    "offset_temperature": dict(norm_offset=1.5, norm_temperature=0.7),
    "sum": dict(reduction="sum"),
    "none_reduction": dict(reduction="none"),
    "class_weight": dict(class_weight=torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=F64)),
    "class_weight_sum": dict(reduction="sum", class_weight=torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=F64)),
    "ignore_mean": dict(n_ignore=2),
    "ignore_none_reduction": dict(n_ignore=2, reduction="none"),
    "ignore_class_weight": dict(n_ignore=1, class_weight=torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=F64)),
}


@pytest.mark.parametrize("name", ["cosface", "arcface", "combined", "sphereface_lambda2"])
@pytest.mark.parametrize("option", list(CM_OPTIONS))
def test_gradcheck_cm_margin_options(option, name):
    opts = dict(CM_OPTIONS[option])
    n_ignore = opts.pop("n_ignore", 0)
    x, w, labels = cm_inputs(11, n_ignore=n_ignore)
    kw = dict(MARGIN_CONFIGS[name], s=3.0, **opts)
    _gradcheck(lambda a, b: cm_margin_loss(a, b, labels, **kw), (x, w))


def _constant_scale_loss(x, w, labels, scale, params, target_shift=None):
    """Softmax CE over z = scale[:, None] * psi, with ``scale`` a constant tensor; psi is the exact
    margin row, or ``cos + stopgrad(target_shift)`` on the target when ``target_shift`` is given."""
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    onehot = F.one_hot(labels, w.shape[0]).to(F64)
    tc = (cos * onehot).sum(dim=1)
    if target_shift is None:
        new_target = phi(tc, params)
    else:
        new_target = tc + target_shift
    psi = cos + onehot * (new_target - tc)[:, None]
    return F.cross_entropy(scale[:, None] * psi, labels)


@pytest.mark.parametrize("name", ["cosface", "arcface", "sphereface"])
def test_cm_detach_norm(name):
    """detach_norm: the loss is unchanged and its gradients are those of a constant row scale.

    The x-gradient cannot be gradchecked (finite differences move the norm); the w-gradient can.
    """
    x, w, labels = cm_inputs(12)
    kw = dict(MARGIN_CONFIGS[name], s=4.0, norm_offset=0.5, norm_temperature=1.3)
    _gradcheck(lambda b: cm_margin_loss(x.detach(), b, labels, detach_norm=True, **kw), (w,))

    loss = cm_margin_loss(x, w, labels, detach_norm=True, **kw)
    torch.testing.assert_close(loss, cm_margin_loss(x, w, labels, **kw), rtol=1e-14, atol=0)
    gx, gw = torch.autograd.grad(loss, (x, w))

    params = resolve_margin(**MARGIN_CONFIGS[name])
    scale = 4.0 * torch.sigmoid((x.detach().norm(dim=1) - 0.5) / 1.3)
    ref = _constant_scale_loss(x, w, labels, scale, params)
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert rel_err(gx, rx) < 1e-12 and rel_err(gw, rw) < 1e-12
    # and the detached x-gradient really differs from the full one (the option does something)
    fx, = torch.autograd.grad(cm_margin_loss(x, w, labels, **kw), (x,))
    assert rel_err(gx, fx) > 1e-3


@pytest.mark.parametrize("name", ["arcface", "combined", "sphereface_lambda2"])
def test_cm_margin_grad_straight_through(name):
    """straight_through: same loss; gradient as if the margin were a constant shift of the target."""
    x, w, labels = cm_inputs(13)
    kw = dict(MARGIN_CONFIGS[name], s=4.0, contraction="none")
    st = cm_margin_loss(x, w, labels, margin_grad="straight_through", **kw)
    exact = cm_margin_loss(x, w, labels, margin_grad="exact", **kw)
    torch.testing.assert_close(st, exact, rtol=1e-14, atol=0)

    params = resolve_margin(**MARGIN_CONFIGS[name])
    tc = _target_cos(x, w, labels).detach()
    shift = phi(tc, params) - tc
    ref = _constant_scale_loss(x, w, labels, torch.full((x.shape[0],), 4.0, dtype=F64), params, shift)
    torch.testing.assert_close(ref, exact, rtol=1e-13, atol=0)
    gs = torch.autograd.grad(st, (x, w))
    gr = torch.autograd.grad(ref, (x, w))
    ge = torch.autograd.grad(exact, (x, w))
    assert rel_err(gs[0], gr[0]) < 1e-12 and rel_err(gs[1], gr[1]) < 1e-12
    assert rel_err(gs[0], ge[0]) > 1e-3  # the exact gradient is different


# ------------------------------------------------------------------------------------------------
# gradcheck of idid_loss
# ------------------------------------------------------------------------------------------------


def idid_inputs(seed, b=7, c=4, d=4):
    g = make_gen(seed)
    x = torch.randn(b, d, generator=g, dtype=F64, requires_grad=True)
    proxies = torch.randn(c, d, generator=g, dtype=F64, requires_grad=True)
    sim = torch.randn(c, c, generator=g, dtype=F64, requires_grad=True)
    # class 0: 3 rows, class 1: 2, class 2: 1, class 3: absent, one ignored row
    labels = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE])[:b]
    return x, proxies, sim, labels


@pytest.mark.parametrize("distillation,diversity,adaptive_weight,class_balanced",
                         list(itertools.product([True, False], repeat=4)))
def test_gradcheck_idid(distillation, diversity, adaptive_weight, class_balanced):
    x, proxies, sim, labels = idid_inputs(20)
    kw = dict(alpha=4.0, tau=1.5, t=2.0, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.7, class_balanced=class_balanced)
    if adaptive_weight and diversity:
        # lambda = stopgrad(L_IC / L_ID) makes the total non-differentiable by finite differences
        # by design: gradcheck the two terms, and check the total's gradient is their blend.
        def terms(a, b, c):
            out = idid_loss(a, b, c, labels, return_terms=True, **kw)
            return out.l_ic, out.l_id

        _gradcheck(terms, (x, proxies, sim))
        out = idid_loss(x, proxies, sim, labels, return_terms=True, **kw)
        g_loss = torch.autograd.grad(out.loss, (x, proxies, sim), retain_graph=True,
                                     allow_unused=True, materialize_grads=True)
        g_ic = torch.autograd.grad(out.l_ic, (x, proxies, sim), retain_graph=True,
                                   allow_unused=True, materialize_grads=True)
        g_id = torch.autograd.grad(out.l_id, (x,))
        assert out.lam > 0
        assert rel_err(g_loss[0], g_ic[0] + out.lam * g_id[0]) < 1e-12
        assert rel_err(g_loss[1], g_ic[1]) < 1e-12 and rel_err(g_loss[2], g_ic[2]) < 1e-12
    else:
        _gradcheck(lambda a, b, c: idid_loss(a, b, c, labels, **kw), (x, proxies, sim))


def test_idid_by_hand():
    """The IDID-R1 formulas of spec/idid.md, written out row by row in Python floats."""
    x, proxies, sim, labels = idid_inputs(21)
    alpha, tau, t = 4.0, 1.5, 2.0
    out = idid_loss(x, proxies, sim, labels, alpha=alpha, tau=tau, t=t, return_terms=True)
    u = F.normalize(x.detach(), dim=1).tolist()
    v = F.normalize(proxies.detach(), dim=1).tolist()
    th = sim.detach().tolist()
    c_num = len(v)
    rows = [i for i in range(len(labels)) if labels[i] != IGNORE]
    counts = {k: sum(1 for i in rows if labels[i] == k) for k in range(c_num)}
    present = sum(1 for k in counts if counts[k] > 0)
    dot = lambda p, q: sum(a * b for a, b in zip(p, q))  # noqa: E731
    l_ic = 0.0
    for i in rows:
        y = int(labels[i])
        z = [alpha * dot(u[i], v[c]) for c in range(c_num)]
        ce = math.log(sum(math.exp(zc) for zc in z)) - z[y]
        others = [c for c in range(c_num) if c != y]
        ph = [0.5 * (th[y][c] + th[c][y]) for c in others]
        r = [math.exp(p) / sum(math.exp(pp) for pp in ph) for p in ph]
        lse = math.log(sum(math.exp(z[c] / tau) for c in others))
        q = [math.exp(z[c] / tau - lse) for c in others]
        kd = sum(rc * (math.log(rc) - math.log(qc)) for rc, qc in zip(r, q))
        l_ic += (ce + kd) / (present * counts[y])
    dens = []
    for k in range(c_num):
        idx = [i for i in rows if labels[i] == k]
        if len(idx) >= 2:
            s = sum(math.exp(t * (dot(u[i], u[j]) - 1)) for i in idx for j in idx if i != j)
            dens.append(s / (len(idx) * (len(idx) - 1)))
    l_id = sum(dens) / len(dens)
    lam = l_ic / (l_id + 1e-8)
    assert out.l_ic.item() == pytest.approx(l_ic, rel=1e-12)
    assert out.l_id.item() == pytest.approx(l_id, rel=1e-12)
    assert out.lam.item() == pytest.approx(lam, rel=1e-12)
    assert out.loss.item() == pytest.approx(l_ic + lam * l_id, rel=1e-12)
    assert not out.lam.requires_grad


# ------------------------------------------------------------------------------------------------
# cm_margin_loss against hand-written heads and F.cross_entropy
# ------------------------------------------------------------------------------------------------


def test_authors_cosface_head():
    """The authors' head: logits = s * sigmoid(||x||) * (cos - m onehot), then cross entropy."""
    g = make_gen(30)
    x = torch.randn(8, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(6, 5, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 6, (8,), generator=g)
    s, m = 30.0, 0.4

    loss = cm_margin_loss(x, w, labels, s=s, margin="cosface", m=m, contraction="sigmoid")
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    logits = s * torch.sigmoid(x.norm(dim=1))[:, None] * (cos - m * F.one_hot(labels, 6).to(F64))
    ref = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    # the defaults are that head too
    torch.testing.assert_close(cm_margin_loss(x, w, labels), ref, rtol=1e-13, atol=0)

    g1 = torch.autograd.grad(loss, (x, w))
    g2 = torch.autograd.grad(ref, (x, w))
    assert rel_err(g1[0], g2[0]) < 1e-12 and rel_err(g1[1], g2[1]) < 1e-12


def test_margin_none_contraction_none_is_normface_ce():
    g = make_gen(31)
    x = torch.randn(7, 4, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 5, (7,), generator=g)
    s = 4.5
    loss = cm_margin_loss(x, w, labels, s=s, margin="none", contraction="none")
    ref = F.cross_entropy(s * (F.normalize(x, dim=1) @ F.normalize(w, dim=1).T), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
    g1 = torch.autograd.grad(loss, (x, w))
    g2 = torch.autograd.grad(ref, (x, w))
    assert rel_err(g1[0], g2[0]) < 1e-12 and rel_err(g1[1], g2[1]) < 1e-12


def _ignore_pattern(labels, pattern):
    labels = labels.clone()
    if pattern == "some":
        labels[[1, 4]] = IGNORE
    elif pattern == "all":
        labels[:] = IGNORE
    return labels


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cm_reduction_matches_cross_entropy(reduction, ignore, use_weight):
    g = make_gen(32)
    x = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True)
    labels = _ignore_pattern(torch.tensor([0, 3, 1, 3, 4, 2]), ignore)
    cw = torch.tensor([0.3, 1.0, 2.5, 0.7, 1.9], dtype=F64) if use_weight else None
    kw = dict(s=3.0, margin="arcface", m=0.4)

    loss = cm_margin_loss(x, w, labels, class_weight=cw, ignore_index=IGNORE, reduction=reduction, **kw)
    z = cm_logits(x, w, labels, resolve_margin("arcface", 0.4), s=3.0, ignore_index=IGNORE)
    ref = F.cross_entropy(z, labels, weight=cw, ignore_index=IGNORE, reduction=reduction)
    assert loss.shape == ref.shape == ((6,) if reduction == "none" else ())

    upstream = torch.randn(loss.shape, generator=g, dtype=F64) if reduction == "none" else None
    gl = torch.autograd.grad(loss, (x, w), grad_outputs=upstream)
    gr = torch.autograd.grad(ref, (x, w), grad_outputs=upstream)

    if ignore == "all" and reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(ref)
        for grad in (*gl, *gr):
            assert torch.equal(grad, torch.zeros_like(grad))
        return
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-15)
    if ignore == "all":
        assert torch.equal(loss, torch.zeros_like(loss))
        for grad in gl:
            assert torch.equal(grad, torch.zeros_like(grad))
        return
    if reduction == "none":
        ignored = labels == IGNORE
        assert (loss[ignored] == 0).all() and (loss[~ignored] > 0).all()
    assert rel_err(gl[0], gr[0]) < 1e-12 and rel_err(gl[1], gr[1]) < 1e-12


def test_cm_logits_ignored_rows_get_no_margin():
    x, w, labels = cm_inputs(34, n_ignore=2)
    kw = dict(s=3.0, contraction="sigmoid", ignore_index=IGNORE)
    z = cm_logits(x, w, labels, resolve_margin("arcface", 0.5), **kw)
    plain = cm_logits(x, w, labels, resolve_margin("none"), **kw)
    ignored = labels == IGNORE
    torch.testing.assert_close(z[ignored], plain[ignored], rtol=0, atol=0)
    assert (z[~ignored] != plain[~ignored]).any(dim=1).all()  # valid rows do get the margin


def test_cm_mean_is_weighted_mean_over_valid_rows():
    """Spelled out: mean = sum_n w_{y_n} loss_n / sum_n w_{y_n} over non-ignored rows."""
    g = make_gen(33)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    w = torch.randn(5, 4, generator=g, dtype=F64)
    labels = torch.tensor([0, IGNORE, 1, 3, IGNORE, 2])
    cw = torch.tensor([0.3, 1.0, 2.5, 0.7, 1.9], dtype=F64)
    per_row = cm_margin_loss(x, w, labels, s=3.0, reduction="none")  # unweighted
    valid = labels != IGNORE
    wy = cw[labels[valid]]
    expected = (wy * per_row[valid]).sum() / wy.sum()
    got = cm_margin_loss(x, w, labels, s=3.0, class_weight=cw, reduction="mean")
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------------
# margins by hand
# ------------------------------------------------------------------------------------------------


def test_arcface_phi_by_hand():
    m = 0.5
    p = resolve_margin("arcface", m)
    c = torch.tensor([0.95, 0.5, 0.1, -0.2, -0.8, -0.85, -0.9, -0.99, -1.0], dtype=F64)
    theta = torch.acos(c.clamp(-1 + 1e-7, 1 - 1e-7))
    main = torch.cos(theta + m)
    fallback = c - m * math.sin(m)
    expected = torch.where(theta + m > math.pi, fallback, main)
    # the last three entries are on the fallback branch (c < cos(pi - m) = -0.8776)
    assert (theta + m > math.pi).tolist() == [False] * 6 + [True] * 3
    torch.testing.assert_close(phi(c, p), expected, rtol=1e-14, atol=1e-15)
    assert phi(c, p)[1].item() == pytest.approx(math.cos(math.acos(0.5) + m), rel=1e-14)
    assert phi(c, p)[-1].item() == pytest.approx(-1 - m * math.sin(m), rel=1e-14)

    easy = resolve_margin("arcface", m, easy_margin=True)
    pe = phi(c, easy)
    nonpos = c <= 0
    torch.testing.assert_close(pe[nonpos], c[nonpos], rtol=0, atol=0)
    torch.testing.assert_close(pe[~nonpos], main[~nonpos], rtol=1e-14, atol=1e-15)


def test_arcface_fallback_through_the_loss():
    """x_0 = -w_0 direction (c = -1, theta + m > pi) takes the fallback c - m sin m in the logits;
    x_1 at 1 rad from w_1 takes cos(theta + m); x_2 at 2.8 rad from w_2 falls back too."""
    m, s = 0.5, 3.0
    w = torch.eye(3, dtype=F64) * torch.tensor([[2.0], [0.5], [1.0]], dtype=F64)
    e = torch.eye(3, dtype=F64)
    x = torch.stack([
        -1.7 * e[0],
        math.cos(1.0) * e[1] + math.sin(1.0) * e[2],
        1.3 * (math.cos(2.8) * e[2] + math.sin(2.8) * e[0]),
    ])
    labels = torch.tensor([0, 1, 2])
    z = cm_logits(x, w, labels, resolve_margin("arcface", m), s=s, contraction="none")
    expected_target = torch.tensor([-1 - m * math.sin(m), math.cos(1.0 + m),
                                    math.cos(2.8) - m * math.sin(m)], dtype=F64)
    torch.testing.assert_close(z[torch.arange(3), labels], s * expected_target, rtol=1e-12, atol=1e-12)
    # off-target logits are s * cos, untouched
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    off = ~F.one_hot(labels, 3).to(torch.bool)
    torch.testing.assert_close(z[off], s * cos[off], rtol=0, atol=1e-15)
    loss = cm_margin_loss(x, w, labels, s=s, margin="arcface", m=m, contraction="none", reduction="none")
    torch.testing.assert_close(loss, F.cross_entropy(z, labels, reduction="none"), rtol=1e-14, atol=0)


def test_combined_phi_by_hand():
    m1, m2, m3 = 1.2, 0.3, 0.1
    p = resolve_margin("combined", m1=m1, m2=m2, m3=m3)
    assert p.kind == "angular"
    c = torch.tensor([0.9, 0.3, -0.4, -0.7, -0.75, -0.95], dtype=F64)
    theta = torch.acos(c)
    angle = m1 * theta + m2
    expected = torch.where(angle > math.pi, c - m3 - m2 * math.sin(m2), torch.cos(angle) - m3)
    assert (angle > math.pi).tolist() == [False, False, False, False, True, True]
    torch.testing.assert_close(phi(c, p), expected, rtol=1e-13, atol=1e-14)


# (theta, k = floor(4 theta / pi)) across every k boundary of m = 4
SPHERE_THETAS = [(0.3, 0), (math.pi / 4 - 1e-3, 0), (math.pi / 4 + 1e-3, 1), (1.0, 1), (1.7, 2),
                 (3 * math.pi / 4 - 1e-3, 2), (3 * math.pi / 4 + 1e-3, 3), (2.5, 3), (3.0, 3)]


@pytest.mark.parametrize("lam", [0.0, 2.0])
def test_sphereface_psi_by_hand(lam):
    p = resolve_margin("sphereface", 4, sphere_lambda=lam)
    thetas = torch.tensor([th for th, _ in SPHERE_THETAS], dtype=F64)
    c = torch.cos(thetas)
    psi = torch.tensor([(-1) ** k * math.cos(4 * th) - 2 * k for th, k in SPHERE_THETAS], dtype=F64)
    expected = (lam * c + psi) / (1 + lam)
    got = phi(c, p)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # psi is continuous and decreasing in theta across the k boundaries
    assert (got[1:] < got[:-1]).all()
    for a, b in ((1, 2), (5, 6)):
        assert abs(got[a].item() - got[b].item()) < 0.02


# ------------------------------------------------------------------------------------------------
# degenerate inputs: c = +-1 exactly, zero rows
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contraction", ["sigmoid", "none"])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
@pytest.mark.parametrize("name", list(MARGIN_CONFIGS))
def test_cm_degenerate_rows_finite(name, margin_grad, contraction):
    g = make_gen(40)
    w = torch.randn(4, 3, generator=g, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 1])
    x = torch.randn(5, 3, generator=g, dtype=F64)
    x[0] = 2.0 * w[0]    # parallel: c = +1
    x[1] = -0.5 * w[1]   # antiparallel: c = -1
    x[2] = 0.0           # zero row
    x[3] = w[3]          # parallel, same norm
    x.requires_grad_()
    w.requires_grad_()
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    assert abs(cos[0, 0].item() - 1) < 1e-15 and abs(cos[1, 1].item() + 1) < 1e-15
    kw = dict(MARGIN_CONFIGS[name], s=30.0, contraction=contraction, margin_grad=margin_grad)
    for reduction in ("mean", "none"):
        loss = cm_margin_loss(x, w, labels, reduction=reduction, **kw)
        assert torch.isfinite(loss).all()
        gx, gw = torch.autograd.grad(loss.sum(), (x, w))
        assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_zero_row_cosines_and_contraction():
    x = torch.zeros(2, 3, dtype=F64)
    x[1, 0] = 1.0
    w = torch.randn(4, 3, generator=make_gen(41), dtype=F64)
    cos = pairwise_cosine(x, w)
    assert torch.equal(cos[0], torch.zeros(4, dtype=F64))
    assert norm_contraction(x)[0].item() == 0.5
    labels = torch.tensor([2, 1])
    z = cm_logits(x, w, labels, resolve_margin("cosface"), s=10.0)
    # zero row: scale s/2, cosines 0, target 0 - m
    torch.testing.assert_close(z[0], torch.tensor([0.0, 0.0, -0.4 * 5.0, 0.0], dtype=F64),
                               rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# resolve_margin
# ------------------------------------------------------------------------------------------------


def test_resolve_margin_defaults():
    assert resolve_margin("cosface") == MarginParams("cosface", "cosface", m3=0.4)
    assert resolve_margin("arcface") == MarginParams("arcface", "angular", m2=0.5)
    sp = resolve_margin("sphereface")
    assert (sp.kind, sp.m1, sp.sphere_lambda) == ("sphere", 4.0, 0.0)
    assert resolve_margin("none").kind == "none"
    assert resolve_margin("cosface", 0.25).m3 == 0.25
    assert resolve_margin("arcface", 0.3, easy_margin=True) == MarginParams(
        "arcface", "angular", m2=0.3, easy_margin=True)
    comb = resolve_margin("combined", m1=1.2, m2=0.3, m3=0.1)
    assert (comb.kind, comb.m1, comb.m2, comb.m3) == ("angular", 1.2, 0.3, 0.1)
    assert resolve_margin("sphereface", 3, sphere_lambda=2.0).m1 == 3.0


def test_default_margins_reach_the_loss():
    x, w, labels = cm_inputs(42)
    for margin, m in (("cosface", 0.4), ("arcface", 0.5), ("sphereface", 4)):
        torch.testing.assert_close(cm_margin_loss(x, w, labels, margin=margin, s=3.0),
                                   cm_margin_loss(x, w, labels, margin=margin, m=m, s=3.0),
                                   rtol=0, atol=0)
    assert not torch.allclose(cm_margin_loss(x, w, labels, margin="cosface", s=3.0),
                              cm_margin_loss(x, w, labels, margin="cosface", m=0.3, s=3.0))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(margin="cosine"), r"margin"),
    (dict(margin="combined", m=0.3), r"\bm=0\.3"),
    (dict(margin="none", m=0.3), r"\bm=0\.3"),
    (dict(margin="cosface", m1=2.0), r"m1"),
    (dict(margin="arcface", m2=0.3), r"m2"),
    (dict(margin="sphereface", m3=0.1), r"m3"),
    (dict(margin="none", m3=0.1), r"m3"),
    (dict(margin="cosface", easy_margin=True), r"easy_margin"),
    (dict(margin="sphereface", easy_margin=True), r"easy_margin"),
    (dict(margin="sphereface", m=4.5), r"\bm\b.*4\.5"),
    (dict(margin="sphereface", m=0), r"\bm\b"),
])
def test_resolve_margin_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_margin(**kwargs)
    # and the loss surfaces the same error before computing anything
    x, w, labels = cm_inputs(43)
    with pytest.raises(ValueError, match=pattern):
        cm_margin_loss(x, w, labels, **kwargs)
