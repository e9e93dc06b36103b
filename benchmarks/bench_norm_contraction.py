"""norm_contraction forward+backward: every available backend vs eager and torch.compile reference.

    python benchmarks/bench_norm_contraction.py [--n 65536] [--d 512] [--device cpu]

Prints median ms, spread and speedup vs eager, after checking each backend against the reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import idid_kernels as ik  # noqa: E402
from idid_kernels import reference  # noqa: E402
from timing import forward_backward, median_ms  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    x = torch.randn(args.n, args.d, device=args.device, requires_grad=True)
    variants = {"eager reference": lambda t: reference.norm_contraction(t, 0.5, 2.0),
                "compile(reference)": torch.compile(lambda t: reference.norm_contraction(t, 0.5, 2.0))}
    for b in ik.available_backends():
        if b != "reference":
            variants[b] = lambda t, b=b: ik.norm_contraction(t, offset=0.5, temperature=2.0, backend=b)
    truth = reference.norm_contraction(x.detach().double(), 0.5, 2.0)
    print(f"norm_contraction fwd+bwd  N={args.n} d={args.d} device={args.device} torch={torch.__version__}")
    base = None
    for name, fn in variants.items():
        try:
            err = float((fn(x.detach()).double() - truth).abs().max())
        except (NotImplementedError, ValueError, ik.BackendUnavailableError) as exc:
            print(f"  {name:<20} skipped: {exc}")
            continue
        ms, spread = median_ms(forward_backward(fn, [x]), repeats=args.repeats, device=args.device)
        base = base or ms
        print(f"  {name:<20} {ms:9.3f} ms  +-{spread:7.3f}  x{base / ms:5.2f} vs eager  max err {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
