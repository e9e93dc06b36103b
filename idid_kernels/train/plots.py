"""PNG figures of a ``train`` run (``--plot DIR``); needs matplotlib.

- ``recall_vs_frequency.png``: per loss, per-class test recall (mean ± std over seeds) against the
  number of training images of the class (log scale), with cross-entropy dashed for reference.
- ``norm_vs_quality.png``: per loss, the mean feature norm of test images at each quality level,
  relative to the mean norm of the clean test images of the same run (losses have very different
  norm scales), mean ± std over seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .report import BASELINE
from .trainer import RunResult


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or the package's [train] extra)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_recall_vs_frequency(summary: dict, counts_by_rank: list[int], path: Path) -> None:
    plt = _pyplot()
    losses = list(summary)
    cols = min(3, len(losses))
    rows = math.ceil(len(losses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), sharex=True, sharey=True, squeeze=False)
    x = np.asarray(counts_by_rank, dtype=float)
    for ax, loss in zip(axes.flat, losses):
        if BASELINE in summary and loss != BASELINE:
            ax.plot(x, summary[BASELINE]["recall_by_rank"]["mean"], "--", color="0.6", label=BASELINE)
        mean = np.asarray(summary[loss]["recall_by_rank"]["mean"], dtype=float)
        std = np.asarray(summary[loss]["recall_by_rank"]["std"], dtype=float)
        ax.errorbar(x, mean, yerr=std, marker="o", ms=3, capsize=2, label=loss)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_title(loss, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.flat[len(losses):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training images of the class")
    for ax in axes[:, 0]:
        ax.set_ylabel("test recall")
    fig.suptitle("Per-class recall against class frequency (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_norm_vs_quality(runs: list[RunResult], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    losses = list(dict.fromkeys(r.loss for r in runs))
    for i, loss in enumerate(losses):
        rel = np.array([np.asarray(r.mean_norm_by_quality) / r.mean_norm_by_quality[-1]
                        for r in runs if r.loss == loss], dtype=float)
        levels = np.arange(rel.shape[1]) + (i - len(losses) / 2) * 0.02   # small offset: error bars stay apart
        std = np.nanstd(rel, axis=0, ddof=1) if rel.shape[0] > 1 else np.zeros(rel.shape[1])
        ax.errorbar(levels, np.nanmean(rel, axis=0), yerr=std, marker="o", ms=3, capsize=2, label=loss)
    ax.set_xticks(range(len(runs[0].mean_norm_by_quality)))
    ax.set_xlabel("quality level (0 = strongest degradation, highest = clean)")
    ax.set_ylabel("mean ||feature|| / mean on clean images")
    ax.set_title("Feature norm against image quality (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(directory: str | Path, summary: dict, runs: list[RunResult], counts_by_rank: list[int]) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "recall_vs_frequency.png", directory / "norm_vs_quality.png"]
    plot_recall_vs_frequency(summary, counts_by_rank, paths[0])
    plot_norm_vs_quality(runs, paths[1])
    return paths
