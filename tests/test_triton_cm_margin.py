"""cm_margin_loss on the triton backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1) at small shapes whose sizes are not multiples of the 16-wide interpreter
blocks; with a GPU the same tests run natively at larger shapes, plus the GPU-only ones (C > 65536,
CUDA-graph capture). Covered: float64 gradcheck and tight reference agreement for every margin and
option, float32 tolerances, bf16/fp16 against eager error, class weights, ignore_index rows,
reductions with random upstream gradients, every requires_grad combination, the atomic and the
deterministic dW paths, bitwise determinism, opcheck and torch.compile(fullgraph=True).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import idid_kernels as ik
from conftest import rel_err
from idid_kernels import _backends
from idid_kernels.reference.margins import resolve_margin

tcm = pytest.importorskip("idid_kernels.triton.cm_margin", reason="triton is not installed")

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")

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
# (N, C, d): 1, 2 and sizes around the block sizes (16 in the interpreter; 32..128 natively)
if GPU:
    SHAPES = [(1, 2, 3), (7, 3, 5), (63, 65, 17), (129, 127, 64), (257, 1000, 129), (1031, 4099, 256)]
else:
    SHAPES = [(1, 2, 3), (5, 7, 16), (17, 37, 33)]
SMALL = (6, 5, 4) if not GPU else (37, 29, 16)


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def make(n, c, d, seed=0, ignore=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    y[:ignore] = -100
    return x.to(dtype), w.to(dtype), y


def loss_and_grads(backend, x, w, y, upstream_seed=7, needs=(True, True), device=None, **kw):
    """(loss, dx, dw) on CPU; runs on ``device`` (default: DEV for triton, the CPU for the reference).
    Random upstream gradient of the loss's shape; a gradient not asked for is None."""
    dev = device or (DEV if backend == "triton" else torch.device("cpu"))
    x = x.detach().to(dev).clone().requires_grad_(needs[0])
    w = w.detach().to(dev).clone().requires_grad_(needs[1])
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss = ik.cm_margin_loss(x, w, y.to(dev), backend=backend, **kw)
    up = torch.randn(loss.shape, generator=torch.Generator().manual_seed(upstream_seed), dtype=torch.float64)
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


def test_registered_for_its_ops():
    for op in ("cm_margin_loss", "pairwise_cosine", "norm_contraction"):
        assert "triton" in _backends.IMPLEMENTED[op]
    assert "triton" in ik.available_backends()
    # the interpreter is for tests: "auto" never picks it on the CPU
    assert _backends.select_backend("cm_margin_loss", "auto", torch.device("cpu")) != "triton"
    assert _backends.select_backend("cm_margin_loss", "triton", DEV) == "triton"


# ------------------------------------------------------------------------------------- float64
_GRADCHECK = [(m, "default") for m in MARGINS] + [("cosface", "no_contraction"), ("arcface", "offset_temperature")]


@pytest.mark.parametrize("margin,option", _GRADCHECK)
def test_gradcheck_float64(margin, option):
    kw = {**MARGINS[margin], **OPTIONS[option], "s": 4.0}
    x, w, y = make(4, 3, 3, seed=len(margin) + 3 * len(option), ignore=1)
    x, w = x.to(DEV).requires_grad_(True), w.to(DEV).requires_grad_(True)
    y = y.to(DEV)
    # mean and none alternate: the interpreter is slow, and both reach the same kernels
    red = "none" if len(margin) % 2 else "mean"
    assert torch.autograd.gradcheck(lambda a, b: ik.cm_margin_loss(a, b, y, backend="triton", reduction=red, **kw),
                                    (x, w), fast_mode=True)


# Every margin with the default options; straight_through with every margin that has a phi' != 1;
# the other options (which act on the row scale, not on phi) with three margin families.
_TIGHT = ([(m, "default") for m in MARGINS]
          + [(m, "straight_through") for m in ("arcface", "arcface_easy", "combined", "sphereface",
                                                "sphereface_lambda")]
          + [(m, o) for o in ("no_contraction", "offset_temperature", "detach_norm")
             for m in ("cosface", "arcface", "sphereface_lambda")])


@pytest.mark.parametrize("margin,option", _TIGHT)
def test_float64_matches_reference_tightly(margin, option):
    # detach_norm and straight_through change the gradient on purpose (finite differences cannot see
    # them): the reference implements them with detach(), so its autograd is the oracle for all.
    n, c, d = SMALL
    x, w, y = make(n, c, d, seed=len(margin) * 7 + len(option), ignore=1, scale=2.0)
    cw = torch.rand(c, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    red = ("mean", "sum", "none")[(len(margin) + len(option)) % 3]
    kw = dict(MARGINS[margin], **OPTIONS[option], reduction=red, class_weight=cw, s=30.0)
    ours = loss_and_grads("triton", x, w, y, **kw)
    ref = loss_and_grads("reference", x, w, y, **kw)
    assert ours[0].dtype == torch.float64
    for a, b in zip(ours, ref):
        assert rel_err(a, b) <= 1e-12


# ------------------------------------------------------------------------------------- float32
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("margin", list(MARGINS))
def test_float32_within_tolerance(margin, shape):
    n, c, d = shape
    # s=16 keeps the rows off saturation, so every gradient is large enough for a relative test
    x, w, y = make(n, c, d, seed=sum(shape), ignore=1 if n > 3 else 0)
    kw = dict(MARGINS[margin], s=16.0)
    truth = loss_and_grads("reference", x, w, y, **kw)
    ours = loss_and_grads("triton", x.float(), w.float(), y, **kw)
    assert all(t.dtype == torch.float32 for t in ours)
    assert within(ours[0], truth[0], 1e-5)
    assert rel_err(ours[1], truth[1]) <= 1e-4 and rel_err(ours[2], truth[2]) <= 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_class_weight_and_reductions(reduction):
    n, c, d = SHAPES[-1]
    x, w, y = make(n, c, d, seed=31, ignore=3, scale=2.0)
    cw = torch.rand(c, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.25
    kw = dict(margin="arcface", s=16.0, reduction=reduction)
    truth = loss_and_grads("reference", x, w, y, class_weight=cw, **kw)
    ours = loss_and_grads("triton", x.float(), w.float(), y, class_weight=cw.float(), **kw)
    assert ours[0].shape == truth[0].shape
    assert within(ours[0], truth[0], 1e-5)
    assert rel_err(ours[1], truth[1]) <= 1e-4 and rel_err(ours[2], truth[2]) <= 1e-4


@pytest.mark.parametrize("option", ["no_contraction", "offset_temperature", "detach_norm", "straight_through"])
def test_float32_options(option):
    n, c, d = SHAPES[-2]
    x, w, y = make(n, c, d, seed=41, ignore=1, scale=1.5)
    kw = dict(OPTIONS[option], margin="combined", m1=1.1, m2=0.2, m3=0.05, s=16.0, reduction="none")
    truth = loss_and_grads("reference", x, w, y, **kw)
    ours = loss_and_grads("triton", x.float(), w.float(), y, **kw)
    assert within(ours[0], truth[0], 1e-5)
    assert rel_err(ours[1], truth[1]) <= 1e-4 and rel_err(ours[2], truth[2]) <= 1e-4


@pytest.mark.skipif(not GPU, reason="C > 65536 is a native-speed test (the interpreter needs hours for it)")
def test_large_class_count_over_65536():
    x, w, y = make(24, 70000, 32, seed=11, ignore=2, scale=2.0)
    y[5] = 69999
    truth = loss_and_grads("reference", x, w, y, margin="arcface")
    for det in (False, True):
        with deterministic(det):
            ours = loss_and_grads("triton", x.float(), w.float(), y, margin="arcface")
        assert rel_err(ours[0], truth[0]) <= 1e-5
        assert rel_err(ours[1], truth[1]) <= 1e-4 and rel_err(ours[2], truth[2]) <= 1e-4


# ---------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("ignored", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index_rows(ignored, reduction):
    x, w, y = make(10, 6, 5, seed=4)
    if ignored == "some":
        y[[0, 3, 9]] = -1
    elif ignored == "all":
        y[:] = -1
    kw = dict(ignore_index=-1, reduction=reduction, margin="arcface")
    ours = loss_and_grads("triton", x, w, y, **kw)
    ref = loss_and_grads("reference", x, w, y, **kw)
    if ignored == "all" and reduction == "mean":
        assert torch.isnan(ours[0]) and torch.isnan(ref[0])  # F.cross_entropy's 0/0
        assert torch.count_nonzero(ours[1]) == 0 and torch.count_nonzero(ours[2]) == 0
        return
    if reduction == "none" and ignored != "none":
        assert torch.all(ours[0][y == -1] == 0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_ignore_index_inside_class_range():
    # ignore_index may name a real class: those rows are skipped, the class still gets gradient
    x, w, y = make(9, 5, 4, seed=19)
    y[[1, 2]] = 2
    kw = dict(ignore_index=2, margin="sphereface", sphere_lambda=1.0)
    for a, b in zip(loss_and_grads("triton", x, w, y, **kw), loss_and_grads("reference", x, w, y, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_all_labels_equal_and_every_class_a_singleton():
    x, w, _ = make(12, 12, 6, seed=8)
    for y in (torch.full((12,), 3), torch.randperm(12, generator=torch.Generator().manual_seed(0))):
        for a, b in zip(loss_and_grads("triton", x, w, y), loss_and_grads("reference", x, w, y)):
            assert rel_err(a, b) <= 1e-12


def test_zero_row_and_aligned_vectors_finite():
    x, w, y = make(5, 4, 3, seed=1)
    x[0] = 0.0
    x[1] = 2.0 * w[y[1]]     # c = +1 on the target
    x[2] = -3.0 * w[y[2]]    # c = -1 on the target
    for margin in MARGINS.values():
        ours = loss_and_grads("triton", x, w, y, **margin)
        ref = loss_and_grads("reference", x, w, y, **margin)
        for a, b in zip(ours, ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_one_feature_dimension():
    # d = 1: every cosine is +-1 and the spherical gradient vanishes; compare absolutely.
    x, w, y = make(5, 3, 1, seed=21)
    truth = loss_and_grads("reference", x, w, y)
    ours = loss_and_grads("triton", x.float(), w.float(), y)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs():
    # the kernels read x and weight through their strides: a column slice and a transposed weight
    g = torch.Generator().manual_seed(3)
    x_big = torch.randn(11, 14, generator=g, dtype=torch.float64)
    w_t = torch.randn(7, 9, generator=g, dtype=torch.float64)  # (d, C)
    x, w = x_big[:, ::2], w_t.t()
    assert not x.is_contiguous() and not w.is_contiguous()
    y = torch.randint(0, 9, (11,), generator=g)
    kw = dict(margin="arcface", reduction="none")
    for a, b in zip(loss_and_grads("triton", x, w, y, **kw), loss_and_grads("reference", x, w, y, **kw)):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("x_grad,w_grad", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_requires_grad_combinations(x_grad, w_grad, reduction):
    x, w, y = make(9, 7, 5, seed=6, ignore=1)
    kw = dict(reduction=reduction, needs=(x_grad, w_grad))
    ours = loss_and_grads("triton", x, w, y, **kw)
    ref = loss_and_grads("reference", x, w, y, **kw)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=0)
    for a, b in zip(ours[1:], ref[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_no_grad_forward():
    x, w, y = make(20, 9, 6, seed=12, ignore=3)
    with torch.no_grad():
        for red in ("mean", "sum", "none"):
            ours = ik.cm_margin_loss(x.to(DEV), w.to(DEV), y.to(DEV), backend="triton", reduction=red)
            assert not ours.requires_grad
            torch.testing.assert_close(ours.cpu(), ik.cm_margin_loss(x, w, y, backend="reference", reduction=red),
                                       rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_eager_error(dtype):
    n, c, d = SHAPES[-1]
    x, w, y = make(n, c, d, seed=9, ignore=2, scale=2.0)
    kw = dict(margin="cosface", s=16.0)
    truth = loss_and_grads("reference", x, w, y, **kw)
    # eager PyTorch in the same dtype on the same device is the yardstick
    eager = loss_and_grads("reference", x.to(dtype), w.to(dtype), y, device=DEV, **kw)
    ours = loss_and_grads("triton", x.to(dtype), w.to(dtype), y, **kw)
    assert all(t.dtype == dtype for t in ours)
    for o, e, t in zip(ours, eager, truth):
        assert rel_err(o, t) <= 2 * rel_err(e, t) + 1e-2


# -------------------------------------------------------------------------- determinism, dW paths
class _LaunchCounter:
    """Wraps a Triton kernel object, counting its launches (kernel[grid](...)) and keeping the grids."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.grids = kernel, 0, []

    def __getitem__(self, grid):
        self.launches += 1
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dtype,needs", [(torch.float32, (True, True)), (torch.float32, (True, False)),
                                         (torch.float32, (False, True)), (torch.float64, (True, True))],
                         ids=["float32-x_w", "float32-x", "float32-w", "float64-x_w"])
def test_deterministic_path_equals_atomic_path(monkeypatch, dtype, needs):
    n, c, d = SHAPES[-1]
    x, w, y = make(n, c, d, seed=23, ignore=2, dtype=dtype)
    classes = _LaunchCounter(tcm._backward_classes_kernel)
    rows = _LaunchCounter(tcm._backward_rows_kernel)
    monkeypatch.setattr(tcm, "_backward_classes_kernel", classes)
    monkeypatch.setattr(tcm, "_backward_rows_kernel", rows)
    block = dict(BLOCK_N=64, BLOCK_C=64) if GPU else dict(BLOCK_N=16, BLOCK_C=16)
    kw = dict(margin="arcface", reduction="none", needs=needs)
    atomic = loss_and_grads("triton", x, w, y, **kw)
    # default: dX and dW by atomics in the row-block kernel, its class tiles split among groups
    assert classes.launches == 0 and rows.launches == 1 and rows.grids[0](block)[1] > 1
    with deterministic():
        det = loss_and_grads("triton", x, w, y, **kw)
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


def test_bitwise_deterministic_when_requested():
    n, c, d = SHAPES[-1]
    x, w, y = make(n, c, d, seed=13, ignore=3, dtype=torch.float32)
    with deterministic():
        runs = [loss_and_grads("triton", x, w, y, margin="arcface", reduction="none") for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ torch plumbing
def _cfg(margin="arcface", **kw):
    args = dict(s=10.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
                margin_grad="exact", ignore_index=-100)
    args.update(kw)
    return tcm.config_args(resolve_margin(margin), **args)


def test_opcheck():
    x, w, y = make(7, 6, 5, seed=15, ignore=1, dtype=torch.float32)
    x, w, y = x.to(DEV), w.to(DEV), y.to(DEV)
    cfg = _cfg()
    ops = torch.ops.idid_triton
    torch.library.opcheck(ops.cm_margin_forward.default, (x.requires_grad_(True), w.requires_grad_(True), y, *cfg))
    loss, stats, w_norm = ops.cm_margin_forward(x.detach(), w.detach(), y, *cfg)
    assert loss.shape == (7,) and stats.shape == (6, 7) and w_norm.shape == (6,)
    grad_rows = torch.rand(7, dtype=loss.dtype, device=DEV)
    torch.library.opcheck(ops.cm_margin_backward.default,
                          (grad_rows, x.detach(), w.detach(), y, stats, w_norm, *cfg, True, True))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction):
    x, w, y = make(15, 8, 6, seed=16, ignore=2, dtype=torch.float32)
    x, w, y = x.to(DEV), w.to(DEV), y.to(DEV)
    cw = torch.rand(8, generator=torch.Generator().manual_seed(1)).to(DEV) + 0.5

    def f(x, w):
        out = ik.cm_margin_loss(x, w, y, backend="triton", margin="arcface", class_weight=cw, reduction=reduction)
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


def test_double_backward_refused():
    x, w, y = make(5, 4, 3, seed=2)
    x, w = x.to(DEV).requires_grad_(True), w.to(DEV).requires_grad_(True)
    loss = ik.cm_margin_loss(x, w, y.to(DEV), backend="triton")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, (x, w), create_graph=True)


def test_direct_op_call_out_of_range_label_gives_nan_row():
    # functional rejects such labels; a direct op call must not read out of bounds
    x, w, y = make(4, 3, 2, dtype=torch.float32)
    y[1] = 3
    loss, _, _ = torch.ops.idid_triton.cm_margin_forward(x.to(DEV), w.to(DEV), y.to(DEV), *_cfg("cosface"))
    loss = loss.cpu()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


def test_inputs_not_modified():
    x, w, y = make(11, 5, 4, seed=14, ignore=2, dtype=torch.float32)
    x, w, y = x.to(DEV), w.to(DEV), y.to(DEV)
    cw = torch.rand(5).to(DEV)
    before = [t.clone() for t in (x, w, y, cw)]
    loss = ik.cm_margin_loss(x.requires_grad_(True), w.requires_grad_(True), y, class_weight=cw, backend="triton")
    loss.backward()
    for a, b in zip(before, (x.detach(), w.detach(), y, cw)):
        assert torch.equal(a, b)


def test_unsupported_dtype_is_a_type_error():
    x, w, y = make(4, 3, 2)
    params = resolve_margin("cosface")
    kw = dict(s=30.0, contraction="sigmoid", norm_offset=0.0, norm_temperature=1.0, detach_norm=False,
              margin_grad="exact", class_weight=None, ignore_index=-100, reduction="mean")
    with pytest.raises(TypeError, match=r"cm_margin_loss \(triton backend\): x has dtype torch.int32"):
        tcm.cm_margin_loss(x.to(torch.int32), w.to(torch.int32), y, params, **kw)


def test_tf32_switch(monkeypatch):
    from idid_kernels.triton import _rows
    assert _rows.dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv(_rows.TF32_ENV, "1")
    assert _rows.dot_precision(torch.float32) == "tf32"
    # only float32 dots change: half inputs use their own tensor-core path, float64 stays exact
    assert _rows.dot_precision(torch.bfloat16) == "ieee" and _rows.dot_precision(torch.float64) == "ieee"
    n, c, d = SHAPES[-1]
    x, w, y = make(n, c, d, seed=29, ignore=1)
    truth = loss_and_grads("reference", x, w, y, s=16.0)
    ours = loss_and_grads("triton", x.float(), w.float(), y, s=16.0)
    # TF32 keeps ~10 mantissa bits in the products (exact in the interpreter)
    for a, b in zip(ours, truth):
        assert rel_err(a, b) <= 1e-2


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    x, w, y = make(200, 3000, 64, seed=17, ignore=4, dtype=torch.float32)
    x, w, y = x.cuda().requires_grad_(True), w.cuda().requires_grad_(True), y.cuda()

    def step():
        loss = ik.cm_margin_loss(x, w, y, backend="triton", margin="arcface")
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
