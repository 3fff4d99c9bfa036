"""Command line: ``flowaug demo``, ``flowaug flow``, ``flowaug condense``, ``flowaug distance`` (also
``python -m flowaug``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np
import torch

from ._io import atomic_path
from .backends import BACKENDS
from .objectives import OBJECTIVES

__all__ = ["main"]

DATA_HELP = ("folder of datasets as NAME/{train,test}.npz (x uint8 NxHxW, y int64); default $FLOWAUG_DATA, "
             "then ../shared/data; without one, torchvision downloads where the network allows (flowaug demo: "
             "scikit-learn's digits when MNIST is found nowhere)")
SPLIT_HELP = ("split of both datasets; train by default for every command, because the flowed data and the "
              "distance are about the data you train on: keep test for evaluating the result")
LIMIT_HELP = "use at most this many samples of each dataset"
THREADS_HELP = ("torch CPU threads, set before any work and printed; auto: $OMP_NUM_THREADS when set, else all "
                "usable cores but one (at least 1), since one busy core can stall every parallel step "
                "(torch's default of one thread per core ran ~80x slower on a 2-core machine with one core busy)")


CONDENSE_HELP = ("Condense DATASET (a name under --data, a folder with train.npz, or a torchvision name) into --ipc "
                 "images per class by a class-wise flow in fresh random ConvNet embeddings (flowaug.condense); writes "
                 "OUT/condensed.npz and OUT/condensed.png. Resumable: rerun the same command after an interruption.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none (``None``: the help says what happens)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _positive(text: str, expected: str) -> int:
    """``text`` as an integer >= 1, else argparse's error saying what was ``expected``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _threads_arg(text: str) -> int | str:
    return text if text == "auto" else _positive(text, "a positive integer or 'auto'")


def _size_arg(text: str) -> int:
    return _positive(text, "one or two positive integers (N or H W)")


class _LimitAction(argparse.Action):
    """``--limit`` and its deprecated alias ``--max-samples`` (distance): one setting, a notice for the old name."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--max-samples":
            print("flowaug distance: --max-samples is deprecated, use --limit (same meaning)", file=sys.stderr,
                  flush=True)
        setattr(namespace, self.dest, values)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _set_threads(choice: int | str, command: str) -> int:
    """Apply ``--threads`` before any work and say what was chosen (on stderr: stdout stays the result)."""
    cores = _usable_cores()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if choice != "auto":
        threads, why = int(choice), "--threads"
    elif env.isdigit() and int(env) >= 1:
        threads, why = int(env), "$OMP_NUM_THREADS"
    else:
        threads = max(1, cores - 1)
        why = "auto: 1 usable core" if cores == 1 else f"auto: {cores} usable cores, one left free"
    torch.set_num_threads(threads)
    note = "; more threads than cores run slower" if threads > cores else ""
    print(f"flowaug {command}: {threads} torch thread{'s' if threads != 1 else ''} ({why}{note})",
          file=sys.stderr, flush=True)
    return threads


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="flowaug",
        description="Move a dataset toward a reference dataset along Wasserstein gradient flows (OTDD flows).",
        epilog="Run 'flowaug COMMAND --help' for the options of a command.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"flowaug {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", help=DATA_HELP)
    common.add_argument("--threads", metavar="N", type=_threads_arg, default="auto", help=THREADS_HELP)

    def command(name, **kwargs):
        return sub.add_parser(name, parents=[common], formatter_class=_HelpFormatter, **kwargs)

    d = command("demo", help="adapt a model to rotating digits from two snapshots, condense a dataset; report "
                             "what each gives next to its baselines (offline OK)",
                description="1. Gradual adaptation: a model trained on upright digits follows a rotation to 60 "
                            "degrees from two unlabelled snapshots (source only, GOAT's path, flowaug, and the "
                            "all-real-intermediates oracle, marked as one). 2. Condensation: 10 images per class "
                            "by flowaug.condense, next to random real images and distribution matching at the "
                            "same step, each scored by a ConvNet trained on it. Writes pictures and a report.")
    d.add_argument("--out", metavar="DIR", default="flowaug_outputs/demo", help="output folder")

    f = command("flow", help="flow a dataset toward a reference; write the flowed dataset (npz) and a picture",
                description="Flow SOURCE toward REFERENCE and write OUT/flowed.npz (x uint8, y int64) and "
                            "OUT/flow.png. Datasets are names of npz folders under --data or torchvision "
                            "names (mnist, usps, fashionmnist, kmnist).")
    f.add_argument("source", help="dataset to move, e.g. mnist")
    f.add_argument("reference", help="dataset to move toward, e.g. usps")
    f.add_argument("--split", default="train", choices=["train", "test"], help=SPLIT_HELP)
    f.add_argument("--limit", type=int, default=2000, help=LIMIT_HELP)
    f.add_argument("--steps", type=int, default=10, help="Euler steps")
    f.add_argument("--step-size", type=float, default=0.5, help="step size tau")
    f.add_argument("--objective", default="sinkhorn", choices=list(OBJECTIVES),
                   help="functional whose Wasserstein gradient flow is followed (flowaug.objectives.OBJECTIVES: otdd "
                        "is sinkhorn, gaussian is mmd, linear matches the means)")
    f.add_argument("--labels", default="fixed", choices=["fixed", "flow"], help="keep labels or flow them too")
    f.add_argument("--class-map", default=None, choices=["same", "ot"],
                   help="flow each class toward one reference class: 'same' label set, or paired by OT "
                        "(default: one joint flow)")
    f.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="dense torch, dense in row blocks (bounded memory) or KeOps; auto: by device and memory")
    f.add_argument("--seed", type=int, default=0, help="seed of the subsampling and the flow's randomness")
    f.add_argument("--out", metavar="DIR", default="flowaug_outputs/flow", help="output folder")

    _condense_arguments(command("condense", help="synthesize a few images per class that train like the dataset "
                                                 "(npz + picture)", description=CONDENSE_HELP))

    t = command("distance", help="OTDD between two labeled datasets (symmetric: the order does not matter)",
                description="Optimal transport dataset distance (debiased Sinkhorn divergence in the "
                            "label-aware space; geomloss's halved squared cost). Symmetric: both datasets are "
                            "compared at one common image size, subsampled alike and the automatic blur is "
                            "taken from both. Prints one JSON object whose 'fields' entry explains every field.")
    t.add_argument("a", help="first dataset, e.g. mnist")
    t.add_argument("b", help="second dataset, e.g. usps")
    t.add_argument("--split", default="train", choices=["train", "test"], help=SPLIT_HELP)
    t.add_argument("--limit", "--max-samples", dest="limit", type=int, default=2000, action=_LimitAction,
                   help=LIMIT_HELP + " (--max-samples: deprecated alias)")
    t.add_argument("--size", metavar="N", nargs="+", type=_size_arg, default=None,
                   help="common image size, N (square) or H W; both datasets are resized to it (said on stderr). "
                        "Default: the larger height and the larger width of the two datasets")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of the subsampling; each dataset is drawn with it alone, whatever its position")
    t.add_argument("--label-weight", type=float, default=1.0, help="lambda on the label term (0: features only)")
    t.add_argument("--covariance", default="diag", choices=["diag", "full"],
                   help="class Gaussians with diagonal or full covariances (Bures term)")
    return p



def _condense_arguments(c: argparse.ArgumentParser) -> None:
    """The options of ``flowaug condense`` (flowaug.condense's, with its defaults)."""
    c.add_argument("dataset", help="dataset to condense, e.g. mnist")
    c.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    c.add_argument("--objective", default="mean+mmd", choices=["mean+mmd", "sinkhorn", "mmd", "linear"],
                   help="in the embedding: class means and distributions (mean+mmd, chosen on validation), whole "
                        "class distributions (sinkhorn, mmd) or class means (linear: distribution matching)")
    c.add_argument("--iterations", type=int, default=1000, help="flow steps")
    c.add_argument("--step-size", type=float, default=None,
                   help="step size tau (default 4 / ipc: twice distribution matching's per-image step at lr 1)")
    c.add_argument("--real-per-class", type=int, default=256, help="real images embedded per class and step")
    c.add_argument("--width", type=int, default=128, help="width of the random ConvNet-3")
    c.add_argument("--seed", type=int, default=0, help="seeds the initial images, networks and augmentations")
    c.add_argument("--out", metavar="DIR", default="flowaug_outputs/condense", help="output folder")


def _images(name, split, data, limit, seed):
    from .data import load_dataset

    x, y = load_dataset(name, split, data_dir=data)
    if limit is not None and len(x) > limit:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        x, y = x[idx], y[idx]
    return x.float() / 255, y


def _match_size(x, like):
    from .data import resize_images

    return resize_images(x, tuple(like.shape[-2:])) if x.shape[-2:] != like.shape[-2:] else x


def cmd_flow(args) -> int:
    from .flow import flow
    from .plotting import image_grid

    sx, sy = _images(args.source, args.split, args.data, args.limit, args.seed)
    rx, ry = _images(args.reference, args.split, args.data, args.limit, args.seed + 1)
    if rx.shape[-2:] != sx.shape[-2:]:  # the flow moves the source in its own size: the reference is resized
        print(f"flowaug flow: resizing the reference ({args.reference}) from {rx.shape[-2]}x{rx.shape[-1]} to "
              f"{sx.shape[-2]}x{sx.shape[-1]}, the source's size", file=sys.stderr)
    rx = _match_size(rx, sx)
    out = flow(sx, sy, (rx, ry), objective=args.objective, steps=args.steps, step_size=args.step_size,
               labels=args.labels, class_map=args.class_map, backend=args.backend, clamp=(0.0, 1.0),
               snapshots=5, progress=True, generator=torch.Generator().manual_seed(args.seed))
    os.makedirs(args.out, exist_ok=True)
    x8 = (out.x * 255).round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
    with atomic_path(os.path.join(args.out, "flowed.npz")) as tmp:
        np.savez_compressed(tmp, x=x8, y=out.labels.long().numpy())
    rows = out.trajectory + [rx]
    labels = [f"t = {t:g}" for t in out.trajectory_times] + ["reference"]
    image_grid(rows, os.path.join(args.out, "flow.png"), row_labels=labels, title=f"{args.source} -> {args.reference}")
    print(f"objective {out.objective[0]:.4g} -> {out.objective[-1]:.4g} in {args.steps} steps ({out.backend})")
    print(f"wrote {os.path.join(args.out, 'flowed.npz')} and {os.path.join(args.out, 'flow.png')}")
    return 0


DISTANCE_FIELDS = {
    "a": "first dataset (argument a)",
    "b": "second dataset (argument b)",
    "split": "split of both datasets",
    "size": "common image size [H, W] both datasets were compared at (--size; default: the larger height and "
            "width of the two; a dataset of another size is resized, bilinear and antialiased)",
    "samples": "samples used of each dataset, {a, b} (at most --limit, drawn with --seed alone)",
    "seed": "seed of the subsampling",
    "label_weight": "lambda, the weight of the label term (0: features only)",
    "covariance": "class Gaussians with 'diag' (isometric embedding) or 'full' (Bures-Wasserstein) covariances",
    "blur": "entropic blur in data units: 0.2 x the mean of the two datasets' median pairwise distances",
    "otdd": "debiased Sinkhorn divergence with geomloss's halved squared cost ||x - x'||^2 / 2 + "
            "lambda^2 W2^2(y, y') / 2; squared data units (pixels in [0, 1]); symmetric in a and b",
    "distance": "sqrt(2 * otdd): in data units, pixels in [0, 1] (the root of the full squared cost)",
    "fields": "what each field is",
}


def _load_arg(which: str, name: str, split: str, data, limit: int, seed: int):
    """One dataset of ``flowaug distance``, its load errors naming the argument."""
    from ._checks import check_labels

    try:
        x, y = _images(name, split, data, limit, seed)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"argument {which} ({name!r}): {err}") from None
    if x.ndim != 4 or len(x) < 2:
        raise ValueError(f"argument {which} ({name!r}): expected at least 2 images (N, C, H, W), "
                         f"got shape {tuple(x.shape)}")
    try:
        check_labels("its labels y", y, len(x), allow_soft=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"argument {which} ({name!r}): {err}") from None
    return x, y


def cmd_distance(args) -> int:
    from .data import resize_images
    from .distance import auto_blur, otdd

    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"argument --data: expected an existing folder of datasets, got {args.data!r}")
    # each dataset is drawn by its own generator seeded with --seed alone: its sample ignores its position
    a, ya = _load_arg("a", args.a, args.split, args.data, args.limit, args.seed)
    b, yb = _load_arg("b", args.b, args.split, args.data, args.limit, args.seed)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"arguments a and b must have the same number of channels, got {args.a!r} with "
                         f"{a.shape[1]} and {args.b!r} with {b.shape[1]}")
    if args.size is None:
        size = (max(a.shape[2], b.shape[2]), max(a.shape[3], b.shape[3]))
        how = "the larger of the two; --size to choose"
    else:
        size = (args.size[0], args.size[-1])
        how = "--size"
    for which, name, x in (("a", args.a, a), ("b", args.b, b)):
        if tuple(x.shape[-2:]) != size:
            print(f"flowaug distance: resizing {which} ({name}) from {x.shape[2]}x{x.shape[3]} to "
                  f"{size[0]}x{size[1]}, the common size ({how})", file=sys.stderr, flush=True)
    a, b = resize_images(a, size), resize_images(b, size)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone (pykeops prints a CUDA notice there)
        blur = auto_blur(a, b)
        value = otdd(a, ya, b, yb, blur=blur, label_weight=args.label_weight, covariance=args.covariance,
                     max_samples=None, seed=args.seed)
    print(json.dumps({
        "a": args.a, "b": args.b, "split": args.split, "size": list(size), "samples": {"a": len(a), "b": len(b)},
        "seed": args.seed, "label_weight": args.label_weight, "covariance": args.covariance, "blur": blur,
        "otdd": value, "distance": (2 * max(value, 0)) ** 0.5, "fields": DISTANCE_FIELDS,
    }))
    return 0


def cmd_condense(args) -> int:
    from .condense import condense
    from .data import load_dataset

    if os.path.isfile(os.path.join(args.dataset, "train.npz")):
        data, name = args.dataset, os.path.basename(os.path.abspath(args.dataset))
    else:
        data, name = load_dataset(args.dataset, "train", data_dir=args.data), args.dataset
    os.makedirs(args.out, exist_ok=True)
    syn = condense(data, args.ipc, objective=args.objective, iterations=args.iterations, step_size=args.step_size,
                   real_per_class=args.real_per_class, width=args.width, seed=args.seed,
                   checkpoint=os.path.join(args.out, "checkpoint.pt"))
    npz, png = os.path.join(args.out, "condensed.npz"), os.path.join(args.out, "condensed.png")
    syn.save(npz)
    syn.grid(png, title=f"{name}: {args.ipc} synthetic images per class ({args.objective} flow)")
    print(f"condensed {name} to {len(syn)} images ({syn.info['seconds_per_iteration']:.3f} s per iteration)")
    print(f"wrote {npz} and {png}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.data, args.out)
    a, c = report["gradual"], report["condensation"]
    print(f"gradual adaptation, {a['data']} rotating 0 -> {a['angle']:.0f} degrees, two unlabelled snapshots: "
          "accuracy on the rotated test digits")
    for name, acc in a["accuracy"].items():
        print(f"  {name}: {acc:.1f}%")
    print(f"condensation, {c['images_per_class']} images per class ({c['data']}): test accuracy of a ConvNet "
          "trained on")
    for name, acc in c["accuracy"].items():
        print(f"  {name}: {acc:.1f}%")
    print(f"wrote {args.out}/report.md and pictures ({report['seconds']:.0f} s)")
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    sub = next(a for a in parser._actions if a.dest == "command").choices[args.command]
    lows = {"steps": 0, "seed": 0, "limit": 2 if args.command == "distance" else 1, "ipc": 1, "iterations": 0,
            "real_per_class": 2, "width": 1}
    for name, low in lows.items():  # --limit: also its deprecated alias --max-samples (same dest)
        value = getattr(args, name, None)
        if value is not None and value < low:
            want = {0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")
            sub.error(f"argument --{name.replace('_', '-')}: expected {want}, got {value}")
    step_size = getattr(args, "step_size", None)
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        sub.error(f"argument --step-size: expected a finite number > 0, got {step_size}")
    label_weight = getattr(args, "label_weight", 0.0)
    if not (math.isfinite(label_weight) and label_weight >= 0):
        sub.error(f"argument --label-weight: expected a finite number >= 0 (0: features only), got {label_weight}")
    size = getattr(args, "size", None)
    if size is not None and len(size) > 2:
        sub.error(f"argument --size: expected one or two positive integers (N or H W), got {len(size)} values")
    _set_threads(args.threads, args.command)
    try:
        return {"demo": cmd_demo, "flow": cmd_flow, "distance": cmd_distance,
                "condense": cmd_condense}[args.command](args)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"flowaug {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
