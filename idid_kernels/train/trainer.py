"""One training run (one loss, one seed) and its evaluation on the test split.

Fairness: for a given seed every loss gets the same data, the same network initialisation (drawn
from the seed before the head is built), the same mini-batch order, optimiser and schedule. Runs
are deterministic given the seed on a given machine and thread count.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from . import metrics
from .data import CLEAN_QUALITY, DigitsData, Split
from .heads import LossSpec, build_head
from .model import build_model


TAIL_CLASSES = 3


@dataclass
class TrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    embed_dim: int = 64
    width: int = 256
    backend: str = "auto"
    device: str = "cpu"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    loss: str
    seed: int
    accuracy: float
    macro_f1: float
    g_mean: float
    tail_recall: float                 # mean recall of the TAIL_CLASSES least frequent training classes
    recall_by_rank: list[float]        # per-class recall, class frequency rank 0 (most frequent) first
    recall_by_class: list[float]       # per-class recall indexed by digit
    rank_to_class: list[int]           # the digit at each frequency rank in this seed's training split
    acc_clean: float
    acc_degraded: float
    norm_quality_r: float              # Pearson r(||x||, quality level) on the test split
    mean_norm_by_quality: list[float]  # mean ||x|| of test images at quality 0..CLEAN_QUALITY
    final_train_loss: float
    seconds: float
    # mean training logit scale s * sigmoid((||x|| - offset) / T) of test images at each quality level
    # (margin heads only; empty for the others): s at every level means the contraction saturates
    mean_scale_by_quality: list[float] = field(default_factory=list)
    # the evaluated split's (N, d) features, labels, quality levels when asked for (not serialised)
    features: tuple | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("features")
        return out


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """A fresh permutation cut into ceil(n / batch_size) near-equal batches: no batch of size one
    (batch norm needs two rows) and every image is seen once per epoch."""
    perm = torch.randperm(n, generator=gen)
    return torch.tensor_split(perm, max(1, math.ceil(n / batch_size)))


@torch.no_grad()
def _embed(net: torch.nn.Module, images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([net(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def train_and_evaluate(loss_name: str, data: DigitsData, seed: int, cfg: TrainConfig, on_epoch=None, *,
                       split: str = "test", registry: dict[str, LossSpec] | None = None,
                       keep_features: bool = False) -> RunResult:
    """Train the data set's network (model.build_model) + the loss's head on ``data.train`` and
    evaluate on ``data.test`` (``split="val"``: on ``data.val``, for choosing settings).

    ``on_epoch(epoch, epochs, mean_loss)`` is called after every epoch (the progress bar).
    ``registry``: where ``loss_name`` is looked up (default heads.LOSSES). ``keep_features``: keep
    the evaluated split's features in ``RunResult.features``.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    evaluated: Split | None = getattr(data, split)
    if evaluated is None:
        raise ValueError("split='val' needs data made with val_frac > 0")
    start = time.perf_counter()
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    net = build_model(data.dataset, cfg.embed_dim, cfg.width)
    torch.manual_seed(seed + 1_000_003)
    head = build_head(loss_name, cfg.embed_dim, data.num_classes, cfg.backend, registry,
                      class_counts=data.class_counts)
    net.to(device)
    head.to(device)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train = data.train.images.to(device)
    y_train = data.train.labels.to(device)
    batch_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, math.ceil(len(data.train) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)

    mean_loss = math.nan
    for epoch in range(cfg.epochs):
        net.train()
        head.train()
        total, count = 0.0, 0
        for idx in _batches(len(data.train), cfg.batch_size, batch_gen):
            idx = idx.to(device)
            loss = head(net(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        mean_loss = total / count
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{loss_name}, seed {seed}: the training loss became {mean_loss} "
                                     f"in epoch {epoch + 1}")
        if on_epoch is not None:
            on_epoch(epoch + 1, cfg.epochs, mean_loss)

    net.eval()
    head.eval()
    with torch.no_grad():
        feats = _embed(net, evaluated.images.to(device))
        pred = head.predict(feats).cpu()
        scale = head.scale(feats)
    norms = torch.linalg.vector_norm(feats, dim=1).cpu()
    y, q = evaluated.labels, evaluated.quality

    def by_quality(values: torch.Tensor) -> list[float]:
        return [float(values[q == level].mean()) if bool((q == level).any()) else math.nan
                for level in range(CLEAN_QUALITY + 1)]

    clean = q == CLEAN_QUALITY
    recall = metrics.per_class_recall(y, pred, data.num_classes)
    mean_norm = by_quality(norms)
    return RunResult(
        loss=loss_name, seed=seed,
        accuracy=metrics.accuracy(y, pred),
        macro_f1=metrics.macro_f1(y, pred, data.num_classes),
        g_mean=metrics.g_mean(y, pred, data.num_classes),
        tail_recall=float(np.mean([recall[c] for c in data.rank_to_class[-TAIL_CLASSES:]])),
        recall_by_rank=[float(recall[c]) for c in data.rank_to_class],
        recall_by_class=[float(r) for r in recall],
        rank_to_class=list(data.rank_to_class),
        acc_clean=metrics.accuracy(y[clean], pred[clean]),
        acc_degraded=metrics.accuracy(y[~clean], pred[~clean]),
        norm_quality_r=metrics.pearson(norms, q.to(torch.float64)),
        mean_norm_by_quality=mean_norm,
        final_train_loss=float(mean_loss),
        seconds=time.perf_counter() - start,
        mean_scale_by_quality=[] if scale is None else by_quality(scale.cpu().to(torch.float64)),
        features=(feats.cpu(), y, q) if keep_features else None,
    )


def summarize(values) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1; 0 for one value), ignoring NaNs."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
