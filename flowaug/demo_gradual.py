"""The demo's lead: gradual adaptation to rotating digits from two unlabelled snapshots (``flowaug demo``).

A source of upright digits (0-5 degrees, labelled), two unlabelled snapshots (around 20 and 40 degrees) and an
unlabelled target (55-60 degrees); the target's test digits, with their labels, only score. The same source
model is adapted four ways: not at all, gradual self-training through GOAT's exact-plan path, through flowaug's
(:func:`flowaug.gradual.adapt` with its defaults) and, as an oracle that no user has, through ten real
intermediate rotations. MNIST when found, else scikit-learn's 8x8 digits (offline). Demo-sized (smaller domains,
fewer epochs, one seed): ``benchmarks/gradual.py`` is the paired comparison.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from .data import find_data_dir, load_dataset, rotate_images
from .gradual import _encode, adapt, domain_times, pseudo_labels, self_train
from .paths import FlowPath, PlanPath

__all__ = ["demo_digits", "gradual_section", "rotating_digits", "small_convnet"]

ORACLE = "oracle: 10 real intermediate rotations (no user has them)"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"flowaug demo: {message}", file=sys.stderr, flush=True)


def demo_digits(data_dir, n_train: int, seed: int = 0) -> tuple[str, tuple, tuple]:
    """``(name, (x, y), (x_test, y_test))``: MNIST's train and test splits when found, else scikit-learn's 8x8 digits
    cut (seeded) into ``n_train`` and the rest; images float (N, 1, H, W) in [0, 1] (the digits npz holds 0..16,
    scikit-learn's loader and the other datasets 0..255). Both demo sections use it."""
    root = find_data_dir(data_dir)
    try:
        x, y = load_dataset("mnist", "train", data_dir=root)
        xt, yt = load_dataset("mnist", "test", data_dir=root)
        name = "MNIST"
    except (FileNotFoundError, OSError):
        d, dy = load_dataset("sklearn_digits", "test", data_dir=root)
        perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))
        x, y, xt, yt = d[perm[:n_train]], dy[perm[:n_train]], d[perm[n_train:]], dy[perm[n_train:]]
        name = "scikit-learn digits (8x8, offline)"
    scale = 16.0 if int(x.max()) <= 16 else 255.0
    return name, (x.float() / scale, y), (xt.float() / scale, yt)


def rotating_digits(data_dir=None, seed: int = 0, angle: float = 60.0) -> dict:
    """Source, two snapshots, target, target test and real intermediates of rotating digits (float, [0, 1])."""
    name, (x, y), (xt, yt) = demo_digits(data_dir, 1400, seed)
    # source, each domain: Kumar et al.'s proportions, demo-sized; 13 domains (2 snapshots, target, 10 real)
    sizes = (2000, 700) if len(x) >= 16000 else (len(x) - 13 * max(2, len(x) // 20), max(2, len(x) // 20))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    (s, d), n_test = sizes, min(2000, len(xt))
    band = 5.0 / angle  # every domain spans 5 degrees
    part = lambda k: perm[s + k * d:s + (k + 1) * d]  # domain k: snapshots 0-1, the target 2, intermediates 3-12
    at = lambda idx, lo: rotate_images(x[idx], angle * (lo + band * torch.rand(len(idx), generator=g)))
    test = torch.randperm(len(xt), generator=g)[:n_test]
    return {"name": name, "source": (at(perm[:s], 0.0), y[perm[:s]]),
            "snapshots": [at(part(k), (k + 1) / 3 - band / 2) for k in (0, 1)], "target": at(part(2), 1 - band),
            "test": (rotate_images(xt[test], angle * (1 - band + band * torch.rand(len(test), generator=g))), yt[test]),
            "pool": [at(part(3 + k), (k + 1) / 11 - band / 2) for k in range(10)], "angle": angle}


def small_convnet(shape: tuple, classes: int = 10, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Kumar et al.'s rotating-MNIST encoder (three strided 5x5 convolutions with batch norm) and an MLP head."""
    torch.manual_seed(seed)
    blocks = []
    for c_in in (shape[0], 32, 32):
        blocks += [nn.Conv2d(c_in, 32, 5, 2, 2), nn.BatchNorm2d(32), nn.ReLU()]
    encoder = nn.Sequential(*blocks, nn.Flatten())
    dim = encoder.eval()(torch.zeros(2, *shape)).shape[1]
    head = nn.Sequential(nn.Linear(dim, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, classes))
    return encoder, head


def gradual_section(data_dir, out_dir: str, progress: bool = True, *, epochs: int = 3, seed: int = 0) -> dict:
    """Adapt one source model four ways; score each on the target's test digits; draw the generated path."""
    from .plotting import image_grid

    with torch.random.fork_rng():  # the demo leaves the caller's random stream as it was
        data = rotating_digits(data_dir, seed)
        _say(progress, f"gradual adaptation: {data['name']}, rotation 0 -> {data['angle']:.0f} degrees, two "
                       "unlabelled snapshots")
        encoder, head = small_convnet(tuple(data["source"][0].shape[1:]), seed=seed)
        model = self_train(nn.Sequential(encoder, head), *data["source"], epochs=4 * epochs,
                           generator=torch.Generator().manual_seed(seed))
        domains = [*data["snapshots"], data["target"]]
        walk = dict(epochs=epochs, generator=None)
        models = {"source only": model}
        for name, extra in (("GOAT's path (exact OT plan)", dict(path=PlanPath(), generated=10)),
                            ("flowaug (adapt, defaults)", {}),
                            (ORACLE, dict(generated=0, domains=[*data["pool"], data["target"]]))):
            _say(progress, f"gradual self-training: {name}")
            walk["generator"] = torch.Generator().manual_seed(seed)
            doms = extra.pop("domains", domains)
            models[name] = adapt(model[0], model[1], data["source"], doms, **walk, **extra, progress=progress)
        accuracy = {k: 100 * float((pseudo_labels(m, data["test"][0], confidence=0)[0] == data["test"][1])
                                   .float().mean()) for k, m in models.items()}
        os.makedirs(out_dir, exist_ok=True)
        picture = _path_picture(model, data, os.path.join(out_dir, "gradual_path.png"), image_grid)
    return {"data": data["name"], "angle": data["angle"], "epochs_per_domain": epochs, "accuracy": accuracy,
            "oracle": ORACLE, "file": picture}


def _path_picture(model, data, png: str, image_grid, columns: int = 6) -> str:
    """The first gap on flowaug's path: for one digit of each of five classes, the real intermediate image
    nearest (in the source encoder's features) to its particle at each generated time."""
    x_a, y_a = data["source"]
    f_a, f_b = _encode(model[0], x_a), _encode(model[0], data["snapshots"][0])
    times = domain_times(columns - 1)
    path = FlowPath()(f_a, f_b, times, generator=torch.Generator().manual_seed(0)).domains
    pool = torch.cat([x_a, data["snapshots"][0], *data["pool"][:4]])  # real images up to about 25 degrees
    f_pool = _encode(model[0], pool)
    rows, labels = [], []
    for c in sorted(set(y_a.tolist()))[:5]:
        i = int(torch.nonzero(y_a == c)[0])
        rows.append(torch.stack([x_a[i]] + [pool[int(torch.cdist(f[i:i + 1], f_pool).argmin())] for f in path]))
        labels.append(f"digit {c}")
    return image_grid(rows, png, row_labels=labels, columns=columns,
                      title="flowaug's path, source -> first snapshot:\nthe real image nearest to each particle "
                            f"at t = 0, {', '.join(f'{t:.2f}' for t in times)}")
