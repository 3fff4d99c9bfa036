"""The classifiers the transfer and re-purposing benchmarks train (they were the old demo's; the demo no longer
re-purposes): LeNet-5, its training loop, accuracy, and a seeded per-class draw."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LeNet5", "accuracy", "per_class", "train_classifier"]


class LeNet5(nn.Module):
    """LeNet-5 as in Bonet, Vauthier & Korba (2025)'s code: the first convolution is 1x1 (``first=1``).

    ``first=5`` gives the standard LeNet-5 (5x5 first convolution, padding 2). Input (N, 1, 28, 28).
    """

    def __init__(self, first: int = 1, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, first, padding=(first - 1) // 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, classes)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 14, 14)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5)
        x = F.relu(self.conv3(x)).flatten(1)  # (N, 120)
        return self.fc2(F.relu(self.fc1(x)))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 3e-4,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.01,
                     progress: bool = False) -> nn.Module:
    """AdamW, shuffled mini-batches; returns the model in eval mode. ``progress``: a bar over epochs (with the
    last batch's loss), updated from the first batch on."""
    from tqdm.auto import tqdm

    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty and of the same length, got {len(x)} inputs and {len(y)} labels")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = tqdm(total=epochs * ((len(x) + batch_size - 1) // batch_size), desc="training classifier", unit="batch",
               disable=not progress, leave=False)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
        bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def per_class(x, y, k, seed):
    """The first ``k`` samples of each class after a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:k]]
           for c in torch.unique(y).tolist()]
    idx = torch.cat(idx)
    return x[idx], y[idx]

