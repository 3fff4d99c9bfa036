"""Gradual self-training through generated domains vs the practitioner's baselines (rotated / colour-shifted digits).

A labelled source (rotation 0-5 degrees, or no colour shift), ``--given`` unlabelled intermediate domains, an
unlabelled target (rotation ``angle - 5`` to ``angle``, or shift +1) and a labelled target *test* split used only for
scoring (development selection scores on a validation split carved from train instead, ``--score val``). Every
method starts from the same source model (per seed) and self-trains with the same step: ``--epochs`` epochs over a
domain's samples kept by the confidence filter (the least confident 10 % dropped), Adam, batch 64;
``adaptation_steps`` says what each used. ``--sizes SOURCE DOMAIN`` scales the data to a smaller dataset (USPS:
2000 500); the oracle then walks as many real intermediates as fit (the JSON says how many).

Methods (all in one run, paired by seed). Every generated-path walk is :func:`flowaug.gradual.walk` with a path
function (one walk, three paths; ``--selection`` gives each family's choice on development shifts):

* baselines: source only; direct self-training on the target; gradual self-training through the given domains
  (whole model; head only with as many optimizer steps as the recipe's walk); GOAT (He et al. 2023) as published
  (source encoder fixed, exact OT plan, 10 domains per gap); GOAT's exact-plan path in the gradual schedule (encoder
  retrained on each real domain); the plain entropic barycentric map ``x + t (T_ab(x) - x)`` in that schedule (the
  simpler map the flow must beat); scikit-adaptation's ``GradualEstimator`` (skada 0.6: GOAT with POT's Sinkhorn
  plan and its default MLP head, on the source encoder's features of source and target);
* oracles: gradual self-training through all real fine-grained intermediates (whole model; head only);
* flowaug: the recipe (``flowaug.paths.FlowPath``: a flow of the debiased Sinkhorn divergence, optionally with a
  classifier potential at each particle's label) and its ablations: without debiasing, without the classifier
  potential, with the source encoder fixed.

Diagnostics (true labels, never used by a method), per gap: the same-class pairing rate of each generated path (the
class of the next domain's sample nearest to each particle at the last generated domain), the measured level of
each generated domain (the level of the real intermediate nearest to its particles, real intermediates encoded by
the path's own encoder) and the same measure of the real domain the gap walks to.

    python benchmarks/gradual.py --shift rotate --given 2 --seeds 8 --jobs 2 --data ../shared/data \
        --out benchmarks/results/gradual_rotate.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from itertools import pairwise

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import append, machine, markdown_table, paired, read_cells, run_parallel, write_json

from flowaug.data import load_dataset, rotate_images
from flowaug.gradual import WalkOptions, _encode, adapt, domain_times, pseudo_labels, self_train, walk
from flowaug.paths import PlanPath

SOURCE, DOMAIN = 5000, 2000  # Kumar et al.'s rotating-MNIST sizes: source, and each domain (given, target, real
SELECTION = os.path.join(os.path.dirname(__file__), "results", "gradual_select.json")
POOL_DOMAINS = 21  # intermediate); the oracle walks up to 21 real intermediates (fewer where the dataset is small)

#: the candidate families of benchmarks/gradual_select.py, each with as many development candidates; their best
#: on the development shifts is what the evaluation runs (--recipes-from restores them)
CANDIDATES = {
    "flowaug": ["flow:K=20:steps=3:retrain", "flow:K=20:steps=10:retrain", "flow:K=20:steps=10:cls=3:retrain",
                "flow:K=20:steps=10:cls=10:retrain"],
    "goat_path": ["plan:K=5:retrain", "plan:K=10:retrain", "plan:K=20:retrain", "plan:K=30:retrain"],
    "entropic": ["entropic:K=5:retrain", "entropic:K=10:retrain", "entropic:K=20:retrain", "entropic:K=30:retrain"],
}
#: until a selection file says otherwise (gradual_select.py writes benchmarks/results/gradual_select.json)
CHOSEN = {"flowaug": "flow:K=20:steps=3:retrain", "goat_path": "plan:K=10:retrain",
          "entropic": "entropic:K=20:retrain"}

#: name -> kind; the walks' specs come from the selection (flowaug, GOAT's path, the entropic map) or are fixed
METHODS = {
    "source only": "baseline",
    "direct self-training": "baseline",
    "gradual, given domains": "baseline",
    "gradual, given domains, head only, matched steps": "baseline",
    "GOAT": "baseline",
    "GOAT path, gradual schedule": "baseline",
    "entropic map path, gradual schedule": "baseline",
    "skada GradualEstimator (GOAT, MLP head on source features)": "baseline",
    "oracle: all real intermediates": "oracle",
    "oracle: all real intermediates, head only": "oracle",
    "flowaug": "flowaug",
    "flowaug without debiasing": "ablation",
    "flowaug without classifier potential": "ablation",
    "flowaug, source encoder fixed": "ablation",
}


def spec_options(spec: str) -> dict:
    """A walk's options from its spec ``family:K=k[:steps=s][:cls=w][:retrain][:cw][:carry][:nodebias]``."""
    family, *parts = spec.split(":")
    opts = {"family": family, "generated": 10, "steps": 3, "classifier_weight": 0.0, "train_encoder": False,
            "label_aware": False, "carry_labels": False, "debias": True}
    keys = {"K": ("generated", int), "steps": ("steps", int), "cls": ("classifier_weight", float)}
    flags = {"retrain": "train_encoder", "cw": "label_aware", "carry": "carry_labels"}
    for part in parts:
        if "=" in part:
            key, value = part.split("=")
            name, cast = keys[key]
            opts[name] = cast(value)
        elif part == "nodebias":
            opts["debias"] = False
        else:
            opts[flags[part]] = True
    return opts


def spec_of(opts: dict) -> str:
    """The inverse of :func:`spec_options`."""
    out = [opts["family"], f"K={opts['generated']}"]
    if opts["family"] == "flow":
        out.append(f"steps={opts['steps']}")
        if opts["classifier_weight"]:
            out.append(f"cls={opts['classifier_weight']:g}")
        if not opts["debias"]:
            out.append("nodebias")
    out += [flag for flag, key in (("retrain", "train_encoder"), ("cw", "label_aware"), ("carry", "carry_labels"))
            if opts[key]]
    return ":".join(out)


def path_of(opts: dict):
    """The path function a spec names (one walk, three paths)."""
    from flowaug import Sinkhorn
    from flowaug.paths import FlowPath, entropic_path

    if opts["family"] == "plan":
        return PlanPath()
    if opts["family"] == "entropic":
        return entropic_path()
    return FlowPath(objective=Sinkhorn(debias=opts["debias"]), steps=opts["steps"],
                    classifier_weight=opts["classifier_weight"])


def method_spec(args, name: str) -> str | None:
    """The spec a walk method runs (None: not a generated-path walk)."""
    chosen = args.chosen
    if name == "GOAT":
        return "plan:K=10"  # as published: the source encoder fixed, 10 per gap (He et al.'s MNIST setting)
    if name == "GOAT path, gradual schedule":
        return chosen["goat_path"]
    if name == "entropic map path, gradual schedule":
        return chosen["entropic"]
    if not name.startswith("flowaug"):
        return None
    opts = spec_options(chosen["flowaug"])
    if name == "flowaug without debiasing":
        opts["debias"] = False
    elif name == "flowaug without classifier potential":
        opts["classifier_weight"] = 0.0
    elif name == "flowaug, source encoder fixed":
        opts["train_encoder"] = False
    return spec_of(opts)


# ---------------------------------------------------------------------- data
def shift(args, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Apply the shift at ``level`` in [0, 1] (0: source, 1: target) per image."""
    if args.shift == "rotate":
        return rotate_images(x, level * args.angle)
    return x + (level * args.color_shift).view(-1, 1, 1, 1)  # GOAT's colour shift: pixels [0, 1] -> [s, 1 + s]


def build(args, seed: int) -> dict:
    """Source, given domains, real intermediates, target, a validation split carved from train (development
    selection scores on it) and the target test split (the evaluation scores on it) for one seed."""
    x, y = load_dataset(args.dataset, "train", data_dir=args.data)
    xt, yt = load_dataset(args.dataset, "test", data_dir=args.data)
    x, xt = x.float().div(255), xt.float().div(255)  # (N, 1, H, W)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    s, d = args.sizes
    v = validation_size(d)  # validation images (train split, shifted like the target)
    p = pool_domains(args, len(x)) * d
    if p < 2 * d:
        raise SystemExit(f"--dataset {args.dataset}: {len(x)} training images are too few for --sizes {s} {d}")
    ends = [s, s + v, s + v + p, s + v + p + d]
    src, val, pool, tgt, rest = perm[:ends[0]], perm[ends[0]:ends[1]], perm[ends[1]:ends[2]], perm[ends[2]:ends[3]], \
        perm[ends[3]:]
    band = 5.0 / args.angle if args.shift == "rotate" else 0.0  # rotation domains span 5 degrees
    u = lambda n: torch.rand(n, generator=g)
    lo_t = 1 - band
    data = {"source": (shift(args, x[src], u(len(src)) * band), y[src]),
            "target": (shift(args, x[tgt], lo_t + u(len(tgt)) * band), y[tgt]),
            "test": (shift(args, xt, lo_t + u(len(xt)) * band), yt),
            "val": (shift(args, x[val], lo_t + u(len(val)) * band), y[val]),
            "oracle_domains": p // d}
    # real fine-grained intermediates: the level grows with the index from the source band to the target band
    level = band + (1 - 2 * band) * torch.arange(len(pool)) / len(pool)
    xp = shift(args, x[pool], level)
    data["pool"] = [(xp[i:i + d], y[pool][i:i + d]) for i in range(0, len(pool), d)]
    data["pool_x"], data["pool_level_each"] = xp, level
    data["level_unit"] = args.angle if args.shift == "rotate" else args.color_shift
    given = []
    for k in range(1, args.given + 1):
        idx = rest[(k - 1) * d:k * d]
        centre = k / (args.given + 1)
        given.append((shift(args, x[idx], centre - band / 2 + u(len(idx)) * band), y[idx]))
    data["given"] = given
    return data


# ---------------------------------------------------------------------- model
def network(seed: int, shape=(1, 28, 28), classes: int = 10) -> tuple[nn.Module, nn.Module]:
    """Kumar et al.'s MNIST model (three strided 5x5 convolutions with batch norm) and an MLP head with dropout."""
    torch.manual_seed(seed)
    blocks = []
    for c_in in (shape[0], 32, 32):
        blocks += [nn.Conv2d(c_in, 32, 5, 2, 2), nn.BatchNorm2d(32), nn.ReLU()]
    encoder = nn.Sequential(*blocks, nn.Flatten())  # (N, 512) at 28 x 28
    dim = encoder.eval()(torch.zeros(2, *shape)).shape[1]
    head = nn.Sequential(nn.Linear(dim, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, classes))
    return encoder, head


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    labels, _ = pseudo_labels(model, x, confidence=0.0)
    return 100.0 * float((labels == y).float().mean())


def steps_of(n: int, args, filtered: bool = True) -> int:
    kept = n - math.floor(args.confidence * n) if filtered else n
    return args.epochs * math.ceil(kept / args.batch)


def train_source(args, data, seed: int) -> nn.Sequential:
    x, y = data["source"]
    encoder, head = network(seed, tuple(x.shape[1:]), int(y.max()) + 1)
    g = torch.Generator().manual_seed(seed)
    return self_train(nn.Sequential(encoder, head), x, y, epochs=args.source_epochs, batch_size=args.batch,
                      lr=args.lr, generator=g)


# ---------------------------------------------------------------------- methods
def st_through(args, model, domains, g) -> tuple[nn.Module, int]:
    """Gradual self-training through real domains (inputs)."""
    for x in domains:
        model = self_train(model, x, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                           confidence=args.confidence, generator=g)
    return model, sum(steps_of(len(x), args) for x in domains)


def pairing(f_last: torch.Tensor, f_b: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> float:
    """Same-class rate: the class of the next domain's sample nearest to each particle (true labels)."""
    return float((y_b[torch.cdist(f_last, f_b).argmin(1)] == y_a).float().mean())


def chain_of(data) -> list[tuple]:
    """(x, y) of the source, the given domains and the target, in walking order (y only for diagnostics)."""
    return [data["source"], *data["given"], data["target"]]


def walk_steps(args, chain, k: int, filtered: bool = True) -> int:
    """Optimizer steps of a walk with ``k`` generated domains per gap (the first domain's size) and each real one."""
    return sum(k * steps_of(len(a), args, filtered) + steps_of(len(b), args) for (a, _), (b, _) in pairwise(chain))


def walk_method(args, model, data, g, spec: str, diagnose: bool = True) -> tuple[nn.Module, int, dict]:
    """One gradual walk (:func:`flowaug.gradual.walk`, the implementation behind ``adapt``) with the path function
    and options a spec names; the optimizer steps it took and, per gap, its same-class pairing, the measured
    levels of its generated domains and of the real domain it walks to."""
    opts = spec_options(spec)
    options = WalkOptions(generated=opts["generated"], path=path_of(opts), label_aware=opts["label_aware"],
                          carry_labels=opts["carry_labels"], train_encoder=opts["train_encoder"], epochs=args.epochs,
                          batch_size=args.batch, lr=args.lr, confidence=args.confidence)
    chain, steps, diag = chain_of(data), [0], {"pairing": [], "path_levels": [], "next_domain_level": []}

    def train(module, x, labels, generator):
        steps[0] += steps_of(len(x), args, filtered=labels is None)
        return options.train_step(module, x, labels, generator)

    def on_path(gap, encoder, f_a, f_b, path):
        if not diagnose:
            return
        diag["pairing"].append(pairing(path.domains[-1], f_b, chain[gap][1][path.rows], chain[gap + 1][1]))
        pool = _encode(encoder, data["pool_images"])  # (n, D): real intermediates in the path's own features
        diag["path_levels"].append(levels_of(path.domains, data, pool, g))
        diag["next_domain_level"].append(levels_of([f_b], data, pool, g)[0])

    out = walk(model[0], model[1], data["source"], [x for x, _ in chain[1:]], options, train=train, generator=g,
               on_path=on_path)
    return out, steps[0], diag


def skada_goat(args, model, data, seed: int) -> nn.Module:
    """What a scikit-adaptation (skada 0.6) user gets: ``GradualEstimator`` (GOAT with POT's Sinkhorn plan, its
    default MLP head trained on the source, then through its generated domains) on the source encoder's features of
    the source and the target (it takes two domains: the given ones are not used)."""
    import numpy as np
    from skada._gradual_da import GradualEstimator  # not exported at the top level in 0.6
    from sklearn.neural_network import MLPClassifier

    f_s, f_t = _encode(model[0], data["source"][0]).numpy(), _encode(model[0], data["target"][0]).numpy()
    x = np.concatenate([f_s, f_t])
    y = np.concatenate([data["source"][1].numpy(), np.full(len(f_t), -1)])
    domain = np.concatenate([np.ones(len(f_s)), -np.ones(len(f_t))]).astype(int)
    head = MLPClassifier(hidden_layer_sizes=(100,), max_iter=100, random_state=seed)  # skada's default, seeded
    est = GradualEstimator(base_estimator=head).fit(x, y, sample_domain=domain)
    return _SklearnHead(model[0], est)


class _SklearnHead(nn.Module):
    """The source encoder followed by a fitted scikit-learn classifier, scored like the other models."""

    def __init__(self, encoder, estimator):
        super().__init__()
        self.encoder, self.estimator = encoder, estimator

    def forward(self, x):
        proba = self.estimator.predict_proba(self.encoder(x).numpy())
        return torch.log(torch.as_tensor(proba, dtype=torch.float32).clamp_min(1e-12))


def levels_of(path, data, pool, g, sample: int = 500) -> list[float]:
    """Diagnostic: the mean shift level (degrees, or pixel offset) of the real intermediate image nearest to each of
    ``sample`` particles, per generated domain, with the real intermediates encoded as ``pool`` (n, D) by the
    path's own encoder: does the path pass through the real ones, and does it arrive?"""
    level, scale = data["pool_levels"], data["level_unit"]
    out = []
    for f in path:
        idx = torch.randperm(len(f), generator=g)[:sample]
        out.append(scale * float(level[torch.cdist(f[idx], pool).argmin(1)].mean()))
    return out


def head_walk(args, model, data, xs, g, budget: int = 0) -> tuple[nn.Module, int]:
    """Head-only gradual self-training through the real domains ``xs`` (source encoder fixed): --epochs per domain,
    or as many more as reach ``budget`` optimizer steps in all."""
    base = sum(steps_of(len(x), args) for x in xs)
    epochs = max(args.epochs, round(args.epochs * budget / base))
    out = adapt(model[0], model[1], data["source"], xs, generated=0, train_encoder=False, epochs=epochs,
                batch_size=args.batch, lr=args.lr, confidence=args.confidence, generator=g)
    return out, epochs * base // args.epochs


def run_method(args, name: str, source_model, data, seed: int) -> dict:
    """One method's record on one seed: accuracy on ``args.score`` ("test": the target's test split; "val": the
    validation split carved from train, for development selection), its optimizer steps and diagnostics."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed * 1000 + list(METHODS).index(name))
    steps, diag, spec = 0, {}, method_spec(args, name)
    real = [x for x, _ in data["pool"]] + [data["target"][0]]  # the oracle's walk
    if name == "source only":
        model = source_model
    elif name == "direct self-training":
        model, steps = st_through(args, source_model, [data["target"][0]], g)
    elif name == "gradual, given domains":
        model, steps = st_through(args, source_model, [x for x, _ in data["given"]] + [data["target"][0]], g)
    elif name == "oracle: all real intermediates":
        model, steps = st_through(args, source_model, real, g)
    elif name == "oracle: all real intermediates, head only":  # what a fixed source encoder allows at best
        model, steps = head_walk(args, source_model, data, real, g)
    elif name == "gradual, given domains, head only, matched steps":  # as many steps as the recipe's walk
        budget = walk_steps(args, chain_of(data), spec_options(args.chosen["flowaug"])["generated"])
        model, steps = head_walk(args, source_model, data, [x for x, _ in chain_of(data)[1:]], g, budget)
    elif name.startswith("skada"):
        model = skada_goat(args, source_model, data, seed)
    else:
        model, steps, diag = walk_method(args, source_model, data, g, spec, diagnose=args.score == "test")
    record = {"seed": seed, "method": name, "accuracy": accuracy(model, *data[args.score]), "adaptation_steps": steps,
              "seconds": time.perf_counter() - start}  # one thread, with the diagnostics
    if spec:
        record["spec"] = spec
    record.update({k: v for k, v in diag.items() if v})
    return record


def cell(args, seed: int) -> None:
    torch.set_num_threads(1)
    done = {r["method"] for r in read_cells(args.cells) if r["seed"] == seed}
    todo = [m for m in args.methods if m not in done]
    if not todo:
        return
    data = build(args, seed)
    source_model = train_source(args, data, seed)
    pool_sample(data, source_model, seed)
    for name in todo:
        record = run_method(args, name, source_model, data, seed)
        print(f"seed {seed}  {name:58s} {record['accuracy']:6.2f}  steps {record['adaptation_steps']}", flush=True)
        append(args.cells, record)


def draw(args) -> None:
    """The picture (seed 0's data and source model), unless it exists."""
    png = os.path.splitext(args.out)[0] + ".png"
    if os.path.exists(png):
        return
    torch.set_num_threads(1)
    data = build(args, 0)
    model = train_source(args, data, 0)
    pool_sample(data, model, 0)
    picture(args, data, model, png)


def pool_sample(data, model, seed: int, n: int = 10000) -> None:
    """Source-encoder features of n real intermediates with their levels: for the diagnostics and the picture."""
    sub = torch.randperm(len(data["pool_x"]), generator=torch.Generator().manual_seed(seed))[:n]
    data["pool_features"] = _encode(model[0], data["pool_x"][sub])  # (n, D), source encoder (the picture)
    data["pool_levels"], data["pool_images"] = data["pool_level_each"][sub], data["pool_x"][sub]


def picture(args, data, model, png: str, digits: int = 4, columns: int = 5) -> None:
    """The first gap (source -> first given domain): a few source digits shifted for real to each generated
    domain's level, next to the real image nearest (source-encoder features) to the particle on flowaug's and on
    GOAT's path. The titles give the nearest image's level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowaug._io import atomic_path

    (x_a, y_a), (x_b, _) = data["source"], (data["given"] + [data["target"]])[0]
    f_a, f_b = _encode(model[0], x_a), _encode(model[0], x_b)
    opts = spec_options(args.chosen["flowaug"])
    n = opts["generated"]  # both paths at the recipe's count, in the source encoder's features
    times = domain_times(n)
    keep = sorted({round(k * (len(times) - 1) / (columns - 1)) for k in range(columns)})
    flow_path = path_of(opts)(f_a, f_b, times, y_from=y_a, classifier=model[1],
                              generator=torch.Generator().manual_seed(0)).domains
    goat_path, rows = PlanPath()(f_a, f_b, times)
    end_level = 1 / (args.given + 1) if args.given else 1.0  # the first domain's level
    unit = data["level_unit"]
    fig, axes = plt.subplots(3 * digits, len(keep), figsize=(1.3 * len(keep), 1.45 * 3 * digits))
    for d in range(digits):
        p = int(torch.nonzero(y_a == d)[0])
        q = int(torch.nonzero(rows == p)[0])  # one of the particle's OT pairs
        for c, k in enumerate(keep):
            real = shift(args, x_a[p:p + 1], torch.tensor([times[k] * end_level]))[0, 0]
            for r, (img, title) in enumerate([(real, f"real +{times[k] * end_level * unit:.3g}")] + [
                    nearest(path[k][j:j + 1], data, unit) for path, j in ((flow_path, p), (goat_path, q))]):
                ax = axes[3 * d + r, c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=1 + (args.color_shift if args.shift == "color" else 0))
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(title, fontsize=6)
                if c == 0:
                    ax.set_ylabel(("real", "flowaug", "GOAT")[r], fontsize=7)
    fig.suptitle(f"{args.shift}, source -> first domain: the digit shifted for real (+ its own source shift) vs the\n"
                 "real intermediate nearest to its particle on each path (title: that image's shift)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def nearest(f: torch.Tensor, data, unit: float) -> tuple[torch.Tensor, str]:
    i = int(torch.cdist(f, data["pool_features"]).argmin())
    return data["pool_images"][i, 0], f"nearest {float(data['pool_levels'][i]) * unit:.3g}"


# ---------------------------------------------------------------------- report
def summarise(args) -> dict:
    runs = {}
    for r in read_cells(args.cells):
        if r["seed"] < args.seeds:
            runs.setdefault(r["method"], {})[r["seed"]] = r
    records = []
    for name in [m for m in args.methods if m in runs]:
        rs = [runs[name][s] for s in sorted(runs[name])]
        acc = [r["accuracy"] for r in rs]
        rec = {"method": name, "kind": METHODS[name], "mean": statistics.mean(acc),
               "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
               "runs": [{"seed": r["seed"], "accuracy": r["accuracy"]} for r in rs],
               "adaptation_steps": rs[0]["adaptation_steps"]}
        if all("seconds" in r for r in rs):
            rec["seconds_median"] = statistics.median(r["seconds"] for r in rs)
        if "spec" in rs[0]:
            rec["spec"] = rs[0]["spec"]
        for key in ("pairing", "path_levels", "next_domain_level"):
            if key in rs[0]:
                rec[key] = torch.tensor([r[key] for r in rs]).mean(0).tolist()  # per gap (and generated domain)
        records.append(rec)
    base = [r for r in records if r["kind"] == "baseline"]
    best = max(base, key=lambda r: r["mean"]) if base else None
    oracle = next((r for r in records if r["kind"] == "oracle"), None)
    given = next((r for r in records if r["method"] == "gradual, given domains"), None)
    for rec in records:
        if rec["kind"] in ("flowaug", "ablation") and best is not None:
            d = paired({(0, r["seed"]): r["accuracy"] for r in rec["runs"]},
                       {(0, r["seed"]): r["accuracy"] for r in best["runs"]})
            rec["vs_best_baseline"] = {"baseline": best["method"], "mean_diff": d["mean_diff"], "ci95": d["ci95"]}
            if oracle and best["mean"] < oracle["mean"]:
                rec["gap_closed"] = (rec["mean"] - best["mean"]) / (oracle["mean"] - best["mean"])
                rec["gap_closed_ci95"] = gap_closed_interval(rec, best, oracle)
    return {"records": records, "best_baseline": best["method"] if best else None,
            "given_vs_oracle": (oracle["mean"] - given["mean"]) if oracle and given else None}


def pool_domains(args, n_train: int) -> int:
    """Real intermediates (of ``DOMAIN`` images) the oracle walks: up to 21, as many as fit in ``n_train`` images
    beside the source, the validation split, the target and the given domains (fewer on a dataset smaller than
    MNIST)."""
    s, d = args.sizes
    return min(POOL_DOMAINS, (n_train - (s + validation_size(d) + d + args.given * d)) // d)


def validation_size(domain: int) -> int:
    """Validation images carved from train (development selection scores on them): 1,000, or one domain's worth."""
    return min(1000, domain)


def gap_closed_interval(rec, best, oracle, draws: int = 10000) -> list[float] | None:
    """95 % percentile-bootstrap interval (over paired seeds) of the fraction of the best baseline's gap to the
    oracle that ``rec`` closes."""
    acc = {r["method"]: {x["seed"]: x["accuracy"] for x in r["runs"]} for r in (rec, best, oracle)}
    seeds = sorted(set.intersection(*(set(v) for v in acc.values())))
    if len(seeds) < 2:
        return None
    m, b, o = (torch.tensor([acc[r["method"]][s] for s in seeds]) for r in (rec, best, oracle))
    idx = torch.randint(0, len(seeds), (draws, len(seeds)), generator=torch.Generator().manual_seed(0))
    gap = (o[idx] - b[idx]).mean(1)
    ratio = ((m[idx] - b[idx]).mean(1) / gap)[gap > 0]
    return [float(ratio.quantile(0.025)), float(ratio.quantile(0.975))]


def report(args) -> dict:
    summary = summarise(args)
    args.oracle_domains = pool_domains(args, len(load_dataset(args.dataset, "train", data_dir=args.data)[1]))
    rows = []
    for r in summary["records"]:
        vs = r.get("vs_best_baseline")
        ci = vs and vs["ci95"] and f"{vs['mean_diff']:+.1f} [{vs['ci95'][0]:+.1f}, {vs['ci95'][1]:+.1f}]"
        pair = " / ".join(f"{100 * p:.0f}" for p in r.get("pairing", [])) or "-"
        rows.append([r["method"], r["kind"], f"{r['mean']:.1f} ± {r['std']:.1f}", len(r["runs"]),
                     r["adaptation_steps"], pair, ci or "-"])
    print(markdown_table(["method", "kind", "target test accuracy (%)", "seeds", "adaptation steps",
                          "same-class pairing (%) per gap", "vs best baseline [95% CI]"], rows))
    payload = {
        "dataset": args.dataset, "shift": args.shift, "angle": args.angle if args.shift == "rotate" else None,
        "color_shift": args.color_shift if args.shift == "color" else None, "given": args.given,
        "selection": args.selection_note,
        "recipe": {"method": "flowaug", "spec": args.chosen["flowaug"], **spec_options(args.chosen["flowaug"]),
                   "flow": "flowaug.paths.FlowPath: Sinkhorn (auto blur 0.2 x median distance), step_size 1, "
                           "features only, plus classifier_weight x CE(head(x), y) at the particles' labels",
                   "schedule": "linear", "chosen": dict(args.chosen)},
        "protocol": {"epochs_per_domain": args.epochs, "source_epochs": args.source_epochs, "batch": args.batch,
                     "lr": args.lr, "confidence_filter": args.confidence, "seeds": args.seeds,
                     "sizes": {"source": args.sizes[0], "domain": args.sizes[1]}, "quick": args.quick,
                     "oracle_real_intermediates": args.oracle_domains,
                     "budget": "every self-training step: --epochs epochs over the kept samples of one domain; "
                               "the walks go through (given + 1) x (generated + 1) domains, the oracle through "
                               "every real intermediate and the target; adaptation_steps gives each method's "
                               "optimizer steps (skada trains its own scikit-learn MLP: 0 here)",
                     "path_levels": "per gap and generated domain: the mean level of the real intermediate nearest "
                                    "to 500 particles, real intermediates encoded by the path's own encoder; "
                                    "next_domain_level: the same measure of the real domain the gap walks to"},
        "best_baseline": summary["best_baseline"], "records": summary["records"], "machine": machine(),
    }
    write_json(args.out, payload)
    return payload


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help="a folder NAME/{train,test}.npz under --data")
    p.add_argument("--data", default=None, help="folder of datasets (default $FLOWAUG_DATA, ../shared/data)")
    p.add_argument("--shift", choices=("rotate", "color"), default="rotate")
    p.add_argument("--angle", type=float, default=60.0, help="target rotation (the target spans angle-5..angle)")
    p.add_argument("--color-shift", type=float, default=1.0, help="target pixel offset (GOAT's colour shift)")
    p.add_argument("--given", type=int, default=2, help="unlabelled intermediate domains given (0-5)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10, help="self-training epochs per domain")
    p.add_argument("--source-epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--confidence", type=float, default=0.1, help="fraction of least confident pseudo-labels dropped")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--jobs", type=int, default=1, help="processes, one torch thread each")
    p.add_argument("--out", default="benchmarks/results/gradual_rotate.json")
    p.add_argument("--selection", default=SELECTION, help="the JSON benchmarks/gradual_select.py wrote: the "
                   "recipe and the baselines' paths chosen on development shifts")
    p.add_argument("--recipes-from", default=None, help="JSON of another run: reuse its recipe and baselines' paths")
    p.add_argument("--sizes", type=int, nargs=2, default=(SOURCE, DOMAIN), metavar=("SOURCE", "DOMAIN"),
                   help="source images and images per domain (given, target, real intermediate); USPS: 2000 500")
    p.add_argument("--score", choices=("test", "val"), default="test", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a smoke run: small domains, 1 epoch, 2 seeds")
    p.add_argument("--report", action="store_true", help="rebuild the JSON and table from the cells file")
    args = p.parse_args(argv)
    if not 0 <= args.given <= 5:
        p.error(f"--given must be in 0..5, got {args.given}")
    args.chosen, args.selection_note = dict(CHOSEN), "defaults (no selection file)"
    import json

    source = args.recipes_from or (args.selection if os.path.exists(args.selection) else None)
    if source:
        with open(source) as handle:
            saved = json.load(handle)
        args.chosen = dict(saved["recipe"]["chosen"] if "recipe" in saved else saved["chosen"])
        args.selection_note = saved.get("selection") or saved.get("note")
    if args.quick:
        args.sizes, args.epochs, args.source_epochs, args.seeds = (1000, 500), 1, 2, 2
    args.oracle_domains = None
    recipe = method_spec(args, "flowaug")  # an ablation that removes what the recipe does not have is the recipe
    args.methods = [m for m in args.methods if METHODS[m] != "ablation" or method_spec(args, m) != recipe]
    args.cells = os.path.splitext(args.out)[0] + ".cells.jsonl"
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if not args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        run_parallel(cell, args, [(s,) for s in range(args.seeds)])
        draw(args)
    report(args)


if __name__ == "__main__":
    main()
