"""Command line: ``python -m idid_kernels {bench,check,compile-check,info,train}``."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def warn_if_no_extension() -> bool:
    """Print a visible warning (stdout and stderr) when the C++ extension is missing; True if printed."""
    from ._backends import extension_warning
    warning = extension_warning()
    if warning is None:
        return False
    banner = "!" * 100
    for stream in (sys.stdout, sys.stderr):
        print(f"{banner}\n{warning}\n{banner}", file=stream, flush=True)
    return True


def _cmd_info(args) -> int:
    from . import __version__
    from ._backends import BACKENDS, cuda_emulated, extension, missing
    print(f"idid_kernels {__version__}  torch {torch.__version__}  python {platform.python_version()}  "
          f"{platform.machine()}")
    print(f"CUDA devices: {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    for name in BACKENDS:
        why = missing(name)
        print(f"  {name:<10} {'available' if why is None else 'unavailable: ' + why}")
    ext = extension()
    if ext is not None and getattr(ext, "with_cuda_emulator", 0):
        state = "on (backend='cuda' runs on CPU tensors)" if cuda_emulated() else "off (IDID_KERNELS_CUDA_EMULATE=1 to use)"
        print(f"CUDA emulator: built, {state}")
    warn_if_no_extension()
    return 0


def _cmd_check(args) -> int:
    from .check import format_table, run_check
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    warn_if_no_extension()
    rows = run_check(device=args.device, dtype=DTYPES[args.dtype], seed=args.seed)
    print(f"idid_kernels check: device={args.device} dtype={args.dtype} seed={args.seed}; "
          f"errors are ||a - b|| / ||b|| against the float64 reference")
    print(format_table(rows))
    bad = [r for r in rows if r.status == "MISMATCH"]
    backends = sorted({r.backend for r in rows})
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} mismatched; backends checked: {', '.join(backends)}")
    warn_if_no_extension()  # again below the table, where it is read
    return 1 if bad else 0


def _cmd_compile_check(args) -> int:
    from .compile_check import main as run_compile_check
    return run_compile_check(args)


def _cmd_train(args) -> int:
    from .train.runner import main as run_train
    return run_train(args)


def _cmd_bench(args) -> int:
    from .bench.command import run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from .bench.command import add_arguments as add_bench_arguments
    parser = argparse.ArgumentParser(prog="python -m idid_kernels",
                                     description="Fused kernels for IDID-R1 and contraction-mapped margin losses.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time and measure every backend against eager and torch.compile "
                                         "(checking each against the reference)")
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
    check = sub.add_parser("check", help="compare every available backend with the float64 reference")
    check.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    check.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_cmd_check)
    from .compile_check import add_arguments as add_compile_check_arguments
    compile_check = sub.add_parser("compile-check", help="compile every Triton kernel x autotune config x dtype "
                                                         "for NVIDIA targets without a GPU; registers, spills")
    add_compile_check_arguments(compile_check)
    compile_check.set_defaults(func=_cmd_compile_check)
    info = sub.add_parser("info", help="versions and which backends can run here")
    info.set_defaults(func=_cmd_info)
    from .train.runner import add_arguments as add_train_arguments
    train = sub.add_parser("train", help="train a small network with every loss on long-tailed, partly degraded "
                                         "digits (8x8, or 28x28 MNIST with --dataset mnist) and compare "
                                         "accuracy, macro-F1, G-mean, tail recall")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
