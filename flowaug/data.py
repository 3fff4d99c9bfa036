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
    "ItemFormat",
    "as_float_images",
    "dataset_to_tensors",
    "find_data_dir",
    "input_kind",
    "label_kind",
    "load_npz",
    "load_dataset",
    "read_items",
    "resize_images",
    "restore_input",
    "restore_label",
    "rotate_images",
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
    if not isinstance(item, (torch.Tensor, np.ndarray, int, float, np.integer, np.floating)):
        raise TypeError(f"{name}[{index}] label must be a class id (an int) or a soft-label vector, got {describe(item)}")
    label = to_tensor(item) if not isinstance(item, (int, np.integer)) else torch.tensor(int(item))
    if label.ndim > 1:
        raise ValueError(f"{name}[{index}] label must be a class id or a soft-label vector, got shape {tuple(label.shape)}")
    return label


def _finite_input(x: torch.Tensor, index: int, name: str) -> torch.Tensor:
    """``x`` if it holds no NaN/Inf, else a ValueError naming the item (found here, not later in a batch)."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        raise ValueError(f"{name}[{index}] input must be finite, got {n_nan} NaN and "
                         f"{int((~torch.isfinite(x)).sum()) - n_nan} Inf values (shape {tuple(x.shape)})")
    return x


_DICT_INPUT_KEYS = ("image", "img", "input", "inputs", "x")
_DICT_LABEL_KEYS = ("label", "labels", "target", "targets", "y")


class ItemFormat:
    """Where the input and the label sit in a dataset's items, to take items apart and put flowed ones back.

    ``keys`` is ``None`` or ``(input_key, label_key)``: positions in tuple/list items (default ``(0, 1)``),
    keys of dict items (default: the first of ``"image", "img", "input", "inputs", "x"`` and of ``"label",
    "labels", "target", "targets", "y"`` present). Keys rather than getters: a key reads the entry and
    writes the flowed one back in place; every other entry is passed through untouched. With
    ``pairs_only`` anything but an ``(input, label)`` pair is refused (the readers of references).
    """

    def __init__(self, keys=None, *, name: str = "dataset", argument: str = "item_keys", pairs_only: bool = False):
        if keys is not None:
            if not isinstance(keys, (tuple, list)) or len(keys) != 2 or not all(
                    isinstance(k, (int, str)) and not isinstance(k, bool) for k in keys) or keys[0] == keys[1]:
                raise ValueError(f"{argument} must be None or two different keys (input_key, label_key), ints for "
                                 f"tuple items or strings for dict items, got {describe(keys)}")
            keys = tuple(keys)
        self.keys, self.name, self.argument, self.pairs_only = keys, name, argument, pairs_only

    def locate(self, item, index: int) -> tuple:
        """The (input key, label key) of ``item``; raises TypeError naming the item and the argument."""
        where = f"{self.name}[{index}]"
        if self.pairs_only or not isinstance(item, (tuple, list, dict)):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                extra = "" if self.pairs_only else f", an (input, label, extra...) tuple or a dict (see {self.argument})"
                raise TypeError(f"{where} must be an (input, label) pair{extra}, got {describe(item)}")
            return 0, 1
        if isinstance(item, dict):
            keys = self.keys or (next((k for k in _DICT_INPUT_KEYS if k in item), None),
                                 next((k for k in _DICT_LABEL_KEYS if k in item), None))
            if any(k is None or k not in item for k in keys):
                raise TypeError(f"{where} is a dict with keys {sorted(map(str, item))[:8]}: pass "
                                f"{self.argument}=(input_key, label_key) to say where the input and the label are")
            return keys
        keys = self.keys or (0, 1)
        if not all(isinstance(k, int) and -len(item) <= k < len(item) for k in keys):
            raise TypeError(f"{where} is a {type(item).__name__} of {len(item)} entries: {self.argument} must be two "
                            f"positions in it, got {describe(keys)}")
        return keys[0] % len(item), keys[1] % len(item)

    def split(self, item, index: int) -> tuple:
        """``(input, label, template)``; ``template`` is None for a plain pair, else the item with the input
        and label entries set to None (what :meth:`join` fills back)."""
        ki, kl = self.locate(item, index)
        if isinstance(item, dict):
            template = dict(item)
        elif len(item) == 2 and (ki, kl) == (0, 1) and type(item) in (tuple, list):
            return item[0], item[1], None
        else:
            template = list(item)
        template[ki], template[kl] = None, None
        return item[ki], item[kl], template if isinstance(item, dict) else _rebuild(item, template)

    def join(self, template, x, label, index: int = 0):
        """An item in the form of ``template`` (None: a tuple pair) holding ``x`` and ``label``."""
        if template is None:
            return x, label
        ki, kl = self.locate(template, index)
        out = dict(template) if isinstance(template, dict) else list(template)
        out[ki], out[kl] = x, label
        return out if isinstance(template, dict) else _rebuild(template, out)


def _rebuild(like, entries: list):
    """``entries`` as a sequence of the type of ``like`` (tuple, list or named tuple)."""
    return like._make(entries) if hasattr(like, "_make") else type(like)(entries)


def input_kind(value) -> tuple:
    """What :func:`restore_input` needs to give a tensor back the type of ``value``."""
    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype, type(value)
    if isinstance(value, np.ndarray):
        return "numpy", value.dtype
    if type(value).__module__.startswith("PIL."):
        return "pil", value.mode
    return "tensor", to_tensor(value).dtype, torch.Tensor


def restore_input(t: torch.Tensor, kind: tuple):
    """A (flowed) tensor as the type recorded by :func:`input_kind`: PIL image (same mode), numpy array,
    tensor or tv_tensor of the same dtype. Always a new object (never a view of ``t``)."""
    t = t.as_subclass(torch.Tensor)
    if kind[0] == "pil":
        from torchvision.transforms.v2 import functional as F

        return F.to_pil_image(t.clone(), mode=kind[1])
    if kind[0] == "numpy":
        return t.numpy().astype(kind[1], copy=True)
    out = t.to(kind[1], copy=True)
    return out if kind[2] is torch.Tensor else out.as_subclass(kind[2])


def label_kind(value) -> tuple:
    """What :func:`restore_label` needs to give a class id back the type of ``value``."""
    if isinstance(value, torch.Tensor):
        return "tensor", value.dtype, tuple(value.shape)
    if isinstance(value, np.ndarray):
        return "array", value.dtype, value.shape
    if isinstance(value, np.generic):
        return "scalar", type(value)
    return "int", int


def restore_label(value, kind: tuple):
    """A class id (int or 0-d tensor) as the type recorded by :func:`label_kind`; soft-label vectors (1-D
    tensors) are returned as they are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.numel() != 1:
        return value
    value = int(value)
    if kind[0] == "tensor":
        return torch.tensor(value, dtype=kind[1]).reshape(kind[2])
    if kind[0] == "array":
        return np.array(value, dtype=kind[1]).reshape(kind[2])
    return kind[1](value)


def read_items(dataset, item_format: ItemFormat, *, batch_size: int = 1024, progress: bool = True,
               indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """Read a map-style Dataset into ``(x (N, ...), y (N,) or (N, K), templates)``: ``templates`` is None
    when every item is a plain pair, else one :meth:`ItemFormat.split` template per item."""
    name = item_format.name
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name} must be a map-style Dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
    idx = list(range(len(dataset))) if indices is None else list(indices)
    if not idx:
        raise ValueError(f"{name} must not be empty")
    from tqdm.auto import tqdm

    xs, ys, templates = [], [], []
    for i in tqdm(idx, desc=f"reading {name}", disable=not progress or len(idx) < batch_size, leave=False):
        inp, label, template = item_format.split(dataset[i], i)
        xs.append(_finite_input(to_tensor(inp), i, name))
        ys.append(_label_of(label, i, name))
        templates.append(template)
    shapes = {tuple(t.shape) for t in xs}
    if len(shapes) != 1:
        raise ValueError(f"{name} inputs must all have the same shape, got {sorted(shapes)[:3]}")
    return torch.stack(xs), torch.stack(ys), None if all(t is None for t in templates) else templates


def dataset_to_tensors(dataset, *, batch_size: int = 1024, progress: bool = True, name: str = "dataset",
                       indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a map-style Dataset of ``(input, label)`` items into ``(x (N, ...), y (N,) or (N, K))``.

    Inputs keep their dtype (uint8 images stay uint8); use :func:`as_float_images` to scale them.
    Raises ``TypeError`` naming the first item that is not an (input, label) pair.
    """
    x, y, _ = read_items(dataset, ItemFormat(name=name, pairs_only=True), batch_size=batch_size,
                         progress=progress, indices=indices)
    return x, y


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


def rotate_images(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float images rotated by per-image angles ``degrees`` (N,) (bilinear, zero fill): the rotating
    digits of gradual domain adaptation (Kumar et al. 2020)."""
    out = []
    for i in range(0, len(x), 4096):
        a = torch.deg2rad(degrees[i:i + 4096]).to(x.dtype)
        c, s, z = a.cos(), a.sin(), torch.zeros_like(a)
        theta = torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)  # (n, 2, 3)
        grid = torch.nn.functional.affine_grid(theta, list(x[i:i + 4096].shape), align_corners=False)
        out.append(torch.nn.functional.grid_sample(x[i:i + 4096], grid, align_corners=False))
    return torch.cat(out)
