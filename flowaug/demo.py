"""``flowaug demo``: what flowaug is for, on real digits, in about two minutes on a 2-core CPU.

1. **Gradual adaptation** (the lead, :mod:`flowaug.demo_gradual`): a model trained on upright digits follows a
   rotation to 60 degrees from two unlabelled snapshots; source only, GOAT's exact-plan path, flowaug's
   :func:`flowaug.gradual.adapt` and the all-real-intermediates oracle (marked as one), each scored on the rotated
   test digits; a picture of flowaug's generated path. ``benchmarks/gradual.py`` is the paired comparison.
2. **Dataset condensation**: 10 synthetic images per class made by :func:`flowaug.condense`, next to 10 random
   real images per class and to distribution matching run through the same code at the recipe's step
   (``objective="linear"``: a fair step, since most of the recipe's old edge over DM was its larger step); a
   ConvNet trained on each 100-image set is scored on the test split. MNIST when found, else scikit-learn's
   digits. Demo-sized (width 32, 60 iterations, 120 evaluation epochs, one seed); ``benchmarks/condense.py`` is the paired comparison.

Re-purposing a frozen classifier is not in the demo: putting USPS into MNIST's frame alone takes a frozen model
from 46.5 to 91.0 %, and no label-free flow added to that (``benchmarks/repurpose.py``).
"""

from __future__ import annotations

import json
import os
import time

import torch

from ._io import atomic_path
from .demo_gradual import _say, demo_digits, gradual_section
from .plotting import image_grid

__all__ = ["condense_section", "run_demo"]

def _load_condense(data_dir, progress):
    """(name, train, test) for the condensation section: MNIST if found, else scikit-learn's digits halves."""
    name, (x, y), (xt, yt) = demo_digits(data_dir, 1200, seed=0)
    name = ("MNIST (60,000 train digits; scored on the 10,000 test digits)" if name == "MNIST" else
            f"scikit-learn digits ({len(x):,} train, {len(xt)} test)")
    mean, std = x.mean(), x.std()  # the practitioner's normalisation, as in the DC/DSA/DM code
    _say(progress, f"condensation: {name}")
    return name, ((x - mean) / std, y), ((xt - mean) / std, yt), (mean, std)


def condense_section(data_dir, out_dir: str, progress: bool = True, *, ipc: int = 10, iterations: int = 60,
                     width: int = 32, epochs: int = 120) -> dict:
    """Condense to ``ipc`` images per class three ways and score a ConvNet trained on each (same seed)."""
    from .condense import _initial, condense, evaluate_synthetic

    name, train, test, (mean, std) = _load_condense(data_dir, progress)
    common = {"iterations": iterations, "real_per_class": 64, "width": width, "seed": 0, "progress": progress,
              "checkpoint_every": iterations}
    sets = {"random real images": _initial(*train, ipc, "real", 0)}
    _say(progress, f"distribution matching at the recipe's step (mean of each class in random embeddings), "
                   f"{iterations} iterations")
    dm = condense(train, ipc, objective="linear", **common)  # the recipe's step: DM at a fair step
    sets["distribution matching"] = (dm.images, dm.labels)
    _say(progress, f"flowaug condense (class means and distributions in random embeddings), {iterations} iterations")
    fa = condense(train, ipc, **common)  # the defaults: the recipe chosen on validation (benchmarks/condense.py)
    sets["flowaug condense"] = (fa.images, fa.labels)
    accuracy_of = {}
    for method, data in sets.items():
        _say(progress, f"training a ConvNet-3 on {len(data[0])} images: {method}")
        accuracy_of[method] = evaluate_synthetic(data, test, width=width, epochs=epochs, seed=0)
    k = int(train[1].max()) + 1
    rows = [torch.stack([d[0][d[1] == c][0] for c in range(k)]) * std + mean for d in sets.values()]
    os.makedirs(out_dir, exist_ok=True)
    grid = image_grid(rows, os.path.join(out_dir, "condensed.png"), row_labels=[m.split(" (")[0] for m in sets],
                      columns=k, title=f"{ipc} images per class: the first of each class")
    return {"data": name, "images_per_class": ipc, "iterations": iterations, "width": width, "epochs": epochs,
            "accuracy": accuracy_of, "file": grid}


def run_demo(data_dir: str | None = None, out_dir: str = "flowaug_outputs/demo", progress: bool = True,
             condensation: bool = True, gradual: bool = True) -> dict:
    """Run the demo; returns the report (also written to ``out_dir/report.json`` and ``report.md``).

    The caller's random stream is left as it was."""
    t0 = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        adapted = gradual_section(data_dir, out_dir, progress) if gradual else None
        condensed = condense_section(data_dir, out_dir, progress) if condensation else None
    _say(progress, f"writing the report to {out_dir}/")
    os.makedirs(out_dir, exist_ok=True)
    report = {"gradual": adapted, "condensation": condensed, "seconds": time.time() - t0}
    with atomic_path(os.path.join(out_dir, "report.json")) as tmp, open(tmp, "w") as handle:
        json.dump(report, handle, indent=1)
    lines = ["# flowaug demo", ""] + _gradual_lines(adapted) + _condense_lines(condensed) + [
        f"Took {report['seconds']:.0f} s."]
    with atomic_path(os.path.join(out_dir, "report.md")) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return report


def _gradual_lines(adapted: dict | None) -> list[str]:
    if not adapted:
        return []
    a = adapted
    return [f"## Gradual adaptation: {a['data']} rotating 0 -> {a['angle']:.0f} degrees, two unlabelled snapshots",
            "", f"One source model, adapted four ways ({a['epochs_per_domain']} epochs per domain, one seed, "
            "demo-sized); accuracy on the rotated test digits. `benchmarks/gradual.py` has the paired comparison.",
            "", "| walk | target test accuracy |", "|---|---|"] + \
        [f"| {m} | {v:.1f}% |" for m, v in a["accuracy"].items()] + ["", f"Picture: {os.path.basename(a['file'])}.",
                                                                        ""]


def _condense_lines(condensed: dict | None) -> list[str]:
    if not condensed:
        return []
    c = condensed
    return [f"## Dataset condensation: {c['data']}", "",
            f"{c['images_per_class']} images per class, made three ways; a ConvNet-3 (width {c['width']}) trained "
            f"{c['epochs']} epochs on each with DSA, scored on the test split (one seed; demo-sized: "
            f"{c['iterations']} condensation iterations). `benchmarks/condense.py` has the paired comparison.", "",
            "| training set | test accuracy |", "|---|---|"] + \
        [f"| {m} | {a:.1f}% |" for m, a in c["accuracy"].items()] + ["", f"Picture: {os.path.basename(c['file'])}.", ""]
