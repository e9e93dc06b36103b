"""The triton backend of class_density (idid_kernels/triton/class_density.py) against the float64
reference: float64 agreement and gradcheck, float32 tolerances, imbalanced label layouts, bitwise
repeatability (no atomics on either path), the op plumbing and low precision.

Without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at tiny
shapes; with a GPU the same tests run natively at larger sizes, plus bfloat16.
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen, rel_err
from idid_kernels import _backends

pytest.importorskip("idid_kernels.triton.class_density", reason="triton is not installed")

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
F32, F64 = torch.float32, torch.float64
HALF = [torch.float16, torch.bfloat16] if GPU else [torch.float16]
# (B, C, d); the interpreter's blocks are 8 rows and 32 features wide.
MID = (19, 5, 33) if not GPU else (1031, 129, 200)


def _labels(pattern, b, c, g):
    if pattern == "mixed":
        return torch.randint(0, c, (b,), generator=g)
    if pattern == "singletons":  # every class at most once: D = 0 everywhere
        return torch.randperm(max(b, c), generator=g)[:b] % c if b <= c else torch.arange(b) % c
    if pattern == "one_class":
        return torch.full((b,), c - 1, dtype=torch.long)
    if pattern == "skewed":  # one large class spanning several row blocks, singletons, absent classes
        y = torch.full((b,), 1, dtype=torch.long)
        y[-2:] = torch.tensor([3, 4])
        return y[torch.randperm(b, generator=g)]
    raise ValueError(pattern)


def _run(x, labels, c, t, upstream, backend):
    out = ik.class_density(x, labels, c, t=t, backend=backend)
    (grad,) = torch.autograd.grad(out, x, upstream)
    return out, grad


def _compare(b, c, d, pattern, dtype, out_tol, grad_tol, seed, t=2.0):
    g = make_gen(seed)
    labels = _labels(pattern, b, c, g).to(DEV)
    x = torch.randn(b, d, generator=g, dtype=F64).to(DEV)
    upstream = torch.randn(c, generator=g, dtype=F64).to(DEV)
    truth, truth_grad = _run(x.clone().requires_grad_(True), labels, c, t, upstream, "reference")
    out, grad = _run(x.to(dtype).requires_grad_(True), labels, c, t, upstream.to(dtype), "triton")
    assert out.dtype == dtype and grad.dtype == dtype
    assert rel_err(out, truth) <= out_tol
    assert rel_err(grad, truth_grad) <= grad_tol
    return out, truth


def test_registered_and_selected():
    import idid_kernels.triton.class_density  # noqa: F401  (registers the ops)
    assert hasattr(torch.ops.idid_kernels, "triton_class_density_forward")
    assert hasattr(torch.ops.idid_kernels, "triton_class_density_backward")
    assert _backends.select_backend("class_density", "triton", DEV) == "triton"
    assert _backends.select_backend("class_density", "auto", DEV) != "triton" or GPU


@pytest.mark.parametrize("pattern", ["mixed", "singletons", "one_class", "skewed"])
def test_float64_matches_reference(pattern):
    b, c, d = MID
    _compare(b, c, d, pattern, F64, 1e-12, 1e-10, seed=1, t=1.7)


@pytest.mark.parametrize("shape", [(1, 2, 3), (6, 13, 16), (19, 1, 33)] if not GPU
                         else [(1, 2, 3), (257, 1001, 64), (4099, 3, 512)], ids=lambda s: "B%d-C%d-d%d" % s)
def test_float32_shapes(shape):
    b, c, d = shape
    _compare(b, c, d, "mixed", F32, 1e-5, 1e-4, seed=2)


def test_float32_skewed_and_singletons():
    b, c, d = MID
    out, _ = _compare(b, c, d, "skewed", F32, 1e-5, 1e-4, seed=3)
    assert out[0] == 0 and out[3] == 0 and out[4] == 0  # absent class and singletons
    out, _ = _compare(b, max(b, c), d, "singletons", F32, 1e-5, 1e-4, seed=4)
    assert torch.equal(out, torch.zeros_like(out))


def test_gradcheck_float64():
    g = make_gen(5)
    labels = torch.tensor([0, 2, 0, 1, 0, 2], device=DEV)  # class 1 a singleton, 3 and 4 absent
    x = torch.randn(6, 2, generator=g, dtype=F64).to(DEV).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ik.class_density(a, labels, 5, t=1.5, backend="triton"), (x,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_bitwise_repeatable_and_independent_of_deterministic_mode():
    b, c, d = MID
    g = make_gen(6)
    labels = _labels("mixed", b, c, g).to(DEV)
    x = torch.randn(b, d, generator=g).to(DEV)
    upstream = torch.randn(c, generator=g).to(DEV)
    first = _run(x.clone().requires_grad_(True), labels, c, 2.0, upstream, "triton")
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        second = _run(x.clone().requires_grad_(True), labels, c, 2.0, upstream, "triton")
    finally:
        torch.use_deterministic_algorithms(saved)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.skipif(not GPU, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_replays_with_new_inputs():
    b, c, d = MID
    g = make_gen(10)
    x = torch.randn(b, d, generator=g).to(DEV).requires_grad_(True)
    labels = _labels("mixed", b, c, g).to(DEV)
    upstream = torch.randn(c, generator=g).to(DEV)

    def step(a, y):
        out = ik.class_density(a, y, c, backend="triton")
        return (out, *torch.autograd.grad(out, a, upstream))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # autotuning before the capture
            step(x, labels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x, labels)
    new_x = torch.randn(b, d, generator=g).to(DEV)
    new_labels = _labels("skewed", b, c, g).to(DEV)
    with torch.no_grad():
        x.copy_(new_x)
        labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(new_x.clone().requires_grad_(True), new_labels)
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_half_within_twice_eager_error(dtype):
    b, c, d = MID
    g = make_gen(7)
    labels = _labels("mixed", b, c, g).to(DEV)
    x = torch.randn(b, d, generator=g, dtype=F64).to(DEV)
    upstream = torch.randn(c, generator=g, dtype=F64).to(DEV)
    truth, truth_grad = _run(x.clone().requires_grad_(True), labels, c, 2.0, upstream, "reference")

    def errors(backend):
        out, grad = _run(x.to(dtype).requires_grad_(True), labels, c, 2.0, upstream.to(dtype), backend)
        assert out.dtype == dtype and grad.dtype == dtype
        return rel_err(out, truth), rel_err(grad, truth_grad)

    eager = errors("reference")
    ours = errors("triton")
    assert ours[0] <= 2 * eager[0] + 1e-2
    assert ours[1] <= 2 * eager[1] + 1e-2


def test_no_grad_and_inputs_untouched():
    g = make_gen(8)
    x = torch.randn(10, 12, generator=g).to(DEV)[:, ::3]  # non-contiguous
    labels = torch.tensor([0, 1, 0, 1, 2, 0, 0, 1, 3, 0], device=DEV)
    before = x.clone(), labels.clone()
    with torch.no_grad():
        out = ik.class_density(x, labels, 4, backend="triton")
    assert not out.requires_grad
    assert torch.equal(x, before[0]) and torch.equal(labels, before[1])
    truth = ik.class_density(x.double(), labels, 4, backend="reference")
    assert rel_err(out, truth) <= 1e-5


def test_opcheck_and_compile():
    import idid_kernels.triton.class_density  # noqa: F401
    fwd = torch.ops.idid_kernels.triton_class_density_forward.default
    bwd = torch.ops.idid_kernels.triton_class_density_backward.default
    g = make_gen(9)
    x = torch.randn(9, 5, generator=g).to(DEV).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 0, 1], device=DEV)
    torch.library.opcheck(fwd, (x, labels, 4, 1.5))
    with torch.no_grad():
        _, norm, layout, offsets = fwd(x, labels, 4, 1.5)
    torch.library.opcheck(bwd, (torch.randn(4, generator=g).to(DEV), x.detach(), norm, layout, offsets, 1.5))

    def f(a):
        return (ik.class_density(a, labels, 4, t=1.5, backend="triton") ** 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_(True)
    eager = f(x2)
    (eager_grad,) = torch.autograd.grad(eager, x2)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad)
