"""Conformance of ``idid_loss`` (IDID-R1, spec/idid.md) on every backend: reference, cpp, cuda, triton.

One contract, run over each backend on its own device (conftest: CPU tensors for the emulated CUDA
kernels and for Triton's interpreter without a GPU, natively on a GPU), against the float64
reference:

- float64 agreement (random upstream gradients over loss, L_IC and L_ID) and gradcheck, for every
  combination of the switches distillation / diversity / adaptive_weight / class_balanced (each one
  off in turn on the emulated/interpreted backends, whose cases are fewer and smaller throughout);
- float32 tolerances over label layouts (ignored rows, one class, singletons, absent classes,
  imbalanced), logit scale alpha and temperatures tau / t, tiny and prime shapes, C around block
  sizes, class runs across chunks of the chunk budget (IDID_KERNELS_CHUNK_MB, cpp and cuda), and
  C > 65536 on a GPU; bf16/fp16 within twice the eager error;
- the spec's properties (C = 2, singletons, all rows ignored, zero rows), the returned terms and
  lambda, the gradient of the learnable class similarity, every requires_grad combination;
- bitwise determinism (with and without torch.use_deterministic_algorithms), inputs not modified,
  opcheck, torch.compile(fullgraph=True), double backward refused, the module wrapper;
- labels out of range with IDID_KERNELS_CHECK_LABELS=0, each backend's documented outcome: the
  reference raises IndexError, cpp a RuntimeError naming the row, cuda drops the row with a NaN
  L_IC, triton poisons every term and every gradient element with NaN.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import idid_kernels as ik
from conftest import (
    GPU, OpLog, backend_device, backend_params, deterministic, fused_backends, is_slow, kernel_ops, make_gen, rel_err, sized,
)
from idid_kernels import _backends, _chunks

OP = "idid_loss"
F32, F64 = torch.float32, torch.float64
IGNORE = -100
SWITCHES = list(itertools.product([True, False], repeat=4))  # distillation, diversity, adaptive, balanced
# Each switch off on its own, and all on / all off: the sweep for the emulated/interpreted backends.
FEW_SWITCHES = [(True, True, True, True), (False, True, True, True), (True, False, True, True),
                (True, True, False, True), (True, True, True, False), (False, False, False, False)]
F64_TOL = (1e-12, 1e-10)  # (terms, gradients) vs the float64 reference
F32_TOL = (1e-5, 1e-4)    # ARCHITECTURE.md
PATTERNS = ["mixed", "singletons", "one_class", "absent_class", "imbalanced"]

ALL = backend_params(OP)
FUSED = fused_backends(OP)
CHUNKED = backend_params(OP, include=("cpp", "cuda"))  # the C++ driver processes the logits in row chunks
GPU_NATIVE = backend_params(OP, include=("cuda", "triton"))


def per_backend(params, cases):
    """pytest params ``(backend, case)``: ``cases(backend)`` lists the cases of each backend (fewer or
    smaller for the emulated/interpreted ones); a backend that cannot run here stays a skip."""
    out = []
    for p in params:
        b = p.values[0]
        for case in cases(b):
            case_id = "-".join(str(v) for v in case) if isinstance(case, tuple) else str(case)
            out.append(pytest.param(b, case, id=f"{b}-{case_id}", marks=p.marks))
    return out


def on_gpu(backend: str) -> bool:
    return backend_device(backend).type == "cuda"


@pytest.fixture(autouse=True)
def _full_precision_float32_matmul():
    # TF32 GEMMs (cuBLAS in the cuda backend and the reference on a GPU) give ~1e-3 cosines,
    # outside the float32 contract; torch's default is off, kept off here whatever the caller set.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved



def _kw(distillation=True, diversity=True, adaptive_weight=True, class_balanced=True, **extra):
    kw = dict(alpha=8.0, tau=1.3, t=2.0, distillation=distillation, diversity=diversity,
              adaptive_weight=adaptive_weight, diversity_weight=0.6, class_balanced=class_balanced)
    kw.update(extra)
    return kw


def _inputs(seed, labels, c, d):
    """float64 CPU tensors (x, proxies, similarity) and int64 CPU labels."""
    g = make_gen(seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    tensors = [torch.randn(*shape, generator=g, dtype=F64) for shape in ((len(labels), d), (c, d), (c, c))]
    return tensors, labels


def _labels(pattern, b, c, g):
    if pattern == "mixed":
        return torch.randint(0, c, (b,), generator=g)
    if pattern == "singletons":  # every class at most once (b <= c)
        return torch.randperm(c, generator=g)[:b]
    if pattern == "one_class":
        return torch.full((b,), c - 1, dtype=torch.long)
    if pattern == "absent_class":  # class c - 1 never appears
        return torch.randint(0, c - 1, (b,), generator=g)
    if pattern == "imbalanced":  # one class holds 90% of the rows, the rest mostly singletons
        y = torch.randint(1, c, (b,), generator=g)
        y[torch.randperm(b, generator=g)[: (9 * b) // 10]] = 0
        return y
    raise ValueError(pattern)


def _leaves(backend, tensors, dtype, needs=(True, True, True)):
    dev = backend_device(backend)
    return [t.detach().to(device=dev, dtype=dtype).requires_grad_(n) for t, n in zip(tensors, needs)]


def _run(backend, tensors, labels, dtype=F64, upstream=(1.0, 0.0, 0.0), **kw):
    """(terms, (dx, dproxies, dsimilarity)) of upstream . (loss, l_ic, l_id) for copies of ``tensors``
    in ``dtype`` on ``backend``'s device; a gradient that does not flow is zeros."""
    leaves = _leaves(backend, tensors, dtype)
    terms = ik.idid_loss(*leaves, labels.to(leaves[0].device), return_terms=True, backend=backend, **kw)
    total = sum(w * v for w, v in zip(upstream, terms[:3]) if w != 0.0)
    if not torch.is_tensor(total):  # an all-zero upstream gradient
        total = 0.0 * terms.loss
    grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return terms, grads


def _truth(tensors, labels, upstream=(1.0, 0.0, 0.0), **kw):
    return _run("reference", tensors, labels, F64, upstream, **kw)


def _compare(backend, tensors, labels, dtype, tol, upstream=(1.0, 0.0, 0.0), **kw):
    """``backend`` in ``dtype`` against the float64 reference (on the CPU); returns the worst errors."""
    truth, truth_grads = _truth(tensors, labels, upstream, **kw)
    ours, grads = _run(backend, tensors, labels, dtype, upstream, **kw)
    for v in list(ours) + list(grads):
        assert v.dtype == dtype and v.device.type == backend_device(backend).type
    loss_err = max(rel_err(a.cpu(), b) for a, b in zip(ours, truth))
    grad_errs = [rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)]
    assert loss_err <= tol[0], (loss_err, ours, truth)
    assert max(grad_errs) <= tol[1], grad_errs
    return loss_err, max(grad_errs)


def _chunk_budget(monkeypatch, rows, b, c, dtype):
    """IDID_KERNELS_CHUNK_MB set so that the C++ driver takes ``rows`` rows of logits per chunk."""
    from idid_kernels.ops.idid_loss import _rows_per_chunk
    itemsize = 8 if dtype == F64 else 4
    monkeypatch.setenv(_chunks.ENV, repr((rows * max(b, c) * itemsize + 0.5) / 2**20))
    _chunks.reset()
    assert _rows_per_chunk(b, c, dtype, "cpu") == rows


def _close_bitwise(a, b):
    for u, v in zip(a, b):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------------------------------
# backend selection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_backend_is_selectable_and_auto_prefers_cpp_on_the_cpu(backend):
    dev = backend_device(backend)
    assert backend in _backends.IMPLEMENTED[OP]
    assert _backends.select_backend(OP, backend, dev) == backend
    auto = _backends.select_backend(OP, "auto", dev)
    # "auto" never picks the emulated/interpreted kernels, and on a GPU stays on the reference until
    # the GPU kernels have passed this suite natively (_backends._PREFERENCE).
    if dev.type == "cuda":
        assert auto == "reference"
    else:
        assert auto == ("cpp" if "cpp" in ik.available_backends() else "reference")


# ------------------------------------------------------------------------------------------------
# float64: every switch against the reference, gradcheck
# ------------------------------------------------------------------------------------------------

F64_LABELS = [3, 1, 0, 3, 3, IGNORE, 1, 5, 0, 3, 6]  # class 2 and 4 absent, 5 and 6 singletons


@pytest.mark.parametrize("backend,switches", per_backend(FUSED, lambda b: FEW_SWITCHES if is_slow(b) else SWITCHES))
def test_float64_every_switch_matches_reference_with_random_upstream(backend, switches):
    tensors, labels = _inputs(12, F64_LABELS, c=7, d=6)
    _compare(backend, tensors, labels, F64, F64_TOL, upstream=(0.7, -0.4, 1.3), **_kw(*switches))


GRADCHECK_LABELS = [0, 1, 0, 2, 1, 0, IGNORE, 4, 0]  # class 3 absent, classes 2 and 4 singletons


def _gradcheck(fn, inputs, fast):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


# (distillation, diversity, class_balanced): L_IC and L_ID do not depend on adaptive_weight.
TERM_SWITCHES = list(itertools.product([True, False], repeat=3))


@pytest.mark.parametrize("backend,switches", per_backend(FUSED, lambda b: [(True, True, True)]
                                                         if is_slow(b) else TERM_SWITCHES))
def test_gradcheck_float64(backend, switches):
    """L_IC and L_ID are differentiable outputs: finite differences of both (fast mode, a random
    projection of the Jacobian, on the emulated or interpreted backends), and of the loss with the
    fixed diversity weight (fast mode: the plumbing of the loss's upstream into L_IC and L_ID).
    With the adaptive weight, lambda = stopgrad(L_IC) / (stopgrad(L_ID) + eps) makes the total not
    a differentiable function by design: its gradient must be g(L_IC) + lambda g(L_ID), as the
    reference's autograd gives."""
    distillation, diversity, class_balanced = switches
    tensors, labels = _inputs(10, GRADCHECK_LABELS, c=5, d=4)
    leaves = tuple(_leaves(backend, tensors, F64))
    labels = labels.to(leaves[0].device)
    kw = _kw(distillation, diversity, False, class_balanced)

    def terms(a, b, c):
        out = ik.idid_loss(a, b, c, labels, return_terms=True, backend=backend, **kw)
        return out.l_ic, out.l_id

    _gradcheck(terms, leaves, is_slow(backend))
    if diversity:
        if not is_slow(backend):  # (the slow backends: the full Jacobian in x below)
            _gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend=backend, **kw), leaves, True)
        adaptive = dict(kw, adaptive_weight=True)
        out, grads = _run(backend, tensors, labels.cpu(), **adaptive)
        assert out.lam > 0 and not out.lam.requires_grad
        _, truth = _truth(tensors, labels.cpu(), **adaptive)
        for a, b in zip(grads, truth):
            assert rel_err(a.cpu(), b) <= 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_float64_full_jacobian_in_x(backend):
    """The whole Jacobian in x of the fixed-weight loss (every backend, full mode)."""
    tensors, labels = _inputs(4, [0, 1, 0, 2, IGNORE, 1], c=3, d=2)
    x, proxies, sim = _leaves(backend, tensors, F64)
    labels = labels.to(x.device)
    kw = _kw(adaptive_weight=False)
    _gradcheck(lambda a: ik.idid_loss(a, proxies.detach(), sim.detach(), labels, backend=backend, **kw), (x,),
               fast=False)


@pytest.mark.parametrize("backend", CHUNKED)
def test_gradcheck_float64_large_class_across_chunks(backend, monkeypatch):
    """A 35-row class: beyond the 32-row pairwise/tile size of the diversity term and, with 3-row
    chunks of the chunk budget, spanning twelve chunks (its teacher-gradient run continues from
    chunk to chunk)."""
    tensors, labels = _inputs(11, [0] * 35 + [1, 2, 1, IGNORE], c=4, d=3)
    _chunk_budget(monkeypatch, 3, len(labels), 4, F64)
    leaves = tuple(_leaves(backend, tensors, F64))
    labels = labels.to(leaves[0].device)
    kw = _kw(adaptive_weight=False)
    _gradcheck(lambda a, b, c: ik.idid_loss(a, b, c, labels, backend=backend, **kw), leaves, is_slow(backend))


# ------------------------------------------------------------------------------------------------
# float32 against the float64 reference: label layouts, switches, scales, shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,case", per_backend(FUSED, lambda b: [
    (p, i) for p in PATTERNS for i in ("none", "some", "all") if i != "all" or p == "mixed" or not is_slow(b)]))
def test_float32_label_layouts(backend, case):
    pattern, ignore = case
    b, c, d = sized(backend, (19, 13, 16), (60, 64, 24))
    g = make_gen(20)
    labels = _labels(pattern, min(b, c) if pattern == "singletons" else b, c, g)
    n = len(labels)
    if ignore == "some":
        labels[torch.randperm(n, generator=g)[: max(1, n // 8)]] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    tensors, labels = _inputs(21, labels, c, d)
    _compare(backend, tensors, labels, F32, F32_TOL, upstream=(1.0, 0.5, -0.25), **_kw())


@pytest.mark.parametrize("backend,switches",
                         per_backend(FUSED, lambda b: FEW_SWITCHES[::2] if is_slow(b) else SWITCHES))
def test_float32_switches(backend, switches):
    b, c, d = sized(backend, (11, 5, 16), (90, 17, 32))
    g = make_gen(22)
    labels = _labels("imbalanced", b, c, g)
    labels[3] = IGNORE
    tensors, labels = _inputs(23, labels, c, d)
    _compare(backend, tensors, labels, F32, F32_TOL, **_kw(*switches))


@pytest.mark.parametrize("backend,case", per_backend(FUSED, lambda b: [
    (16.0, 1.0, 2.0), (30.0, 0.5, 1.0), (64.0, 2.0, 4.0), (1.0, 1.0, 0.5)]))
def test_float32_scales_and_temperatures(backend, case):
    alpha, tau, t = case
    b, c, d = sized(backend, (11, 5, 16), (70, 23, 16))
    g = make_gen(24)
    tensors, labels = _inputs(25, _labels("imbalanced", b, c, g), c, d)
    _compare(backend, tensors, labels, F32, F32_TOL, upstream=(1.0, 0.3, 0.2), **_kw(alpha=alpha, tau=tau, t=t))


def _shapes(backend):
    """(B, C, d): 1, 2, primes; bigger where the backend runs natively."""
    tiny = [(1, 2, 5), (6, 2, 5), (9, 3, 5), (13, 31, 5), (7, 33, 5), (1, 2, 3)]
    tiny += sized(backend, [], [(1, 5, 5), (2, 2, 5), (6, 5, 16)])
    more = sized(backend, [(19, 13, 33)], [(19, 13, 33), (67, 65, 129), (257, 1001, 64)])
    if on_gpu(backend):
        more += [(1031, 127, 512), (1024, 1000, 128)]
    return tiny + more


@pytest.mark.parametrize("backend,shape", per_backend(FUSED, _shapes))
def test_float32_tiny_prime_and_larger_shapes(backend, shape):
    b, c, d = shape
    g = make_gen(28 + b + c)
    labels = _labels("mixed", b, c, g)
    if b > 100:
        labels[:5] = IGNORE
    tensors, labels = _inputs(29, labels, c, d)
    _compare(backend, tensors, labels, F32, F32_TOL, **_kw())


@pytest.mark.skipif(not GPU, reason="a 2049-row batch is for native kernels")
@pytest.mark.parametrize("backend", FUSED)
def test_float32_large_imbalanced_batch(backend):
    # 90% of 2049 rows in one class: a long teacher-gradient run and an 1844-row diversity class.
    g = make_gen(34)
    labels = _labels("imbalanced", 2049, 257, g)
    labels[::97] = IGNORE
    tensors, labels = _inputs(35, labels, c=257, d=64)
    _compare(backend, tensors, labels, F32, F32_TOL, upstream=(1.0, 0.5, -0.25), **_kw(alpha=16.0, tau=0.7))


def _block_cases(backend):
    """(C, d) around each backend's block sizes: cpp's 32-row pairwise limit; cuda's 32-column tiles
    and 256-thread blocks (d = 300: a thread owns several feature columns); Triton's 8-row/class,
    32-feature blocks in the interpreter, its 32..128 tiles natively."""
    blocks, widths = {"cpp": ((32,), (7, 65)), "cuda": ((32, 256), (7, 300)),
                      "triton": (sized(backend, (8,), (32, 64, 128)), sized(backend, (7, 33), (7, 300)))}[backend]
    cases = [(c, d) for k in blocks for c in (k - 1, k, k + 1) for d in widths]
    return cases[::2] if is_slow(backend) and backend == "triton" else cases


@pytest.mark.parametrize("backend,case", per_backend(FUSED, _block_cases))
def test_float32_classes_around_block_sizes(backend, case):
    c, d = case
    b = sized(backend, 19, 97)
    g = make_gen(30 + c + d)
    labels = _labels("imbalanced", b, c, g)
    labels[:3] = IGNORE
    tensors, labels = _inputs(31, labels, c, d)
    _compare(backend, tensors, labels, F32, F32_TOL, upstream=(1.0, 0.3, 0.2), **_kw())


def _class_rows(backend):
    """Rows of the large class: 31-33 straddle cpp's switch from pairwise dots to GEMM blocks and
    cuda's 32-row diversity tiles; 7-9 Triton's interpreted 8-row blocks."""
    if backend == "triton":
        return sized(backend, [7, 8, 9, 17], [31, 32, 33, 63, 65, 129])
    return [31, 32, 33, 17]


@pytest.mark.parametrize("backend,n", per_backend(FUSED, _class_rows))
def test_class_sizes_around_tile_sizes(backend, n, monkeypatch):
    labels = [0] * n + [1] * 3 + [2]
    tensors, labels = _inputs(32 + n, labels, c=4, d=9)
    # The default budget, then (the chunked backends) 8-row chunks that split the class's Gram blocks.
    for rows in ((0, 8) if backend in ("cpp", "cuda") else (0,)):
        if rows:
            _chunk_budget(monkeypatch, rows, len(labels), 4, F64)
        _compare(backend, tensors, labels, F64, F64_TOL, **_kw(adaptive_weight=False))
        if not is_slow(backend):
            _compare(backend, tensors, labels, F32, F32_TOL, **_kw())


CHUNK = 8
CHUNK_CASES = sorted({(b, c, "mixed") for b in (CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1)
                      for c in (CHUNK - 1, CHUNK, CHUNK + 1)}
                     | {(b, 9, p) for p in ("mixed", "one_class", "imbalanced") for b in (CHUNK - 1, CHUNK + 1,
                                                                                          4 * CHUNK + 3)})


CHUNK_CASES_SLOW = [case for case in CHUNK_CASES if case[1] == 9 or case[0] == case[1]]


@pytest.mark.parametrize("backend,case", per_backend(CHUNKED, lambda b: CHUNK_CASES_SLOW if is_slow(b) else
                                                     CHUNK_CASES))
def test_chunk_boundaries(backend, case, monkeypatch):
    """8-row chunks of the chunk budget: B and C around the chunk size, class runs that start, end
    and continue across chunks; float64 tight and float32 within tolerance against the reference,
    and no dependence on the chunking beyond rounding."""
    b, c, pattern = case
    g = make_gen(40 + b * c)
    tensors, labels = _inputs(41, _labels(pattern, b, c, g), c, d=7)
    kw = _kw()
    _chunk_budget(monkeypatch, CHUNK, b, c, F64)
    _compare(backend, tensors, labels, F64, F64_TOL, **kw)
    small = _run(backend, tensors, labels, F64, (1.0, 0.3, 0.2), **kw)
    _chunk_budget(monkeypatch, CHUNK, b, c, F32)
    _compare(backend, tensors, labels, F32, F32_TOL, **kw)
    monkeypatch.delenv(_chunks.ENV)
    _chunks.reset()
    whole = _run(backend, tensors, labels, F64, (1.0, 0.3, 0.2), **kw)
    for a, b_ in zip(small[0][:3] + small[1], whole[0][:3] + whole[1]):
        assert rel_err(a.cpu(), b_.cpu()) <= 1e-13


@pytest.mark.parametrize("backend", FUSED)
def test_float32_more_than_65536_classes(backend):
    if not on_gpu(backend):
        pytest.skip("C > 65536 is for native GPU kernels (hours emulated/interpreted)")
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("the dense (C, C) similarity gradient alone takes 20 GB at this C")
    # Without distillation: a (C, C) teacher would not fit. The similarity is a zero-stride constant.
    g = make_gen(36)
    c, d = 70_001, 32
    labels = torch.cat([torch.randint(0, c, (150,), generator=g), torch.full((40,), c - 1, dtype=torch.long),
                        torch.randint(0, 8, (40,), generator=g) * 9973 % c])
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    labels[:3] = IGNORE
    x = torch.randn(labels.numel(), d, generator=g, dtype=F64)
    proxies = torch.randn(c, d, generator=g, dtype=F64)
    kw = _kw(distillation=False, alpha=16.0)

    def run(b, dtype):
        dev = backend_device(b)
        leaves = [t.to(device=dev, dtype=dtype).requires_grad_(True) for t in (x, proxies)]
        sim = torch.zeros((), device=dev, dtype=dtype).expand(c, c)
        out = ik.idid_loss(*leaves, sim, labels.to(dev), return_terms=True, backend=b, **kw)
        return out, torch.autograd.grad(out.loss + 0.5 * out.l_id, leaves)

    truth, truth_grads = run("reference", F64)
    ours, grads = run(backend, F32)
    assert max(rel_err(a.cpu(), b) for a, b in zip(ours, truth)) <= F32_TOL[0]
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)) <= F32_TOL[1]


# ------------------------------------------------------------------------------------------------
# properties of spec/idid.md and edge layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_two_classes_give_zero_distillation_and_zero_similarity_gradient(backend):
    # With C = 2 the teacher over the one non-target class is the constant 1: KL = 0, dTheta = 0.
    tensors, labels = _inputs(40, [0, 1, 1, 0, 1, IGNORE], c=2, d=5)
    with_kd, grads = _run(backend, tensors, labels, upstream=(1.0, 0.5, 0.5), **_kw())
    without, _ = _run(backend, tensors, labels, **_kw(distillation=False))
    torch.testing.assert_close(with_kd.l_ic, without.l_ic, rtol=1e-13, atol=0)
    assert torch.equal(grads[2].cpu(), torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize("backend", ALL)
def test_all_singletons_give_zero_lambda_and_l_id(backend):
    tensors, labels = _inputs(41, [4, 0, 2, 1], c=6, d=5)
    out, grads = _run(backend, tensors, labels, upstream=(1.0, 0.0, 1.0), **_kw())
    assert out.lam.item() == 0 and out.l_id.item() == 0
    assert torch.equal(out.loss, out.l_ic)
    _, truth = _truth(tensors, labels, upstream=(1.0, 0.0, 1.0), **_kw())
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth)) <= 1e-12


@pytest.mark.parametrize("backend", ALL)
def test_all_ignored_gives_zero_terms_and_gradients(backend):
    tensors, labels = _inputs(42, [IGNORE] * 5, c=3, d=4)
    for kw in (_kw(), _kw(adaptive_weight=False)):
        out, grads = _run(backend, tensors, labels, upstream=(1.0, 1.0, 1.0), **kw)
        truth, _ = _truth(tensors, labels, **kw)
        for a, b in zip(out, truth):
            assert torch.equal(a.detach().cpu(), b.detach())
        assert out.loss.item() == 0 and out.l_ic.item() == 0
        for gr in grads:
            assert torch.count_nonzero(gr) == 0


@pytest.mark.parametrize("backend", FUSED)
def test_zero_feature_and_proxy_rows_match_reference(backend):
    tensors, labels = _inputs(43, [0, 1, 0, 2, 1], c=3, d=4)
    tensors[0][1].zero_()
    tensors[1][2].zero_()
    _compare(backend, tensors, labels, F64, F64_TOL, **_kw())
    _compare(backend, tensors, labels, F32, F32_TOL, **_kw())


@pytest.mark.parametrize("backend", ALL)
def test_return_terms(backend):
    tensors, labels = _inputs(44, [0, 1, 0, 2, 1, 0, IGNORE], c=4, d=5)
    leaves = _leaves(backend, tensors, F64)
    labels = labels.to(leaves[0].device)
    out = ik.idid_loss(*leaves, labels, return_terms=True, backend=backend)
    truth = ik.idid_loss(*tensors, labels.cpu(), return_terms=True, backend="reference")
    assert isinstance(out, ik.IDIDTerms)
    for a, b in zip(out, truth):
        assert a.shape == () and a.dtype == F64
        torch.testing.assert_close(a.detach().cpu(), b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.loss, out.l_ic + out.lam * out.l_id, rtol=1e-14, atol=0)
    assert out.loss.requires_grad and out.l_ic.requires_grad and out.l_id.requires_grad
    assert not out.lam.requires_grad
    plain = ik.idid_loss(*leaves, labels, backend=backend)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out.loss)


@pytest.mark.parametrize("backend,case", per_backend(ALL, lambda b: ["adaptive", "fixed", "no_diversity", "eps"]))
def test_lambda(backend, case):
    """lambda = stopgrad(L_IC) / (stopgrad(L_ID) + eps), or the fixed diversity_weight, or 0 without
    the diversity term (then L_ID = 0 and the loss is L_IC)."""
    tensors, labels = _inputs(45, [0, 1, 0, 2, 1, 0, IGNORE, 2, 3], c=5, d=4)
    kw = {"adaptive": _kw(), "fixed": _kw(adaptive_weight=False, diversity_weight=0.37),
          "no_diversity": _kw(diversity=False), "eps": _kw(eps=0.25)}[case]
    out, _ = _run(backend, tensors, labels, **kw)
    truth, _ = _truth(tensors, labels, **kw)
    torch.testing.assert_close(out.lam.cpu(), truth.lam, rtol=1e-12, atol=0)
    assert not out.lam.requires_grad
    if case == "fixed":
        assert out.lam.item() == 0.37
    elif case == "no_diversity":
        assert out.lam.item() == 0 and out.l_id.item() == 0 and torch.equal(out.loss, out.l_ic)
    else:
        expected = out.l_ic.detach() / (out.l_id.detach() + kw.get("eps", 1e-8))
        torch.testing.assert_close(out.lam, expected, rtol=1e-13, atol=0)
        assert out.lam > 0


@pytest.mark.parametrize("backend", ALL)
def test_similarity_gradient(backend):
    """The learnable class similarity Theta enters through Phi = (Theta + Theta^T) / 2 with the
    diagonal unused: its gradient is exactly symmetric, zero on the diagonal, the reference's to
    float64 precision (whatever the upstream over the terms), and absent (None) unless distillation
    is on and the similarity requires grad."""
    tensors, labels = _inputs(46, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0, 4, 2], c=6, d=5)
    for upstream in sized(backend, ((0.0, 1.0, 0.0), (0.3, -1.2, 0.8)), ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                                                        (0.3, -1.2, 0.8))):
        _, grads = _run(backend, tensors, labels, upstream=upstream, **_kw())
        _, truth = _truth(tensors, labels, upstream=upstream, **_kw())
        ds = grads[2].cpu()
        assert torch.equal(ds, ds.t())
        assert torch.count_nonzero(ds.diagonal()) == 0
        assert torch.count_nonzero(ds) > 0
        assert rel_err(ds, truth[2]) <= F64_TOL[1]
    # The L_ID term does not read the similarity.
    _, grads = _run(backend, tensors, labels, upstream=(0.0, 0.0, 1.0), **_kw())
    assert torch.count_nonzero(grads[2]) == 0
    for distillation, needs in ((True, True), (True, False), (False, True)):
        leaves = _leaves(backend, tensors, F64, (True, True, needs))
        ik.idid_loss(*leaves, labels.to(leaves[0].device), backend=backend,
                     **_kw(distillation=distillation)).backward()
        assert (leaves[2].grad is not None) == (distillation and needs)
        assert leaves[0].grad is not None and leaves[1].grad is not None


@pytest.mark.parametrize("backend,needs", per_backend(ALL, lambda b: list(itertools.product([True, False],
                                                                                            repeat=3))))
def test_every_requires_grad_combination(backend, needs):
    tensors, labels = _inputs(57, GRADCHECK_LABELS, c=5, d=4)
    kw = _kw()
    ours = _leaves(backend, tensors, F64, needs)
    theirs = [t.clone().requires_grad_(n) for t, n in zip(tensors, needs)]
    loss = ik.idid_loss(*ours, labels.to(ours[0].device), backend=backend, **kw)
    truth = ik.idid_loss(*theirs, labels, backend="reference", **kw)
    torch.testing.assert_close(loss.detach().cpu(), truth.detach(), rtol=1e-12, atol=0)
    assert loss.requires_grad == any(needs)
    if not any(needs):
        return
    grads = torch.autograd.grad(loss, [t for t in ours if t.requires_grad])
    truth_grads = torch.autograd.grad(truth, [t for t in theirs if t.requires_grad], allow_unused=True,
                                      materialize_grads=True)
    assert len(grads) == sum(needs)
    for a, b in zip(grads, truth_grads):
        assert rel_err(a.cpu(), b) <= 1e-12


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_forward_matches(backend):
    tensors, labels = _inputs(58, GRADCHECK_LABELS, c=5, d=4)
    leaves = _leaves(backend, tensors, F64)
    with torch.no_grad():
        out = ik.idid_loss(*leaves, labels.to(leaves[0].device), backend=backend, return_terms=True)
    truth = ik.idid_loss(*tensors, labels, return_terms=True, backend="reference")
    assert not out.loss.requires_grad
    for a, b in zip(out, truth):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-12, atol=1e-14)


# The ops each backend runs: cpp and cuda form the gradients in the forward pass (idid_loss_fused)
# for a loss that needs a gradient outside torch.func, and use idid_loss_forward alone without one
# and idid_loss_forward / idid_loss_backward under torch.func; triton always runs its own pair.
_PATH_OPS = {"fused": {"idid_loss_fused", "idid_loss_fused_backward"}, "no_grad": {"idid_loss_forward"},
             "func": {"idid_loss_forward", "idid_loss_backward"}}


@pytest.mark.parametrize("backend,case", per_backend(backend_params(OP, include=("cpp", "cuda")), lambda b: [
    s + (ignore,) for s in (FEW_SWITCHES if is_slow(b) else SWITCHES) for ignore in (False, True)]))
def test_fused_and_forward_backward_paths_agree(backend, case):
    *switches, ignore = case
    kw = _kw(**dict(zip(("distillation", "diversity", "adaptive_weight", "class_balanced"), switches)))
    labels = [0, 1, 0, 2, 1, 0, 3, 4, 0, 2] + ([IGNORE, IGNORE] if ignore else [])
    tensors, labels = _inputs(76, labels, c=6, d=5)  # class 5 absent
    dev = backend_device(backend)
    labels = labels.to(dev)
    up = torch.randn(3, generator=make_gen(77), dtype=F64).tolist()

    def total(terms):
        return up[0] * terms.loss + up[1] * terms.l_ic + up[2] * terms.l_id

    leaves = _leaves(backend, tensors, F64)
    with OpLog() as log:
        fused = ik.idid_loss(*leaves, labels, backend=backend, return_terms=True, **kw)
        fused_grads = torch.autograd.grad(total(fused), leaves, allow_unused=True)
    assert log.ops == _PATH_OPS["fused"]
    assert (fused_grads[2] is not None) == kw["distillation"]
    # torch.func: the forward/backward pair (its backward refuses a second derivative)
    plain = [t.detach() for t in leaves]
    argnums = (0, 1, 2) if kw["distillation"] else (0, 1)
    with OpLog() as log:
        func_grads = torch.func.grad(
            lambda *t: total(ik.idid_loss(*t, labels, backend=backend, return_terms=True, **kw)), argnums=argnums)(*plain)
    assert log.ops == _PATH_OPS["func"]
    for a, b in zip(func_grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    # no gradient needed: the forward op alone, the same terms
    with OpLog() as log, torch.no_grad():
        value = ik.idid_loss(*leaves, labels, backend=backend, return_terms=True, **kw)
    assert log.ops == _PATH_OPS["no_grad"]
    for a, b in zip(value, fused):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=0)
    # against the float64 reference
    truth = ik.idid_loss(*[t.requires_grad_(True) for t in tensors], labels.cpu(), backend="reference",
                         return_terms=True, **kw)
    truth_grads = torch.autograd.grad(total(truth), tensors, allow_unused=True)
    for a, b in zip(fused, truth):
        assert rel_err(a.detach().cpu(), b.detach()) <= F64_TOL[0]
    for a, b in zip(fused_grads, truth_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a.cpu(), b) <= F64_TOL[1]


@pytest.mark.parametrize("backend", backend_params(OP, include=("cpp", "cuda")))
def test_fused_backward_reuses_nothing_across_calls(backend):
    # The saved gradients are combined into new tensors: two backward passes through one graph
    # (retain_graph), with different upstream scalars, give each its own scaled gradients, and an
    # in-place edit of the first result leaves the second untouched.
    tensors, labels = _inputs(78, [0, 1, 0, 2, 1, 0, 3, 2], c=5, d=4)
    leaves = _leaves(backend, tensors, F64)
    terms = ik.idid_loss(*leaves, labels.to(leaves[0].device), backend=backend, return_terms=True)
    first = torch.autograd.grad(terms.loss, leaves, retain_graph=True)
    kept = [g.clone() for g in first]
    for g in first:
        g.mul_(100.0)
    second = torch.autograd.grad(2.0 * terms.loss, leaves)
    for a, b in zip(second, kept):
        torch.testing.assert_close(a, 2.0 * b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_inputs_are_not_modified(backend):
    g = make_gen(54)
    dev = backend_device(backend)
    x = torch.randn(20, 12, generator=g).to(dev)[:, ::2]
    proxies = torch.randn(8, 12, generator=g).to(dev)[:, 1::2]
    sim = torch.randn(8, 8, generator=g).to(dev).t()
    labels = torch.randint(0, 8, (40,), generator=g).to(dev)[::2]
    labels[2] = IGNORE
    assert not (x.is_contiguous() or proxies.is_contiguous() or sim.is_contiguous() or labels.is_contiguous())
    before = [t.clone() for t in (x, proxies, sim, labels)]
    leaves = [t.requires_grad_(True) for t in (x, proxies, sim)]
    out = ik.idid_loss(*leaves, labels, backend=backend, return_terms=True, **_kw())
    grads = torch.autograd.grad(out.loss, leaves)
    truth, truth_grads = _truth([t.detach().cpu() for t in leaves], labels.cpu(), **_kw())
    for a, b in zip((x, proxies, sim, labels), before):
        assert torch.equal(a, b)
    assert rel_err(out.loss.cpu(), truth.loss) <= F32_TOL[0]
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)) <= F32_TOL[1]


# ------------------------------------------------------------------------------------------------
# low precision
# ------------------------------------------------------------------------------------------------


def _half_cases(backend):
    dtypes = [torch.bfloat16, torch.float16]
    shapes = sized(backend, [("imbalanced", 19, 13, 16)], [("imbalanced", 48, 11, 16)])
    if on_gpu(backend):
        shapes += [("mixed", 257, 1031, 128)]
    return [(dt, *s) for dt in dtypes for s in shapes]


@pytest.mark.parametrize("backend,case", per_backend(FUSED, _half_cases))
def test_half_inputs_within_twice_eager_error(backend, case):
    dtype, pattern, b, c, d = case
    g = make_gen(60)
    tensors, labels = _inputs(61, _labels(pattern, b, c, g), c, d)
    kw = _kw()
    truth, truth_grads = _truth(tensors, labels, **kw)

    def errors(which, dev_of):
        leaves = _leaves(dev_of, tensors, dtype)
        out = ik.idid_loss(*leaves, labels.to(leaves[0].device), return_terms=True, backend=which, **kw)
        grads = torch.autograd.grad(out.loss, leaves)
        assert out.loss.dtype == dtype and all(gr.dtype == dtype for gr in grads)
        return rel_err(out.loss.cpu(), truth.loss), [rel_err(a.cpu(), t) for a, t in zip(grads, truth_grads)]

    # eager PyTorch in that dtype on the same device (the reference runs anywhere)
    eager_loss, eager_grads = errors("reference", backend)
    ours_loss, ours_grads = errors(backend, backend)
    assert ours_loss <= 2 * eager_loss + 1e-2
    for ours, eager in zip(ours_grads, eager_grads):
        assert ours <= 2 * eager + 1e-2


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,mode", per_backend(FUSED, lambda b: ["deterministic", "default"]))
def test_bitwise_determinism(backend, mode, monkeypatch):
    """Bitwise repeatable under torch.use_deterministic_algorithms(True) everywhere, and without it
    on cpp and cuda (no atomics; the emulator runs blocks and threads in a random order). Triton's
    default sums dW's row splits with atomics (order-dependent on a GPU): there it agrees with the
    deterministic path to rounding, and with the reference."""
    b, c, d = sized(backend, (19, 5, 16), (300, 97, 40))
    g = make_gen(62)
    labels = _labels("imbalanced", b, c, g)
    labels[:4] = IGNORE
    tensors, labels = _inputs(63, labels, c, d)
    if backend in ("cpp", "cuda") and not is_slow(backend):
        _chunk_budget(monkeypatch, 64, b, c, F32)  # several chunks
    if backend == "triton":
        from idid_kernels.triton import idid_loss as mod
        assert mod._column_splits(b, c, d, backend_device(backend))[0] > 1, "the dW reduction must span splits"
    upstream = (1.0, 0.3, 0.2)

    def results(on):
        with deterministic(on):
            out, grads = _run(backend, tensors, labels, F32, upstream, **_kw())
        return [v.detach() for v in out] + list(grads)

    first = results(mode == "deterministic")
    if mode == "deterministic" or backend != "triton":
        _close_bitwise(first, results(mode == "deterministic"))
    if mode == "default" and backend == "triton":
        fixed = results(True)
        for a, b_ in zip(first, fixed):
            assert rel_err(a, b_) <= 1e-6
    _, truth = _truth(tensors, labels, upstream, **_kw())
    assert max(rel_err(a.cpu(), b_) for a, b_ in zip(first[4:], truth)) <= F32_TOL[1]


@pytest.mark.parametrize("c", [7, 40, 67, 96])
@pytest.mark.parametrize("present", ["most", "few"])
def test_cpp_similarity_gradient_entrywise(c, present):
    """dTheta = (dPhi + dPhi^T) / 2 in float32 on the cpu: formed whole in 8 x 8 blocks once at least
    C / 4 classes are present ("most"), from the present rows alone below that ("few"). C takes
    values off the 8-block and 32-row band sizes, so blocks crossing C run too. Entry by entry
    against the float64 reference, exactly symmetric, diagonal exactly 0."""
    g = make_gen(80 + c)
    labels = (torch.randint(0, c, (3 * c,), generator=g) if present == "most"
              else torch.randperm(c, generator=g)[:max(1, c // 8)])
    tensors, labels = _inputs(81, labels, c, 8)
    _, (_, _, ds) = _run("cpp", tensors, labels, F32, (1.0, 0.3, 0.2), **_kw())
    _, (_, _, truth) = _truth(tensors, labels, (1.0, 0.3, 0.2), **_kw())
    assert torch.equal(ds, ds.t())
    assert torch.count_nonzero(ds.diagonal()) == 0
    torch.testing.assert_close(ds.double(), truth, rtol=1e-4, atol=1e-5 * truth.abs().max().item())


@pytest.mark.parametrize("pattern", ["mixed", "imbalanced"])
def test_cpp_thread_count_does_not_change_the_result(pattern):
    """The cpp row passes split work between threads along class runs (the fused op's row pass) or
    class columns (a chunk dominated by one class). C = 300 makes the row tasks a few rows each, so
    the run boundaries fall inside tasks. With many classes of a few rows ("mixed") every sum is
    ours and the bits are the same with 1, 2 or 3 threads; a class of most rows ("imbalanced") has
    its Gram and chunk products formed by BLAS, whose blocking follows the thread count, so there
    the results agree to float32 rounding."""
    g = make_gen(64)
    labels = _labels(pattern, 200, 300, g)
    labels[:3] = IGNORE
    tensors, labels = _inputs(65, labels, 300, 16)
    saved = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, grads = _run("cpp", tensors, labels, F32, (1.0, 0.3, 0.2), **_kw())
            runs.append([v.detach() for v in out] + list(grads))
    finally:
        torch.set_num_threads(saved)
    for other in runs[1:]:
        if pattern == "mixed":
            _close_bitwise(runs[0], other)
        else:
            assert max(rel_err(a, b) for a, b in zip(runs[0], other)) <= 1e-6


# ------------------------------------------------------------------------------------------------
# op plumbing: opcheck, torch.compile, double backward, the module
# ------------------------------------------------------------------------------------------------


def _op_args(backend, dtype, distillation):
    g = make_gen(70)
    dev = backend_device(backend)
    x, proxies, sim = (torch.randn(*s, generator=g, dtype=dtype).to(dev).requires_grad_(True)
                       for s in ((9, 6), (5, 6), (5, 5)))
    labels = torch.tensor([0, 1, 0, 2, 1, 0, IGNORE, 4, 0], device=dev)
    args = (x, proxies, sim, labels, 8.0, 1.3, 2.0, 1e-8, distillation, True, True, 0.6, True, IGNORE)
    return args if backend == "triton" else args + (0,)  # the C++ op takes chunk_rows (0: the budget)


def _triton_op(ops, which):
    """The Triton idid_loss op ``which`` ("forward", "backward"): in kernel_ops("triton")'s library,
    or registered beside the C++ ops as idid_kernels::triton_idid_loss_*."""
    for lib, name in ((ops, f"idid_loss_{which}"), (ops, f"triton_idid_loss_{which}"),
                      (torch.ops.idid_kernels, f"triton_idid_loss_{which}")):
        if hasattr(lib, name):
            return getattr(lib, name).default
    raise AssertionError(f"no Triton idid_loss {which} op is registered")


@pytest.mark.parametrize("backend,case", per_backend(FUSED, lambda b: [
    (dt, dist) for dt in ((F32,) if is_slow(b) else (F32, F64)) for dist in (True, False)]))
def test_opcheck(backend, case):
    dtype, distillation = case
    ops = kernel_ops(backend)
    args = _op_args(backend, dtype, distillation)
    x, proxies, _, labels = args[:4]
    acc = F64 if dtype == F64 else F32
    grad_ic = torch.full((), 0.8, dtype=acc, device=x.device)
    if backend == "triton":
        fwd, bwd = _triton_op(ops, "forward"), _triton_op(ops, "backward")
        torch.library.opcheck(fwd, args)
        with torch.no_grad():
            _, _, _, lam, row_stats, x_norm, w_norm, teacher, layout, offsets = fwd(*args)
        for similarity_grad in ((True, False) if distillation else (False,)):
            torch.library.opcheck(bwd, (grad_ic, grad_ic * lam.to(acc), x.detach(), proxies.detach(), row_stats,
                                        x_norm, w_norm, teacher, layout, offsets, 8.0, 1.3, 2.0, distillation, True,
                                        similarity_grad))
    else:
        fwd, bwd = ops.idid_loss_forward.default, ops.idid_loss_backward.default
        torch.library.opcheck(fwd, args)
        with torch.no_grad():
            _, _, _, lam, row_stats, x_norm, w_norm, teacher = fwd(*args)
        torch.library.opcheck(bwd, (grad_ic, grad_ic * lam.to(acc), x.detach(), proxies.detach(), labels, row_stats,
                                    x_norm, w_norm, teacher, 8.0, 1.3, 2.0, distillation, True, IGNORE, 0))
        fused, fused_bwd = ops.idid_loss_fused.default, ops.idid_loss_fused_backward.default
        torch.library.opcheck(fused, args)
        with torch.no_grad():
            _, _, _, lam, dx_ic, dx_id, dproxies, dphi = fused(*args)
        for similarity_grad in ((True, False) if distillation else (False,)):
            torch.library.opcheck(fused_bwd, (grad_ic, grad_ic * lam.to(acc), dx_ic, dx_id, dproxies, dphi, labels,
                                              IGNORE, similarity_grad, proxies.shape[0], dtype))


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph_matches_eager(backend):
    def f(x, proxies, sim, labels):
        out = ik.idid_loss(x, proxies, sim, labels, backend=backend, return_terms=True, tau=1.3)
        return out.loss + 0.5 * out.l_id

    tensors, labels = _inputs(74, [0, 1, 0, 2, 1, 0, IGNORE, 4, 0, 3], c=5, d=6)
    leaves = _leaves(backend, tensors, F32)
    labels = labels.to(leaves[0].device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves, labels)
    grads = torch.autograd.grad(out, leaves)
    eager_in = _leaves(backend, tensors, F32)
    eager = f(*eager_in, labels)
    eager_grads = torch.autograd.grad(eager, eager_in)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused(backend):
    tensors, labels = _inputs(30, [0, 1, 0, 2], c=3, d=4)
    leaves = _leaves(backend, tensors, F64)
    loss = ik.idid_loss(*leaves, labels.to(leaves[0].device), backend=backend)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, leaves, create_graph=True)


@pytest.mark.parametrize("backend", ALL)
def test_module_matches_functional_reference(backend):
    g = make_gen(75)
    dev = backend_device(backend)
    d, c, b = sized(backend, (8, 5, 12), (16, 10, 40))
    module = ik.IDIDLoss(d, c, backend=backend, tau=1.3).to(dev)
    with torch.no_grad():
        module.proxies.copy_(torch.randn(c, d, generator=g))
        module.similarity.copy_(torch.randn(c, c, generator=g))
    x = torch.randn(b, d, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g).to(dev)
    labels[1] = IGNORE
    loss = module(x, labels)
    loss.backward()
    truth_in = [t.detach().cpu().double().requires_grad_(True) for t in (x, module.proxies, module.similarity)]
    truth = ik.idid_loss(*truth_in, labels.cpu(), tau=1.3, backend="reference")
    truth.backward()
    assert rel_err(loss.detach().cpu(), truth) <= F32_TOL[0]
    for p, t in zip((x, module.proxies, module.similarity), truth_in):
        assert p.grad is not None and rel_err(p.grad.cpu(), t.grad) <= F32_TOL[1]


# ------------------------------------------------------------------------------------------------
# GPU-only: no host synchronisation, CUDA graphs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", GPU_NATIVE)
def test_forward_backward_do_not_synchronise(backend, monkeypatch):
    # Layout, counts, K_B, K_2, lambda and the upstream coefficients stay on the device. The label
    # range check reads the labels on the host by design: it is off here, as under graph capture.
    if not on_gpu(backend):
        pytest.skip("host synchronisation is a GPU matter")
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    g = make_gen(71)
    tensors, labels = _inputs(72, _labels("mixed", 1500, 300, g), c=300, d=64)
    labels = labels.to(backend_device(backend))

    def step():
        leaves = _leaves(backend, tensors, F32)
        out = ik.idid_loss(*leaves, labels, backend=backend, return_terms=True)
        return out, torch.autograd.grad(out.loss, leaves)

    step()  # autotuning, lazy initialisation
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(out.loss) and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("backend", GPU_NATIVE)
def test_cuda_graph_replays_with_new_features_and_labels(backend):
    """Forward and backward captured once, then replayed on new features and new labels (other class
    counts, ignored rows) match eager calls on those inputs."""
    if not on_gpu(backend):
        pytest.skip("CUDA graph capture needs a GPU")
    b, c, d = 257, 129, 96
    g = make_gen(33)
    first = _labels("mixed", b, c, g)
    second = _labels("imbalanced", b, c, g)
    second[:3] = IGNORE
    tensors, labels = _inputs(34, first, c, d)
    static = _leaves(backend, tensors, F32)
    static_labels = labels.to(static[0].device)
    kw = _kw()

    def step(inputs, y):
        terms = ik.idid_loss(*inputs, y, backend=backend, return_terms=True, **kw)
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
    new_tensors, new_labels = _inputs(35, second, c, d)
    new_leaves = _leaves(backend, new_tensors, F32)
    with torch.no_grad():
        for st, t in zip(static, new_leaves):
            st.copy_(t)
        static_labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(new_leaves, new_labels.to(static_labels.device))
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# labels out of range with the Python-side check off (torch.compile, graph capture, or
# IDID_KERNELS_CHECK_LABELS=0): each backend's documented outcome
# ------------------------------------------------------------------------------------------------

C_BAD = 5
BASE = [0, 1, 0, 2, 1, 0, IGNORE, 3, 0, 1, 4, 2, 2, 0, 1, 3, 0, 1, 0]  # 19 rows: 3 dW row splits interpreted
BAD = [-5, -1, C_BAD, C_BAD + 7]


def _bad_batch(bad, c, seed):
    """(x, proxies, similarity) float32 CPU masters, the labels with row 4 set to ``bad`` and the same
    labels with row 4 ignored instead."""
    base = torch.tensor([v % c if v != IGNORE else v for v in BASE])
    labels, ignored = base.clone(), base.clone()
    labels[4], ignored[4] = bad, IGNORE
    tensors, _ = _inputs(seed, base, c, d=6)
    return tensors, labels, ignored


def _outcome(backend, tensors, labels, upstream, **kw):
    return _run(backend, tensors, labels, F32, upstream, **kw)


def _assert_bad_label_outcome(backend, bad, c, upstream=(1.0, 0.0, 0.0), control=True, **kw):
    tensors, labels, ignored = _bad_batch(bad, c, seed=1 + c)
    kw = _kw(**kw)
    if backend == "reference":  # index_select with the label
        with pytest.raises(IndexError):
            _outcome(backend, tensors, labels, upstream, **kw)
        return
    if backend == "cpp":  # the CPU kernel checks the labels itself
        with pytest.raises(RuntimeError, match=rf"idid_loss: label {bad} at row 4 is outside \[0, {c}\)"):
            _outcome(backend, tensors, labels, upstream, **kw)
        return
    terms, grads = _outcome(backend, tensors, labels, upstream, **kw)
    if control or backend == "cuda":  # the same batch with that row ignored instead is finite
        control, control_grads = _outcome(backend, tensors, ignored, upstream, **kw)
        assert all(torch.isfinite(v) for v in control) and all(torch.isfinite(gr).all() for gr in control_grads)
    if backend == "triton":
        # Never used as an index (it sorts after the ignored rows); every term and every gradient
        # element is NaN, whatever the upstream gradient.
        assert all(bool(torch.isnan(v)) for v in terms), terms
        flowing = grads if kw["distillation"] else grads[:2]  # no similarity gradient without distillation
        assert all(bool(torch.isnan(gr).all()) for gr in flowing)
        return
    # cuda: the row takes no part (as if ignored) and L_IC is NaN, so the loss and the adaptive
    # lambda are NaN; L_ID is the ignored batch's. Gradients: dproxies and dsimilarity are the ignored
    # batch's; so is dx unless the NaN adaptive lambda enters its diversity pull (g_loss * lambda).
    assert bool(torch.isnan(terms.loss)) and bool(torch.isnan(terms.l_ic))
    assert torch.equal(terms.l_id, control.l_id)
    nan_lambda = kw["diversity"] and kw["adaptive_weight"]
    assert bool(torch.isnan(terms.lam)) if nan_lambda else torch.equal(terms.lam, control.lam)
    assert torch.equal(grads[1], control_grads[1]) and torch.equal(grads[2], control_grads[2])
    if nan_lambda:
        assert bool(torch.isnan(grads[0]).any())
    else:
        assert torch.equal(grads[0], control_grads[0])


@pytest.fixture
def no_label_check(monkeypatch):
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")


@pytest.mark.parametrize("backend,case", per_backend(ALL, lambda b: [
    (bad, c) for bad in BAD for c in (2, C_BAD) if c == C_BAD or bad == -1 or not is_slow(b)]))
def test_out_of_range_label(backend, case, no_label_check):
    bad, c = case
    bad = {C_BAD: c, C_BAD + 7: c + 7}.get(bad, bad)
    _assert_bad_label_outcome(backend, bad, c)


@pytest.mark.parametrize("backend,case", per_backend(ALL, lambda b: [
    (bad, switch) for bad in ((-1,) if is_slow(b) else (-1, C_BAD))
    for switch in ("distillation", "diversity", "adaptive_weight", "class_balanced")]))
def test_out_of_range_label_every_switch(backend, case, no_label_check):
    bad, switch = case
    _assert_bad_label_outcome(backend, bad, C_BAD, upstream=(1.0, 0.5, -0.25), control=False, **{switch: False})


@pytest.mark.parametrize("backend,mode", per_backend(ALL, lambda b: ["deterministic", "default"]))
def test_out_of_range_label_whatever_the_upstream(backend, mode, no_label_check):
    # A zero upstream gradient, through both of triton's dW reductions (atomic and per-split buffers).
    with deterministic(mode == "deterministic"):
        _assert_bad_label_outcome(backend, -5, C_BAD, upstream=(0.0, 0.0, 0.0), control=False)


@pytest.mark.parametrize("backend", ALL)
def test_ignore_index_inside_the_class_range_is_still_ignored(backend, no_label_check):
    # ignore_index = 2 is a valid class id: rows labelled 2 are ignored, not out of range.
    labels = torch.tensor([v if v != IGNORE else 2 for v in BASE])
    tensors, _ = _inputs(4, labels, C_BAD, d=6)
    out, grads = _run(backend, tensors, labels, F32, (1.0, 0.5, -0.25), **_kw(ignore_index=2))
    truth, truth_grads = _truth(tensors, labels, (1.0, 0.5, -0.25), **_kw(ignore_index=2))
    assert max(rel_err(a.cpu(), b) for a, b in zip(out, truth)) <= F32_TOL[0]
    assert max(rel_err(a.cpu(), b) for a, b in zip(grads, truth_grads)) <= F32_TOL[1]
