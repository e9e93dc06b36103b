"""Output of a benchmark run: the printed table (text or Markdown), CSV, JSON and PNG plots."""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, fields
from pathlib import Path

from .runner import MISMATCH, NOISY_IQR, OK, BenchResult, Row

META_COLUMNS = ("date", "device", "device_name", "torch_threads", "version_torch", "version_idid_kernels", "command",
                "gemm")


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}x"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _check(r: Row) -> str:
    if r.check == OK:
        return f"ok ({r.out_err:.0e}/{r.grad_err:.0e})"
    if r.check == MISMATCH:
        return f"MISMATCH out {r.out_err:.1e} (tol {r.tol_out:.0e}) grad {r.grad_err:.1e} (tol {r.tol_grad:.0e})"
    return f"{r.check}: {r.note}" if r.note else r.check


def _flops_unit(result: BenchResult) -> tuple[str, float]:
    """TFLOP/s on a GPU; GFLOP/s on a CPU, where TFLOP/s would read 0.00x."""
    return ("TFLOP/s", 1.0) if result.meta.get("device", "").startswith("cuda") else ("GFLOP/s", 1e3)


def _cells(r: Row, flops_scale: float = 1.0) -> list[str]:
    iqr = r.q3_ms - r.q1_ms
    mem = "-" if math.isnan(r.memory_vs_eager) else f"{r.memory_vs_eager:.2f}"
    median = _num(r.median_ms) + (" noisy" if r.noisy else "")
    return [r.impl, median, _num(iqr, 2), _ratio(r.speedup_vs_eager), _ratio(r.speedup_vs_compile),
            _num(r.peak_mb), mem, _pct(r.floor_fraction), _num(r.tflops * flops_scale, 3), _check(r)]


def _header(result: BenchResult) -> list[str]:
    return ["impl", "median ms", "IQR ms", "vs eager", "vs compile", "peak MB", "mem/eager", "floor",
            _flops_unit(result)[0], "check (out/grad rel err)"]


def _groups(rows: list[Row]) -> list[list[Row]]:
    out: list[list[Row]] = []
    for r in rows:
        if out and out[-1][0].case == r.case:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def format_table(result: BenchResult) -> str:
    """The table as aligned text, one block per case."""
    header, scale = _header(result), _flops_unit(result)[1]
    body = [_cells(r, scale) for r in result.rows]
    widths = [max(len(c[i]) for c in body + [header]) for i in range(len(header))]
    right = {1, 2, 3, 4, 5, 6, 7, 8}

    def line(cells):
        return "  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = []
    for group in _groups(result.rows):
        first = group[0]
        floor = "" if math.isnan(first.floor_ms) else f"   (GEMM floor {_num(first.floor_ms)} ms)"
        lines += ["", f"{first.case}{floor}", line(header)]
        lines += [line(_cells(r, scale)) for r in group]
    return "\n".join(lines[1:])


def format_markdown(result: BenchResult) -> str:
    """The table as one Markdown table (the case named on its first row)."""
    head, scale = ["case"] + _header(result), _flops_unit(result)[1]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in _groups(result.rows):
        for i, r in enumerate(group):
            case = f"`{r.op}` {r.config} " + " ".join(f"{k}={v}" for k, v in
                                                      (("N", r.N), ("M", r.M), ("d", r.d), ("C", r.C)) if v)
            cells = [case if i == 0 else ""] + _cells(r, scale)
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)


def format_header(result: BenchResult) -> str:
    m = result.meta
    load = ""
    if m.get("load_avg_start") is not None:
        load = f"; load average {m['load_avg_start']:.2f} at start"
    busy = ""
    others = m.get("other_busy_cores")
    if others is not None:
        load += f"; other processes kept {others:.2f} of {m['cpu_count']} cores busy during the run"
        if others > 0.25 * m["cpu_count"]:
            busy = (f"\nWARNING: the machine was shared ({others:.2f} of {m['cpu_count']} cores busy with other "
                    f"processes): timings are noisy and slower than on an idle machine")
    return (f"idid_kernels bench  {m['date']}  device={m['device']} ({m['device_name']}, {m['cpu_count']} cores, "
            f"torch threads {m['torch_threads']}{load})\n"
            f"torch {m['version_torch']}  idid_kernels {m['version_idid_kernels']}  dtype {m['dtype']}  "
            f"backends available: {', '.join(m['available_backends'])}\n"
            f"forward+backward per step; median and interquartile range; ratios are the eager (or compile) "
            f"time over this row's; 'floor' = time of the bare GEMMs / this time, FLOP/s = the "
            f"GEMM floor's flops / this time;\nchecks: relative error of the output / worst input gradient against the "
            f"float64 reference.\ntiming: {m['timing']}\nmemory: {m['memory']}\n"
            + (f"GEMMs: {m['gemm']}\n" if m.get("gemm") else "") + f"compile: {m['compile_mode']}{busy}")


def format_notes(result: BenchResult) -> str:
    lines = [f"- {n}" for n in result.notes]
    compiled = [r.first_call_s for r in result.rows if r.impl == "compile" and not math.isnan(r.first_call_s)]
    if compiled:
        lines.append(f"- compile: the first call (compilation, not timed) took {sum(compiled):.0f} s over "
                     f"{len(compiled)} cases ({min(compiled):.1f} to {max(compiled):.1f} s each)")
    bad = result.failures
    if bad:
        lines.append("")
        lines.append("!" * 100)
        for r in bad:
            lines.append(f"!!! {r.impl} on {r.case}: {r.check} -- {_check(r)}; its timings mean nothing")
        lines.append("!" * 100)
    for r in result.rows:
        if r.check == "ERROR" and not r.failed:
            lines.append(f"!!! {r.impl} on {r.case} crashed ({r.note}); not this package's code, so not a failure")
    noisy = [r for r in result.rows if r.noisy]
    if noisy:
        lines.append(f"- noisy: {len(noisy)} rows kept an IQR above {100 * NOISY_IQR:.0f}% of their median after a "
                     f"second measurement (marked 'noisy'): " + ", ".join(f"{r.impl} on {r.case}" for r in noisy))
    for r in result.unchecked:
        lines.append(f"!!! {r.impl} on {r.case}: UNCHECKED ({r.note}): its timing is not vouched for")
    lines.append(f"\n{len(result.rows) - len(bad)} rows ok or skipped, {len(bad)} failed; "
                 f"wall time {result.meta['wall_s']:.0f} s")
    return "\n".join(lines)


def write_csv(result: BenchResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(META_COLUMNS) + names)
        wr.writeheader()
        for r in result.rows:
            wr.writerow({**{k: result.meta.get(k) for k in META_COLUMNS}, **asdict(r)})


def write_json(result: BenchResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x):  # JSON has no NaN: write null
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(clean(result.as_dict()), f, indent=1)
        f.write("\n")


def write_plots(result: BenchResult, directory: str | Path) -> list[Path]:
    """One PNG per (op, configuration, swept size): time and peak memory against C or N, a line per
    implementation. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    dims = ("N", "M", "d", "C")
    by_config: dict[tuple, list[Row]] = {}
    for r in result.rows:
        by_config.setdefault((r.op, r.config), []).append(r)
    for (op, config), rows in by_config.items():
        for axis in ("C", "N"):
            groups: dict[tuple, list[Row]] = {}
            for r in rows:
                if getattr(r, axis) is None:
                    continue
                fixed = tuple((k, getattr(r, k)) for k in dims if k != axis and getattr(r, k) is not None)
                groups.setdefault(fixed, []).append(r)
            for fixed, grows in groups.items():
                if len({getattr(r, axis) for r in grows}) < 2:
                    continue
                fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
                for impl in dict.fromkeys(r.impl for r in grows):
                    pts = sorted((getattr(r, axis), r.median_ms, r.peak_mb) for r in grows if r.impl == impl)
                    for ax, col in ((ax_t, 1), (ax_m, 2)):  # leave out what was not measured (OOM, no /proc)
                        xy = [(p[0], p[col]) for p in pts if math.isfinite(p[col]) and p[col] > 0]
                        if xy:
                            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", label=impl)
                fixed_s = " ".join(f"{k}={v}" for k, v in fixed)
                for ax, ylabel in ((ax_t, "forward+backward median (ms)"), (ax_m, "peak extra memory (MB)")):
                    if not ax.lines:
                        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
                        continue
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xticks(sorted({getattr(r, axis) for r in grows}))
                    ax.xaxis.set_major_formatter(plain)
                    ax.xaxis.set_minor_formatter(NullFormatter())
                    ax.yaxis.set_major_formatter(plain)
                    ys = [y for line in ax.lines for y in line.get_ydata()]
                    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
                    # label 2x and 5x between the powers of ten unless the data spans many decades
                    ax.yaxis.set_minor_formatter(plain if max(ys) < 1000 * min(ys) else NullFormatter())
                    ax.set_xlabel(axis)
                    ax.set_ylabel(ylabel)
                    ax.grid(True, which="both", alpha=0.3)
                    ax.legend()
                fig.suptitle(f"{op} {config}, {fixed_s}, {result.meta['dtype']} on {result.meta['device_name']}")
                fig.tight_layout()
                stem = re.sub(r"[^A-Za-z0-9]+", "_", f"{op}_{config}_vs_{axis}_{fixed_s}").strip("_")
                path = directory / f"{stem}.png"
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(path)
    return written


def print_and_save(result: BenchResult, csv_path: str | None = None) -> int:
    """Print ``result`` as the bench command does (header, table, notes), write it to ``csv_path``
    when given, and return the exit status: 1 if any row failed its check, else 0. For scripts
    that run their own cases (``benchmarks/cm_large_case.py``)."""
    print(format_header(result))
    print(format_table(result))
    print(format_notes(result))
    if csv_path:
        write_csv(result, csv_path)
    return 1 if result.failures else 0

