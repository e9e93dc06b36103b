"""PNG figures of a ``train`` run (``--plot DIR``); needs matplotlib.

- ``recall_vs_frequency.png``: per loss, per-class test recall (mean ± std over seeds) against the
  number of training images of the class (log scale), with cross-entropy dashed for reference.
- ``norm_vs_quality.png``: per loss, the mean feature norm of test images at each quality level,
  relative to the mean norm of the clean test images of the same run (losses have very different
  norm scales), mean ± std over seeds.
- ``norm_by_quality.png``: one panel per loss, the mean feature norm of test images at each quality
  level in the loss's own units (mean ± std over seeds); for the margin heads also the mean
  training logit scale s * sigmoid((||x|| - offset) / T) on a second axis, which shows where the
  contraction saturates (scale = s at every level).
- ``feature_scatter.png`` (2-D features only, ``--feature-dim 2``): the authors' figure, the test
  features of the first seed for softmax, L2-softmax, CM-M-Softmax, margin + L2-softmax (CosFace)
  and margin + CM-M-Softmax (CM-CosFace), coloured by class and marked by quality level; below
  them the same points coloured by quality level.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .data import CLEAN_QUALITY
from .report import BASELINE
from .trainer import RunResult

# The authors' five 2-D feature panels: (loss, panel title).
SCATTER_PANELS = (("ce", "(a) softmax"), ("l2-softmax", "(b) L2-softmax: s cos"),
                  ("cm-m-softmax", "(c) CM-M-Softmax: s sigmoid(||x||) cos"),
                  ("cosface", "(d) margin + L2-softmax (CosFace)"),
                  ("cm-cosface", "(e) margin + CM-M-Softmax (CM-CosFace)"))
QUALITY_MARKERS = ("x", "^", "s", "o")          # quality 0 (worst) .. CLEAN_QUALITY (clean)


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


def _grid(plt, n: int, cols: int, size=(3.6, 3.0)):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def plot_norm_by_quality(summary: dict, path: Path) -> None:
    plt = _pyplot()
    losses = list(summary)
    fig, axes = _grid(plt, len(losses), 4)
    for ax, loss in zip(axes.flat, losses):
        norm = summary[loss]["mean_norm_by_quality"]
        levels = np.arange(len(norm["mean"]))
        ax.errorbar(levels, norm["mean"], yerr=norm["std"], marker="o", ms=3, capsize=2, color="C0")
        ax.set_ylabel("mean ||x||", color="C0", fontsize=8)
        ax.set_xticks(levels)
        ax.set_title(f"{loss}  (r = {summary[loss]['norm_quality_r']['mean']:.2f})", fontsize=9)
        ax.grid(alpha=0.3)
        scale = summary[loss].get("mean_scale_by_quality")
        if scale:
            twin = ax.twinx()
            twin.errorbar(levels + 0.05, scale["mean"], yerr=scale["std"], marker="s", ms=3, capsize=2,
                          color="C3", ls="--")
            twin.set_ylim(0, 31)
            twin.set_ylabel("logit scale", color="C3", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("quality level (0 = worst, 3 = clean)", fontsize=8)
    fig.suptitle("Mean feature norm (blue) and training logit scale (red, margin heads) by test-image quality; "
                 "mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_feature_scatter(runs: list[RunResult], path: Path) -> bool:
    """The 2-D feature panels of SCATTER_PANELS that were run; False (nothing written) if none.

    Top row: coloured by class, marked by quality level (the authors' figure). Bottom row: the
    same points coloured by quality level, degraded images drawn last, so that where the degraded
    images lie (near the origin = small norm, or not) can be seen through the class colours."""
    by_loss = {r.loss: r for r in runs if r.features is not None and r.features[0].shape[1] == 2}
    panels = [(loss, title) for loss, title in SCATTER_PANELS if loss in by_loss]
    if not panels:
        return False
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n, 6.8), squeeze=False)
    classes = plt.get_cmap("tab10")
    quality_colors = ("#d62728", "#ff7f0e", "#bcbd22", "0.75")       # quality 0 (worst) .. clean
    for col, (loss, title) in enumerate(panels):
        feats, labels, quality = (t.numpy() for t in by_loss[loss].features)
        top, bottom = axes[0, col], axes[1, col]
        for level in (CLEAN_QUALITY, *range(CLEAN_QUALITY)):            # clean first, degraded on top
            sel = quality == level
            clean = level == CLEAN_QUALITY
            top.scatter(feats[sel, 0], feats[sel, 1], c=[classes(int(c)) for c in labels[sel]], s=4 if clean else 12,
                        marker=QUALITY_MARKERS[level], linewidths=0.6, alpha=0.35 if clean else 0.9)
            bottom.scatter(feats[sel, 0], feats[sel, 1], color=quality_colors[level], s=4 if clean else 8,
                           marker="o", linewidths=0, alpha=0.5 if clean else 0.85)
        r = by_loss[loss]
        top.set_title(f"{title}\nacc {r.accuracy:.3f}, degraded {r.acc_degraded:.3f}", fontsize=8)
        for ax in (top, bottom):
            ax.set_aspect("equal", adjustable="datalim")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("colour = class, marker = quality", fontsize=8)
    axes[1, 0].set_ylabel("colour = quality level", fontsize=8)
    handles = [plt.Line2D([], [], ls="", marker=QUALITY_MARKERS[q], color="0.3",
                          label="clean" if q == CLEAN_QUALITY else f"quality {q}") for q in range(CLEAN_QUALITY + 1)]
    handles += [plt.Line2D([], [], ls="", marker="o", color=classes(c), label=f"digit {c}") for c in range(10)]
    handles += [plt.Line2D([], [], ls="", marker="o", color=quality_colors[q],
                           label=("clean" if q == CLEAN_QUALITY else f"quality {q}") + " (bottom)")
                for q in range(CLEAN_QUALITY + 1)]
    fig.legend(handles=handles, loc="lower center", ncol=9, fontsize=7, frameon=False)
    seed = next(iter(by_loss.values())).seed
    fig.suptitle(f"2-D test features, seed {seed} (quality 0 = strongest degradation)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(directory: str | Path, summary: dict, runs: list[RunResult], counts_by_rank: list[int]) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "recall_vs_frequency.png", directory / "norm_vs_quality.png",
             directory / "norm_by_quality.png"]
    plot_recall_vs_frequency(summary, counts_by_rank, paths[0])
    plot_norm_vs_quality(runs, paths[1])
    plot_norm_by_quality(summary, paths[2])
    if plot_feature_scatter(runs, directory / "feature_scatter.png"):
        paths.append(directory / "feature_scatter.png")
    return paths
