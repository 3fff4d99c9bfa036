"""The k-shot recipe that the budget-matched benchmark selected for k = 1 (benchmarks/budget.py): train on the k
target images + the raw source + the source flowed class-wise toward the target, with standard augmentation.

Compare it with the baseline that was hardest to beat there: target + raw source + augmentation with half of
every batch drawn from the target (a WeightedRandomSampler). At k = 1 the recipe and it were within the noise of each
other on MNIST -> USPS and USPS -> MNIST; at k >= 5 it was not ahead (benchmarks/README.md has the numbers).

Each dataset is an ordinary map-style Dataset; ConcatDataset mixes them as a practitioner would, and the flowed
source is computed once by FlowDataset (precompute mode, cacheable on disk). Toy domains here (seconds); the
benchmark runs the same recipe on MNIST -> USPS and USPS -> MNIST. Built here for k = 1 (``K = 1``: one labelled
target image per class), the k it was selected for; at larger ``K`` expect it not to be ahead (above).

    python examples/kshot_recipe.py
"""

import torch
import torch.nn.functional as F
from _domains import domain  # the examples' two toy domains (examples/_domains.py)
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset, WeightedRandomSampler
from torchvision.transforms import v2

import flowaug


class WithTransform(Dataset):
    """Apply a per-item transform to the input of (input, label) items."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return self.transform(x), y


K = 1  # labelled target images per class (the k the recipe was selected for)

torch.manual_seed(0)
# background noise of amplitude 0.4: with the default 0.1 one target image per class was enough and the toy
# saturated (25 / 100 / 100 %), showing nothing; here (one seed) it prints 25.0 / 72.0 / 72.0 %: the raw source
# alone misses the shifted target, and the recipe ties the half-target sampler, as the benchmark found at k = 1
NOISE = 0.4
source = TensorDataset(*domain(1000, 0, seed=0, noise=NOISE))  # large labelled source
shots = domain(4 * K, 1, seed=1, noise=NOISE)  # K labelled target images for each of the 4 classes
test = domain(400, 1, seed=2, noise=NOISE)  # the target domain, for scoring only

flowed = flowaug.FlowDataset(source, shots, steps=10, step_size=0.2, class_map="same", labels="flow", seed=0)
augment = v2.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10)  # drawn per item
train = ConcatDataset([WithTransform(d, augment) for d in (TensorDataset(*shots), source, flowed)])


def fit(dataset, steps=300, sampler=None):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    loader, done = DataLoader(dataset, batch_size=64, shuffle=sampler is None, sampler=sampler), 0
    while done < steps:  # the same number of optimizer steps for every variant
        for x, y in loader:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    with torch.no_grad():
        return float((net(test[0]).argmax(1) == test[1]).float().mean()) * 100


baseline = ConcatDataset([WithTransform(d, augment) for d in (TensorDataset(*shots), source)])
# half of the draws from the target in expectation (the benchmark draws exactly 32 + 32 per batch of 64)
half = torch.cat([torch.full((len(shots[0]),), 0.5 / len(shots[0])), torch.full((len(source),), 0.5 / len(source))])
print(f"target + raw source + aug:                    {fit(baseline):.1f}% on the target domain")
print(f"  the same, half of each batch from the target: "
      f"{fit(baseline, sampler=WeightedRandomSampler(half, 64 * 300)):.1f}%")
print(f"target + raw + flowed source + aug:           {fit(train):.1f}% on the target domain")
