"""Labels out of range on the triton backend of idid_loss, class_density and cm_margin_loss.

functional.py rejects them before any launch, but that check reads the labels on the host and is
skipped under torch.compile, during CUDA-graph capture and with IDID_KERNELS_CHECK_LABELS=0 (used
here). The documented semantics (idid_kernels/triton/_idid_common.py, "Labels out of range"): the
label is never used as an index (it sorts last with the key C + 1); idid_loss returns NaN for the
loss and every term, class_density NaN for every class, and every gradient element is NaN, whatever
the upstream gradient. cm_margin_loss works per row: the row's loss is NaN and the row gives no
gradient (as the cuda backend). The reference and cpp backends raise instead (asserted below); the
cuda backend drops the rows of idid_loss too, with a NaN loss (test_cuda_idid.py).
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen
from idid_kernels import _backends

pytest.importorskip("idid_kernels.triton.idid_loss", reason="triton is not installed")
from idid_kernels.triton._idid_common import bucket_rows  # noqa: E402

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
IGNORE = -100
C = 5
BASE = [0, 1, 0, 2, 1, 0, IGNORE, 3, 0, 1, 4, 2, 2, 0, 1, 3, 0, 1, 0]  # 19 rows: 3 dW row splits when interpreted
BAD = [-5, -1, C, C + 7]


@pytest.fixture(autouse=True)
def _no_label_check(monkeypatch):
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")


def _tensors(seed, b, c, d=6):
    g = make_gen(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, torch.float32).requires_grad_(True)
            for shape in ((b, d), (c, d), (c, c))]


def _labels(bad, at=4, base=BASE):
    y = torch.tensor(base)
    y[at] = bad
    return y.to(DEV)


def _idid(tensors, labels, upstream=1.0, **kw):
    terms = ik.idid_loss(*tensors, labels, return_terms=True, backend="triton", **kw)
    used = [t for t in tensors if kw.get("distillation", True) or t is not tensors[2]]
    grads = torch.autograd.grad(upstream * terms.loss, used)
    return terms, grads


def _all_nan(t):
    return bool(torch.isnan(t).all())


# ------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bad", BAD)
def test_layout_never_puts_an_out_of_range_label_in_a_class(bad):
    # What keeps the kernels in bounds: every position they index through (those before
    # offsets[C]) holds a key in [0, C); ignored rows follow with the key C, bad ones last with C + 1.
    labels = _labels(bad)
    layout, offsets = bucket_rows(labels, C, IGNORE)
    perm, keys = layout.cpu()
    taking_part = int(offsets[C])
    assert taking_part == len(BASE) - 2
    assert bool(((keys[:taking_part] >= 0) & (keys[:taking_part] < C)).all())
    assert keys[taking_part:].tolist() == [C, C + 1]
    assert perm[-1] == 4 and perm[-2] == BASE.index(IGNORE)
    assert sorted(perm.tolist()) == list(range(len(BASE)))


def test_layout_without_bad_labels_is_unchanged():
    labels = torch.tensor(BASE, device=DEV)
    layout, offsets = bucket_rows(labels, C, IGNORE)
    assert int(layout[1, -1]) == C  # the ignored row: no C + 1 anywhere
    counts = [BASE.count(k) for k in range(C)]
    assert offsets.cpu().tolist() == [sum(counts[:k]) for k in range(C + 1)]


# ---------------------------------------------------------------------------------- idid_loss
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("c", [2, C])
def test_idid_loss_out_of_range_label_gives_nan_terms_and_gradients(bad, c):
    base = [v % c if v != IGNORE else v for v in BASE]
    labels = _labels(c if bad == C else (c + 7 if bad == C + 7 else bad), base=base)
    tensors = _tensors(1, len(base), c)
    terms, grads = _idid(tensors, labels)
    assert all(_all_nan(v) for v in terms), terms
    assert all(_all_nan(g) for g in grads)
    # control: the same batch with that row ignored instead is finite
    ok = labels.clone()
    ok[4] = IGNORE
    terms, grads = _idid(_tensors(1, len(base), c), ok)
    assert all(torch.isfinite(v) for v in terms) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("switches", [dict(distillation=False), dict(diversity=False), dict(adaptive_weight=False),
                                      dict(class_balanced=False)], ids=lambda kw: next(iter(kw)))
@pytest.mark.parametrize("bad", [-1, C])
def test_idid_loss_out_of_range_label_every_switch(bad, switches):
    terms, grads = _idid(_tensors(2, len(BASE), C), _labels(bad), **switches)
    assert all(_all_nan(v) for v in terms)
    assert all(_all_nan(g) for g in grads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_idid_loss_out_of_range_label_nan_gradients_whatever_the_upstream(deterministic):
    # a zero upstream gradient, and both dW reductions (atomic and per-split buffers)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        terms, grads = _idid(_tensors(3, len(BASE), C), _labels(-5), upstream=0.0)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert _all_nan(terms.loss)
    assert all(_all_nan(g) for g in grads)


def test_idid_loss_ignore_index_inside_the_class_range_is_still_ignored():
    # ignore_index = 2 is a valid class id: rows labelled 2 are ignored, not out of range
    labels = torch.tensor([v if v != IGNORE else 2 for v in BASE], device=DEV)
    tensors = _tensors(4, len(BASE), C)
    terms, grads = _idid(tensors, labels, ignore_index=2)
    assert all(torch.isfinite(v) for v in terms) and all(torch.isfinite(g).all() for g in grads)
    truth = ik.idid_loss(*[t.detach().double() for t in tensors], labels, ignore_index=2, backend="reference")
    torch.testing.assert_close(terms.loss.double(), truth, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ class_density
@pytest.mark.parametrize("bad", BAD + [IGNORE])  # class_density has no ignore_index: -100 is out of range
def test_class_density_out_of_range_label_gives_nan_density_and_gradient(bad):
    base = [0 if v == IGNORE else v for v in BASE]
    x = _tensors(5, len(base), C)[0]
    up = torch.randn(C, generator=make_gen(6), dtype=torch.float64).to(DEV, torch.float32)
    density = ik.class_density(x, _labels(bad, base=base), C, backend="triton")
    (dx,) = torch.autograd.grad(density, x, up)
    assert _all_nan(density) and _all_nan(dx)
    # control: in range, finite
    density = ik.class_density(x, _labels(3, base=base), C, backend="triton")
    (dx,) = torch.autograd.grad(density, x, up)
    assert torch.isfinite(density).all() and torch.isfinite(dx).all()


# ----------------------------------------------------------------------------- cm_margin_loss
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("bad", BAD)
def test_cm_margin_out_of_range_label_nan_row_and_no_gradient(bad, deterministic):
    # Per row: NaN loss for that row, every other row as if it were ignored, and exactly the
    # gradients of the batch with that row ignored, whatever the upstream gradient of the row.
    x, w, _ = _tensors(8, len(BASE), C)
    labels, ignored = _labels(bad), _labels(IGNORE)
    up = torch.randn(len(BASE), generator=make_gen(9), dtype=torch.float64).to(DEV, torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        rows = ik.cm_margin_loss(x, w, labels, reduction="none", backend="triton")
        grads = torch.autograd.grad(rows, (x, w), up)
        rows_ignored = ik.cm_margin_loss(x, w, ignored, reduction="none", backend="triton")
        grads_ignored = torch.autograd.grad(rows_ignored, (x, w), up)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isnan(rows[4]) and rows_ignored[4] == 0
    keep = [i for i in range(len(BASE)) if i != 4]
    assert torch.equal(rows[keep], rows_ignored[keep])
    assert torch.count_nonzero(grads[0][4]) == 0
    for a, b in zip(grads, grads_ignored):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # atomics: the adds' order may differ


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bad", BAD)
def test_cm_margin_out_of_range_label_with_class_weight_is_nan_not_an_index_error(bad, reduction):
    x, w, _ = _tensors(10, len(BASE), C)
    cw = torch.rand(C, generator=make_gen(11)).to(DEV)
    loss = ik.cm_margin_loss(x, w, _labels(bad), class_weight=cw, reduction=reduction, backend="triton")
    (dx, dw) = torch.autograd.grad(loss, (x, w))
    assert torch.isnan(loss)
    assert torch.count_nonzero(dx[4]) == 0 and torch.isfinite(dx).all() and torch.isfinite(dw).all()


# ------------------------------------------------------------------------ the other backends
@pytest.mark.parametrize("bad", BAD)
def test_reference_and_cpp_raise_on_out_of_range_labels(bad):
    # On CPU tensors: the reference's index_select raises IndexError; the cpp kernels check the
    # labels themselves (a RuntimeError naming the row).
    tensors = [t.detach().cpu() for t in _tensors(7, len(BASE), C)]
    labels = _labels(bad).cpu()
    cd_labels = labels.clone()
    cd_labels[BASE.index(IGNORE)] = 0
    with pytest.raises(IndexError):
        ik.idid_loss(*tensors, labels, backend="reference")
    with pytest.raises(IndexError):
        ik.class_density(tensors[0], cd_labels, C, backend="reference")
    if "cpp" not in _backends.available_backends():
        pytest.skip("the cpp backend is not built")
    with pytest.raises(RuntimeError, match=rf"idid_loss: label {bad} at row 4 is outside \[0, {C}\)"):
        ik.idid_loss(*tensors, labels, backend="cpp")
    with pytest.raises(RuntimeError, match=rf"class_density: labels\[4\] = {bad} is out of range"):
        ik.class_density(tensors[0], cd_labels, C, backend="cpp")
