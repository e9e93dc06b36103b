"""The C++ extension's ops (cpp backend) against the float64 reference, plus the op plumbing:
gradcheck, opcheck, torch.compile, bitwise determinism, edge shapes and dtypes."""
import os

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _backends
from idid_kernels.reference import grads as ref_grads
from idid_kernels.reference import norm_contraction as ref_norm_contraction

HAVE_EXT = "cpp" in ik.available_backends()
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="idid_kernels._C is not built (IDID_KERNELS_NO_EXT)")


def test_extension_loaded_when_required():
    # .ci/run sets IDID_KERNELS_REQUIRE_EXT=1: there a missing extension is a failure, not a skip.
    if os.environ.get("IDID_KERNELS_REQUIRE_EXT") == "1":
        assert HAVE_EXT, _backends.missing("cpp")
    if HAVE_EXT:
        assert _backends.extension().with_cuda in (0, 1)
        assert hasattr(torch.ops.idid_kernels, "norm_contraction_forward")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@needs_ext
@pytest.mark.parametrize("offset,temperature", [(0.0, 1.0), (1.5, 0.5), (-2.0, 3.0)])
def test_norm_contraction_gradcheck_float64(offset, temperature):
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ik.norm_contraction(t, offset=offset, temperature=temperature, backend="cpp"), (x,))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (1, 64), (2, 3), (31, 17), (127, 128), (129, 255), (1000, 7)])
def test_norm_contraction_float32_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x64 = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    up = torch.randn(shape[0], generator=g, dtype=torch.float64)
    ref = ref_norm_contraction(x64, 0.5, 2.0)
    ref_dx = ref_grads.norm_contraction_backward(up, x64, 0.5, 2.0)
    x = x64.float().requires_grad_(True)
    out = ik.norm_contraction(x, offset=0.5, temperature=2.0, backend="cpp")
    (dx,) = torch.autograd.grad(out, x, up.float())
    assert out.dtype == torch.float32 and dx.dtype == torch.float32
    assert _rel(out, ref) <= 1e-5
    assert _rel(dx, ref_dx) <= 1e-4


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_contraction_low_precision_within_twice_eager_error(dtype):
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(65, 33, generator=g, dtype=torch.float64)
    up = torch.randn(65, generator=g, dtype=torch.float64)
    truth = ref_norm_contraction(x64)
    truth_dx = ref_grads.norm_contraction_backward(up, x64)

    def run(backend):
        x = x64.to(dtype).requires_grad_(True)
        out = ik.norm_contraction(x, backend=backend)
        (dx,) = torch.autograd.grad(out, x, up.to(dtype))
        assert out.dtype == dtype and dx.dtype == dtype
        return _rel(out, truth), _rel(dx, truth_dx)

    eager_out, eager_dx = run("reference")
    ours_out, ours_dx = run("cpp")
    assert ours_out <= 2 * eager_out + 1e-2
    assert ours_dx <= 2 * eager_dx + 1e-2


@needs_ext
def test_norm_contraction_zero_row_and_saturation():
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1] = 100.0  # sigmoid(200) == 1 exactly: g' = 0, no NaN
    x.requires_grad_(True)
    out = ik.norm_contraction(x, backend="cpp")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert out[0] == 0.5 and out[2] == 0.5
    assert torch.equal(x.grad[0], torch.zeros(4, dtype=torch.float64))  # subgradient 0 at a zero row
    assert float(out[1].detach()) == 1.0


@needs_ext
def test_norm_contraction_noncontiguous_input_and_no_inplace():
    base = torch.randn(10, 12, dtype=torch.float64)
    x = base[:, ::2]  # non-contiguous view
    before = x.clone()
    out = ik.norm_contraction(x, offset=0.2, backend="cpp")
    torch.testing.assert_close(out, ref_norm_contraction(x, 0.2, 1.0), rtol=1e-12, atol=0)
    assert torch.equal(x, before)


@needs_ext
def test_norm_contraction_bitwise_deterministic():
    x = torch.randn(513, 129)
    up = torch.randn(513)
    results = []
    for _ in range(2):
        xi = x.clone().requires_grad_(True)
        out = ik.norm_contraction(xi, backend="cpp")
        (dx,) = torch.autograd.grad(out, xi, up)
        results.append((out, dx))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@needs_ext
def test_norm_contraction_grad_of_saved_norm_output():
    # The op's second output (the saved norm) is differentiable too: d||x||/dx = x / ||x||.
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: torch.ops.idid_kernels.norm_contraction_forward(t, 0.3, 1.2)[1], (x,))
    assert torch.autograd.gradcheck(
        lambda t: sum(torch.ops.idid_kernels.norm_contraction_forward(t, 0.3, 1.2)), (x,))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_contraction_opcheck(dtype):
    x = torch.randn(9, 6, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.idid_kernels.norm_contraction_forward.default, (x, 0.5, 2.0))
    norm = torch.linalg.vector_norm(x.detach(), dim=1)
    grad = torch.randn(9, dtype=dtype)
    torch.library.opcheck(torch.ops.idid_kernels.norm_contraction_backward.default,
                          (grad, None, x.detach(), norm, 0.5, 2.0))


@needs_ext
def test_norm_contraction_compiles_fullgraph():
    def f(x):
        return (ik.norm_contraction(x, offset=0.5, backend="cpp") ** 2).sum()

    x = torch.randn(17, 8, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    x2 = x.detach().clone().requires_grad_(True)
    f(x2).backward()
    torch.testing.assert_close(loss, f(x2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)


@needs_ext
def test_auto_picks_cpp_on_cpu_for_norm_contraction():
    assert _backends.select_backend("norm_contraction", "auto", torch.device("cpu")) == "cpp"
    assert _backends.select_backend("cm_margin_loss", "auto", torch.device("cpu")) == "cpp"
