"""Small Lightning pieces for callback tests (module level, so spawned workers can unpickle them)."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate


class StrengthProbe(Dataset):
    """Items carry the strength of ``target`` as read *inside the worker* and the worker's pid."""

    def __init__(self, target, n: int = 16, dim: int = 4):
        self.target, self.n, self.dim = target, n, dim

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((self.dim,), float(i)), torch.tensor(self.target.strength), torch.tensor(os.getpid())


class FlowCollate:
    """collate_fn that applies a FlowTransform to the collated (x, y) batch, in the worker."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, items):
        x, y = default_collate(items)
        return self.transform(x, y)


class Recorder(pl.LightningModule):
    """Records what each training batch carried, per epoch."""

    def __init__(self, dim: int = 4):
        super().__init__()
        self.layer = torch.nn.Linear(dim, 1)
        self.seen: dict[int, list] = {}
        self.pids: set = set()
        self.batches: dict[int, list] = {}

    def training_step(self, batch, batch_idx):
        x = batch[0]
        if len(batch) == 3:
            self.seen.setdefault(self.current_epoch, []).extend(batch[1].tolist())
            self.pids.update(batch[2].tolist())
        self.batches.setdefault(self.current_epoch, []).append(x.detach().clone())
        return self.layer(x.flatten(1).float()).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: batches stay comparable across runs


class StopAfter(pl.Callback):
    """Stops training at the end of epoch ``epoch`` (0-based), like a job killed after it."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def loader(dataset, workers: int = 2, context=None, collate_fn=None, batch_size: int = 4):
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                      multiprocessing_context=context, collate_fn=collate_fn)


def trainer(tmp_path, max_epochs: int, callbacks, **kwargs):
    return pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks, num_sanity_val_steps=0,
        **kwargs,
    )
