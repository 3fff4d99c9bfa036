"""FlowDataset: wrap a map-style Dataset of (input, label) items and serve them flowed toward a reference.

Two modes:

* ``"precompute"``: the whole dataset is read once and flowed in shuffled chunks (each chunk a sample of
  the source distribution), keeping snapshots at chosen steps: a curriculum from source (step 0) to the
  flowed data. Results are cached on disk under a key derived from the data, the reference and the
  configuration; a later run with the same inputs loads them, any change rebuilds them. ``strength``
  picks the flow time: features are interpolated between the two bracketing snapshots.
* ``"online"``: items are read live (the wrapped dataset's random transforms still apply) and every
  batch is flowed when the DataLoader fetches it (``__getitems__``), through a
  :class:`~flowaug.FlowTransform` with the same settings (batches of 2 or more: give the DataLoader
  ``drop_last=True`` when the dataset's size leaves a last batch of one). Access one item at a time (``ds[i]``, a
  ``ConcatDataset``, a DataLoader with ``batch_size=None``) is refused with an error naming the fixes
  (unless ``strength`` is 0): a single point flowed alone is a one-point measure whose flow lands on the
  reference's mean, and serving the item unflowed would be silently wrong. For
  ``ConcatDataset([target, FlowDataset(source)])`` use precompute mode (any access path works), or
  :class:`~flowaug.FlowCollate` over the concatenation.

Either way items come back as the wrapped dataset gives them: PIL images as PIL images, ``tv_tensors`` as
``tv_tensors``, int labels as ints, tensor labels as tensors, extra tuple entries and dict entries untouched
(``item_keys`` says where the input and the label are). ``transform`` and ``target_transform`` run after the
flow on every access, as in torchvision datasets: put random transforms there, not in the wrapped dataset,
whose transforms precompute reads once (a RuntimeWarning says so when two reads of an item differ).
Attributes FlowDataset does not define are read from the wrapped dataset (``.classes``, ``.targets``;
not the label ones when labels flow, since they would no longer describe the items).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings

import numpy as np
import torch

from ._version import __version__
from ._cache import read_cache, write_cache
from ._checks import WarnOnce, check_choice, check_int, describe, warn_user
from ._shared import AdapterState, strength_property
from .config import FlowConfig, build_config, fingerprint
from .data import (ItemFormat, _finite_input, _label_of, input_kind, label_kind, read_items, restore_input,
                   restore_label, to_tensor)
from .flow import run
from .labels import ClassStats
from .policy import label_plan, pair_classes_by_name
from .reference import Reference, ReferenceLike
from .transforms import FlowTransform, batch_to_float, check_soft, float_to_like, soft_identity

__all__ = ["FlowDataset", "MODES"]

MODES = ("precompute", "online")
#: FlowConfig defaults of a FlowDataset where they differ from :func:`flowaug.flow`'s
DATASET_DEFAULTS = {"steps": 20, "clamp": "auto", "track_objective": False}
#: attributes of the wrapped dataset that describe its labels: not forwarded when labels flow
LABEL_ATTRIBUTES = ("targets", "classes", "class_to_idx", "labels")


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = a.detach().cpu()
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        h.update(np.ascontiguousarray(a.numpy()).tobytes())
    return h.hexdigest()


def _same_value(a, b) -> bool:
    """Two reads of an item entry are equal (tensors, arrays, PIL images, numbers)."""
    try:
        ta, tb = to_tensor(a), to_tensor(b)
    except TypeError:
        return a == b
    if ta.shape != tb.shape or ta.dtype != tb.dtype:
        return False
    if ta.is_floating_point():  # NaN == NaN here: a NaN is the same read twice, not randomness
        return bool(((ta == tb) | (ta.isnan() & tb.isnan())).all())
    return bool(torch.equal(ta, tb))


def _distributed() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FlowDataset(torch.utils.data.Dataset):
    """A Dataset whose items are flowed toward a reference.

    Args:
        dataset: map-style Dataset of ``(input, label)`` items, ``(input, label, extra...)`` tuples or dicts
            (any transform pipeline it already has runs when items are read: once, in precompute).
        reference: Reference, ``(features, labels)``, tensor or Dataset (see :class:`~flowaug.Reference`).
        config: a :class:`~flowaug.FlowConfig` to start from. Options that neither it nor the keywords set
            take this dataset's defaults (``steps=20, clamp="auto", track_objective=False``), the same way
            for a config as for keywords. With ``class_map="same"``, classes are paired by name when the
            wrapped dataset and the reference both name them (``.classes``), else by index.
        **options: any :class:`~flowaug.FlowConfig` option, applied over ``config`` (see
            :func:`~flowaug.flow`). ``snapshots`` (precompute only): the steps to keep (a list, a count of
            evenly spaced ones; the start and the end are always kept); ``strength`` interpolates between
            them.
        mode: ``"precompute"`` or ``"online"``.
        soft: with ``labels="flow"``, items carry soft labels (K',) instead of class ids.
        strength: fraction of the flow time served, in [0, 1] (annealed by :class:`~flowaug.FlowAnnealing`).
        chunk_size: points flowed together in precompute (each chunk is a shuffled sample of the data).
        reference_size: reference points drawn per chunk / batch (None: all).
        cache_dir: folder of the precompute cache (None: no disk cache).
        seed: seed of the chunk shuffling and of the reference samples.
        progress: show progress bars while reading and flowing.
        transform: callable applied to each input after the flow, on every access (torchvision's
            ``transform``; it receives the input's own type, e.g. a PIL image). Random transforms go here.
        target_transform: callable applied to each label after the flow, on every access.
        item_keys: where the input and the label sit in an item: ``(input_key, label_key)``, positions in
            tuple items (default ``(0, 1)``) or keys of dict items (default: ``"image"``/``"img"``/
            ``"input"``/``"inputs"``/``"x"`` and ``"label"``/``"labels"``/``"target"``/``"targets"``/
            ``"y"``). Keys, not getters: the flowed entry is written back in place; the others are untouched.

    Example:
        >>> import torch
        >>> from flowaug import FlowDataset
        >>> g = torch.Generator().manual_seed(0)
        >>> data = torch.utils.data.TensorDataset(torch.rand(40, 1, 6, 6, generator=g), torch.arange(40) % 2)
        >>> ref = (torch.rand(30, 1, 6, 6, generator=g) + 1, torch.arange(30) % 2)
        >>> fd = FlowDataset(data, ref, steps=4, snapshots=3, progress=False)
        >>> len(fd), fd.snapshot_steps
        (40, [0, 2, 4])
        >>> fd.strength = 0.0
        >>> bool(torch.equal(fd[3][0], data[3][0]))
        True
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        reference: ReferenceLike,
        config: FlowConfig | None = None,
        *,
        mode: str = "precompute",
        soft: bool = False,
        strength: float = 1.0,
        chunk_size: int = 4096,
        reference_size: int | None = None,
        cache_dir: str | None = None,
        seed: int = 0,
        progress: bool = True,
        transform=None,
        target_transform=None,
        item_keys=None,
        **options,
    ):
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise TypeError(f"dataset must be a map-style Dataset (with __len__ and __getitem__), got the "
                            f"IterableDataset {type(dataset).__name__}: FlowDataset serves items by index. Flow the "
                            "batches of an iterable dataset with FlowTransform (after the DataLoader or in a collate_fn)")
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style Dataset with __len__ and __getitem__, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("dataset must not be empty")
        self.dataset = dataset
        self.reference = Reference.coerce(reference)
        self.mode = check_choice("mode", mode, MODES)
        config = build_config(config, DATASET_DEFAULTS, options, "FlowDataset")
        self.config = pair_classes_by_name(config, getattr(dataset, "classes", None), self.reference.classes)
        label_plan(self.config, True, self.reference)  # items carry labels: refuse now what no batch could run
        if self.mode == "online" and self.config.snapshots is not None:
            raise ValueError("snapshots apply to mode='precompute' only (online mode flows each batch anew)")
        self.soft = check_soft(soft, self.config)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=2)
        self.reference_size = None if reference_size is None else check_int("reference_size", reference_size, minimum=2)
        self.cache_dir = cache_dir
        self.seed = check_int("seed", seed)
        self.progress = bool(progress)
        for name, fn in (("transform", transform), ("target_transform", target_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {describe(fn)}")
        self.transform, self.target_transform = transform, target_transform
        self._format = ItemFormat(item_keys, name="dataset", argument="item_keys")
        first_input, first_label, _ = self._format.split(dataset[0], 0)
        self._input_kind, self._label_kind = input_kind(first_input), label_kind(first_label)
        self._templates = None  # precompute: per-item templates of non-pair items (see ItemFormat.split)
        self.snapshot_steps = sorted(set(self.config.snapshot_steps()) | {0, self.config.steps})
        self.cache_status: str | None = None
        self._data = None
        self._warn_once = WarnOnce()
        if self.mode == "online":
            self._transform = FlowTransform(self.reference, self.config, soft=soft, strength=strength,
                                            reference_size=self.reference_size, seed=self.seed)
            self.state = self._transform.state  # one strength, epoch and random stream for both
        else:
            self._transform = None
            self.state = AdapterState(strength, self.seed, self.reference_size)
            self.precompute()

    # ------------------------------------------------------------------ strength
    strength = strength_property("Fraction of the flow time served, in [0, 1] (shared with DataLoader workers).")

    def set_epoch(self, epoch: int) -> None:
        """Online mode: restart the flow's random stream for ``epoch`` (see :meth:`FlowTransform.set_epoch`).
        Precompute mode draws nothing per epoch; the call only checks ``epoch``."""
        self.state.set_epoch(check_int("epoch", epoch))

    # ------------------------------------------------------------------ precompute
    def config_key(self, data_digest: str) -> str:
        """Cache key: the data, the reference, every setting that changes the result (the flow options by
        content, user callables by their code) and the library version. Raises ValueError when an option
        cannot be fingerprinted (then nothing is cached)."""
        return fingerprint([
            __version__, data_digest, self.reference.fingerprint(), self.config.fingerprint(), self.soft,
            self.snapshot_steps, self.chunk_size, self.reference_size, self.seed,
        ])

    def precompute(self) -> None:
        """Flow the whole dataset (or load the cached result). Called by the constructor."""
        self._warn_if_random()
        x, y, self._templates = read_items(self.dataset, self._format, progress=self.progress)
        if y.ndim != 1:
            raise ValueError("precompute needs hard class labels (N,) in the wrapped dataset")
        path, key = None, None
        if self.cache_dir is not None:
            try:
                key = self.config_key(_digest(x, y))
                path = os.path.join(self.cache_dir, f"flowaug-{key}.cache")
            except ValueError as err:
                warn_user(f"FlowDataset cache disabled: {err}")
        if path is not None:
            payload, reason = read_cache(path, key)
            if payload is not None:
                self._data, self.cache_status = payload, "loaded"
                return
            if reason != "no cache file":
                warnings.warn(f"FlowDataset cache {path}: {reason}; rebuilding it", RuntimeWarning, stacklevel=3)
        self._data = self._run(x, y)
        self.cache_status = "built"
        rank, world = _distributed()
        if path is not None and rank == 0:
            write_cache(path, key, self._data)
        if world > 1:
            torch.distributed.barrier()

    def _warn_if_random(self) -> None:
        """Precompute reads the dataset once: warn when two reads of one of its first two items differ."""
        for i in range(min(2, len(self.dataset))):
            a, b = (self._format.split(self.dataset[i], i) for _ in range(2))
            same = all(_same_value(u, v) for u, v in zip(a[:2], b[:2]))
            if not same:
                warn_user(f"FlowDataset(mode='precompute'): the wrapped dataset looks random (two reads of item {i} "
                          "differ). It is read once, so each item keeps one draw of its random transforms forever. "
                          "Move them to FlowDataset(transform=..., target_transform=...), applied after the flow on "
                          "every access, or use mode='online'.", RuntimeWarning)
                return

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """Flow every chunk (this rank's share under DDP) and gather the snapshots."""
        from tqdm.auto import tqdm

        n = x.shape[0]
        xf = batch_to_float(x)
        ref = self.reference.to(xf.device)
        cfg = self.config
        plan = label_plan(cfg, y, ref)
        use_labels = plan.uses_labels
        stats = ClassStats(single_sample=ref.single_sample).update(xf, y) if use_labels else None
        run_cfg = cfg.replace(snapshots=self.snapshot_steps, track_objective=False)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        n_chunks = math.ceil(n / self.chunk_size)
        store_dtype = torch.uint8 if x.dtype == torch.uint8 else torch.float32
        snaps = {s: torch.empty(x.shape, dtype=store_dtype) for s in self.snapshot_steps}
        snap_labels = {s: y.clone() for s in self.snapshot_steps}
        soft = {s: None for s in self.snapshot_steps}
        chunks = torch.tensor_split(order, n_chunks)  # even sizes: no tiny last chunk (a poor sample)
        rank, world = _distributed()  # under DDP each rank flows every world-th chunk, then all gather
        done = []
        for c in tqdm(range(n_chunks), desc="flowing dataset", disable=not self.progress, leave=False):
            if c % world != rank:
                continue
            idx = chunks[c]
            done.append(c)
            with self._warn_once():
                out = run(xf[idx], y[idx] if use_labels else None, ref, run_cfg, source_stats=stats,
                          reference_index=self.state.chunk_sample(c, ref.num_samples),
                          generator=torch.Generator().manual_seed(self.seed * 1_000_003 + c))
            traj, traj_y = list(out.trajectory), list(out.trajectory_labels)
            while len(traj) < len(self.snapshot_steps):  # the guard stopped the flow early: hold the end
                traj.append(out.x)
                traj_y.append(out.labels)
            flows_labels = plan.labels_move
            per_point = cfg.decode == "point" and cfg.class_map is None
            for s, xs, ys in zip(self.snapshot_steps, traj, traj_y):
                snaps[s][idx] = float_to_like(xs, x[idx]).as_subclass(torch.Tensor).to(store_dtype)
                if flows_labels:  # per point: each snapshot decoded at its time; per class: one relabelling
                    snap_labels[s][idx] = ys if per_point else out.labels
            last = self.snapshot_steps[-1]
            if flows_labels and self.soft:
                if soft[last] is None:
                    soft[last] = torch.zeros(n, out.soft_labels.shape[1])
                soft[last][idx] = out.soft_labels
        self.chunks_flowed = done  # the chunks this process flowed (all of them unless sharded under DDP)
        if world > 1:
            self._gather(chunks, done, snaps, snap_labels, soft)
        return {"x": snaps, "y": snap_labels, "soft": soft.get(self.snapshot_steps[-1]), "dtype": str(x.dtype)}

    def _gather(self, chunks, done, snaps, snap_labels, soft) -> None:
        """All-gather the chunks flowed by every rank (torch.distributed, any backend)."""
        last = self.snapshot_steps[-1]
        mine = [(c, {s: snaps[s][chunks[c]] for s in snaps}, {s: snap_labels[s][chunks[c]] for s in snap_labels},
                 None if soft[last] is None else soft[last][chunks[c]]) for c in done]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        for part in gathered:
            for c, xs, ys, ps in part:
                idx = chunks[c]
                for s in snaps:
                    snaps[s][idx] = xs[s]
                    snap_labels[s][idx] = ys[s]
                if ps is not None:
                    if soft[last] is None:
                        soft[last] = torch.zeros(len(snap_labels[last]), ps.shape[1])
                    soft[last][idx] = ps

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.dataset)

    def _bracket(self) -> tuple[int, int, float]:
        t = self.strength * self.config.steps
        steps = self.snapshot_steps
        hi = next((s for s in steps if s >= t - 1e-9), steps[-1])
        lo = max((s for s in steps if s <= t + 1e-9), default=steps[0])
        w = 0.0 if hi == lo else (t - lo) / (hi - lo)
        return lo, hi, w

    def __getitem__(self, index: int):
        if self.mode == "online":
            if self.strength == 0:  # the identity: the wrapped item, with this dataset's transforms
                return self._flow_items([index])[0]
            # A flow moves a batch as a distribution: one item flowed alone is a one-point measure, whose
            # Sinkhorn/MMD flow sends it to the reference's mean (measured: 8 items read one by one all landed
            # within 5e-7 of it). Serving that, or the unflowed item, would corrupt training silently.
            raise RuntimeError(
                "FlowDataset(mode='online') flows whole batches and cannot serve one item alone (ds[i], a "
                "ConcatDataset, or a DataLoader with batch_size=None): a single point flowed alone lands on the "
                "reference's mean. Read it through a DataLoader with a batch_size (it calls __getitems__), or use "
                "mode='precompute' (any access path), or flowaug.FlowCollate(FlowTransform(...)) as the collate_fn "
                "of a DataLoader over a ConcatDataset"
            )
        x, label = self._precomputed(index)
        template = None if self._templates is None else self._templates[index]
        return self._finish(template, restore_input(x, self._input_kind), restore_label(label, self._label_kind))

    def _precomputed(self, index: int) -> tuple:
        """The stored input at the current strength (interpolated between snapshots) and its label."""
        lo, hi, w = self._bracket()
        xs = self._data["x"]
        if w == 0.0:
            item = xs[lo][index]
        elif w == 1.0:
            item = xs[hi][index]
        else:
            a, b = xs[lo][index].float(), xs[hi][index].float()
            mixed = torch.lerp(a, b, w)
            item = mixed.round().clamp(0, 255).to(torch.uint8) if xs[lo].dtype == torch.uint8 else mixed
        near = hi if w >= 0.5 else lo
        label = self._data["y"][near][index]
        if not (self.soft and self.config.labels == "flow"):
            return item, label
        stored = self._data["soft"]  # (N, K'): the flow's soft labels, kept at the last snapshot only
        if near == self.snapshot_steps[-1] and stored is not None:
            return item, stored[index].clone()
        # below it, the soft form of the class decoded at that snapshot by the rule the transform and the online
        # dataset use for an unflowed batch: (K',) wide, like the stored soft labels, so items collate
        return item, soft_identity(label[None], self.reference)[0]

    def _finish(self, template, x, label):
        """The served item: ``transform``/``target_transform`` applied, in the wrapped dataset's form."""
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return self._format.join(template, x, label)

    def __getitems__(self, indices):
        """Batched fetch used by DataLoader: online mode flows the whole batch here."""
        if self.mode != "online":
            return [self[i] for i in indices]
        return self._flow_items(indices)

    def _flow_items(self, indices) -> list:
        """Online mode: read the items, flow them as one batch, give each back in its own form."""
        parts = [self._format.split(self.dataset[i], i) for i in indices]
        if self.strength == 0:  # the identity, item by item (also one item alone: nothing is flowed)
            if self.soft:  # the same (K',) soft labels the transform gives an unflowed batch
                return [self._finish(template, inp, soft_identity(_label_of(label, i, "dataset")[None],
                                                                  self.reference)[0])
                        for (inp, label, template), i in zip(parts, indices)]
            return [self._finish(template, inp, label) for inp, label, template in parts]
        x = torch.stack([_finite_input(to_tensor(p[0]), i, "dataset") for p, i in zip(parts, indices)])
        y = torch.stack([_label_of(p[1], i, "dataset") for p, i in zip(parts, indices)])
        fx, fy = self._transform(x, y)
        out = []
        for k, (inp, label, template) in enumerate(parts):
            new_x = inp if fx is x else restore_input(fx[k], input_kind(inp))  # strength 0: the very objects
            if fy is y:
                new_label = label
            else:
                new_label = fy[k] if fy.ndim == 2 else restore_label(fy[k], label_kind(label))
            out.append(self._finish(template, new_x, new_label))
        return out

    def __getattr__(self, name: str):
        """Attributes FlowDataset does not define come from the wrapped dataset (``.classes``, ``.targets``).
        Private names are never forwarded (nor during unpickling, before ``dataset`` is set); label
        attributes are not forwarded when labels flow (they would describe the source's labels)."""
        if name.startswith("_") or "dataset" not in self.__dict__:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}")
        config = self.__dict__.get("config")
        if name in LABEL_ATTRIBUTES and config is not None and config.labels == "flow":
            raise AttributeError(f"FlowDataset does not forward {name!r} of the wrapped dataset with labels='flow': "
                                 "the served labels are decoded reference classes, not the wrapped dataset's")
        return getattr(self.__dict__["dataset"], name)

    def __repr__(self) -> str:
        return (
            f"FlowDataset(dataset={type(self.dataset).__name__}(len={len(self.dataset)}), "
            f"reference={self.reference!r}, mode={self.mode!r}, soft={self.soft}, chunk_size={self.chunk_size}, "
            f"reference_size={self.reference_size}, seed={self.seed}, snapshot_steps={self.snapshot_steps}, "
            f"strength={self.strength}, {self.config.describe()})"
        )
