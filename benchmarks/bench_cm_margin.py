"""cm_margin_loss forward+backward: fused backends vs eager and torch.compile of the reference.

    python benchmarks/bench_cm_margin.py [--n 1024] [--d 256] [--c 50000] [--margin cosface]
                                          [--device cpu] [--no-compile] [--csv PATH]

Side by side in one run: median fwd+bwd time and its spread for every available backend, the eager
reference and torch.compile(reference); the three bare GEMMs of forward+backward (X W^T, G W,
G^T X) as the floor a fused op can approach; peak extra memory of one fwd+bwd step, measured in a
fresh child process per variant (CPU: growth of the peak RSS, VmHWM; GPU: torch.cuda.max_memory_allocated growth).
Each backend's loss and gradients are checked against the float64 reference first; a mismatch is
printed loudly and the row is marked.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import idid_kernels as ik  # noqa: E402
from idid_kernels import reference  # noqa: E402
from timing import forward_backward, median_ms  # noqa: E402


def make_inputs(n, d, c, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (0.05 * torch.randn(c, d, generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g).to(device)
    return x, w, y


def variants(margin, compile_ref=True):
    """name -> loss(x, w, y) for the eager reference, torch.compile of it, and every backend."""
    out = {"eager": lambda x, w, y: reference.cm_margin_loss(x, w, y, margin=margin)}
    if compile_ref:
        out["compile"] = torch.compile(lambda x, w, y: reference.cm_margin_loss(x, w, y, margin=margin))
    for b in ik.available_backends():
        if b != "reference":
            out[b] = lambda x, w, y, b=b: ik.cm_margin_loss(x, w, y, margin=margin, backend=b)
    return out


def check(fn, x, w, y, margin, rows=64):
    """Max relative error of (loss, dx, dw) against the float64 reference, on the first rows."""
    xs, ws = x.detach()[:rows].double().requires_grad_(True), w.detach().double().requires_grad_(True)
    truth = reference.cm_margin_loss(xs, ws, y[:rows], margin=margin)
    t_grads = torch.autograd.grad(truth, (xs, ws))
    xo, wo = x.detach()[:rows].clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ours = fn(xo, wo, y[:rows])
    o_grads = torch.autograd.grad(ours, (xo, wo))
    return max(float((a.detach().double().cpu() - b.cpu()).norm() / b.cpu().norm())
               for a, b in zip((ours, *o_grads), (truth, *t_grads)))


def peak_memory_child(args, variant):
    """Peak extra memory (MB) of one fwd+bwd step of ``variant`` in a fresh process."""
    cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--d", str(args.d), "--c", str(args.c),
           "--margin", args.margin, "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    high-water mark over an exec from the parent, so a child would inherit the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args):
    x, w, y = make_inputs(args.n, args.d, args.c, args.device)
    loss = variants(args.margin, compile_ref=args.child == "compile")[args.child]
    fn = lambda a, b: loss(a, b, y)  # noqa: E731
    if args.child == "compile":
        forward_backward(fn, [x, w])()  # compile outside the measured step
        reset_peak_rss()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(fn, [x, w])()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        base = peak_rss_mb()
        forward_backward(fn, [x, w])()
        print(peak_rss_mb() - base)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--c", type=int, default=50000)
    p.add_argument("--margin", default="cosface")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--csv", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    x, w, y = make_inputs(args.n, args.d, args.c, args.device)
    fns = variants(args.margin, compile_ref=not args.no_compile)
    print(f"cm_margin_loss fwd+bwd margin={args.margin} contraction=sigmoid N={args.n} d={args.d} C={args.c} "
          f"float32 device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, fn in fns.items():  # correctness first
        if name in ("eager", "compile"):
            continue
        err = check(fn, x, w, y, args.margin)
        status = "ok" if err <= 1e-4 else "MISMATCH"
        print(f"  check {name}: max rel err of loss/dx/dw vs the float64 reference {err:.2e} [{status}]")
        if status != "ok":
            print(f"  !!! {name} DISAGREES WITH THE REFERENCE: its timings below mean nothing !!!")

    xa, wa = x.detach(), w.detach()
    gemm_s = torch.empty(args.n, args.c, device=args.device)
    def gemms():  # noqa: E306
        torch.mm(xa, wa.t(), out=gemm_s)
        torch.mm(gemm_s, wa)
        torch.mm(gemm_s.t(), xa)
    rows = []
    gemm_ms, gemm_spread = median_ms(gemms, repeats=args.repeats, device=args.device)
    rows.append(("3 bare GEMMs", gemm_ms, gemm_spread, float("nan")))
    for name, fn in fns.items():
        step = forward_backward(lambda a, b, fn=fn: fn(a, b, y), [x, w])
        ms, spread = median_ms(step, warmup=2, repeats=args.repeats, device=args.device)
        rows.append((name, ms, spread, peak_memory_child(args, name)))
    eager_ms = next(r[1] for r in rows if r[0] == "eager")
    eager_mb = next(r[3] for r in rows if r[0] == "eager")
    compile_ms = next((r[1] for r in rows if r[0] == "compile"), float("nan"))
    print(f"  {'variant':<14} {'median ms':>10} {'spread':>8} {'vs eager':>9} {'vs compile':>10} {'vs GEMMs':>9} "
          f"{'peak MB':>9} {'mem/eager':>9}")
    table = []
    for name, ms, spread, mb in rows:
        rec = dict(variant=name, median_ms=ms, spread_ms=spread, speedup_vs_eager=eager_ms / ms,
                   speedup_vs_compile=compile_ms / ms, gemm_fraction=gemm_ms / ms, peak_mb=mb,
                   memory_vs_eager=mb / eager_mb if eager_mb > 0 else float("nan"))
        table.append(rec)
        print(f"  {name:<14} {ms:10.1f} {spread:8.1f} {rec['speedup_vs_eager']:8.2f}x {rec['speedup_vs_compile']:9.2f}x "
              f"{rec['gemm_fraction']:8.2f} {mb:9.1f} {rec['memory_vs_eager']:9.3f}")
    if args.csv:
        meta = dict(date=datetime.date.today().isoformat(), device=args.device, cpu=platform.processor(),
                    torch=torch.__version__, n=args.n, d=args.d, c=args.c, margin=args.margin,
                    command=" ".join([Path(sys.executable).name] + sys.argv))
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(meta) + list(table[0]))
            wr.writeheader()
            for rec in table:
                wr.writerow({**meta, **rec})
        print(f"  wrote {args.csv} ({json.dumps(meta)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
