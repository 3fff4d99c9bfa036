"""Run by tests/test_ddp.py as a script: Lightning DDP on CPU (gloo, 2 processes).

Each rank records, in OUT/rank{r}.json: the strength its batches were flowed with per epoch, a checksum of
every flowed batch it trained on, and a checksum of the FlowDataset it precomputed (sharded across ranks
and gathered) in setup().
"""

import hashlib
import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flowaug  # noqa: E402
from tests.conftest import tiny_images  # noqa: E402


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().contiguous().numpy().tobytes(), digest_size=8).hexdigest()


class Data(pl.LightningDataModule):
    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def setup(self, stage=None):
        x, y = tiny_images(64, seed=3)
        ref = tiny_images(40, seed=4)
        self.flowed = flowaug.FlowDataset(TensorDataset(x, y), ref, steps=3, chunk_size=16, progress=False)
        self.train = TensorDataset(*tiny_images(32, seed=5), torch.arange(32))

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4)


class Module(pl.LightningModule):
    def __init__(self, transform):
        super().__init__()
        self.layer = torch.nn.Linear(36, 1)
        self.transform = transform
        self.seen = {}

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).append(
            {"strength": self.transform.strength, "x": digest(x), "idx": idx.tolist()})
        return self.layer(x.flatten(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out = sys.argv[1]
    x, y = tiny_images(32, seed=5)
    t = flowaug.FlowTransform(tiny_images(40, seed=4), steps=2, seed=0).fit((x, y))
    data, module = Data(t), Module(t)
    trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[flowaug.FlowAnnealing(t, "linear", apply_to_batches=True, log=False)],
    )
    trainer.fit(module, datamodule=data)
    flowed = torch.stack([data.flowed[i][0] for i in range(len(data.flowed))])
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump({"seen": module.seen, "flowed": digest(flowed), "world": trainer.world_size,
                   "chunks": data.flowed.chunks_flowed}, handle)
