"""Adapt a digit classifier from upright digits to digits rotated by 55-60 degrees, with no target labels.

Two unlabelled snapshots of the drift are given (20 and 40 degrees). ``flowaug.gradual.adapt`` fills the gaps
between consecutive domains with flow-generated domains in the model's features and self-trains through them.
Reads MNIST from the shared data folder beside the repository (shared/data/mnist) when it is there; otherwise
it rotates the examples' toy bar images, so it runs anywhere.

    python examples/gradual_adaptation.py      # about half a minute on one CPU core

The full comparison (GOAT, the all-real-intermediates oracle, 5 seeds): benchmarks/gradual.py.
"""

import os

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from flowaug.gradual import adapt, pseudo_labels, self_train

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mnist", "train.npz")


def images(n: int):
    if os.path.exists(DATA):
        d = np.load(DATA)
        return torch.from_numpy(d["x"][:n]).float().div(255).unsqueeze(1), torch.from_numpy(d["y"][:n]).long()
    from _domains import domain  # the examples' toy domain (examples/_domains.py)

    x, y = domain(n, 0, seed=0)
    return nn.functional.interpolate(x, size=28), y


def rotated(x, low, high, seed):
    angles = torch.empty(len(x)).uniform_(low, high, generator=torch.Generator().manual_seed(seed))
    return torch.stack([TF.rotate(img, float(a), TF.InterpolationMode.BILINEAR) for img, a in zip(x, angles)])


def accuracy(model, x, y) -> float:
    return 100 * float((pseudo_labels(model, x, confidence=0.0)[0] == y).float().mean())


def main():
    torch.manual_seed(0)
    x, y = images(9000)
    source = (rotated(x[:3000], 0, 5, 0), y[:3000])
    given = [rotated(x[3000:4500], 17.5, 22.5, 1), rotated(x[4500:6000], 37.5, 42.5, 2)]  # unlabelled
    target = rotated(x[6000:7500], 55, 60, 3)  # unlabelled
    test = (rotated(x[7500:9000], 55, 60, 4), y[7500:9000])  # labelled: for scoring only

    layers = []
    for c_in in (1, 32, 32):
        layers += [nn.Conv2d(c_in, 32, 5, 2, 2), nn.BatchNorm2d(32), nn.ReLU()]
    encoder = nn.Sequential(*layers, nn.Flatten())  # (N, 512)
    head = nn.Sequential(nn.Linear(512, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    g = torch.Generator().manual_seed(0)
    model = self_train(nn.Sequential(encoder, head), *source, epochs=10, generator=g)  # supervised on the source
    print(f"source only:                  {accuracy(model, *test):5.1f}%")

    common = {"epochs": 3, "generator": g}
    plain = adapt(model[0], model[1], source, given + [target], generated=0, **common)  # no generated domains
    print(f"gradual self-training:        {accuracy(plain, *test):5.1f}%  (given domains only)")
    flowed = adapt(model[0], model[1], source, given + [target], progress=True, **common)  # 20 flow domains per gap
    print(f"flowaug (20 domains per gap): {accuracy(flowed, *test):5.1f}%")


if __name__ == "__main__":
    main()
