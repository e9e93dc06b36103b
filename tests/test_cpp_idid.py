"""The C++ CPU backend of the IDID-R1 loss (idid_kernels::idid_loss_forward/backward) against the
float64 reference: gradcheck, float32 and half accuracy, label patterns, chunk boundaries, the op
plumbing (opcheck, torch.compile), determinism and no in-place writes."""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends
from idid_kernels import reference as ref

if "cpp" not in ik.available_backends():
    if os.environ.get("IDID_KERNELS_REQUIRE_EXT") == "1":  # .ci/run: a missing extension is a failure
        pytest.fail(f"the cpp backend is required but missing: {_backends.missing('cpp')}", pytrace=False)
    pytest.skip("idid_kernels._C is not built (IDID_KERNELS_NO_EXT)", allow_module_level=True)

from idid_kernels.ops.idid_loss import chunk_rows  # noqa: E402  (needs the extension loaded)

F64 = torch.float64
IGNORE = -100
SWITCHES = list(itertools.product([True, False], repeat=4))  # distillation, diversity, adaptive, balanced
FWD = torch.ops.idid_kernels.idid_loss_forward.default
BWD = torch.ops.idid_kernels.idid_loss_backward.default


def _kw(distillation=True, diversity=True, adaptive_weight=True, class_balanced=True, **extra):
    kw = dict(alpha=8.0, tau=1.3, t=2.0, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.6, class_balanced=class_balanced)
    kw.update(extra)
    return kw


def _inputs(seed, labels, c, d, dtype=F64):
    g = make_gen(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    x = torch.randn(len(labels), d, generator=g, dtype=F64)
    proxies = torch.randn(c, d, generator=g, dtype=F64)
    sim = torch.randn(c, c, generator=g, dtype=F64)
    return [t.to(dtype).requires_grad_(True) for t in (x, proxies, sim)], labels


def _run(backend, tensors, labels, upstream=(1.0, 0.0, 0.0), **kw):
    """(terms, (dx, dproxies, dsim)) of upstream . (loss, l_ic, l_id)."""
    terms = ik.idid_loss(*tensors, labels, return_terms=True, backend=backend, **kw)
    total = sum(w * v for w, v in zip(upstream, terms[:3]) if w != 0.0)
    grads = torch.autograd.grad(total, tensors, allow_unused=True, materialize_grads=True)
    return terms, grads


def _compare_to_reference(tensors, labels, dtype, loss_tol, grad_tol, upstream=(1.0, 0.0, 0.0), **kw):
    """cpp in ``dtype`` against the float64 reference; returns the worst (loss, grad) errors."""
    ref64 = [t.detach().to(F64).requires_grad_(True) for t in tensors]
    truth, truth_grads = _run("reference", ref64, labels, upstream, **kw)
    ours_in = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    ours, grads = _run("cpp", ours_in, labels, upstream, **kw)
    for v in ours:
        assert v.dtype == dtype
    for gr in grads:
        assert gr.dtype == dtype
    loss_err = max(rel_err(a, b) for a, b in zip(ours, truth))
    grad_err = max(rel_err(a, b) for a, b in zip(grads, truth_grads))
    assert loss_err <= loss_tol, (loss_err, ours, truth)
    assert grad_err <= grad_tol, grad_err
    return loss_err, grad_err


def _gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_ops_registered_and_auto_picks_cpp():
    assert hasattr(torch.ops.idid_kernels, "idid_loss_forward")
    assert hasattr(torch.ops.idid_kernels, "idid_loss_backward")
    assert _backends.select_backend("idid_loss", "auto", torch.device("cpu")) == "cpp"


# ------------------------------------------------------------------------------------------------
# float64: gradcheck and agreement with the reference's autograd
# ------------------------------------------------------------------------------------------------

GRADCHECK_LABELS = [0, 1, 0, 2, 1, 0, IGNORE, 4, 0]  # class 3 absent, class 2 and 4 singletons


@pytest.mark.parametrize("distillation,diversity,adaptive_weight,class_balanced", SWITCHES)
def test_gradcheck_float64(distillation, diversity, adaptive_weight, class_balanced):
    tensors, labels = _inputs(10, GRADCHECK_LABELS, c=5, d=4)
    kw = _kw(distillation, diversity, adaptive_weight, class_balanced)

    def terms(a, b, c):
        out = ik.idid_loss(a, b, c, labels, return_terms=True, backend="cpp", **kw)
        return out.l_ic, out.l_id

    # l_ic and l_id are differentiable outputs of the op: gradcheck both, whatever the switches.
    _gradcheck(terms, tuple(tensors))
    if adaptive_weight and diversity:
        # lambda = stopgrad(L_IC) / (stopgrad(L_ID) + eps): the total is not differentiable by finite
        # differences by design; its gradient must be g(l_ic) + lam g(l_id), as autograd of the reference.
        out, grads = _run("cpp", tensors, labels, **kw)
        assert out.lam > 0 and not out.lam.requires_grad
        _, ref_grads = _run("reference", [t.detach().clone().requires_grad_(True) for t in tensors], labels, **kw)
        for a, b in zip(grads, ref_grads):
            assert rel_err(a, b) <= 1e-12
    else:
        _gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend="cpp", **kw), tuple(tensors))


def test_gradcheck_large_class_and_chunks():
    """A class above the pairwise-dot size (GEMM path of the diversity term), 3-row chunks."""
    labels = [0] * 35 + [1, 2, 1, IGNORE]
    tensors, labels = _inputs(11, labels, c=4, d=3)
    kw = _kw(adaptive_weight=False)
    with chunk_rows(3):
        _gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend="cpp", **kw), tuple(tensors))


@pytest.mark.parametrize("switches", SWITCHES)
def test_float64_matches_reference_with_random_upstream(switches):
    tensors, labels = _inputs(12, [3, 1, 0, 3, 3, IGNORE, 1, 5, 0, 3, 6], c=7, d=6)
    upstream = (0.7, -0.4, 1.3)
    _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, upstream=upstream, **_kw(*switches))


# ------------------------------------------------------------------------------------------------
# float32 against the float64 reference: label patterns and shapes
# ------------------------------------------------------------------------------------------------


def _labels(pattern, b, c, g):
    if pattern == "mixed":
        return torch.randint(0, c, (b,), generator=g)
    if pattern == "singletons":
        return torch.randperm(c, generator=g)[:b]
    if pattern == "one_class":
        return torch.full((b,), c - 1, dtype=torch.long)
    if pattern == "absent_class":
        return torch.randint(0, c - 1, (b,), generator=g)  # class c - 1 never appears
    if pattern == "imbalanced":  # one class holds 90% of the rows
        y = torch.randint(1, c, (b,), generator=g)
        y[torch.randperm(b, generator=g)[: (9 * b) // 10]] = 0
        return y
    raise ValueError(pattern)


PATTERNS = ["mixed", "singletons", "one_class", "absent_class", "imbalanced"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_float32_label_patterns(pattern, ignore):
    g = make_gen(20)
    b, c = 60, 64
    labels = _labels(pattern, b, c, g)
    if ignore == "some":
        labels[torch.randperm(b, generator=g)[:7]] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    tensors, labels = _inputs(21, labels, c=c, d=24)
    _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, upstream=(1.0, 0.5, -0.25), **_kw())


@pytest.mark.parametrize("switches", SWITCHES)
def test_float32_switches(switches):
    g = make_gen(22)
    labels = _labels("imbalanced", 90, 17, g)
    labels[3] = IGNORE
    tensors, labels = _inputs(23, labels, c=17, d=32)
    _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **_kw(*switches))


@pytest.mark.parametrize("alpha,tau,t", [(16.0, 1.0, 2.0), (30.0, 0.5, 1.0), (64.0, 2.0, 4.0), (1.0, 1.0, 0.5)])
def test_float32_scales_and_temperatures(alpha, tau, t):
    g = make_gen(24)
    labels = _labels("mixed", 70, 23, g)
    tensors, labels = _inputs(25, labels, c=23, d=16)
    _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **_kw(alpha=alpha, tau=tau, t=t))


def test_float32_default_chunk_larger_shape():
    g = make_gen(26)
    labels = _labels("imbalanced", 257, 1001, g)
    labels[:5] = IGNORE
    tensors, labels = _inputs(27, labels, c=1001, d=64)
    _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **_kw(alpha=16.0, tau=1.0))


@pytest.mark.parametrize("b,c", [(1, 2), (1, 5), (2, 2), (6, 2), (9, 3)])
def test_float32_tiny_shapes(b, c):
    g = make_gen(28 + b + c)
    tensors, labels = _inputs(29, _labels("mixed", b, c, g), c=c, d=5)
    _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **_kw())


CHUNK = 8


@pytest.mark.parametrize("b", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1])
@pytest.mark.parametrize("c", [CHUNK - 1, CHUNK, CHUNK + 1])
def test_chunk_boundaries(b, c):
    """Forced 8-row chunks: B and C around the chunk size, float64 exact vs the reference and
    float32 within tolerance; the result does not depend on the chunking beyond rounding."""
    g = make_gen(30 + b * c)
    labels = _labels("mixed", b, c, g)
    tensors, labels = _inputs(31, labels, c=c, d=7)
    kw = _kw()
    with chunk_rows(CHUNK):
        _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, **kw)
        _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **kw)
        small = _run("cpp", tensors, labels, **kw)
    whole = _run("cpp", tensors, labels, **kw)
    for a, b_ in zip(small[0][:3] + small[1], whole[0][:3] + whole[1]):
        assert rel_err(a, b_) <= 1e-13


@pytest.mark.parametrize("n", [31, 32, 33, 2 * CHUNK + 1])
def test_class_size_around_pairwise_limit(n):
    """Classes of 31-33 rows straddle the switch from pairwise dots to GEMM blocks (32 rows); with
    8-row chunks the Gram blocks of the large class split too."""
    labels = [0] * n + [1] * 3 + [2]
    tensors, labels = _inputs(32 + n, labels, c=4, d=9)
    for rows in (0, CHUNK):
        with chunk_rows(rows):
            _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, **_kw(adaptive_weight=False))
            _compare_to_reference(tensors, labels, torch.float32, 1e-5, 1e-4, **_kw())


# ------------------------------------------------------------------------------------------------
# properties of spec/idid.md on this backend
# ------------------------------------------------------------------------------------------------


def test_c2_gives_zero_kd_and_zero_similarity_grad():
    tensors, labels = _inputs(40, [0, 1, 1, 0, 1, IGNORE], c=2, d=5)
    with_kd, grads = _run("cpp", tensors, labels, **_kw())
    without, _ = _run("cpp", tensors, labels, **_kw(distillation=False))
    torch.testing.assert_close(with_kd.l_ic, without.l_ic, rtol=1e-13, atol=0)
    assert torch.equal(grads[2], torch.zeros(2, 2, dtype=F64))


def test_all_singletons_give_zero_lambda_and_l_id():
    tensors, labels = _inputs(41, [4, 0, 2, 1], c=6, d=5)
    out, grads = _run("cpp", tensors, labels, **_kw())
    assert out.lam == 0 and out.l_id == 0
    torch.testing.assert_close(out.loss, out.l_ic, rtol=0, atol=0)


def test_all_ignored_gives_zero_loss_and_grads():
    tensors, labels = _inputs(42, [IGNORE] * 5, c=3, d=4)
    for kw in (_kw(), _kw(adaptive_weight=False)):
        out, grads = _run("cpp", tensors, labels, upstream=(1.0, 1.0, 1.0), **kw)
        truth = ref.idid_loss(*tensors, labels, return_terms=True, **kw)
        for a, b in zip(out, truth):
            assert torch.equal(a.detach(), b.detach())
        for gr in grads:
            assert torch.equal(gr, torch.zeros_like(gr))


def test_zero_feature_row_matches_reference():
    tensors, labels = _inputs(43, [0, 1, 0, 2, 1], c=3, d=4)
    with torch.no_grad():
        tensors[0][1].zero_()
        tensors[1][2].zero_()
    _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, **_kw())


def test_return_terms():
    tensors, labels = _inputs(44, [0, 1, 0, 2, 1, 0, IGNORE], c=4, d=5)
    out = ik.idid_loss(*tensors, labels, return_terms=True, backend="cpp")
    truth = ref.idid_loss(*tensors, labels, return_terms=True)
    assert isinstance(out, ik.IDIDTerms)
    for a, b in zip(out, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.l_ic + out.lam * out.l_id, rtol=1e-14, atol=0)
    assert out.loss.requires_grad and out.l_ic.requires_grad and out.l_id.requires_grad
    assert not out.lam.requires_grad
    plain = ik.idid_loss(*tensors, labels, backend="cpp")
    assert torch.equal(plain, out.loss)


# ------------------------------------------------------------------------------------------------
# low precision, determinism, inputs, op plumbing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_within_twice_eager_error(dtype):
    g = make_gen(50)
    tensors, labels = _inputs(51, _labels("imbalanced", 48, 11, g), c=11, d=16)
    kw = _kw()
    ref64 = [t.detach().requires_grad_(True) for t in tensors]
    truth, truth_grads = _run("reference", ref64, labels, **kw)

    def errors(backend):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
        out, grads = _run(backend, inputs, labels, **kw)
        assert out.loss.dtype == dtype and all(gr.dtype == dtype for gr in grads)
        return rel_err(out.loss, truth.loss), max(rel_err(a, b) for a, b in zip(grads, truth_grads))

    eager_loss, eager_grad = errors("reference")
    ours_loss, ours_grad = errors("cpp")
    assert ours_loss <= 2 * eager_loss + 1e-2
    assert ours_grad <= 2 * eager_grad + 1e-2


def test_bitwise_deterministic():
    g = make_gen(52)
    labels = _labels("imbalanced", 300, 97, g)
    labels[:4] = IGNORE
    tensors, labels = _inputs(53, labels, c=97, d=40, dtype=torch.float32)
    results = []
    for _ in range(3):
        with chunk_rows(64):
            inputs = [t.detach().clone().requires_grad_(True) for t in tensors]
            out, grads = _run("cpp", inputs, labels, upstream=(1.0, 0.3, 0.2), **_kw())
        results.append([v.detach() for v in out] + list(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_inputs_not_modified_and_noncontiguous():
    g = make_gen(54)
    base = torch.randn(20, 12, generator=g)
    x = base[:, ::2]  # non-contiguous
    proxies = torch.randn(8, 12, generator=g)[:, 1::2]
    sim = torch.randn(8, 8, generator=g).t()
    labels = torch.randint(0, 8, (20,), generator=g)
    labels[2] = IGNORE
    before = [t.clone() for t in (x, proxies, sim, labels)]
    xs = [t.requires_grad_(True) for t in (x, proxies, sim)]
    out, grads = _run("cpp", xs, labels, **_kw())
    truth, truth_grads = _run("reference", [t.detach().clone().requires_grad_(True) for t in (x, proxies, sim)],
                              labels, **_kw())
    for a, b in zip((x, proxies, sim, labels), before):
        assert torch.equal(a, b)
    assert rel_err(out.loss, truth.loss) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(grads, truth_grads)) <= 1e-4


@pytest.mark.parametrize("needs", [m for m in itertools.product([True, False], repeat=3) if any(m)])
def test_every_requires_grad_combination(needs):
    tensors, labels = _inputs(57, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0], c=5, d=4)
    kw = _kw()
    ours = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    theirs = [t.detach().clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    wanted = lambda ts: [t for t in ts if t.requires_grad]  # noqa: E731
    grads = torch.autograd.grad(ik.idid_loss(*ours, labels, backend="cpp", **kw), wanted(ours))
    truth = torch.autograd.grad(ref.idid_loss(*theirs, labels, **kw), wanted(theirs), allow_unused=True,
                                materialize_grads=True)
    for a, b in zip(grads, truth):
        assert rel_err(a, b) <= 1e-12


def test_no_grad_forward_matches():
    tensors, labels = _inputs(58, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0], c=5, d=4)
    with torch.no_grad():
        out = ik.idid_loss(*tensors, labels, backend="cpp", return_terms=True)
    truth = ref.idid_loss(*tensors, labels, return_terms=True)
    assert not out.loss.requires_grad
    for a, b in zip(out, truth):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def _op_args(dtype, distillation=True):
    g = make_gen(55)
    x = torch.randn(9, 6, generator=g, dtype=dtype, requires_grad=True)
    proxies = torch.randn(5, 6, generator=g, dtype=dtype, requires_grad=True)
    sim = torch.randn(5, 5, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 4, 0])
    return (x, proxies, sim, labels, 8.0, 1.3, 2.0, 1e-8, distillation, True, True, 0.6, True, IGNORE, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distillation", [True, False])
def test_opcheck(dtype, distillation):
    args = _op_args(dtype, distillation)
    torch.library.opcheck(FWD, args)
    with torch.no_grad():
        _, _, _, lam, row_stats, x_norm, w_norm, teacher = FWD(*args)
    x, proxies, _, labels = args[:4]
    grad_ic = torch.tensor(0.8, dtype=dtype)
    grad_id = torch.tensor(0.8, dtype=dtype) * lam
    bwd_args = (grad_ic, grad_id, x.detach(), proxies.detach(), labels, row_stats, x_norm, w_norm, teacher,
                8.0, 1.3, 2.0, distillation, True, IGNORE, 0)
    torch.library.opcheck(BWD, bwd_args)


def test_compile_fullgraph_matches_eager():
    def f(x, proxies, sim, labels):
        out = ik.idid_loss(x, proxies, sim, labels, backend="cpp", return_terms=True)
        return out.loss + 0.5 * out.l_id

    tensors, labels = _inputs(56, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0, 3], c=5, d=6, dtype=torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*tensors, labels)
    grads = torch.autograd.grad(out, tensors)
    eager_in = [t.detach().clone().requires_grad_(True) for t in tensors]
    eager = f(*eager_in, labels)
    eager_grads = torch.autograd.grad(eager, eager_in)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_op_rejects_bad_labels_directly():
    args = list(_op_args(torch.float32))
    args[3] = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 5, 0])  # 5 is outside [0, 5)
    with pytest.raises(RuntimeError, match="outside"):
        FWD(*args)
