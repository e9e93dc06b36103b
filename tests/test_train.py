"""The `train` evaluation: metric definitions against hand-computed values, the data pipeline,
the loss heads, determinism, and a one-epoch smoke run of the command."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from idid_kernels.cli import build_parser
from idid_kernels.train import metrics
from idid_kernels.train.data import CLEAN_QUALITY, degrade, degrade_fraction, long_tail_counts
from idid_kernels.train.heads import DIGITS_LOSSES, LOSSES, build_head
from idid_kernels.train.report import summarize_runs
from idid_kernels.train.trainer import RunResult, TrainConfig, summarize


# ---------------------------------------------------------------------------------------------
# metrics: hand-computed values
# ---------------------------------------------------------------------------------------------

def test_accuracy_and_recall_by_hand():
    y_true = [0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 2, 0, 2]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(6 / 8)
    recall = metrics.per_class_recall(y_true, y_pred, 4)
    np.testing.assert_allclose(recall[:3], [1 / 2, 2 / 2, 3 / 4])
    assert math.isnan(recall[3])                                  # class 3 has no true sample
    assert math.isnan(metrics.accuracy([], []))


def test_g_mean_by_hand():
    y_true = [0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 2, 0, 2]
    expected = (0.5 * 1.0 * 0.75) ** (1 / 3)                      # 0.7211...
    assert metrics.g_mean(y_true, y_pred, 3) == pytest.approx(expected)
    # A class absent from y_true has no recall and is left out, not counted as 0.
    assert metrics.g_mean(y_true, y_pred, 5) == pytest.approx(expected)
    # One class never recognised: G-mean 0 whatever the others.
    assert metrics.g_mean([0, 0, 1, 1], [0, 0, 0, 0], 2) == 0.0
    assert metrics.g_mean([0, 1, 2], [0, 1, 2], 3) == pytest.approx(1.0)


def test_macro_f1_with_an_absent_class_by_hand():
    # class 0: TP 1, FP 0, FN 1 -> 2/3; class 1: TP 2 -> 1; class 2 is predicted once but never true:
    # TP 0, FP 1 -> F1 0 (counted); class 3 (C = 4) is neither true nor predicted -> left out.
    y_true = [0, 0, 1, 1]
    y_pred = [0, 2, 1, 1]
    assert metrics.macro_f1(y_true, y_pred, 3) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics.macro_f1(y_true, y_pred, 4) == pytest.approx(5 / 9)
    # A true class never predicted: F1 0, counted.
    assert metrics.macro_f1([0, 1, 2], [0, 1, 1], 3) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_pearson_by_hand():
    # a = [1, 2, 3], b = [2, 4, 7]: sum da*db = 5, sum da^2 = 2, sum db^2 = 114/9.
    assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert metrics.pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))     # constant sample


def test_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="length"):
        metrics.macro_f1([0, 1], [0], 2)


def test_metrics_match_sklearn_on_random_labels():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        c = int(rng.integers(2, 8))
        y_true = rng.integers(0, c, size=int(rng.integers(5, 60)))
        y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, c, size=y_true.size))
        present = np.unique(y_true)
        assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert metrics.macro_f1(y_true, y_pred, c) == pytest.approx(
            skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
        recall = metrics.per_class_recall(y_true, y_pred, c)
        np.testing.assert_allclose(recall[present],
                                   skm.recall_score(y_true, y_pred, labels=present, average=None, zero_division=0))


def test_summarize_uses_sample_std():
    mean, std = summarize([1.0, 2.0, 3.0, float("nan")])
    assert mean == pytest.approx(2.0) and std == pytest.approx(1.0)
    assert summarize([0.5]) == (0.5, 0.0)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def test_long_tail_profile():
    counts = long_tail_counts(87, 10, 50.0)
    assert counts == [87, 56, 36, 24, 15, 10, 6, 4, 3, 2]
    assert long_tail_counts(20, 4, 1.0) == [20] * 4
    assert long_tail_counts(10, 3, 1000.0) == [10, 1, 1]           # at least one image per class
    with pytest.raises(ValueError):
        long_tail_counts(10, 3, 0.5)


def test_degradation_keeps_quality_levels():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(50, 1, 8, 8)
    out, quality = degrade_fraction(images, 0.2, gen)
    degraded = quality != CLEAN_QUALITY
    assert int(degraded.sum()) == 10
    assert bool(((quality >= 0) & (quality <= CLEAN_QUALITY)).all())
    assert torch.equal(out[~degraded], images[~degraded])           # clean images untouched
    assert bool((out[degraded] != images[degraded]).any(dim=(1, 2, 3)).all())
    assert out.min() >= 0 and out.max() <= 1
    # A blur spreads an isolated pixel; severity out of range is refused.
    spike = torch.zeros(1, 1, 8, 8)
    spike[..., 4, 4] = 1.0
    blurred = degrade(spike, 1, torch.Generator().manual_seed(1))
    assert blurred[..., 4, 4] < 1.0 and blurred[..., 4, 5] > 0.0
    with pytest.raises(ValueError):
        degrade(spike, 0, gen)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from idid_kernels.train.data import make_data
    return make_data(0)


def test_make_data_splits(digits):
    from idid_kernels.train.data import make_data
    train, test = digits.train, digits.test
    # Long-tailed training split with the exponential profile; the test split stays balanced.
    assert sorted(digits.class_counts, reverse=True) == long_tail_counts(87, 10, 50.0)
    assert torch.bincount(train.labels, minlength=10).tolist() == digits.class_counts
    test_counts = torch.bincount(test.labels, minlength=10)
    assert int(test_counts.max() - test_counts.min()) <= 5           # 87..91 per class, from 174..183
    assert [digits.class_counts[c] for c in digits.rank_to_class] == sorted(digits.class_counts, reverse=True)
    for split in (train, test):
        assert split.images.shape == (len(split), 1, 8, 8) and split.images.dtype == torch.float32
        assert int((split.quality != CLEAN_QUALITY).sum()) == round(0.2 * len(split))
    # Deterministic in the seed; another seed gives another split and tail order.
    again = make_data(0)
    assert torch.equal(again.train.images, train.images) and torch.equal(again.test.quality, test.quality)
    other = make_data(1)
    assert other.rank_to_class != digits.rank_to_class or not torch.equal(other.test.labels, test.labels)


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------

def test_every_head_trains_and_predicts():
    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    y = torch.arange(32) % 4
    for name in LOSSES:
        head = build_head(name, 16, 4)
        loss = head(x, y)
        assert loss.dim() == 0 and torch.isfinite(loss), name
        loss.backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        x.grad = None
        pred = head.predict(x.detach())
        assert pred.shape == (32,) and pred.dtype == torch.int64 and int(pred.max()) < 4, name
    with pytest.raises(ValueError, match="unknown loss"):
        build_head("focal", 16, 4)


def test_heads_use_the_documented_configurations():
    cm = build_head("cm-cosface", 8, 3).loss.config
    assert (cm["margin"], cm["s"], cm["m"], cm["contraction"]) == ("cosface", 30.0, None, "sigmoid")  # m None -> 0.4
    assert build_head("cosface", 8, 3).loss.config["contraction"] == "none"
    assert build_head("arcface", 8, 3).loss.config["margin"] == "arcface"
    assert build_head("cm-m-softmax", 8, 3).loss.config["margin"] == "none"
    cfg = {name: build_head(name, 8, 3).loss.config for name in LOSSES if name.startswith("idid")}
    assert cfg["idid-r1"]["diversity"] and cfg["idid-r1"]["distillation"] and cfg["idid-r1"]["adaptive_weight"]
    assert not cfg["idid-r1-no-div"]["diversity"]
    assert not cfg["idid-r1-no-kd"]["distillation"]
    assert not cfg["idid-r1-fixed-w"]["adaptive_weight"]


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------

def test_a_run_is_deterministic_given_the_seed(digits):
    from idid_kernels.train.trainer import train_and_evaluate
    cfg = TrainConfig(epochs=1)
    a = train_and_evaluate("cm-cosface", digits, 0, cfg)
    b = train_and_evaluate("cm-cosface", digits, 0, cfg)
    for key in ("accuracy", "macro_f1", "g_mean", "norm_quality_r", "final_train_loss", "recall_by_class"):
        assert getattr(a, key) == getattr(b, key), key


def _fake_run(loss, seed, g):
    return RunResult(loss=loss, seed=seed, accuracy=g, macro_f1=g, g_mean=g, tail_recall=g,
                     recall_by_rank=[g, g], recall_by_class=[g, g], rank_to_class=[0, 1], acc_clean=g,
                     acc_degraded=g, norm_quality_r=0.5, mean_norm_by_quality=[1.0, 2.0], final_train_loss=0.1,
                     seconds=1.0)


def test_summary_pairs_seeds_with_the_baseline():
    runs = [_fake_run("ce", 0, 0.5), _fake_run("ce", 1, 0.7), _fake_run("idid-r1", 0, 0.6), _fake_run("idid-r1", 1, 0.6)]
    s = summarize_runs(runs)
    assert s["ce"]["g_mean"]["mean"] == pytest.approx(0.6)
    assert s["ce"]["g_mean"]["std"] == pytest.approx(math.sqrt(0.02))
    paired = s["idid-r1"]["paired_vs_ce"]["g_mean"]
    assert paired["mean"] == pytest.approx(0.0) and paired["wins"] == 1 and paired["seeds"] == 2
    assert "paired_vs_ce" not in s["ce"]


def test_smoke_run_of_the_command(tmp_path):
    pytest.importorskip("sklearn")
    from idid_kernels.train.runner import main
    json_path, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    args = build_parser().parse_args(["train", "--epochs", "1", "--seeds", "0", "--no-progress",
                                      "--json", str(json_path), "--csv", str(csv_path)])
    out = io.StringIO()
    assert main(args, out=out) == 0
    text = out.getvalue()
    for name in DIGITS_LOSSES:                                      # the digits default: the published nine
        assert f"| {name} " in text
    payload = json.loads(json_path.read_text())
    assert [r["loss"] for r in payload["runs"]] == list(DIGITS_LOSSES)
    assert payload["config"]["epochs"] == 1 and payload["config"]["seeds"] == [0]
    assert payload["train_counts_by_rank"] == long_tail_counts(87, 10, 50.0)
    for r in payload["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["g_mean"] <= 1.0
        assert len(r["recall_by_rank"]) == 10
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["loss"] for row in rows] == list(DIGITS_LOSSES)
    assert float(rows[0]["accuracy"]) == pytest.approx(payload["runs"][0]["accuracy"], rel=1e-5)


@pytest.mark.parametrize("bad", [["--losses", "ce,focal"], ["--epochs", "0"], ["--rho", "0.5"],
                                 ["--degrade-frac", "1.5"], ["--test-frac", "1"], ["--batch-size", "1"]])
def test_train_command_rejects_bad_options(bad, capsys):
    from idid_kernels.train.runner import main
    args = build_parser().parse_args(["train", "--no-progress"] + bad)
    assert main(args, out=io.StringIO()) == 2
    assert "error:" in capsys.readouterr().err


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from idid_kernels.train.plots import write_plots
    runs = [_fake_run("ce", 0, 0.5), _fake_run("ce", 1, 0.7), _fake_run("idid-r1", 0, 0.6)]
    paths = write_plots(tmp_path, summarize_runs(runs), runs, [10, 2])
    for p in paths:
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
