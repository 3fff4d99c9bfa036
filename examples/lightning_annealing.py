"""A Lightning training whose batches are flowed toward a target domain, annealed by FlowAnnealing.

The strength goes from 0 (source batches) to 1 (the full flow) over the epochs, in the DataLoader's
persistent workers (collate_fn), and the callback logs it.

    python examples/lightning_annealing.py
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _domains import domain  # the examples' two toy domains (examples/_domains.py)
from torch.utils.data import DataLoader, TensorDataset

import flowaug


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("target_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


if __name__ == "__main__":
    source = TensorDataset(*domain(1024, 0, seed=0))
    shots = domain(40, 1, seed=1)
    test = TensorDataset(*domain(400, 1, seed=2))
    flow_to_target = flowaug.FlowTransform(shots, steps=4, step_size=0.5, class_map="same", seed=0)
    train = DataLoader(source, batch_size=64, shuffle=True, num_workers=2, persistent_workers=True,
                       collate_fn=flowaug.FlowCollate(flow_to_target))  # picklable: any start method
    annealing = flowaug.FlowAnnealing(flow_to_target, "cosine", start_value=0.0, end_value=1.0)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", callbacks=[annealing], logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Classifier(), train, DataLoader(test, batch_size=200))
    print(f"final strength {flow_to_target.strength:.2f}; target accuracy {trainer.callback_metrics['target_acc']:.3f}")
