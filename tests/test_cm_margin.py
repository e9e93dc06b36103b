"""cm_margin_loss: one contract for every backend (reference, cpp, cuda, triton).

Each fused backend is checked against the float64 reference (idid_kernels.reference): float64 to
1e-12 with random upstream gradients for every margin preset and option (class weights and every
reduction), float64 gradcheck, float32 and bf16/fp16 tolerances, shapes around the block sizes,
C > 65536, chunk boundaries of the chunk budget, ignore_index rows, label layouts, zero and aligned
rows, every requires_grad combination, the fused and the forward/backward paths (grad enabled or
not, torch.func), bitwise determinism with and without torch.use_deterministic_algorithms,
non-contiguous inputs left unmodified, opcheck, torch.compile(fullgraph=True), double-backward
refusal, and out-of-range labels (the per-backend outcome with IDID_KERNELS_CHECK_LABELS=0). The
last section holds what only the triton backend has (its two dW reductions, TF32, CUDA graphs).

Without a GPU the cuda kernels run under the CUDA emulator and the triton kernels in Triton's
interpreter, on CPU tensors at small shapes (conftest); with a GPU the same tests run natively at
larger shapes, plus the GPU-only ones.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import idid_kernels as ik
from conftest import (
    GPU, OpLog, backend_device, backend_params, deterministic, fused_backends, is_slow, kernel_ops, make_gen, rel_err, sized,
)
from idid_kernels import _backends, _chunks
from idid_kernels.reference.margins import resolve_margin

OP = "cm_margin_loss"
ALL = backend_params(OP)
FUSED = fused_backends(OP)

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
REDUCTIONS = ("mean", "sum", "none")


def _seed(*parts) -> int:
    """A seed that depends on ``parts`` but not on Python's per-process string hashing."""
    return zlib.crc32("/".join(map(str, parts)).encode()) % 10_000


def _cases(backends, fast, slow=None):
    """pytest params (backend, *case): the ``fast`` cases for reference/cpp/GPU-native backends,
    ``slow`` (default: the same) for the emulated/interpreted ones; each keeps its backend's skip."""
    params = []
    for p in backends:
        (backend,) = p.values
        for case in (slow if slow is not None and is_slow(backend) else fast):
            case = case if isinstance(case, tuple) else (case,)
            ids = ["x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in case]
            params.append(pytest.param(backend, *case, marks=p.marks, id="-".join([backend, *ids])))
    return params



def make(n, c, d, seed=0, ignore=0, dtype=torch.float64, scale=1.0):
    g = make_gen(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignore] = -100
    return x.to(dtype), w.to(dtype), y


def run(backend, x, w, y, upstream_seed=7, needs=(True, True), device=None, **kw):
    """(loss, dx, dw) on the CPU, computed on ``device`` (default: the backend's) with a random
    upstream gradient of the loss's shape; a gradient not asked for is None."""
    dev = device or backend_device(backend)
    # detach(), not clone(): a clone of a strided view would be contiguous
    x = x.detach().to(dev).requires_grad_(needs[0])
    w = w.detach().to(dev).requires_grad_(needs[1])
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = ik.cm_margin_loss(x, w, y.to(dev), backend=backend, **kw)
    up = torch.randn(loss.shape, generator=make_gen(upstream_seed), dtype=torch.float64)
    wanted = [t for t in (x, w) if t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted, up.to(dev, loss.dtype)) if wanted else ())
    dx = next(grads) if needs[0] else None
    dw = next(grads) if needs[1] else None
    return tuple(None if t is None else t.detach().cpu() for t in (loss, dx, dw))


def within(a, b, tol):
    """Relative error <= tol, or an absolute one below float32 resolution where b is ~0 (a saturated
    softmax gives a loss of 1e-15 that float32 rounds to 0)."""
    diff = float(torch.linalg.vector_norm(a.double() - b.double()))
    return rel_err(a, b) <= tol or diff <= 1e-6


def assert_float32_close(ours, truth):
    assert within(ours[0], truth[0], 1e-5), (rel_err(ours[0], truth[0]))
    assert rel_err(ours[1], truth[1]) <= 1e-4 and rel_err(ours[2], truth[2]) <= 1e-4


def assert_tight(ours, truth, tol=1e-12):
    for a, b in zip(ours, truth):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert rel_err(a, b) <= tol


# ---------------------------------------------------------------------------------- float64
# Interpreted/emulated backends: every margin with the default options; straight_through with every
# margin that has phi' != 1; the options that act on the row scale with three margin families.
_TIGHT_SLOW = ([(m, "default") for m in MARGINS]
               + [(m, "straight_through") for m in ("arcface", "arcface_easy", "combined", "sphereface",
                                                     "sphereface_lambda")]
               + [(m, o) for o in ("no_contraction", "offset_temperature", "detach_norm")
                  for m in ("cosface", "arcface", "sphereface_lambda")])
_TIGHT_FAST = [(m, o) for m in MARGINS for o in OPTIONS]


@pytest.mark.parametrize("backend,margin,option", _cases(FUSED, _TIGHT_FAST, _TIGHT_SLOW))
def test_float64_matches_reference_tightly(backend, margin, option):
    # detach_norm and straight_through change the gradient on purpose (finite differences cannot see
    # them): the reference implements them with detach(), so its autograd is the oracle for all.
    n, c, d = sized(backend, (6, 5, 4), (37, 29, 16))
    x, w, y = make(n, c, d, seed=_seed(margin, option), ignore=1, scale=2.0)
    cw = torch.rand(c, generator=make_gen(5), dtype=torch.float64) + 0.5
    # the interpreted backends take one reduction per case, in turn
    reductions = [REDUCTIONS[_seed(margin, option) % 3]] if is_slow(backend) else REDUCTIONS
    for reduction in reductions:
        kw = dict(MARGINS[margin], **OPTIONS[option], reduction=reduction, class_weight=cw, s=30.0)
        ours = run(backend, x, w, y, **kw)
        assert ours[0].dtype == torch.float64
        assert_tight(ours, run("reference", x, w, y, **kw))


_GRAD_OPTIONS = ("default", "no_contraction", "offset_temperature")
_GRADCHECK_FAST = [(m, o) for m in MARGINS for o in _GRAD_OPTIONS]
_GRADCHECK_SLOW = [(m, "default") for m in MARGINS] + [("cosface", "no_contraction"), ("arcface", "offset_temperature")]


# the reference (plain autograd, the oracle) takes the shorter list too
_GRADCHECK_CASES = (_cases([p for p in ALL if p.values == ("reference",)], _GRADCHECK_SLOW)
                    + _cases(FUSED, _GRADCHECK_FAST, _GRADCHECK_SLOW))


@pytest.mark.parametrize("backend,margin,option", _GRADCHECK_CASES)
def test_gradcheck_float64(backend, margin, option):
    kw = {**MARGINS[margin], **OPTIONS[option], "s": 4.0}
    x, w, y = make(*sized(backend, (4, 3, 3), (6, 5, 4)), seed=_seed(margin, option), ignore=1)
    dev = backend_device(backend)
    x, w, y = x.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True), y.to(dev)
    # the interpreted backends: one reduction per case and gradcheck's fast mode
    reductions = [("mean", "none")[len(margin) % 2]] if is_slow(backend) else REDUCTIONS
    for reduction in reductions:
        assert torch.autograd.gradcheck(
            lambda a, b: ik.cm_margin_loss(a, b, y, backend=backend, reduction=reduction, **kw), (x, w),
            fast_mode=is_slow(backend))


# ---------------------------------------------------------------------------------- float32
# (N, C, d): 1, 2, primes and sizes around the block sizes (16 in the interpreter; 32..128 natively)
_F32_CPU = [(1, 2, 3), (7, 3, 5), (31, 127, 17), (64, 129, 33), (129, 128, 64)]
_F32_GPU = [(1, 2, 3), (7, 3, 5), (63, 65, 17), (129, 127, 64), (257, 1000, 129), (1031, 4099, 256)]
_F32_SLOW = [(1, 2, 3), (5, 7, 16), (17, 37, 33)]


def _f32_cases():
    params = []
    for p in FUSED:
        (backend,) = p.values
        if is_slow(backend):
            # every margin at the largest shape, three of them (in turn) at each smaller one
            names = list(MARGINS)
            cases = [(m, _F32_SLOW[-1]) for m in names]
            cases += [(names[(3 * i + k) % len(names)], shape) for i, shape in enumerate(_F32_SLOW[:-1])
                      for k in range(3)]
        else:
            shapes = _F32_GPU if backend_device(backend).type == "cuda" else _F32_CPU
            cases = [(m, shape) for shape in shapes for m in MARGINS]
        params += _cases([p], cases)
    return params


@pytest.mark.parametrize("backend,margin,shape", _f32_cases())
def test_float32_within_tolerance(backend, margin, shape):
    n, c, d = shape
    # s=16 keeps the rows off saturation, so every gradient is large enough for a relative test
    x, w, y = make(n, c, d, seed=sum(shape), ignore=1 if n > 3 else 0)
    kw = dict(MARGINS[margin], s=16.0, reduction=REDUCTIONS[_seed(margin, shape) % 3])
    truth = run("reference", x, w, y, **kw)
    ours = run(backend, x.float(), w.float(), y, **kw)
    assert all(t.dtype == torch.float32 for t in ours)
    assert_float32_close(ours, truth)


@pytest.mark.parametrize("backend", FUSED)
def test_float32_separated_logits(backend):
    # Rows on their class's weight row at s=96: most gradient entries a g p_j / ||w_j|| fall below
    # float32's smallest normal number. The CPU row passes run with subnormals flushed to zero
    # (csrc/cpu/fp_env.h), well within tolerance, and leave the caller's floating-point
    # environment as it was (a subnormal result stays representable afterwards, on this thread and
    # in torch's parallel kernels).
    g = make_gen(31)
    n, c, d = (24, 300, 16) if is_slow(backend) else (48, 2048, 64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    x = 20 * torch.nn.functional.normalize(w[y], dim=1)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).t()
    a = 96 * torch.sigmoid(x.norm(dim=1, keepdim=True))
    grad = a / n * torch.softmax(a * cos, 1) / w.norm(dim=1)
    assert ((grad > 0) & (grad < torch.finfo(torch.float32).tiny)).double().mean() > 0.1
    for red in ("mean", "none"):
        kw = dict(margin="cosface", s=96.0, reduction=red)
        truth = run("reference", x, w, y, **kw)
        ours = run(backend, x.float(), w.float(), y, **kw)
        assert_float32_close(ours, truth)
        assert all(torch.isfinite(t).all() for t in ours)
    tiny = torch.finfo(torch.float32).tiny
    assert (torch.tensor([tiny]) / 4).item() > 0
    assert bool((torch.full((1 << 20,), tiny) / 4 > 0).all())


def _big(backend):
    """A shape several blocks and chunks wide in every direction, within the backend's speed."""
    if is_slow(backend):
        return (17, 37, 33)
    return (1031, 4099, 256) if backend_device(backend).type == "cuda" else (129, 257, 64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", FUSED)
def test_float32_class_weight_and_reductions(backend, reduction):
    n, c, d = _big(backend)
    x, w, y = make(n, c, d, seed=31, ignore=3, scale=2.0)
    cw = torch.rand(c, generator=make_gen(2), dtype=torch.float64) + 0.25
    kw = dict(margin="arcface", s=16.0, reduction=reduction)
    truth = run("reference", x, w, y, class_weight=cw, **kw)
    ours = run(backend, x.float(), w.float(), y, class_weight=cw.float(), **kw)
    assert ours[0].shape == truth[0].shape
    assert_float32_close(ours, truth)


@pytest.mark.parametrize("option", ["no_contraction", "offset_temperature", "detach_norm", "straight_through"])
@pytest.mark.parametrize("backend", FUSED)
def test_float32_options(backend, option):
    n, c, d = sized(backend, (5, 7, 16), (129, 127, 64))
    x, w, y = make(n, c, d, seed=41, ignore=1, scale=1.5)
    kw = dict(OPTIONS[option], margin="combined", m1=1.1, m2=0.2, m3=0.05, s=16.0, reduction="none")
    assert_float32_close(run(backend, x.float(), w.float(), y, **kw), run("reference", x, w, y, **kw))


def _large_cases():
    params = []
    for p in FUSED:
        (backend,) = p.values
        if is_slow(backend):
            continue  # the interpreter and the emulator would need hours
        # every margin natively on a GPU; on the CPU (where the float64 oracle of 1.7M logits is
        # the cost) one margin of each kind: none, angular, multiplicative
        on_gpu = backend_device(backend).type == "cuda"
        params += _cases([p], list(MARGINS) if on_gpu else ["none", "arcface", "sphereface_lambda"])
    return params


@pytest.mark.parametrize("backend,margin", _large_cases())
def test_large_class_count_over_65536(backend, margin):
    # C > 65536: past any 16-bit grid dimension or index; on the cpp backend and every GPU-native
    # one, in both determinism modes (the triton dW reductions differ).
    n, c, d = (300, 70000, 32) if backend_device(backend).type == "cuda" else (24, 70000, 32)
    x, w, y = make(n, c, d, seed=11, ignore=2, scale=1.0)
    y[5] = c - 1
    kw = dict(MARGINS[margin], s=16.0, reduction=REDUCTIONS[_seed(margin) % 3])
    truth = run("reference", x, w, y, **kw)
    for det in (False, True):
        with deterministic(det):
            assert_float32_close(run(backend, x.float(), w.float(), y, **kw), truth)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_within_twice_eager_error(backend, dtype):
    if is_slow(backend):
        n, c, d = (17, 37, 33)
    else:
        n, c, d = (257, 1031, 128) if backend_device(backend).type == "cuda" else (33, 41, 16)
    x, w, y = make(n, c, d, seed=9, ignore=2, scale=2.0)
    kw = dict(margin="cosface", s=16.0)
    truth = run("reference", x, w, y, **kw)
    # eager PyTorch in the same dtype on the same device is the yardstick
    eager = run("reference", x.to(dtype), w.to(dtype), y, device=backend_device(backend), **kw)
    ours = run(backend, x.to(dtype), w.to(dtype), y, **kw)
    assert all(t.dtype == dtype for t in ours)
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e, t) + 1e-2


# ----------------------------------------------------------------------------- chunk budget
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_mb", ["0.0001", "0.002"])
@pytest.mark.parametrize("backend", backend_params(OP, include=("cpp", "cuda")))
def test_many_chunks_equal_one_chunk(monkeypatch, backend, chunk_mb, reduction):
    # The cpp and cuda drivers process the logits a chunk of rows at a time (triton streams class
    # tiles and has no chunk budget). C=50 float64 classes are 400 bytes a row: 0.0001 MiB gives
    # 1-row chunks, 0.002 MiB 5-row chunks (N = 83 is prime, so the last chunk is partial).
    x, w, y = make(sized(backend, 23, 83), 50, 12, seed=2, ignore=5)
    kw = dict(margin="combined", m1=1.1, m2=0.2, m3=0.05, reduction=reduction)
    truth = run("reference", x, w, y, **kw)
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", chunk_mb)
    _chunks.reload()
    assert _chunks.rows_for(50, 8, backend_device(backend).type) == {"0.0001": 1, "0.002": 5}[chunk_mb]
    with OpLog() as log:
        ours = run(backend, x, w, y, **kw)
    # "none" keeps its logit gradients only when the batch is one chunk: here it recomputes them
    assert log.ops == _expected_ops(backend, "chunked" if reduction == "none" else "fused")
    assert_tight(ours, truth)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("chunk_mb", [None, "0.0001"])
@pytest.mark.parametrize("backend", backend_params(OP, include=("cpp",)))
def test_forward_class_tiles_and_row_blocks(monkeypatch, backend, chunk_mb, aligned):
    # The cpp forward folds (up to 1024 rows) x (class tile) GEMM tiles into running row statistics:
    # 1030 rows make two row blocks; the tiny budget gives 16-class tiles (the last one partial), so
    # every row's target falls in some tile other than the first. aligned: x_n near w_{y_n}, the
    # target's logit is the row's max (the loss = log1p(P) branch, losses ~1e-7).
    x, w, y = make(1030, 61, 8, seed=9, ignore=7)
    if aligned:
        x = 4 * w[y.clamp_min(0)] + 0.05 * x
    if chunk_mb is not None:
        monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", chunk_mb)
        _chunks.reload()
    for margin in ("none", "arcface", "sphereface"):
        kw = dict(margin=margin, s=8.0, reduction="none", **({"m": 4} if margin == "sphereface" else {}))
        with torch.no_grad():
            ours = ik.cm_margin_loss(x, w, y, backend=backend, **kw)
            truth = ik.cm_margin_loss(x, w, y, backend="reference", **kw)
        assert rel_err(ours, truth) <= 1e-12
        assert_tight(run(backend, x, w, y, **kw), run("reference", x, w, y, **kw), tol=1e-11)


# ------------------------------------------------------------------------------ label layouts
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("backend", FUSED)
def test_ignore_index_rows(backend, ignored, reduction):
    x, w, y = make(10, 6, 5, seed=4)
    if ignored == "some":
        y[[0, 3, 9]] = -1
    elif ignored == "all":
        y[:] = -1
    kw = dict(ignore_index=-1, reduction=reduction, margin="arcface")
    ours = run(backend, x, w, y, **kw)
    truth = run("reference", x, w, y, **kw)
    if ignored == "all" and reduction == "mean":
        assert torch.isnan(ours[0]) and torch.isnan(truth[0])  # F.cross_entropy's 0/0
        assert torch.count_nonzero(ours[1]) == 0 and torch.count_nonzero(ours[2]) == 0
        return
    if reduction == "none" and ignored != "none":
        assert torch.all(ours[0][y == -1] == 0)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", FUSED)
def test_ignore_index_inside_class_range(backend):
    # ignore_index may name a real class: those rows are skipped, the class still gets gradient
    x, w, y = make(9, 5, 4, seed=19)
    y[[1, 2]] = 2
    kw = dict(ignore_index=2, margin="sphereface", sphere_lambda=1.0)
    for a, b in zip(run(backend, x, w, y, **kw), run("reference", x, w, y, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _layout(name):
    """(labels, C) for 12 rows."""
    if name == "one_class":
        return torch.full((12,), 3), 12
    if name == "singletons":
        return torch.randperm(12, generator=make_gen(0)), 12
    # imbalanced: one head class, a few tail rows, and classes that never occur
    return torch.tensor([0] * 8 + [5, 5, 9, 2]), 13


@pytest.mark.parametrize("layout", ["one_class", "singletons", "imbalanced"])
@pytest.mark.parametrize("backend", FUSED)
def test_label_layouts(backend, layout):
    y, c = _layout(layout)
    x, w, _ = make(12, c, 6, seed=8)
    cw = torch.rand(c, generator=make_gen(3), dtype=torch.float64) + 0.5
    for kw in (dict(), dict(class_weight=cw, reduction="none", margin="arcface")):
        assert_tight(run(backend, x, w, y, **kw), run("reference", x, w, y, **kw))


@pytest.mark.parametrize("backend", FUSED)
def test_zero_row_and_aligned_vectors_finite(backend):
    x, w, y = make(5, 4, 3, seed=1)
    x[0] = 0.0
    x[1] = 2.0 * w[y[1]]     # c = +1 on the target
    x[2] = -3.0 * w[y[2]]    # c = -1 on the target
    for margin in MARGINS.values():
        ours = run(backend, x, w, y, **margin)
        truth = run("reference", x, w, y, **margin)
        for a, b in zip(ours, truth):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", FUSED)
def test_one_feature_dimension(backend):
    # d = 1: every cosine is +-1 and the spherical gradient vanishes; compare absolutely.
    x, w, y = make(5, 3, 1, seed=21)
    truth = run("reference", x, w, y)
    ours = run(backend, x.float(), w.float(), y)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- autograd and the two paths
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("x_grad,w_grad", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("backend", FUSED)
def test_requires_grad_combinations(backend, x_grad, w_grad, reduction):
    x, w, y = make(9, 7, 5, seed=6, ignore=1)
    kw = dict(reduction=reduction, needs=(x_grad, w_grad))
    ours = run(backend, x, w, y, **kw)
    truth = run("reference", x, w, y, **kw)
    torch.testing.assert_close(ours[0], truth[0], rtol=1e-12, atol=0)
    for a, b in zip(ours[1:], truth[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_forward(backend):
    x, w, y = make(20, 9, 6, seed=12, ignore=3)
    dev = backend_device(backend)
    with torch.no_grad():
        for reduction in REDUCTIONS:
            ours = ik.cm_margin_loss(x.to(dev).requires_grad_(True), w.to(dev), y.to(dev), backend=backend,
                                     reduction=reduction)
            assert not ours.requires_grad
            torch.testing.assert_close(ours.cpu(), ik.cm_margin_loss(x, w, y, backend="reference", reduction=reduction),
                                       rtol=1e-12, atol=0)


# The ops each backend runs: cpp and cuda form the gradients in the forward pass for a loss that
# needs a gradient outside torch.func: cm_margin_fused for mean/sum, cm_margin_forward_grad (then
# cm_margin_rows_dweight in backward) for "none" on a batch within one chunk; cm_margin_forward /
# cm_margin_backward otherwise ("chunked": "none" over the budget). triton always runs the pair.
def _expected_ops(backend, path):
    if path == "no_grad":
        return {"cm_margin_forward"}
    if backend == "triton" or path in ("chunked", "func"):
        return {"cm_margin_forward", "cm_margin_backward"}
    if path == "none":
        return {"cm_margin_forward_grad", "cm_margin_rows_dweight"}
    return {"cm_margin_fused"}


_PATH_CASES = [("mean", "cosface"), ("mean", "sphereface"), ("sum", "cosface"), ("sum", "sphereface")]


@pytest.mark.parametrize("backend,reduction,margin", _cases(FUSED, _PATH_CASES, _PATH_CASES[::3]))
def test_fused_and_forward_backward_paths_agree(backend, reduction, margin):
    x, w, y = make(17, 10, 7, seed=17, ignore=2)
    cw = torch.rand(10, generator=make_gen(4), dtype=torch.float64) + 0.5
    dev = backend_device(backend)
    x, w, y, cw = x.to(dev), w.to(dev), y.to(dev), cw.to(dev)
    kw = dict(margin=margin, class_weight=cw, backend=backend)
    up = torch.randn((), generator=make_gen(7), dtype=torch.float64).to(dev)

    def loss_fn(a, b, red=reduction):
        return ik.cm_margin_loss(a, b, y, reduction=red, **kw)

    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with OpLog() as log:
        fused = loss_fn(xs, ws)
        fused_grads = torch.autograd.grad(fused, (xs, ws), up)
    assert log.ops == _expected_ops(backend, "fused")
    # the rows path reduced by hand, with the same upstream scalar
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with OpLog() as log:
        per_row = loss_fn(xr, wr, "none")
        total = per_row.sum()
        if reduction == "mean":
            total = total / torch.where(y != -100, cw[y.clamp_min(0)], torch.zeros_like(cw[0])).sum()
        rows_grads = torch.autograd.grad(total, (xr, wr), up)
    assert log.ops == _expected_ops(backend, "none")
    torch.testing.assert_close(total.detach(), fused.detach(), rtol=1e-12, atol=0)
    for a, b in zip(rows_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # no gradient needed: the forward op alone, the same value
    for grad_off in (torch.no_grad, lambda: torch.inference_mode(True)):
        with OpLog() as log, grad_off():
            value = loss_fn(xs, ws)
        assert not value.requires_grad and log.ops == _expected_ops(backend, "no_grad")
        torch.testing.assert_close(value, fused.detach(), rtol=1e-12, atol=0)
    detached = loss_fn(x, w)  # grad mode on, nothing requires grad
    assert not detached.requires_grad
    torch.testing.assert_close(detached, fused.detach(), rtol=1e-12, atol=0)
    # torch.func: the forward/backward ops (their backward refuses a second derivative)
    with OpLog() as log:
        func_grads = torch.func.grad(lambda a, b: up * loss_fn(a, b), argnums=(0, 1))(x, w)
    assert log.ops == _expected_ops(backend, "func")
    for a, b in zip(func_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    truth = run("reference", x.cpu(), w.cpu(), y.cpu(), margin=margin, class_weight=cw.cpu(), reduction=reduction)
    assert rel_err(fused.detach().cpu(), truth[0]) <= 1e-12
    for a, b in zip(fused_grads, truth[1:]):  # run() draws the same upstream scalar
        assert rel_err(a.cpu(), b) <= 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_backward_seeds_retained_graphs_and_accumulation(backend):
    # loss.backward() seeds 1, which the fused path's backward hands its saved gradients over for
    # as they are (on the CPU, when the graph is freed). A retained graph, run again, must give the
    # same gradients and accumulate them without changing its saved state; other seeds scale them.
    x, w, y = make(13, 9, 6, seed=21, ignore=2)
    dev = backend_device(backend)
    x, w, y = x.to(dev), w.to(dev), y.to(dev)
    xr, wr = x.cpu().clone().requires_grad_(True), w.cpu().clone().requires_grad_(True)
    truth = (None,) + torch.autograd.grad(ik.cm_margin_loss(xr, wr, y.cpu(), margin="cosface", backend="reference"),
                                          (xr, wr))
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = ik.cm_margin_loss(xs, ws, y, margin="cosface", backend=backend)
    for k in (1, 2, 3):
        loss.backward(retain_graph=k < 3)
        for leaf, want in zip((xs, ws), truth[1:]):
            assert rel_err(leaf.grad.cpu(), k * want) <= 1e-12, k
    for seed in (1.0, 2.5, 0.0, -1.0):
        xs.grad = ws.grad = None
        ik.cm_margin_loss(xs, ws, y, margin="cosface", backend=backend).backward(
            torch.tensor(seed, dtype=x.dtype, device=dev))
        for leaf, want in zip((xs, ws), truth[1:]):
            torch.testing.assert_close(leaf.grad.cpu(), seed * want, rtol=1e-12, atol=1e-300)
    # two losses of one step: their gradients add (the second accumulates into the first's)
    xs.grad = ws.grad = None
    ik.cm_margin_loss(xs, ws, y, margin="cosface", backend=backend).backward()
    ik.cm_margin_loss(xs, ws, y, margin="cosface", backend=backend).backward()
    for leaf, want in zip((xs, ws), truth[1:]):
        assert rel_err(leaf.grad.cpu(), 2 * want) <= 1e-12


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ALL)
def test_double_backward(backend, reduction):
    # The fused backends' backward passes are not differentiable: create_graph=True is refused (both
    # paths) rather than returning gradients with a silently wrong derivative. The reference is
    # plain autograd and has second derivatives.
    x, w, y = make(5, 4, 3, seed=2)
    dev = backend_device(backend)
    x, w = x.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
    loss = ik.cm_margin_loss(x, w, y.to(dev), backend=backend, reduction=reduction).sum()
    if backend == "reference":
        (gx,) = torch.autograd.grad(loss, (x,), create_graph=True)
        (hx,) = torch.autograd.grad((gx ** 2).sum(), (x,))
        assert torch.isfinite(hx).all() and hx.abs().sum() > 0
        return
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, (x, w), create_graph=True)


# ------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("det", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("backend", FUSED)
def test_bitwisedeterministic(backend, det):
    # cpp and cuda are bitwise reproducible in both modes (partials combined in a fixed order);
    # triton only under use_deterministic_algorithms(True): by default its dX/dW sums use atomics
    # whose order varies run to run, while its forward has no atomics at all.
    if is_slow(backend):
        shape = (17, 37, 33)
    else:
        shape = (513, 4099, 96) if backend_device(backend).type == "cuda" else (300, 1000, 64)
    x, w, y = make(*shape, seed=13, ignore=3, dtype=torch.float32)
    for reduction in ("none",) if is_slow(backend) else ("mean", "none"):
        with deterministic(det):
            a, b = (run(backend, x, w, y, margin="arcface", reduction=reduction) for _ in range(2))
        assert torch.equal(a[0], b[0])
        for p, q in zip(a[1:], b[1:]):
            if det or backend != "triton":
                assert torch.equal(p, q)
            else:
                assert rel_err(p, q) <= 1e-6


# ------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_inputs_not_modified(backend, reduction):
    # the kernels read x and weight through their strides: a column slice and a transposed weight;
    # no input (x, weight, labels, class_weight) is modified, whichever path runs
    g = make_gen(3)
    x_big = torch.randn(11, 14, generator=g, dtype=torch.float64)
    w_t = torch.randn(7, 9, generator=g, dtype=torch.float64)  # (d, C)
    y = torch.randint(0, 9, (11,), generator=g)
    y[4] = -100
    cw_big = torch.rand(18, generator=g, dtype=torch.float64) + 0.5
    for dtype in (torch.float64, torch.float32):
        dev = backend_device(backend)
        x, w, cw = x_big.to(dev, dtype)[:, ::2], w_t.to(dev, dtype).t(), cw_big.to(dev, dtype)[::2]
        assert not x.is_contiguous() and not w.is_contiguous() and not cw.is_contiguous()
        before = [t.clone() for t in (x, w, y, cw)]
        kw = dict(margin="arcface", reduction=reduction, class_weight=cw)
        ours = run(backend, x, w, y, **kw)
        for a, b in zip(before, (x, w, y, cw)):
            assert torch.equal(a, b)
        truth = run("reference", x_big[:, ::2], w_t.t(), y, margin="arcface", reduction=reduction,
                    class_weight=cw_big[::2])
        if dtype == torch.float64:
            assert_tight(ours, truth)
        else:
            assert_float32_close(ours, truth)
        # non-contiguous leaves, with backward into .grad
        xl, wl = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        assert not xl.is_contiguous() and not wl.is_contiguous()
        ik.cm_margin_loss(xl, wl, y.to(dev), backend=backend, **kw).sum().backward()
        for a, b in zip(before, (xl.detach(), wl.detach(), y, cw)):
            assert torch.equal(a, b)
        assert xl.grad.shape == xl.shape and wl.grad.shape == wl.shape
        assert torch.isfinite(xl.grad).all() and torch.isfinite(wl.grad).all()


# ------------------------------------------------------------------------------ torch plumbing
def _cm_cfg(backend, margin="arcface", num_classes=6, dtype=torch.float32, **overrides):
    """The trailing scalar arguments of the backend's ops (triton's schema has no chunk size)."""
    args = dict(s=10.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
                margin_grad="exact", ignore_index=-100)
    args.update(overrides)
    if backend == "triton":
        from idid_kernels.triton.cm_margin import config_args
        return config_args(resolve_margin(margin), **args)
    from idid_kernels.ops.cm_margin import config_args
    return config_args(resolve_margin(margin), num_classes=num_classes, acc_itemsize=8 if dtype == torch.float64 else 4,
                       device_type=backend_device(backend).type, **args)


def _ops(backend):
    """The torch.ops library of the backend's cm_margin ops on its device."""
    return torch.ops.idid_triton if backend == "triton" else kernel_ops(backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend, dtype):
    x, w, y = make(7, 6, 5, seed=15, ignore=1, dtype=dtype)
    dev = backend_device(backend)
    x, w, y = x.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True), y.to(dev)
    cfg = _cm_cfg(backend, dtype=dtype)
    ops = _ops(backend)
    torch.library.opcheck(ops.cm_margin_forward.default, (x, w, y, *cfg))
    outputs = ops.cm_margin_forward(x.detach(), w.detach(), y, *cfg)
    acc = outputs[0].dtype
    grad_rows = torch.rand(7, dtype=acc, device=dev)
    if backend == "triton":
        loss, stats, w_norm = outputs
        assert loss.shape == (7,) and stats.shape == (6, 7) and w_norm.shape == (6,)
        torch.library.opcheck(ops.cm_margin_backward.default,
                              (grad_rows, x.detach(), w.detach(), y, stats, w_norm, *cfg, True, True))
        return
    loss, stats, x_norm, w_norm = outputs
    assert loss.shape == (7,) and stats.shape == (2, 7) and x_norm.shape == (7,) and w_norm.shape == (6,)
    torch.library.opcheck(ops.cm_margin_backward.default,
                          (grad_rows, x.detach(), w.detach(), y, stats, x_norm, w_norm, *cfg))
    torch.library.opcheck(ops.cm_margin_fused.default, (x, w, y, grad_rows, *cfg))
    torch.library.opcheck(ops.cm_margin_forward_grad.default, (x, w, y, *cfg))
    _, x_norm, w_norm, dx_rows, grad_logits = ops.cm_margin_forward_grad(x.detach(), w.detach(), y, *cfg)
    assert dx_rows.shape == (7, 5) and dx_rows.dtype == acc and grad_logits.shape == (7, 6)
    torch.library.opcheck(ops.cm_margin_rows_dweight.default,
                          (grad_rows, grad_logits, x.detach(), w.detach(), x_norm, w_norm))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ALL)
def test_compile_fullgraph(backend, reduction):
    x, w, y = make(15, 8, 6, seed=16, ignore=2, dtype=torch.float32)
    dev = backend_device(backend)
    x, w, y = x.to(dev), w.to(dev), y.to(dev)
    cw = (torch.rand(8, generator=make_gen(1)) + 0.5).to(dev)

    def f(x, w):
        out = ik.cm_margin_loss(x, w, y, backend=backend, margin="arcface", class_weight=cw, reduction=reduction)
        return out.sum()

    # inductor natively on a GPU; aot_eager everywhere (inductor on the CPU needs a C++ toolchain)
    for compiler in ("aot_eager",) + (("inductor",) if dev.type == "cuda" else ()):
        torch._dynamo.reset()
        compiled = torch.compile(f, fullgraph=True, backend=compiler)
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss_c = compiled(xs, ws)
        loss_c.backward()
        loss_e = f(xe, we)
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(xs.grad, xe.grad)
        torch.testing.assert_close(ws.grad, we.grad)


# ---------------------------------------------------------------------- out-of-range labels
# functional.py rejects a label outside [0, C) (other than ignore_index) with a ValueError before
# any kernel runs. That check reads the labels on the host and is skipped under torch.compile,
# during CUDA-graph capture and with IDID_KERNELS_CHECK_LABELS=0. Then, per backend:
# - reference: the gather of the target logit raises (a RuntimeError, not an IndexError);
# - cpp: its driver checks CPU labels itself (a RuntimeError naming the row);
# - cuda and triton (no host sync): the label is never used as an index; the row's loss is NaN and
#   the row gives no gradient, whatever its upstream gradient and its class weight.
BAD_C = 5
BAD_BASE = [0, 1, 0, 2, 1, 0, -100, 3, 0, 1, 4, 2, 2, 0, 1, 3, 0, 1, 0]  # 19 rows; row 6 ignored
BAD = [-5, -1, BAD_C, BAD_C + 7]
BAD_ROW = 4
NAN_ROW_BACKENDS = ("cuda", "triton")


def _bad_case(seed, backend):
    g = make_gen(seed)
    dev = backend_device(backend)
    x, w = (torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, torch.float32).requires_grad_(True)
            for shape in ((len(BAD_BASE), 6), (BAD_C, 6)))
    return x, w


def _bad_labels(bad, backend):
    y = torch.tensor(BAD_BASE)
    y[BAD_ROW] = bad
    return y.to(backend_device(backend))


def _raised(backend, bad):
    """(exception type, message pattern) of a backend that raises on an unchecked bad label."""
    if backend == "reference":
        return RuntimeError, rf"index {bad} is out of bounds for dimension 1 with size {BAD_C}"
    return RuntimeError, rf"cm_margin: labels\[{BAD_ROW}\] = {bad} out of range \[0, {BAD_C}\)"


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", ALL)
def test_out_of_range_label_rejected_before_any_kernel(backend, bad):
    x, w = _bad_case(12, backend)
    with OpLog() as log, pytest.raises(ValueError, match=rf"labels\[{BAD_ROW}\] = {bad} is out of range"):
        ik.cm_margin_loss(x, w, _bad_labels(bad, backend), backend=backend)
    assert not log.ops


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", ALL)
def test_out_of_range_label_unchecked(monkeypatch, backend, bad):
    # Per row: NaN loss for that row, every other row exactly as with that row ignored, and the
    # gradients of the batch with that row ignored, whatever the upstream gradient of the row; in
    # both determinism modes (the atomic and the deterministic dW paths on triton).
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    x, w = _bad_case(8, backend)
    labels, ignored = _bad_labels(bad, backend), _bad_labels(-100, backend)
    up = torch.randn(len(BAD_BASE), generator=make_gen(9), dtype=torch.float64).to(x.device, torch.float32)
    if backend not in NAN_ROW_BACKENDS:
        kind, pattern = _raised(backend, bad)
        for reduction in REDUCTIONS:
            with pytest.raises(kind, match=pattern) as info:
                ik.cm_margin_loss(x, w, labels, reduction=reduction, backend=backend)
            assert type(info.value) is kind
        return
    # (the interpreted/emulated backends run the deterministic mode for one negative and one
    # too-large label only)
    for det in (False, True) if not is_slow(backend) or bad in (-1, BAD_C) else (False,):
        with deterministic(det):
            rows = ik.cm_margin_loss(x, w, labels, reduction="none", backend=backend)
            grads = torch.autograd.grad(rows, (x, w), up)
            rows_ignored = ik.cm_margin_loss(x, w, ignored, reduction="none", backend=backend)
            grads_ignored = torch.autograd.grad(rows_ignored, (x, w), up)
        assert torch.isnan(rows[BAD_ROW]) and rows_ignored[BAD_ROW] == 0
        keep = [i for i in range(len(BAD_BASE)) if i != BAD_ROW]
        assert torch.equal(rows[keep], rows_ignored[keep])
        assert torch.count_nonzero(grads[0][BAD_ROW]) == 0
        for a, b in zip(grads, grads_ignored):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # atomics: the adds' order may differ


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("backend", ALL)
def test_out_of_range_label_unchecked_with_class_weight(monkeypatch, backend, bad, reduction):
    # class_weight[label] is never evaluated for such a label: the backends that raise, raise what
    # they raise without a class weight (not an IndexError from the weight lookup); the others give
    # a NaN loss (the mean/sum through the fused path on cpp-style backends too) and finite gradients
    # with none for the bad row.
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    x, w = _bad_case(10, backend)
    cw = torch.rand(BAD_C, generator=make_gen(11)).to(x.device)
    labels = _bad_labels(bad, backend)
    if backend not in NAN_ROW_BACKENDS:
        kind, pattern = _raised(backend, bad)
        with pytest.raises(kind, match=pattern) as info:
            ik.cm_margin_loss(x, w, labels, class_weight=cw, reduction=reduction, backend=backend)
        assert type(info.value) is kind
        return
    loss = ik.cm_margin_loss(x, w, labels, class_weight=cw, reduction=reduction, backend=backend)
    dx, dw = torch.autograd.grad(loss.sum() if reduction == "none" else loss, (x, w))
    if reduction == "none":
        keep = [i for i in range(len(BAD_BASE)) if i != BAD_ROW]
        assert torch.isnan(loss[BAD_ROW]) and torch.isfinite(loss[keep]).all()
    else:
        assert torch.isnan(loss)
    assert torch.count_nonzero(dx[BAD_ROW]) == 0 and torch.isfinite(dx).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("backend", FUSED)
def test_direct_op_call_out_of_range_label(backend):
    # Calling a backend's op directly bypasses functional.py's check whatever the environment.
    x, w, y = make(4, 3, 2, dtype=torch.float32)
    y[1] = 3
    dev = backend_device(backend)
    x, w, y = x.to(dev), w.to(dev), y.to(dev)
    forward = _ops(backend).cm_margin_forward
    cfg = _cm_cfg(backend, margin="cosface", num_classes=3, s=30.0)
    if backend == "cpp":
        with pytest.raises(RuntimeError, match=r"labels\[1\] = 3 out of range"):
            forward(x, w, y, *cfg)
        return
    loss = forward(x, w, y, *cfg)[0].cpu()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


# ------------------------------------------------------------------------ triton only
# What only the triton backend has: its two dW reductions (atomics vs a deterministic sweep), the
# TF32 switch, its own dtype check, and capture in a CUDA graph.
TRITON = backend_params(OP, include=("triton",))


def _tcm():
    from idid_kernels.triton import cm_margin
    return cm_margin


class _LaunchCounter:
    """Wraps a Triton kernel object, counting its launches (kernel[grid](...)) and keeping the grids."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.grids = kernel, 0, []

    def __getitem__(self, grid):
        self.launches += 1
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("backend", TRITON)
def test_triton_is_registered_and_never_auto_on_the_cpu(backend):
    assert "triton" in _backends.IMPLEMENTED[OP] and "triton" in ik.available_backends()
    # the interpreter is for tests: "auto" never picks it (nor the CUDA emulator) on the CPU
    assert _backends.select_backend(OP, "auto", torch.device("cpu")) in ("cpp", "reference")
    assert _backends.select_backend(OP, "triton", backend_device(backend)) == "triton"


@pytest.mark.parametrize("dtype,needs", [(torch.float32, (True, True)), (torch.float32, (True, False)),
                                         (torch.float32, (False, True)), (torch.float64, (True, True))],
                         ids=["float32-x_w", "float32-x", "float32-w", "float64-x_w"])
@pytest.mark.parametrize("backend", TRITON)
def test_triton_deterministic_path_equals_atomic_path(monkeypatch, backend, dtype, needs):
    tcm = _tcm()
    n, c, d = _big(backend)
    x, w, y = make(n, c, d, seed=23, ignore=2, dtype=dtype)
    classes = _LaunchCounter(tcm._backward_classes_kernel)
    rows = _LaunchCounter(tcm._backward_rows_kernel)
    monkeypatch.setattr(tcm, "_backward_classes_kernel", classes)
    monkeypatch.setattr(tcm, "_backward_rows_kernel", rows)
    block = dict(BLOCK_N=64, BLOCK_C=64) if GPU else dict(BLOCK_N=16, BLOCK_C=16)
    kw = dict(margin="arcface", reduction="none", needs=needs)
    with deterministic(False):
        atomic = run(backend, x, w, y, **kw)
    # default: dX and dW by atomics in the row-block kernel, its class tiles split among groups
    assert classes.launches == 0 and rows.launches == 1 and rows.grids[0](block)[1] > 1
    with deterministic():
        det = run(backend, x, w, y, **kw)
    # deterministic: dX rows owned by one program each (one group), dW by the class-block kernel
    assert classes.launches == int(needs[1]) and rows.launches == 1 + int(needs[0])
    if needs[0]:
        assert rows.grids[1](block)[1] == 1
    assert torch.equal(atomic[0], det[0])  # the forward has no atomics at all
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for a, b in zip(atomic[1:], det[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= tol


@pytest.mark.parametrize("backend", TRITON)
def test_triton_unsupported_dtype_is_a_type_error(backend):
    x, w, y = make(4, 3, 2)
    kw = dict(s=30.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
              margin_grad="exact", class_weight=None, ignore_index=-100, reduction="mean")
    with pytest.raises(TypeError, match=r"cm_margin_loss \(triton backend\): x has dtype torch.int32"):
        _tcm().cm_margin_loss(x.to(torch.int32), w.to(torch.int32), y, resolve_margin("cosface"), **kw)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_tf32_switch(monkeypatch, backend):
    from idid_kernels.triton import _rows
    assert _rows.dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv(_rows.TF32_ENV, "1")
    assert _rows.dot_precision(torch.float32) == "tf32"
    # only float32 dots change: half inputs use their own tensor-core path, float64 stays exact
    assert _rows.dot_precision(torch.bfloat16) == "ieee" and _rows.dot_precision(torch.float64) == "ieee"
    n, c, d = _big(backend)
    x, w, y = make(n, c, d, seed=29, ignore=1)
    truth = run("reference", x, w, y, s=16.0)
    ours = run(backend, x.float(), w.float(), y, s=16.0)
    # TF32 keeps ~10 mantissa bits in the products (exact in the interpreter)
    for a, b in zip(ours, truth):
        assert rel_err(a, b) <= 1e-2


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", TRITON)
def test_triton_cuda_graph_capture(backend):
    x, w, y = make(200, 3000, 64, seed=17, ignore=4, dtype=torch.float32)
    x, w, y = x.cuda().requires_grad_(True), w.cuda().requires_grad_(True), y.cuda()

    def step():
        loss = ik.cm_margin_loss(x, w, y, backend=backend, margin="arcface")
        return (loss,) + torch.autograd.grad(loss, (x, w))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # autotuning and compilation happen here, outside the capture
            eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- per-row margins
# margin="combined" with (N,) tensors for m2 and/or m3: every backend runs them as margin kind
# "given" (each row's phi and phi' formed on (N,) vectors), with d loss / d m2_n and d m3_n.

ROW_MARGINS = {
    "m2": dict(easy_margin=False),
    "m3": dict(easy_margin=False),
    "both": dict(easy_margin=False),
    "both_easy": dict(easy_margin=True),
}


def _row_margins(which, n, seed, dtype=torch.float64):
    """(m2, m3): per-row tensors where ``which`` says, scalars elsewhere. m2 spans [0, 1.6] so that
    some rows take the hard fallback (m1 theta + m2 > pi) and some the main branch."""
    g = make_gen(seed)
    m2 = 1.6 * torch.rand(n, generator=g, dtype=torch.float64)
    m3 = 0.3 * torch.rand(n, generator=g, dtype=torch.float64) - 0.05
    return (m2.to(dtype) if which != "m3" else 0.3), (m3.to(dtype) if which != "m2" else 0.1)


def run_rows(backend, x, w, y, m2, m3, upstream_seed=7, **kw):
    """(loss, dx, dw, dm2, dm3) on the CPU with a random upstream gradient; the tensor margins
    require grad (a scalar margin's gradient is None)."""
    dev = backend_device(backend)
    x = x.detach().to(dev).requires_grad_()
    w = w.detach().to(dev).requires_grad_()
    m2, m3 = (v.detach().to(dev).requires_grad_() if isinstance(v, torch.Tensor) else v for v in (m2, m3))
    loss = ik.cm_margin_loss(x, w, y.to(dev), margin="combined", m1=kw.pop("m1", 1.0), m2=m2, m3=m3,
                             backend=backend, **kw)
    up = torch.randn(loss.shape, generator=make_gen(upstream_seed), dtype=torch.float64)
    inputs = [t for t in (x, w, m2, m3) if isinstance(t, torch.Tensor)]
    grads = iter(torch.autograd.grad(loss, inputs, up.to(dev, loss.dtype)))
    out = [loss, next(grads), next(grads)] + [next(grads) if isinstance(v, torch.Tensor) else None for v in (m2, m3)]
    return tuple(None if t is None else t.detach().cpu() for t in out)


@pytest.mark.parametrize("which", list(ROW_MARGINS))
def test_row_margins_reference_equals_one_row_at_a_time(which):
    """The reference with (N,) margins is each row's loss with that row's scalar margins."""
    x, w, y = make(9, 6, 4, seed=3, ignore=1)
    m2, m3 = _row_margins(which, 9, seed=4)
    kw = dict(ROW_MARGINS[which], m1=1.1)
    full = ik.cm_margin_loss(x, w, y, margin="combined", m2=m2, m3=m3, reduction="none", backend="reference", **kw)
    rows = torch.stack([
        ik.cm_margin_loss(x[i:i + 1], w, y[i:i + 1], margin="combined", reduction="none", backend="reference",
                          m2=float(m2[i]) if isinstance(m2, torch.Tensor) else m2,
                          m3=float(m3[i]) if isinstance(m3, torch.Tensor) else m3, **kw)[0]
        for i in range(9)])
    assert rel_err(full, rows) <= 1e-14
    fallback = torch.acos(ik.pairwise_cosine(x, w).gather(1, y.clamp_min(0)[:, None])[:, 0]) * 1.1 + (
        m2 if isinstance(m2, torch.Tensor) else m2) > torch.pi
    if which != "m3" and not ROW_MARGINS[which]["easy_margin"]:
        assert 0 < int(fallback[1:].sum()) < 8  # both branches are exercised


_ROW_CASES = [(which, red, opt) for which in ROW_MARGINS for red in REDUCTIONS
              for opt in ("default", "no_contraction", "straight_through")]
_ROW_CASES_SLOW = [(which, red, "default") for which in ROW_MARGINS for red in REDUCTIONS] + [
    ("both", "mean", "no_contraction"), ("both", "none", "straight_through")]


@pytest.mark.parametrize("backend,which,reduction,option", _cases(FUSED, _ROW_CASES, _ROW_CASES_SLOW))
def test_row_margins_float64_match_reference(backend, which, reduction, option):
    n = 23
    x, w, y = make(n, 13, 5, seed=_seed("rows", which, reduction), ignore=2)
    m2, m3 = _row_margins(which, n, seed=_seed("m", which))
    kw = dict(ROW_MARGINS[which], **OPTIONS[option], m1=1.1, reduction=reduction, s=12.0)
    truth = run_rows("reference", x, w, y, m2, m3, **kw)
    ours = run_rows(backend, x, w, y, m2, m3, **kw)
    assert_tight(ours, truth, tol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", FUSED)
def test_row_margins_without_grad_equal_the_same_margins_with_grad(backend, reduction):
    """Margins that need no gradient take the fused path (cpp, cuda): same loss and dx, dw."""
    n = 11
    x, w, y = make(n, 7, 4, seed=5)
    m2, m3 = _row_margins("both", n, seed=6)
    kw = dict(m1=1.0, reduction=reduction)
    with_grad = run_rows(backend, x, w, y, m2, m3, **kw)
    dev = backend_device(backend)
    no_grad = run(backend, x, w, y, margin="combined", m1=1.0, m2=m2.to(dev), m3=m3.to(dev), reduction=reduction)
    assert_tight(no_grad, with_grad[:3], tol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_row_margins_that_are_constant_equal_scalar_margins(backend):
    n = 10
    x, w, y = make(n, 7, 4, seed=8, ignore=1)
    dev = backend_device(backend)
    scalar = run(backend, x, w, y, margin="combined", m1=1.2, m2=0.4, m3=0.15)
    rows = run(backend, x, w, y, margin="combined", m1=1.2, m2=torch.full((n,), 0.4, dtype=torch.float64, device=dev),
               m3=torch.full((n,), 0.15, dtype=torch.float64, device=dev))
    assert_tight(rows, scalar, tol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_row_margins_float32_within_tolerance(backend):
    n = sized(backend, 19, 257)
    x, w, y = make(n, sized(backend, 29, 1031), sized(backend, 16, 64), seed=9, ignore=1)
    m2, m3 = _row_margins("both", n, seed=10)
    kw = dict(m1=1.0, s=16.0)
    truth = run_rows("reference", x, w, y, m2, m3, **kw)
    ours = run_rows(backend, x.float(), w.float(), y, m2.float(), m3.float(), **kw)
    assert all(t.dtype == torch.float32 for t in ours)
    assert within(ours[0], truth[0], 1e-5)
    for a, b in zip(ours[1:], truth[1:]):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("backend", ALL)
def test_row_margins_gradcheck_float64(backend):
    n = 6
    x, w, y = make(n, 5, 3, seed=11)
    m2, m3 = _row_margins("both", n, seed=12)
    dev = backend_device(backend)
    inputs = [t.detach().to(dev).requires_grad_() for t in (x, w, m2, m3)]

    def f(x, w, m2, m3):
        return ik.cm_margin_loss(x, w, y.to(dev), margin="combined", m1=1.1, m2=m2, m3=m3, s=4.0, backend=backend)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_row_margin_through_the_norm(backend):
    """A margin computed from ||x|| differentiates through the norm (MagFace's use)."""
    n = 9
    x, w, y = make(n, 6, 4, seed=13, scale=3.0)
    dev = backend_device(backend)
    results = []
    for b, d in (("reference", torch.device("cpu")), (backend, dev)):
        xx = x.detach().to(d).requires_grad_()
        m2 = 0.2 + 0.05 * torch.linalg.vector_norm(xx, dim=1)
        loss = ik.cm_margin_loss(xx, w.to(d), y.to(d), margin="combined", m2=m2, m3=0.0, backend=b)
        results.append(torch.autograd.grad(loss, xx)[0].cpu())
    assert rel_err(results[1], results[0]) <= 1e-10


@pytest.mark.parametrize("margin_grad", [False, True], ids=["constant", "learned"])
@pytest.mark.parametrize("backend", ALL)
def test_row_margins_compile_fullgraph(backend, margin_grad):
    """Both paths compiled: margins without a gradient (cpp/cuda: the fused op) and with one (the
    forward/backward ops, d loss / d phi formed in the backward)."""
    n = 8
    x, w, y = make(n, 5, 4, seed=14)
    dev = backend_device(backend)
    m2, m3 = (t.to(dev).requires_grad_(margin_grad) for t in _row_margins("both", n, seed=15))
    x, w, y = x.to(dev).requires_grad_(), w.to(dev), y.to(dev)
    inputs = (x, m2, m3) if margin_grad else (x,)

    def f(x, m2, m3):
        return ik.cm_margin_loss(x, w, y, margin="combined", m2=m2, m3=m3, backend=backend)

    eager = f(x, m2, m3)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, m2, m3)
    assert rel_err(compiled, eager) <= 1e-12
    for a, b in zip(torch.autograd.grad(compiled, inputs), torch.autograd.grad(eager, inputs)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ALL)
def test_row_margins_every_row_ignored(backend, reduction):
    """No row counts: the mean is NaN (as F.cross_entropy), but no gradient is: dx and the margins'
    gradients are 0 (the per-row d loss / d phi of ignored rows is masked, not 0 * NaN)."""
    n = 6
    x, w, y = make(n, 4, 3, seed=21, ignore=n)
    dev = backend_device(backend)
    xx = x.to(dev).requires_grad_()
    m2 = (0.2 + 0.05 * torch.linalg.vector_norm(xx, dim=1))
    m3 = torch.full((n,), 0.1, dtype=torch.float64, device=dev, requires_grad=True)
    loss = ik.cm_margin_loss(xx, w.to(dev), y.to(dev), margin="combined", m2=m2, m3=m3, reduction=reduction,
                             backend=backend)
    if reduction == "mean":
        assert torch.isnan(loss)
    dx, dm3 = torch.autograd.grad(loss.sum(), (xx, m3))
    assert torch.equal(dx.cpu(), torch.zeros_like(x)) and torch.equal(dm3.cpu(), torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("backend", FUSED)
def test_learned_margins_alone_need_no_backward_kernel(backend):
    """Frozen features and weights with learnable margins: the margins' gradient, without the
    dx / dW pass (cpp/cuda skip the backward op; triton's returns before any kernel)."""
    n = 9
    x, w, y = make(n, 6, 4, seed=22)
    dev = backend_device(backend)
    grads = []
    for b, d in (("reference", torch.device("cpu")), (backend, dev)):
        m2, m3 = (t.to(d).requires_grad_() for t in _row_margins("both", n, seed=23))
        log = OpLog()
        with log:
            loss = ik.cm_margin_loss(x.to(d), w.to(d), y.to(d), margin="combined", m2=m2, m3=m3, backend=b)
            grads.append([t.cpu() for t in torch.autograd.grad(loss, (m2, m3))])
    for a, b in zip(grads[1], grads[0]):
        assert rel_err(a, b) <= 1e-12
    assert backend == "triton" or "cm_margin_backward" not in log.ops
