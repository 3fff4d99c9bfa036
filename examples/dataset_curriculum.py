"""FlowDataset: flow a whole dataset once (cached on disk) and serve any flow time as a curriculum.

    python examples/dataset_curriculum.py
"""

import tempfile

import torch
from _domains import domain  # the examples' two toy domains (examples/_domains.py)
from torch.utils.data import TensorDataset

import flowaug


def as_uint8(x, y):
    return (x * 255).round().to(torch.uint8), y  # uint8 images, like torchvision datasets


source = TensorDataset(*as_uint8(*domain(2000, 0, seed=0)))
target = as_uint8(*domain(40, 1, seed=1))
cache = tempfile.mkdtemp(prefix="flowaug-example-")

data = flowaug.FlowDataset(source, target, steps=12, step_size=0.5, class_map="same", snapshots=4, cache_dir=cache)
print(data, "| cache:", data.cache_status)

target_mean = target[0].float().flatten(1).mean(0) / 255
for strength in (0.0, 0.25, 0.5, 1.0):
    data.strength = strength
    x = torch.stack([data[i][0] for i in range(len(data))]).float() / 255
    print(f"strength {strength:.2f}: distance of the data mean to the target mean "
          f"{(x.flatten(1).mean(0) - target_mean).norm():.3f}")

again = flowaug.FlowDataset(source, target, steps=12, step_size=0.5, class_map="same", snapshots=4, cache_dir=cache)
print("second construction with the same inputs:", again.cache_status)
