"""The benchmark runner: every implementation of each case side by side, checked, timed, measured.

For one case the implementations are: ``eager`` (the pure-PyTorch reference, i.e. the
``reference`` backend), ``compile`` (``torch.compile`` of that reference, compiled before timing),
every other backend that is available here and has a kernel for the op on the device
(``_backends.IMPLEMENTED`` and ``available_backends()``), and the case's externals
(pytorch-metric-learning and torch's own ``F.linear_cross_entropy`` for cm_margin_loss). First every
implementation runs step 1; then torch.compile's compiler workers are stopped, so that nothing else
of the package runs while a row is timed; then each one runs steps 2 and 3:

1. correctness: one forward + backward on the benchmark's own inputs, compared with the float64
   reference (output and every input gradient, relative error ||a - b|| / ||b||, ARCHITECTURE.md's
   tolerances; bf16/fp16 within 2x the eager error + 1e-2). A mismatch is marked and makes the run
   fail: a fast wrong kernel never looks good. This call also warms up (and compiles);
2. time of forward + backward (median and quartiles; see :mod:`.measure`), on a CPU every
   implementation and the case's bare GEMMs (its floor) in the same interleaved rounds. Rows whose
   IQR exceeds 20% of their median (``NOISY_IQR``) are measured again (together); a row still noisy
   is flagged;
3. peak extra memory of one forward + backward.

Triton on a CPU runs only in its interpreter (TRITON_INTERPRET=1), orders of magnitude slower than
native code: it is not timed there unless asked for by name.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .. import functional, reference
from .._gemm import cpu_gemm
from .._backends import BACKENDS, IMPLEMENTED, available_backends, missing, runs_on
from ..check import TOLERANCES, _rel
from .cases import Case, floor_uses_onednn
from .measure import ContentionMonitor, Timing, memory_method, peak_memory_mb, proc_table, time_step, time_steps
from .progress import Progress

OK, MISMATCH, ERROR, OOM, SKIPPED, UNCHECKED = "ok", "MISMATCH", "ERROR", "oom", "skipped", "UNCHECKED"


@dataclass
class BenchConfig:
    """How to run. ``backends=None`` runs every available backend (interpreted Triton excluded)."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    compile: bool = True
    externals: bool = True
    floor: bool = True
    backends: list[str] | None = None
    seed: int = 0
    min_repeats: int = 3
    max_repeats: int = 30
    budget_s: float = 0.5
    progress: bool = True


@dataclass
class Row:
    """One (case, implementation): a line of the table and of the CSV."""

    suite: str
    op: str
    config: str
    case: str
    N: int | None
    M: int | None
    d: int | None
    C: int | None
    impl: str
    dtype: str
    device: str
    kind: str = "backend"        # "reference" (eager), "compiled", "backend" or "external"
    median_ms: float = math.nan
    q1_ms: float = math.nan
    q3_ms: float = math.nan
    repeats: int = 0
    first_call_s: float = math.nan
    speedup_vs_eager: float = math.nan
    speedup_vs_compile: float = math.nan
    peak_mb: float = math.nan
    memory_vs_eager: float = math.nan
    floor_ms: float = math.nan
    floor_fraction: float = math.nan
    tflops: float = math.nan
    out_err: float = math.nan
    grad_err: float = math.nan
    tol_out: float = math.nan
    tol_grad: float = math.nan
    check: str = SKIPPED
    note: str = ""
    noisy: bool = False          # IQR above NOISY_IQR of the median, measured twice

    @property
    def failed(self) -> bool:
        """A wrong result anywhere, or a crash of this package's own code (the reference or a
        backend); a torch.compile or third-party crash is reported but is not this package's."""
        return self.check == MISMATCH or (self.check == ERROR and self.kind in ("reference", "backend"))


@dataclass
class BenchResult:
    rows: list[Row]
    meta: dict
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    @property
    def unchecked(self) -> list[Row]:
        return [r for r in self.rows if r.check == UNCHECKED]

    def as_dict(self) -> dict:
        return {"meta": self.meta, "notes": self.notes, "rows": [asdict(r) for r in self.rows]}


@dataclass
class _Impl:
    name: str
    fn: Callable[..., torch.Tensor]          # fn(*leaves) -> output
    leaves: list[torch.Tensor]               # what it differentiates
    to_case_grads: Callable[[list], list]    # its gradients in the case's input layout
    truth: str = "reference"                 # which float64 truth it is checked against
    kind: str = "backend"                    # Row.kind
    note: str = ""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _describe_error(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:160]}"


def _backend_names(op: str, device: torch.device, requested: list[str] | None) -> tuple[list[str], list[str]]:
    """(backends to run for ``op`` besides the reference, a note on each one left out)."""
    here = available_backends()
    run, notes = [], []
    for b in BACKENDS:
        if b == "reference" or (requested is not None and b not in requested):
            continue
        if b == "triton" and device.type == "cpu" and requested is None:
            notes.append("triton: not timed on the CPU: its kernels are GPU code, which a CPU runs only in "
                         "Triton's interpreter (TRITON_INTERPRET=1), orders of magnitude slower than native code; "
                         "pass --backends triton to time it anyway")
        elif b == "cuda" and device.type == "cpu" and requested is None:
            if b in here:
                notes.append("cuda: not timed on the CPU: there its kernels run under the CUDA emulator "
                             "(IDID_KERNELS_CUDA_EMULATE=1), one fiber per GPU thread; pass --backends cuda to "
                             "time it anyway")
            else:
                notes.append(f"cuda: not run, unavailable here ({missing(b)})")
        elif b not in here:
            notes.append(f"{b}: not run, unavailable here ({missing(b)})")
        elif b not in IMPLEMENTED[op]:
            notes.append(f"{b}: not run for {op}, which has no {b} kernel yet")
        elif not runs_on(b, device):
            notes.append(f"{b}: not run, it takes no {device.type} tensors")
        else:
            run.append(b)
    return run, notes


def _evaluate(fn, leaves, upstream):
    """(output, gradients of ``leaves``) of one forward + backward under ``upstream``."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream, allow_unused=True, materialize_grads=True)
    return out.detach(), [g.detach() for g in grads]


def _make_step(impl: _Impl, upstream):
    def step():
        for t in impl.leaves:
            t.grad = None
        out = impl.fn(*impl.leaves)
        out.backward(upstream)
    return step


def _clear_grads(impl: _Impl) -> None:
    for t in impl.leaves:
        t.grad = None


def _impls(case: Case, cfg: BenchConfig, device: torch.device, diff: list[torch.Tensor], const: list,
           notes: list[str]) -> list[_Impl]:
    ref = getattr(reference, case.op)
    api = getattr(functional, case.op)
    kw = case.kwargs
    same = lambda grads: grads  # noqa: E731

    def eager(*t):
        return ref(*t, *const, **kw)

    impls = [_Impl("eager", eager, diff, same, kind="reference")]
    if cfg.compile:
        # Compiled at the case's static shapes: the best code inductor makes for that size.
        compiled = torch.compile(lambda *t: ref(*t, *const, **kw), dynamic=False)
        impls.append(_Impl("compile", compiled, diff, same, kind="compiled"))
    backends, why = _backend_names(case.op, device, cfg.backends)
    notes.extend(why)
    for b in backends:
        impls.append(_Impl(b, lambda *t, b=b: api(*t, *const, **kw, backend=b), diff, same))
    if cfg.externals:
        for ext in case.externals:
            if ext.missing:
                notes.append(f"{ext.name}: column skipped, {ext.missing}")
                continue
            notes.append(f"{ext.name}: {ext.description}")
            leaves, fn, to_case = ext.build(diff, const)
            impls.append(_Impl(ext.name, fn, leaves, to_case, truth=ext.name, kind="external"))
    return impls


def _truth(case: Case, kwargs: dict, diff64: list[torch.Tensor], const: list, device: torch.device, upstream64):
    ref = getattr(reference, case.op)
    leaves = [t.detach().to(device, copy=True).requires_grad_(True) for t in diff64]
    up = None if upstream64 is None else upstream64.to(device)
    return _evaluate(lambda *t: ref(*t, *const, **kwargs), leaves, up)


class CaseRun:
    """One case made ready to run: inputs in the dtype under test, the float64 truths, and the
    implementations (:attr:`impls`). :meth:`check` then :meth:`measure` fill in one :class:`Row`;
    the pytest-benchmark suites use :meth:`check` and :meth:`step` with their own timer."""

    def __init__(self, case: Case, cfg: BenchConfig, *, with_truth: bool = True, reset_compiler: bool = True):
        if reset_compiler and cfg.compile:
            # Every case compiles afresh. Without this, dynamo's recompile limit (8 per code object)
            # would, after a few cases, silently run the "compiled" column in eager mode.
            torch.compiler.reset()
        self.case, self.cfg = case, cfg
        self.device = device = torch.device(cfg.device)
        self.dtype = cfg.dtype
        g = torch.Generator().manual_seed(cfg.seed)
        diff64, const64 = case.make(g)
        const = [c.to(device) if isinstance(c, torch.Tensor) else c for c in const64]
        # The upstream gradient: the scalar losses take 1, the primitives a fixed random tensor.
        shape = case.out_shape
        upstream64 = None if len(shape) == 0 else torch.randn(shape, generator=g, dtype=torch.float64)
        self.upstream = None if upstream64 is None else upstream64.to(device=device, dtype=self.dtype)
        self.truths = {"reference": _truth(case, case.kwargs, diff64, const, device, upstream64)} if with_truth else {}
        self.notes: list[str] = []
        self.inputs = [t.detach().to(device=device, dtype=self.dtype, copy=True).requires_grad_(True) for t in diff64]
        self.impls = _impls(case, cfg, device, self.inputs, const, self.notes)
        for ext in case.externals if with_truth else ():
            if any(i.truth == ext.name for i in self.impls):
                self.truths[ext.name] = _truth(case, {**case.kwargs, **ext.truth_kwargs}, diff64, const, device,
                                               upstream64)
        self._eager_err: tuple[float, float] | None = None

    def impl(self, name: str) -> _Impl | None:
        return next((i for i in self.impls if i.name == name), None)

    def step(self, impl: _Impl) -> Callable[[], None]:
        """One forward + backward of ``impl`` (its gradients cleared first)."""
        return _make_step(impl, self.upstream)

    def _row(self, impl: _Impl) -> Row:
        case, sizes = self.case, self.case.sizes
        return Row(case.suite, case.op, case.config, case.label, sizes.get("N"), sizes.get("M"), sizes.get("d"),
                   sizes.get("C"), impl.name, str(self.dtype).replace("torch.", ""), str(self.device), kind=impl.kind,
                   note=impl.note)

    def first_call(self, impl: _Impl) -> Row:
        """A new row for ``impl`` after one unchecked forward + backward (warm-up, compilation)."""
        row = self._row(impl)
        try:
            t0 = time.perf_counter()
            self.step(impl)()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            row.first_call_s = time.perf_counter() - t0
        except torch.OutOfMemoryError as exc:
            row.check, row.note = OOM, _describe_error(exc)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            row.check, row.note = ERROR, _describe_error(exc)
        _clear_grads(impl)
        return row

    def check(self, impl: _Impl) -> Row:
        """A new row for ``impl`` with its correctness verdict; the first call (warm-up, and
        torch.compile's compilation) is timed separately as ``first_call_s``."""
        dtype, device = self.dtype, self.device
        row = self._row(impl)
        try:
            t0 = time.perf_counter()
            out, grads = _evaluate(impl.fn, impl.leaves, self.upstream)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row.first_call_s = time.perf_counter() - t0
        except torch.OutOfMemoryError as exc:
            row.check, row.note = OOM, _describe_error(exc)
            return row
        except Exception as exc:  # a kernel or compiler failure is reported, and the run goes on
            row.check, row.note = ERROR, _describe_error(exc)
            return row
        truth_out, truth_grads = self.truths[impl.truth]
        row.out_err = _rel(out.cpu(), truth_out.cpu())
        case_grads = impl.to_case_grads(list(grads))
        row.grad_err = max((_rel(a.cpu(), b.cpu()) for a, b in zip(case_grads, truth_grads)), default=0.0)
        if impl.name == "eager":
            self._eager_err = (row.out_err, row.grad_err)
        if dtype in TOLERANCES:
            row.tol_out, row.tol_grad = TOLERANCES[dtype]
        elif self._eager_err is not None:  # low precision: held to the eager error in that dtype
            row.tol_out, row.tol_grad = 2 * self._eager_err[0] + 1e-2, 2 * self._eager_err[1] + 1e-2
        ok = row.out_err <= row.tol_out and row.grad_err <= row.tol_grad  # NaN (no tolerance) fails
        row.check = OK if ok else MISMATCH
        return row

    def time_rows(self, pairs: list[tuple[_Impl, Row]], *, with_floor: bool = False) -> float:
        """Time the steps of ``pairs`` into their rows (after :meth:`check`); with ``with_floor`` the
        case's bare GEMMs too, whose median is returned (NaN otherwise, or where they do not fit).
        On a CPU every step, the floor included, runs in the same interleaved rounds
        (:func:`.measure.time_steps`), so the ratios between them hold under a drifting load; on a
        GPU one after another."""
        cfg = self.cfg
        pairs = [(impl, row) for impl, row in pairs if row.check not in (ERROR, OOM)]
        kw = dict(min_repeats=cfg.min_repeats, max_repeats=cfg.max_repeats, budget_s=cfg.budget_s)
        floor = None
        if with_floor and self.case.floor is not None:
            try:  # the floor's own buffers (the bare GEMMs' outputs) may not fit: NaN then
                floor = self.case.floor([t.detach() for t in self.inputs])
                if self.device.type != "cuda":
                    floor()  # every other step has run once already (check or first_call)
            except torch.OutOfMemoryError:
                floor = None
        if self.device.type == "cuda":
            return self._time_each(pairs, floor, kw)
        steps = [self.step(impl) for impl, _ in pairs] + ([floor] if floor is not None else [])
        try:
            timings = time_steps(steps, self.device, warmup=0, **kw)
        except torch.OutOfMemoryError:  # one of them does not fit beside the others: each alone
            return self._time_each(pairs, floor, kw)
        for (impl, row), timing in zip(pairs, timings):
            self._fill(row, timing)
            _clear_grads(impl)
        return timings[-1].median_ms if floor is not None else math.nan

    def _time_each(self, pairs: list[tuple[_Impl, Row]], floor, kw: dict) -> float:
        """Time each step of ``pairs`` alone, then the floor (``None``: none); a step that runs out of
        memory marks its row OOM, a floor that does so gives NaN."""
        for impl, row in pairs:
            try:
                self._fill(row, time_step(self.step(impl), self.device, **kw))
            except torch.OutOfMemoryError as exc:
                row.check, row.note = OOM, _describe_error(exc)
            _clear_grads(impl)
        try:
            return time_step(floor, self.device, **kw).median_ms if floor is not None else math.nan
        except torch.OutOfMemoryError:
            return math.nan

    @staticmethod
    def _fill(row: Row, timing: Timing) -> None:
        row.median_ms, row.q1_ms, row.q3_ms, row.repeats = timing.median_ms, timing.q1_ms, timing.q3_ms, timing.repeats

    def measure_memory(self, impl: _Impl, row: Row) -> None:
        """Peak memory of one step of ``impl`` into ``row``: GPU allocator statistics are exact; the
        CPU's peak RSS takes the median of 3 steps."""
        if row.check in (ERROR, OOM):
            return
        try:
            row.peak_mb = peak_memory_mb(self.step(impl), self.device, repeats=1 if self.device.type == "cuda" else 3,
                                         before=lambda: _clear_grads(impl))
        except torch.OutOfMemoryError as exc:
            row.check, row.note = OOM, _describe_error(exc)
        _clear_grads(impl)

# A row whose interquartile range exceeds this fraction of its median is measured again; when the
# second measurement is noisy too, the row is flagged (Row.noisy, the table's "noisy" mark).
NOISY_IQR = 0.20


def _noisy(row: Row) -> bool:
    return row.median_ms > 0 and (row.q3_ms - row.q1_ms) > NOISY_IQR * row.median_ms


def _resident_helpers() -> set[int]:
    """Pids of the helper processes multiprocessing keeps for the life of the process once anything
    used its spawn or forkserver start methods (the resource tracker, the fork server): they wait on a
    pipe, run nothing of this package, and cannot be stopped without breaking the caller's own use of
    multiprocessing."""
    pids = set()
    for module, holder, attr in (("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
                                 ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid")):
        mod = sys.modules.get(module)
        pid = getattr(getattr(mod, holder, None), attr, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def _quiesce() -> list[int]:
    """Stop torch.compile's compiler worker processes (the first compilation starts a pool of them,
    which would otherwise share the cores with the rows being timed) and return the pids of any
    other child process still alive (multiprocessing's resident helpers aside: _resident_helpers)."""
    try:
        from torch._inductor import async_compile
        async_compile.shutdown_compile_workers()
    except Exception:  # noqa: BLE001 - no inductor, or nothing started
        pass
    me = os.getpid()
    try:
        table = proc_table()
    except OSError:  # no /proc
        return []
    helpers = _resident_helpers()
    return [pid for pid, (state, parent, _) in table.items() if parent == me and state != "Z" and pid not in helpers]


# Bytes of float64 reference intermediates the full-size check may take; above, it runs on fewer rows.
CHECK_BUDGET_BYTES = {"cpu": 2 * 2**30, "cuda": 8 * 2**30}


def check_rows(case: Case, device: torch.device) -> int | None:
    """Rows at which to check ``case``: None for all of them, else the most rows (at least 16) whose
    float64 reference (about six live tensors of ``work_elems`` elements) fits the budget."""
    budget = CHECK_BUDGET_BYTES["cpu"]
    if device.type == "cuda":  # a quarter of the GPU, at least the fixed budget
        budget = max(CHECK_BUDGET_BYTES["cuda"], torch.cuda.get_device_properties(device).total_memory // 4)
    if 6 * 8 * case.work_elems <= budget or case.with_rows is None:
        return None
    lo, hi = 16, case.sizes["N"] - 1
    while lo < hi:  # largest k in [16, N) that fits (16 if none does)
        mid = (lo + hi + 1) // 2
        if 6 * 8 * case.with_rows(mid).work_elems <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def run_case(case: Case, cfg: BenchConfig, progress: Progress | None = None) -> tuple[list[Row], list[str]]:
    """Rows (one per implementation, with ratios) and notes for one case.

    Where the float64 reference of the whole case would not fit (``check_rows``), each
    implementation is checked on the same case with fewer rows (same d and C, hence the same
    class-dimension chunking) and the row says so."""
    k = check_rows(case, torch.device(cfg.device))
    unchecked = None
    try:
        run = CaseRun(case, cfg, with_truth=k is None)
        checker = None if k is None else CaseRun(case.with_rows(k), cfg, reset_compiler=False)
    except torch.OutOfMemoryError as exc:  # the float64 reference does not fit: time, but say so
        unchecked = f"not checked: the float64 reference ran out of memory ({_describe_error(exc)})"
        run, checker = CaseRun(case, cfg, with_truth=False), None
    rows: list[Row] = []
    for impl in run.impls:
        if progress:
            progress.step(f"{case.label} {impl.name}")
        if unchecked is not None:
            row = run.first_call(impl)
            if row.check not in (ERROR, OOM):
                row.check, row.note = UNCHECKED, unchecked
        elif checker is None:
            row = run.check(impl)
        else:
            row = run.first_call(impl)
            twin = checker.impl(impl.name)
            if row.check not in (ERROR, OOM) and twin is not None:
                verdict = checker.check(twin)
                for name in ("out_err", "grad_err", "tol_out", "tol_grad", "check"):
                    setattr(row, name, getattr(verdict, name))
                row.note = verdict.note or f"checked at N={k} (same d and C): the float64 reference of all rows is too big"
                _clear_grads(twin)
        rows.append(row)
    # Every implementation has run once (compilations done) before any is timed; nothing else of the
    # package runs while a row is timed.
    children = _quiesce()
    if children:
        run.notes.append(f"child processes still alive while timing: {children}")
    if cfg.floor and case.floor is not None and case.floor_note:
        run.notes.append(f"floor of {case.op}: {case.floor_note}")
    if progress:
        progress.step(f"{case.label} timing")
    pairs = list(zip(run.impls, rows))
    floor_ms = run.time_rows(pairs, with_floor=cfg.floor and case.floor is not None)
    row_floor: dict[int, float] = {}  # re-measured rows: the floor of their own rounds
    for impl, row in pairs:
        run.measure_memory(impl, row)
    noisy = [(impl, row) for impl, row in pairs if _noisy(row)]
    if noisy:
        # measured again with the floor, so a re-measured row's floor fraction comes from one set of
        # rounds (its ratios to the rows that were quiet the first time mix two sets)
        first = [(row.median_ms, row.q3_ms - row.q1_ms) for _, row in noisy]
        again = run.time_rows(noisy, with_floor=cfg.floor and case.floor is not None)
        for _, row in noisy:
            if not math.isnan(again):
                row_floor[id(row)] = again
        for (_, row), (med, iqr) in zip(noisy, first):
            if _noisy(row):
                row.noisy = True
                extra = (f"noisy: IQR {row.q3_ms - row.q1_ms:.3g} ms of a {row.median_ms:.3g} ms median after a "
                         f"second measurement (first: {iqr:.3g} of {med:.3g} ms)")
                row.note = f"{row.note}; {extra}" if row.note else extra
    by_name = {r.impl: r for r in rows}
    eager = by_name.get("eager")
    comp = by_name.get("compile")
    for r in rows:
        if eager is not None:
            r.speedup_vs_eager = eager.median_ms / r.median_ms
            r.memory_vs_eager = r.peak_mb / eager.peak_mb if eager.peak_mb > 0 else math.nan
        if comp is not None:
            r.speedup_vs_compile = comp.median_ms / r.median_ms
        if case.floor_flops is not None:
            r.floor_ms = row_floor.get(id(r), floor_ms)
            r.floor_fraction = r.floor_ms / r.median_ms
            r.tflops = case.floor_flops / (r.median_ms * 1e-3) / 1e12
    return rows, run.notes


def _versions() -> dict:
    from .. import __version__
    out = {"idid_kernels": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("pytorch_metric_learning", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            out[mod] = None
    return out


def _gemm_line(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which GEMMs the implementations and the floor run (the bench header's "GEMMs:" line)."""
    if device.type == "cuda":
        return "cuBLAS (torch.mm) for every implementation and the floor"
    if cpu_gemm() == "aten":
        return "torch.mm's BLAS for every implementation and the floor (idid_kernels.cpu_gemm: aten)"
    if floor_uses_onednn(device, dtype):
        return ("this package's CPU kernels and the floor: oneDNN (idid_kernels.cpu_gemm); eager and compile: "
                "torch.mm's BLAS")
    return (f"torch.mm's BLAS for eager, compile and the {str(dtype).replace('torch.', '')} floor; this "
            f"package's CPU kernels: oneDNN for float32 GEMMs (idid_kernels.cpu_gemm)")


def run_bench(cases: list[Case], cfg: BenchConfig, *, command: str | None = None) -> BenchResult:
    """Run ``cases`` under ``cfg``; returns every row with the run's metadata and notes."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but no CUDA device is visible to torch")
    started = time.perf_counter()
    load_start = _loadavg()
    contention = ContentionMonitor().start()
    units = sum(1 + bool(cfg.compile) + len(_backend_names(c.op, device, cfg.backends)[0])
                + (len(c.externals) if cfg.externals else 0) + 1 for c in cases)  # + 1: the case's timing
    progress = Progress(units, enabled=cfg.progress)
    rows: list[Row] = []
    notes: list[str] = []
    try:
        for case in cases:
            case_rows, case_notes = run_case(case, cfg, progress)
            rows += case_rows
            notes += [n for n in case_notes if n not in notes]
    finally:
        progress.close()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "available_backends": available_backends(),
        "compile_mode": "torch.compile(reference, dynamic=False), compiled per case before timing" if cfg.compile
        else "not run",
        "timing": ("triton.testing.do_bench, else CUDA events" if device.type == "cuda"
                   else f"time.perf_counter after the checked first call, {cfg.min_repeats}..{cfg.max_repeats} repeats "
                        f"each, the implementations and the floor interleaved in rounds of short blocks within "
                        f"~{cfg.budget_s:g} s per implementation"),
        "memory": memory_method(device),
        "gemm": _gemm_line(device, cfg.dtype),
        "load_avg_start": load_start,
        "load_avg_end": _loadavg(),
        "other_busy_cores": contention.stop(),
        "wall_s": round(time.perf_counter() - started, 1),
        **{"version_" + k: v for k, v in _versions().items()},
    }
    return BenchResult(rows, meta, notes)
