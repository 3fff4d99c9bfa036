"""FlowTransform: a few gradient-flow steps toward a reference dataset, as a torchvision v2 batch transform.

It follows the contract of ``torchvision.transforms.v2.MixUp``/``CutMix``: it is called on a *batch*,
``images, labels = t(images, labels)`` (or a dict/tuple batch, with ``labels_getter``), and returns the
same structure with the images moved and, when labels flow, new labels. Where to put it:

* **after the DataLoader** (``for x, y in loader: x, y = t(x.cuda(), y.cuda())``, or via
  :class:`~flowaug.FlowAnnealing` on the device): the main process, the GPU, KeOps. Use this on GPU.
* **in a collate_fn** (``collate_fn=FlowCollate(t)``): inside CPU workers, overlapped with training. Use
  this for CPU dense flows; keep KeOps and CUDA out of forked workers. (A class, not a lambda: it pickles
  under the spawn and forkserver start methods, the default from Python 3.14.)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms.v2 import Transform

from ._checks import check_bool, check_choice, check_int, check_real, describe
from ._shared import ProcessGenerator, SharedValue, mix_seed, strength_property
from .config import FlowConfig
from .flow import run
from .labels import ClassStats
from .reference import Reference, ReferenceLike

__all__ = ["FlowCollate", "FlowTransform", "batch_to_float", "float_to_like", "build_config", "check_soft"]

RESAMPLE = ("batch", "epoch")
#: inputs FlowTransform refuses, as MixUp/CutMix do: moving pixels would leave them misaligned
_UNALIGNED = tuple(getattr(tv_tensors, name) for name in ("Mask", "BoundingBoxes", "KeyPoints")
                   if hasattr(tv_tensors, name))


def batch_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (torchvision's ``ToDtype(scale=True)``); floats pass through."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255)
    return images


def float_to_like(moved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Back to the caller's dtype (uint8: rounded and clamped) and tv_tensor type."""
    if like.dtype == torch.uint8:
        moved = moved.mul(255).round_().clamp_(0, 255).to(torch.uint8)
    else:
        moved = moved.to(like.dtype)
    if isinstance(like, tv_tensors.TVTensor):
        return tv_tensors.wrap(moved, like=like)
    return moved


def _default_labels(inputs):
    """torchvision's heuristic: the second item of a tuple, or a 'labels'-like key of a dict."""
    from torchvision.transforms.v2._utils import _find_labels_default_heuristic

    return _find_labels_default_heuristic(inputs)


#: FlowConfig defaults of a FlowTransform where they differ from :func:`flowaug.flow`'s (a few cheap steps per
#: batch, clamped to the reference's range, no per-batch objective bookkeeping)
TRANSFORM_DEFAULTS = {"steps": 5, "clamp": "auto", "track_objective": False}


def check_soft(soft, config: FlowConfig) -> bool:
    """The adapters' ``soft``: a bool, and True only where labels flow (fixed labels have no soft form)."""
    if check_bool("soft", soft) and config.labels != "flow":
        raise ValueError("soft=True returns flowed soft labels and needs labels='flow', got labels="
                         f"{config.labels!r}")
    return soft


def build_config(config: FlowConfig | None, defaults: dict, options: dict, owner: str) -> FlowConfig:
    """An adapter's config: ``config`` (or the adapter's defaults) with ``options`` applied, validated once."""
    if config is not None and not isinstance(config, FlowConfig):
        raise TypeError(f"config must be a FlowConfig or None, got {describe(config)}")
    unknown = sorted(set(options) - set(FlowConfig.options()))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {unknown}; flow options are {FlowConfig.options()}")
    base = config if config is not None else FlowConfig(**defaults)
    return base.replace(**options) if options else base


class FlowTransform(Transform):
    """Move a batch toward a reference dataset along a Wasserstein gradient flow.

    Args:
        reference: the target: a :class:`~flowaug.Reference`, a ``(features, labels)`` pair, a features
            tensor, or a Dataset of (input, label) items. Prepared once (class statistics, norms, scales).
        config: a :class:`~flowaug.FlowConfig` to start from (default: ``steps=5, clamp="auto",
            track_objective=False``, the rest as :func:`~flowaug.flow`).
        **options: any :class:`~flowaug.FlowConfig` option (``objective``, ``steps``, ``step_size``,
            ``labels``, ``label_weight``, ``decode``, ``soft_temperature``, ``class_map``, ``momentum``,
            ``clamp``, ``backend``, ``dtype``, ``guard``, ``track_objective``), applied over ``config``.
            ``steps`` is the number of Euler steps at ``strength=1``; ``clamp="auto"`` is the reference's
            value range; ``track_objective=True`` keeps the objective of every batch in
            :attr:`last_objective` (one extra evaluation per batch), which :class:`~flowaug.FlowAnnealing`
            logs. ``snapshots`` does not apply to a batch transform and is refused.
        soft: with ``labels="flow"``, return soft labels (B, K') instead of class ids.
        reference_size: number of reference points drawn (None: the whole reference).
        resample: when the ``reference_size`` sample is drawn: ``"batch"`` (a new sample every batch) or
            ``"epoch"`` (one sample per epoch, the same in every worker when seeded; ``set_epoch`` draws the
            next). ``"epoch"`` keeps the solver's warm start valid from batch to batch, which makes per-batch
            flows several times cheaper (``benchmarks/speed.py --sections overhead``).
        p: probability of flowing a given batch.
        strength: in [0, 1]: the fraction of the configured flow time applied (0 is the identity). This
            is what :class:`~flowaug.FlowAnnealing` moves; it lives in shared memory so DataLoader
            workers see changes.
        seed: seed of this transform's random stream (per-batch decisions and reference samples).
        labels_getter: how to find labels in the batch: ``"default"`` (torchvision's heuristic), a
            callable, or None (unlabeled batches).
        source_stats: class statistics of the source dataset; else call :meth:`fit`, else they are
            estimated online from the batches seen so far (in each process). Online estimates depend on
            the batches seen: fit them for exactly reproducible or resumable runs.
        warm_start: reuse the solver's potentials from the previous batch (when the reference points stay the
            same: no ``reference_size``, or ``resample="epoch"``). They restart at every ``set_epoch``, so a run
            resumed at an epoch boundary flows exactly the same batches; a mid-epoch resume does not.

    Example:
        >>> import torch
        >>> from flowaug import FlowTransform
        >>> g = torch.Generator().manual_seed(0)
        >>> ref_x, ref_y = torch.rand(64, 1, 8, 8, generator=g), torch.arange(64) % 4
        >>> t = FlowTransform((ref_x, ref_y), steps=3, seed=0)
        >>> x, y = torch.rand(16, 1, 8, 8, generator=g), torch.arange(16) % 4
        >>> x2, y2 = t(x, y)
        >>> x2.shape, bool(torch.equal(y2, y))
        (torch.Size([16, 1, 8, 8]), True)
        >>> t.strength = 0.0
        >>> bool(torch.equal(t(x, y)[0], x))
        True
    """

    def __init__(
        self,
        reference: ReferenceLike,
        config: FlowConfig | None = None,
        *,
        soft: bool = False,
        reference_size: int | None = None,
        resample: str = "batch",
        p: float = 1.0,
        strength: float = 1.0,
        seed: int | None = None,
        labels_getter: str | Callable[[Any], torch.Tensor | None] | None = "default",
        source_stats: ClassStats | None = None,
        warm_start: bool = True,
        **options,
    ):
        super().__init__()
        self.reference = Reference.coerce(reference)
        self.config = build_config(config, TRANSFORM_DEFAULTS, options, "FlowTransform")
        if self.config.snapshots is not None:
            raise ValueError("snapshots do not apply to FlowTransform (it returns the moved batch); use flowaug.flow "
                             "or FlowDataset for trajectories")
        self.soft = check_soft(soft, self.config)
        if reference_size is not None:
            reference_size = check_int("reference_size", reference_size, minimum=2)
        self.reference_size = reference_size
        self.resample = check_choice("resample", resample, RESAMPLE)
        self.p = check_real("p", p, low=0, high=1)
        self._strength = SharedValue(strength, "strength")
        if seed is not None:
            seed = check_int("seed", seed)
        self.seed = seed
        if labels_getter != "default" and labels_getter is not None and not callable(labels_getter):
            raise ValueError(f"labels_getter must be 'default', a callable or None, got {describe(labels_getter)}")
        self.labels_getter = labels_getter
        if source_stats is not None and not isinstance(source_stats, ClassStats):
            raise TypeError(f"source_stats must be a ClassStats or None, got {describe(source_stats)}")
        self.source_stats = source_stats
        self._online_stats = source_stats is None
        self.warm_start = check_bool("warm_start", warm_start)
        self._epoch = SharedValue(-1, "epoch", low=-1, high=2**62)
        self._rng = ProcessGenerator(seed, self._epoch)
        self._warm: dict = {}
        self._warm_epoch = -1
        self._sample: tuple[int, torch.Tensor] | None = None  # (epoch, index) of resample="epoch"
        self.last_objective: torch.Tensor | None = None

    # ------------------------------------------------------------------ public state
    strength = strength_property("Fraction of the configured flow applied, in [0, 1] (shared with DataLoader workers).")

    def set_epoch(self, epoch: int) -> None:
        """Restart the random stream for ``epoch`` (the ``DistributedSampler.set_epoch`` convention): the
        batches of an epoch then draw the same decisions in any run, resumed or not. Shared with workers."""
        self._epoch.set(check_int("epoch", epoch))

    def fit(self, data, batch_size: int = 1024) -> "FlowTransform":
        """Fit the source class statistics from a Dataset, a DataLoader of batches (found with
        ``labels_getter``, like a call: tuples, dicts) or an (x, y) pair."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
            stats = ClassStats().update(batch_to_float(data[0]), data[1])
        elif isinstance(data, torch.utils.data.DataLoader):
            stats = ClassStats()
            for i, batch in enumerate(data):
                flat, _ = tree_flatten(batch)
                labels = self._labels_of(batch)
                if labels is None:
                    raise ValueError(f"fit needs labeled batches, but labels_getter found none in batch {i} "
                                     f"({describe(batch)}); pass labels_getter=callable")
                stats.update(batch_to_float(flat[self._find_images(flat, labels)].as_subclass(torch.Tensor)), labels)
        else:
            from .data import dataset_to_tensors

            x, y = dataset_to_tensors(data, batch_size=batch_size, name="data")
            stats = ClassStats().update(batch_to_float(x), y)
        self.source_stats, self._online_stats = stats, False
        return self

    # ------------------------------------------------------------------ torchvision contract
    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """All randomness of one call, drawn in one place: from this transform's stream when it has a
        ``seed``, else from torch's global RNG (torch's convention: ``torch.manual_seed`` makes it repeat,
        and DataLoader seeds it per worker)."""
        gen = self._rng.get()
        apply = bool(torch.rand((), generator=gen) < self.p) if self.p < 1 else self.p > 0
        index = None
        if self.reference_size is not None and self.reference_size < self.reference.num_samples:
            index = self._epoch_sample() if self.resample == "epoch" else \
                torch.randperm(self.reference.num_samples, generator=gen)[: self.reference_size]
        flow_seed = int(torch.randint(0, 2**62, (), generator=gen))
        return {"apply": apply, "reference_index": index, "flow_seed": flow_seed}

    def forward(self, *inputs: Any) -> Any:
        """Do not override: flows the batch once and maps the images and labels leaves."""
        inputs = inputs if len(inputs) > 1 else inputs[0]
        flat_inputs, spec = tree_flatten(inputs)
        labels = self._labels_of(inputs)
        image_pos = self._find_images(flat_inputs, labels)
        params = self.make_params(flat_inputs)
        strength = self.strength
        if not params["apply"] or strength == 0 or self.config.steps == 0:
            return inputs  # the identity, bitwise: the very same objects
        images = flat_inputs[image_pos]
        params.update(self._flow(images, labels, params, strength))
        flat_outputs = []
        for i, inpt in enumerate(flat_inputs):
            if i == image_pos or (labels is not None and inpt is labels):
                flat_outputs.append(self.transform(inpt, params))
            else:
                flat_outputs.append(inpt)
        return tree_unflatten(flat_outputs, spec)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return params["labels"] if inpt is params["labels_in"] else params["images"]

    # ------------------------------------------------------------------ internals
    def _labels_of(self, inputs):
        """The labels tensor of a call's input (None: unlabeled). A bare tensor is a batch of images."""
        if self.labels_getter is None or isinstance(inputs, torch.Tensor):
            return None
        getter = _default_labels if self.labels_getter == "default" else self.labels_getter
        labels = getter(inputs)
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {describe(labels)}")
        return labels

    @staticmethod
    def _find_images(flat_inputs, labels) -> int:
        """Position of the image batch: a ``tv_tensors.Image``/``Video``, else the first plain tensor
        (torchvision's convention). Refuses what would come out misaligned (masks, boxes, key points: the
        flow moves pixels, not geometry, as MixUp refuses them) or ambiguous (two image batches)."""
        refused = [type(t).__name__ for t in flat_inputs if isinstance(t, _UNALIGNED)]
        if refused:
            raise ValueError(f"FlowTransform does not support {sorted(set(refused))} in its input: the flow changes "
                             "pixel values, so they would no longer match the images; remove them from the batch")
        tv = [i for i, t in enumerate(flat_inputs) if isinstance(t, (tv_tensors.Image, tv_tensors.Video))]
        plain = [i for i, t in enumerate(flat_inputs) if isinstance(t, torch.Tensor) and t is not labels
                 and not isinstance(t, tv_tensors.TVTensor)]
        candidates = tv or plain
        if not candidates:
            raise TypeError("FlowTransform found no image tensor in its input; pass images, (images, labels) or a "
                            f"dict/tuple batch holding an image tensor, got {len(flat_inputs)} leaves of types "
                            f"{sorted({type(t).__name__ for t in flat_inputs})}")
        first = flat_inputs[candidates[0]]
        # any other (B, ...) tensor of 2+ dims could be a second view of the batch (multi-crop): ambiguous
        alike = [i for i in candidates if flat_inputs[i].ndim >= 2 and flat_inputs[i].shape[0] == first.shape[0]]
        if len(tv) > 1 or len(alike) > 1:
            shapes = [tuple(flat_inputs[i].shape) for i in (tv if len(tv) > 1 else alike)]
            raise ValueError(f"FlowTransform found {len(shapes)} image batches in its input, of shapes {shapes}; it "
                             "flows one per call (flow the others with another call, or stack them into one "
                             "batch); 1-D extras such as indices pass through")
        return candidates[0]

    def _flow(self, images: torch.Tensor, labels, params, strength: float) -> dict:
        if images.ndim < 2:
            raise ValueError(f"images must be a batch (B, C, H, W) or (B, D), got shape {tuple(images.shape)}")
        if images[0].numel() != self.reference.dim:
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])} have {images[0].numel()} values per sample but the "
                f"reference's samples have shape {self.reference.sample_shape} ({self.reference.dim}); they must "
                "match (videos: pass a reference of videos of the same shape, or flow frames as images with "
                "video.flatten(0, 1))"
            )
        x = batch_to_float(images.as_subclass(torch.Tensor))
        ref = self.reference.to(x.device)
        cfg = self.config
        if cfg.class_map is not None and labels is None:
            raise ValueError("class_map needs labels, but the batch has none (labels_getter found no labels tensor)")
        use_labels = labels is not None and ref.labels is not None and cfg.reads_labels
        stats = self.source_stats if use_labels else None
        if use_labels and self._online_stats:  # a copy: committed only if the flow succeeds
            stats = ClassStats(single_sample=ref.single_sample)
            if self.source_stats is not None:
                stats.merge(self.source_stats)
            stats.update(x, labels)
        n = max(1, math.ceil(strength * cfg.steps - 1e-9))
        tau = cfg.step_size * strength * cfg.steps / n
        run_cfg = cfg.for_labels(use_labels).replace(steps=n, step_size=tau)
        device_key = str(x.device)
        epoch = int(self._epoch.get())
        if epoch != self._warm_epoch:  # warm starts restart every epoch: a resumed epoch flows exactly the same
            self._warm, self._warm_epoch = {}, epoch
        result = run(
            x, labels if use_labels else None, ref, run_cfg, source_stats=stats,
            reference_index=params["reference_index"], generator=torch.Generator().manual_seed(params["flow_seed"]),
            warm=self._warm.get(device_key) if self._warm_usable(params["reference_index"]) else None,
        )
        if use_labels and self._online_stats:
            self.source_stats = stats
        if self._warm_usable(params["reference_index"]):
            self._warm[device_key] = result.warm
        self.last_objective = result.objective  # (T,) when track_objective, else None
        new_labels = labels
        if use_labels and cfg.labels == "flow":
            if self.soft or labels.ndim == 2:
                new_labels = result.soft_labels.to(labels.dtype if labels.is_floating_point() else torch.float32)
            else:
                new_labels = result.labels.to(labels.dtype)
        return {"images": float_to_like(result.x, images), "labels": new_labels, "labels_in": labels}

    def _warm_usable(self, index) -> bool:
        """Solver potentials carry from batch to batch only when the reference points stay the same (the
        whole reference, or one sample per epoch): potentials of another sample describe other points."""
        return self.warm_start and (index is None or self.resample == "epoch")

    def _epoch_sample(self) -> torch.Tensor:
        """The reference sample of the current epoch in this process (drawn at its first batch)."""
        epoch = int(self._epoch.get())
        if self._sample is None or self._sample[0] != epoch:
            m = self.reference.num_samples
            if self.seed is None:  # torch's global RNG, as every other draw without a seed
                index = torch.randperm(m)[: self.reference_size]
            else:  # from (seed, epoch) alone: every worker uses the same sample
                gen = torch.Generator().manual_seed(mix_seed(self.seed, "reference sample", epoch) % (2**63))
                index = torch.randperm(m, generator=gen)[: self.reference_size]
            self._sample = (epoch, index)
        return self._sample[1]

    def extra_repr(self) -> str:
        own = f"reference={self.reference!r}, soft={self.soft}, reference_size={self.reference_size}, " \
              f"resample={self.resample!r}, p={self.p}, " \
              f"strength={self.strength}, seed={self.seed}, warm_start={self.warm_start}"
        return f"{own}, {self.config.describe()}"

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_warm"], state["_sample"] = {}, None  # derived per process
        return state


class FlowCollate:
    """A DataLoader ``collate_fn`` that collates with ``default_collate`` (or ``collate``) and then applies a
    :class:`FlowTransform` to the batch, inside the worker. Picklable (unlike a lambda), so it works with
    every multiprocessing start method.

    Example:
        >>> import torch
        >>> from flowaug import FlowCollate, FlowTransform
        >>> ref = (torch.rand(20, 4), torch.arange(20) % 2)
        >>> data = torch.utils.data.TensorDataset(torch.rand(8, 4), torch.arange(8) % 2)
        >>> loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=FlowCollate(FlowTransform(ref, seed=0)))
        >>> x, y = next(iter(loader))
        >>> x.shape, y.tolist()
        (torch.Size([4, 4]), [0, 1, 0, 1])
    """

    def __init__(self, transform: FlowTransform, collate=None):
        if not callable(transform):
            raise TypeError(f"transform must be callable (a FlowTransform), got {describe(transform)}")
        self.transform, self.collate = transform, collate

    def __call__(self, items):
        from torch.utils.data import default_collate

        return self.transform((self.collate or default_collate)(items))

    def __repr__(self) -> str:
        return f"FlowCollate({self.transform!r})"
