"""pairwise_cosine and class_density forward+backward: every available backend vs eager and
torch.compile reference.

    python benchmarks/bench_primitives.py [--n 2048] [--m 2048] [--d 256] [--batch 4096] [--classes 64]
                                          [--threads T] [--only pairwise_cosine|class_density]

Prints median ms, spread and speedup vs eager, after checking each backend against the float64
reference. pairwise_cosine runs on (N, d) x (M, d); class_density on a (B, d) batch with labels
drawn uniformly from C classes.
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


def _compare(title: str, variants: dict, inputs: list, truth: torch.Tensor, device: str, repeats: int) -> None:
    print(title)
    base = None
    for name, fn in variants.items():
        try:
            err = float((fn(*(t.detach() for t in inputs)).double() - truth).abs().max())
            ms, spread = median_ms(forward_backward(fn, inputs), repeats=repeats, device=device)
        except (NotImplementedError, ValueError, ik.BackendUnavailableError) as exc:
            print(f"  {name:<20} skipped: {exc}")
            continue
        except Exception as exc:  # e.g. an inductor failure in compile(reference): report, keep going
            print(f"  {name:<20} failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:100]}")
            continue
        base = base or ms
        print(f"  {name:<20} {ms:9.3f} ms  +-{spread:7.3f}  x{base / ms:5.2f} vs eager  max err {err:.1e}")


def _backends():
    return [b for b in ik.available_backends() if b != "reference"]


def bench_pairwise_cosine(args) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=g).to(args.device).requires_grad_(True)
    y = torch.randn(args.m, args.d, generator=g).to(args.device).requires_grad_(True)
    variants = {"eager reference": reference.pairwise_cosine,
                "compile(reference)": torch.compile(reference.pairwise_cosine)}
    for b in _backends():
        variants[b] = lambda a, c, b=b: ik.pairwise_cosine(a, c, backend=b)
    truth = reference.pairwise_cosine(x.detach().double(), y.detach().double())
    _compare(f"pairwise_cosine fwd+bwd  N={args.n} M={args.m} d={args.d} device={args.device} "
             f"torch={torch.__version__} threads={torch.get_num_threads()}",
             variants, [x, y], truth, args.device, args.repeats)


def bench_class_density(args) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.d, generator=g).to(args.device).requires_grad_(True)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    c, t = args.classes, 2.0
    ref_fn = lambda a: reference.class_density(a, labels, c, t)  # noqa: E731
    variants = {"eager reference": ref_fn, "compile(reference)": torch.compile(ref_fn)}
    for b in _backends():
        variants[b] = lambda a, b=b: ik.class_density(a, labels, c, t=t, backend=b)
    truth = reference.class_density(x.detach().double(), labels, c, t)
    _compare(f"class_density fwd+bwd  B={args.batch} C={c} d={args.d} t={t} device={args.device} "
             f"torch={torch.__version__} threads={torch.get_num_threads()}",
             variants, [x], truth, args.device, args.repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--only", choices=("pairwise_cosine", "class_density"), default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only in (None, "pairwise_cosine"):
        bench_pairwise_cosine(args)
    if args.only in (None, "class_density"):
        bench_class_density(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
