"""Is the budget converged? Test accuracy of the strongest baseline and the recipe of each k along one long run.

``budget.py`` trains every variant for ``--budget-steps`` and records the accuracy at half and at the full
budget; issue 10 asks for a budget at which the best baseline has converged. A training's batch stream does not
depend on its length (``budget.train``), so one run of ``--steps`` steps, scored at doubling step counts, is the
2,000- and 4,000-step runs of ``budget.py`` (same draw and seed) continued. Which variants: per k, the strongest
baseline and the recipe of a committed ``budget.py`` result (``--from``); variants with a pretraining phase are
skipped, and so is the FlowAnnealing curriculum (their phases or schedule scale with the budget: one long run
is not their shorter runs continued). This chooses
nothing: it only says how far the 2,000-step numbers are from converged. With several draws and seeds the JSON
and table give, per k and step count, the paired difference recipe - baseline with a 95 % t-interval over the runs
(``budget.paired``). Exploratory: at a longer budget another baseline could become the strongest one.

    python benchmarks/budget_curve.py --from benchmarks/results/budget_mnist_usps.json --k 1 5 10 \\
        --steps 16000 --jobs 2 --data ../shared/data --out benchmarks/results/budget_curve_mnist_usps.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from benchmarks import budget  # noqa: E402
from benchmarks.common import machine, markdown_table, write_json  # noqa: E402


def evals(steps: int) -> list[int]:
    out = [500]
    while out[-1] * 2 <= steps:
        out.append(out[-1] * 2)
    return out if out[-1] == steps else out + [steps]


def continues(spec: tuple) -> bool:
    """Whether a long run of this spec is its shorter runs continued: no pretraining phase, no curriculum."""
    return spec[0] is None and spec[1] != "curriculum"


def run(args, k: int, variant: str, draw: int, seed_index: int) -> None:
    """One long training of ``variant`` at ``k`` on (draw, seed index), appended at once."""
    torch.set_num_threads(1)
    data = budget.load_pair(args)
    raw, shots = budget.draw_data(data, k, draw, args.per_class)
    spec = budget.VARIANTS[variant]
    flowed = budget.flow_source(raw, shots, class_map="same", seed=draw, cache_dir=args.cache,
                                augmented=variant in budget.THIRD_CANDIDATES) if variant in budget.CANDIDATES else None
    seed = 1000 * draw + seed_index
    t0 = time.perf_counter()
    accs = budget.train_variant(spec, raw, flowed, shots, data[3], args.steps, seed, evals=evals(args.steps))
    budget.append(args.partial, {"k": k, "variant": variant, "draw": draw, "seed": seed, "spec": list(spec),
                                 "steps": evals(args.steps), "accuracy": accs, "seconds": time.perf_counter() - t0})
    print(f"k={k} draw {draw} seed {seed} {variant}: " + " ".join(f"{a:.1f}" for a in accs), flush=True)


def summarize(records: list[dict], wanted: list[tuple], recipe: dict, steps: list[int]) -> tuple[list[dict], str]:
    """Per (k, variant): mean accuracy at each step count; per k: recipe - baseline, paired, at each step count."""
    out, rows = [], []
    for k in sorted({k for k, _ in wanted}):
        acc = {}
        for r in records:
            if r["k"] == k:
                acc.setdefault(r["variant"], {})[(r["draw"], r["seed"])] = r["accuracy"]
        for v in [v for kk, v in wanted if kk == k and v in acc]:
            runs = acc[v]
            mean = [statistics.mean(a[i] for a in runs.values()) for i in range(len(steps))]
            out.append({"k": k, "variant": v, "recipe": v == recipe[str(k)], "runs": len(runs), "mean": mean})
            rows.append([k, v + (" (recipe)" if v == recipe[str(k)] else ""), len(runs), *[f"{m:.1f}" for m in mean]])
        names = [v for kk, v in wanted if kk == k and v in acc]
        if len(names) == 2:
            base, rec = names
            diffs = [budget.paired({key: a[i] for key, a in acc[rec].items()},
                                   {key: a[i] for key, a in acc[base].items()}) for i in range(len(steps))]
            out.append({"k": k, "recipe_minus_baseline": diffs})
            rows.append([k, "recipe - baseline, paired [95 % CI over runs]", diffs[0]["pairs"],
                         *[f"{d['mean_diff']:+.1f}" + (f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else "")
                           for d in diffs]])
    return out, markdown_table(["k", "variant", "runs", *[f"{s:,} steps" for s in steps]], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="result", required=True, metavar="JSON", help="a committed budget.py result")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--steps", type=int, default=16000)
    p.add_argument("--draws", type=int, default=1, help="draws 0 .. N-1")
    p.add_argument("--seeds", type=int, default=1, help="seed indices 0 .. N-1 per draw")
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--data", metavar="DIR")
    p.add_argument("--cache", default="benchmarks/out/flow_cache")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.steps < 1000:
        p.error(f"--steps must be at least 1000 (scored at 500, 1000, ...), got {args.steps}")
    with open(args.result) as handle:
        result = json.load(handle)
    args.source, args.target = result["source"], result["target"]
    args.partial = args.out[: -len(".json")] + ".cells.jsonl"
    os.makedirs(os.path.dirname(args.partial) or ".", exist_ok=True)
    wanted = []
    for k in args.k:
        recipe = result["recipe"][str(k)]
        best = next(r for r in result["records"] if r["variant"] == recipe and r["k"] == k)["vs_best_baseline"]
        wanted += [(k, v) for v in (best["baseline"], recipe)
                   if continues(budget.VARIANTS[v])]
    steps = evals(args.steps)
    runs = [(d, s) for s in range(args.seeds) for d in range(args.draws)]
    done = {(r["k"], r["variant"], r["draw"], r["seed"]) for r in budget.read_records(args.partial) if r["steps"] == steps}
    todo = [(k, v, d, s) for d, s in runs for k, v in wanted if (k, v, d, 1000 * d + s) not in done]
    budget.run_parallel(run, args, todo)
    keys = {(d, 1000 * d + s) for d, s in runs}
    records = [r for r in budget.read_records(args.partial) if (r["k"], r["variant"]) in wanted
               and r["steps"] == steps and (r["draw"], r["seed"]) in keys]
    summary, table = summarize(records, wanted, result["recipe"], steps)
    print(table)
    write_json(args.out, {"source": args.source, "target": args.target, "from": os.path.basename(args.result),
                          "draws": args.draws, "seeds": args.seeds, "steps": steps, "summary": summary,
                          "records": records, "table": table, "config": vars(args), "machine": machine()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
