"""Turning datasets into tensors: npz folders, torchvision datasets, any map-style (input, label) Dataset.

Pixels follow torchvision's convention: uint8 images become float32 in [0, 1] (``ToDtype(scale=True)``),
PIL images are converted with ``pil_to_tensor``. npz folders follow ``../shared/data``:
``DIR/<name>/{train,test}.npz`` with ``x`` uint8 (N, H, W) and ``y`` int64 (N,).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ._checks import describe

__all__ = [
    "as_float_images",
    "dataset_to_tensors",
    "find_data_dir",
    "load_npz",
    "load_dataset",
    "resize_images",
    "to_tensor",
]

DATA_ENV = "FLOWAUG_DATA"


def to_tensor(item) -> torch.Tensor:
    """One sample (tensor, numpy array, PIL image, number) -> tensor, channel-first for images."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(item))
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with torchvision
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        from torchvision.transforms.v2 import functional as F

        return F.pil_to_tensor(item)
    if isinstance(item, (int, float, np.integer, np.floating)):
        return torch.as_tensor(item)
    raise TypeError(f"dataset inputs must be tensors, numpy arrays or PIL images, got {describe(item)}")


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 / 255; floats unchanged (no copy); other dtypes -> float32."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255)
    if x.is_floating_point():
        return x
    return x.to(torch.float32)


def _label_of(item, index: int, name: str) -> torch.Tensor:
    label = to_tensor(item) if not isinstance(item, (int, np.integer)) else torch.tensor(int(item))
    if label.ndim > 1:
        raise ValueError(f"{name}[{index}] label must be a class id or a soft-label vector, got shape {tuple(label.shape)}")
    return label


def dataset_to_tensors(dataset, *, batch_size: int = 1024, progress: bool = True, name: str = "dataset",
                       indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a map-style Dataset of ``(input, label)`` items into ``(x (N, ...), y (N,) or (N, K))``.

    Inputs keep their dtype (uint8 images stay uint8); use :func:`as_float_images` to scale them.
    Raises ``TypeError`` naming the first item that is not an (input, label) pair.
    """
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style Dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
    idx = list(range(len(dataset))) if indices is None else list(indices)
    if not idx:
        raise ValueError(f"{name} must not be empty")
    from tqdm.auto import tqdm

    xs, ys = [], []
    for i in tqdm(idx, desc=f"reading {name}", disable=not progress or len(idx) < batch_size, leave=False):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{name}[{i}] must be an (input, label) pair, got {describe(item)}")
        xs.append(to_tensor(item[0]))
        ys.append(_label_of(item[1], i, name))
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) != 1:
        raise ValueError(f"{name} inputs must all have the same shape, got {sorted(shapes)[:3]}")
    return torch.stack(xs), torch.stack(ys)


def find_data_dir(explicit: str | None = None) -> str | None:
    """The npz data folder: the argument, else ``$FLOWAUG_DATA``, else ``../shared/data`` if present."""
    for cand in (explicit, os.environ.get(DATA_ENV), os.path.join(os.getcwd(), "..", "shared", "data")):
        if cand and os.path.isdir(cand):
            return os.path.abspath(cand)
    if explicit:
        raise FileNotFoundError(f"data folder {explicit!r} does not exist")
    return None


def load_npz(root: str, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/name/split.npz`` -> (x uint8 (N, 1, H, W), y int64 (N,))."""
    path = os.path.join(root, name, f"{split}.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {split} split for dataset {name!r}: {path} does not exist")
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{path} must hold arrays 'x' and 'y', found {sorted(data.files)}")
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    if x.ndim == 3:
        x = x[:, None]
    return x, y


_TORCHVISION = {"mnist": "MNIST", "usps": "USPS", "fashionmnist": "FashionMNIST", "kmnist": "KMNIST"}


def load_dataset(name: str, split: str = "train", data_dir: str | None = None,
                 download_root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset as (uint8 (N, 1, H, W), int64 (N,)): from an npz folder when one is found (see
    :func:`find_data_dir`), else from torchvision (downloaded where the network allows)."""
    root = find_data_dir(data_dir)
    if root is not None and os.path.isdir(os.path.join(root, name)):
        return load_npz(root, name, split)
    if name == "sklearn_digits":
        from sklearn.datasets import load_digits  # optional dependency

        d = load_digits()
        x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
        return x, torch.from_numpy(d.target).long()
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _TORCHVISION:
        where = f" in {root}" if root else ""
        raise FileNotFoundError(f"dataset {name!r} not found{where}; give --data DIR holding {name}/{split}.npz")
    import torchvision

    cls = getattr(torchvision.datasets, _TORCHVISION[key])
    target = download_root or os.path.join(os.path.expanduser("~"), ".cache", "flowaug", "torchvision")
    try:
        ds = cls(target, train=(split == "train"), download=True)
    except Exception as err:  # noqa: BLE001 - report the download failure with the offline fix
        raise FileNotFoundError(
            f"could not load {name!r} from torchvision ({type(err).__name__}: {err}); offline, give --data DIR "
            f"(or ${DATA_ENV}) holding {name}/{split}.npz"
        ) from err
    x, y = dataset_to_tensors(ds, name=name)
    if x.ndim == 3:
        x = x[:, None]
    return x, y.long()


def resize_images(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of float images (N, C, H, W), as ``Resize(size)`` on tensors (antialiased)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    from torchvision.transforms.v2 import functional as F

    return F.resize(x, list(size), antialias=True)
