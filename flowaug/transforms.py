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

from ._checks import WarnOnce, check_bool, check_choice, check_int, check_real, describe
from ._shared import AdapterState, strength_property
from .config import FlowConfig, build_config
from .flow import run
from .labels import ClassStats
from .policy import label_plan, pair_classes_by_name
from .reference import Reference, ReferenceLike

__all__ = ["FlowCollate", "FlowTransform", "batch_to_float", "check_soft", "float_to_like", "soft_identity"]

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


def soft_identity(labels: torch.Tensor, reference: Reference) -> torch.Tensor:
    """Unflowed class ids (B,) as the (B, K') soft labels a flowed batch gets with ``soft=True`` (as MixUp always
    returns (B, K)): the flow was the identity, so each point keeps its class. K' is the flowed labels' width,
    the reference's class count (or the batch's, if larger)."""
    ref_width = int(reference.labels.max()) + 1 if reference.labels is not None else 0
    width = max(ref_width, int(labels.max()) + 1 if labels.numel() else 0)
    return torch.nn.functional.one_hot(labels.long(), width).to(torch.float32)


def check_soft(soft, config: FlowConfig) -> bool:
    """The adapters' ``soft``: a bool, and True only where labels flow (fixed labels have no soft form)."""
    if check_bool("soft", soft) and config.labels != "flow":
        raise ValueError("soft=True returns flowed soft labels and needs labels='flow', got labels="
                         f"{config.labels!r}")
    return soft


class FlowTransform(Transform):
    """Move a batch toward a reference dataset along a Wasserstein gradient flow.

    Args:
        reference: the target: a :class:`~flowaug.Reference`, a ``(features, labels)`` pair, a features
            tensor, or a Dataset of (input, label) items. Prepared once (class statistics, norms, scales).
        config: a :class:`~flowaug.FlowConfig` to start from. Options that neither it nor the keywords set
            take this transform's defaults (``steps=5, clamp="auto", track_objective=False``, the rest as
            :func:`~flowaug.flow`), the same way for a config as for keywords; ``repr`` shows what is in force.
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
        classes: names of the batch's classes (index = class id), e.g. the training set's ``.classes``.
            With ``class_map="same"`` and a reference that names its classes too (a Dataset with
            ``.classes``, or ``Reference(..., classes=...)``), classes are paired by name; otherwise by index.
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
        classes=None,
        warm_start: bool = True,
        **options,
    ):
        super().__init__()
        self.reference = Reference.coerce(reference)
        config = build_config(config, TRANSFORM_DEFAULTS, options, "FlowTransform")
        self.config = pair_classes_by_name(config, classes, self.reference.classes)
        if self.config.snapshots is not None:
            raise ValueError("snapshots do not apply to FlowTransform (it returns the moved batch); use flowaug.flow "
                             "or FlowDataset for trajectories")
        self.soft = check_soft(soft, self.config)
        if reference_size is not None:
            reference_size = check_int("reference_size", reference_size, minimum=2)
        self.reference_size = reference_size
        self.resample = check_choice("resample", resample, RESAMPLE)
        self.p = check_real("p", p, low=0, high=1)
        if seed is not None:
            seed = check_int("seed", seed)
        self.seed = seed
        self.state = AdapterState(strength, seed, reference_size)  # strength, epoch, random stream, samples
        if labels_getter != "default" and labels_getter is not None and not callable(labels_getter):
            raise ValueError(f"labels_getter must be 'default', a callable or None, got {describe(labels_getter)}")
        self.labels_getter = labels_getter
        label_plan(self.config, None if labels_getter is None else True, self.reference)  # refuse now, not per batch
        if source_stats is not None and not isinstance(source_stats, ClassStats):
            raise TypeError(f"source_stats must be a ClassStats or None, got {describe(source_stats)}")
        self.source_stats = source_stats
        self._online_stats = source_stats is None
        self.warm_start = check_bool("warm_start", warm_start)
        self._warm: dict = {}
        self._warm_epoch = -1
        self._warn_once = WarnOnce()  # a per-batch transform states each diagnosis once
        self.last_objective: torch.Tensor | None = None

    # ------------------------------------------------------------------ public state
    strength = strength_property("Fraction of the configured flow applied, in [0, 1] (shared with DataLoader workers).")

    def set_epoch(self, epoch: int) -> None:
        """Restart the random stream for ``epoch`` (the ``DistributedSampler.set_epoch`` convention): the
        batches of an epoch then draw the same decisions in any run, resumed or not. Shared with workers."""
        self.state.set_epoch(check_int("epoch", epoch))

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
        gen = self.state.rng.get()
        apply = bool(torch.rand((), generator=gen) < self.p) if self.p < 1 else self.p > 0
        index, m = None, self.reference.num_samples
        if self.state.samples(m):
            index = self.state.epoch_sample(m) if self.resample == "epoch" else self.state.batch_sample(m, gen)
        flow_seed = int(torch.randint(0, 2**62, (), generator=gen))
        return {"apply": apply, "reference_index": index, "flow_seed": flow_seed}

    @torch.compiler.disable  # data-dependent control flow and a solver loop: a graph break, as for a data loader
    def forward(self, *inputs: Any) -> Any:
        """Do not override: flows the batch once and maps the images and labels leaves."""
        inputs = inputs if len(inputs) > 1 else inputs[0]
        flat_inputs, spec = tree_flatten(inputs)
        labels = self._labels_of(inputs)
        image_pos = self._find_images(flat_inputs, labels)
        self._check_batch(flat_inputs[image_pos])
        params = self.make_params(flat_inputs)
        strength = self.strength
        if not params["apply"] or strength == 0 or self.config.steps == 0:
            if self.soft and labels is not None and labels.ndim == 1:  # soft labels have one shape, flowed or not
                soft = soft_identity(labels, self.reference)
                return tree_unflatten([soft if t is labels else t for t in flat_inputs], spec)
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

    def transform(self, inpt: Any, params: dict[str, Any] | None = None) -> Any:
        """torchvision's per-leaf hook (``params`` from :meth:`forward`). Called with a batch alone
        (``t.fit(data).transform(x)``, scikit-learn's idiom) it is the transform itself: ``t(x)``."""
        if params is None:
            return self(inpt)
        return params["labels"] if inpt is params["labels_in"] else params["images"]

    def _apply(self, fn, recurse=True):
        """``t.to(device)``, ``t.to(torch.float64)``, ``t.cuda()``, ``t.double()``, ``t.float()``: the reference moves
        too, and a float32/float64 dtype becomes the flow's computation dtype. Half dtypes (``bf16-true``,
        ``16-true`` in Lightning) leave the flow in float32 (its Sinkhorn and kernel sums need the range; the
        output still takes the caller's dtype). An unusable device fails here, at once, changing nothing."""
        ref = self.reference
        try:
            probe = fn(torch.zeros((), dtype=self.config.dtype, device=ref.device))
        except (RuntimeError, AssertionError) as err:
            raise RuntimeError(f"FlowTransform cannot move to that device: {str(err).splitlines()[0]}") from err
        if probe.device.type == "meta":
            raise RuntimeError("FlowTransform cannot live on the meta device: its reference holds real data")
        dtype = probe.dtype if probe.dtype in (torch.float32, torch.float64) else None  # half: keep computing as is
        reference = ref.to(device=probe.device, dtype=dtype)
        config = self.config if dtype in (None, self.config.dtype) else self.config.replace(dtype=dtype)
        out = super()._apply(fn, recurse)
        self.reference, self.config, self._warm = reference, config, {}
        return out

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

    def _check_batch(self, images: torch.Tensor) -> None:
        """Refuse what cannot be flowed consistently (as MixUp refuses): not a batch, or a batch of one point
        (a one-point measure flows onto the reference's mean, whatever the image)."""
        shape, sample = tuple(images.shape), self.reference.sample_shape
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty batch (B, C, H, W) or (B, D), got shape {shape}")
        if shape == sample or (images.shape[0] == 1 and len(shape) == len(sample)):
            raise ValueError(
                f"FlowTransform is a batch transform (like MixUp), but got one sample of shape {shape} (the "
                f"reference's samples have shape {sample}): flowed alone, a single image lands on the reference's "
                "mean. Apply it to batches: after the DataLoader, or in its collate_fn with flowaug.FlowCollate, "
                "not in a Dataset's per-image transform")
        if images[0].numel() != self.reference.dim:  # before the batch of 1: (1, B, C, H, W) is not a batch of 1
            raise ValueError(
                f"FlowTransform accepts batches of shape (B, *{sample}) or (B, {self.reference.dim}) (the reference's "
                f"samples have shape {sample}), got shape {shape}: {images[0].numel()} values per sample (videos: "
                "pass a reference of videos of the same shape, or flow frames as images with video.flatten(0, 1))"
            )
        if images.shape[0] == 1:
            raise ValueError(
                f"FlowTransform got a batch of 1 (shape {shape}): a one-point measure flows onto the reference's "
                "mean. Use batches of 2 or more (DataLoader(..., drop_last=True) drops a last batch of 1)")

    def _flow(self, images: torch.Tensor, labels, params, strength: float) -> dict:
        x = batch_to_float(images.as_subclass(torch.Tensor))
        ref = self.reference.to(x.device)
        cfg = self.config
        plan = label_plan(cfg, labels, ref)  # the engine's rule: refuses here exactly what flow() refuses
        use_labels = plan.uses_labels
        stats = self.source_stats if use_labels else None
        if use_labels and self._online_stats:  # a copy: committed only if the flow succeeds
            stats = ClassStats(single_sample=ref.single_sample)
            if self.source_stats is not None:
                stats.merge(self.source_stats)
            stats.update(x, labels)
        n = max(1, math.ceil(strength * cfg.steps - 1e-9))
        tau = cfg.step_size * strength * cfg.steps / n
        run_cfg = cfg.replace(steps=n, step_size=tau)
        device_key = str(x.device)
        epoch = self.state.current_epoch()
        if epoch != self._warm_epoch:  # warm starts restart every epoch: a resumed epoch flows exactly the same
            self._warm, self._warm_epoch = {}, epoch
        with self._warn_once():
            result = run(
                x, labels if use_labels else None, ref, run_cfg, source_stats=stats,
                reference_index=params["reference_index"],
                generator=torch.Generator().manual_seed(params["flow_seed"]),
                warm=self._warm.get(device_key) if self._warm_usable(params["reference_index"]) else None,
            )
        if use_labels and self._online_stats:
            self.source_stats = stats
        if self._warm_usable(params["reference_index"]):
            self._warm[device_key] = result.warm
        self.last_objective = result.objective  # (T,) when track_objective, else None
        new_labels = labels
        if plan.labels_move:
            if self.soft or labels.ndim == 2:
                new_labels = result.soft_labels.to(labels.dtype if labels.is_floating_point() else torch.float32)
            else:
                new_labels = result.labels.to(labels.dtype)
        return {"images": float_to_like(result.x, images), "labels": new_labels, "labels_in": labels}

    def _warm_usable(self, index) -> bool:
        """Solver potentials carry from batch to batch only when the reference points stay the same (the
        whole reference, or one sample per epoch): potentials of another sample describe other points."""
        return self.warm_start and (index is None or self.resample == "epoch")

    def extra_repr(self) -> str:
        own = f"reference={self.reference!r}, soft={self.soft}, reference_size={self.reference_size}, " \
              f"resample={self.resample!r}, p={self.p}, " \
              f"strength={self.strength}, seed={self.seed}, warm_start={self.warm_start}"
        return f"{own}, {self.config.describe()}"

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_warm"] = {}  # derived per process
        return state


class FlowCollate:
    """A DataLoader ``collate_fn`` that collates with ``default_collate`` (or ``collate``) and then applies a
    :class:`FlowTransform` to the batch, inside the worker. Picklable (unlike a lambda), so it works with
    every multiprocessing start method. A batch of one is refused (see :class:`FlowTransform`): use
    ``drop_last=True`` when the dataset's size leaves a last batch of one.

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
