"""idid_loss forward+backward: every available backend vs eager and torch.compile reference.

    python benchmarks/bench_idid.py [--b 1024] [--d 128] [--c 1000] [--dtype float32] [--device cpu]

Checks each variant's loss and gradients against the float64 reference first (relative errors,
||a - b|| / ||b||), then prints median ms, interquartile spread and speedup vs eager.
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--c", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    x64 = torch.randn(args.b, args.d, generator=g, dtype=torch.float64)
    w64 = torch.randn(args.c, args.d, generator=g, dtype=torch.float64)
    s64 = 0.5 * torch.randn(args.c, args.c, generator=g, dtype=torch.float64)
    labels = torch.randint(0, args.c, (args.b,), generator=g).to(args.device)
    inputs = [t.to(device=args.device, dtype=dtype).requires_grad_(True) for t in (x64, w64, s64)]

    def ref_fn(x, w, s):
        return reference.idid_loss(x, w, s, labels)

    variants = {"eager reference": ref_fn, "compile(reference)": torch.compile(ref_fn)}
    for b in ik.available_backends():
        if b != "reference":
            variants[b] = lambda x, w, s, b=b: ik.idid_loss(x, w, s, labels, backend=b)

    truth_in = [t.detach().clone().requires_grad_(True) for t in (x64, w64, s64)]
    truth = reference.idid_loss(*truth_in, labels.cpu())
    truth_grads = torch.autograd.grad(truth, truth_in)
    n_present = int(torch.unique(labels).numel())
    print(f"idid_loss fwd+bwd  B={args.b} d={args.d} C={args.c} ({n_present} classes present) dtype={args.dtype} "
          f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    base = None
    for name, fn in variants.items():
        try:
            probe = [t.detach().clone().requires_grad_(True) for t in inputs]
            loss = fn(*probe)
            grads = torch.autograd.grad(loss, probe)
        except (NotImplementedError, ValueError, ik.BackendUnavailableError) as exc:
            print(f"  {name:<20} skipped: {exc}")
            continue
        loss_err = _rel(loss.cpu(), truth)
        grad_err = max(_rel(a.cpu(), b) for a, b in zip(grads, truth_grads))
        ms, spread = median_ms(forward_backward(fn, inputs), repeats=args.repeats, device=args.device)
        base = base or ms
        print(f"  {name:<20} {ms:9.3f} ms  +-{spread:7.3f}  x{base / ms:5.2f} vs eager  "
              f"loss err {loss_err:.1e}  grad err {grad_err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
