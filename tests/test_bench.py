"""The benchmark runner (``python -m idid_kernels bench``) on tiny cases: every column is there, the
outputs parse, and a wrong kernel is flagged (and fails the command) however fast it is."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sys

import pytest
import torch

from idid_kernels import cli, functional
from idid_kernels._backends import IMPLEMENTED, available_backends, runs_on
from idid_kernels.bench import BenchConfig, run_bench, run_case, suite_cases
from idid_kernels.bench import runner as runner_mod
from idid_kernels.bench.measure import peak_memory_mb, time_cpu, time_cpu_interleaved
from idid_kernels.bench.progress import Progress
from idid_kernels.bench.report import format_markdown, format_notes, format_table, write_csv, write_json, write_plots

CPU = torch.device("cpu")
FAST = dict(min_repeats=2, max_repeats=3, budget_s=0.05, progress=False)
HAVE_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _timed_backends(op):
    """The backends the runner must time on the CPU by default (interpreted Triton and emulated CUDA
    excluded)."""
    return [b for b in available_backends()
            if b not in ("reference", "triton", "cuda") and b in IMPLEMENTED[op] and runs_on(b, CPU)]


@pytest.fixture(scope="module")
def cm_result():
    """One tiny cm_margin_loss case with every column: eager, compile, each backend, PML."""
    return run_bench(suite_cases("cm", "tiny", "cpu")[:1], BenchConfig(**FAST), command="pytest")


def test_every_column_is_present_and_measured(cm_result):
    impls = [r.impl for r in cm_result.rows]
    expected = ["eager", "compile"] + _timed_backends("cm_margin_loss") + (["pml"] if HAVE_PML else [])
    assert impls == expected
    if not HAVE_PML:
        assert any("pml: column skipped" in n and "not installed" in n for n in cm_result.notes)
    eager = cm_result.rows[0]
    for r in cm_result.rows:
        assert r.check == "ok", (r.impl, r.check, r.note)
        assert r.out_err <= 1e-5 and r.grad_err <= 1e-4
        assert r.median_ms > 0 and r.q1_ms <= r.median_ms <= r.q3_ms and r.repeats >= 2
        assert math.isfinite(r.peak_mb) and r.peak_mb >= 0
        assert r.speedup_vs_eager == pytest.approx(eager.median_ms / r.median_ms)
        assert math.isfinite(r.speedup_vs_compile)
        assert r.floor_ms > 0 and math.isfinite(r.floor_fraction)
        assert r.tflops == pytest.approx(6 * 16 * 8 * 32 / (r.median_ms * 1e-3) / 1e12)
    text = format_table(cm_result)
    for column in ("median ms", "IQR ms", "vs eager", "vs compile", "peak MB", "mem/eager", "floor", "GFLOP/s"):
        assert column in text
    for impl in expected:
        assert f"| {impl} |" in format_markdown(cm_result)
    assert cm_result.meta["device"] == "cpu" and cm_result.meta["wall_s"] > 0
    if HAVE_PML:
        assert any("CosFaceLoss" in n and "contraction='none'" in n for n in cm_result.notes)


def test_csv_and_json_round_trip(cm_result, tmp_path):
    write_csv(cm_result, tmp_path / "out" / "bench.csv")
    write_json(cm_result, tmp_path / "bench.json")
    with open(tmp_path / "out" / "bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["impl"] for r in rows] == [r.impl for r in cm_result.rows]
    for r, orig in zip(rows, cm_result.rows):
        assert float(r["median_ms"]) == pytest.approx(orig.median_ms)
        assert r["device"] == "cpu" and r["version_torch"] == torch.__version__ and r["command"] == "pytest"
        assert int(r["N"]) == 16 and int(r["C"]) == 32 and r["check"] == "ok"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["dtype"] == "float32"
    assert [r["impl"] for r in data["rows"]] == [r.impl for r in cm_result.rows]
    assert data["rows"][0]["speedup_vs_eager"] == pytest.approx(1.0)


def _scaled_loss(kernel, factor):
    def wrong(*args, **kwargs):
        return kernel(*args, **kwargs) * factor
    return wrong


def _wrong_grad_only(kernel):
    """Right loss value, wrong gradient: adds 1e-3 * sum(x) - its own value."""
    def wrong(x, *args, **kwargs):
        extra = 1e-3 * x.sum()
        return kernel(x, *args, **kwargs) + (extra - extra.detach())
    return wrong


@pytest.mark.parametrize("make_wrong", [lambda k: _scaled_loss(k, 1.001), _wrong_grad_only],
                         ids=["wrong loss", "wrong gradient only"])
def test_wrong_kernel_is_flagged(monkeypatch, make_wrong):
    backend = _timed_backends("cm_margin_loss")[0] if _timed_backends("cm_margin_loss") else "reference"
    if backend == "reference":  # no compiled backend here: a wrong kernel behind backend="reference"
        monkeypatch.setattr(runner_mod, "_backend_names", lambda op, dev, req: (["reference"], []))
    table = functional._KERNELS["cm_margin_loss"]
    monkeypatch.setitem(table, backend, make_wrong(table[backend]))
    case = suite_cases("cm", "tiny", "cpu")[0]
    rows, _ = run_case(case, BenchConfig(compile=False, externals=False, **FAST))
    by_impl = {r.impl: r for r in rows}
    assert by_impl["eager"].check == "ok"
    bad = by_impl[backend]
    assert bad.check == "MISMATCH" and bad.failed
    assert bad.median_ms > 0  # still timed, and marked
    assert "MISMATCH" in format_table(run_bench([case], BenchConfig(compile=False, externals=False, **FAST)))


def test_big_cases_are_checked_on_fewer_rows(monkeypatch):
    case = suite_cases("cm", "tiny", "cpu")[2]  # N=48 d=8 C=32
    assert runner_mod.check_rows(case, CPU) is None
    monkeypatch.setitem(runner_mod.CHECK_BUDGET_BYTES, "cpu", 6 * 8 * 48 * 32 // 2)
    k = runner_mod.check_rows(case, CPU)
    assert k == 24
    cfg = BenchConfig(compile=False, **FAST)
    rows, _ = run_case(case, cfg)
    assert [r.check for r in rows] == ["ok"] * len(rows)
    assert all(f"checked at N={k}" in r.note and r.N == 48 and r.median_ms > 0 for r in rows)
    backend = (_timed_backends("cm_margin_loss") or [None])[0]
    if backend is None:
        return
    table = functional._KERNELS["cm_margin_loss"]
    monkeypatch.setitem(table, backend, _scaled_loss(table[backend], 1.001))
    rows, _ = run_case(case, cfg)
    assert {r.impl: r.check for r in rows}[backend] == "MISMATCH"


def test_a_reference_that_does_not_fit_leaves_rows_marked_unchecked(monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("float64 reference too big")
    monkeypatch.setattr(runner_mod, "_truth", no_memory)
    result = run_bench(suite_cases("primitives", "tiny", "cpu")[:1], BenchConfig(compile=False, **FAST))
    assert {r.check for r in result.rows} == {"UNCHECKED"} and not result.failures
    assert all(r.median_ms > 0 and "out of memory" in r.note for r in result.rows)
    assert "UNCHECKED" in format_table(result)


def test_a_crash_fails_the_run_only_in_this_packages_code(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor failed")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    case = suite_cases("primitives", "tiny", "cpu")[0]
    result = run_bench([case], BenchConfig(**FAST))
    comp = next(r for r in result.rows if r.impl == "compile")
    assert comp.check == "ERROR" and "inductor failed" in comp.note and not result.failures
    assert all(r.check == "ok" for r in result.rows if r.impl != "compile")
    backend = (_timed_backends("pairwise_cosine") or [None])[0]
    if backend is None:
        return

    def crash(*args, **kwargs):
        raise RuntimeError("kernel crashed")
    monkeypatch.setitem(functional._KERNELS["pairwise_cosine"], backend, crash)
    result = run_bench([case], BenchConfig(**FAST))
    assert [r.impl for r in result.failures] == [backend] and result.failures[0].check == "ERROR"


def test_cli_exits_nonzero_on_a_wrong_kernel(monkeypatch, tmp_path, capsys):
    args = ["bench", "--quick", "--suite", "primitives", "--no-compile", "--quiet", "--json", str(tmp_path / "b.json")]
    assert cli.main(args) == 0
    assert "0 failed" in capsys.readouterr().out
    backend = (_timed_backends("class_density") or ["reference"])[0]
    if backend == "reference":
        monkeypatch.setattr(runner_mod, "_backend_names", lambda op, dev, req: (["reference"], []))
    table = functional._KERNELS["class_density"]
    monkeypatch.setitem(table, backend, _scaled_loss(table[backend], 0.99))
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and f"!!! {backend} on class_density" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["check"] for r in rows if r["op"] == "class_density" and r["impl"] == backend] == ["MISMATCH"]


def test_interpreted_triton_is_left_out_on_the_cpu_unless_named(monkeypatch):
    monkeypatch.setattr(runner_mod, "available_backends", lambda: ["reference", "cpp", "triton"])
    monkeypatch.setitem(IMPLEMENTED, "pairwise_cosine", IMPLEMENTED["pairwise_cosine"] | {"cpp", "triton"})
    run, notes = runner_mod._backend_names("pairwise_cosine", CPU, None)
    assert "triton" not in run and "cpp" in run
    assert any(n.startswith("triton: not timed on the CPU") for n in notes)
    run, notes = runner_mod._backend_names("pairwise_cosine", CPU, ["triton"])
    assert run == ["triton"] and notes == []
    monkeypatch.setattr(runner_mod, "available_backends", lambda: ["reference", "cpp"])
    run, notes = runner_mod._backend_names("pairwise_cosine", CPU, None)
    assert run == ["cpp"] and any(n.startswith("triton: not timed on the CPU") for n in notes)
    monkeypatch.setattr(runner_mod, "missing", lambda b: "triton is not importable" if b == "triton" else None)
    run, notes = runner_mod._backend_names("pairwise_cosine", CPU, ["cpp", "triton"])
    assert run == ["cpp"] and "triton: not run, unavailable here (triton is not importable)" in notes


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    cases = suite_cases("cm", "tiny", "cpu")[:3]  # a sweep of C at N=16 and of N at C=32
    result = run_bench(cases, BenchConfig(compile=False, externals=False, **FAST))
    result.rows[0].median_ms = result.rows[0].peak_mb = math.nan  # as after an out-of-memory
    paths = write_plots(result, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["cm_margin_loss_cosface_sigmoid_vs_C_N_16_d_8.png",
                     "cm_margin_loss_cosface_sigmoid_vs_N_d_8_C_32.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_peak_memory_probe_sees_an_allocation():
    def allocate():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        return float(t[-1])
    mb = peak_memory_mb(allocate, CPU)
    if math.isnan(mb):
        pytest.skip("peak RSS is not measurable on this platform (reported as NaN by the runner)")
    assert 60 <= mb <= 80
    assert peak_memory_mb(lambda: None, CPU) < 4


def test_cpu_timing_and_progress_output():
    timing = time_cpu(lambda: sum(range(1000)), min_repeats=4, max_repeats=6, budget_s=0.01)
    assert 4 <= timing.repeats <= 6 and 0 < timing.q1_ms <= timing.median_ms <= timing.q3_ms
    stream = io.StringIO()
    bar = Progress(2, delay_s=0.0, stream=stream)
    bar.step("first")
    bar.step("second")
    bar.close()
    assert stream.getvalue().splitlines()[-1].startswith("[2/2") and "\r" not in stream.getvalue()


def test_gpu_goals_suite_holds_the_target_sizes_and_is_not_part_of_all(capsys):
    labels = [c.label for c in suite_cases("gpu-goals", "default", "cuda")]
    assert labels == ["cm_margin_loss cosface+sigmoid N=8192 d=512 C=100000",
                      "idid_loss all terms N=4096 d=256 C=4096", "idid_loss all terms N=4096 d=256 C=16384"]
    assert not set(labels) & {c.label for c in suite_cases("all", "full", "cuda")}
    assert [c.op for c in suite_cases("gpu-goals", "tiny", "cpu")] == ["cm_margin_loss", "idid_loss"]
    args = ["bench", "--quick", "--suite", "gpu-goals", "--no-compile", "--no-external", "--quiet"]
    assert cli.main(args) == 0
    assert "0 failed" in capsys.readouterr().out


def test_emulated_cuda_is_left_out_on_the_cpu_unless_named(monkeypatch):
    monkeypatch.setenv("IDID_KERNELS_CUDA_EMULATE", "1")
    names, notes = runner_mod._backend_names("cm_margin_loss", CPU, None)
    assert "cuda" not in names
    if "cuda" in available_backends():
        assert any(n.startswith("cuda: not timed on the CPU") for n in notes)
        assert "cuda" in runner_mod._backend_names("cm_margin_loss", CPU, ["cuda"])[0]


def test_margin_none_case_has_the_torch_column_checked_against_the_reference():
    cases = [c for c in suite_cases("cm", "tiny", "cpu") if c.config == "none+sigmoid"]
    assert cases and all([e.name for e in c.externals] == ["torch"] for c in cases)
    assert all(c.config != "none+sigmoid" for c in suite_cases("cm", "default", "cpu")[:3])
    result = run_bench(cases[:1], BenchConfig(compile=False, **FAST), command="pytest")
    torch_rows = [r for r in result.rows if r.impl == "torch"]
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert not torch_rows and any("torch: column skipped" in n for n in result.notes)
        return
    (row,) = torch_rows
    assert row.kind == "external" and row.check == "ok", (row.check, row.note)
    assert row.out_err <= 1e-5 and row.grad_err <= 1e-4


def _stand_in_timings(calls, q1, q3):
    def timings(steps, device, **kw):
        calls.append(len(steps))
        for step in steps:
            step()
        return [runner_mod.Timing(10.0, q1, q3, 5, "stand-in") for _ in steps]
    return timings


def test_a_noisy_row_is_measured_again_and_flagged(monkeypatch):
    calls = []
    monkeypatch.setattr(runner_mod, "time_steps", _stand_in_timings(calls, 5.0, 15.0))  # IQR 100% of the median
    case = suite_cases("primitives", "tiny", "cpu")[-1]
    result = run_bench([case], BenchConfig(compile=False, floor=False, **FAST), command="pytest")
    assert result.rows and all(r.noisy and "noisy: IQR" in r.note for r in result.rows)
    assert calls == [len(result.rows)] * 2  # every row measured twice, all rows together
    assert "noisy" in format_table(result) and "kept an IQR above 20%" in format_notes(result)


def test_a_quiet_row_is_measured_once(monkeypatch):
    calls = []
    monkeypatch.setattr(runner_mod, "time_steps", _stand_in_timings(calls, 9.5, 10.5))
    case = suite_cases("primitives", "tiny", "cpu")[-1]
    result = run_bench([case], BenchConfig(compile=False, floor=False, **FAST), command="pytest")
    assert calls == [len(result.rows)] and not any(r.noisy for r in result.rows)


def test_rows_and_floor_are_timed_in_the_same_rounds(monkeypatch):
    # On a CPU a case's implementations and its bare GEMMs are one call of time_steps: their ratios
    # (speed-ups, floor fractions) come from the same interleaved rounds.
    calls = []
    monkeypatch.setattr(runner_mod, "time_steps", _stand_in_timings(calls, 9.5, 10.5))
    case = suite_cases("cm", "tiny", "cpu")[0]
    result = run_bench([case], BenchConfig(compile=False, **FAST), command="pytest")
    assert calls == [len(result.rows) + 1]
    assert all(r.floor_ms == 10.0 and r.floor_fraction == 1.0 for r in result.rows)


def test_a_noisy_row_is_measured_again_with_the_floor(monkeypatch):
    # The second measurement carries the floor in its rounds: a re-measured row's floor fraction
    # comes from one set of rounds.
    calls, floors = [], iter([10.0, 20.0])

    def timings(steps, device, **kw):
        calls.append(len(steps))
        for step in steps:
            step()
        floor = next(floors)
        return [runner_mod.Timing(10.0, 5.0, 15.0, 5, "stand-in") for _ in steps[:-1]] + \
            [runner_mod.Timing(floor, floor, floor, 5, "stand-in")]
    monkeypatch.setattr(runner_mod, "time_steps", timings)
    case = suite_cases("cm", "tiny", "cpu")[0]
    result = run_bench([case], BenchConfig(compile=False, **FAST), command="pytest")
    assert calls == [len(result.rows) + 1] * 2
    assert all(r.noisy and r.floor_ms == 20.0 and r.floor_fraction == 2.0 for r in result.rows)


def test_steps_that_do_not_fit_together_are_timed_alone(monkeypatch):
    def no_room(steps, device, **kw):
        raise torch.OutOfMemoryError("not together")
    monkeypatch.setattr(runner_mod, "time_steps", no_room)
    alone = []
    real = runner_mod.time_step
    monkeypatch.setattr(runner_mod, "time_step", lambda step, device, **kw: alone.append(step) or real(step, device, **kw))
    case = suite_cases("cm", "tiny", "cpu")[0]
    result = run_bench([case], BenchConfig(compile=False, **FAST), command="pytest")
    assert len(alone) == len(result.rows) + 1  # each row, then the floor
    assert all(r.check == "ok" and r.median_ms > 0 and r.floor_ms > 0 for r in result.rows)


def test_interleaved_timing_rejects_fewer_max_than_min_repeats():
    with pytest.raises(ValueError, match="max_repeats"):
        time_cpu_interleaved([lambda: None], min_repeats=5, max_repeats=4)


def test_interleaved_timing_rotates_the_steps_each_round():
    order = []
    steps = [lambda k=k: order.append(k) for k in range(3)]
    # blocks of one call, no settling call: one sizing call each, then the rotating rounds
    timings = time_cpu_interleaved(steps, warmup=0, min_repeats=4, max_repeats=4, budget_s=0.0, block_s=0.0,
                                   settle_s=0.0)
    assert order == [0, 1, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]
    assert [t.repeats for t in timings] == [4, 4, 4]
    assert all(0 < t.q1_ms <= t.median_ms <= t.q3_ms for t in timings)


def test_interleaved_blocks_settle_short_steps_and_stop_at_max_repeats():
    import time as _time
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1

    def long():
        calls["long"] += 1
        _time.sleep(0.02)

    # short: a settling call, then a block of max_repeats / 4 = 2 timed calls, per round; long (20 ms
    # > settle_s and block_s): one timed call per round, no settling call
    fast, slow = time_cpu_interleaved([short, long], warmup=0, min_repeats=3, max_repeats=8, budget_s=10.0,
                                      block_s=0.01, settle_s=0.005)
    assert fast.repeats == 8 and slow.repeats == 8
    assert calls["long"] == 1 + 8
    assert calls["short"] == 1 + 4 * (1 + 2)  # sizing call, then four rounds of settling call + block
    assert slow.median_ms >= 19


def test_compile_workers_are_stopped_before_timing(monkeypatch):
    """torch.compile's worker pool must not share the cores with a timed row: the runner stops it
    after the checks, before the first timing."""
    order = []
    real = runner_mod._quiesce
    monkeypatch.setattr(runner_mod, "_quiesce", lambda: order.append("quiesce") or real())
    real_time_rows = runner_mod.CaseRun.time_rows
    monkeypatch.setattr(runner_mod.CaseRun, "time_rows",
                        lambda self, *a, **k: order.append("measure") or real_time_rows(self, *a, **k))
    result = run_bench(suite_cases("cm", "tiny", "cpu")[:1], BenchConfig(**FAST), command="pytest")
    assert order[0] == "quiesce" and order.count("quiesce") == 1 and "measure" in order
    assert not any("child processes still alive" in n for n in result.notes)
    assert real() == []


def test_quiesce_reports_live_children_but_not_multiprocessing_helpers():
    """A child the process started is reported; multiprocessing's resource tracker (resident once
    anything used spawn, e.g. an earlier mp.spawn of the caller) is not: it waits on a pipe and
    cannot be stopped without breaking the caller's multiprocessing."""
    import multiprocessing.resource_tracker as tracker
    import subprocess

    tracker.ensure_running()
    helper = tracker._resource_tracker._pid
    assert isinstance(helper, int) and helper in runner_mod._resident_helpers()
    assert helper not in runner_mod._quiesce()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in runner_mod._quiesce()
    finally:
        child.kill()
        child.wait()
    assert child.pid not in runner_mod._quiesce()


def test_heads_suite_runs_every_backend_against_the_official_formula():
    """AdaFace and MagFace: eager and each timed backend, every row checked against the float64
    official formula (reference/heads.py) before it is timed."""
    cases = suite_cases("heads", "tiny", "cpu")
    assert {c.op for c in cases} == {"adaface_loss", "magface_loss"}
    result = run_bench([c for c in cases if c.sizes["C"] == 64][:2], BenchConfig(compile=False, **FAST))
    for op in ("adaface_loss", "magface_loss"):
        rows = [r for r in result.rows if r.op == op]
        assert [r.impl for r in rows] == ["eager"] + _timed_backends(op)
        for r in rows:
            assert r.check == "ok" and r.out_err <= 1e-5 and r.grad_err <= 1e-4, (r.impl, r.check, r.note)
            assert r.median_ms > 0 and r.floor_ms > 0
