"""Adapt your own LightningModule through a drift with your own Trainer: flowaug.GradualWalk.

Toy data, no download: two classes of 2-D blobs that rotate from 0 to 90 degrees. The module is trained on the
labelled source with its own training_step; two unlabelled snapshots (30 and 60 degrees) and the unlabelled target
are given. ``GradualWalk`` runs ``flowaug.gradual.adapt``'s walk (flow-generated domains between the snapshots,
self-training through them) with every stage a ``Trainer.fit`` made by your factory, and keeps its state in a
folder so that an interrupted walk resumes where it stopped.

    python examples/gradual_lightning.py      # a few seconds on one CPU core
"""

import logging
import math
import tempfile

import lightning.pytorch as L
import torch
from torch import nn

from flowaug import GradualWalk


def blobs(angle_deg: float, n: int, seed: int):
    """(n, 2) points of two classes at +-3 along the direction ``angle_deg``, and their (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = math.radians(angle_deg)
    centre = torch.tensor([math.cos(a), math.sin(a)]) * 3.0
    return torch.randn(n, 2, generator=g) * 0.7 + torch.where(y[:, None] == 0, centre, -centre), y


class Classifier(L.LightningModule):
    """The user's module: the walk is told its parts by name (``encoder``, ``head``)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(2, 16), nn.ReLU())  # (N, 2) -> (N, 16)
        self.head = nn.Linear(16, 2)  # (N, 16) -> (N, 2) logits

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):  # used for the source training only
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100 * float((model.eval()(x).argmax(1) == y).float().mean())


def my_trainer(**walk_keywords):
    """Your Trainer settings; the walk passes max_epochs (its epochs per stage) and use_distributed_sampler."""
    return L.Trainer(**walk_keywords, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def main():
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per stage: keep it quiet
    torch.manual_seed(0)
    source = blobs(0, 200, seed=0)
    given = [blobs(30, 200, seed=1)[0], blobs(60, 200, seed=2)[0]]  # unlabelled snapshots of the drift
    target = blobs(90, 200, seed=3)[0]  # unlabelled
    test = blobs(90, 400, seed=4)  # labelled: for scoring only

    model = Classifier()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*source), batch_size=32, shuffle=True)
    my_trainer(max_epochs=20).fit(model, loader)
    print(f"source only:  {accuracy(model, *test):5.1f}%")

    with tempfile.TemporaryDirectory() as folder:
        walk = GradualWalk(source, given + [target], encoder="encoder", head="head", generated=4, epochs=5,
                           schedule="cosine", seed=0, dirpath=folder)
        adapted = walk.fit(model, trainer=my_trainer)  # a copy: `model` is unchanged
        print(f"GradualWalk:  {accuracy(adapted, *test):5.1f}%  (state kept in {walk.state_path} while it ran)")


if __name__ == "__main__":
    main()
