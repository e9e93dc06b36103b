"""The losses compared, each as a head on the shared embedding: ``forward(x, labels)`` gives the
training loss, ``predict(x)`` the predicted classes.

Every head uses its loss's documented defaults; nothing is tuned per loss.

- ``ce``: cross-entropy on a linear classifier (with bias), the baseline.
- ``cosface`` / ``arcface``: margin softmax without contraction (s = 30, m = 0.4 / 0.5 rad).
- ``cm-cosface``: the authors' contraction-mapped head (Liu et al. 2024): CosFace s = 30, m = 0.4,
  logits scaled per sample by sigmoid(||x||).
- ``cm-m-softmax``: no margin, with the contraction (the paper's "CM-M-Softmax").
- ``idid-r1``: this package's reconstruction of the IDID loss (Du et al. 2024) with its defaults,
  and three ablations: no intraclass diversity term, no interclass distillation term, and a fixed
  diversity weight of 1 instead of the adaptive one.

Margin heads predict the argmax of their inference logits s * cos (no margin); IDID-R1 heads the
nearest proxy by cosine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..nn import CMMarginLoss, IDIDLoss


class LinearCEHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x, labels):
        return nn.functional.cross_entropy(self.fc(x), labels)

    def predict(self, x):
        return self.fc(x).argmax(dim=1)


class MarginHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, **kwargs):
        super().__init__()
        self.loss = CMMarginLoss(in_features, num_classes, **kwargs)

    def forward(self, x, labels):
        return self.loss(x, labels)

    def predict(self, x):
        return self.loss.logits(x).argmax(dim=1)


class IDIDHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, **kwargs):
        super().__init__()
        self.loss = IDIDLoss(in_features, num_classes, **kwargs)

    def forward(self, x, labels):
        return self.loss(x, labels)

    def predict(self, x):
        return self.loss.predict(x)


@dataclass(frozen=True)
class LossSpec:
    name: str
    description: str
    build: Callable[[int, int, str], nn.Module]     # (in_features, num_classes, backend) -> head


def _margin(**kw):
    return lambda d, c, backend: MarginHead(d, c, backend=backend, **kw)


def _idid(**kw):
    return lambda d, c, backend: IDIDHead(d, c, backend=backend, **kw)


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("ce", "cross-entropy, linear classifier", lambda d, c, backend: LinearCEHead(d, c)),
    LossSpec("cosface", "CosFace s=30 m=0.4, no contraction", _margin(margin="cosface", contraction="none")),
    LossSpec("arcface", "ArcFace s=30 m=0.5, no contraction", _margin(margin="arcface", contraction="none")),
    LossSpec("cm-cosface", "CosFace s=30 m=0.4 x sigmoid(||x||) (authors' CM head)",
             _margin(margin="cosface", contraction="sigmoid")),
    LossSpec("cm-m-softmax", "no margin, s=30 x sigmoid(||x||) (CM-M-Softmax)",
             _margin(margin="none", contraction="sigmoid")),
    LossSpec("idid-r1", "IDID-R1 (reconstruction), defaults", _idid()),
    LossSpec("idid-r1-no-div", "IDID-R1 without the intraclass diversity term", _idid(diversity=False)),
    LossSpec("idid-r1-no-kd", "IDID-R1 without the interclass distillation term", _idid(distillation=False)),
    LossSpec("idid-r1-fixed-w", "IDID-R1 with a fixed diversity weight 1.0", _idid(adaptive_weight=False)),
)}


def build_head(name: str, in_features: int, num_classes: int, backend: str = "auto") -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name].build(in_features, num_classes, backend)
