"""Dataset condensation: flowaug's class-wise flows in random embeddings against distribution matching (DM).

Every method gives the same number of synthetic images per class (IPC) to the same evaluation, and starts
from the same real images (the random-real baseline):

  random real       the initial images themselves (drawn per class with the condensation seed)
  k-means           per class, the real image nearest each of IPC k-means centroids in the features of a random
                    ConvNet (seeded by the condensation seed)
  DM                distribution matching's update rule (Zhao & Bilen, WACV 2023) at this protocol's reduced
                    budget (below; no flip in the augmentation, the ConvNet's padding 1): per iteration a fresh random
                    ConvNet-3; per class, the squared distance between the mean embeddings of real and synthetic
                    images (after one Siamese DSA draw per class); SGD on the images, lr 1.0, momentum 0.5
  flowaug: ...      flowaug.condense: each class's particles flow toward the real class under a Sinkhorn
                    divergence / Gaussian MMD / mean + MMD in fresh random embeddings (DSA), heavy ball 0.5;
                    the objective and step size chosen per IPC on a validation split carved from train

Evaluation (every method alike): ConvNet-3 (instance norm, average pooling) trained from scratch on the synthetic
set with SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x 0.1 at half the epochs) and DSA on
every batch; accuracy on the full test split. Images are normalised by the train split's mean and std first (as
the DC/DSA/DM code does). Condensation seeds x evaluation seeds, paired across methods.

The protocol here is reduced for a 2-core CPU (stated in the JSON): width 32 instead of 128, 200 condensation
iterations instead of 20,000, 64 real images per class and iteration instead of 256, 300 evaluation epochs
instead of 1,000. ``--published`` sets the anchors' settings (for a GPU).

    python benchmarks/condense.py --dataset mnist --ipc 1 10 50 --jobs 2 --data ../shared/data \\
        --out benchmarks/results/condense_mnist.json
    python benchmarks/condense.py --dataset usps --ipc 1 10 50 --jobs 1 --data ../shared/data \\
        --recipes-from benchmarks/results/condense_mnist.json --out benchmarks/results/condense_usps.json

Every finished unit is appended to ``<out>.cells.jsonl`` at once (a rerun skips what it holds); synthetic sets are
cached under ``benchmarks/out/condense/``. ``--report`` rebuilds the JSON, tables and picture from the cells.
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

import flowaug  # noqa: E402
from benchmarks.common import (append, machine, markdown_table, paired, read_cells, run_parallel,  # noqa: E402
                               write_json)
from flowaug._io import atomic_path  # noqa: E402
from flowaug._shared import mix_seed  # noqa: E402
from flowaug.condense import DSA_DIGITS, _initial, evaluate_synthetic  # noqa: E402
from flowaug.data import load_dataset  # noqa: E402
from flowaug.dsa import SiameseAugment  # noqa: E402
from flowaug.networks import ConvNet  # noqa: E402
from flowaug.objectives import MMD, Sinkhorn  # noqa: E402

BASELINES = ("random real", "k-means", "DM")
#: --control-lr2: DM at twice the published lr, the step the chosen recipes use at IPC 1 and 10 (a control for
#: "is the gain the objective or the step?"; DM's lr was not searched otherwise)
CONTROL = "DM, lr 2"
#: flowaug candidates: name -> (objective factory, step size as a multiple of DM's per-image step 2 lr / IPC)
CANDIDATES = {
    f"flowaug: {name}, step x{m:g}": (name, m)
    for name in ("sinkhorn", "mmd", "mean+mmd") for m in (0.5, 1.0, 2.0)
}
REDUCED = {"width": 32, "iterations": 200, "real_per_class": 64, "eval_epochs": 300}
PUBLISHED = {"width": 128, "iterations": 20000, "real_per_class": 256, "eval_epochs": 1000}


def objective(name: str):
    return {"sinkhorn": lambda: Sinkhorn(), "mmd": lambda: MMD("gaussian"),
            "mean+mmd": lambda: MMD("linear") + MMD("gaussian")}[name]()


# ---------------------------------------------------------------------- data
def load(args):
    """Normalised (train, validation, test) tensors: validation = ``--val-per-class`` train images per class."""
    x, y = load_dataset(args.dataset, "train", data_dir=args.data)
    xt, yt = load_dataset(args.dataset, "test", data_dir=args.data)
    x, xt = x.float() / 255, xt.float() / 255
    mean, std = x.mean(), x.std()
    x, xt = (x - mean) / std, (xt - mean) / std
    g = torch.Generator().manual_seed(12345)
    args.val_per_class = min(args.val_per_class, int(torch.bincount(y).min()) // 3)  # USPS: 180 of its smallest 542
    val = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:args.val_per_class]]
                     for c in range(int(y.max()) + 1)])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    if args.quick:
        keep &= torch.rand(len(y), generator=g) < 0.5
    return (x[keep], y[keep]), (x[val], y[val]), (xt, yt)


# ---------------------------------------------------------------------- condensation methods
def dm(x, y, ipc, args, seed, lr: float = 1.0):
    """Distribution matching's update rule: a fresh random ConvNet per iteration, mean embeddings per class after
    one Siamese DSA draw per class, SGD on the images (lr 1, momentum 0.5), from the same real images."""
    syn, labels = _initial(x, y, ipc, "real", seed)
    syn = syn.clone().requires_grad_(True)
    opt = torch.optim.SGD([syn], lr=lr, momentum=0.5)
    aug = SiameseAugment(DSA_DIGITS)
    g = torch.Generator().manual_seed(mix_seed(seed, "dm") % 2**63)
    by_class = [torch.nonzero(y == c).flatten() for c in range(int(y.max()) + 1)]
    for _ in range(args.iterations):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
        net = ConvNet(x.shape[1], len(by_class), x.shape[2:], args.width).requires_grad_(False)
        loss = syn.new_zeros(())
        for c, idx in enumerate(by_class):
            real = x[idx[torch.randperm(len(idx), generator=g)[: args.real_per_class]]]
            params = aug.draw(generator=g)
            mean_real = net.embed(aug.apply(real, params)).mean(0)
            mean_syn = net.embed(aug.apply(syn[labels == c], params)).mean(0)
            loss = loss + (mean_real - mean_syn).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return syn.detach(), labels


def kmeans(x, y, ipc, args, seed):
    """Per class: the real images nearest to IPC k-means centroids in a random ConvNet's features."""
    torch.manual_seed(mix_seed(seed, "kmeans") % 2**63)
    net = ConvNet(x.shape[1], int(y.max()) + 1, x.shape[2:], args.width).requires_grad_(False)
    out, labels = [], []
    for c in range(int(y.max()) + 1):
        xc = x[y == c]
        with torch.no_grad():
            f = torch.cat([net.embed(xc[i: i + 1024]) for i in range(0, len(xc), 1024)])
        centers = f[torch.randperm(len(f))[:ipc]].clone()
        for _ in range(30):
            assign = torch.cdist(f, centers).argmin(1)
            for k in range(ipc):
                if bool((assign == k).any()):
                    centers[k] = f[assign == k].mean(0)
        out.append(xc[torch.cdist(centers, f).argmin(1)])
        labels.append(torch.full((ipc,), c, dtype=torch.long))
    return torch.cat(out), torch.cat(labels)


def flow_method(name, x, y, ipc, args, seed):
    obj, multiple = CANDIDATES[name]
    syn = flowaug.condense((x, y), ipc, objective=objective(obj), iterations=args.iterations,
                           real_per_class=args.real_per_class, step_size=multiple * 2.0 / ipc, momentum=0.5,
                           width=args.width, seed=seed, checkpoint_every=max(args.iterations, 1), progress=False)
    return syn.images, syn.labels


def cache_path(args, method: str, ipc: int, seed: int) -> str:
    """Where the synthetic set of (method, IPC, condensation seed) is cached, in this protocol's setting."""
    name = f"{args.dataset}-{args.setting}-ipc{ipc}-seed{seed}-{method}.pt"
    return os.path.join(args.cache, name.replace(" ", "_").replace(":", "").replace(",", "").replace("+", "p"))


def synthesize(args, method, ipc, seed, train):
    """The synthetic set of (method, IPC, seed), cached on disk (atomically), and the seconds per iteration."""
    path = cache_path(args, method, ipc, seed)
    if os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        return saved["x"], saved["y"], saved["seconds_per_iteration"]
    x, y = train
    t0 = time.perf_counter()
    if method == "random real":
        sx, sy = _initial(x, y, ipc, "real", seed)
    elif method == "k-means":
        sx, sy = kmeans(x, y, ipc, args, seed)
    elif method in ("DM", CONTROL):
        sx, sy = dm(x, y, ipc, args, seed, lr=2.0 if method == CONTROL else 1.0)
    else:
        sx, sy = flow_method(method, x, y, ipc, args, seed)
    iters = args.iterations if method in ("DM", CONTROL) or method in CANDIDATES else 0
    per_it = (time.perf_counter() - t0) / iters if iters else 0.0
    with atomic_path(path, ".pt") as tmp:
        torch.save({"x": sx, "y": sy, "seconds_per_iteration": per_it}, tmp)
    return sx, sy, per_it


# ---------------------------------------------------------------------- evaluation
def evaluate(sx, sy, score, args, seed) -> float:
    """flowaug.condense.evaluate_synthetic: a fresh ConvNet-3 trained with the anchors' recipe and DSA."""
    return evaluate_synthetic((sx, sy), score, width=args.width, epochs=args.eval_epochs, seed=seed)


# ---------------------------------------------------------------------- units
def run_unit(args, stage: str, method: str, ipc: int, cond_seed: int, eval_seeds: list[int]) -> None:
    """Condense (or load) one synthetic set and evaluate it for each evaluation seed; records appended at once."""
    torch.set_num_threads(1)
    train, val, test = load(args)
    sx, sy, per_it = synthesize(args, method, ipc, cond_seed, train)
    for e in eval_seeds:
        acc = evaluate(sx, sy, val if stage == "select" else test, args, 1000 * cond_seed + e)
        append(args.partial, {"stage": stage, "method": method, "ipc": ipc, "cond_seed": cond_seed, "eval_seed": e,
                              "accuracy": acc, "seconds_per_iteration": per_it})
        print(f"{stage} ipc={ipc} {method} cond={cond_seed} eval={e}: {acc:.2f}%", flush=True)


def done_keys(records) -> set:
    return {(r["stage"], r["method"], r["ipc"], r["cond_seed"], r["eval_seed"]) for r in records}


def plan(args, records, recipe: dict) -> list[tuple]:
    """Units still to run: selection (candidates and DM on validation, first seeds) then the test stage."""
    done = done_keys(records)
    units = []
    for ipc in args.ipc:
        stage_methods = [("select", m, [0], [0]) for m in ([*CANDIDATES, "DM"] if ipc not in recipe else [])]
        if ipc in recipe:
            stage_methods += [("final", m, range(args.cond_seeds), range(args.eval_seeds))
                              for m in (*BASELINES, recipe[ipc], *([CONTROL] if ipc in args.control_lr2 else []))]
        for stage, m, conds, evals in stage_methods:
            for c in conds:
                todo = [e for e in evals if (stage, m, ipc, c, e) not in done]
                if todo:
                    units.append((stage, m, ipc, c, todo))
    return units


def choose(records, ipcs) -> tuple[dict, dict]:
    """Per IPC, the candidate with the best validation accuracy (DM's validation score shown beside it)."""
    table, recipe = {}, {}
    for ipc in ipcs:
        scores = {}
        for r in records:
            if r["stage"] == "select" and r["ipc"] == ipc:
                scores.setdefault(r["method"], []).append(r["accuracy"])
        table[ipc] = {m: statistics.mean(a) for m, a in scores.items()}
        cands = {m: v for m, v in table[ipc].items() if m in CANDIDATES}
        if len(cands) == len(CANDIDATES):
            recipe[ipc] = max(cands, key=cands.get)
    return table, recipe


# ---------------------------------------------------------------------- report
def summarize(records, ipcs, recipe: dict, args) -> list[dict]:
    """One record per (method, IPC) of the test stage, in issue 18's schema."""
    out = []
    for ipc in ipcs:
        runs = {}
        for r in records:
            if r["stage"] == "final" and r["ipc"] == ipc:
                runs.setdefault(r["method"], {}).setdefault((r["cond_seed"], r["eval_seed"]), r)
        keyed = {m: {k: r["accuracy"] for k, r in rs.items()} for m, rs in runs.items()}
        base = (*BASELINES, CONTROL)
        for m in [b for b in base if b in runs] + [m for m in runs if m not in base]:
            acc = [keyed[m][k] for k in sorted(keyed[m])]
            rec = {"method": m, "kind": "baseline" if m in base else "flowaug", "ipc": ipc,
                   "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else None,
                   "runs": [{"cond_seed": k[0], "eval_seed": k[1], "accuracy": keyed[m][k]} for k in sorted(keyed[m])],
                   "iterations": args.iterations if m in ("DM", CONTROL) or m in CANDIDATES else 0,
                   "seconds_per_iteration": statistics.mean(r["seconds_per_iteration"] for r in runs[m].values())}
            if m not in base:
                rec["recipe"] = m == recipe.get(ipc)
                for ref, key in (("DM", "vs_dm"), ("random real", "vs_random"), ("k-means", "vs_kmeans"),
                                 (CONTROL, "vs_dm_lr2")):
                    if ref in keyed:
                        rec[key] = paired(keyed[m], keyed[ref])
            out.append(rec)
    return out


def fmt_diff(p: dict | None) -> str:
    if not p or p.get("mean_diff") is None:
        return ""
    ci = p.get("ci95")
    text = f"{p['mean_diff']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
    draw = p.get("ci95_over_draw_means")
    return text + (f", seeds [{draw[0]:+.2f}, {draw[1]:+.2f}]" if draw else "")


def tables(results, ipcs, selection) -> str:
    rows = []
    for ipc in ipcs:
        for r in (r for r in results if r["ipc"] == ipc):
            rows.append([ipc, r["method"], f"{r['mean']:.2f} ± {r['std'] or 0:.2f} ({len(r['runs'])})",
                         fmt_diff(r.get("vs_dm")), fmt_diff(r.get("vs_random")),
                         f"{r['seconds_per_iteration']:.3f}" if r["iterations"] else ""])
    test = markdown_table(["IPC", "method", "test accuracy % (runs)", "vs DM [95% CI runs], seeds [CI cond-seed means]",
                           "vs random real", "s / iteration"], rows)
    sel = [[ipc, m, f"{v:.2f}"] for ipc in ipcs for m, v in sorted(selection.get(ipc, {}).items(), key=lambda t: -t[1])]
    return test + "\n\nSelection (validation accuracy %, condensation seed 0, evaluation seed 0):\n\n" + \
        markdown_table(["IPC", "candidate", "validation %"], sel)


def picture(args, recipe, path):
    """Synthetic images of every method at the middle IPC (condensation seed 0): a row per method."""
    from flowaug.plotting import image_grid

    ipc = sorted(args.ipc)[len(args.ipc) // 2]
    rows, names = [], []
    for m in (*BASELINES, recipe.get(ipc)):
        f = cache_path(args, m, ipc, 0) if m else None
        if f and os.path.exists(f):
            saved = torch.load(f, weights_only=True)
            first = torch.stack([saved["x"][saved["y"] == c][0] for c in range(int(saved["y"].max()) + 1)])
            rows.append(first * args.std + args.mean)
            names.append(m if len(m) < 22 else m.split(",")[0])
    if rows:
        image_grid(rows, path, row_labels=names, columns=rows[0].shape[0],
                   title=f"{args.dataset}: one synthetic image per class, IPC {ipc} (first of each class)")


def report(args, recipe_table) -> dict:
    records = read_cells(args.partial)
    table, recipe = recipe_table
    results = summarize(records, args.ipc, recipe, args)
    seeds = {str(ipc): sorted({r["cond_seed"] for r in records if r["stage"] == "final" and r["ipc"] == ipc})
             for ipc in args.ipc}
    extra = [ipc for ipc, s in seeds.items() if len(s) > min(len(v) for v in seeds.values())]
    disclosure = (f"IPC {', '.join(extra)}: more condensation seeds than the other IPC; the extra seeds (and any "
                  f"'{CONTROL}' control) were run later, after the earlier results had been seen; every run is "
                  "reported") if extra else ""
    text = tables(results, args.ipc, table) + (f"\n\n{disclosure}" if disclosure else "")
    print(text)
    payload = {
        "dataset": args.dataset, "ipc": args.ipc, "iterations": args.iterations,
        "protocol": "published" if args.published else "reduced for a 2-core CPU (same for every method)",
        "condensation": {"embedding": f"random ConvNet-3, width {args.width}, fresh per iteration",
                         "real_per_class": args.real_per_class, "dsa": DSA_DIGITS, "momentum": 0.5,
                         "dm": "SGD on images, lr 1.0, momentum 0.5, one Siamese DSA draw per class"},
        "evaluation": {"network": "ConvNet-3 (instance norm, average pooling)", "width": args.width,
                       "epochs": args.eval_epochs, "optimizer": "SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256, "
                       "lr x 0.1 at half", "augmentation": f"DSA {DSA_DIGITS}, per image", "scored_on": "full test split"},
        "selection": {"split": f"{args.val_per_class} train images per class held out (never condensed)",
                      "validation_accuracy": {str(k): v for k, v in table.items()},
                      "recipes_from": args.recipes_from, "rule": "highest validation accuracy, cond seed 0, eval seed 0"},
        "recipe": {str(k): v for k, v in recipe.items()},
        "condensation_seeds": seeds, "disclosure": disclosure,
        "results": results, "machine": machine(), "args": {k: v for k, v in vars(args).items()},
    }
    write_json(args.out, payload)
    with atomic_path(args.out[: -len(".json")] + ".md") as tmp, open(tmp, "w") as handle:
        handle.write(text + "\n")
    picture(args, recipe, args.out[: -len(".json")] + ".png")
    return payload


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help="a folder NAME/{train,test}.npz under --data")
    p.add_argument("--data", default=None, help="folder of datasets (default $FLOWAUG_DATA, ../shared/data)")
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50], help="images per class")
    p.add_argument("--iterations", type=int, default=None, help="condensation iterations (default: the protocol's)")
    p.add_argument("--cond-seeds", type=int, default=3)
    p.add_argument("--eval-seeds", type=int, default=3)
    p.add_argument("--val-per-class", type=int, default=500, help="train images per class held out for selection")
    p.add_argument("--jobs", type=int, default=1, help="processes, one torch thread each")
    p.add_argument("--out", default="benchmarks/results/condense_mnist.json")
    p.add_argument("--recipes-from", default=None, help="JSON of another run: reuse its recipe per IPC")
    p.add_argument("--cache", default="benchmarks/out/condense")
    p.add_argument("--quick", action="store_true", help="a smoke run: half of train, 10 iterations, 10 epochs")
    p.add_argument("--report", action="store_true", help="rebuild the JSON, tables and picture from the cells")
    p.add_argument("--control-lr2", type=int, nargs="*", default=[], metavar="IPC",
                   help="also run DM at lr 2 (the recipes' step) at these IPC, a control")
    p.add_argument("--published", action="store_true", help="the anchors' settings (GPU): width 128, 20,000 "
                   "iterations, 256 real images per class, 1,000 evaluation epochs")
    args = p.parse_args(argv)
    proto = dict(PUBLISHED if args.published else REDUCED)
    if args.quick:
        proto.update(iterations=10, eval_epochs=10)
        args.out = args.out.replace(".json", "_quick.json")
    args.width, args.real_per_class, args.eval_epochs = proto["width"], proto["real_per_class"], proto["eval_epochs"]
    args.iterations = args.iterations or proto["iterations"]
    if min(args.ipc) < 1 or args.cond_seeds < 1 or args.eval_seeds < 1 or args.iterations < 1:
        p.error("--ipc, --cond-seeds, --eval-seeds and --iterations must be positive")
    args.setting = f"w{args.width}-it{args.iterations}-r{args.real_per_class}-e{args.eval_epochs}" + \
        ("-quick" if args.quick else "")
    args.partial = args.out[: -len(".json")] + ".cells.jsonl"
    x, y = load_dataset(args.dataset, "train", data_dir=args.data)
    args.mean, args.std = float(x.float().div(255).mean()), float(x.float().div(255).std())
    args.val_per_class = min(args.val_per_class, int(torch.bincount(y).min()) // 3)  # as load() holds out
    return args


def main(argv=None) -> None:
    args = parse(argv)
    os.makedirs(args.cache, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fixed = {}
    if args.recipes_from:
        with open(args.recipes_from) as handle:
            fixed = {int(k): v for k, v in json.load(handle)["recipe"].items()}
    t0 = time.time()
    for _ in range(2):  # selection, then the test stage with the chosen recipes
        if args.report:
            break
        table, recipe = choose(read_cells(args.partial), args.ipc)
        recipe.update(fixed)
        units = plan(args, read_cells(args.partial), recipe)
        run_parallel(run_unit, args, units)
    table, recipe = choose(read_cells(args.partial), args.ipc)
    recipe.update(fixed)
    report(args, (table, recipe))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
