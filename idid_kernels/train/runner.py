"""``python -m idid_kernels train``: every loss x every seed, a table, JSON / CSV, optional plots."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import torch

from .data import SEVERITIES, make_data
from .heads import LOSSES
from .progress import RunProgress
from .report import format_report, summarize_runs, write_csv, write_json
from .trainer import TAIL_CLASSES, TrainConfig, train_and_evaluate

DEFAULT_SEEDS = tuple(range(10))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options (defaults finish in a few minutes on two CPU cores)."""
    d = TrainConfig()
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help=f"comma-separated subset of: {', '.join(LOSSES)} (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="seeds to run; each gives its own split, tail order, degradation and init "
                             "(default: %(default)s)")
    parser.add_argument("--rho", type=float, default=50.0,
                        help="class imbalance ratio of the long-tailed training split (default: %(default)s)")
    parser.add_argument("--degrade-frac", type=float, default=0.2,
                        help="fraction of training and of test images degraded (default: %(default)s)")
    parser.add_argument("--test-frac", type=float, default=0.5,
                        help="fraction of each class held out as the balanced test split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    parser.add_argument("--embed-dim", type=int, default=d.embed_dim, help="default: %(default)s")
    parser.add_argument("--width", type=int, default=d.width, help="hidden units per MLP layer (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpp", "cuda", "triton"),
                        help="idid_kernels backend of the margin and IDID-R1 heads (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 is fastest for this small network, especially on a "
                             "shared machine (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write config, environment, per-run and summary results")
    parser.add_argument("--csv", metavar="PATH", help="write one row per (loss, seed)")
    parser.add_argument("--plot", metavar="DIR", help="write PNG figures to DIR (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_losses(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSSES]
    if unknown or not names:
        raise ValueError(f"unknown loss(es) {unknown or text!r}; choose from {', '.join(LOSSES)}")
    return list(dict.fromkeys(names))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _environment(cfg: TrainConfig) -> dict:
    from .._backends import select_backend
    device = torch.device(cfg.device)
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backend": {op: select_backend(op, cfg.backend, device) for op in ("cm_margin_loss", "idid_loss")},
        "load_average_start": _load(),
    }


def run(losses: list[str], seeds: list[int], cfg: TrainConfig, *, rho: float = 50.0, degrade_frac: float = 0.2,
        test_frac: float = 0.5, progress: bool = True, stream=None) -> dict:
    """Train and evaluate every (loss, seed); returns the payload written to JSON (plus ``runs`` as
    RunResult objects under ``_runs``)."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    env = _environment(cfg)
    start = time.perf_counter()
    runs = []
    counts_by_rank = None
    total = len(losses) * len(seeds)
    for si, seed in enumerate(seeds):
        data = make_data(seed, rho=rho, degrade_frac=degrade_frac, test_frac=test_frac)
        counts = sorted(data.class_counts, reverse=True)
        if counts_by_rank is None:
            counts_by_rank = counts
        elif counts != counts_by_rank:  # the profile depends only on the split's smallest class pool
            raise RuntimeError(f"seed {seed} gives class counts {counts}, seed {seeds[0]} gave {counts_by_rank}")
        for li, loss in enumerate(losses):
            label = f"[{si * len(losses) + li + 1:>{len(str(total))}}/{total}] {loss:<16} seed {seed}"
            bar = RunProgress(label, cfg.epochs, stream=stream, enabled=progress)
            result = train_and_evaluate(loss, data, seed, cfg, on_epoch=bar.update)
            bar.close(f"acc {result.accuracy:.3f}  G-mean {result.g_mean:.3f}")
            runs.append(result)
    wall = time.perf_counter() - start
    env["load_average_end"] = _load()
    summary = summarize_runs(runs)
    return {
        "task": "sklearn digits, long-tailed training split + degraded images; balanced test split",
        "config": {"losses": losses, "seeds": list(seeds), "rho": rho, "degrade_frac": degrade_frac,
                   "test_frac": test_frac, "severities_blur_sigma_noise_std": [list(s) for s in SEVERITIES],
                   "tail_classes": TAIL_CLASSES, **cfg.as_dict()},
        "environment": env,
        "wall_seconds": wall,
        "train_counts_by_rank": counts_by_rank,
        # rho after rounding the profile to whole images (87 / 2 = 43.5 for the defaults)
        "realised_imbalance_ratio": counts_by_rank[0] / counts_by_rank[-1],
        "summary": summary,
        "runs": [r.as_dict() for r in runs],
        "_runs": runs,
    }


def main(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    try:
        losses = _parse_losses(args.losses)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checks = ((args.epochs >= 1, "--epochs must be >= 1"), (args.batch_size >= 2, "--batch-size must be >= 2"),
              (args.rho >= 1, "--rho must be >= 1"), (0 <= args.degrade_frac <= 1, "--degrade-frac must lie in [0, 1]"),
              (0 < args.test_frac < 1, "--test-frac must lie in (0, 1)"), (args.threads >= 1, "--threads must be >= 1"),
              (args.embed_dim >= 1 and args.width >= 1, "--embed-dim and --width must be >= 1"),
              (args.lr > 0 and args.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"))
    for ok, message in checks:
        if not ok:
            print(f"error: {message}", file=sys.stderr)
            return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible to torch", file=sys.stderr)
        return 2
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      embed_dim=args.embed_dim, width=args.width, backend=args.backend, device=args.device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        payload = run(losses, list(args.seeds), cfg, rho=args.rho, degrade_frac=args.degrade_frac,
                      test_frac=args.test_frac, progress=not args.no_progress)
    finally:
        torch.set_num_threads(previous_threads)
    runs = payload.pop("_runs")
    env = payload["environment"]
    print(f"\nidid_kernels train: {len(losses)} loss(es) x {len(args.seeds)} seed(s), {cfg.epochs} epochs, "
          f"rho={args.rho:g}, degraded fraction {args.degrade_frac:g}; backend {env['backend']}, "
          f"{env['torch_threads']} thread(s); wall {payload['wall_seconds']:.1f}s; "
          f"load average {env['load_average_start']} -> {env['load_average_end']}", file=out)
    print(format_report(payload["summary"], payload["train_counts_by_rank"], list(args.seeds)), file=out)
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}", file=out)
    if args.csv:
        write_csv(args.csv, runs, payload["train_counts_by_rank"])
        print(f"wrote {args.csv}", file=out)
    if args.plot:
        from .plots import write_plots
        for path in write_plots(args.plot, payload["summary"], runs, payload["train_counts_by_rank"]):
            print(f"wrote {path}", file=out)
    return 0
