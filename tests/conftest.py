"""Shared fixtures: small synthetic datasets, so the suite runs without ../shared/data."""

from __future__ import annotations

import os
import warnings

# One thread per process, set before torch starts its pools: the suite's tensors are tiny, so extra threads
# only add synchronisation, and on a shared machine (another process holding a core) torch's default of one
# thread per core made every parallel region wait for the busy core (a 4-minute suite took 24). Spawned
# DataLoader/DDP workers inherit the environment variables.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

warnings.filterwarnings("ignore", message=".*CUDA libraries not found.*")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def blobs(n_per_class: int, centers, std: float = 0.3, seed: int = 0, dtype=torch.float32):
    """Gaussian blobs: (N, D) features and (N,) labels, class k around centers[k]."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.as_tensor(centers, dtype=dtype)
    xs = [c + std * torch.randn(n_per_class, centers.shape[1], generator=g, dtype=dtype) for c in centers]
    ys = [torch.full((n_per_class,), k, dtype=torch.long) for k in range(len(centers))]
    return torch.cat(xs), torch.cat(ys)


def tiny_images(n: int, classes: int = 3, seed: int = 0, size: int = 6):
    """(N, 1, size, size) float images in [0, 1] whose class sets a bright band; (N,) labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.2 * torch.rand(n, 1, size, size, generator=g)
    for k in range(classes):
        x[y == k, :, (k * size) // classes : ((k + 1) * size) // classes, :] += 0.7
    return x.clamp(0, 1), y


def ours_value_and_gradient(objective, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """An objective's value (with its reference constant) and Wasserstein gradient N grad F at ``x`` (N, d)
    toward the reference ``y`` (M, d), on the dense backend."""
    from flowaug.objectives import Context

    ctx = Context(z_ref=y, ref_half=(y**2).sum(1) / 2, backend="tensorized", feature_dim=x.shape[1],
                  feature_shape=(x.shape[1],))
    ev = objective.evaluate(x, ctx)
    return float(ev.value) + objective.constant(ctx), ev.grad


def autograd_value_and_gradient(loss, x: torch.Tensor, y: torch.Tensor, phi=lambda v: v):
    """``loss(phi(x), phi(y))`` and N times its autograd gradient with respect to ``x``: the reference for
    :func:`ours_value_and_gradient` (geomloss's ``SamplesLoss``, or any loss of two point clouds)."""
    xx = x.clone().requires_grad_(True)
    value = loss(phi(xx), phi(y))
    (grad,) = torch.autograd.grad(value, xx)
    return float(value.detach()), grad * x.shape[0]


def identity_calls(transform, x, y, calls: int) -> list[bool]:
    """For each of ``calls`` calls of a ``p < 1`` transform: did it return the batch untouched (the very object)?"""
    return [transform(x, y)[0] is x for _ in range(calls)]


class TensorPairs(torch.utils.data.Dataset):
    """A map-style dataset of (input, label) items, with an optional per-item transform."""

    def __init__(self, x, y, transform=None):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = self.x[i]
        return (self.transform(item) if self.transform else item), int(self.y[i])


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def shared_data_available() -> bool:
    return os.path.isfile(os.path.join(SHARED_DATA, "mnist", "train.npz"))
