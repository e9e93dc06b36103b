"""The triton backend of the IDID-R1 loss (idid_kernels/triton/idid_loss.py) against the float64
reference: float64 agreement and gradcheck, float32 tolerances, every switch, imbalanced label
layouts, the deterministic (atomic-free) dW reduction against the atomic one, bitwise repeatability,
the op plumbing (opcheck, torch.compile) and low precision.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)
at tiny shapes whose sizes are not multiples of the interpreter's 8-wide blocks, so every row, class
and feature loop runs partial tiles. With a GPU the same tests run natively at larger sizes, plus
bfloat16 (Triton's interpreter multiplies bfloat16 bit patterns in tl.dot, so bf16 is GPU-only).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends

pytest.importorskip("idid_kernels.triton.idid_loss", reason="triton is not installed")
from idid_kernels import reference as ref

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
F32, F64 = torch.float32, torch.float64
IGNORE = -100
SWITCHES = list(itertools.product([True, False], repeat=4))  # distillation, diversity, adaptive, balanced
HALF = [torch.float16, torch.bfloat16] if GPU else [torch.float16]

# (B, C, d): 1, primes, sizes around the block sizes (interpreter blocks: 8 rows/classes, 32 features).
SHAPES = [(1, 2, 3), (6, 5, 16), (19, 13, 33)] if not GPU else [(1, 2, 3), (67, 65, 129), (257, 1001, 64),
                                                                 (1031, 127, 512)]
MID = (19, 13, 16) if not GPU else (257, 129, 96)      # label patterns: 3 row blocks, 2 class tiles
SMALL = (11, 5, 16) if not GPU else (131, 33, 40)       # the switch sweep
SPLIT = (19, 5, 16) if not GPU else (257, 129, 96)      # several dW row splits (8 rows each when interpreted)


def _kw(distillation=True, diversity=True, adaptive_weight=True, class_balanced=True, **extra):
    kw = dict(alpha=8.0, tau=1.3, t=2.0, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.6, class_balanced=class_balanced)
    kw.update(extra)
    return kw


def _inputs(seed, labels, c, d, dtype=F64):
    """(x, proxies, similarity) drawn in float64 on the CPU, then cast and moved; labels as a tensor."""
    g = make_gen(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    tensors = (torch.randn(len(labels), d, generator=g, dtype=F64), torch.randn(c, d, generator=g, dtype=F64),
               torch.randn(c, c, generator=g, dtype=F64))
    return [t.to(device=DEV, dtype=dtype).requires_grad_(True) for t in tensors], labels.to(DEV)


def _run(backend, tensors, labels, upstream=(1.0, 0.0, 0.0), **kw):
    """(terms, (dx, dproxies, dsim)) of upstream . (loss, l_ic, l_id)."""
    terms = ik.idid_loss(*tensors, labels, return_terms=True, backend=backend, **kw)
    total = sum(w * v for w, v in zip(upstream, terms[:3]) if w != 0.0)
    grads = torch.autograd.grad(total, tensors, allow_unused=True, materialize_grads=True)
    return terms, grads


def _fresh(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _compare(tensors, labels, dtype, loss_tol, grad_tol, upstream=(1.0, 0.0, 0.0), **kw):
    """triton in ``dtype`` against the float64 reference; returns the worst (loss, grad) errors."""
    truth, truth_grads = _run("reference", _fresh(tensors, F64), labels, upstream, **kw)
    ours, grads = _run("triton", _fresh(tensors, dtype), labels, upstream, **kw)
    assert all(v.dtype == dtype for v in ours) and all(g.dtype == dtype for g in grads)
    loss_err = max(rel_err(a, b) for a, b in zip(ours, truth))
    grad_err = max(rel_err(a, b) for a, b in zip(grads, truth_grads))
    assert loss_err <= loss_tol, (loss_err, ours, truth)
    assert grad_err <= grad_tol, [rel_err(a, b) for a, b in zip(grads, truth_grads)]
    return loss_err, grad_err


def _labels(pattern, b, c, g):
    if pattern == "mixed":
        return torch.randint(0, c, (b,), generator=g)
    if pattern == "singletons":  # every class at most once (b <= c)
        return torch.randperm(c, generator=g)[:b]
    if pattern == "one_class":
        return torch.full((b,), c - 1, dtype=torch.long)
    if pattern == "absent_class":
        return torch.randint(0, c - 1, (b,), generator=g)  # class c - 1 never appears
    if pattern == "imbalanced":  # one class holds 90% of the rows, the rest mostly singletons
        y = torch.randint(1, c, (b,), generator=g)
        y[torch.randperm(b, generator=g)[: (9 * b) // 10]] = 0
        return y
    raise ValueError(pattern)


def test_ops_registered_and_backend_selection():
    import idid_kernels.triton.idid_loss  # noqa: F401  (registers the ops)
    assert hasattr(torch.ops.idid_kernels, "triton_idid_loss_forward")
    assert hasattr(torch.ops.idid_kernels, "triton_idid_loss_backward")
    assert "triton" in _backends.IMPLEMENTED["idid_loss"]
    assert _backends.select_backend("idid_loss", "triton", DEV) == "triton"
    auto = _backends.select_backend("idid_loss", "auto", DEV)
    # The interpreter is for tests: "auto" never picks it on the CPU; on a GPU "auto" stays on the
    # reference until the GPU kernels have passed this suite natively (see _backends._PREFERENCE).
    assert auto == ("reference" if GPU else ("cpp" if "cpp" in ik.available_backends() else "reference"))


# ------------------------------------------------------------------------------------------------
# float64: every switch against the reference, gradcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switches", SWITCHES)
def test_float64_switches_match_reference(switches):
    b, c, d = SMALL
    g = make_gen(1)
    labels = _labels("mixed", b, c, g)
    labels[0], labels[-1] = IGNORE, c - 1  # an ignored row and a singleton-prone last class
    tensors, labels = _inputs(2, labels, c, d)
    _compare(tensors, labels, F64, 1e-12, 1e-10, upstream=(0.7, -0.4, 1.3), **_kw(*switches))


GRADCHECK_LABELS = [0, 1, 0, 2, 1, 0, IGNORE, 3]  # class 4 absent, 2 and 3 singletons


@pytest.mark.parametrize("distillation,class_balanced", [(True, True), (False, False)])
def test_gradcheck_float64_terms(distillation, class_balanced):
    """l_ic and l_id are differentiable outputs: finite differences of both against the kernels'
    backward (fast mode: a random projection of the Jacobian)."""
    tensors, labels = _inputs(3, GRADCHECK_LABELS, c=5, d=3)
    kw = _kw(distillation=distillation, class_balanced=class_balanced)

    def terms(a, b, c):
        out = ik.idid_loss(a, b, c, labels, return_terms=True, backend="triton", **kw)
        return out.l_ic, out.l_id

    assert torch.autograd.gradcheck(terms, tuple(tensors), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_float64_full_jacobian():
    """The whole Jacobian in x of the loss with a fixed diversity weight (the adaptive one is detached
    by design, so only the fixed-weight total is a differentiable function); proxies and similarity
    are constants here (every input is covered by the fast-mode checks above)."""
    tensors, labels = _inputs(4, [0, 1, 0, 2, IGNORE, 1], c=3, d=2)
    x, proxies, sim = tensors
    kw = _kw(adaptive_weight=False)
    assert torch.autograd.gradcheck(lambda a: ik.idid_loss(a, proxies.detach(), sim.detach(), labels,
                                                           backend="triton", **kw),
                                    (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# float32 against the float64 reference: label layouts, shapes, scales
# ------------------------------------------------------------------------------------------------

PATTERNS = ["mixed", "singletons", "one_class", "absent_class", "imbalanced"]


@pytest.mark.parametrize("pattern,ignore", [(p, i) for p in PATTERNS for i in ("none", "some")]
                         + [("mixed", "all")])
def test_float32_label_patterns(pattern, ignore):
    b, c, d = MID
    g = make_gen(5)
    labels = _labels(pattern, min(b, c) if pattern == "singletons" else b, c, g)
    n = len(labels)
    if ignore == "some":
        labels[torch.randperm(n, generator=g)[: max(1, n // 4)]] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    tensors, labels = _inputs(6, labels, c, d)
    _compare(tensors, labels, F32, 1e-5, 1e-4, upstream=(1.0, 0.5, -0.25), **_kw())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-C%d-d%d" % s)
def test_float32_shapes(shape):
    b, c, d = shape
    g = make_gen(7 + b)
    tensors, labels = _inputs(8, _labels("mixed", b, c, g), c, d)
    _compare(tensors, labels, F32, 1e-5, 1e-4, **_kw(alpha=16.0, tau=1.0))


@pytest.mark.parametrize("alpha,tau,t", [(30.0, 0.5, 1.0), (64.0, 2.0, 4.0), (1.0, 1.0, 0.5)])
def test_float32_scales_and_temperatures(alpha, tau, t):
    b, c, d = SMALL
    g = make_gen(9)
    tensors, labels = _inputs(10, _labels("imbalanced", b, c, g), c, d)
    _compare(tensors, labels, F32, 1e-5, 1e-4, upstream=(1.0, 0.3, 0.2), **_kw(alpha=alpha, tau=tau, t=t))


@pytest.mark.skipif(not GPU, reason="C > 65536 takes hours in Triton's interpreter; runs natively on a GPU")
def test_float32_more_than_65536_classes():
    c, b, d = 70001, 64, 32
    g = make_gen(11)
    labels = torch.randint(0, 8, (b,), generator=g) * 9973 % c  # few classes present, several rows each
    labels[:3] = IGNORE
    x = torch.randn(b, d, generator=g, dtype=F64).to(DEV)
    proxies = torch.randn(c, d, generator=g, dtype=F64).to(DEV)
    # No distillation: a (C, C) teacher would need 20 GB; the similarity is a stride-0 constant.
    sim = torch.zeros(1, 1, dtype=F64, device=DEV).expand(c, c)
    labels, kw = labels.to(DEV), _kw(distillation=False)
    outs = []
    for backend, dtype in (("reference", F64), ("triton", F32)):
        inputs = [x.to(dtype).requires_grad_(True), proxies.to(dtype).requires_grad_(True)]
        terms = ik.idid_loss(*inputs, sim.to(dtype), labels, return_terms=True, backend=backend, **kw)
        outs.append((terms, torch.autograd.grad(terms.loss + 0.5 * terms.l_id, inputs)))
    (truth, truth_grads), (ours, grads) = outs
    assert max(rel_err(a, b_) for a, b_ in zip(ours, truth)) <= 1e-5
    assert max(rel_err(a, b_) for a, b_ in zip(grads, truth_grads)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# properties of spec/idid.md and edge layouts
# ------------------------------------------------------------------------------------------------


def test_two_classes_give_zero_kd_and_zero_similarity_grad():
    tensors, labels = _inputs(13, [0, 1, 1, 0, 1, IGNORE], c=2, d=5)
    with_kd, grads = _run("triton", tensors, labels, **_kw())
    without, _ = _run("triton", tensors, labels, **_kw(distillation=False))
    torch.testing.assert_close(with_kd.l_ic, without.l_ic, rtol=1e-13, atol=0)
    assert torch.equal(grads[2], torch.zeros(2, 2, dtype=F64, device=DEV))


def test_all_singletons_give_zero_lambda_and_l_id():
    tensors, labels = _inputs(14, [4, 0, 2, 1], c=6, d=5)
    out, grads = _run("triton", tensors, labels, upstream=(1.0, 0.0, 1.0), **_kw())
    assert out.lam == 0 and out.l_id == 0
    assert torch.equal(out.loss, out.l_ic)
    _, truth = _run("reference", _fresh(tensors, F64), labels, upstream=(1.0, 0.0, 1.0), **_kw())
    assert max(rel_err(a, b) for a, b in zip(grads, truth)) <= 1e-12


def test_all_ignored_gives_zero_loss_and_grads():
    tensors, labels = _inputs(15, [IGNORE] * 5, c=3, d=4)
    for kw in (_kw(), _kw(adaptive_weight=False)):
        out, grads = _run("triton", tensors, labels, upstream=(1.0, 1.0, 1.0), **kw)
        truth = ref.idid_loss(*tensors, labels, return_terms=True, **kw)
        for a, b in zip(out, truth):
            assert torch.equal(a.detach(), b.detach())
        for gr in grads:
            assert torch.equal(gr, torch.zeros_like(gr))


def test_zero_feature_rows_match_reference():
    tensors, labels = _inputs(16, [0, 1, 0, 2, 1], c=3, d=4)
    with torch.no_grad():
        tensors[0][1].zero_()
        tensors[1][2].zero_()
    _compare(tensors, labels, F64, 1e-12, 1e-10, **_kw())


def test_no_similarity_gradient_unless_needed(monkeypatch):
    """The (C, C) dTheta is formed only with distillation and a similarity that requires grad."""
    from idid_kernels.triton import idid_loss as mod
    spy = _LaunchSpy(mod._dtheta_kernel)
    monkeypatch.setattr(mod, "_dtheta_kernel", spy)
    tensors, labels = _inputs(31, [0, 1, 0, 2, 1], c=3, d=4)
    x, proxies, sim = tensors
    for distillation, needs in ((True, True), (True, False), (False, True)):
        inputs = [x.detach().requires_grad_(True), proxies.detach().requires_grad_(True),
                  sim.detach().requires_grad_(needs)]
        ik.idid_loss(*inputs, labels, backend="triton", **_kw(distillation=distillation)).backward()
        assert (inputs[2].grad is not None) == (distillation and needs)
    assert len(spy.calls) == 1


def test_return_terms():
    tensors, labels = _inputs(17, [0, 1, 0, 2, 1, 0, IGNORE], c=4, d=5)
    out = ik.idid_loss(*tensors, labels, return_terms=True, backend="triton")
    truth = ref.idid_loss(*tensors, labels, return_terms=True)
    assert isinstance(out, ik.IDIDTerms)
    for a, b in zip(out, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.l_ic + out.lam * out.l_id, rtol=1e-14, atol=0)
    assert out.loss.requires_grad and out.l_ic.requires_grad and out.l_id.requires_grad
    assert not out.lam.requires_grad
    plain = ik.idid_loss(*tensors, labels, backend="triton")
    assert torch.equal(plain, out.loss)


@pytest.mark.parametrize("needs", [m for m in itertools.product([True, False], repeat=3) if any(m)])
def test_every_requires_grad_combination(needs):
    tensors, labels = _inputs(18, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0], c=5, d=4)
    kw = _kw()
    ours = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    theirs = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    wanted = lambda ts: [t for t in ts if t.requires_grad]  # noqa: E731
    grads = torch.autograd.grad(ik.idid_loss(*ours, labels, backend="triton", **kw), wanted(ours))
    truth = torch.autograd.grad(ref.idid_loss(*theirs, labels, **kw), wanted(theirs), allow_unused=True,
                                materialize_grads=True)
    assert len(grads) == sum(needs)
    for a, b in zip(grads, truth):
        assert rel_err(a, b) <= 1e-12


def test_no_grad_forward_matches():
    tensors, labels = _inputs(19, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0], c=5, d=4)
    with torch.no_grad():
        out = ik.idid_loss(*tensors, labels, backend="triton", return_terms=True)
    truth = ref.idid_loss(*tensors, labels, return_terms=True)
    assert not out.loss.requires_grad
    for a, b in zip(out, truth):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_inputs_not_modified_and_noncontiguous():
    g = make_gen(20)
    x = torch.randn(20, 12, generator=g).to(DEV)[:, ::2]  # non-contiguous views
    proxies = torch.randn(8, 12, generator=g).to(DEV)[:, 1::2]
    sim = torch.randn(8, 8, generator=g).to(DEV).t()
    assert not x.is_contiguous() and not proxies.is_contiguous() and not sim.is_contiguous()
    labels = torch.randint(0, 8, (20,), generator=g).to(DEV)
    labels[2] = IGNORE
    before = [t.clone() for t in (x, proxies, sim, labels)]
    out, grads = _run("triton", [t.requires_grad_(True) for t in (x, proxies, sim)], labels, **_kw())
    truth, truth_grads = _run("reference", _fresh((x, proxies, sim), F64), labels, **_kw())
    for a, b in zip((x, proxies, sim, labels), before):
        assert torch.equal(a, b)
    assert rel_err(out.loss, truth.loss) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, truth_grads)) <= 1e-4


# ------------------------------------------------------------------------------------------------
# determinism: the atomic-free dW path, bitwise repeatability
# ------------------------------------------------------------------------------------------------


class _LaunchSpy:
    """Wraps a Triton kernel and records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def deterministic():
    """A context manager switching torch.use_deterministic_algorithms on, restored afterwards."""
    import contextlib

    @contextlib.contextmanager
    def on():
        saved = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved)

    return on


def test_deterministic_path_matches_atomic_path(monkeypatch, deterministic):
    from idid_kernels.triton import idid_loss as mod
    b, c, d = SPLIT
    splits, _ = mod._column_splits(b, c, d, DEV)
    assert splits > 1, "the shape must span several row splits for the two dW reductions to differ"
    spy = _LaunchSpy(mod._grad_cols_kernel)
    monkeypatch.setattr(mod, "_grad_cols_kernel", spy)
    g = make_gen(21)
    labels = _labels("imbalanced", b, c, g)
    labels[1] = IGNORE
    tensors, labels = _inputs(22, labels, c, d, dtype=F32)
    upstream = (1.0, 0.3, 0.2)
    atomic = _run("triton", _fresh(tensors, F32), labels, upstream, **_kw())
    with deterministic():
        fixed = _run("triton", _fresh(tensors, F32), labels, upstream, **_kw())
    assert [call["ATOMIC"] for call in spy.calls] == [True, False]
    for a, b_ in zip(atomic[0] + atomic[1], fixed[0] + fixed[1]):
        assert rel_err(a, b_) <= 1e-6
    _, truth = _run("reference", _fresh(tensors, F64), labels, upstream, **_kw())
    assert max(rel_err(a, b_) for a, b_ in zip(fixed[1], truth)) <= 1e-4


def test_bitwise_repeatable_under_deterministic_algorithms(deterministic):
    b, c, d = SPLIT
    g = make_gen(23)
    labels = _labels("mixed", b, c, g)
    labels[:2] = IGNORE
    tensors, labels = _inputs(24, labels, c, d, dtype=F32)
    results = []
    with deterministic():
        for _ in range(2):
            out, grads = _run("triton", _fresh(tensors, F32), labels, upstream=(1.0, 0.3, 0.2), **_kw())
            results.append([v.detach() for v in out] + list(grads))
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


@pytest.mark.skipif(not GPU, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_replays_with_new_features_and_labels():
    """No host synchronisation: forward and backward captured once, then replayed on new features and
    new labels (other class counts, ignored rows) match eager calls on those inputs."""
    b, c, d = MID
    g = make_gen(33)
    first = _labels("mixed", b, c, g)
    second = _labels("imbalanced", b, c, g)
    second[:3] = IGNORE
    tensors, labels = _inputs(34, first, c, d, dtype=F32)
    static = [t.detach().clone().requires_grad_(True) for t in tensors]
    static_labels = labels.clone()
    kw = _kw()

    def step(inputs, y):
        terms = ik.idid_loss(*inputs, y, backend="triton", return_terms=True, **kw)
        return (terms.loss, terms.lam, *torch.autograd.grad(terms.loss, inputs))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotuning and lazy initialisation happen before the capture
            step(static, static_labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static, static_labels)
    new_inputs, new_labels = _inputs(35, second, c, d, dtype=F32)
    with torch.no_grad():
        for st, t in zip(static, new_inputs):
            st.copy_(t)
        static_labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(_fresh(new_inputs, F32), new_labels)
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# low precision, op plumbing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_within_twice_eager_error(dtype):
    b, c, d = MID
    g = make_gen(25)
    tensors, labels = _inputs(26, _labels("imbalanced", b, c, g), c, d)
    kw = _kw()
    truth, truth_grads = _run("reference", _fresh(tensors, F64), labels, **kw)

    def errors(backend):
        out, grads = _run(backend, _fresh(tensors, dtype), labels, **kw)
        assert out.loss.dtype == dtype and all(gr.dtype == dtype for gr in grads)
        return rel_err(out.loss, truth.loss), max(rel_err(a, b_) for a, b_ in zip(grads, truth_grads))

    eager_loss, eager_grad = errors("reference")
    ours_loss, ours_grad = errors("triton")
    assert ours_loss <= 2 * eager_loss + 1e-2
    assert ours_grad <= 2 * eager_grad + 1e-2


def test_tf32_only_on_request(monkeypatch):
    from idid_kernels.triton._idid_common import dot_precision
    monkeypatch.delenv("IDID_KERNELS_TRITON_TF32", raising=False)
    assert dot_precision(F32) == "ieee"
    monkeypatch.setenv("IDID_KERNELS_TRITON_TF32", "1")
    assert dot_precision(F32) == "tf32"
    tensors, labels = _inputs(27, [0, 1, 0, 2, 1], c=3, d=8, dtype=F32)
    # TF32 rounds the cosines' inputs to 10 mantissa bits (~1e-3); the loss stays close.
    _compare(tensors, labels, F32, 1e-2, 1e-1, **_kw())


def _op_args(dtype, distillation=True):
    g = make_gen(28)
    x = torch.randn(9, 6, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    proxies = torch.randn(5, 6, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    sim = torch.randn(5, 5, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 4, 0], device=DEV)
    return (x, proxies, sim, labels, 8.0, 1.3, 2.0, 1e-8, distillation, True, True, 0.6, True, IGNORE)


@pytest.mark.parametrize("distillation", [True, False])
def test_opcheck_forward(distillation):
    import idid_kernels.triton.idid_loss  # noqa: F401
    torch.library.opcheck(torch.ops.idid_kernels.triton_idid_loss_forward.default, _op_args(F32, distillation))


def test_opcheck_backward():
    import idid_kernels.triton.idid_loss  # noqa: F401
    fwd = torch.ops.idid_kernels.triton_idid_loss_forward.default
    bwd = torch.ops.idid_kernels.triton_idid_loss_backward.default
    args = _op_args(F32)
    with torch.no_grad():
        _, _, _, lam, row_stats, x_norm, w_norm, teacher, layout, offsets = fwd(*args)
    grad_ic = torch.tensor(0.8, device=DEV)
    for similarity_grad in (True, False):
        torch.library.opcheck(bwd, (grad_ic, grad_ic * lam, args[0].detach(), args[1].detach(), row_stats, x_norm,
                                    w_norm, teacher, layout, offsets, 8.0, 1.3, 2.0, True, True, similarity_grad))


def test_compile_fullgraph_matches_eager():
    def f(x, proxies, sim, labels):
        out = ik.idid_loss(x, proxies, sim, labels, backend="triton", return_terms=True, tau=1.3)
        return out.loss + 0.5 * out.l_id

    tensors, labels = _inputs(29, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0, 3], c=5, d=6, dtype=F32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*tensors, labels)
    grads = torch.autograd.grad(out, tensors)
    eager_in = _fresh(tensors, F32)
    eager = f(*eager_in, labels)
    eager_grads = torch.autograd.grad(eager, eager_in)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_double_backward_is_refused():
    tensors, labels = _inputs(30, [0, 1, 0, 2], c=3, d=4)
    loss = ik.idid_loss(*tensors, labels, backend="triton")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, tensors, create_graph=True)
