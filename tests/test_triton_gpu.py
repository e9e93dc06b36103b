"""The Triton backend's GPU-only behaviour: no host synchronisation on the op path, CUDA-graph
capture, tensors on a device other than the current one, grids past the 65,535-program limit of
axes 1 and 2. Every test here needs a CUDA GPU (two for the multi-device ones) and is skipped
without; the interpreter-runnable halves of these checks live in test_triton_launch.py.
"""
from __future__ import annotations

import pytest
import torch

import idid_kernels as ik
from conftest import make_gen

pytest.importorskip("triton", reason="triton is not installed")

GPU = torch.cuda.is_available()
TWO_GPUS = GPU and torch.cuda.device_count() >= 2
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs")
F32, F64 = torch.float32, torch.float64
IGNORE = -100


def _cases(seed: int = 0, n: int = 300, c: int = 37, d: int = 48):
    """{op: (make_inputs(device) -> leaves and extras, run(*inputs) -> scalar)} for every Triton op,
    forward + backward through a random upstream gradient."""
    g = make_gen(seed)
    x, w, s = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((n, d), (c, d), (c, c)))
    y = torch.randint(0, c, (n,), generator=g)
    y_ignored = y.clone()
    y_ignored[::7] = IGNORE
    up_nm = torch.randn(n, c, generator=g, dtype=F64)
    up_n = torch.randn(n, generator=g, dtype=F64)
    up_c = torch.randn(c, generator=g, dtype=F64)

    def on(dev, *ts):
        return [t.to(dev, F32).requires_grad_(True) if t.is_floating_point() and t.dim() == 2 else
                (t.to(dev, F32) if t.is_floating_point() else t.to(dev)) for t in ts]

    return {
        "cm_margin_loss": (lambda dev: on(dev, x, w, y_ignored),
                           lambda x_, w_, y_: ik.cm_margin_loss(x_, w_, y_, margin="arcface", backend="triton")),
        "idid_loss": (lambda dev: on(dev, x, w, s, y_ignored),
                      lambda x_, w_, s_, y_: ik.idid_loss(x_, w_, s_, y_, tau=1.5, backend="triton")),
        "pairwise_cosine": (lambda dev: on(dev, x, w, up_nm),
                            lambda x_, w_, u_: (ik.pairwise_cosine(x_, w_, backend="triton") * u_).sum()),
        "class_density": (lambda dev: on(dev, x, y % 5, up_c[:5]),
                          lambda x_, y_, u_: (ik.class_density(x_, y_, 5, backend="triton") * u_).sum()),
        "norm_contraction": (lambda dev: on(dev, x, up_n),
                             lambda x_, u_: (ik.norm_contraction(x_, offset=0.3, temperature=1.7,
                                                                 backend="triton") * u_).sum()),
    }


OPS = list(_cases())


def _forward_backward(run, inputs):
    leaves = [t for t in inputs if t.requires_grad]
    out = run(*inputs)
    return (out.detach(), *torch.autograd.grad(out, leaves))


# -------------------------------------------------------------------------- host synchronisation
@needs_gpu
@pytest.mark.parametrize("op", OPS)
def test_op_does_not_synchronise_after_warm_up(monkeypatch, op):
    # The label range check reads the labels on the host by design (skipped under torch.compile and
    # graph capture); everything else, forward and backward, must stay on the device.
    monkeypatch.setenv("IDID_KERNELS_CHECK_LABELS", "0")
    make, run = _cases()[op]
    inputs = make("cuda")
    _forward_backward(run, inputs)  # compilation and autotuning synchronise; they happen once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = _forward_backward(run, inputs)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert all(torch.isfinite(r).all() for r in results)


# ------------------------------------------------------------------------------------ CUDA graphs
@needs_gpu
@pytest.mark.parametrize("op", ["norm_contraction", "pairwise_cosine"])
def test_cuda_graph_replays_on_new_inputs_equal_to_eager(op):
    # (idid_loss, class_density and cm_margin_loss have their own graph tests in their files.)
    make, run = _cases(seed=1)[op]
    static = make("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compilation, autotuning, lazy initialisation: before the capture
            _forward_backward(run, static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _forward_backward(run, static)
    fresh = _cases(seed=2)[op][0]("cuda")
    with torch.no_grad():
        for st, t in zip(static, fresh):
            st.copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    expected = _forward_backward(run, fresh)
    for a, e in zip(captured, expected):
        assert torch.equal(a, e)  # no atomics in these two ops: the same bits


# -------------------------------------------------------------------------------- multi-device
@needs_two_gpus
@pytest.mark.parametrize("op", OPS)
def test_op_on_a_device_that_is_not_current(op):
    # Tensors on cuda:1 while cuda:0 is current: every launch (and the autotuner's benchmark runs)
    # must go to cuda:1, with results equal to the same op run on cuda:0.
    make, run = _cases(seed=3)[op]
    with torch.cuda.device(0):
        expected = _forward_backward(run, make("cuda:0"))
        got = _forward_backward(run, make("cuda:1"))
        assert torch.cuda.current_device() == 0
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
    for a, e in zip(got, expected):
        assert a.device == torch.device("cuda:1")
        # the atomic dW sums of cm_margin_loss and idid_loss add in a varying order
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- grid axis limits
@needs_gpu
def test_pairwise_cosine_with_more_column_tiles_than_grid_axis_1_allows():
    # More column tiles than the 65,535 programs of grid axes 1 and 2 for every forward config
    # (BLOCK_N <= 128: M > 8.4M rows; the brief's 2.2M overflows 32-wide tiles only); the tiles are
    # folded onto axis 0. Memory: N * M * 4 bytes per (N, M) buffer; under 2 GB in all, float64 included.
    import torch.nn.functional as F
    from conftest import rel_err
    from idid_kernels.triton import pairwise_cosine as pc
    widest = max(cfg.kwargs["BLOCK_N"] for cfg in pc._FWD_CONFIGS)
    n, m, d = 2, 65_536 * widest + 17, 4
    g = torch.Generator("cuda").manual_seed(5)
    x = torch.randn(n, d, device="cuda", generator=g).requires_grad_(True)
    y = torch.randn(m, d, device="cuda", generator=g).requires_grad_(True)
    up = torch.randn(n, m, device="cuda", generator=g)
    out = ik.pairwise_cosine(x, y, backend="triton")
    dx, dy = torch.autograd.grad(out, (x, y), up)
    xr, yr = (t.detach().double().requires_grad_(True) for t in (x, y))
    truth = F.normalize(xr, dim=1) @ F.normalize(yr, dim=1).T
    tdx, tdy = torch.autograd.grad(truth, (xr, yr), up.double())
    assert rel_err(out, truth) <= 1e-5
    assert rel_err(dx, tdx) <= 1e-4 and rel_err(dy, tdy) <= 1e-4
