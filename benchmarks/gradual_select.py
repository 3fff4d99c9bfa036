"""Choose the gradual-adaptation recipe on development shifts, never on the evaluated target.

The development shifts are rotation 0 -> 45 degrees (given domains at 15 and 30) and colour +0.75 (given at +0.25 and
+0.5), with development seeds (100, 101) that the evaluation (seeds 0-4, rotation to 60 and colour +1) never uses.
Their own labelled test splits score the candidates, each built from the same source model per (shift, seed):

* ``goat:K=k``: GOAT as published with k generated domains per gap; ``goat:K=k:retrain``: its path in the gradual
  schedule (``benchmarks/gradual.py``'s "GOAT path, gradual schedule");
* ``flow:K=k``: :func:`flowaug.gradual.adapt` with k flow domains per gap; ``:cw`` class-wise flows toward the next
  domain's pseudo-classes, ``:carry`` labels carried along the path, ``:retrain`` the encoder self-trained on each
  real domain (``train_encoder=True``).

Rule: for each method, the candidate with the best mean accuracy over the development shifts and seeds.

    python benchmarks/gradual_select.py --out benchmarks/results/gradual_select.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gradual as bench  # noqa: E402  (puts the repository on the path, as every benchmark does)
from common import append  # noqa: E402

from flowaug.gradual import adapt  # noqa: E402

DEV_TASKS = {"rotate 45": ["--shift", "rotate", "--angle", "45"], "color 0.75": ["--shift", "color", "--color-shift",
                                                                                  "0.75"]}
DEFAULT_VARIANTS = ["goat:K=3", "goat:K=10", "goat:K=20", "goat:K=10:retrain",
                    "flow:K=3", "flow:K=10", "flow:K=20", "flow:K=10:cw", "flow:K=10:carry",
                    "flow:K=10:retrain", "flow:K=10:retrain:cw", "flow:K=20:retrain"]


def candidate(args, data, model, name: str, seed: int):
    """The model a candidate ends with."""
    kind, *opts = name.split(":")
    k = int(next(o for o in opts if o.startswith("K="))[2:])
    g = torch.Generator().manual_seed(seed)
    if kind == "goat":
        args.generated = k
        return bench.goat(args, model, data, g, reencode="retrain" in opts)[0]
    xs = [x for x, _ in data["given"]] + [data["target"][0]]
    return adapt(model[0], model[1], data["source"], xs, generated=k, label_aware="cw" in opts,
                 carry_labels="carry" in opts, train_encoder="retrain" in opts, epochs=args.epochs,
                 batch_size=args.batch, lr=args.lr, confidence=args.confidence, generator=g)


def run(task: str, seed: int, variants: list[str], out: str, done: set) -> None:
    torch.set_num_threads(1)
    args = bench.parse(DEV_TASKS[task] + ["--data", ARGS.data])
    data = bench.build(args, seed)
    model = bench.train_source(args, data, seed)
    for name in variants:
        if (task, seed, name) in done:
            continue
        start = time.time()
        acc = bench.accuracy(candidate(args, data, model, name, seed), *data["test"])
        append(out, {"task": task, "seed": seed, "variant": name, "accuracy": acc, "seconds": time.time() - start})
        print(f"{task:10s} seed {seed}  {name:18s} {acc:6.2f}", flush=True)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--tasks", nargs="+", default=list(DEV_TASKS), choices=list(DEV_TASKS))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--out", default="benchmarks/results/gradual_select.jsonl")
    ARGS = p.parse_args()
    done = set()
    if os.path.exists(ARGS.out):
        with open(ARGS.out) as handle:
            done = {(r["task"], r["seed"], r["variant"]) for r in map(json.loads, handle)}
    for task in ARGS.tasks:
        for seed in ARGS.seeds:
            run(task, seed, ARGS.variants, ARGS.out, done)
    rows = {}
    with open(ARGS.out) as handle:
        for r in map(json.loads, handle):
            rows.setdefault(r["variant"], []).append(r["accuracy"])
    for name, acc in sorted(rows.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        print(f"{name:18s} mean {sum(acc) / len(acc):6.2f} over {len(acc)} (task, seed) runs")


if __name__ == "__main__":
    main()
