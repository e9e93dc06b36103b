"""The mnist protocol of `train`: the bundled MNIST loader (offline, deterministic), its split and
degradation, the CNN, the running-statistics contraction head, the contraction pairing of the
report, the protocol defaults, and tiny smoke runs of the command (evaluation, 2-D plots, tuning)."""
from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch

from idid_kernels.cli import build_parser
from idid_kernels.functional import cm_margin_loss
from idid_kernels.train import data as data_mod
from idid_kernels.train.data import (CLEAN_QUALITY, MNIST_SEVERITIES, SEVERITIES, degrade, gaussian_kernel,
                                     load_mnist_arrays, long_tail_counts, make_data)
from idid_kernels.train.heads import (CONTRACTION_CANDIDATES, DIGITS_LOSSES, LOSSES, TUNED_TEMPERATURE_FACTOR,
                                      RunningNormMarginHead, build_head)
from idid_kernels.train.model import MnistCNN, build_model
from idid_kernels.train.report import format_report, summarize_runs
from idid_kernels.train.trainer import RunResult


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def test_mnist_loads_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the MNIST loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    data_mod._mnist_arrays.cache_clear()          # read the bundled file again, under the patch
    images, labels = load_mnist_arrays()
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.min() == 0.0 and images.max() == 1.0
    assert not images.flags.writeable and not labels.flags.writeable    # the cached copy cannot be changed
    # Real digits, not noise: the border is almost always empty and strokes fill the centre.
    assert images[:, :2].mean() < 0.01 < 0.2 < images[:, 10:18, 10:18].mean()


@pytest.fixture(scope="module")
def mnist():
    return make_data(0, dataset="mnist")


def test_mnist_split_imbalance_and_degradation(mnist):
    train, test = mnist.train, mnist.test
    assert mnist.dataset == "mnist" and mnist.num_classes == 10 and mnist.val is None
    # Stratified 50/50 split: a balanced test split, a pool of 250 per class cut to the long tail.
    assert torch.bincount(test.labels, minlength=10).tolist() == [250] * 10
    profile = long_tail_counts(250, 10, 50.0)
    assert profile[0] == 250 and profile[-1] == 5
    assert sorted(mnist.class_counts, reverse=True) == profile
    assert torch.bincount(train.labels, minlength=10).tolist() == mnist.class_counts
    assert [mnist.class_counts[c] for c in mnist.rank_to_class] == profile
    images, labels = load_mnist_arrays()
    for split in (train, test):
        assert split.images.shape == (len(split), 1, 28, 28) and split.images.dtype == torch.float32
        assert torch.equal(split.labels, torch.from_numpy(labels[split.source_index.numpy()]))
        degraded = split.quality != CLEAN_QUALITY
        assert int(degraded.sum()) == round(0.2 * len(split))
        assert set(split.quality.tolist()) == {0, 1, 2, 3}
        source = torch.from_numpy(images[split.source_index.numpy()]).unsqueeze(1)
        assert torch.equal(split.images[~degraded], source[~degraded])         # clean images untouched
        assert bool((split.images[degraded] != source[degraded]).any(dim=(1, 2, 3)).all())
    assert not set(train.source_index.tolist()) & set(test.source_index.tolist())


def test_mnist_data_is_deterministic_in_the_seed(mnist):
    again = make_data(0, dataset="mnist")
    for a, b in ((again.train, mnist.train), (again.test, mnist.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.quality, b.quality)
    other = make_data(1, dataset="mnist")
    assert not torch.equal(other.test.source_index, mnist.test.source_index)


def test_mnist_validation_split_is_balanced_and_disjoint(mnist):
    tuned = make_data(0, dataset="mnist", val_frac=0.2)
    val = tuned.val
    assert torch.bincount(val.labels, minlength=10).tolist() == [50] * 10
    assert int((val.quality != CLEAN_QUALITY).sum()) == round(0.2 * len(val))
    v, t, s = (set(x.source_index.tolist()) for x in (val, tuned.train, tuned.test))
    assert not v & t and not v & s and not t & s
    assert torch.equal(tuned.test.source_index, mnist.test.source_index)        # the same test images
    assert sorted(tuned.class_counts, reverse=True) == long_tail_counts(200, 10, 50.0)
    with pytest.raises(ValueError, match="val_frac"):
        make_data(0, dataset="mnist", val_frac=1.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_data(0, dataset="cifar")


def test_mnist_degradation_scales_with_the_digit():
    assert MNIST_SEVERITIES == tuple((2.5 * s, n) for s, n in SEVERITIES)
    assert gaussian_kernel(MNIST_SEVERITIES[-1][0]).shape == (1, 1, 13, 13)
    # At the widest severity a stroke pixel is spread out (its blurred peak is about 0.02) and then
    # buried in noise of std 0.3: averaged over many draws the peak is gone, the noise is not.
    spike = torch.zeros(400, 1, 28, 28)
    spike[..., 14, 14] = 1.0
    out = degrade(spike, 3, torch.Generator().manual_seed(0), MNIST_SEVERITIES)
    assert out.shape == spike.shape and 0 <= out.min() and out.max() <= 1
    mean = out.mean(dim=0)[0]
    assert float(mean[14, 14]) < 0.2 and abs(float(mean[14, 14] - mean[3, 3])) < 0.05
    assert 0.15 < float(out[:, 0, 3, 3].std()) < 0.3                 # clamped N(0, 0.3^2)
    with pytest.raises(ValueError, match="severity"):
        degrade(spike, 4, torch.Generator(), MNIST_SEVERITIES)


# ---------------------------------------------------------------------------------------------
# model and heads
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 16])
def test_mnist_cnn_gives_low_dimensional_features(dim):
    torch.manual_seed(0)
    net = build_model("mnist", dim, 4)
    assert isinstance(net, MnistCNN)
    out = net(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, dim) and torch.isfinite(out).all()
    assert any(isinstance(m, torch.nn.PReLU) for m in net.modules())
    with pytest.raises(ValueError, match="no network"):
        build_model("cifar", dim, 4)


def test_running_norm_head_centres_the_contraction():
    torch.manual_seed(0)
    head = RunningNormMarginHead(8, 4, margin="cosface", temperature_factor=2.0, momentum=0.5)
    x = torch.randn(64, 8) * 5 + 1
    y = torch.arange(64) % 4
    norms = torch.linalg.vector_norm(x, dim=1).double()
    head.train()
    loss = head(x, y)
    # First batch: offset = its mean norm, temperature = k x its std.
    offset, temperature = head.contraction_params()
    assert offset == pytest.approx(float(norms.mean())) and temperature == pytest.approx(2.0 * float(norms.std()))
    expected = cm_margin_loss(x, head.loss.weight, y, margin="cosface", norm_offset=offset,
                              norm_temperature=temperature, backend="reference")
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    # The contraction is live: unlike the default head, it does not scale this batch by about s.
    default = cm_margin_loss(x, head.loss.weight, y, margin="cosface", backend="reference")
    assert abs(float(loss.detach()) - float(default.detach())) > 1e-3
    scale = head.scale(x)
    assert float(scale.min()) < 10 < 20 < float(scale.max()) <= 30
    # Later batches move the statistics by the momentum; evaluation leaves them alone.
    head(2 * x, y)
    assert head.contraction_params()[0] == pytest.approx(1.5 * float(norms.mean()))
    head.eval()
    before = head.contraction_params()
    head(10 * x, y)
    assert head.contraction_params() == before and int(head.batches_seen) == 2
    with pytest.raises(ValueError):
        RunningNormMarginHead(8, 4, temperature_factor=0.0)


def test_registered_heads_and_protocol_losses():
    assert build_head("l2-softmax", 8, 3).loss.config["margin"] == "none"
    assert build_head("l2-softmax", 8, 3).loss.config["contraction"] == "none"
    tuned = build_head("cm-cosface-tuned", 8, 3)
    assert isinstance(tuned, RunningNormMarginHead) and tuned.temperature_factor == TUNED_TEMPERATURE_FACTOR
    assert tuned.loss.config["margin"] == "cosface" and tuned.loss.config["s"] == 30.0
    assert torch.allclose(build_head("cosface", 8, 3).scale(torch.randn(4, 8)), torch.full((4,), 30.0))
    assert build_head("ce", 8, 3).scale(torch.randn(4, 8)) is None
    assert set(DIGITS_LOSSES) < set(LOSSES)
    assert "default" in CONTRACTION_CANDIDATES
    head = build_head("running-k1", 8, 3, registry=CONTRACTION_CANDIDATES)
    assert isinstance(head, RunningNormMarginHead) and head.temperature_factor == 1.0


def test_protocol_defaults_keep_digits_and_give_mnist_its_own():
    from idid_kernels.train.runner import _resolve
    parse = lambda *a: build_parser().parse_args(["train", *a])  # noqa: E731
    losses, seeds, cfg = _resolve(parse())
    assert losses == list(DIGITS_LOSSES) and seeds == list(range(10))
    assert (cfg.epochs, cfg.embed_dim, cfg.width) == (60, 64, 256)
    losses, seeds, cfg = _resolve(parse("--dataset", "mnist"))
    assert losses == list(LOSSES) and len(seeds) >= 5
    assert (cfg.epochs, cfg.embed_dim, cfg.width) == (30, 16, 8)
    _, _, cfg = _resolve(parse("--dataset", "mnist", "--feature-dim", "2", "--epochs", "3"))
    assert (cfg.epochs, cfg.embed_dim) == (3, 2)
    losses, seeds, _ = _resolve(parse("--dataset", "mnist", "--tune-contraction"))
    assert losses == list(CONTRACTION_CANDIDATES) and seeds == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown loss"):
        _resolve(parse("--tune-contraction", "--losses", "ce"))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------

def _fake_run(loss, seed, acc, scale=()):
    return RunResult(loss=loss, seed=seed, accuracy=acc, macro_f1=acc, g_mean=acc, tail_recall=acc,
                     recall_by_rank=[acc, acc], recall_by_class=[acc, acc], rank_to_class=[0, 1], acc_clean=acc,
                     acc_degraded=acc, norm_quality_r=0.5, mean_norm_by_quality=[1.0, 2.0], final_train_loss=0.1,
                     seconds=1.0, mean_scale_by_quality=list(scale))


def test_summary_pairs_each_contraction_with_its_head_without_it():
    runs = [_fake_run("ce", s, 0.5) for s in (0, 1)]
    runs += [_fake_run("cosface", 0, 0.6, (30, 30)), _fake_run("cosface", 1, 0.7, (30, 30)),
             _fake_run("cm-cosface", 0, 0.65, (20, 25)), _fake_run("cm-cosface", 1, 0.68, (22, 26))]
    summary = summarize_runs(runs)
    pair = summary["cm-cosface"]["paired_contraction"]
    assert pair["without"] == "cosface"
    assert pair["acc_degraded"]["mean"] == pytest.approx((0.05 - 0.02) / 2)
    assert pair["acc_degraded"]["wins"] == 1 and pair["acc_degraded"]["seeds"] == 2
    assert "paired_contraction" not in summary["cosface"] and "paired_contraction" not in summary["ce"]
    assert summary["cm-cosface"]["mean_scale_by_quality"]["mean"] == [21.0, 25.5]
    assert "mean_scale_by_quality" not in summary["ce"]
    text = format_report(summary, [10, 2], [0, 1])
    assert "cm-cosface - cosface" in text and "scale q1" in text


# ---------------------------------------------------------------------------------------------
# smoke runs of the command (one epoch, one seed, a couple of losses)
# ---------------------------------------------------------------------------------------------

def test_smoke_run_of_the_mnist_command_with_2d_plots(tmp_path):
    from idid_kernels.train.runner import main
    json_path, plot_dir = tmp_path / "r.json", tmp_path / "plots"
    args = build_parser().parse_args(["train", "--dataset", "mnist", "--losses", "ce,cm-cosface", "--seeds", "0",
                                      "--epochs", "1", "--feature-dim", "2", "--width", "4", "--no-progress",
                                      "--json", str(json_path), "--plot", str(plot_dir)])
    out = io.StringIO()
    assert main(args, out=out) == 0
    text = out.getvalue()
    assert "--dataset mnist" in text and "| cm-cosface " in text
    payload = json.loads(json_path.read_text())
    assert payload["config"]["dataset"] == "mnist" and payload["config"]["embed_dim"] == 2
    assert payload["train_counts_by_rank"] == long_tail_counts(250, 10, 50.0)
    assert payload["config"]["severities_blur_sigma_noise_std"] == [list(s) for s in MNIST_SEVERITIES]
    assert [r["loss"] for r in payload["runs"]] == ["ce", "cm-cosface"]
    for r in payload["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["mean_norm_by_quality"]) == CLEAN_QUALITY + 1
        assert "features" not in r
    assert payload["runs"][0]["mean_scale_by_quality"] == []
    assert all(0 < v <= 30 for v in payload["runs"][1]["mean_scale_by_quality"])
    for name in ("feature_scatter.png", "norm_by_quality.png", "norm_vs_quality.png", "recall_vs_frequency.png"):
        assert (plot_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_smoke_run_of_the_contraction_tuning(tmp_path):
    from idid_kernels.train.runner import main
    json_path = tmp_path / "tune.json"
    args = build_parser().parse_args(["train", "--dataset", "mnist", "--tune-contraction", "--losses",
                                      "default,running-k1,running-k2", "--seeds", "0", "--epochs", "1", "--width", "4",
                                      "--no-progress", "--json", str(json_path)])
    out = io.StringIO()
    assert main(args, out=out) == 0
    payload = json.loads(json_path.read_text())
    assert payload["config"]["evaluated_split"] == "val" and payload["config"]["val_frac"] == 0.2
    sel = payload["selection"]
    accs = {name: e["accuracy"]["mean"] for name, e in payload["summary"].items()}
    # k is chosen among the running-statistics settings; the default is the reference beside them.
    assert sel["chosen"] == max(("running-k1", "running-k2"), key=accs.get)
    assert sel["reference_scores_higher"] == (accs["default"] > accs[sel["chosen"]])
    assert "paired_vs_default" in payload["summary"]["running-k1"]
    assert "paired_vs_default" not in payload["summary"]["default"]
    assert f"{sel['chosen']} *" in out.getvalue()
