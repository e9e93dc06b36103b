"""The small network every loss trains: a three-layer CNN for 8x8 digits with a linear embedding.

The embedding is the output of a plain linear layer (no normalisation, no activation), so its norm
is free to carry information: the contraction-mapped losses act on ||x||, and the evaluation
correlates ||x|| with image quality. Batch norm is used only inside the convolutional trunk.
About 60k parameters: a training step on a batch of 64 takes a few milliseconds on one CPU core.
"""
from __future__ import annotations

from torch import nn


class DigitsNet(nn.Module):
    """(N, 1, 8, 8) images -> (N, embed_dim) features."""

    def __init__(self, embed_dim: int = 64, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(1, width), *block(width, width), nn.MaxPool2d(2),          # 8x8 -> 4x4
            *block(width, 2 * width), nn.MaxPool2d(2),                          # 4x4 -> 2x2
            nn.Flatten(),
        )
        self.embed = nn.Linear(2 * width * 4, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, images):
        return self.embed(self.trunk(images))
