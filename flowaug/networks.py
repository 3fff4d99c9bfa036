"""ConvNet-3: the network of the dataset-condensation literature (DC, DSA, DM), as an embedding and a classifier.

``depth`` blocks of [3x3 convolution (``width`` channels, padding 1) -> instance norm (a GroupNorm with one
group per channel, affine, as in the DC/DSA/DM code) -> ReLU -> 2x2 average pooling], then a linear
classifier on the flattened features. :meth:`ConvNet.embed` returns those features: freshly initialised,
it is the random embedding distribution matching (Zhao & Bilen, WACV 2023) draws at every iteration.

Example:
    >>> import torch
    >>> net = ConvNet(channels=1, num_classes=10, image_size=(28, 28), width=16)
    >>> net.embed(torch.rand(4, 1, 28, 28)).shape, net(torch.rand(4, 1, 28, 28)).shape
    (torch.Size([4, 144]), torch.Size([4, 10]))
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int

__all__ = ["ConvNet"]


class ConvNet(nn.Module):
    """ConvNet-``depth`` with instance norm and average pooling (see the module docstring).

    Args:
        channels: input channels (1 for MNIST/USPS).
        num_classes: outputs of the classifier.
        image_size: (H, W) of the inputs.
        width: channels of every convolution (128 in the published protocols).
        depth: number of conv blocks (3).
    """

    def __init__(self, channels: int = 1, num_classes: int = 10, image_size=(28, 28), width: int = 128,
                 depth: int = 3):
        super().__init__()
        channels, num_classes = check_int("channels", channels, minimum=1), check_int("num_classes", num_classes,
                                                                                       minimum=1)
        width, depth = check_int("width", width, minimum=1), check_int("depth", depth, minimum=1)
        h, w = (int(s) for s in image_size)
        layers, c = [], channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"image_size {tuple(image_size)} is too small for depth {depth} (each block halves it)")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * h * w
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, feature_dim) features before the classifier."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
