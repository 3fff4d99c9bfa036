"""Dataset synthesis (condensation) as a class-wise flow in a random embedding.

A few synthetic particles per class flow toward that class's real images, with a ground cost measured in
the features of a freshly drawn random ConvNet at every step (:class:`~flowaug.Embedded` with a factory),
optionally after a differentiable Siamese augmentation applied with the same parameters to the real and
the synthetic images (:class:`~flowaug.dsa.SiameseAugment`). With ``objective="linear"`` (mean
matching) and ``step_size = 2 lr / images_per_class`` this is distribution matching (Zhao & Bilen, WACV
2023) written as a flow; ``"sinkhorn"`` and ``"mmd"`` match the whole class distribution in the same
embeddings instead of its mean.

The flow runs in segments of ``checkpoint_every`` iterations; each segment's randomness comes from
``(seed, segment)`` alone, so a run resumed from its checkpoint (written atomically after every segment)
ends exactly where the uninterrupted run ends. Heavy-ball momentum restarts at every segment boundary (in
both).

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

import os

import numpy as np
import torch

from ._checks import WarnOnce, check_choice, check_int, check_real, describe
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
    torch's global RNG, which :class:`~flowaug.Embedded` seeds) and, with ``augment``, one Siamese DSA draw.

    Args:
        channels, num_classes, image_size, width, depth: the ConvNet (:class:`~flowaug.networks.ConvNet`).
        augment: a DSA strategy (e.g. ``"color_crop_cutout_scale_rotate"``) or None.
    """

    def __init__(self, channels: int, num_classes: int, image_size, *, width: int = 128, depth: int = 3,
                 augment: str | None = DSA_DIGITS):
        self.channels, self.num_classes, self.image_size = channels, num_classes, tuple(image_size)
        self.width, self.depth = width, depth
        self.augment = None if augment is None else SiameseAugment(augment)

    def __call__(self) -> _Phi:
        net = ConvNet(self.channels, self.num_classes, self.image_size, self.width, self.depth).requires_grad_(False)
        params = None if self.augment is None else self.augment.draw()
        return _Phi(net, self.augment, params)

    def __repr__(self) -> str:
        strategy = None if self.augment is None else self.augment.strategy
        return f"RandomEmbedding(ConvNet-{self.depth}, width={self.width}, augment={strategy!r})"


class Condensed(torch.utils.data.Dataset):
    """A synthetic dataset: ``images`` (N, C, H, W) float, ``labels`` (N,) int64, ``classes`` (names or None)
    and ``info`` (how it was made). Items are ``(image, label)`` like a torchvision dataset."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes=None, info: dict | None = None):
        self.images, self.labels, self.classes, self.info = images, labels, classes, dict(info or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])

    def save(self, path: str) -> str:
        """Write ``x`` (float32, N x C x H x W), ``y`` (int64) and ``x_uint8`` (images in [0, 1] scaled to bytes,
        clamped for display only) to an npz file, atomically."""
        x = self.images.detach().cpu().float()
        with atomic_path(path, ".npz") as tmp:
            np.savez_compressed(tmp, x=x.numpy(), y=self.labels.cpu().numpy(),
                                x_uint8=(x.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        return path

    def grid(self, path: str, *, real: torch.Tensor | None = None, title: str | None = None) -> str:
        """A PNG: one row of synthetic images per class (and a row of ``real`` images, if given)."""
        from .plotting import image_grid

        k = int(self.labels.max()) + 1
        per = int((self.labels == 0).sum())
        rows = [self.images[self.labels == c].clamp(0, 1) for c in range(k)]
        order = torch.stack(rows, 1).reshape(-1, *self.images.shape[1:]) if per > 1 else torch.cat(rows)
        batches = [order[i * k: (i + 1) * k] for i in range(min(per, 10))]
        labels = [f"synthetic {i + 1}" for i in range(len(batches))]
        if real is not None:
            batches.append(real[:k].clamp(0, 1))
            labels.append("real")
        return image_grid(batches, path, row_labels=labels, columns=k, title=title)

    def __repr__(self) -> str:
        return f"Condensed(images={tuple(self.images.shape)}, classes={int(self.labels.max()) + 1})"


def _as_tensors(data):
    """(x float (N, C, H, W), y (N,), class names or None) from a Dataset, an (x, y) pair or an npz folder."""
    from .data import as_float_images, dataset_to_tensors, load_npz

    names = getattr(data, "classes", None)
    if isinstance(data, str):
        if not os.path.isfile(os.path.join(data, "train.npz")):
            raise FileNotFoundError(f"data folder {data!r} has no train.npz (x uint8 N x H x W, y int64)")
        x, y = load_npz(os.path.dirname(os.path.abspath(data)), os.path.basename(os.path.abspath(data)), "train")
    elif isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        x, y = dataset_to_tensors(data, name="data")
    else:
        raise TypeError(f"data must be a Dataset, an (images, labels) pair or an npz folder, got {describe(data)}")
    x = as_float_images(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"data must be images (N, C, H, W) or (N, H, W) with (N,) class ids, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    return x.float(), y.long(), names


def _initial(x, y, ipc: int, init: str, seed: int):
    """(images (K * ipc, C, H, W), labels): real images drawn per class (seeded), or Gaussian noise with the
    data's mean and std."""
    g = torch.Generator().manual_seed(mix_seed(seed, "condense init") % 2**63)
    classes = torch.unique(y).tolist()
    if classes != list(range(len(classes))):
        raise ValueError(f"labels must be 0..K-1 with every class present, got classes {classes[:12]}")
    xs, ys = [], []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < ipc and init == "real":
            raise ValueError(f"class {c} has {idx.numel()} images, fewer than images_per_class={ipc}")
        if init == "real":
            xs.append(x[idx[torch.randperm(idx.numel(), generator=g)[:ipc]]].clone())
        else:
            xs.append(x.mean() + x.std() * torch.randn(ipc, *x.shape[1:], generator=g))
        ys.append(torch.full((ipc,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def condense(data, images_per_class: int, *, objective: str | Objective = DEFAULT_OBJECTIVE, embedding=None,
             iterations: int = 1000, real_per_class: int = 256, step_size: float | None = None, momentum: float = 0.5,
             init: str = "real", augment: str | None = DSA_DIGITS, width: int = 128, seed: int = 0,
             checkpoint: str | None = None, checkpoint_every: int = 50, progress: bool = True) -> Condensed:
    """Synthesize ``images_per_class`` images per class by a class-wise flow toward the real classes.

    Args:
        data: a labelled map-style Dataset, an ``(images, labels)`` pair (uint8 images are scaled to [0, 1]),
            or a folder holding ``train.npz`` (``x`` uint8 N x H x W, ``y``).
        images_per_class: synthetic images per class.
        objective: ``"mean+mmd"`` (default: mean matching plus a Gaussian MMD), ``"sinkhorn"``, ``"mmd"``
            (Gaussian), ``"linear"`` (mean matching: distribution matching) or an :class:`~flowaug.Objective`,
            measured in the embedding.
        embedding: a fixed embedding (an ``nn.Module``: its ``forward``, flattened per image, e.g. a trained
            network's ``features``), or a factory of embeddings (any other callable, called with no arguments
            at every step); default :class:`RandomEmbedding` (a fresh random ConvNet-3 of ``width`` per step,
            after a DSA ``augment`` draw).
        iterations: flow steps; real_per_class: real images embedded per class and step.
        step_size, momentum: the flow's explicit Euler step (default ``4 / images_per_class``: twice
            distribution matching's per-image step at lr 1, the setting chosen on validation at 10 images per
            class) and heavy-ball coefficient.
        init: ``"real"`` (random real images, seeded) or ``"noise"``.
        augment: DSA strategy of the default embedding (None: no augmentation).
        seed: seeds the initial images, the networks, the augmentations and the real samples.
        checkpoint: an ``.pt`` path: resume from it when it exists (same settings), write it after every
            segment of ``checkpoint_every`` iterations (atomically).
        progress: a progress bar over iterations.

    Returns:
        a :class:`Condensed` dataset (``info`` records the settings and the seconds per iteration).
    """
    import time

    from tqdm.auto import tqdm

    ipc = check_int("images_per_class", images_per_class, minimum=1)
    iterations = check_int("iterations", iterations)
    real_per_class = check_int("real_per_class", real_per_class, minimum=2)
    step_size = DEFAULT_STEP / ipc if step_size is None else check_real("step_size", step_size, low=0, low_open=True)
    init = check_choice("init", init, INITS)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, minimum=1)
    inner = OBJECTIVES[check_choice("objective", objective, tuple(OBJECTIVES))]() if isinstance(objective, str) \
        else objective
    x, y, names = _as_tensors(data)
    if embedding is None:
        embedding = RandomEmbedding(x.shape[1], int(y.max()) + 1, x.shape[2:], width=width, augment=augment)
    fixed = isinstance(embedding, torch.nn.Module)
    obj = Embedded(inner, embedding if fixed else None, factory=None if fixed else embedding,
                   reference_size=real_per_class)
    syn, labels = _initial(x, y, ipc, init, seed)
    info = {"images_per_class": ipc, "objective": repr(inner), "embedding": repr(embedding), "iterations": iterations,
            "real_per_class": real_per_class, "step_size": step_size, "momentum": momentum, "init": init,
            "seed": seed, "checkpoint_every": checkpoint_every}
    key = fingerprint([sorted(info.items()), x.shape, float(torch.sum(x, dtype=torch.float64)), y])
    done, seconds = _resume(checkpoint, key, syn)
    if done:
        syn = done["images"]
    start = done["iterations"] if done else 0
    ref = Reference(x, y)
    bar = tqdm(total=iterations, initial=start, desc="condensing", disable=not progress, leave=False)
    # synthetic particles are free parameters (noise at the start, unbounded after): their value range says
    # nothing about units, so the engine's units diagnosis is dropped; the rest is said once per run
    warn_once = WarnOnce(drop={"units"})
    while start < iterations:
        steps = min(checkpoint_every, iterations - start)
        segment = start // checkpoint_every
        t0 = time.perf_counter()
        with warn_once():
            out = flow(syn, labels, ref, objective=obj, class_map="same", steps=steps, step_size=step_size,
                       momentum=momentum, track_objective=False,
                       generator=torch.Generator().manual_seed(mix_seed(seed, "condense", segment) % 2**63))
        seconds += time.perf_counter() - t0
        syn, start = out.x, start + steps
        bar.update(steps)
        if checkpoint is not None:
            with atomic_path(checkpoint, ".pt") as tmp:
                torch.save({"key": key, "iterations": start, "images": syn, "seconds": seconds}, tmp)
    bar.close()
    info["seconds_per_iteration"] = seconds / max(iterations, 1)
    return Condensed(syn, labels, names, info)


def _resume(path: str | None, key: str, like: torch.Tensor):
    """The checkpoint at ``path`` when it belongs to these settings (else an error naming the file)."""
    if path is None or not os.path.exists(path):
        return None, 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key or state["images"].shape != like.shape:
        raise ValueError(f"checkpoint {path!r} was written by a condensation with other data or settings; delete "
                         "it or pass another checkpoint path")
    return state, float(state.get("seconds", 0.0))


def evaluate_synthetic(train: tuple, score: tuple, *, width: int = 128, epochs: int = 300, seed: int = 0,
                       augment: str | None = DSA_DIGITS, batch_size: int = 256) -> float:
    """How well a (synthetic) training set trains: accuracy (%) on ``score`` of a fresh ConvNet-3 trained on it.

    The evaluation of the condensation literature (DC/DSA/DM): SGD with lr 0.01, momentum 0.9, weight decay
    5e-4, ``batch_size`` 256, the learning rate divided by 10 at half the ``epochs``, and DSA ``augment`` (a
    fresh draw per image of every batch). ``seed`` fixes the network's initialisation, the batch order and the
    augmentation draws, so two sets scored with one seed are paired.

    Args:
        train: ``(images (N, C, H, W), labels (N,))`` to train on.
        score: ``(images, labels)`` to score (a validation or test split).
    """
    import torch.nn.functional as F

    x, y = train
    torch.manual_seed(mix_seed(seed, "eval net") % 2**63)
    net = ConvNet(x.shape[1], int(max(int(y.max()), int(score[1].max()))) + 1, x.shape[2:], width)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2], 0.1)
    g = torch.Generator().manual_seed(mix_seed(seed, "eval batches") % 2**63)
    aug = None if augment is None else SiameseAugment(augment)
    for _ in range(check_int("epochs", epochs)):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i: i + batch_size]
            xb = x[idx] if aug is None else aug.apply(x[idx], aug.draw(len(idx), generator=g))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    sx, sy = score
    with torch.no_grad():
        pred = torch.cat([net(sx[i: i + 2048]).argmax(1) for i in range(0, len(sx), 2048)])
    return 100.0 * float((pred == sy).float().mean())
