"""Dataset synthesis (condensation) as a class-wise flow in a random embedding.

A few synthetic particles per class flow toward that class's real images, with a ground cost measured in
the features of a freshly drawn random ConvNet at every step (:class:`~flowaug.Embedded` with a factory),
optionally after a differentiable Siamese augmentation applied with the same parameters to the real and
the synthetic images (:class:`~flowaug.dsa.SiameseAugment`).

**Units.** The flow runs on the standardized images ``u = (x - mean_c) / std_c`` (per channel, over the
data: the normalisation of the DC/DSA/DM code), and its result is mapped back to the data's units. So
``step_size`` means the same for uint8 or [0, 1] images, 0..255 floats, ``Normalize``'d or [-1, 1] data:
condensing ``a * x + b`` gives ``a * condense(x) + b`` (up to rounding). The default random ConvNets see the
standardized images; an ``embedding`` of yours sees the images in your data's units.

**Distribution matching.** With ``objective="linear"`` (mean matching) and ``step_size = 2 lr /
images_per_class`` the flow is distribution matching's update rule (Zhao & Bilen, WACV 2023: SGD on the
images of the summed squared distances between class mean embeddings, heavy ball ``momentum``) at learning
rate ``lr`` on the standardized images, i.e. ``lr * std_c**2`` in the data's own units. Run with the
defaults here it is DM's rule at a reduced budget (fewer iterations, a narrower ConvNet, no flip in the
augmentation, the ConvNet's padding 1), not DM's published runs. ``"sinkhorn"`` and ``"mmd"`` match the whole
class distribution in the same embeddings instead of its mean.

**Randomness and checkpoints.** One random stream (seeded by ``seed``) runs through all iterations and heavy
ball's velocity carries over every iteration; a checkpoint (written atomically every ``checkpoint_every``
iterations) holds the images, the velocity and the stream's state. So the result does not depend on how often
it is saved, and a run resumed from its checkpoint (or extended to more iterations) ends bit-identical to
the uninterrupted run.

Example:
    >>> import torch
    >>> from flowaug import condense
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.rand(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    >>> syn = condense((x, y), 2, iterations=4, real_per_class=8, width=8, seed=0, progress=False)
    >>> len(syn), syn.images.shape, syn.labels.tolist()
    (6, torch.Size([6, 1, 8, 8]), [0, 0, 1, 1, 2, 2])
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
import warnings

import numpy as np
import torch

from ._checks import (WarnOnce, check_bool, check_choice, check_finite_tensor, check_int, check_labels, check_real, describe,
                      warn_user)
from ._io import atomic_path
from ._shared import mix_seed
from .config import fingerprint
from .dsa import SiameseAugment
from .flow import flow
from .networks import ConvNet
from .objectives import MMD, Embedded, Objective, Sinkhorn
from .reference import Reference

__all__ = ["INITS", "OBJECTIVES", "Condensed", "RandomEmbedding", "condense", "evaluate_synthetic"]

INITS = ("real", "noise")
#: the objective in the embedding: the whole class distribution (Sinkhorn divergence, Gaussian MMD) or its
#: mean ("linear": distribution matching's loss)
OBJECTIVES = {"sinkhorn": Sinkhorn, "mmd": lambda: MMD("gaussian"), "linear": lambda: MMD("linear"),
              "mean+mmd": lambda: MMD("linear") + MMD("gaussian")}
#: the defaults: the recipe ``benchmarks/condense.py`` chose at 10 images per class on MNIST's validation split
#: (mean matching plus a Gaussian MMD, twice distribution matching's per-image step 2 lr / IPC at lr 1)
DEFAULT_OBJECTIVE, DEFAULT_STEP = "mean+mmd", 4.0
DSA_DIGITS = "color_crop_cutout_scale_rotate"  # DSA's strategy without flips (digits are not symmetric)
_FORMAT = "flowaug.condense checkpoint 2"  # what a checkpoint of this version holds (see _save)
#: x_uint8 in Condensed.save clips values outside the data's range; above this fraction it says so
CLIP_WARN = 0.01


class _Phi:
    """One random embedding: a ConvNet's features after one Siamese augmentation draw."""

    def __init__(self, net: ConvNet, augment: SiameseAugment | None, params: dict | None):
        self.net, self.augment, self.params = net, augment, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment.apply(x, self.params)
        return self.net.embed(x)


class RandomEmbedding:
    """A factory of random embeddings (picklable): a fresh ConvNet-3 (torch's default initialisation, from
    torch's global RNG, which :class:`~flowaug.Embedded` seeds; built on the CPU, then moved to ``device``, so
    a seed gives the same network on any device) and, with ``augment``, one Siamese DSA draw.

    Args:
        channels, num_classes, image_size, width, depth: the ConvNet (:class:`~flowaug.networks.ConvNet`).
        augment: a DSA strategy (e.g. ``"color_crop_cutout_scale_rotate"``) or None.
        device: where the networks live.
    """

    def __init__(self, channels: int, num_classes: int, image_size, *, width: int = 128, depth: int = 3,
                 augment: str | None = DSA_DIGITS, device=None):
        self.channels, self.num_classes, self.image_size = channels, num_classes, tuple(image_size)
        self.width, self.depth = width, depth
        self.augment = None if augment is None else SiameseAugment(augment)
        self.device = None if device is None else torch.device(device)

    def __call__(self) -> _Phi:
        net = ConvNet(self.channels, self.num_classes, self.image_size, self.width, self.depth).requires_grad_(False)
        params = None if self.augment is None else self.augment.draw()
        return _Phi(net if self.device is None else net.to(self.device), self.augment, params)

    def __repr__(self) -> str:
        strategy = None if self.augment is None else self.augment.strategy
        return f"RandomEmbedding(ConvNet-{self.depth}, width={self.width}, augment={strategy!r})"


class _InDataUnits(torch.nn.Module):
    """A user's embedding fed the flow's standardized images ``u`` (N, C, H, W) in the data's units:
    ``phi(mean + std * u)`` with per-channel ``mean``, ``std`` (1, C, 1, 1)."""

    def __init__(self, phi, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.phi = phi  # a Module is registered (its parameters set the computation dtype); a function is kept
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.phi(u * self.std + self.mean)


class _UserFactory:
    """A user's factory of embeddings (picklable): each product in eval mode, on ``device``, without
    gradients on its parameters, fed the images in the data's units."""

    def __init__(self, factory, mean: torch.Tensor, std: torch.Tensor, device: torch.device):
        self.factory, self.mean, self.std, self.device = factory, mean, std, device

    def __call__(self) -> _InDataUnits:
        phi = self.factory()
        if isinstance(phi, torch.nn.Module):
            phi = phi.to(self.device).eval().requires_grad_(False)
        elif not callable(phi):
            raise TypeError(f"embedding (a factory) must return an embedding (an nn.Module or a function), got "
                            f"{describe(phi)}")
        return _InDataUnits(phi, self.mean, self.std)


class Condensed(torch.utils.data.Dataset):
    """A synthetic dataset: ``images`` (N, C, H, W) float in the data's units, ``labels`` (N,) int64, ``classes``
    (names or None) and ``info`` (how it was made). Items are ``(image, label)`` like a torchvision dataset;
    :meth:`save` and :meth:`load` round-trip all four."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=None, info: dict | None = None):
        self.images, self.labels, self.classes, self.info = images, labels, classes, dict(info or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def value_range(self) -> tuple[float, float]:
        """The real data's range (``info["data_range"]``, set by :func:`condense`), else [0, 1]: what
        :meth:`save`'s bytes and :meth:`grid`'s grey levels span."""
        lo, hi = self.info.get("data_range", (0.0, 1.0))
        return float(lo), float(hi)

    def _display(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` mapped from :meth:`value_range` to [0, 1], clipped."""
        lo, hi = self.value_range()
        return ((images.detach().cpu().float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1)

    def save(self, path) -> str:
        """Write an npz file atomically: ``x`` (float32 N x C x H x W, the exact images), ``y`` (int64),
        ``classes`` and ``info`` (JSON; values JSON cannot hold are written as their ``str``) and ``x_uint8``, a
        display copy: the images mapped from the data's range (:meth:`value_range`) to 0..255. Values outside
        that range (the flow is not bounded) are clipped in ``x_uint8`` only; when more than 1 % are, a
        warning says how many."""
        path = os.fspath(path)
        x = self.images.detach().cpu().float()
        shown = self._display(x)
        lo, hi = self.value_range()
        clipped = float(((x < lo) | (x > hi)).float().mean()) if x.numel() else 0.0
        if clipped > CLIP_WARN:
            warn_user(f"Condensed.save: {clipped:.1%} of the pixels lie outside the data's range [{lo:.4g}, "
                      f"{hi:.4g}] and are clipped in x_uint8 (the display copy); x holds the exact values")
        with atomic_path(path, ".npz") as tmp:
            np.savez_compressed(tmp, x=x.numpy(), y=self.labels.cpu().numpy(),
                                x_uint8=(shown * 255).round().to(torch.uint8).numpy(),
                                classes=np.array(json.dumps(self.classes, default=str)),
                                info=np.array(json.dumps(self.info, default=str)))
        return path

    @classmethod
    def load(cls, path) -> Condensed:
        """The :class:`Condensed` that :meth:`save` wrote to ``path`` (images, labels, classes and info)."""
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{path!r} is not a file written by Condensed.save (an npz file): "
                             f"{type(err).__name__}: {err}") from None
        if not {"x", "y"} <= set(arrays):
            raise ValueError(f"{path!r} is not a file written by Condensed.save: it holds {sorted(arrays)}, "
                             "not x and y")
        classes = json.loads(str(arrays["classes"])) if "classes" in arrays else None
        info = json.loads(str(arrays["info"])) if "info" in arrays else {}
        return cls(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).long(), classes, info)

    def grid(self, path, *, real: torch.Tensor | None = None, title: str | None = None) -> str:
        """A PNG: one column per class, titled with its name (``classes``) or id, one row per synthetic image
        (at most 10), and a row of ``real`` images (in the data's units; the first of each class is not
        searched: the first K are drawn), grey levels spanning the data's range."""
        from .plotting import image_grid

        k = int(self.labels.max()) + 1
        per = min(int((self.labels == c).sum()) for c in range(k))
        by_class = [self.images[self.labels == c][:per] for c in range(k)]  # K x (per, C, H, W)
        batches = [self._display(torch.stack([b[i] for b in by_class])) for i in range(min(per, 10))]
        labels = [f"synthetic {i + 1}" for i in range(len(batches))]
        if real is not None:
            from .data import as_float_images

            batches.append(self._display(as_float_images(real[:k])))  # uint8 / 255, as the data were
            labels.append("real")
        names = [str(self.classes[c]) if self.classes is not None and c < len(self.classes) else str(c)
                 for c in range(k)]
        return image_grid(batches, os.fspath(path), row_labels=labels, column_labels=names, columns=k, title=title)

    def __repr__(self) -> str:
        return f"Condensed(images={tuple(self.images.shape)}, classes={int(self.labels.max()) + 1})"


# ---------------------------------------------------------------------- inputs
def _array(value, what: str) -> torch.Tensor:
    """A tensor from a tensor or a numeric numpy array; else a TypeError naming ``what``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{what} must hold numbers (integer class ids for labels), got a numpy array of dtype "
                            f"{value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    hint = " (torch.tensor(labels) makes one)" if isinstance(value, (list, tuple)) else ""
    raise TypeError(f"{what} must be a torch.Tensor or a numpy array{hint}, got {describe(value)}")


def _read(data, name: str):
    """(images, labels, class names or None) as given: a Condensed, an npz folder or file, a pair or a Dataset."""
    from .data import dataset_to_tensors, load_npz

    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if isinstance(data, Condensed):
        return data.images, data.labels, data.classes
    if isinstance(data, str):
        path = os.path.abspath(data)
        if os.path.isfile(path) and path.endswith(".npz"):  # root/name/split.npz
            x, y = load_npz(os.path.dirname(os.path.dirname(path)), os.path.basename(os.path.dirname(path)),
                            os.path.basename(path)[:-4])
        elif os.path.isfile(os.path.join(path, "train.npz")):
            x, y = load_npz(os.path.dirname(path), os.path.basename(path), "train")
        else:
            raise FileNotFoundError(f"{name}: {data!r} is neither an npz file nor a folder holding train.npz "
                                    "(x uint8 N x H x W, y int64)")
        return x, y, None
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], (torch.Tensor, np.ndarray)):
        if len(data) != 2:
            raise TypeError(f"{name} given as a {type(data).__name__} of arrays must be (images, labels), got "
                            f"{len(data)} entries")
        return _array(data[0], f"{name} images"), _array(data[1], f"{name} labels"), None
    if isinstance(data, dict):
        raise TypeError(f"{name} must be a Dataset, an (images, labels) pair, a Condensed or an npz folder, got a "
                        f"dict with keys {sorted(map(str, data))[:6]}")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be labelled: an (images, labels) pair, a Dataset of (image, label) items "
                        f"or an npz folder, got images alone: {describe(data)}")
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        x, y = dataset_to_tensors(data, name=name, progress=False)
        return x, y, getattr(data, "classes", None)
    raise TypeError(f"{name} must be a Dataset, an (images, labels) pair, a Condensed or an npz folder, got "
                    f"{describe(data)}")


def _as_tensors(data, name: str = "data"):
    """(images float (N, C, H, W), labels int64 (N,), class names or None), checked; uint8 images / 255."""
    from .data import as_float_images

    x, y, names = _read(data, name)
    x = as_float_images(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"{name} images must be a non-empty batch (N, C, H, W) or (N, H, W), got shape "
                         f"{tuple(x.shape)}")
    check_labels(f"{name} labels", y, x.shape[0], allow_soft=False)
    check_finite_tensor(f"{name} images", x)
    return x.float(), y.long(), names


def _standardization(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, C, 1, 1) of the images ``x`` (N, C, H, W); a constant channel keeps std 1."""
    std, mean = torch.std_mean(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)  # (C,), (C,)
    if not bool((std > 0).any()):
        raise ValueError(f"data images are constant (every value {float(x.flatten()[0]):.4g}): there is nothing to "
                         "condense")
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _embedding_kind(embedding) -> str:
    """``"module"`` (an nn.Module), ``"function"`` (a callable taking one argument: the images) or
    ``"factory"`` (a callable taking none); a callable that could be either is refused."""
    if isinstance(embedding, torch.nn.Module):
        return "module"
    if not callable(embedding):
        raise TypeError(f"embedding must be None, an nn.Module, a function of the images or a factory of "
                        f"embeddings (no arguments), got {describe(embedding)}")
    try:
        sig = inspect.signature(embedding)
    except (TypeError, ValueError):
        sig = None

    def binds(*args) -> bool:
        try:
            return sig is not None and bool(sig.bind(*args) or True)
        except TypeError:
            return False

    no_args, one_arg = binds(), binds(object())
    if no_args != one_arg:
        return "factory" if no_args else "function"
    what = "can be called both with no arguments and with one" if no_args else f"has signature {sig}"
    raise ValueError(f"embedding {describe(embedding)} {what}: condense tells a fixed embedding (a function of "
                     "the images, lambda x: ...) from a factory (called with no arguments, lambda: ..., at every "
                     "step) by its arguments; wrap it as one of the two, or pass an nn.Module")


def _embedding(embedding, x, y, mean, std, *, width: int, augment, device):
    """(fixed embedding or None, factory or None, a stable description of it for the checkpoint)."""
    if embedding is None:
        if augment is not None:
            try:
                SiameseAugment(augment)
            except (TypeError, ValueError) as err:
                raise type(err)(f"augment: {err}") from None
        factory = RandomEmbedding(x.shape[1], int(y.max()) + 1, x.shape[2:], width=width, augment=augment,
                                  device=device)
        return None, factory, repr(factory)
    kind = _embedding_kind(embedding)
    try:
        described = f"{kind} {fingerprint(embedding)}"
    except ValueError:
        described = f"{kind} {type(embedding).__module__}.{getattr(embedding, '__qualname__', type(embedding).__name__)}"
    if kind == "factory":
        return None, _UserFactory(embedding, mean, std, device), described
    if kind == "module":  # a copy: the caller's network keeps its mode, statistics and gradients
        try:
            embedding = copy.deepcopy(embedding)
        except Exception as err:  # noqa: BLE001 - any failure to copy is reported as one
            raise TypeError(f"embedding (an nn.Module) could not be copied ({type(err).__name__}: {err}); condense "
                            "copies it so that your network is left as it is") from None
        embedding = embedding.to(device).eval().requires_grad_(False)
    return _InDataUnits(embedding, mean, std), None, described


def _usable_device(device) -> torch.device:
    """``device`` as a torch.device where a tensor can be made; else a ValueError naming the argument."""
    try:
        device = torch.device(device)
        torch.zeros(1, device=device)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"device must be a device usable here (e.g. 'cpu', 'cuda'), got {describe(device)}: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return device


def _probe(phi, factory, u: torch.Tensor) -> None:
    """Run the user's embedding once on two standardized images ``u`` (2, C, H, W) (the global random stream
    left as it was): an error or an output without one row per image is reported naming ``embedding``."""
    try:
        with torch.random.fork_rng(devices=[u.device] if u.device.type == "cuda" else []), torch.no_grad():
            out = (phi if phi is not None else factory())(u)
    except Exception as err:  # noqa: BLE001 - whatever the user's code raises, said as the embedding's failure
        raise ValueError(f"embedding failed on a batch of {u.shape[0]} images of shape {tuple(u.shape[1:])} "
                         f"({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != u.shape[0]:
        raise ValueError(f"embedding must map a batch of {u.shape[0]} images (N, C, H, W) to a tensor with one row "
                         f"per image, got {describe(out)}")


def _initial(x, y, ipc: int, init: str, seed: int):
    """(images (K * ipc, C, H, W), labels): real images drawn per class (seeded), or Gaussian noise with the
    data's mean and std."""
    g = torch.Generator().manual_seed(mix_seed(seed, "condense init") % 2**63)
    classes = torch.unique(y).tolist()
    if classes != list(range(len(classes))):
        raise ValueError(f"data labels must be the class ids 0..K-1 with every class present, got classes "
                         f"{classes[:12]}")
    xs, ys = [], []
    for c in classes:
        idx = torch.nonzero(y == c).flatten().cpu()
        if idx.numel() < ipc and init == "real":
            raise ValueError(f"class {c} has {idx.numel()} images, fewer than images_per_class={ipc}")
        if init == "real":
            xs.append(x[idx[torch.randperm(idx.numel(), generator=g)[:ipc]].to(x.device)].clone())
        else:
            noise = torch.randn(ipc, *x.shape[1:], generator=g).to(x.device)
            xs.append(float(x.mean()) + float(x.std()) * noise)
        ys.append(torch.full((ipc,), c, dtype=torch.long, device=x.device))
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------- the run
def condense(data, images_per_class: int, *, objective: str | Objective = DEFAULT_OBJECTIVE, embedding=None,
             iterations: int = 1000, real_per_class: int = 256, step_size: float | None = None, momentum: float = 0.5,
             init: str = "real", augment: str | None = DSA_DIGITS, width: int = 128, seed: int = 0,
             checkpoint=None, checkpoint_every: int = 50, device=None, progress: bool = True) -> Condensed:
    """Synthesize ``images_per_class`` images per class by a class-wise flow toward the real classes.

    Args:
        data: a labelled map-style Dataset, an ``(images, labels)`` pair of tensors or numpy arrays (uint8
            images are divided by 255; labels are integer class ids 0..K-1), a :class:`Condensed`, or an npz
            folder holding ``train.npz`` (``x`` uint8 N x H x W, ``y``) or such a file (a str or a Path).
        images_per_class: synthetic images per class.
        objective: ``"mean+mmd"`` (default: mean matching plus a Gaussian MMD), ``"sinkhorn"``, ``"mmd"``
            (Gaussian), ``"linear"`` (mean matching: distribution matching) or an :class:`~flowaug.Objective`,
            measured in the embedding.
        embedding: default :class:`RandomEmbedding` (a fresh random ConvNet-3 of ``width`` per step, after a DSA
            ``augment`` draw, seeing the standardized images). Yours sees the images in your data's units and
            is told apart by what it is: an ``nn.Module`` is a fixed embedding (its ``forward``, flattened per
            image, e.g. a trained network's ``features``; condense uses a copy, in eval mode, on ``device``,
            without gradients: your network is left unchanged); a function of one argument is a fixed embedding
            (called as it is); a callable of no arguments is a factory, called at every step (a module it
            returns is put in eval mode on ``device``). A callable that could be either is refused.
        iterations: flow steps; real_per_class: real images embedded per class and step.
        step_size, momentum: the flow's explicit Euler step on the standardized images (default ``4 /
            images_per_class``: twice distribution matching's per-image step at lr 1, the setting chosen on
            validation at 10 images per class) and heavy-ball coefficient in [0, 1).
        init: ``"real"`` (random real images, seeded) or ``"noise"``.
        augment: DSA strategy of the default embedding (None: no augmentation).
        seed: seeds the initial images, the networks, the augmentations and the real samples.
        checkpoint: a path (str or Path): resume from it when it exists (same data and settings; more
            iterations extend a run), write it every ``checkpoint_every`` iterations and at the end,
            atomically. How often it is written does not change the result.
        device: where the flow, its networks and tensors run (default: the data's device); the result is there.
        progress: a progress bar over iterations.

    Returns:
        a :class:`Condensed` dataset in the data's units (``info`` records the settings, the data's
        per-channel mean, std and range, and the seconds per iteration).
    """
    ipc = check_int("images_per_class", images_per_class, minimum=1)
    iterations = check_int("iterations", iterations)
    real_per_class = check_int("real_per_class", real_per_class, minimum=2)
    step_size = DEFAULT_STEP / ipc if step_size is None else check_real("step_size", step_size, low=0, low_open=True)
    momentum = check_real("momentum", momentum, low=0, high=1, high_open=True)
    init = check_choice("init", init, INITS)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    seed = check_int("seed", seed)
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be None or a file path (str or Path), got {describe(checkpoint)}")
    checkpoint = None if checkpoint is None else os.fspath(checkpoint)
    check_bool("progress", progress)
    inner = OBJECTIVES[check_choice("objective", objective, tuple(OBJECTIVES))]() if isinstance(objective, str) \
        else objective
    x, y, names = _as_tensors(data)
    device = x.device if device is None else _usable_device(device)
    x, y = x.to(device), y.to(device)
    mean, std = _standardization(x)
    phi, factory, described = _embedding(embedding, x, y, mean, std, width=width, augment=augment, device=device)
    if embedding is not None:
        _probe(phi, factory, (x[:2] - mean) / std)
    obj = Embedded(inner, phi, factory=factory, reference_size=real_per_class)
    start, labels = _initial(x, y, ipc, init, seed)
    settings = {"images_per_class": ipc, "objective": repr(inner), "embedding": described,
                "real_per_class": real_per_class, "step_size": step_size, "momentum": momentum, "init": init,
                "seed": seed}
    data_id = _data_id(x, y)
    state = _resume(checkpoint, settings, data_id, iterations) or {
        "images": (start - mean) / std, "velocity": None, "iterations": 0, "seconds": 0.0,
        "generator": torch.Generator().manual_seed(mix_seed(seed, "condense") % 2**63).get_state()}
    state = _run(state, labels, Reference((x - mean) / std, y), obj, iterations=iterations, step_size=step_size,
                 momentum=momentum, save=None if checkpoint is None else (checkpoint, checkpoint_every,
                                                                            settings, data_id), progress=progress)
    info = {"iterations": iterations, **settings, "embedding": repr(embedding) if embedding is not None else described,
            "checkpoint_every": checkpoint_every, "device": str(device),
            "data_mean": mean.flatten().tolist(), "data_std": std.flatten().tolist(),
            "data_range": [float(x.min()), float(x.max())],
            "seconds_per_iteration": state["seconds"] / max(iterations, 1)}
    return Condensed(state["images"].to(device) * std + mean, labels, names, info)


def _run(state: dict, labels, ref: Reference, obj, *, iterations: int, step_size: float, momentum: float, save,
         progress: bool) -> dict:
    """Iterations ``state["iterations"]`` .. ``iterations`` of the flow on the standardized images; each is one
    flow step (no momentum inside) followed by heavy ball across steps, so that neither the checkpoints nor
    the segmentation change anything. ``save``: None or (path, every, settings, data id)."""
    from tqdm.auto import tqdm

    syn, velocity = state["images"].to(ref.device), state["velocity"]  # (N, C, H, W) each
    velocity = None if velocity is None else velocity.to(ref.device)
    gen = torch.Generator()
    gen.set_state(state["generator"])
    done, seconds = state["iterations"], state["seconds"]
    # synthetic particles are free parameters (noise at the start, unbounded after): their value range says
    # nothing about units, so the engine's units diagnosis is dropped; the rest is said once per run
    warn_once = WarnOnce(drop={"units"})
    bar = tqdm(total=iterations, initial=done, desc="condensing", disable=not progress, leave=False)
    while done < iterations:
        t0 = time.perf_counter()
        with warn_once():
            out = flow(syn, labels, ref, objective=obj, class_map="same", steps=1, step_size=step_size,
                       momentum=0.0, track_objective=False, generator=gen).x
        if momentum > 0:  # z <- z - tau (m u_prev + g): the velocity is kept in units of tau
            velocity = syn - out if velocity is None else momentum * velocity + (syn - out)
            out = syn - velocity
        syn, done = out, done + 1
        seconds += time.perf_counter() - t0
        bar.update(1)
        if save is not None and (done % save[1] == 0 or done == iterations):
            _save(save, syn, velocity, gen, done, seconds)
    bar.close()
    return {"images": syn, "velocity": velocity, "iterations": done, "seconds": seconds}


def _data_id(x: torch.Tensor, y: torch.Tensor) -> str:
    """What a checkpoint knows of the data: shape, labels, the pixel sum and a position-weighted sum (images
    reordered or edited change it) in float64."""
    per_image = x.flatten(1).sum(1, dtype=torch.float64)  # (N,)
    weights = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    return fingerprint([tuple(x.shape), float(per_image.sum()), float((per_image * weights).sum()), y.cpu()])


def _save(save, syn, velocity, gen: torch.Generator, done: int, seconds: float) -> None:
    path, _, settings, data_id = save
    with atomic_path(path, ".pt") as tmp:
        torch.save({"format": _FORMAT, "settings": settings, "data": data_id, "iterations": done,
                    "images": syn.cpu(), "velocity": None if velocity is None else velocity.cpu(),
                    "generator": gen.get_state(), "seconds": seconds}, tmp)


def _resume(path: str | None, settings: dict, data_id: str, iterations: int) -> dict | None:
    """The state in the checkpoint at ``path`` when it belongs to this run; an error saying what differs if not."""
    if path is None or not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise ValueError(f"checkpoint must be a file path, got the folder {path!r}")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling, zip and truncation errors all mean "not ours"
        raise ValueError(f"checkpoint {path!r} is not a flowaug condense checkpoint (it cannot be read: "
                         f"{type(err).__name__}); delete it or pass another path") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a flowaug condense checkpoint of this version; delete it or "
                         "pass another path")
    theirs = state["settings"]
    differ = [f"{k}: {theirs.get(k)!r} there, {settings.get(k)!r} here" for k in sorted(set(settings) | set(theirs))
              if theirs.get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"checkpoint {path!r} was written by a condensation with other settings ("
                         f"{'; '.join(differ)}); delete it or pass another checkpoint path")
    if state["data"] != data_id:
        raise ValueError(f"checkpoint {path!r} was written by a condensation of other data (same settings); delete "
                         "it or pass another checkpoint path")
    if state["iterations"] > iterations:
        raise ValueError(f"checkpoint {path!r} is at iteration {state['iterations']}, past iterations={iterations}; "
                         "pass at least that many iterations or another checkpoint path")
    return state


# ---------------------------------------------------------------------- evaluation
def evaluate_synthetic(train, score, *, width: int = 128, epochs: int = 300, seed: int = 0,
                       augment: str | None = DSA_DIGITS, batch_size: int = 256) -> float:
    """How well a (synthetic) training set trains: accuracy (%) on ``score`` of a fresh ConvNet-3 trained on it.

    The evaluation of the condensation literature (DC/DSA/DM): SGD with lr 0.01, momentum 0.9, weight decay
    5e-4, ``batch_size`` 256, the learning rate divided by 10 at half the ``epochs``, and DSA ``augment`` (a
    fresh draw per image of every batch). ``seed`` fixes the network's initialisation, the batch order and the
    augmentation draws, so two sets scored with one seed are paired. Torch's global random stream is left as
    it was. Runs on ``train``'s device.

    Args:
        train: what to train on: the :class:`Condensed` that :func:`condense` returns, an ``(images (N, C, H,
            W), labels (N,))`` pair or a Dataset, as :func:`condense` reads ``data``.
        score: what to score on (a validation or test split), in the same units as ``train``. uint8 images (in
            either) are divided by 255, flowaug's rule everywhere; a warning says when the two sets' value ranges
            look like different units.
    """
    width = check_int("width", width, minimum=1)
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seed = check_int("seed", seed)
    x, y, _ = _as_tensors(train, "train")
    sx, sy, _ = _as_tensors(score, "score")
    if sx.shape[1:] != x.shape[1:]:
        raise ValueError(f"score images must have train's image shape {tuple(x.shape[1:])}, got {tuple(sx.shape[1:])}")
    _warn_on_units(x, sx)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(mix_seed(seed, "eval net") % 2**63)
        net = ConvNet(x.shape[1], int(max(int(y.max()), int(sy.max()))) + 1, x.shape[2:], width).to(x.device)
        _train(net, x, y, epochs=epochs, batch_size=batch_size, augment=augment,
               generator=torch.Generator().manual_seed(mix_seed(seed, "eval batches") % 2**63))
    sx, sy = sx.to(x.device), sy.to(x.device)
    with torch.no_grad():
        pred = torch.cat([net(sx[i: i + 2048]).argmax(1) for i in range(0, len(sx), 2048)])
    return 100.0 * float((pred == sy).float().mean())


def _train(net, x, y, *, epochs: int, batch_size: int, augment, generator) -> None:
    """The literature's schedule: SGD (lr 0.01, momentum 0.9, wd 5e-4), lr / 10 at half, DSA per image."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    aug = None if augment is None else SiameseAugment(augment)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i: i + batch_size]
            xb = x[idx] if aug is None else aug.apply(x[idx], aug.draw(len(idx), generator=generator))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def _warn_on_units(x: torch.Tensor, sx: torch.Tensor) -> None:
    """A warning when ``score`` (sx) spans another range than ``train`` (x) by more than their span (0..255
    against [0, 1], raw against Normalize'd)."""
    lo, hi, slo, shi = float(x.min()), float(x.max()), float(sx.min()), float(sx.max())
    span = max(hi - lo, shi - slo, 1e-12)
    if abs(slo - lo) > 0.5 * span or abs(shi - hi) > 0.5 * span:
        warn_user(f"evaluate_synthetic: score images span [{slo:.4g}, {shi:.4g}] but train images [{lo:.4g}, "
                  f"{hi:.4g}]; both must be in the same units (uint8 images are divided by 255)")
