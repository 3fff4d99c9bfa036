"""FlowTransform in a torchvision pipeline: after the DataLoader, and inside a collate_fn.

Source: scikit-learn-like 8x8 digits are not needed; this example builds two small image datasets on the fly
(a "source" and a shifted "target" domain), so it runs anywhere in a few seconds:

    python examples/torchvision_pipeline.py

The work happens under ``if __name__ == "__main__":``: DataLoader workers started with the "spawn" method (the
default on macOS and Windows) re-import this file, and must not run it again.
"""

import torch
from _domains import domain  # the examples' two toy domains (examples/_domains.py)
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

import flowaug


def main():
    source = TensorDataset(*domain(512, 0, seed=0))
    target_x, target_y = domain(40, 1, seed=1)  # a few labeled target images (10 per class)

    flow_to_target = flowaug.FlowTransform(
        (target_x, target_y), steps=5, step_size=0.5, class_map="same", seed=0,
    )
    print(flow_to_target)

    def gap(a: torch.Tensor) -> float:  # distance of a batch's mean image to the target's
        return (a.flatten(1).mean(0) - target_x.flatten(1).mean(0)).norm().item()

    # 1. After the DataLoader: the main process (this is where a GPU and KeOps belong).
    loader = DataLoader(source, batch_size=64, shuffle=True)
    pipeline = v2.Compose([v2.RandomHorizontalFlip(p=0.0), flow_to_target])  # composes like any v2 transform
    images, labels = next(iter(loader))
    moved, _ = pipeline(images, labels)
    print(f"after the DataLoader: distance of the batch mean to the target mean {gap(images):.3f} -> {gap(moved):.3f}")

    # 2. Inside a collate_fn: CPU workers flow their own batches, overlapped with training. flowaug.FlowCollate
    # collates with default_collate, then flows; it pickles, so workers get it under every start method.
    workers = DataLoader(source, batch_size=64, shuffle=True, num_workers=2,
                         collate_fn=flowaug.FlowCollate(flow_to_target))
    for i, (images, labels) in enumerate(workers):
        if i == 2:
            break
    print(f"in a collate_fn with 2 workers: batch {tuple(images.shape)}, gap to the target mean {gap(images):.3f}")


if __name__ == "__main__":
    main()
