"""The ``cuda`` backend of the IDID-R1 loss (idid_kernels::idid_loss_forward/backward on CUDA tensors)
against the float64 reference: float64 gradcheck, float32 tolerances for every switch and label
pattern, imbalanced and ignored rows, chunk and block boundaries, half dtypes, bitwise determinism,
opcheck, torch.compile, no host synchronisation and CUDA-graph capture.

GPU-only: the whole module is skipped where torch sees no CUDA device, since these kernels cannot run
on a CPU (CPU-only machines check that they compile with nvcc instead; the driver they share with the
cpp backend is exercised by tests/test_cpp_idid.py). On a machine with a GPU it runs as is:
``python -m pytest -q tests/test_cuda_idid.py`` after building the extension with a CUDA build of
torch and nvcc on PATH.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends
from idid_kernels import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU-only test: no CUDA device is visible to torch, and the CUDA kernels "
                                       "cannot run without one")

DEV = torch.device("cuda")
F64 = torch.float64
IGNORE = -100
OUT_TOL, GRAD_TOL = 1e-5, 1e-4  # float32 vs the float64 oracle (ARCHITECTURE.md)
SWITCHES = list(itertools.product([True, False], repeat=4))  # distillation, diversity, adaptive, balanced


@pytest.fixture(autouse=True)
def _full_precision_float32_matmul():
    # TF32 GEMMs give ~1e-3 cosines, outside the float32 contract (README, Numerics).
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _chunk_rows(rows):
    from idid_kernels.ops.idid_loss import chunk_rows  # needs the extension loaded
    return chunk_rows(rows)


def FWD(*args):
    return torch.ops.idid_kernels.idid_loss_forward.default(*args)


def BWD(*args):
    return torch.ops.idid_kernels.idid_loss_backward.default(*args)


def _kw(distillation=True, diversity=True, adaptive_weight=True, class_balanced=True, **extra):
    kw = dict(alpha=8.0, tau=1.3, t=2.0, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.6, class_balanced=class_balanced)
    kw.update(extra)
    return kw


def _inputs(seed, labels, c, d):
    """float64 CPU leaves (x, proxies, similarity) and int64 CPU labels."""
    g = make_gen(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    x = torch.randn(len(labels), d, generator=g, dtype=F64)
    proxies = torch.randn(c, d, generator=g, dtype=F64)
    sim = torch.randn(c, c, generator=g, dtype=F64)
    return [x, proxies, sim], labels


def _run(backend, tensors, labels, dtype, device, upstream=(1.0, 0.0, 0.0), **kw):
    """(terms, (dx, dproxies, dsim)) of upstream . (loss, l_ic, l_id) for copies of ``tensors`` in
    ``dtype`` on ``device``; results stay on ``device``."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    terms = ik.idid_loss(*leaves, labels.to(device), return_terms=True, backend=backend, **kw)
    total = sum(w * v for w, v in zip(upstream, terms[:3]) if w != 0.0)
    grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return terms, grads


def _compare_to_reference(tensors, labels, dtype, loss_tol, grad_tol, upstream=(1.0, 0.0, 0.0), **kw):
    """cuda in ``dtype`` against the float64 reference on the CPU; returns the worst errors."""
    truth, truth_grads = _run("reference", tensors, labels, F64, "cpu", upstream, **kw)
    ours, grads = _run("cuda", tensors, labels, dtype, DEV, upstream, **kw)
    for v in list(ours) + list(grads):
        assert v.dtype == dtype and v.device.type == "cuda"
    loss_err = max(rel_err(a.cpu(), b) for a, b in zip(ours, truth))
    grad_err = max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads))
    assert loss_err <= loss_tol, (loss_err, ours, truth)
    assert grad_err <= grad_tol, grad_err
    return loss_err, grad_err


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


def test_registered_and_auto_leaves_unverified_cuda_alone():
    assert _backends.missing("cuda") is None, _backends.missing("cuda")
    assert "cuda" in _backends.IMPLEMENTED["idid_loss"]
    # Until these kernels have passed this file on a GPU, "auto" does not pick them (README, Status).
    assert _backends.select_backend("idid_loss", "auto", DEV) == "reference"
    assert _backends.select_backend("idid_loss", "cuda", DEV) == "cuda"


# ------------------------------------------------------------------------------------------------
# float64: gradcheck, agreement with the reference's autograd and with the cpp backend
# ------------------------------------------------------------------------------------------------

GRADCHECK_LABELS = [0, 1, 0, 2, 1, 0, IGNORE, 4, 0]  # class 3 absent, classes 2 and 4 singletons


@pytest.mark.parametrize("distillation,diversity,adaptive_weight,class_balanced", SWITCHES)
def test_gradcheck_float64(distillation, diversity, adaptive_weight, class_balanced):
    tensors, labels = _inputs(10, GRADCHECK_LABELS, c=5, d=4)
    leaves = tuple(t.to(DEV).requires_grad_(True) for t in tensors)
    labels = labels.to(DEV)
    kw = _kw(distillation, diversity, adaptive_weight, class_balanced)

    def terms(a, b, c):
        out = ik.idid_loss(a, b, c, labels, return_terms=True, backend="cuda", **kw)
        return out.l_ic, out.l_id

    assert torch.autograd.gradcheck(terms, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    if not (adaptive_weight and diversity):  # with the adaptive weight the total is stop-gradient by design
        assert torch.autograd.gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend="cuda", **kw), leaves,
                                        eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_float64_classes_across_chunks():
    # 3-row chunks: the 35-row class spans twelve chunks (its teacher-gradient run continues from
    # chunk to chunk) and is larger than one 32-row tile of the diversity pull.
    tensors, labels = _inputs(11, [0] * 35 + [1, 2, 1, IGNORE], c=4, d=3)
    leaves = tuple(t.to(DEV).requires_grad_(True) for t in tensors)
    labels = labels.to(DEV)
    kw = _kw(adaptive_weight=False)
    with _chunk_rows(3):
        assert torch.autograd.gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend="cuda", **kw), leaves,
                                        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("switches", SWITCHES)
def test_float64_matches_reference_with_random_upstream(switches):
    tensors, labels = _inputs(12, [3, 1, 0, 3, 3, IGNORE, 1, 5, 0, 3, 6], c=7, d=6)
    _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, upstream=(0.7, -0.4, 1.3), **_kw(*switches))


@pytest.mark.parametrize("switches", SWITCHES)
def test_float64_matches_cpp_backend(switches):
    g = make_gen(13)
    labels = _labels("imbalanced", 70, 13, g)
    labels[[2, 9]] = IGNORE
    tensors, labels = _inputs(14, labels, c=13, d=20)
    kw = _kw(*switches)
    cpp, cpp_grads = _run("cpp", tensors, labels, F64, "cpu", (1.0, 0.5, -0.25), **kw)
    ours, grads = _run("cuda", tensors, labels, F64, DEV, (1.0, 0.5, -0.25), **kw)
    for a, b in zip(ours, cpp):
        assert rel_err(a.cpu(), b) <= 1e-13
    for a, b in zip(grads, cpp_grads):
        assert rel_err(a.cpu(), b) <= 1e-12


# ------------------------------------------------------------------------------------------------
# float32 against the float64 reference: label patterns, switches, shapes
# ------------------------------------------------------------------------------------------------


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
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, upstream=(1.0, 0.5, -0.25), **_kw())


@pytest.mark.parametrize("switches", SWITCHES)
def test_float32_switches(switches):
    g = make_gen(22)
    labels = _labels("imbalanced", 90, 17, g)
    labels[3] = IGNORE
    tensors, labels = _inputs(23, labels, c=17, d=32)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **_kw(*switches))


@pytest.mark.parametrize("alpha,tau,t", [(16.0, 1.0, 2.0), (30.0, 0.5, 1.0), (64.0, 2.0, 4.0), (1.0, 1.0, 0.5)])
def test_float32_scales_and_temperatures(alpha, tau, t):
    g = make_gen(24)
    labels = _labels("mixed", 70, 23, g)
    tensors, labels = _inputs(25, labels, c=23, d=16)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **_kw(alpha=alpha, tau=tau, t=t))


@pytest.mark.parametrize("b,c", [(1, 2), (1, 5), (2, 2), (6, 2), (9, 3), (13, 31), (7, 33)])
def test_float32_tiny_and_prime_shapes(b, c):
    g = make_gen(28 + b + c)
    tensors, labels = _inputs(29, _labels("mixed", b, c, g), c=c, d=5)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **_kw())


# 256 threads per block (rows' class sweeps, the gradient's column tiles), 32-column teacher-gradient
# tiles, 32-row diversity tiles; d = 300 makes threads own more than one feature column.
@pytest.mark.parametrize("c", [31, 32, 33, 255, 256, 257])
@pytest.mark.parametrize("d", [7, 300])
def test_float32_around_block_sizes(c, d):
    g = make_gen(30 + c + d)
    labels = _labels("imbalanced", 97, c, g)
    labels[:3] = IGNORE
    tensors, labels = _inputs(31, labels, c=c, d=d)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, upstream=(1.0, 0.3, 0.2), **_kw())


def test_float32_default_chunk_benchmark_shape():
    g = make_gen(32)
    labels = _labels("mixed", 1024, 1000, g)
    labels[:5] = IGNORE
    tensors, labels = _inputs(33, labels, c=1000, d=128)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **_kw(alpha=16.0, tau=1.0))


def test_float32_large_imbalanced_batch():
    # 90% of 2049 rows in one class: a long teacher-gradient run and a 1844-row diversity class.
    g = make_gen(34)
    labels = _labels("imbalanced", 2049, 257, g)
    labels[::97] = IGNORE
    tensors, labels = _inputs(35, labels, c=257, d=64)
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, upstream=(1.0, 0.5, -0.25),
                          **_kw(alpha=16.0, tau=0.7))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 48 * 2**30,
                    reason="the (C, C) similarity gradient alone takes 17 GB at this C")
def test_float32_more_than_65536_classes():
    # C > 65536, without distillation: its C x C teacher would not fit at this C. The similarity is a
    # zero-stride view that nothing reads; its (zero) gradient is still a dense (C, C) tensor.
    g = make_gen(36)
    c = 65_601
    labels = torch.cat([torch.randint(0, c, (150,), generator=g), torch.full((40,), c - 1, dtype=torch.long)])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    labels[:3] = IGNORE
    x = torch.randn(labels.numel(), 8, generator=g, dtype=F64)
    proxies = torch.randn(c, 8, generator=g, dtype=F64)
    kw = _kw(distillation=False, alpha=16.0)

    def run(device, dtype):
        leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (x, proxies)]
        sim = torch.zeros((), device=device, dtype=dtype).expand(c, c)
        backend = "cuda" if device == DEV else "reference"
        out = ik.idid_loss(*leaves[:2], sim, labels.to(device), return_terms=True, backend=backend, **kw)
        return out, torch.autograd.grad(out.loss + 0.5 * out.l_id, leaves)

    truth, truth_grads = run("cpu", F64)
    ours, grads = run(DEV, torch.float32)
    assert max(rel_err(a.cpu(), b) for a, b in zip(ours, truth)) <= OUT_TOL
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)) <= GRAD_TOL


CHUNK = 8


@pytest.mark.parametrize("pattern", ["mixed", "one_class", "imbalanced"])
@pytest.mark.parametrize("b", [CHUNK - 1, CHUNK + 1, 4 * CHUNK + 3])
def test_chunk_boundaries(pattern, b):
    """Forced 8-row chunks: class runs that start, end and continue across chunks; float64 tight
    against the reference, float32 within tolerance, and no dependence on the chunking beyond
    rounding."""
    g = make_gen(40 + b)
    labels = _labels(pattern, b, 9, g)
    tensors, labels = _inputs(41, labels, c=9, d=7)
    kw = _kw()
    with _chunk_rows(CHUNK):
        _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, **kw)
        _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **kw)
        small = _run("cuda", tensors, labels, F64, DEV, **kw)
    whole = _run("cuda", tensors, labels, F64, DEV, **kw)
    for a, b_ in zip(small[0][:3] + small[1], whole[0][:3] + whole[1]):
        assert rel_err(a.cpu(), b_.cpu()) <= 1e-13


# ------------------------------------------------------------------------------------------------
# properties of spec/idid.md and edge cases on this backend
# ------------------------------------------------------------------------------------------------


def test_c2_gives_zero_kd_and_zero_similarity_grad():
    tensors, labels = _inputs(50, [0, 1, 1, 0, 1, IGNORE], c=2, d=5)
    with_kd, grads = _run("cuda", tensors, labels, F64, DEV, **_kw())
    without, _ = _run("cuda", tensors, labels, F64, DEV, **_kw(distillation=False))
    torch.testing.assert_close(with_kd.l_ic, without.l_ic, rtol=1e-13, atol=0)
    assert torch.equal(grads[2], torch.zeros(2, 2, dtype=F64, device=DEV))


def test_all_singletons_give_zero_lambda_and_l_id():
    tensors, labels = _inputs(51, [4, 0, 2, 1], c=6, d=5)
    out, _ = _run("cuda", tensors, labels, torch.float32, DEV, **_kw())
    assert out.lam.item() == 0 and out.l_id.item() == 0
    assert torch.equal(out.loss, out.l_ic)


def test_all_ignored_gives_zero_loss_and_grads():
    tensors, labels = _inputs(52, [IGNORE] * 5, c=3, d=4)
    for kw in (_kw(), _kw(adaptive_weight=False)):
        out, grads = _run("cuda", tensors, labels, F64, DEV, upstream=(1.0, 1.0, 1.0), **kw)
        truth = ref.idid_loss(*tensors, labels, return_terms=True, **kw)
        for a, b in zip(out, truth):
            assert torch.equal(a.detach().cpu(), b.detach())
        for gr in grads:
            assert torch.count_nonzero(gr) == 0


def test_zero_feature_and_proxy_rows_match_reference():
    tensors, labels = _inputs(53, [0, 1, 0, 2, 1], c=3, d=4)
    tensors[0][1].zero_()
    tensors[1][2].zero_()
    _compare_to_reference(tensors, labels, F64, 1e-12, 1e-10, **_kw())
    _compare_to_reference(tensors, labels, torch.float32, OUT_TOL, GRAD_TOL, **_kw())


def test_return_terms_and_lambda_without_grad():
    tensors, labels = _inputs(54, [0, 1, 0, 2, 1, 0, IGNORE], c=4, d=5)
    leaves = [t.to(DEV).requires_grad_(True) for t in tensors]
    out = ik.idid_loss(*leaves, labels.to(DEV), return_terms=True, backend="cuda")
    truth = ref.idid_loss(*tensors, labels, return_terms=True)
    assert isinstance(out, ik.IDIDTerms)
    for a, b in zip(out, truth):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.l_ic + out.lam * out.l_id, rtol=1e-14, atol=0)
    assert out.loss.requires_grad and out.l_ic.requires_grad and out.l_id.requires_grad
    assert not out.lam.requires_grad


@pytest.mark.parametrize("needs", [m for m in itertools.product([True, False], repeat=3) if any(m)])
def test_every_requires_grad_combination(needs):
    tensors, labels = _inputs(55, GRADCHECK_LABELS, c=5, d=4)
    kw = _kw()
    ours = [t.to(DEV).requires_grad_(n) for t, n in zip(tensors, needs)]
    theirs = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    grads = torch.autograd.grad(ik.idid_loss(*ours, labels.to(DEV), backend="cuda", **kw),
                                [t for t in ours if t.requires_grad])
    truth = torch.autograd.grad(ref.idid_loss(*theirs, labels, **kw), [t for t in theirs if t.requires_grad],
                                allow_unused=True, materialize_grads=True)
    for a, b in zip(grads, truth):
        assert rel_err(a.cpu(), b) <= 1e-12


def test_noncontiguous_inputs_not_modified():
    g = make_gen(56)
    x = torch.randn(20, 12, generator=g).to(DEV)[:, ::2]
    proxies = torch.randn(8, 12, generator=g).to(DEV)[:, 1::2]
    sim = torch.randn(8, 8, generator=g).to(DEV).t()
    labels = torch.randint(0, 8, (40,), generator=g).to(DEV)[::2]
    labels[2] = IGNORE
    assert not (x.is_contiguous() or proxies.is_contiguous() or sim.is_contiguous() or labels.is_contiguous())
    before = [t.clone() for t in (x, proxies, sim, labels)]
    leaves = [t.requires_grad_(True) for t in (x, proxies, sim)]
    out = ik.idid_loss(*leaves, labels, backend="cuda", return_terms=True, **_kw())
    grads = torch.autograd.grad(out.loss, leaves)
    truth_in = [t.detach().cpu().double().requires_grad_(True) for t in (x, proxies, sim)]
    truth = ref.idid_loss(*truth_in, labels.cpu(), return_terms=True, **_kw())
    truth_grads = torch.autograd.grad(truth.loss, truth_in)
    for a, b in zip((x, proxies, sim, labels), before):
        assert torch.equal(a, b)
    assert rel_err(out.loss.cpu(), truth.loss) <= OUT_TOL
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)) <= GRAD_TOL


def test_out_of_range_label_gives_nan_loss_not_a_crash():
    # Without the Python-side range check (torch.compile, graph capture, IDID_KERNELS_CHECK_LABELS=0)
    # the op must not index out of bounds: the row is dropped and the loss terms are NaN.
    args = list(_op_args(torch.float32))
    args[3] = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 5, 0], device=DEV)  # 5 is outside [0, 5)
    loss, l_ic, *_ = FWD(*args)
    torch.cuda.synchronize()
    assert torch.isnan(loss) and torch.isnan(l_ic)


# ------------------------------------------------------------------------------------------------
# low precision, determinism, op plumbing, graphs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,b,c,d", [("imbalanced", 48, 11, 16), ("mixed", 257, 1031, 128)])
def test_half_inputs_within_twice_eager_error(dtype, pattern, b, c, d):
    g = make_gen(60)
    tensors, labels = _inputs(61, _labels(pattern, b, c, g), c=c, d=d)
    kw = _kw()
    truth, truth_grads = _run("reference", tensors, labels, F64, "cpu", **kw)

    def errors(backend):
        out, grads = _run(backend, tensors, labels, dtype, DEV, **kw)
        assert out.loss.dtype == dtype and all(gr.dtype == dtype for gr in grads)
        return rel_err(out.loss.cpu(), truth.loss), [rel_err(a.cpu(), t) for a, t in zip(grads, truth_grads)]

    eager_loss, eager_grads = errors("reference")
    ours_loss, ours_grads = errors("cuda")
    assert ours_loss <= 2 * eager_loss + 1e-2
    for ours, eager in zip(ours_grads, eager_grads):
        assert ours <= 2 * eager + 1e-2


@pytest.mark.parametrize("rows", [0, 64])
def test_bitwise_deterministic(rows):
    g = make_gen(62)
    labels = _labels("imbalanced", 3000, 97, g)
    labels[:4] = IGNORE
    tensors, labels = _inputs(63, labels, c=97, d=40)
    results = []
    for _ in range(3):
        with _chunk_rows(rows):
            out, grads = _run("cuda", tensors, labels, torch.float32, DEV, upstream=(1.0, 0.3, 0.2), **_kw())
        results.append([v.detach() for v in out] + list(grads))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _op_args(dtype, distillation=True, b=9, c=5, d=6, seed=70):
    g = make_gen(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    proxies = torch.randn(c, d, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    sim = torch.randn(c, c, generator=g, dtype=dtype).to(DEV).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 4, 0], device=DEV) if b == 9 else \
        torch.randint(0, c, (b,), generator=g).to(DEV)
    return (x, proxies, sim, labels, 8.0, 1.3, 2.0, 1e-8, distillation, True, True, 0.6, True, IGNORE, 0)


def _backward_args(fwd_args, fwd_out, upstream=0.8):
    x, proxies, _, labels, alpha, tau, t, _, distillation, diversity = fwd_args[:10]
    _, _, _, lam, row_stats, x_norm, w_norm, teacher = fwd_out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_ic = torch.full((), upstream, dtype=acc, device=DEV)
    return (grad_ic, grad_ic * lam.to(acc), x.detach(), proxies.detach(), labels, row_stats, x_norm, w_norm, teacher,
            alpha, tau, t, distillation, diversity, IGNORE, fwd_args[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distillation", [True, False])
def test_opcheck(dtype, distillation):
    ops = torch.ops.idid_kernels
    args = _op_args(dtype, distillation)
    torch.library.opcheck(ops.idid_loss_forward.default, args)
    with torch.no_grad():
        out = FWD(*args)
    torch.library.opcheck(ops.idid_loss_backward.default, _backward_args(args, out))


def test_ops_do_not_synchronise():
    # Layout, counts, K_B, K_2, lambda and the upstream coefficients stay on the device. The ops are
    # called directly (the public function validates the labels first, which synchronises).
    args = _op_args(torch.float32, b=1500, c=300, d=64, seed=71)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            out = FWD(*args)
            dx, dw, ds = BWD(*_backward_args(args, out))
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(out[0]) and torch.isfinite(dx).all() and torch.isfinite(dw).all()
    assert torch.isfinite(ds).all()


def test_cuda_graph_capture_replays_with_new_inputs():
    # Nothing is read on the host, so forward and backward capture into one graph; replaying it on new
    # features and labels (copied into the captured tensors) matches an eager call on them.
    args = list(_op_args(torch.float32, b=600, c=120, d=32, seed=72))
    args[:3] = [t.detach() for t in args[:3]]

    def step():
        out = FWD(*args)
        return out[:4] + BWD(*_backward_args(tuple(args), out))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    g = make_gen(73)
    args[0].copy_(torch.randn(args[0].shape, generator=g).to(DEV))
    args[3].copy_(torch.randint(0, 40, args[3].shape, generator=g).to(DEV))  # other classes and counts
    args[3][:5] = IGNORE
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager):
        assert rel_err(a, b) <= 1e-6


def test_compile_fullgraph_matches_eager():
    def f(x, proxies, sim, labels):
        out = ik.idid_loss(x, proxies, sim, labels, backend="cuda", return_terms=True)
        return out.loss + 0.5 * out.l_id

    tensors, labels = _inputs(74, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0, 3], c=5, d=6)
    leaves = [t.float().to(DEV).requires_grad_(True) for t in tensors]
    labels = labels.to(DEV)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, labels)
    grads = torch.autograd.grad(out, leaves)
    eager_in = [t.detach().clone().requires_grad_(True) for t in leaves]
    eager = f(*eager_in, labels)
    eager_grads = torch.autograd.grad(eager, eager_in)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_module_on_the_gpu():
    g = make_gen(75)
    module = ik.IDIDLoss(16, 10, backend="cuda").to(DEV)
    with torch.no_grad():
        module.proxies.copy_(torch.randn(10, 16, generator=g))
        module.similarity.copy_(torch.randn(10, 10, generator=g))
    x = torch.randn(40, 16, generator=g).to(DEV).requires_grad_(True)
    labels = torch.randint(0, 10, (40,), generator=g).to(DEV)
    loss = module(x, labels)
    loss.backward()
    truth = ref.idid_loss(x.detach().cpu().double(), module.proxies.detach().cpu().double(),
                          module.similarity.detach().cpu().double(), labels.cpu())
    assert rel_err(loss.detach().cpu(), truth) <= OUT_TOL
    assert x.grad is not None and module.proxies.grad is not None and module.similarity.grad is not None
