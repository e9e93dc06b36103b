"""The small networks every loss trains, one per data set; each ends in a linear feature layer.

The feature layer is plain linear (no normalisation, no activation), so the feature's norm is free
to carry information: the contraction-mapped losses act on ||x||, and the evaluation correlates
||x|| with image quality.

- ``DigitsNet`` (8x8 digits): an MLP on the 64 pixels, two hidden layers of 256 units with batch
  norm and ReLU, about 90k parameters. An MLP rather than a CNN because on 8x8 images it reaches the
  same test accuracy here while a training step costs a few times less on one CPU core (convolutions
  on 8x8 maps are dominated by per-call overhead), which keeps the default evaluation within minutes.
- ``MnistCNN`` (28x28 MNIST): in the style of the contraction-mapping authors' MNIST script, with
  the layout of LeNet++ (the center-loss paper's network for 2-D MNIST feature plots): three stages
  of two convolutions with PReLU, each stage followed by 2x2 max pooling (28 -> 14 -> 7 -> 3), then
  a linear low-dimensional feature layer. Narrower than LeNet++ (``width`` = 8, 16, 32 channels
  instead of 32, 64, 128), with 3x3 kernels instead of 5x5 and batch norm before each PReLU, so that
  one run costs seconds on one CPU core: at full width (same 3x3 kernels) a training step costs
  about 5 times more per image here.
"""
from __future__ import annotations

from torch import nn


class DigitsNet(nn.Module):
    """(N, 1, 8, 8) images -> (N, embed_dim) features."""

    def __init__(self, embed_dim: int = 64, width: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        )
        self.embed = nn.Linear(width, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, images):
        return self.embed(self.trunk(images))


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.PReLU(c_out)]


class MnistCNN(nn.Module):
    """(N, 1, 28, 28) images -> (N, embed_dim) features; ``width`` = channels of the first stage
    (doubled at each of the next two)."""

    def __init__(self, embed_dim: int = 16, width: int = 8):
        super().__init__()
        c1, c2, c3 = width, 2 * width, 4 * width
        self.trunk = nn.Sequential(
            *_conv_block(1, c1), *_conv_block(c1, c1), nn.MaxPool2d(2),      # 28 -> 14
            *_conv_block(c1, c2), *_conv_block(c2, c2), nn.MaxPool2d(2),     # 14 -> 7
            *_conv_block(c2, c3), *_conv_block(c3, c3), nn.MaxPool2d(2),     # 7 -> 3
            nn.Flatten(),
        )
        self.embed = nn.Linear(c3 * 3 * 3, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, images):
        return self.embed(self.trunk(images))


# data set (train.data.DATA_SOURCES key) -> the network class trained on it
MODELS: dict[str, type[nn.Module]] = {"digits": DigitsNet, "mnist": MnistCNN}


def build_model(dataset: str, embed_dim: int, width: int) -> nn.Module:
    if dataset not in MODELS:
        raise ValueError(f"no network for dataset {dataset!r}; choose from {', '.join(MODELS)}")
    return MODELS[dataset](embed_dim, width)
