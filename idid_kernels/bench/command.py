"""``python -m idid_kernels bench``: arguments and the command (the CLI only adds the parser)."""
from __future__ import annotations

import argparse
import sys

import torch

from .._backends import BACKENDS
from .cases import GOAL_SUITES, SUITES, suite_cases
from .report import format_header, format_markdown, format_notes, format_table, write_csv, write_json, write_plots
from .runner import BenchConfig, run_bench

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true",
                       help="large sizes (the ones the kernels are for); minutes to tens of minutes")
    sizes.add_argument("--quick", action="store_true",
                       help="tiny sizes: a smoke test of the runner in seconds (timings meaningless)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suite", choices=SUITES + ("all",) + GOAL_SUITES, default="all",
                   help="gpu-goals: cm_margin_loss N=8192 d=512 C=100000 (use --dtype bfloat16) and idid_loss "
                        "B=4096; not part of all")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated backends to time besides eager/compile, from {','.join(BACKENDS[1:])} "
                        "(default: every available one; Triton on the CPU only when named here)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile(reference) column")
    p.add_argument("--no-external", action="store_true", help="leave out the third-party columns (pytorch-metric-learning, torch F.linear_cross_entropy)")
    p.add_argument("--csv", metavar="PATH", help="write every row with the run's metadata as CSV")
    p.add_argument("--json", metavar="PATH", help="write the rows, metadata and notes as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNGs of time and memory against C and N (matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's own choice, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; exit status 1 when any implementation disagrees with the reference."""
    from ..cli import warn_if_no_extension
    warn_if_no_extension()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib (pip install 'idid_kernels[bench]')", file=sys.stderr)
            return 2
    backends = None
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in BACKENDS[1:]]
        if unknown:
            print(f"error: unknown backend(s) {unknown}; choose from {BACKENDS[1:]}", file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    preset = "full" if args.full else "tiny" if args.quick else "default"
    cases = suite_cases(args.suite, preset, args.device)
    cfg = BenchConfig(device=args.device, dtype=DTYPES[args.dtype], compile=not args.no_compile,
                      externals=not args.no_external, backends=backends, seed=args.seed, progress=not args.quiet)
    if args.quick:
        cfg.min_repeats, cfg.max_repeats, cfg.budget_s = 3, 5, 0.2
    result = run_bench(cases, cfg)
    print(format_header(result))
    print()
    print(format_markdown(result) if args.markdown else format_table(result))
    print()
    print(format_notes(result))
    if args.csv:
        write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in write_plots(result, args.plot):
            print(f"wrote {path}")
    return 1 if result.failures else 0
