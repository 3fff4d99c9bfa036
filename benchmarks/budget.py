"""k-shot transfer under a budget-matched protocol (issue 10): the baselines practitioners run, recipes chosen
on validation data, paired statistics.

Protocol. Images are resized to 28 x 28 (bilinear) where smaller, pixels in [0, 1]. Source: 200 images per class
of the source train split (a seeded draw per draw index). Target train split: 100 images per class are held out
once as the **validation split** (seed 12345); the k-shot draws come from the rest, so validation images are never
in a draw. Every variant trains the same LeNet-5 (Bonet et al.'s variant, 1x1 first convolution) for the same
number of AdamW steps (``--budget-steps``, lr 3e-4, weight decay 0.01, batch 64), on the same draw with the same
seed (paired runs: the same data and initial weights; one generator per run feeds the batch order and the aug, so
variants with different source sizes see different batch streams, which widens the paired intervals without
biasing them). Variants that add source images draw their batches uniformly from the concatenation of target and
source (what a practitioner does with ``ConcatDataset``; the rule fixed before any score was seen), except the
variants named "half of each batch from the target" (32 + 32 per batch), added after the first results. The test
split of the target only scores, at half and at the full budget.

  baselines  target only | target + aug | target + raw source | target + raw source + aug |
             pretrain on raw source (half the budget), then fine-tune on the target (the other half), without and
             with aug | target + raw source + aug with half of every batch from the target (added with the late
             candidates: it sees the target as often as pretrain + fine-tune does)
  recipes    (candidates; each + aug, class-wise Sinkhorn flow of the source toward the k shots with FlowDataset,
             class_map="same", 10 steps of 0.2, every step kept as a snapshot)
             flowed source (t = 1) | half-flowed source (t = 0.5) | raw + flowed source |
             randomly flowed source (each time a source image is drawn, a fresh flow time t ~ U(0, 1): its
             features are interpolated between the bracketing snapshots) |
             FlowAnnealing curriculum (FlowDataset.strength set by FlowAnnealing.value_at(step, budget), linear
             0 -> 1: raw source first, flowed source last)
             added after the first results, when these lost to pretrain + fine-tune + aug at k >= 5 (the same
             selection decides between old and new): pretrain on raw + flowed source, fine-tune on the target |
             pretrain on raw source, fine-tune on target + flowed source | pretrain on raw + flowed source,
             fine-tune on target + flowed source (each + aug in both phases, half the budget per phase) |
             target + raw + flowed source + aug with half of every batch from the target (and, as a baseline,
             target + raw source + aug sampled the same way)
             a third round, added after the second round's results (k = 1 came closest, and there the flowed
             source collapses onto the single shot): the two raw + flowed recipes, uniform and half-target
             batches, with the source flowed toward the shots plus random-affine copies of them (aug's ranges, at
             least 20 reference images per class: 19 copies per shot at k = 1, 3 at k = 5, 1 at k = 10, none at
             k = 100)

"aug" is the standard augmentation for digits, applied per sample on every batch: a random affine map with
torchvision ``RandomAffine(15, (0.1, 0.1), (0.9, 1.1), 10)``'s rotation, scale and shear ranges, drawn independently
for each image and applied in one batched ``affine_grid``/``grid_sample`` call (v2 ``RandomAffine`` draws one map per
call: per-image maps would need a Python loop per image). Two differences from torchvision: bilinear instead of
nearest sampling, and the +-10 % offset is drawn in input coordinates (before the inverse map), so the image's
actual shift reaches about +-15 % and is not uniform.

Selection (stage 1, no test image read): every candidate recipe is trained on one separate draw (index 10) with
``--select-seeds`` seeds and scored on the validation split; the recipe with the highest mean validation accuracy
is fixed per k. Stage 2 trains the baselines and that recipe on draws 0..``--draws``-1 x ``--seeds`` seeds and
scores them on the test split; the recipe with ``class_map="ot"`` (the class correspondence learned by OT between
class distributions, as in the paper, instead of assumed) runs on one seed per draw (exploratory; a raw-source
phase keeps the source labels, as every raw-source baseline does, so the pretrain candidates' ot rows still
assume the correspondence while pretraining). The baselines in ``VAL_REFERENCES`` are scored on validation next
to the candidates, never selected. Each flowaug record gives the paired difference against the strongest
baseline of its cell (highest test mean) with a 95 % t-interval over the shared (draw, seed) runs and one over
the per-draw means (df = draws - 1: with 3 draws it can come out narrower than the first by chance).

Every finished training is appended at once to ``<out>.cells.jsonl`` (committed with the results): a rerun skips
what is there, so the grid can be completed across sessions. ``--jobs N`` runs N trainings in parallel, one thread
each (2 cores: ``--jobs 2``).

    python benchmarks/budget.py --source mnist --target usps --k 1 5 10 100 --jobs 2 --data ../shared/data \\
        --out benchmarks/results/budget_mnist_usps.json
    python benchmarks/budget.py --source usps --target mnist --k 1 5 10 100 --jobs 2 --data ../shared/data \\
        --recipes-from benchmarks/results/budget_mnist_usps.json --out benchmarks/results/budget_usps_mnist.json
    python benchmarks/budget.py --quick --data ../shared/data      # a smoke run: seconds, not a result
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

import flowaug  # noqa: E402
from benchmarks.common import (append, machine, markdown_table, paired, run_parallel, t_interval,  # noqa: E402, F401
                               write_json)
from flowaug.data import load_dataset, resize_images  # noqa: E402
from benchmarks.models import LeNet5, accuracy, per_class  # noqa: E402

PRETRAIN = "pretrain on raw source, fine-tune on target"
BALANCED = ", half of each batch from the target"
#: every variant, baseline or recipe, is one spec: (source of a pretraining phase, or None; source mixed into the
#: target batches, or None; share of each batch drawn from the target, or None: uniform over target + source;
#: aug). A pretraining phase takes half the budget. Source kinds are ``Source``'s.
BASELINES = {"target only": (None, None, None, False), "target + aug": (None, None, None, True),
             "target + raw source": (None, "raw", None, False), "target + raw source + aug": (None, "raw", None, True),
             PRETRAIN: ("raw", None, None, False), PRETRAIN + " (+ aug in both)": ("raw", None, None, True),
             "target + raw source + aug" + BALANCED: (None, "raw", 0.5, True)}
#: candidate recipes: all with aug, class_map="same"
CANDIDATES = {"target + flowed source + aug": (None, "flowed", None, True),
              "target + half-flowed source + aug": (None, "half", None, True),
              "target + raw + flowed source + aug": (None, "raw + flowed", None, True),
              "target + randomly flowed source + aug": (None, "random", None, True),
              "target + FlowAnnealing curriculum + aug": (None, "curriculum", None, True)}
#: added after the first results (issue 10: the recipes above lost to PRETRAIN + aug at k >= 5): the same
#: selection on validation decides between all candidates, old and new
#: (pretraining, then fine-tuning, sees the target in as many batches as half-target batches do: the balanced
#: baseline above was added with them)
LATE_CANDIDATES = {
    "pretrain on raw + flowed source, fine-tune on target (+ aug in both)": ("raw + flowed", None, None, True),
    "pretrain on raw source, fine-tune on target + flowed source (+ aug in both)": ("raw", "flowed", None, True),
    "pretrain on raw + flowed source, fine-tune on target + flowed source (+ aug in both)":
        ("raw + flowed", "flowed", None, True),
    "target + raw + flowed source + aug" + BALANCED: (None, "raw + flowed", 0.5, True)}
CANDIDATES.update(LATE_CANDIDATES)
#: a third round, added after the second round's test results: k = 1 came closest, and there the flowed source
#: collapses onto the single shot per class (see ``diversity``). These flow the source toward the shots *plus
#: random-affine copies of them* (aug's ranges; at least ``REF_PER_CLASS`` reference images per class), so that the
#: flow has a target distribution with some variety to spread over. Selected on validation with all the others.
AUG_REF = "source flowed toward augmented shots"
THIRD_CANDIDATES = {f"target + raw + {AUG_REF} + aug": (None, "raw + flowed", None, True),
                    f"target + raw + {AUG_REF} + aug" + BALANCED: (None, "raw + flowed", 0.5, True)}
CANDIDATES.update(THIRD_CANDIDATES)
VARIANTS = {**BASELINES, **CANDIDATES}  # name -> spec, every variant
REF_PER_CLASS = 20
OT_SUFFIX = " [class_map=ot]"
FLOW = dict(steps=10, step_size=0.2, labels="flow", snapshots=11)
SELECT_DRAW, VAL_PER_CLASS, VAL_SEED = 10, 100, 12345
#: scored on validation next to the candidates (never selected): says before any test score whether the chosen
#: recipe can be expected to beat the baselines that were strongest in the first and second rounds
VAL_REFERENCES = [PRETRAIN + " (+ aug in both)", "target + raw source + aug" + BALANCED]


def random_affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample random affine maps of a (B, C, H, W) batch in one grid_sample (zeros outside)."""
    b = x.shape[0]

    def u(lo, hi):
        return torch.rand(b, generator=g) * (hi - lo) + lo

    angle, shear = u(-15, 15) * math.pi / 180, u(-10, 10) * math.pi / 180
    scale, tx, ty = u(0.9, 1.1), u(-0.2, 0.2), u(-0.2, 0.2)  # translation in [-1, 1] grid units: +-10 %
    cos, sin = torch.cos(angle), torch.sin(angle)
    a = torch.stack([torch.stack([cos, -sin + torch.tan(shear) * cos, tx], 1),
                     torch.stack([sin, cos + torch.tan(shear) * sin, ty], 1)], 1) / scale[:, None, None]
    a[:, :, 2] *= scale[:, None]  # the translation is not scaled
    grid = F.affine_grid(a, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


class Cycle:
    """Indices into n items, ``b`` at a time, from a fresh permutation each pass (with replacement if n < b)."""

    def __init__(self, n: int, g: torch.Generator):
        self.n, self.g, self.order, self.pos = n, g, torch.randperm(n, generator=g), 0

    def take(self, b: int) -> torch.Tensor:
        if self.n < b:
            return torch.randint(self.n, (b,), generator=self.g)
        if self.pos + b > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
        self.pos += b
        return self.order[self.pos - b: self.pos]


def train(target, source, score, *, steps: int, seed: int, aug: bool, model=None, target_share=None, evals=None):
    """``steps`` AdamW steps on batches of 64 drawn from the union of ``target`` (x, y) and ``source`` (a callable
    ``(indices, step) -> (x, y)`` with a length ``n``); either may be None. ``target_share``: the fraction of
    every batch drawn from the target (its own cycle), the rest from the source; None: uniform over the union.
    Returns the accuracies on ``score`` = (x, y) after the steps in ``evals`` (default: half the steps and the
    end), and the model. The batch stream does not depend on ``steps``: a longer run extends a shorter one."""
    torch.manual_seed(seed)
    model = model if model is not None else LeNet5(first=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    n_t = 0 if target is None else len(target[0])
    n_s = 0 if source is None else source.n
    if target_share is not None and not (n_t and n_s):
        raise ValueError("target_share needs both a target and a source")
    if target_share is None:
        cycle = Cycle(n_t + n_s, g)
    else:
        from_target, cycle_t, cycle_s = round(64 * target_share), Cycle(n_t, g), Cycle(n_s, g)
    accs = []
    for step in range(steps):
        if target_share is None:
            idx = cycle.take(64)
        else:
            idx = torch.cat([cycle_t.take(from_target), cycle_s.take(64 - from_target) + n_t])
        from_t = idx < n_t
        xs, ys = [], []
        if from_t.any():
            xs.append(target[0][idx[from_t]]), ys.append(target[1][idx[from_t]])
        if not from_t.all():
            sx, sy = source(idx[~from_t] - n_t, step)
            xs.append(sx), ys.append(sy)
        xb, yb = torch.cat(xs), torch.cat(ys)
        if aug:
            xb = random_affine(xb, g)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step + 1 in (evals or (steps // 2, steps)):
            with torch.no_grad():  # LeNet-5 has no dropout or batch norm: train/eval modes agree
                accs.append(accuracy(model, *score) * 100)
    return accs, model


class Source:
    """Source images for one variant: raw, a fixed flow time, raw + flowed, a random flow time per draw, or the
    FlowAnnealing curriculum read through the FlowDataset itself."""

    def __init__(self, kind: str, raw, flowed: dict | None, steps: int, g: torch.Generator):
        self.kind, self.raw, self.f, self.steps, self.g = kind, raw, flowed, steps, g
        self.n = len(raw[0]) * (2 if kind == "raw + flowed" else 1)
        if kind == "curriculum":
            self.anneal = flowaug.FlowAnnealing(flowed["dataset"], "linear", interval="step")

    def __call__(self, idx: torch.Tensor, step: int):
        x0, y0 = self.raw
        if self.kind == "raw":
            return x0[idx], y0[idx]
        snaps, y1 = self.f["snapshots"], self.f["labels"]  # (S, N, 1, H, W), (N,)
        if self.kind in ("flowed", "half"):
            return snaps[-1 if self.kind == "flowed" else (len(snaps) - 1) // 2][idx], y1[idx]
        if self.kind == "raw + flowed":
            n = len(x0)
            flowed = idx >= n
            x = torch.where(flowed[:, None, None, None], snaps[-1][idx % n], x0[idx % n])
            return x, torch.where(flowed, y1[idx % n], y0[idx % n] if self.f["same"] else y1[idx % n])
        if self.kind == "random":
            pos = torch.rand(len(idx), generator=self.g) * (len(snaps) - 1)
            lo = pos.floor().long().clamp(max=len(snaps) - 2)
            w = (pos - lo)[:, None, None, None]
            return torch.lerp(snaps[lo, idx], snaps[lo + 1, idx], w), y1[idx]
        fd = self.f["dataset"]  # curriculum: the library's own interpolation between snapshots
        fd.strength = self.anneal.value_at(step, self.steps)
        return torch.stack([fd[int(i)][0] for i in idx]), y1[idx]


def load_pair(args):
    """(source train, target train minus validation, validation, test), images (N, 1, 28, 28) in [0, 1]."""
    def prep(x):  # uint8 (N, 1, H, W) -> float (N, 1, 28, 28)
        return resize_images(x.float() / 255, (28, 28))

    sx, sy = load_dataset(args.source, "train", data_dir=args.data)
    tx, ty = load_dataset(args.target, "train", data_dir=args.data)
    ex, ey = load_dataset(args.target, "test", data_dir=args.data)
    g = torch.Generator().manual_seed(VAL_SEED)
    val = torch.cat([torch.nonzero(ty == c).flatten()[torch.randperm(int((ty == c).sum()), generator=g)[:VAL_PER_CLASS]]
                     for c in torch.unique(ty).tolist()])
    keep = torch.ones(len(ty), dtype=torch.bool)
    keep[val] = False
    return (prep(sx), sy), (prep(tx[keep]), ty[keep]), (prep(tx[val]), ty[val]), (prep(ex), ey)


def draw_data(data, k: int, draw: int, per_class_source: int):
    """The source sample and the k-shot target draw of one draw index."""
    (sx, sy), (tx, ty), _, _ = data
    return per_class(sx, sy, per_class_source, seed=100 + draw), per_class(tx, ty, k, seed=draw)


def augmented_shots(shots, seed: int):
    """The shots plus random-affine copies of each (aug's ranges, seeded): at least ``REF_PER_CLASS`` per class."""
    x, y = shots  # (n, 1, H, W), (n,)
    copies = -(-REF_PER_CLASS // int(torch.bincount(y).min())) - 1
    if copies <= 0:
        return shots
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.cat([x, random_affine(x.repeat(copies, 1, 1, 1), g)]), torch.cat([y, y.repeat(copies)])


def flow_source(raw, shots, *, class_map: str, seed: int, cache_dir: str | None, augmented: bool = False) -> dict:
    """Class-wise Sinkhorn flow of the source toward the shots, or toward ``augmented_shots`` (FlowDataset
    precompute, every step kept)."""
    reference = augmented_shots(shots, seed) if augmented else shots
    fd = flowaug.FlowDataset(TensorDataset(*raw), reference, class_map=class_map, seed=seed, progress=False,
                             cache_dir=cache_dir, **FLOW)
    snaps = []
    for s in fd.snapshot_steps:
        fd.strength = s / fd.snapshot_steps[-1]
        snaps.append(torch.stack([fd[i][0] for i in range(len(fd))]))
    fd.strength = 1.0
    labels = torch.stack([torch.as_tensor(fd[i][1]) for i in range(len(fd))])
    return {"dataset": fd, "snapshots": torch.stack(snaps), "labels": labels, "same": class_map == "same"}


def diversity(raw, flowed: dict, shots, val) -> dict:
    """Where generated source images sit: mean distance to the nearest shot and to the nearest validation image of
    their class (closer = more target-like), and mean within-class pairwise distance (variety), in pixel L2."""
    def stats(x, y, itself=False):
        x = x.flatten(1)
        out = {"to_shot": [], "to_val": [], "spread": []}
        for c in torch.unique(y).tolist():
            xc = x[y == c]
            out["to_shot"].append(torch.cdist(xc, shots[0][shots[1] == c].flatten(1)).min(1).values.mean())
            d = torch.cdist(xc, val[0][val[1] == c].flatten(1))
            out["to_val"].append((d.fill_diagonal_(float("inf")) if itself else d).min(1).values.mean())
            out["spread"].append(torch.pdist(xc).mean() if len(xc) > 1 else torch.tensor(float("nan")))
        return {key: float(torch.stack(v).mean()) for key, v in out.items()}

    snaps = flowed["snapshots"]
    return {"raw source": stats(*raw), "half-flowed (t=0.5)": stats(snaps[(len(snaps) - 1) // 2], flowed["labels"]),
            "flowed (t=1)": stats(snaps[-1], flowed["labels"]), "target validation": stats(*val, itself=True)}


def run_unit(args, stage: str, k: int, draw: int, seed_index: int, variants: list[str]) -> None:
    """Train ``variants`` on one (draw, seed), paired; each record (and the draw's diversity) appended at once."""
    torch.set_num_threads(1)
    data = load_pair(args)
    raw, shots = draw_data(data, k, draw, args.per_class)
    score = data[2] if stage == "select" else data[3]  # validation when selecting, test when reporting
    seed = 1000 * draw + seed_index
    flows = {}
    for v in variants:
        t0 = time.perf_counter()
        name, class_map = (v[: -len(OT_SUFFIX)], "ot") if v.endswith(OT_SUFFIX) else (v, "same")
        augmented = name in THIRD_CANDIDATES
        key, tag = (class_map, augmented), (", augmented reference" if augmented else "")
        if name in CANDIDATES and key not in flows:  # baselines use the raw source only
            flows[key] = flow_source(raw, shots, class_map=class_map, seed=draw, cache_dir=args.cache,
                                     augmented=augmented)
            if class_map == "same" and seed_index == 0:
                append(args.partial, {"stage": stage, "k": k, "draw": draw, "kind": "diversity" + tag,
                                      "diversity": diversity(raw, flows[key], shots, data[2])})
            if class_map == "ot":
                agree = float((flows[key]["labels"] == raw[1]).float().mean())
                append(args.partial, {"stage": stage, "k": k, "draw": draw, "kind": "ot labels" + tag,
                                      "agreement": agree})
        accs = train_variant(VARIANTS[name], raw, flows.get(key), shots, score, args.budget_steps, seed)
        append(args.partial, {"stage": stage, "k": k, "draw": draw, "seed": seed, "variant": v, "half": accs[0],
                              "accuracy": accs[1], "seconds": time.perf_counter() - t0})
        print(f"[{stage}] k={k} draw {draw} seed {seed}: {v} {accs[1]:.1f}", flush=True)


def train_variant(spec: tuple, raw, flowed: dict | None, shots, score, budget: int, seed: int,
                  evals=None) -> list[float]:
    """A baseline or recipe (``VARIANTS`` spec): optionally pretrain on a source alone for half the budget, then
    train on the target (+ a source) for the rest. Returns the accuracy at half and at the full budget (NaN at
    half after a pretraining phase: that is its end, not a comparable point), or, without a pretraining phase,
    after the steps in ``evals`` (``train``'s)."""
    pre_kind, kind, share, aug = spec
    g = torch.Generator().manual_seed(seed + 77)
    model, steps = None, budget
    if pre_kind is not None:
        _, model = train(None, Source(pre_kind, raw, flowed, budget // 2, g), score, steps=budget // 2, seed=seed,
                         aug=aug)
        steps = budget - budget // 2
    src = None if kind is None else Source(kind, raw, flowed, steps, g)
    accs, _ = train(shots, src, score, steps=steps, seed=seed, aug=aug, model=model, target_share=share,
                    evals=evals)
    return accs if pre_kind is None else [float("nan"), accs[-1]]


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def run_units(args, units: list[tuple]) -> None:
    """Run (stage, k, draw, seed_index, variants) units, skipping trainings already recorded."""
    done = {(r["stage"], r["k"], r["draw"], r["seed"], r["variant"]) for r in read_records(args.partial) if "variant" in r}
    todo = []
    for stage, k, draw, s, variants in units:
        left = [v for v in variants if (stage, k, draw, 1000 * draw + s, v) not in done]
        if left:
            todo.append((stage, k, draw, s, left))
    run_parallel(run_unit, args, todo)


def choose_recipes(records: list[dict], ks: list[int]) -> tuple[dict, dict]:
    """Per k, the candidate with the highest mean validation accuracy (stage "select" only)."""
    table, recipe = {}, {}
    for k in ks:
        runs = {v: [r["accuracy"] for r in records if r.get("variant") == v and r["k"] == k and r["stage"] == "select"]
                for v in CANDIDATES}
        table[k] = {v: {"validation_mean": statistics.mean(a), "runs": a} for v, a in runs.items() if a}
        if table[k]:
            recipe[k] = max(table[k], key=lambda v: table[k][v]["validation_mean"])
        for name in VAL_REFERENCES:  # references, not candidates
            ref = [r["accuracy"] for r in records if r.get("variant") == name and r["k"] == k and r["stage"] == "select"]
            if ref:
                table[k]["reference baseline: " + name] = {"validation_mean": statistics.mean(ref), "runs": ref}
    return table, recipe


def summarize(records: list[dict], ks: list[int], recipe: dict, budget: int) -> list[dict]:
    """One record per (variant, k) of the test stage, in issue 10's schema. The strongest baseline of a cell is the
    one with the highest test mean: a choice made on the test split, which can only favour the baselines."""
    out = []
    for k in ks:
        final = [r for r in records if r["stage"] == "final" and r["k"] == k and "variant" in r]
        runs = {}
        for r in final:  # one run per (variant, draw, seed): the first written
            runs.setdefault(r["variant"], {}).setdefault((r["draw"], r["seed"]), r)
        names = [v for v in BASELINES if v in runs] + [v for v in runs if v not in BASELINES]
        keyed = {v: {key: r["accuracy"] for key, r in runs[v].items()} for v in names}
        means = {v: statistics.mean(keyed[v].values()) for v in names}
        base = [v for v in BASELINES if v in runs]
        best = max(base, key=means.get) if base else None
        for v in names:
            rs = sorted(runs[v].values(), key=lambda r: (r["draw"], r["seed"]))
            acc = [r["accuracy"] for r in rs]
            half = [r["half"] for r in rs if not math.isnan(r["half"])]
            rec = {"variant": v, "kind": "baseline" if v in BASELINES else "flowaug", "k": k, "mean": means[v],
                   "std": statistics.stdev(acc) if len(acc) > 1 else None,
                   "runs": [{"draw": r["draw"], "seed": r["seed"], "accuracy": r["accuracy"]} for r in rs],
                   "optimizer_steps": budget, "mean_at_half_budget": statistics.mean(half) if half else None}
            if v not in BASELINES:
                rec["flow_steps"] = FLOW["steps"]
                rec["recipe"] = v == recipe.get(k)
                # exploratory: the ot rows (one seed per draw), and first-round recipes that the second round's
                # selection replaced (their runs stopped where they were): neither is a claim
                rec["exploratory"] = v.endswith(OT_SUFFIX) or v != recipe.get(k)
                rec["vs_best_baseline"] = {"baseline": best, **paired(keyed[v], keyed[best])} if best else None
            out.append(rec)
    return out


def render_table(records: list[dict], ks: list[int]) -> str:
    names = list(dict.fromkeys(r["variant"] for r in records))
    rows = []
    for v in names:
        cells = []
        for k in ks:
            r = next((r for r in records if r["variant"] == v and r["k"] == k), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['mean']:.1f} ± {r['std'] or 0:.1f} ({len(r['runs'])})"
            if r.get("exploratory"):
                cell = "exploratory: " + cell
            c = r.get("vs_best_baseline")
            if c and c["ci95"]:
                cell += f" {c['mean_diff']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
                if c.get("ci95_over_draw_means"):
                    lo, hi = c["ci95_over_draw_means"]
                    cell += f", draws [{lo:+.1f}, {hi:+.1f}]"
            cells.append(cell)
        rows.append([v, *cells])
    return markdown_table(["variant (mean ± std (runs); flowaug: paired diff vs best baseline [95% CI over runs], "
                           "draws [95% CI over per-draw means]; exploratory: not the recipe of that k)",
                           *[f"k={k}" for k in ks]], rows)


def recipe_table(records: list[dict], pair: str) -> str:
    """One row per k: the recipe fixed on validation against the strongest baseline of its cell."""
    rows = []
    for r in records:
        c = r.get("vs_best_baseline")
        if not r.get("recipe") or not c or not c["ci95"]:
            continue
        b = next(x for x in records if x["variant"] == c["baseline"] and x["k"] == r["k"])
        draws = c.get("ci95_over_draw_means") or [math.nan, math.nan]
        rows.append([pair, r["k"], r["variant"], f"{r['mean']:.1f} ± {r['std']:.1f}", c["baseline"],
                     f"{b['mean']:.1f} ± {b['std']:.1f}", f"{c['mean_diff']:+.1f}",
                     f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]", f"[{draws[0]:+.1f}, {draws[1]:+.1f}]",
                     c["pairs"]])
    return markdown_table(["pair", "k", "recipe (fixed on validation)", "recipe", "strongest baseline (by test mean)",
                           "baseline", "paired diff", "95% CI, runs", "95% CI, draw means", "runs"], rows)


def picture(args, ks: list[int], path: str, augmented_row: bool) -> None:
    """Source / flowed / target images of draw 0 (one per class), for up to two k (cached flows are reused);
    ``augmented_row``: also the third round's flow toward augmented shots (where this pair trained it)."""
    from flowaug.plotting import image_grid

    data = load_pair(args)
    rows, labels = [], []
    for k in ks[:1] + ks[-1:] if len(ks) > 1 else ks:
        raw, shots = draw_data(data, k, 0, args.per_class)
        f = flow_source(raw, shots, class_map="same", seed=0, cache_dir=args.cache)
        first = torch.stack([torch.nonzero(raw[1] == c)[0, 0] for c in range(10)])
        g = torch.Generator().manual_seed(0)
        rand = Source("random", raw, f, 1, g)(first, 0)[0]
        if not rows:
            rows.append(raw[0][first]), labels.append(f"{args.source} (raw)")
        rows += [f["snapshots"][5][first], f["snapshots"][-1][first], rand]
        labels += [f"k={k}: t=0.5", f"k={k}: t=1", f"k={k}: random t"]
        if augmented_row and k < REF_PER_CLASS:  # the third round's flow toward augmented shots (identical from REF_PER_CLASS on)
            fa = flow_source(raw, shots, class_map="same", seed=0, cache_dir=args.cache, augmented=True)
            rows.append(fa["snapshots"][-1][first]), labels.append(f"k={k}: t=1, augmented shots")
        rows.append(shots[0][torch.stack([torch.nonzero(shots[1] == c)[0, 0] for c in range(10)])])
        labels.append(f"k={k}: {args.target} shot")
    image_grid(rows, path, row_labels=labels, columns=10,
               title=f"{args.source} -> {args.target}: source flowed class-wise toward the k shots")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="mnist")
    p.add_argument("--target", default="usps")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10, 100])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--select-seeds", type=int, default=2)
    p.add_argument("--budget-steps", type=int, default=2000)
    p.add_argument("--per-class", type=int, default=200, help="source images per class")
    p.add_argument("--stop-after", choices=["select", "final"], default="final")
    p.add_argument("--recipes-from", metavar="JSON", help="take the recipes (and their selection) from another pair's "
                   "result instead of selecting on this pair's validation split")
    p.add_argument("--data", metavar="DIR")
    p.add_argument("--cache", default="benchmarks/out/flow_cache", help="FlowDataset cache of the flowed sources")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=None, help="default: benchmarks/results/budget_<source>_<target>.json")
    p.add_argument("--report", action="store_true", help="no training: tables, JSON and picture from the records "
                   "already in the cells file")
    p.add_argument("--quick", action="store_true", help="k=10, one draw and seed, 60 steps, 20 source images per class")
    args = p.parse_args(argv)
    if args.quick:
        args.k, args.draws, args.seeds, args.select_seeds, args.budget_steps, args.per_class = [10], 1, 1, 1, 60, 20
    args.out = args.out or f"benchmarks/results/budget_{args.source}_{args.target}{'_quick' if args.quick else ''}.json"
    if args.draws > SELECT_DRAW:
        p.error(f"--draws must be at most {SELECT_DRAW}: draw {SELECT_DRAW} is the selection draw")
    # the records of one setting live in one file: a rerun with another budget or source size never mixes them
    setting = "" if (args.budget_steps, args.per_class) == (2000, 200) else f".b{args.budget_steps}.pc{args.per_class}"
    args.partial = args.out[: -len(".json")] + setting + ".cells.jsonl"
    os.makedirs(os.path.dirname(args.partial) or ".", exist_ok=True)
    t0 = time.time()
    if args.recipes_from:
        with open(args.recipes_from) as handle:
            other = json.load(handle)
        recipe = {k: other["recipe"][str(k)] for k in args.k}
        selection = {"taken_from": f"{other['source']} -> {other['target']} ({os.path.basename(args.recipes_from)})",
                     **other["selection"]}
    else:
        if not args.report:
            run_units(args, [("select", k, SELECT_DRAW, s, list(CANDIDATES) + VAL_REFERENCES) for k in args.k
                             for s in range(args.select_seeds)])
        selection, recipe = choose_recipes(read_records(args.partial), args.k)
    print("recipes fixed on validation:", recipe, flush=True)
    if args.stop_after == "final" and not args.report:
        units = [("final", k, d, s, list(BASELINES) + [recipe[k]] + ([recipe[k] + OT_SUFFIX] if s == 0 else []))
                 for s in range(args.seeds) for k in args.k for d in range(args.draws)]
        run_units(args, units)
    wanted = {1000 * d + s for d in range(args.draws) for s in range(args.seeds)}
    everything = [r for r in read_records(args.partial) if r["stage"] == "select" or "seed" not in r or r["seed"] in wanted]
    records = summarize(everything, args.k, recipe, args.budget_steps)
    table = render_table(records, args.k)
    print(table)
    summary = recipe_table(records, f"{args.source} -> {args.target}")
    print(summary)
    extras = {}
    for kind, key in (("diversity", "diversity"), ("ot labels", "agreement"), ("diversity, augmented reference",
                      "diversity"), ("ot labels, augmented reference", "agreement")):  # one per draw (a resumed
        extras[kind] = {k: {r["draw"]: r[key] for r in everything  # unit may have written one twice)
                            if r.get("kind") == kind and r["k"] == k and r["stage"] == "final" and r["draw"] < args.draws}
                        for k in args.k}
        extras["selection draw: " + kind] = {k: r[key] for r in everything if r.get("kind") == kind
                                             and r["stage"] == "select" for k in [r["k"]]}
    png = args.out[: -len(".json")] + ".png"
    third = any(r.get("variant", "").replace(OT_SUFFIX, "") in THIRD_CANDIDATES for r in everything)
    picture(args, args.k, png, augmented_row=third)
    write_json(args.out, {
        "source": args.source, "target": args.target, "protocol": "budget", "budget_steps": args.budget_steps,
        "selection": selection if args.recipes_from else {
            "rule": "per k, the candidate recipe with the highest mean accuracy on the validation split "
                    f"({VAL_PER_CLASS} target-train images per class held out, disjoint from every draw), "
                    f"trained on draw {SELECT_DRAW} x {args.select_seeds} seeds; the test split is not read",
            "fixed_a_priori": "budget, batch, optimizer, uniform sampling from the concatenation of target and "
                              f"source, augmentation ranges, flow settings {FLOW} (the published-protocol run's)",
            "added_after_first_results": sorted(LATE_CANDIDATES) + ["baseline: target + raw source + aug" + BALANCED],
            "added_after_second_results": sorted(THIRD_CANDIDATES),
            "validation_accuracy": selection},
        "recipe": recipe, "records": records, "table": table, "recipe_table": summary,
        "best_baseline_rule": "per cell, the baseline with the highest test mean (a test-split choice that can only "
                              "favour the baselines); ci95 is over paired runs, ci95_over_draw_means over the "
                              "per-draw mean differences (df = draws - 1)",
        "diversity_per_draw": extras["diversity"], "ot_label_agreement_per_draw": extras["ot labels"],
        **{key: value for key, value in (  # the third round's, where this pair has them
            ("diversity_per_draw_augmented_reference", extras["diversity, augmented reference"]),
            ("ot_label_agreement_per_draw_augmented_reference", extras["ot labels, augmented reference"]),
            ("diversity_selection_draw", {kind: extras["selection draw: " + kind] for kind in (
                "diversity", "diversity, augmented reference") if extras["selection draw: " + kind]}))
           if any(value.values())},
        "picture": os.path.basename(png), "planned_runs": args.draws * args.seeds, "config": vars(args),
        "machine": machine(), "seconds_this_invocation": time.time() - t0})
    print(f"wrote {args.out} and {png} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
