"""Timing and memory helpers shared by the benchmark scripts (CPU and GPU).

Every figure is a ratio measured side by side in one run; a test never asserts on time.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15, device: str = "cpu") -> tuple[float, float]:
    """(median, interquartile spread) of ``fn()`` wall time in milliseconds.

    On CUDA uses triton.testing.do_bench when triton is importable, else CUDA events."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
            qs = do_bench(fn, quantiles=[0.25, 0.5, 0.75])
            return qs[1], qs[2] - qs[0]
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def forward_backward(loss_fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running loss_fn(*inputs) forward and backward (grads cleared each call)."""
    def step():
        for t in inputs:
            t.grad = None
        out = loss_fn(*inputs)
        (out if out.dim() == 0 else out.sum()).backward()
    return step
