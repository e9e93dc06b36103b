"""AdaFaceLoss, MagFaceLoss and LDAMLoss: one contract over every backend.

Each head is checked against its official formula, written out below in plain PyTorch the way the
authors' code computes it (mk-minchul/AdaFace head.py, IrvingMeng/MagFace MagLinear + MagLoss,
kaidic/LDAM-DRW LDAMLoss over NormedLinear): float64 to 1e-10 with the gradients to x and to the
class weights, float32 within tolerance, float64 gradcheck, the running statistics of AdaFace, the
margins of LDAM, reductions and ignore_index, construction errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import idid_kernels as ik
from conftest import backend_device, backend_params, make_gen, rel_err, sized

ALL = backend_params("cm_margin_loss")
HEADS = ("adaface", "magface", "magface_hard", "ldam")


# ---- the official formulas -------------------------------------------------------------------------

def adaface_official(x, kernel, label, batch_mean, batch_std, *, m=0.4, h=0.333, s=64.0, t_alpha=0.01,
                     training=True):
    """mk-minchul/AdaFace ``AdaFace.forward`` then cross-entropy; ``kernel`` is (C, d) here (the
    official one is (d, C)). Returns (loss, new batch_mean, new batch_std)."""
    eps = 1e-3
    norms = torch.norm(x, 2, 1, True)
    embeddings = x / norms
    kernel_norm = kernel.t() / torch.norm(kernel.t(), 2, 0, True)
    cosine = torch.mm(embeddings, kernel_norm).clamp(-1 + eps, 1 - eps)
    safe_norms = torch.clip(norms, min=0.001, max=100).clone().detach()
    if training:
        with torch.no_grad():
            mean, std = safe_norms.mean().detach(), safe_norms.std().detach()
            batch_mean = mean * t_alpha + (1 - t_alpha) * batch_mean
            batch_std = std * t_alpha + (1 - t_alpha) * batch_std
    margin_scaler = (safe_norms - batch_mean) / (batch_std + eps)
    margin_scaler = torch.clip(margin_scaler * h, -1, 1)
    m_arc = torch.zeros(label.size()[0], cosine.size()[1], dtype=x.dtype)
    m_arc.scatter_(1, label.reshape(-1, 1), 1.0)
    m_arc = m_arc * (m * margin_scaler * -1)
    theta = cosine.acos()
    theta_m = torch.clip(theta + m_arc, min=eps, max=math.pi - eps)
    cosine = theta_m.cos()
    m_cos = torch.zeros(label.size()[0], cosine.size()[1], dtype=x.dtype)
    m_cos.scatter_(1, label.reshape(-1, 1), 1.0)
    m_cos = m_cos * (m + (m * margin_scaler))
    cosine = cosine - m_cos
    return F.cross_entropy(cosine * s, label), batch_mean, batch_std


def magface_official(x, weight, target, *, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0, s=64.0,
                     easy_margin=True, detach_margin=False):
    """IrvingMeng/MagFace ``MagLinear.forward`` + ``MagLoss.forward``: loss_id + lambda_g * loss_g.
    (``detach_margin``: not in the official code; a negative control for the margin's gradient.)"""
    x_norm = torch.norm(x, dim=1, keepdim=True).clamp(l_a, u_a)
    ada_margin = (u_m - l_m) / (u_a - l_a) * (x_norm - l_a) + l_m
    if detach_margin:
        ada_margin = ada_margin.detach()
    cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
    cos_theta = torch.mm(F.normalize(x), F.normalize(weight, dim=1).t()).clamp(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
    cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
    if easy_margin:
        cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)
    else:
        mm = torch.sin(math.pi - ada_margin) * ada_margin
        threshold = torch.cos(math.pi - ada_margin)
        cos_theta_m = torch.where(cos_theta > threshold, cos_theta_m, cos_theta - mm)
    cos_theta, cos_theta_m = s * cos_theta, s * cos_theta_m
    loss_g = torch.mean(1 / (u_a ** 2) * x_norm + 1 / x_norm)
    one_hot = torch.zeros_like(cos_theta)
    one_hot.scatter_(1, target.view(-1, 1), 1.0)
    output = one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta
    return F.cross_entropy(output, target) + lambda_g * loss_g


def ldam_official(x, weight, target, cls_num_list, *, max_m=0.5, s=30.0, class_weight=None):
    """kaidic/LDAM-DRW ``LDAMLoss.forward`` over ``NormedLinear`` (weight (C, d) here, (d, C) there)."""
    m_list = 1.0 / np.sqrt(np.sqrt(cls_num_list))
    m_list = torch.tensor(m_list * (max_m / np.max(m_list)), dtype=x.dtype)
    cos = F.normalize(x, dim=1).mm(F.normalize(weight.t(), dim=0))
    index = torch.zeros_like(cos, dtype=torch.uint8)
    index.scatter_(1, target.data.view(-1, 1), 1)
    index_float = index.type(x.dtype)
    batch_m = torch.matmul(m_list[None, :], index_float.transpose(0, 1)).view((-1, 1))
    output = torch.where(index.bool(), cos - batch_m, cos)
    return F.cross_entropy(s * output, target, weight=class_weight)


# ---- inputs ----------------------------------------------------------------------------------------

COUNTS = [40, 25, 12, 9, 5, 3, 2]


def make(head, n, c, d, seed):
    """x with a spread of norms (both sides of each head's clip range) and some rows close to their
    class (AdaFace's clipped angle); weight (C, d); labels."""
    g = make_gen(seed)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    close = torch.arange(n) % 3 == 0
    x[close] = F.normalize(w[y[close]], dim=1) + 0.05 * x[close]
    lo, hi = {"adaface": (2.0, 60.0), "magface": (4.0, 130.0), "magface_hard": (4.0, 130.0), "ldam": (0.5, 5.0)}[head]
    norms = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1) * norms[:, None], w, y


def build(head, c, d, backend, **kw):
    if head == "adaface":
        return ik.AdaFaceLoss(d, c, backend=backend, **kw)
    if head.startswith("magface"):
        return ik.MagFaceLoss(d, c, easy_margin=head == "magface", backend=backend, **kw)
    return ik.LDAMLoss(d, c, COUNTS[:c], backend=backend, **kw)


def official(head, x, w, y, module):
    if head == "adaface":
        return adaface_official(x, w, y, module.batch_mean.double(), module.batch_std.double(), m=module.m,
                                h=module.h, s=module.s, t_alpha=module.t_alpha, training=module.training)[0]
    if head.startswith("magface"):
        return magface_official(x, w, y, easy_margin=module.easy_margin)
    cw = None if module.class_weight is None else module.class_weight.double()
    return ldam_official(x, w, y, COUNTS[:w.shape[0]], max_m=module.max_m, s=module.s, class_weight=cw)


def loss_and_grads(fn, x, w):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w)
    # per-row losses ("none") take a fixed random upstream gradient
    up = torch.randn(loss.shape, generator=make_gen(3), dtype=torch.float64).to(loss) if loss.dim() else None
    dx, dw = torch.autograd.grad(loss, (x, w), up)
    return loss.detach(), dx, dw


def ours(module, x, w, y, backend):
    dev = backend_device(backend)

    def fn(x, w):
        with torch.no_grad():
            module.weight.copy_(w)
        out = torch.func.functional_call(module, {"weight": w.to(dev)}, (x.to(dev), y.to(dev)))
        return out

    loss, dx, dw = loss_and_grads(fn, x, w)
    return loss.cpu(), dx.cpu(), dw.cpu()


# ---- float64 against the official formulas ---------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", ALL)
def test_float64_matches_official(backend, head, training):
    n, c, d = sized(backend, (18, 7, 6), (96, 7, 32))
    x, w, y = make(head, n, c, d, seed=HEADS.index(head) + 10 * training)
    module = build(head, c, d, backend).double().to(backend_device(backend)).train(training)
    if head == "ldam":
        module.set_class_weight(torch.linspace(0.5, 2.0, c))
        module.double()
    if head == "adaface":
        # a narrow spread saturates the scaler at +-1 for some rows, so that rows close to their
        # class take the clipped angle (asserted below)
        module.batch_std.fill_(5.0)
        g_angle, _ = module.margins(x.to(module.batch_std.device))
        theta = torch.acos(F.cosine_similarity(x, w[y], dim=1).clamp(-1 + 1e-3, 1 - 1e-3))
        assert int((theta + g_angle.cpu() < 1e-3).sum()) >= 1
    state = {k: v.detach().cpu().clone() for k, v in module.named_buffers()}
    reference_module = build(head, c, d, "reference").double().train(training)
    if head == "ldam":
        reference_module.set_class_weight(state["class_weight"])
    reference_module.load_state_dict({**state, "weight": w})
    truth = loss_and_grads(lambda x, w: official(head, x, w, y, reference_module), x, w)
    got = ours(module, x, w, y, backend)
    for a, b in zip(got, truth):
        assert a.dtype == torch.float64
        assert rel_err(a, b) <= 1e-10, (head, rel_err(a, b))
    if head == "adaface":  # the statistics moved exactly as the official EMA (train) or not at all (eval)
        _, mean, std = adaface_official(x, w, y, state["batch_mean"], state["batch_std"], training=training)
        assert rel_err(module.batch_mean.cpu(), mean.reshape(1)) <= 1e-12
        assert rel_err(module.batch_std.cpu(), std.reshape(1)) <= 1e-12


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", ALL)
def test_float32_within_tolerance(backend, head):
    n, c, d = sized(backend, (18, 7, 6), (256, 7, 64))
    x, w, y = make(head, n, c, d, seed=50 + HEADS.index(head))
    module = build(head, c, d, backend).to(backend_device(backend)).eval()
    reference_module = build(head, c, d, "reference").double().eval()
    truth = loss_and_grads(lambda x, w: official(head, x, w, y, reference_module), x, w)
    got = ours(module, x.float(), w.float(), y, backend)
    assert all(t.dtype == torch.float32 for t in got)
    assert rel_err(got[0], truth[0]) <= 1e-5
    assert rel_err(got[1], truth[1]) <= 1e-4 and rel_err(got[2], truth[2]) <= 1e-4


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", ALL)
def test_gradcheck_float64(backend, head):
    c, d = 4, 3
    x, w, y = make(head, 6, c, d, seed=70 + HEADS.index(head))
    dev = backend_device(backend)
    kw = dict(s=4.0) if head != "ldam" else dict(s=4.0, max_m=0.3)
    module = build(head, c, d, backend, **kw).double().to(dev).eval()
    if head == "adaface":
        # AdaFace's margins read the detached norm (the official design), which finite differences
        # would see: statistics that saturate the scaler at 1 make the margins constant here.
        module.batch_mean.fill_(0.0)
        module.batch_std.fill_(0.01)

    def f(x, w):
        return torch.func.functional_call(module, {"weight": w}, (x, y.to(dev)))

    inputs = [t.detach().to(dev).requires_grad_() for t in (x, w)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ---- reductions, ignore_index, statistics, margins --------------------------------------------------

@pytest.mark.parametrize("class_weight", [False, True], ids=["unweighted", "class_weight"])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", ALL)
def test_reductions_ignore_index_and_class_weight(backend, head, class_weight):
    """Every reduction and class weights against the reference backend (the official formula with
    F.cross_entropy's weight / ignore_index / reduction semantics), dx and dW included."""
    n, c, d = 12, 5, 4
    x, w, y = make(head, n, c, d, seed=90)
    y[:2] = -100
    dev = backend_device(backend)
    cw = torch.linspace(0.5, 2.0, c) if class_weight else None
    for red in ("mean", "sum", "none"):
        got, truth = [], []
        for b, d_, out in ((backend, dev, got), ("reference", torch.device("cpu"), truth)):
            module = build(head, c, d, b, reduction=red, class_weight=cw).double().to(d_).eval()
            out.extend(ours(module, x, w, y, b))
        if red == "none":
            assert got[0].shape == (n,) and torch.all(got[0][:2] == 0)
        for a, b in zip(got, truth):
            assert rel_err(a, b) <= 1e-10, (red, rel_err(a, b))
    if head == "ldam" and not class_weight:  # the mean is over the 10 rows that count
        module = build(head, c, d, "reference", reduction="none").double().eval()
        rows = ours(module, x, w, y, "reference")[0]
        module = build(head, c, d, "reference").double().eval()
        assert rel_err(ours(module, x, w, y, "reference")[0], rows.sum() / (n - 2)) <= 1e-12


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("backend", ALL)
def test_compile_fullgraph(backend, head):
    c, d = 5, 4
    x, w, y = make(head, 10, c, d, seed=95)
    dev = backend_device(backend)
    module = build(head, c, d, backend).double().to(dev).eval()
    x, y = x.to(dev).requires_grad_(), y.to(dev)
    eager = module(x, y)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, y)
    assert rel_err(compiled, eager) <= 1e-12
    assert rel_err(torch.autograd.grad(compiled, x)[0], torch.autograd.grad(eager, x)[0]) <= 1e-12


def test_adaface_statistics_follow_the_official_ema_over_steps():
    c, d = 5, 8
    head = ik.AdaFaceLoss(d, c, backend="reference").double()
    mean, std = torch.tensor([20.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64)
    for step in range(4):
        x, w, y = make("adaface", 16, c, d, seed=100 + step)
        head(x, y)
        _, mean, std = adaface_official(x, w, y, mean, std)
    assert rel_err(head.batch_mean, mean.reshape(1)) <= 1e-12 and rel_err(head.batch_std, std.reshape(1)) <= 1e-12
    before = head.batch_mean.clone()
    head(x[:1], y[:1])  # one row: no std, no update
    head.eval()(x, y)   # eval: no update
    assert torch.equal(head.batch_mean, before)


def test_adaface_margins_span_the_scaler_range():
    head = ik.AdaFaceLoss(4, 3).double()
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[:, 0] = torch.tensor([1e-6, 20.0, 1e4])  # clipped low, at the mean, clipped high
    g_angle, g_add = head.margins(x)
    scaler = torch.clip(0.333 * (torch.tensor([0.001, 20.0, 100.0]) - 20.0) / (100.0 + 1e-3), -1, 1).double()
    assert torch.allclose(g_angle, -0.4 * scaler) and torch.allclose(g_add, 0.4 + 0.4 * scaler)


def test_ldam_margins():
    head = ik.LDAMLoss(3, 4, [100, 10, 1, 1000], max_m=0.5)
    expected = torch.tensor([100, 10, 1, 1000], dtype=torch.float64) ** -0.25
    expected = expected * 0.5 / expected.max()
    assert rel_err(head.class_margin(torch.float64), expected) <= 1e-15
    assert float(head.class_margin().max()) == pytest.approx(0.5)


def test_init_unit_rows_and_logits():
    for head in (ik.AdaFaceLoss(6, 9), ik.MagFaceLoss(6, 9), ik.LDAMLoss(6, 9, [1] * 9)):
        norms = torch.linalg.vector_norm(head.weight, dim=1)
        assert torch.allclose(norms, torch.ones(9), atol=1e-6)
        x = torch.randn(5, 6)
        assert torch.allclose(head.logits(x), head.s * F.normalize(x) @ F.normalize(head.weight).t(), atol=1e-5)
        assert torch.allclose(head.feature_norm(x), x.norm(dim=1))


def test_magface_margin_gradient_reaches_the_norm():
    """Without the margin's gradient through a_n, dx would differ: check against the official
    formula with the margin detached, which must disagree."""
    c, d = 5, 6
    x, w, y = make("magface", 10, c, d, seed=120)
    module = ik.MagFaceLoss(d, c, backend="cpp" if "cpp" in ik.available_backends() else "reference").double()
    got = ours(module, x, w, y, module.backend)
    truth = loss_and_grads(lambda x, w: magface_official(x, w, y), x, w)
    assert rel_err(got[1], truth[1]) <= 1e-10

    detached = loss_and_grads(lambda x, w: magface_official(x, w, y, detach_margin=True), x, w)
    assert rel_err(detached[1], truth[1]) > 1e-3


@pytest.mark.parametrize("bad", [
    lambda: ik.AdaFaceLoss(4, 3, t_alpha=2.0),
    lambda: ik.AdaFaceLoss(4, 1),
    lambda: ik.MagFaceLoss(4, 3, l_a=20.0, u_a=10.0),
    lambda: ik.MagFaceLoss(4, 3, s=-1.0),
    lambda: ik.LDAMLoss(4, 3, [1, 2]),
    lambda: ik.LDAMLoss(4, 3, [1, 0, 2]),
    lambda: ik.LDAMLoss(4, 3, [1, 1, 1], reduction="avg"),
    lambda: ik.AdaFaceLoss(4, 3, backend="gpu"),
])
def test_bad_construction(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_bad_input():
    head = ik.AdaFaceLoss(4, 3)
    with pytest.raises(ValueError):
        head(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError):
        head(torch.randn(5, 4), torch.full((5,), 7))


@pytest.mark.parametrize("backend", ALL)
def test_functional_forms_equal_the_modules(backend):
    c, d = 6, 5
    dev = backend_device(backend)
    x, w, y = make("adaface", 14, c, d, seed=130)
    x, w, y = x.to(dev), w.to(dev), y.to(dev)
    ada = ik.AdaFaceLoss(d, c, backend=backend).double().to(dev).eval()
    mag = ik.MagFaceLoss(d, c, backend=backend).double().to(dev)
    ldam = ik.LDAMLoss(d, c, COUNTS[:c], backend=backend).double().to(dev)
    for head in (ada, mag, ldam):
        with torch.no_grad():
            head.weight.copy_(w)
    # (the modules' weights need a gradient: cpp and cuda then take the fused op, equal to rounding)
    assert rel_err(ada(x, y), ik.adaface_loss(x, w, y, batch_mean=20.0, batch_std=100.0, backend=backend)) <= 1e-14
    assert rel_err(mag(x, y), ik.magface_loss(x, w, y, backend=backend)) <= 1e-14
    margins = ldam.class_margin(torch.float64)
    assert rel_err(ldam(x, y), ik.ldam_loss(x, w, y, margins, backend=backend)) <= 1e-14


def test_functional_bad_input():
    x, w, y = make("adaface", 6, 4, 3, seed=140)
    with pytest.raises(ValueError, match="batch_mean"):
        ik.adaface_loss(x, w, y, batch_mean=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_std"):
        ik.adaface_loss(x, w, y, batch_std=float("nan"))
    with pytest.raises(ValueError, match="class_margin"):
        ik.ldam_loss(x, w, y, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="u_a"):
        ik.magface_loss(x, w, y, l_a=5.0, u_a=5.0)
    with pytest.raises(ValueError, match="reduction"):
        ik.magface_loss(x, w, y, reduction="avg")
