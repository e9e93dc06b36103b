"""Aggregation over seeds, the terminal tables, and the JSON / CSV files of a ``train`` run.

Spread is the sample standard deviation over seeds (ddof = 1). Because every loss sees the same
data and initialisation in a seed, the paired per-seed difference to the cross-entropy baseline is
also reported: it removes the (large) between-seed variation that comes from which digits end up
in the tail. The same pairing isolates the contraction: each contraction-mapped head against the
same head without it (``CONTRACTION_PAIRS``), where both were run.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .trainer import RunResult, summarize

# (RunResult field, column title) of the main table, in order.
METRICS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("g_mean", "G-mean"),
    ("tail_recall", "tail-3 recall"),
    ("acc_clean", "acc clean"),
    ("acc_degraded", "acc degraded"),
    ("norm_quality_r", "r(norm, quality)"),
)
PAIRED = ("g_mean", "macro_f1", "tail_recall", "acc_degraded")
BASELINE = "ce"
# (head with the contraction, the same head without it) and the metrics of their paired difference
CONTRACTION_PAIRS = (("cm-cosface", "cosface"), ("cm-cosface-tuned", "cosface"), ("cm-m-softmax", "l2-softmax"))
CONTRACTION_PAIRED = ("acc_degraded", "acc_clean", "accuracy", "g_mean")


def _by_loss(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in runs:
        out.setdefault(r.loss, []).append(r)
    return out


def _paired(rs: list[RunResult], base: dict[int, RunResult], keys) -> dict:
    """Per metric: mean, std, wins, ties and count of the per-seed differences rs - base."""
    paired = {}
    for key in keys:
        diffs = [getattr(r, key) - getattr(base[r.seed], key) for r in rs if r.seed in base]
        mean, std = summarize(diffs)
        paired[key] = {"mean": mean, "std": std, "wins": int(sum(d > 0 for d in diffs)),
                       "ties": int(sum(d == 0 for d in diffs)), "seeds": len(diffs)}
    return paired


def summarize_runs(runs: list[RunResult], baseline: str = BASELINE) -> dict:
    """{loss: {metric: {mean, std}, "recall_by_rank": {mean: [...], std: [...]},
    "mean_norm_by_quality": {...}, "mean_scale_by_quality": {...} (margin heads),
    "paired_vs_ce": {metric: {mean, std, wins, ties, seeds}} (against ``baseline``),
    "paired_contraction": {"without": name, metric: {...}} (CONTRACTION_PAIRS)}}."""
    groups = _by_loss(runs)
    base = {r.seed: r for r in groups.get(baseline, [])}
    summary = {}
    for loss, rs in groups.items():
        entry = {}
        for key, _ in METRICS + (("final_train_loss", ""), ("seconds", "")):
            mean, std = summarize([getattr(r, key) for r in rs])
            entry[key] = {"mean": mean, "std": std}
        for key in ("recall_by_rank", "mean_norm_by_quality", "mean_scale_by_quality"):
            cols = np.array([getattr(r, key) for r in rs], dtype=np.float64)
            if cols.size == 0:
                continue
            stats = [summarize(cols[:, k]) for k in range(cols.shape[1])]
            entry[key] = {"mean": [m for m, _ in stats], "std": [s for _, s in stats]}
        if loss != baseline and base:
            entry["paired_vs_ce"] = _paired(rs, base, PAIRED)
        for with_c, without in CONTRACTION_PAIRS:
            if loss == with_c and without in groups:
                entry["paired_contraction"] = {"without": without, **_paired(
                    rs, {r.seed: r for r in groups[without]}, CONTRACTION_PAIRED)}
        entry["seeds"] = sorted(r.seed for r in rs)
        summary[loss] = entry
    return summary


def _pm(mean: float, std: float, digits: int = 3, signed: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


def format_main_table(summary: dict) -> str:
    rows = [[loss] + [_pm(**{k: e[key][k] for k in ("mean", "std")}) for key, _ in METRICS]
            for loss, e in summary.items()]
    return _table(["loss"] + [title for _, title in METRICS], rows)


def format_paired_table(summary: dict, field: str = "paired_vs_ce", keys=PAIRED) -> str:
    rows = []
    for loss, e in summary.items():
        if field not in e:
            continue
        cells = [loss] if field == "paired_vs_ce" else [f"{loss} - {e[field]['without']}"]
        for key in keys:
            p = e[field][key]
            cells.append(f"{_pm(p['mean'], p['std'], signed=True)} ({p['wins']}/{p['seeds']})")
        rows.append(cells)
    titles = dict(METRICS)
    return _table(["loss" if field == "paired_vs_ce" else "pair"] + [f"Δ {titles[k]}" for k in keys], rows)


def format_quality_table(summary: dict) -> str:
    """Mean ||x|| and, for the margin heads, the mean training logit scale per quality level."""
    num_q = max(len(e["mean_norm_by_quality"]["mean"]) for e in summary.values())
    fmt = lambda v, d: "n/a" if v is None or math.isnan(v) else f"{v:.{d}f}"  # noqa: E731
    rows = []
    for loss, e in summary.items():
        scale = e.get("mean_scale_by_quality", {}).get("mean", [math.nan] * num_q)
        rows.append([loss] + [fmt(v, 2) for v in e["mean_norm_by_quality"]["mean"]] + [fmt(v, 1) for v in scale])
    header = (["loss"] + [f"‖x‖ q{q}" for q in range(num_q)] + [f"scale q{q}" for q in range(num_q)])
    return _table(header, rows)


def format_recall_table(summary: dict, counts_by_rank: list[int]) -> str:
    header = ["loss"] + [f"n={n}" for n in counts_by_rank]
    rows = [[loss] + [f"{m:.2f}" if not math.isnan(m) else "n/a" for m in e["recall_by_rank"]["mean"]]
            for loss, e in summary.items()]
    return _table(header, rows)


def format_report(summary: dict, counts_by_rank: list[int], seeds: list[int], baseline: str = BASELINE) -> str:
    n = len(seeds)
    parts = [f"Test metrics, mean ± std over {n} seed(s) ({', '.join(map(str, seeds))}); "
             f"tail-3 recall = mean recall of the 3 rarest training classes; "
             f"r(norm, quality) = Pearson r of ||feature|| with the quality level",
             format_main_table(summary)]
    if any("paired_vs_ce" in e for e in summary.values()):
        parts += ["", f"Paired difference to {baseline} on the same seed, mean ± std (seeds where the loss is higher)",
                  format_paired_table(summary)]
    if any("paired_contraction" in e for e in summary.values()):
        parts += ["", "Effect of the contraction: paired difference to the same head without it, mean ± std "
                      "(seeds where the contracted head is higher)",
                  format_paired_table(summary, "paired_contraction", CONTRACTION_PAIRED)]
    parts += ["", "Mean feature norm and mean training logit scale s·sigmoid((‖x‖ - offset) / T) of test images "
                  "by quality level (q0 = strongest degradation, q3 = clean; mean over seeds)",
              format_quality_table(summary)]
    parts += ["", "Per-class recall by training-class frequency (mean over seeds; n = training images of the class)",
              format_recall_table(summary, counts_by_rank)]
    return "\n".join(parts)


def _clean(obj):
    """NaN -> None so the JSON is standard."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=1) + "\n", encoding="utf-8")


def write_csv(path: str | Path, runs: list[RunResult], counts_by_rank: list[int]) -> None:
    """One row per (loss, seed): the scalar metrics, recall per frequency rank, mean norm per quality."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num_q = len(runs[0].mean_norm_by_quality) if runs else 0
    header = (["loss", "seed"] + [key for key, _ in METRICS] + ["final_train_loss", "seconds"]
              + [f"recall_rank{k}_n{n}" for k, n in enumerate(counts_by_rank)]
              + [f"mean_norm_quality{q}" for q in range(num_q)]
              + [f"mean_scale_quality{q}" for q in range(num_q)])
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in runs:
            writer.writerow([r.loss, r.seed] + [f"{getattr(r, key):.6g}" for key, _ in METRICS]
                            + [f"{r.final_train_loss:.6g}", f"{r.seconds:.3f}"]
                            + [f"{v:.6g}" for v in r.recall_by_rank] + [f"{v:.6g}" for v in r.mean_norm_by_quality]
                            + [f"{v:.6g}" for v in (r.mean_scale_by_quality or [math.nan] * num_q)])
