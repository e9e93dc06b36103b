"""Timing and peak-memory probes for one forward+backward step (CPU and CUDA).

Timing. CPU: ``time.perf_counter`` around each step after a warm-up; the step is repeated until
``max_repeats`` or a time budget is reached (at least ``min_repeats``), and the median and the
quartiles are reported. The implementations of one case are timed interleaved (``time_steps``):
rounds of a short block of each step in turn, a short step after one untimed settling call, so
that a drifting machine load moves them together. CUDA: ``triton.testing.do_bench`` (warm-up, L2
flush, quantiles) when triton is importable, else CUDA events around each step.

Peak memory. CUDA: growth of ``torch.cuda.max_memory_allocated`` over one step (the caching
allocator's live tensors, not what it has reserved). CPU (Linux): growth of the process's peak
resident set (VmHWM) over one step. Two details keep that honest inside a long-running process:
``malloc_trim(0)`` first hands every free heap page back to the kernel, so memory that earlier
steps freed must be faulted in again and counts; and writing 5 to ``/proc/self/clear_refs`` resets
VmHWM to the current RSS, so the high-water mark is this step's alone; and the scratch block that
the CPU kernels keep between calls (idid_kernels.empty_cache) is freed first, so it counts too.
Elsewhere memory is not
measured (reported as NaN) rather than guessed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .._scratch import empty_cache


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    repeats: int
    method: str

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, statistics.median(times), q3


def time_cpu(step: Callable[[], object], *, warmup: int = 1, min_repeats: int = 5, max_repeats: int = 30,
             budget_s: float = 1.0) -> Timing:
    """Median and quartiles (ms) of ``step()`` wall time on the CPU."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    q1, med, q3 = _quartiles(times)
    return Timing(med, q1, q3, len(times), "perf_counter")


def time_cpu_interleaved(steps: list[Callable[[], object]], *, warmup: int = 1, min_repeats: int = 5,
                         max_repeats: int = 30, budget_s: float = 1.0, block_s: float = 0.05,
                         settle_s: float = 0.01) -> list[Timing]:
    """Median and quartiles (ms) of each of ``steps`` on the CPU, timed in rounds. A round runs a
    block of each step in turn (starting one step later than the round before): a step shorter than
    ``settle_s`` first runs once untimed, so that the allocator state and caches another step left
    behind are not charged to its first timed call, then ``block_s`` worth of timed calls (at least
    one), sized by one call of each step before the rounds. Rounds go on until every step has
    ``min_repeats`` timed calls and either all have ``max_repeats`` or ``budget_s`` per step has
    passed. Steps measured this way see the same machine
    load, so their ratios hold where the load drifts during the run, which back-to-back timings of
    one step after another would turn into a ratio."""
    if max_repeats < min_repeats:
        raise ValueError(f"max_repeats ({max_repeats}) must be >= min_repeats ({min_repeats})")
    k = len(steps)
    estimate = []  # one call each (after ``warmup`` untimed ones) sizes the blocks; not a sample
    for step in steps:
        for _ in range(warmup):
            step()
        t0 = time.perf_counter()
        step()
        estimate.append(time.perf_counter() - t0)
    # blocks of at most a quarter of max_repeats: a step's calls spread over four rounds or more
    cap = max(1, -(-max_repeats // 4))
    per_block = [max(1, min(cap, int(block_s / max(t, 1e-9)))) for t in estimate]
    times: list[list[float]] = [[] for _ in steps]
    start = time.perf_counter()
    rounds = 0

    def more() -> bool:
        if any(len(t) < min_repeats for t in times):
            return True
        return any(len(t) < max_repeats for t in times) and time.perf_counter() - start < budget_s * k

    while more():
        for j in range(k):
            i = (rounds + j) % k
            if len(times[i]) >= max_repeats:
                continue
            if estimate[i] < settle_s:
                steps[i]()
            for _ in range(min(per_block[i], max_repeats - len(times[i]))):
                t0 = time.perf_counter()
                steps[i]()
                times[i].append(1e3 * (time.perf_counter() - t0))
        rounds += 1
    out = []
    for t in times:
        q1, med, q3 = _quartiles(t)
        out.append(Timing(med, q1, q3, len(t), "perf_counter, interleaved blocks"))
    return out


def time_cuda(step: Callable[[], object], *, warmup: int = 3, min_repeats: int = 10, max_repeats: int = 100,
              budget_s: float = 1.0) -> Timing:
    """Median and quartiles (ms) of ``step()`` on the current CUDA device."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        q1, med, q3 = do_bench(step, warmup=25, rep=max(25, int(budget_s * 1000)), quantiles=[0.25, 0.5, 0.75])
        return Timing(med, q1, q3, -1, "triton.testing.do_bench")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() - start < budget_s):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    q1, med, q3 = _quartiles(times)
    return Timing(med, q1, q3, len(times), "cuda events")


def time_step(step: Callable[[], object], device: torch.device, **kw) -> Timing:
    return time_cuda(step, **kw) if device.type == "cuda" else time_cpu(step, **kw)


def time_steps(steps: list[Callable[[], object]], device: torch.device, **kw) -> list[Timing]:
    """Timings of several steps: interleaved on the CPU (:func:`time_cpu_interleaved`), one after
    another on a GPU (whose timings do not share cores with the rest of the machine)."""
    if device.type == "cuda":
        return [time_cuda(step, **kw) for step in steps]
    return time_cpu_interleaved(steps, **kw)


# ----------------------------------------------------------------------------------- memory

def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class _RssProbe:
    """Peak RSS growth of one call (Linux); ``why_not`` says why it cannot run elsewhere."""

    def __init__(self):
        self.why_not: str | None = None
        self._trim = None
        if not sys.platform.startswith("linux"):
            self.why_not = f"peak RSS is read from /proc (Linux only; this is {sys.platform})"
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_mb("VmHWM")
        except OSError as exc:
            self.why_not = f"cannot reset the peak RSS ({exc})"
            return
        libc_name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(libc_name)
            self._trim = libc.malloc_trim
        except (OSError, AttributeError, TypeError):
            self._trim = None  # not glibc: freed memory may be reused unseen; still measured

    def measure(self, fn: Callable[[], object]) -> float:
        # The scratch block kept from the previous call is already resident: freed first, the step
        # maps it again and its pages count, as they do in the first step of a training run.
        empty_cache()
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_mb("VmRSS")
        fn()
        return _proc_status_mb("VmHWM") - base


_rss_probe: _RssProbe | None = None


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "growth of torch.cuda.max_memory_allocated over one step"
    global _rss_probe
    _rss_probe = _rss_probe or _RssProbe()
    if _rss_probe.why_not:
        return f"not measured: {_rss_probe.why_not}"
    return ("growth of the peak RSS (VmHWM) over one step, after freeing the kept CPU scratch block "
            "(idid_kernels.empty_cache), malloc_trim(0) and a VmHWM reset (/proc/self/clear_refs); median of 3 steps")


def peak_memory_mb(fn: Callable[[], object], device: torch.device, *, repeats: int = 1,
                   before: Callable[[], object] | None = None) -> float:
    """Extra memory (MiB) that one call of ``fn`` needs at its peak; NaN where not measurable.

    With ``repeats`` > 1 the median over that many calls (``before()`` runs ahead of each, outside
    the measurement): on a CPU the peak RSS moves by some 10% from call to call with the order in
    which the allocator reuses freed blocks."""
    if repeats > 1 or before is not None:
        values = []
        for _ in range(repeats):
            if before is not None:
                before()
            values.append(peak_memory_mb(fn, device))
        return statistics.median(values)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    global _rss_probe
    _rss_probe = _rss_probe or _RssProbe()
    if _rss_probe.why_not:
        return float("nan")
    return _rss_probe.measure(fn)


# ------------------------------------------------------------------------- machine contention

def proc_table() -> dict[int, tuple[str, int, float]]:
    """pid -> (state, parent pid, CPU seconds) of every process, from /proc/<pid>/stat (Linux)."""
    tck = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (rest[0], int(rest[1]), (int(rest[11]) + int(rest[12])) / tck)
    return table


def _own_cpu_s() -> float:
    """CPU seconds used by this process, its reaped children and its live descendants (e.g.
    torch.compile's compiler workers), from /proc on Linux."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me = os.getpid()
    table = proc_table()
    parents = {pid: row[1] for pid, row in table.items()}
    ticks = {pid: row[2] for pid, row in table.items()}
    for pid in parents:
        p, seen = parents[pid], 0
        while p not in (0, 1, me) and p in parents and seen < 64:
            p, seen = parents[p], seen + 1
        if p == me and pid != me:
            total += ticks[pid]
    return total


def _proc_stat() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    tck = os.sysconf("SC_CLK_TCK")
    total = sum(values) / tck
    idle = (values[3] + values[4]) / tck
    return total - idle, total


class ContentionMonitor:
    """How many cores other processes kept busy, on average, between :meth:`start` and :meth:`stop`
    (the machine's busy CPU time minus this process tree's). None where /proc is missing."""

    def start(self) -> "ContentionMonitor":
        try:
            self._start = (_proc_stat(), _own_cpu_s())
        except (OSError, ValueError, IndexError, AttributeError):
            self._start = None
        return self

    def stop(self) -> float | None:
        if self._start is None:
            return None
        try:
            (busy1, total1), own1 = _proc_stat(), _own_cpu_s()
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        (busy0, total0), own0 = self._start
        ncpu = os.cpu_count() or 1
        wall = (total1 - total0) / ncpu
        if wall <= 0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
