"""``flowaug demo``: what flowaug gives, on real digits, in about two minutes on a 2-core CPU.

1. **Dataset condensation** (the lead): 10 synthetic images per class made by :func:`flowaug.condense` (a
   class-wise flow of class means and distributions in fresh random ConvNet embeddings, the recipe chosen on
   validation by ``benchmarks/condense.py``), next to 10 random real images per class and to distribution
   matching (the same flow with mean matching, ``objective="linear"``); a ConvNet trained on each 100-image set
   is scored on the full test split. MNIST when found, else scikit-learn's digits. A demo-sized protocol
   (width 32, 100 iterations, one seed); ``benchmarks/condense.py`` is the paired comparison.
2. **Re-purposing a frozen classifier**: with MNIST and USPS available (``--data DIR``, ``$FLOWAUG_DATA``,
   ``../shared/data``, or a torchvision download), a LeNet-5 is trained on 5,000 MNIST digits and frozen; the
   USPS test set (resized to 28x28) is flowed toward those MNIST digits, and the frozen model's accuracy
   against the true USPS labels is measured along the flow, for an unlabeled flow (no USPS labels used) and a
   class-wise flow steered by the USPS labels it is scored on (an oracle). Offline with nothing given, the same
   runs on scikit-learn's 8x8 digits: a classifier is trained on one half, the other half is shifted by a
   fixed, stated transformation, and flowed back. Writes an image grid along the flow, accuracy and objective
   curves, the condensed images, and a short report.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._io import atomic_path
from .data import find_data_dir, load_dataset, resize_images
from .flow import flow
from .objectives import Sinkhorn
from .plotting import image_grid, objective_curve

__all__ = ["MLP", "LeNet5", "accuracy", "condense_section", "run_demo", "shift_digits", "train_classifier"]

#: the label-steered flow is scored against the labels that steer it: an upper bound, not a method
ORACLE = "class-wise flow (true labels used: oracle)"


class LeNet5(nn.Module):
    """LeNet-5 as in Bonet, Vauthier & Korba (2025)'s code: the first convolution is 1x1 (``first=1``).

    ``first=5`` gives the standard LeNet-5 (5x5 first convolution, padding 2). Input (N, 1, 28, 28).
    """

    def __init__(self, first: int = 1, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, first, padding=(first - 1) // 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, classes)

    def forward(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 14, 14)
        x = F.avg_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 5, 5)
        x = F.relu(self.conv3(x)).flatten(1)  # (N, 120)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Module):
    """A small classifier for flat features (scikit-learn's 8x8 digits)."""

    def __init__(self, dim: int, classes: int = 10, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float = 3e-4,
                     batch_size: int = 64, seed: int = 0, weight_decay: float = 0.01,
                     progress: bool = False) -> nn.Module:
    """AdamW, shuffled mini-batches; returns the model in eval mode. ``progress``: a bar over epochs (with the
    last batch's loss), updated from the first batch on."""
    from tqdm.auto import tqdm

    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty and of the same length, got {len(x)} inputs and {len(y)} labels")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = tqdm(total=epochs * ((len(x) + batch_size - 1) // batch_size), desc="training classifier", unit="batch",
               disable=not progress, leave=False)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            b = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
        bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def per_class(x, y, k, seed):
    """The first ``k`` samples of each class after a seeded shuffle."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:k]]
           for c in torch.unique(y).tolist()]
    idx = torch.cat(idx)
    return x[idx], y[idx]


def shift_digits(x: torch.Tensor) -> torch.Tensor:
    """The offline demo's domain shift on (N, 1, 8, 8) images in [0, 1]: shift one pixel right and down,
    thicken strokes (3x3 max filter), then halve the contrast around 0.25."""
    moved = torch.zeros_like(x)
    moved[..., 1:, 1:] = x[..., :-1, :-1]
    thick = F.max_pool2d(moved, 3, stride=1, padding=1)
    return (0.25 + 0.5 * (thick - 0.25)).clamp(0, 1)


def _columns(y: torch.Tensor, n: int = 12) -> torch.Tensor:
    """Indices of ``n`` samples for a picture: one per class in order, then second ones."""
    firsts = [torch.nonzero(y == c).flatten() for c in torch.unique(y).tolist()]
    order = [f[0] for f in firsts] + [f[1] for f in firsts if len(f) > 1]
    return torch.stack(order[:n])


def _say(progress: bool, message: str) -> None:
    """What the demo is doing, on stderr (the bars' stream), when ``progress``."""
    if progress:
        print(f"flowaug demo: {message}", file=sys.stderr, flush=True)


def _load(data_dir, progress=False):
    """MNIST/USPS when available, else scikit-learn digits with a synthetic shift."""
    root = find_data_dir(data_dir)
    _say(progress, f"loading MNIST and USPS ({'from ' + root if root else 'torchvision, downloading if needed'})")
    try:
        mx, my = load_dataset("mnist", "train", data_dir=root)
        ux, uy = load_dataset("usps", "test", data_dir=root)
        mx = mx.float() / 255
        ux = resize_images(ux.float() / 255, (28, 28))
        sx, sy = per_class(mx, my, 500, seed=0)
        return {"name": "MNIST -> USPS", "train": (sx, sy), "shifted": (ux, uy), "model": lambda: LeNet5(first=1),
                "epochs": 20, "source": "MNIST (5,000 train digits)", "target": "USPS test (2,007, resized to 28x28)"}
    except (FileNotFoundError, OSError):
        _say(progress, "MNIST/USPS not found: using scikit-learn's digits with a synthetic shift")
        x, y = load_dataset("sklearn_digits", "test", data_dir=root)
        x = x.float() / 255
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        a, b = perm[: len(x) // 2], perm[len(x) // 2 :]
        return {"name": "scikit-learn digits, shifted half -> clean half", "train": (x[a], y[a]),
                "shifted": (shift_digits(x[b]), y[b]), "model": lambda: MLP(64), "epochs": 60,
                "source": "digits, half A (clean)", "target": "digits, half B shifted (1 px, thicker, low contrast)"}


def _load_condense(data_dir, progress):
    """(name, train, test) for the condensation section: MNIST if found, else scikit-learn's digits halves."""
    root = find_data_dir(data_dir)
    try:
        x, y = load_dataset("mnist", "train", data_dir=root)
        xt, yt = load_dataset("mnist", "test", data_dir=root)
        name = "MNIST (60,000 train digits; scored on the 10,000 test digits)"
    except (FileNotFoundError, OSError):
        d, dy = load_dataset("sklearn_digits", "test", data_dir=root)
        perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(0))
        x, y, xt, yt = d[perm[:1200]], dy[perm[:1200]], d[perm[1200:]], dy[perm[1200:]]
        name = "scikit-learn digits (1,200 train, 597 test)"
    x, xt = x.float() / 255, xt.float() / 255
    mean, std = x.mean(), x.std()  # the practitioner's normalisation, as in the DC/DSA/DM code
    _say(progress, f"condensation: {name}")
    return name, ((x - mean) / std, y), ((xt - mean) / std, yt), (mean, std)


def condense_section(data_dir, out_dir: str, progress: bool = True, *, ipc: int = 10, iterations: int = 100,
                     width: int = 32, epochs: int = 200) -> dict:
    """Condense to ``ipc`` images per class three ways and score a ConvNet trained on each (same seed)."""
    from .condense import _initial, condense, evaluate_synthetic

    name, train, test, (mean, std) = _load_condense(data_dir, progress)
    common = {"iterations": iterations, "real_per_class": 64, "width": width, "seed": 0, "progress": progress,
              "checkpoint_every": iterations}
    sets = {"random real images": _initial(*train, ipc, "real", 0)}
    _say(progress, f"distribution matching (mean of each class in random embeddings), {iterations} iterations")
    dm = condense(train, ipc, objective="linear", step_size=2.0 / ipc, **common)
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


def run_demo(data_dir: str | None = None, out_dir: str = "flowaug_outputs/demo", steps: int = 20,
             step_size: float = 0.5, progress: bool = True, condensation: bool = True) -> dict:
    """Run the demo; returns the report (also written to ``out_dir/report.json`` and ``report.md``)."""
    t0 = time.time()
    torch.manual_seed(0)
    condensed = condense_section(data_dir, out_dir, progress) if condensation else None
    torch.manual_seed(0)
    setup = _load(data_dir, progress)
    (tx, ty), (ux, uy) = setup["train"], setup["shifted"]
    _say(progress, f"{setup['name']}: training the classifier to freeze on {setup['source']} "
                   f"({setup['epochs']} epochs)")
    model = train_classifier(setup["model"](), tx, ty, epochs=setup["epochs"], progress=progress)
    for p in model.parameters():
        p.requires_grad_(False)
    snaps = sorted({0, steps // 4, steps // 2, steps})
    runs = {}
    objective = Sinkhorn()
    for name, kwargs in {
        "unlabeled flow": dict(y=None),
        ORACLE: dict(y=uy, class_map="same"),
    }.items():
        _say(progress, f"{name}: {setup['target']} toward the classifier's training data ({steps} steps)")
        out = flow(ux, reference=(tx, ty), objective=objective, steps=steps, step_size=step_size, clamp=(0.0, 1.0),
                   snapshots="all", progress=progress, **kwargs)
        accs = [accuracy(model, s, uy) for s in out.trajectory]
        runs[name] = {"times": out.trajectory_times, "accuracy": accs, "objective": out.objective.tolist(),
                      "trajectory": [out.trajectory[s] for s in snaps]}
    _say(progress, f"writing pictures and the report to {out_dir}/")
    os.makedirs(out_dir, exist_ok=True)
    best = runs[ORACLE]
    pick, ref_pick = _columns(uy), _columns(ty)
    times = best["times"]
    rows = [t[pick] for t in best["trajectory"]] + [tx[ref_pick]]
    labels = [f"t = {times[s]:g}" for s in snaps] + ["reference"]
    files = {
        "grid": image_grid(rows, os.path.join(out_dir, "flow_grid.png"), row_labels=labels,
                           title=f"{setup['name']}: class-wise Sinkhorn flow (steered by the true labels: oracle)"),
        "accuracy": objective_curve({k: (v["times"], [100 * a for a in v["accuracy"]]) for k, v in runs.items()},
                                    os.path.join(out_dir, "accuracy.png"), ylabel="frozen-model accuracy (%)",
                                    title="accuracy on the true labels along the flow"),
        "objective": objective_curve({k: (v["times"], v["objective"]) for k, v in runs.items()},
                                     os.path.join(out_dir, "objective.png"), ylabel="Sinkhorn divergence",
                                     logy=True, title="objective along the flow"),
    }
    report = {
        "setting": setup["name"], "source": setup["source"], "target": setup["target"], "steps": steps,
        "step_size": step_size, "blur": "auto",
        "accuracy_before": runs["unlabeled flow"]["accuracy"][0],
        "accuracy_after": {k: v["accuracy"][-1] for k, v in runs.items()},
        "accuracy_curve": {k: v["accuracy"] for k, v in runs.items()},
        "objective": {k: v["objective"] for k, v in runs.items()}, "seconds": time.time() - t0, "files": files,
        "condensation": condensed,
    }
    if condensed:
        files["condensed"] = condensed["file"]
    with atomic_path(os.path.join(out_dir, "report.json")) as tmp, open(tmp, "w") as handle:
        json.dump(report, handle, indent=1)
    lines = ["# flowaug demo", ""] + _condense_lines(condensed) + [
        f"## Re-purposing a frozen classifier: {setup['name']}", "",
        f"A classifier trained on {setup['source']} is frozen; {setup['target']} is flowed toward its "
        f"training data ({steps} Sinkhorn steps, step size {step_size}).", "",
        "| flow | accuracy before | accuracy after |", "|---|---|---|",
    ] + [f"| {k} | {100 * report['accuracy_before']:.1f}% | {100 * v:.1f}% |" for k, v in report["accuracy_after"].items()]
    lines += ["", f"Pictures: {', '.join(os.path.basename(f) for f in files.values())}. "
              f"Took {report['seconds']:.0f} s."]
    with atomic_path(os.path.join(out_dir, "report.md")) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return report


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
