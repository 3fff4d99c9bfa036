"""FlowDataset: flow a whole dataset once (cached on disk) and serve any flow time as a curriculum.

    python examples/dataset_curriculum.py
"""

import tempfile

import torch
from torch.utils.data import TensorDataset

import flowaug


def domain(n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.1 * torch.rand(n, 1, 12, 12, generator=g)
    for k in range(4):
        x[y == k, :, 2 + 2 * k + shift : 3 + 2 * k + 2 * shift, 2:10] += 0.8
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y  # uint8 images, like torchvision datasets


source = TensorDataset(*domain(2000, 0, seed=0))
target = domain(40, 1, seed=1)
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
