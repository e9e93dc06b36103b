"""The CPU scratch block kept between calls (csrc/cpu/scratch.h, idid_kernels._scratch): what is
kept, that keeping it changes no bit of any result (also with the block in use by another thread, or
grown between calls), that empty_cache / keep_scratch / IDID_KERNELS_KEEP_SCRATCH free or disable it,
and that the bench's peak memory counts it."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import idid_kernels as ik
from idid_kernels import _chunks
from idid_kernels.bench.measure import memory_method, peak_memory_mb

pytestmark = pytest.mark.skipif("cpp" not in ik.available_backends(), reason="idid_kernels._C is not built")


@pytest.fixture(autouse=True)
def _restore_keep():
    before = ik.keep_scratch()
    yield
    ik.keep_scratch(before)
    ik.empty_cache()


def _inputs(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(c, d, generator=g, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    return x, w, y


def _step(x, w, y, reduction="mean"):
    x.grad = w.grad = None
    loss = ik.cm_margin_loss(x, w, y, s=30.0, margin="cosface", contraction="sigmoid", reduction=reduction,
                             backend="cpp")
    loss.sum().backward()
    return loss.detach().clone(), x.grad.clone(), w.grad.clone()


def _same(a, b):
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_kept_block_holds_the_chunk_and_changes_no_bit(reduction):
    x, w, y = _inputs(96, 16, 700, seed=1)
    ik.keep_scratch(False)
    fresh = _step(x, w, y, reduction)
    assert ik.scratch_bytes() == 0
    ik.keep_scratch(True)
    first = _step(x, w, y, reduction)
    held = ik.scratch_bytes()
    assert held >= 96 * 700 * 4  # one chunk of all 96 rows (float32 accumulation)
    again = _step(x, w, y, reduction)  # reuses the block
    assert ik.scratch_bytes() == held
    _same(first, fresh)
    _same(again, fresh)
    with torch.no_grad():  # the class-tiled forward leases it too
        kept = ik.cm_margin_loss(x, w, y, s=30.0, backend="cpp", reduction=reduction)
        ik.keep_scratch(False)
        assert torch.equal(ik.cm_margin_loss(x, w, y, s=30.0, backend="cpp", reduction=reduction), kept)
        ik.keep_scratch(True)
        ik.cm_margin_loss(x, w, y, s=30.0, backend="cpp", reduction=reduction)
    assert ik.empty_cache() == held
    assert ik.scratch_bytes() == 0 and ik.empty_cache() == 0


def test_none_graph_holds_the_block_until_it_is_freed():
    # reduction="none" keeps its (N, C) logit gradients on the block from forward to backward: a call
    # in between takes a fresh buffer (same bits), empty_cache() frees nothing while the graph holds
    # it, and the block is free again once backward has released the saved tensors.
    ik.keep_scratch(True)
    ik.empty_cache()
    x, w, y = _inputs(64, 16, 900, seed=7)
    other = _inputs(32, 16, 500, seed=8)
    ik.keep_scratch(False)
    want, want_other = _step(x, w, y, "none"), _step(*other)
    ik.keep_scratch(True)
    x.grad = w.grad = None
    loss = ik.cm_margin_loss(x, w, y, s=30.0, margin="cosface", contraction="sigmoid", reduction="none",
                             backend="cpp")
    held = ik.scratch_bytes()
    assert held >= 64 * 900 * 4
    _same(_step(*other), want_other)  # the block is in use: a fresh buffer
    assert ik.empty_cache() == 0 and ik.scratch_bytes() == held
    loss.sum().backward()  # frees the saved tensors (retain_graph=False)
    _same((loss.detach(), x.grad, w.grad), want)
    assert ik.empty_cache() == held and ik.scratch_bytes() == 0


def test_block_grows_and_smaller_calls_reuse_it():
    ik.keep_scratch(True)
    ik.empty_cache()
    small, large = _inputs(40, 8, 300, seed=2), _inputs(64, 8, 2000, seed=3)
    ik.keep_scratch(False)
    want_small, want_large = _step(*small), _step(*large)
    ik.keep_scratch(True)
    _same(_step(*small), want_small)
    after_small = ik.scratch_bytes()
    _same(_step(*large), want_large)
    after_large = ik.scratch_bytes()
    assert after_large > after_small >= 40 * 300 * 4
    _same(_step(*small), want_small)
    assert ik.scratch_bytes() == after_large


def test_chunked_calls_share_the_block(monkeypatch):
    # 0.05 MiB: 13-row chunks of 1000 float32 classes, the buffer reused chunk after chunk.
    monkeypatch.setenv("IDID_KERNELS_CHUNK_MB", "0.05")
    _chunks.reload()
    x, w, y = _inputs(50, 8, 1000, seed=4)
    ik.keep_scratch(False)
    want = _step(x, w, y)
    ik.keep_scratch(True)
    _same(_step(x, w, y), want)
    assert 13 * 1000 * 4 <= ik.scratch_bytes() < 50 * 1000 * 4


def test_threads_in_flight_at_once_get_their_own_buffers():
    ik.keep_scratch(True)
    cases = [_inputs(128, 32, 3000, seed=10 + k) for k in range(4)]
    ik.keep_scratch(False)
    want = [_step(*c) for c in cases]
    ik.keep_scratch(True)
    got = [None] * len(cases)
    errors = []

    def work(k):
        try:
            x, w, y = (t.detach().clone().requires_grad_(t.requires_grad) for t in cases[k])
            for _ in range(3):
                got[k] = _step(x, w, y)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, w_ in zip(got, want):
        _same(g, w_)


def test_keep_scratch_switch():
    ik.keep_scratch(True)
    _step(*_inputs(32, 8, 500, seed=5))
    assert ik.scratch_bytes() > 0
    assert ik.keep_scratch(False) is False
    assert ik.scratch_bytes() == 0  # turning it off frees the block
    _step(*_inputs(32, 8, 500, seed=5))
    assert ik.scratch_bytes() == 0
    assert ik.keep_scratch() is False and ik.keep_scratch(True) is True
    with pytest.raises(TypeError, match="keep must be a bool or None, got int"):
        ik.keep_scratch(1)


def test_environment_turns_keeping_off():
    code = ("import torch, idid_kernels as ik\n"
            "x = torch.randn(16, 8); w = torch.randn(300, 8); y = torch.randint(0, 300, (16,))\n"
            "ik.cm_margin_loss(x, w, y, backend='cpp')\n"
            "print(ik.keep_scratch(), ik.scratch_bytes())\n")
    out = {}
    for value in ("0", "1"):
        env = dict(os.environ, IDID_KERNELS_KEEP_SCRATCH=value)
        out[value] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout.split()
    assert out["0"] == ["False", "0"]
    assert out["1"][0] == "True" and int(out["1"][1]) >= 16 * 300 * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_bench_peak_memory_counts_the_kept_block():
    if memory_method(torch.device("cpu")).startswith("not measured"):
        pytest.skip(memory_method(torch.device("cpu")))
    ik.keep_scratch(True)
    x, w, y = _inputs(512, 8, 20000, seed=6)  # a 39 MiB chunk, resident after the first call
    _step(x, w, y)
    assert ik.scratch_bytes() >= 512 * 20000 * 4
    peak = peak_memory_mb(lambda: _step(x, w, y), torch.device("cpu"))
    assert peak >= 0.9 * 512 * 20000 * 4 / 2**20
