"""pytest-benchmark suites over the cases of ``python -m idid_kernels bench``.

    python -m pytest benchmarks --benchmark-only [--bench-preset tiny|default|full]
                                 [--bench-device cpu|cuda] [--bench-dtype float32|...]

Not part of the default test run (pytest.ini's testpaths is tests/). Each test is one
(case, implementation): it first checks the implementation's loss and gradients against the float64
reference on the benchmark inputs and fails on a mismatch, then times forward + backward with
pytest-benchmark (one group per case, so the table compares implementations side by side) and
records the errors, the first call's time (torch.compile's compilation) and the peak memory in
``extra_info``. The cases and implementations are the runner's (idid_kernels/bench/), so a new
backend appears here as soon as it is registered.
"""
from __future__ import annotations

import pytest
import torch

from idid_kernels.bench import BenchConfig, CaseRun, suite_cases
from idid_kernels.bench.cases import PRESETS
from idid_kernels.bench.command import DTYPES
from idid_kernels.bench.measure import peak_memory_mb
from idid_kernels.bench.runner import _backend_names


def pytest_addoption(parser):
    group = parser.getgroup("idid_kernels benchmarks")
    group.addoption("--bench-preset", choices=PRESETS, default="default", help="case sizes (default: default)")
    group.addoption("--bench-device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    group.addoption("--bench-dtype", choices=tuple(DTYPES), default="float32")


def _config(config) -> BenchConfig:
    return BenchConfig(device=config.getoption("--bench-device"), dtype=DTYPES[config.getoption("--bench-dtype")],
                       progress=False)


def pytest_generate_tests(metafunc):
    """Parametrize ``case`` x ``impl`` for a module whose SUITE names a runner suite."""
    if not {"case", "impl"} <= set(metafunc.fixturenames):
        return
    cfg = _config(metafunc.config)
    cases = suite_cases(metafunc.module.SUITE, metafunc.config.getoption("--bench-preset"), cfg.device)
    params = []
    for case in cases:
        names = ["eager", "compile"] + _backend_names(case.op, torch.device(cfg.device), None)[0]
        names += [ext.name for ext in case.externals]
        params += [pytest.param(case, name, id=f"{case.label.replace(' ', '-')}-{name}") for name in names]
    metafunc.parametrize(("case", "impl"), params)


@pytest.fixture
def bench_impl(request):
    """Check, then time one implementation of one case with pytest-benchmark."""
    cfg = _config(request.config)

    def run(benchmark, case, name):
        run = CaseRun(case, cfg)
        impl = run.impl(name)
        if impl is None:  # an optional third-party package that is not installed
            pytest.skip("; ".join(run.notes) or f"{name} does not run here")
        row = run.check(impl)
        assert row.check == "ok", (f"{name} on {case.label}: {row.check} (output rel err {row.out_err:.2e}, "
                                   f"gradient rel err {row.grad_err:.2e}; {row.note})")
        step = run.step(impl)
        if run.device.type == "cuda":
            inner = step

            def step():
                inner()
                torch.cuda.synchronize()
        benchmark.group = f"{case.label} ({row.dtype}, {row.device})"
        benchmark.extra_info.update(out_rel_err=row.out_err, grad_rel_err=row.grad_err,
                                    first_call_s=row.first_call_s)
        benchmark(step)

        def clear():
            for t in impl.leaves:
                t.grad = None
        benchmark.extra_info["peak_mb"] = peak_memory_mb(step, run.device, repeats=3, before=clear)

    return run
