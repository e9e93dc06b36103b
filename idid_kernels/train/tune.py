"""``train --tune-contraction``: choose the contraction's offset and temperature on validation data.

The authors' contraction sigmoid((||x|| - 0) / 1) saturates once feature norms are a few units
large. heads.CONTRACTION_CANDIDATES lists the settings compared: the default, and the offset at
the running mean feature norm with the temperature at k running standard deviations for a few k
(heads.RunningNormMarginHead). Each is trained as CM-CosFace (s = 30, m = 0.4) on the long-tailed,
partly degraded training split of each seed and evaluated on a balanced validation split carved
from that seed's training pool before the long-tail cut (data.make_data's ``val_frac``), degraded
like the test split. The test split is never evaluated here.

Choice: among the running-statistics candidates, the k with the highest validation accuracy
averaged over the seeds (accuracy on a balanced split equals the mean per-class recall, so it
weighs the tail classes equally). The default is run beside them as the reference, and the record
says whether it scores higher still. The chosen k is written into heads.TUNED_TEMPERATURE_FACTOR
by hand, with the JSON as the record.
"""
from __future__ import annotations

from .heads import CONTRACTION_CANDIDATES, LossSpec
from .report import _paired, _pm, _table, summarize_runs
from .runner import run
from .trainer import TrainConfig

CRITERION = "accuracy"
REFERENCE = "default"
COMPARED = ("accuracy", "acc_degraded", "acc_clean", "g_mean")     # paired against the reference


def tune_contraction(candidates: list[str], seeds: list[int], cfg: TrainConfig, *, val_frac: float,
                     registry: dict[str, LossSpec] = CONTRACTION_CANDIDATES, **run_kw) -> dict:
    """Run every candidate x seed on the validation split; the payload of ``run`` with the summary
    paired against the default setting and a ``selection`` entry."""
    payload = run(candidates, seeds, cfg, val_frac=val_frac, split="val", registry=registry, **run_kw)
    runs = payload["_runs"]
    summary = summarize_runs(runs, baseline=REFERENCE)
    reference = {r.seed: r for r in runs if r.loss == REFERENCE}
    for name, entry in summary.items():
        entry.pop("paired_vs_ce", None)
        if name != REFERENCE and reference:
            entry[f"paired_vs_{REFERENCE}"] = _paired([r for r in runs if r.loss == name], reference, COMPARED)
    mean = {name: summary[name][CRITERION]["mean"] for name in candidates}
    tuned = [name for name in candidates if name != REFERENCE] or list(candidates)
    chosen = max(tuned, key=mean.get)
    payload["summary"] = summary
    payload["selection"] = {
        "criterion": f"highest mean validation {CRITERION} over seeds {list(seeds)} among the settings "
                     f"other than {REFERENCE!r}",
        "evaluated_split": "validation (balanced, carved from the training pool); the test split is not used",
        "candidates": {name: registry[name].description for name in candidates},
        "chosen": chosen,
        "reference_scores_higher": bool(REFERENCE in mean and mean[REFERENCE] > mean[chosen]),
    }
    return payload


def format_tuning(payload: dict) -> str:
    summary, selection = payload["summary"], payload["selection"]
    rows = []
    for name, e in summary.items():
        paired = e.get(f"paired_vs_{REFERENCE}", {})
        deltas = [f"{_pm(p['mean'], p['std'], signed=True)} ({p['wins']}/{p['seeds']})" if p else ""
                  for p in (paired.get("accuracy"), paired.get("acc_degraded"))]
        scale = e.get("mean_scale_by_quality", {}).get("mean", [])
        rows.append([name + (" *" if name == selection["chosen"] else ""), selection["candidates"][name],
                     _pm(e["accuracy"]["mean"], e["accuracy"]["std"]),
                     _pm(e["acc_degraded"]["mean"], e["acc_degraded"]["std"]),
                     _pm(e["g_mean"]["mean"], e["g_mean"]["std"]), *deltas,
                     " / ".join(f"{v:.1f}" for v in scale)])
    table = _table(["setting", "contraction", "val accuracy", "val acc degraded", "val G-mean",
                    f"Δ accuracy vs {REFERENCE}", f"Δ acc degraded vs {REFERENCE}", "mean scale q0/q1/q2/q3"], rows)
    verdict = (f"The reference {REFERENCE!r} scores higher than the chosen setting on the validation split."
               if selection["reference_scores_higher"] else
               f"The chosen setting scores at least as high as {REFERENCE!r} on the validation split.")
    return "\n".join([f"Contraction settings of CM-CosFace on the validation split, mean ± std over seeds "
                      f"{payload['config']['seeds']}; * = chosen ({selection['criterion']})", table, verdict])
