"""Choose the gradual-adaptation recipe and the baselines' paths on development shifts, never on an evaluated target.

Development tasks (their own angles, datasets and seeds; the evaluation uses rotation to 60 degrees, colour +1 and
seeds 0-9): rotated MNIST 0 -> 45 and rotated USPS 0 -> 45 (given domains at 15 and 30), colour-shifted MNIST +0.75
(given at +0.25 and +0.5), seeds 100 and 101. Every candidate is scored on a *validation split carved from the
train images* (shifted like the target), never on a test split. Each family has as many candidates
(``benchmarks/gradual.py``'s ``CANDIDATES``): flowaug's flow (steps, classifier potential, domains per gap), GOAT's
exact-plan path and the plain entropic map (domains per gap), all in the gradual schedule (encoder retrained on each
real domain). Rule, per family: the candidate with the best mean validation accuracy over all tasks and seeds.

    python benchmarks/gradual_select.py --data ../shared/data --jobs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gradual as bench
from common import append, machine, read_cells, run_parallel, write_json

DEV_TASKS = {"mnist rotate 45": ["--shift", "rotate", "--angle", "45"],
             "usps rotate 45": ["--dataset", "usps", "--shift", "rotate", "--angle", "45", "--sizes", "2000", "500"],
             "mnist color 0.75": ["--shift", "color", "--color-shift", "0.75"]}


def run(args, task: str, seed: int) -> None:
    torch.set_num_threads(1)
    done = {(r["task"], r["seed"], r["variant"]) for r in read_cells(args.cells)}
    todo = [(fam, spec) for fam, specs in bench.CANDIDATES.items() for spec in specs if (task, seed, spec) not in done]
    if not todo:
        return
    dev = bench.parse(DEV_TASKS[task] + ["--score", "val"] + (["--data", args.data] if args.data else []))
    data = bench.build(dev, seed)
    model = bench.train_source(dev, data, seed)
    bench.pool_sample(data, model, seed)
    for family, spec in todo:
        start = time.time()
        out, steps, _ = bench.walk_method(dev, model, data, torch.Generator().manual_seed(seed), spec, diagnose=False)
        acc = bench.accuracy(out, *data["val"])
        append(args.cells, {"task": task, "seed": seed, "family": family, "variant": spec, "accuracy": acc,
                            "adaptation_steps": steps, "seconds": time.time() - start})
        print(f"{task:17s} seed {seed}  {spec:36s} {acc:6.2f}", flush=True)


def choose(args) -> dict:
    rows = read_cells(args.cells)
    table, chosen = {}, {}
    for family, specs in bench.CANDIDATES.items():
        scores = {}
        for spec in specs:
            acc = [r["accuracy"] for r in rows if r["variant"] == spec and r["task"] in args.tasks]
            if acc:
                scores[spec] = {"mean": statistics.mean(acc), "runs": len(acc), "per_task": {
                    t: statistics.mean(r["accuracy"] for r in rows if r["variant"] == spec and r["task"] == t)
                    for t in args.tasks if any(r["variant"] == spec and r["task"] == t for r in rows)}}
        table[family] = scores
        if scores:
            chosen[family] = max(scores, key=lambda k: scores[k]["mean"])
    for family, scores in table.items():
        for spec, sc in sorted(scores.items(), key=lambda kv: -kv[1]["mean"]):
            mark = "*" if chosen.get(family) == spec else " "
            per = "  ".join(f"{t}: {v:5.1f}" for t, v in sc["per_task"].items())
            print(f"{mark} {family:10s} {spec:36s} mean {sc['mean']:6.2f} ({sc['runs']} runs)  {per}")
    note = ("benchmarks/gradual_select.py: per family (flowaug, GOAT's path, the entropic map; "
            f"{len(bench.CANDIDATES['flowaug'])} candidates each) the best mean accuracy on a validation split carved "
            f"from train, over development tasks {args.tasks} and seeds {args.seeds}, which the evaluation never uses; "
            "no label of an evaluated target chose anything")
    payload = {"note": note, "chosen": chosen, "candidates": bench.CANDIDATES, "table": table, "machine": machine()}
    write_json(args.out, payload)
    return payload


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    p.add_argument("--tasks", nargs="+", default=list(DEV_TASKS), choices=list(DEV_TASKS))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default=bench.SELECTION)
    p.add_argument("--report", action="store_true", help="choose from the cells already written")
    args = p.parse_args(argv)
    args.cells = os.path.splitext(args.out)[0] + ".cells.jsonl"
    if not args.report:
        run_parallel(run, args, [(t, s) for t in args.tasks for s in args.seeds])
    choose(args)


if __name__ == "__main__":
    main()
