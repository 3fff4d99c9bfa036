"""FlowConfig: every option of a flow, declared, validated and fingerprinted in one place.

:func:`flowaug.flow` builds one from its keyword arguments; :class:`~flowaug.FlowTransform` and
:class:`~flowaug.FlowDataset` hold one (``t.config``) and add only their own concerns (probability,
reference sampling, labels getter; chunking, cache). A config is frozen: ``config.replace(steps=3)``
returns a new, re-validated one. ``config.fingerprint()`` is a content hash that is stable across
processes and Python sessions (it hashes the *code* of user callables, never their memory address), used
in on-disk cache keys.

Example:
    >>> from flowaug import FlowConfig
    >>> cfg = FlowConfig(steps=4, snapshots=3)
    >>> cfg.snapshot_steps()
    [0, 2, 4]
    >>> cfg.replace(step_size=0.5).step_size
    0.5
    >>> FlowConfig(steps=-1)
    Traceback (most recent call last):
    ...
    ValueError: steps must be an int >= 0, got -1
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import types
from dataclasses import dataclass

import torch

from . import backends
from ._checks import check_bool, check_choice, check_int, check_real, describe
from .objectives import Objective, as_objective

__all__ = ["FlowConfig", "LABEL_MODES", "DECODERS", "CLASS_MAPS", "fingerprint", "build_config"]

LABEL_MODES = ("fixed", "flow")
DECODERS = ("point", "class")
CLASS_MAPS = ("same", "ot")
DTYPES = (torch.float32, torch.float64)


def _remember_given(cls):
    """Wrap the dataclass ``__init__`` so that a config remembers which options its caller gave (``given``).

    An adapter fills the options *not* given with its own defaults (:meth:`FlowConfig.with_defaults`), so
    ``FlowTransform(ref, FlowConfig(objective="mmd"))`` and ``FlowTransform(ref, objective="mmd")`` are the
    same transform. A sentinel default would hide the real defaults from ``help()`` and signatures.
    """
    init, signature = cls.__init__, inspect.signature(cls.__init__)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        given = signature.bind(self, *args, **kwargs).arguments  # TypeError for unknown options, as before
        object.__setattr__(self, "_given", frozenset(given) - {"self"})
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_remember_given
@dataclass(frozen=True)
class FlowConfig:
    """The options of a flow (see :func:`flowaug.flow` for their meaning).

    ``clamp`` accepts ``"auto"`` (the reference's value range, resolved by the engine), ``class_map`` a
    (K,) integer tensor (stored as a tuple of ints, so that configs compare and hash by value) and
    ``snapshots`` a list of steps, a count of evenly spaced steps or ``"all"`` (kept as given; parsed by
    :meth:`snapshot_steps`, the one rule every caller uses).

    A config remembers which options it was given (:attr:`given`); an adapter fills the others with its own
    defaults. Use :meth:`replace` for variants (``dataclasses.replace`` would mark every option as given).
    Equality, hashing and :meth:`fingerprint` compare the options' values only: ``FlowConfig()`` equals
    ``FlowConfig(steps=10)``, though an adapter gives the first its own ``steps``.
    """

    objective: Objective | str = "sinkhorn"
    steps: int = 10
    step_size: float = 1.0
    labels: str = "fixed"
    label_weight: float = 1.0
    decode: str = "point"
    soft_temperature: float | None = None
    class_map: str | tuple[int, ...] | torch.Tensor | None = None
    momentum: float = 0.0
    clamp: tuple[float, float] | str | None = None
    backend: str = "auto"
    dtype: torch.dtype = torch.float32
    snapshots: int | str | tuple[int, ...] | list[int] | None = None
    guard: bool = True
    track_objective: bool = True

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)  # frozen: normalised values are written once, here
        set_("objective", as_objective(self.objective))
        set_("steps", check_int("steps", self.steps))
        set_("step_size", check_real("step_size", self.step_size, low=0, low_open=True))
        set_("labels", check_choice("labels", self.labels, LABEL_MODES))
        set_("label_weight", check_real("label_weight", self.label_weight, low=0))
        set_("decode", check_choice("decode", self.decode, DECODERS))
        if self.soft_temperature is not None:
            set_("soft_temperature", check_real("soft_temperature", self.soft_temperature, low=0, low_open=True))
        set_("class_map", _check_class_map(self.class_map))
        set_("momentum", check_real("momentum", self.momentum, low=0, high=1, high_open=True))
        set_("clamp", _check_clamp(self.clamp))
        set_("backend", check_choice("backend", self.backend, backends.BACKENDS))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype!r}")
        set_("snapshots", _check_snapshots(self.snapshots, self.steps))
        set_("guard", check_bool("guard", self.guard))
        set_("track_objective", check_bool("track_objective", self.track_objective))

    # ------------------------------------------------------------------ derived
    def snapshot_steps(self) -> list[int]:
        """Sorted steps at which the flow keeps its state: ``None`` -> none, ``k`` -> ``k`` evenly spaced
        steps from 0 to ``steps`` (``1`` -> the last), ``"all"`` -> every step, a list -> those steps."""
        s, n = self.snapshots, self.steps
        if s is None:
            return []
        if s == "all":
            return list(range(n + 1))
        if isinstance(s, int):
            return sorted({round(i * n / (s - 1)) for i in range(s)}) if s > 1 else [n]
        return sorted(set(s))

    def class_map_tensor(self, device=None) -> torch.Tensor | None:
        """The explicit class map as a (K,) int64 tensor (None for ``"same"``, ``"ot"`` or no map)."""
        if isinstance(self.class_map, tuple):
            return torch.tensor(self.class_map, dtype=torch.long, device=device)
        return None

    @property
    def given(self) -> frozenset:
        """Names of the options the caller set (the others hold :class:`FlowConfig`'s defaults)."""
        return getattr(self, "_given", frozenset(self.options()))  # configs pickled before 0.2: all given

    def replace(self, **changes) -> "FlowConfig":
        """A new config with ``changes`` applied, validated like the original; the options this one was
        given and ``changes`` count as given."""
        unknown = sorted(set(changes) - set(self.options()))
        if unknown:
            raise TypeError(f"unknown FlowConfig option(s) {unknown}; options are {self.options()}")
        return FlowConfig(**{**{name: getattr(self, name) for name in self.given}, **changes})

    def with_defaults(self, defaults: dict) -> "FlowConfig":
        """This config with ``defaults`` for the options it was not given (how an adapter's defaults, e.g.
        ``FlowTransform``'s ``steps=5, clamp="auto"``, apply the same way to a config and to keywords)."""
        missing = {k: v for k, v in defaults.items() if k not in self.given}
        return self.replace(**missing) if missing else self

    @classmethod
    def options(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def fingerprint(self) -> str:
        """Content hash of every option (user callables by their code, constants and captured values)."""
        return fingerprint([(name, getattr(self, name)) for name in self.options()])

    def describe(self) -> str:
        """``name=value`` of every option, for ``repr``/``extra_repr`` of the objects that hold a config."""
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.options())


def build_config(config: FlowConfig | None, defaults: dict, options: dict, owner: str) -> FlowConfig:
    """The one way a flow is configured: ``config`` (or an empty one) with the keyword ``options`` applied
    over it, then ``defaults`` (the caller's: :func:`flowaug.flow` has none, the adapters a few) for every
    option neither set. ``owner`` names the caller in errors."""
    if config is not None and not isinstance(config, FlowConfig):
        raise TypeError(f"{owner}: config must be a FlowConfig or None, got {describe(config)}")
    unknown = sorted(set(options) - set(FlowConfig.options()))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {unknown}; flow options are {FlowConfig.options()}")
    base = config if config is not None else FlowConfig()
    return (base.replace(**options) if options else base).with_defaults(defaults)


# ---------------------------------------------------------------------- validation helpers
def _check_class_map(value):
    if value is None:
        return None
    if isinstance(value, str):
        return check_choice("class_map", value, CLASS_MAPS)
    if (isinstance(value, torch.Tensor) and value.ndim == 1 and not value.is_floating_point()
            and value.dtype != torch.bool and value.numel() > 0):
        if int(value.min()) < 0:
            raise ValueError(f"class_map must hold reference class ids >= 0, got {value.tolist()}")
        return tuple(int(v) for v in value)
    if isinstance(value, tuple) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                  for v in value):
        return value
    raise TypeError(f"class_map must be None, 'same', 'ot' or a 1-D integer tensor, got {describe(value)}")


def _check_clamp(value):
    if value is None:
        return None
    if isinstance(value, str):
        return check_choice("clamp", value, ("auto",))
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"clamp must be None, 'auto' or a (low, high) pair, got {describe(value)}")
    low = check_real("clamp[0]", value[0])
    return (low, check_real("clamp[1]", value[1], low=low))


def _check_snapshots(value, steps: int):
    if value is None or value == "all":
        return value
    if isinstance(value, str):
        raise ValueError(f"snapshots must be None, 'all', a count or a list of steps, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool):
        return check_int("snapshots", value, minimum=1)
    if not isinstance(value, (list, tuple, range)):
        raise TypeError(f"snapshots must be None, 'all', a count or a list of steps, got {describe(value)}")
    out = tuple(check_int("snapshots entry", s) for s in value)
    if any(s > steps for s in out):
        raise ValueError(f"snapshots must be steps in [0, {steps}], got {max(out)}")
    return out


# ---------------------------------------------------------------------- fingerprints
def fingerprint(value) -> str:
    """A hex digest of ``value`` that is stable across processes: numbers, strings, tensors (by content),
    containers, objectives (by type and attributes) and functions (by code, defaults and closure)."""
    h = hashlib.blake2b(digest_size=16)
    _feed(h, value, depth=0)
    return h.hexdigest()


def _feed(h, value, depth: int) -> None:
    if depth > 12:
        raise ValueError("cannot fingerprint a value nested more than 12 levels deep (a cycle?)")
    tag = type(value).__qualname__
    h.update(f"<{type(value).__module__}.{tag}>".encode())
    if value is None or value is Ellipsis or isinstance(
            value, (bool, int, float, complex, str, bytes, slice, range, torch.dtype, torch.device)):
        h.update(repr(value).encode())
    elif isinstance(value, (set, frozenset)):
        for digest in sorted(fingerprint(v) for v in value):  # order-free
            h.update(digest.encode())
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    elif isinstance(value, (list, tuple)):
        for v in value:
            _feed(h, v, depth + 1)
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            _feed(h, k, depth + 1)
            _feed(h, value[k], depth + 1)
    elif isinstance(value, (types.FunctionType, types.MethodType)):
        _feed_function(h, value, depth)
    elif isinstance(value, types.CodeType):
        h.update(value.co_code)
        _feed(h, tuple(c for c in value.co_consts), depth + 1)
        _feed(h, value.co_names, depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        if isinstance(value, torch.nn.Module):
            _feed(h, {k: v for k, v in value.state_dict().items()}, depth + 1)
        _feed(h, {k: v for k, v in vars(value).items() if not k.startswith("_") or k == "_terms"}, depth + 1)
    elif isinstance(value, type):
        h.update(f"{value.__module__}.{value.__qualname__}".encode())
    else:
        raise ValueError(f"cannot fingerprint {describe(value)}: give it a stable repr or keep it out of the config")


def _feed_function(h, fn, depth: int) -> None:
    if isinstance(fn, types.MethodType):
        _feed(h, fn.__self__, depth + 1)
        fn = fn.__func__
    h.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    _feed(h, fn.__code__, depth + 1)
    _feed(h, fn.__defaults__, depth + 1)
    cells = fn.__closure__ or ()
    _feed(h, [c.cell_contents for c in cells], depth + 1)
    for name in fn.__code__.co_names:  # globals the body reads (attribute names are not in __globals__)
        if name in fn.__globals__:
            value = fn.__globals__[name]
            h.update(name.encode())
            if not isinstance(value, (types.ModuleType, types.BuiltinFunctionType, type)) and value is not fn:
                _feed(h, value, depth + 1)
