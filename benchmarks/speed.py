"""Speed and memory of flowaug's flows, side by side with the naive geomloss loop and POT, and the floor.

Sections (``--sections``; all by default):

  step      one flow step (solve + gradient + update) on real MNIST images (d = 784; PCA to 64 and 2), for
            Sinkhorn (blur 0.5) and Gaussian MMD (median-heuristic bandwidth), both backends:
            flowaug (steady state of a flow, warm-started) vs the naive loop of geomloss's gradient-flow
            example (SamplesLoss then x -= tau N grad) at its default scaling and at the scaling that reaches
            the same gradient accuracy, and POT (ot.sinkhorn2, log domain, debiased by three calls).
            Every time comes with the cosine between the step's gradient and a converged float64 gradient.
  floor     part of `step`: the unavoidable work per cell from this machine's measured matmul and exp
            rates (two N x M x d products, one exp pass over N x M per Sinkhorn half-iteration actually
            run, and the N x N self-term), and flowaug / floor.
  defaults  one step at flowaug's defaults (Sinkhorn blur="auto", MMD), both backends, 256 x {1024, 4096},
            d = 784: what ``flowaug.flow(x, reference=y)`` costs.
  overhead  LeNet-5 training throughput (B = 256, 28 x 28) without flowaug, with a FlowTransform after the
            DataLoader, and inside a collate_fn with 2 workers.
  memory    peak resident memory of one flow step for N = M in {1k, 4k, 16k, 64k}, d in {64, 784}, per
            backend, each in its own process; the dense backend must refuse what would not fit.
  precompute  FlowDataset precompute of 60,000 MNIST images toward 7,291 USPS images, 20 steps.
  coldstart a fresh Sinkhorn flow step (cold start: epsilon-scaling, then the solve at the target blur) on
            MNIST, 256 x 4096, d in {784, 64}, blur in {0.5, 0.1, "auto"}: the solver before Anderson
            acceleration (Sinkhorn(acceleration="relaxation", scaling=0.5)) vs today's, side by side:
            iterations, cold and warm step times, gradient cosine; resumable (finished cells are skipped).
  condense  one condensation iteration (MNIST, 10 images per class, 256 real per class, random ConvNet-3 of
            width 128 and 32, DSA): distribution matching as published (benchmarks/condense.py) vs flowaug.condense
            with each objective, interleaved round by round; ratios to DM and what dominates (the networks).
  chunked   one cold MMD and Sinkhorn step (defaults) on random data, d = 64, dense vs chunked vs KeOps side by
            side (N = M = 4096 on CPU; 4096, 16384, 65536 on CUDA), and the chunked backend where dense does not
            fit (N = M = 65,536; one chunked softmin at 60,000 x 60,000, d = 803), each cell in its own process
            with its peak memory; resumable (finished cells are skipped). --device cuda runs it on a GPU.

    python benchmarks/speed.py --data ../shared/data --out benchmarks/results/speed.json
    python benchmarks/speed.py --quick --data ../shared/data        # a small grid, a few minutes
    python benchmarks/speed.py --device cuda --quick --out benchmarks/results/speed_cuda.json   # GPU, < 10 min
    python benchmarks/speed.py --device cpu --quick --out /tmp/speed_quick.json  # the same cells, small, on CPU

All timings are medians over >= 5 runs after warm-up, in one process, with torch.get_num_threads() recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import flowaug  # noqa: E402
from benchmarks.common import machine, markdown_table, median_time, write_json  # noqa: E402
from flowaug.data import load_dataset, resize_images  # noqa: E402
from flowaug.objectives import Context  # noqa: E402

BLUR = 0.5  # the setting for the naive baseline; a sharp blur at MNIST's scale (median distance ~10)
TAU = 0.5
SCALINGS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999]  # geomloss's default is 0.5
SECTIONS = ("step", "defaults", "overhead", "memory", "precompute", "chunked", "coldstart", "condense")
SLOW = 10.0  # seconds: a baseline slower than this per step is reported as a lower bound (one run), not repeated


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


# ------------------------------------------------------------------------------------------ data
def mnist_points(data_dir, count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``count`` real MNIST images as (count, dim) points: pixels in [0, 1] (784) or PCA coordinates."""
    x, _ = load_dataset("mnist", "train", data_dir=data_dir)
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[: max(count, 10000)]].float().div(255).flatten(1)
    if dim < 784:
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x[:10000] - mean, full_matrices=False)
        x = (x - mean) @ v[:dim].T
    return x[:count].contiguous()


# ------------------------------------------------------------------------------------------ references
def reference_gradient(objective: str, x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Converged float64 Wasserstein gradient: Sinkhorn cold-started to tol 1e-3 (potentials within 1e-3 eps;
    measured on MNIST d = 64, 256 x 1024, blur 0.5: its gradient has cosine 1.000000 with the tol 1e-4 one,
    which took 9x longer, and tol 1e-5 did not converge in 40,000 iterations); MMD in closed form. (The
    solver is checked against geomloss in tests/test_flow.py.)"""
    x64, y64 = x.double(), y.double()
    ctx = Context(z_ref=y64, ref_half=(y64 * y64).sum(1) / 2, backend="tensorized", feature_dim=x.shape[1])
    if objective == "sinkhorn":
        obj = flowaug.Sinkhorn(blur=BLUR, tol=1e-3, max_iter=20000)
    else:
        obj = flowaug.MMD("gaussian", bandwidth=bandwidth, normalize=False)
    return obj.evaluate(x64, ctx, {})[1]


def naive_step(x, y, objective, bandwidth, backend, scaling=0.5):
    """geomloss's gradient-flow example: one step x <- x - tau N grad; returns (new x, N grad)."""
    from geomloss import SamplesLoss

    if objective == "sinkhorn":
        loss = SamplesLoss("sinkhorn", p=2, blur=BLUR, scaling=scaling, debias=True, backend=backend)
    else:
        loss = SamplesLoss("gaussian", blur=bandwidth, backend=backend)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(xg, y), xg)
    g = g * len(x)
    return (x - TAU * g).detach(), g


def pot_step(x, y):
    """POT: debiased entropic OT from three log-domain ot.sinkhorn2 calls (its default method underflows)."""
    import ot

    eps = BLUR**2

    def ot_value(a_pts, b_pts):
        cost = torch.cdist(a_pts, b_pts).square() / 2
        a = torch.full((len(a_pts),), 1 / len(a_pts), dtype=x.dtype)
        b = torch.full((len(b_pts),), 1 / len(b_pts), dtype=x.dtype)
        return ot.sinkhorn2(a, b, cost, eps, method="sinkhorn_log", numItermax=1000, stopThr=1e-6)

    xg = x.clone().requires_grad_(True)
    value = ot_value(xg, y) - 0.5 * ot_value(xg, xg) - 0.5 * ot_value(y, y)
    (g,) = torch.autograd.grad(value, xg)
    g = g * len(x)
    return (x - TAU * g).detach(), g


# ------------------------------------------------------------------------------------------ rates (the floor)
def rates(n: int, m: int, d: int) -> dict:
    """Measured times (s) of the unavoidable kernels at this shape."""
    a, b = torch.rand(n, d), torch.rand(m, d)
    out = torch.empty(n, m)
    t_mm, _ = median_time(lambda: torch.mm(a, b.T, out=out), repeats=7)
    s = torch.rand(n, m) * -50  # scores in the fast range of exp (flowaug clamps at -80)
    t_exp, _ = median_time(lambda: torch.exp(s, out=out), repeats=7)
    aa = torch.empty(n, n)
    t_mm_nn, _ = median_time(lambda: torch.mm(a, a.T, out=aa), repeats=7)
    sn = torch.rand(n, n) * -50
    t_exp_nn, _ = median_time(lambda: torch.exp(sn, out=aa), repeats=7)
    return {"mm": t_mm, "exp": t_exp, "mm_nn": t_mm_nn, "exp_nn": t_exp_nn,
            "gflops": 2 * n * m * d / t_mm / 1e9, "exp_per_s": n * m / t_exp}


def floor_time(objective: str, r: dict, iters) -> float:
    if objective == "sinkhorn":
        it_ab, it_aa = iters
        # cost + barycentre products; one exp pass per half-iteration and for the final extrapolation;
        # the x-x problem: its products and passes
        return 2 * r["mm"] + (2 * it_ab + 1) * r["exp"] + 2 * r["mm_nn"] + (it_aa + 1) * r["exp_nn"]
    return 2 * r["mm"] + r["exp"] + 2 * r["mm_nn"] + r["exp_nn"]


# ------------------------------------------------------------------------------------------ section: step
def flowaug_steps(x, ref, objective, bandwidth, backend, repeats):
    """Steady state of a flow: every call is one step, warm-started from the previous one."""
    obj = flowaug.Sinkhorn(blur=BLUR) if objective == "sinkhorn" else flowaug.MMD("gaussian", bandwidth=bandwidth)
    state = {"x": x, "warm": None}
    record = {}

    def one():
        out = flowaug.flow(state["x"], reference=ref, objective=obj, steps=1, step_size=TAU, backend=backend,
                           warm=state["warm"], track_objective=False, guard=False)
        record.update(x_before=state["x"], x_after=out.x, iters=out.iterations[-1] if out.iterations else None,
                      backend=out.backend)
        state["x"], state["warm"] = out.x, out.warm  # the solver state carries to the next step

    one()  # cold start (and KeOps compilation)
    t0 = time.perf_counter()  # a cold step (fresh potentials, epsilon-scaling) at the same point, for scale
    cold = flowaug.flow(state["x"], reference=ref, objective=obj, steps=1, step_size=TAU, backend=backend,
                        track_objective=False, guard=False)
    cold_ms = 1e3 * (time.perf_counter() - t0)
    cold_iters = cold.iterations[-1] if cold.iterations else None
    one()
    times, iters = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
        iters.append(record["iters"])
    grad = (record["x_before"] - record["x_after"]) / TAU
    return statistics.median(times), iters, grad, record["x_before"], record["backend"], (cold_ms, cold_iters)


def time_baseline(fn, repeats):
    """Median seconds of fn() (>= 5 runs) unless one run exceeds SLOW: then (that time, True)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > SLOW:
        return first, True
    med, _ = median_time(fn, repeats=repeats, warmup=0)
    return med, False


def emit(args, results, section: str, rows: list, row: dict, shown: dict | None = None) -> None:
    """Append a result row, print it (or ``shown``), and rewrite the JSON (a killed run keeps what it measured)."""
    rows.append(row)
    print(json.dumps(row if shown is None else shown), flush=True)
    results[section] = rows
    write_json(args.out, results)


def section_step(args, results):
    grid_n = [256] if args.quick else args.n
    grid_m = [1024] if args.quick else args.m
    grid_d = [64, 784] if args.quick else args.d
    backends_ = ["tensorized"] if args.quick else args.backends
    rows = []

    def record(cell, r):
        cell["rates"] = r
        emit(args, results, "step", rows, cell,
             shown={k: (round(v, 4) if isinstance(v, float) else v) for k, v in cell.items() if k != "rates"})

    for d in grid_d:
        pts = mnist_points(args.data, max(grid_n) + max(grid_m), d)
        for n in grid_n:
            for m in grid_m:
                x, y = pts[:n], pts[n : n + m]
                ref = flowaug.Reference(y)
                bandwidth = ref.median_distance()
                r = rates(n, m, d)
                for objective in ("sinkhorn", "mmd"):
                    for backend in backends_:
                        # KeOps on this CPU: seconds to minutes per baseline call (4.4 s for one geomloss Sinkhorn
                        # at 256 x 1024, d = 784): flowaug alone unless asked; its Sinkhorn at d = 784 runs ~450
                        # iterations there (minutes with KeOps), so it needs --full-keops
                        flowaug_only = backend == "keops" and not args.keops_baselines
                        if backend == "keops" and objective == "sinkhorn" and d == 784 and not args.full_keops:
                            continue
                        cell = {"objective": objective, "backend": backend, "n": n, "m": m, "d": d}
                        t, iters, grad, x_at, ran, cold = flowaug_steps(x, ref, objective, bandwidth, backend,
                                                                        args.repeats)
                        g_ref = reference_gradient(objective, x_at, y, bandwidth)
                        its = iters[len(iters) // 2]
                        cell.update(flowaug_ms=1e3 * t, flowaug_cos=cosine(grad, g_ref), iterations=its, ran_on=ran,
                                    cold_step_ms=cold[0], cold_iterations=cold[1])
                        cell["floor_ms"] = 1e3 * floor_time(objective, r, its if objective == "sinkhorn" else None)
                        cell["flowaug_over_floor"] = cell["flowaug_ms"] / cell["floor_ms"]
                        if flowaug_only:
                            record(cell, r)
                            continue
                        geom_backend = "online" if backend == "keops" else "tensorized"
                        # naive at its defaults
                        _, g0 = naive_step(x_at, y, objective, bandwidth, geom_backend)
                        t0, slow = time_baseline(lambda: naive_step(x_at, y, objective, bandwidth, geom_backend),
                                                 args.repeats)
                        cell.update(naive_ms=1e3 * t0, naive_cos=cosine(g0, g_ref), naive_lower_bound=slow,
                                    naive_over_flowaug=t0 / t)
                        # naive at equal accuracy (Sinkhorn: the smallest scaling with cosine >= flowaug's or 0.99)
                        if objective == "sinkhorn":
                            target = min(0.99, cell["flowaug_cos"])
                            for sc in SCALINGS:  # stops at the first accurate one, a slow one, or the last
                                t1 = time.perf_counter()
                                _, g1 = naive_step(x_at, y, objective, bandwidth, geom_backend, scaling=sc)
                                one = time.perf_counter() - t1
                                c1 = cosine(g1, g_ref)
                                if c1 >= target or one > SLOW:  # slow: stop searching, report a lower bound
                                    break
                            t1, slow1 = (one, True) if one > SLOW else time_baseline(
                                lambda: naive_step(x_at, y, objective, bandwidth, geom_backend, scaling=sc), args.repeats)
                            cell.update(naive_eq_scaling=sc, naive_eq_cos=c1, naive_eq_ms=1e3 * t1,
                                        naive_eq_lower_bound=slow1, naive_eq_over_flowaug=t1 / t)
                            if backend == "tensorized" and not args.no_pot:
                                try:
                                    _, gp = pot_step(x_at, y)
                                    tp, slowp = time_baseline(lambda: pot_step(x_at, y), args.repeats)
                                    cell.update(pot_ms=1e3 * tp, pot_cos=cosine(gp, g_ref), pot_lower_bound=slowp)
                                except Exception as err:  # noqa: BLE001 - POT is optional: record why it did not run
                                    cell["pot_error"] = f"{type(err).__name__}: {err}"[:200]
                        record(cell, r)
    return rows


def step_table(rows) -> str:
    def ms(v, lb=False):
        return "" if v is None else (f">{v:.0f}" if lb else (f"{v:.1f}" if v < 100 else f"{v:.0f}"))

    out = []
    for c in rows:
        out.append([
            c["objective"], c["backend"], c["n"], c["m"], c["d"], ms(c["flowaug_ms"]), c["iterations"],
            f"{c['flowaug_cos']:.4f}", ms(c["floor_ms"]), f"{c['flowaug_over_floor']:.2f}",
            *(["not run", "", ""] if "naive_ms" not in c else [
                ms(c["naive_ms"], c["naive_lower_bound"]), f"{c['naive_cos']:.3f}", f"{c['naive_over_flowaug']:.1f}"]),
            "" if "naive_eq_ms" not in c else f"{ms(c['naive_eq_ms'], c['naive_eq_lower_bound'])} (s={c['naive_eq_scaling']})",
            "" if "naive_eq_over_flowaug" not in c else f"{c['naive_eq_over_flowaug']:.1f}",
            "" if "pot_ms" not in c else f"{ms(c['pot_ms'], c['pot_lower_bound'])} ({c['pot_cos']:.3f})",
        ])
    return markdown_table(["objective", "backend", "N", "M", "d", "flowaug ms", "iters", "cos", "floor ms",
                           "flowaug/floor", "naive ms", "naive cos", "naive/flowaug", "naive eq-acc ms",
                           "naive eq/flowaug", "POT ms (cos)"], out)


# ------------------------------------------------------------------------------------------ section: defaults
def section_defaults(args, results):
    """One flow step at flowaug's defaults (Sinkhorn blur="auto", MMD normalised), both backends, d = 784:
    what a user gets from ``flowaug.flow(x, reference=y)``. KeOps runs slower than SLOW are timed once."""
    rows = []
    pts = mnist_points(args.data, 256 + 4096, 784)
    for m in (1024, 4096):
        x, y = pts[:256], pts[256 : 256 + m]
        ref = flowaug.Reference(y)
        for name, obj in (("sinkhorn (blur auto)", flowaug.Sinkhorn()), ("mmd (gaussian)", flowaug.MMD())):
            for backend in ("tensorized", "keops"):
                last = {}

                def step():
                    last["out"] = flowaug.flow(x, reference=ref, objective=obj, steps=1, backend=backend,
                                               track_objective=False, guard=False)

                step()  # warm-up: KeOps build, reference preparation
                t, once = time_baseline(step, args.repeats)
                its = last["out"].iterations
                row = {"objective": name, "backend": backend, "n": 256, "m": m, "d": 784, "ms": 1e3 * t,
                       "runs": 1 if once else args.repeats, "iterations": its[-1] if its else None}
                emit(args, results, "defaults", rows, row)
    return rows


# ------------------------------------------------------------------------------------------ section: condense
def section_condense(args, results):
    """Seconds per condensation iteration, DM vs flowaug.condense, measured round-robin: each round times a run of
    1 iteration and a run of 1 + k; the difference over k is the cost of an iteration without the per-run setup
    (loading the reference, drawing the initial images), which a long run pays once."""
    import types

    from benchmarks import condense as bench

    x, y = load_dataset("mnist", "train", data_dir=args.data)
    x = ((x.float() / 255) - 0.1307) / 0.3081
    iters = 2 if args.quick else 4
    rows = []
    for width in ((32,) if args.quick else (128, 32)):
        for ipc in (10,):
            def dm(n, ipc=ipc, width=width):
                return bench.dm(x, y, ipc, types.SimpleNamespace(iterations=n, real_per_class=256, width=width), 0)

            methods = {"DM (as published)": dm}
            for name in ("linear", "sinkhorn", "mmd", "mean+mmd"):
                obj = bench.objective(name) if name != "linear" else flowaug.MMD("linear")
                methods[f"flowaug {name}"] = (lambda n, o=obj, ipc=ipc, width=width: flowaug.condense(
                    (x, y), ipc, objective=o, iterations=n, real_per_class=256, step_size=2.0 / ipc, width=width,
                    checkpoint_every=n, progress=False))
            times = {m: [] for m in methods}
            for fn in methods.values():  # warm-up
                fn(1)
            for _ in range(args.repeats):  # interleaved: every method sees the same machine load
                for m, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(1)
                    t1 = time.perf_counter()
                    fn(1 + iters)
                    times[m].append(((time.perf_counter() - t1) - (t1 - t0)) / iters)
            dm_time = statistics.median(times["DM (as published)"])
            for m, ts in times.items():
                row = {"width": width, "ipc": ipc, "method": m, "s_per_iteration": statistics.median(ts),
                       "ratio_to_dm": statistics.median(ts) / dm_time, "runs": len(ts)}
                emit(args, results, "condense", rows, row)
    return rows


# ------------------------------------------------------------------------------------------ section: coldstart
def section_coldstart(args, results):
    """Cold (fresh) and warm-started Sinkhorn steps, the solver before Anderson acceleration ("old":
    over-relaxation, scaling 0.5) vs today's defaults ("new"), on one MNIST draw (256 x 4096). Iterations
    count the epsilon-scaling levels and the iterations at the target blur, (x-y, x-x). The converged
    gradient: float64, tol 1e-3, max_iter 20,000 (Anderson; its stopping test is the plain-iteration
    change, as for unaccelerated Sinkhorn). Each finished cell is written at once; a rerun skips it."""
    rows = [r for r in results.get("coldstart", []) if "new_cold_ms" in r]
    done = {(r["d"], r["blur"]) for r in rows}
    old_opts = dict(acceleration="relaxation", scaling=0.5)
    for d in (784, 64):
        if all((d, b) in done for b in (0.5, 0.1, "auto")):
            continue
        pts = mnist_points(args.data, 256 + 4096, d)
        x, y = pts[:256], pts[256:]
        ref = flowaug.Reference(y)
        for blur in (0.5, 0.1, "auto"):
            if (d, blur) in done:
                continue
            cell = {"n": 256, "m": 4096, "d": d, "blur": blur}
            y64 = y.double()
            ctx = Context(z_ref=y64, ref_half=(y64 * y64).sum(1) / 2, backend="tensorized", feature_dim=d)
            ctx.cache["median_distance"] = ref.median_distance()
            t0 = time.perf_counter()
            g_ref = flowaug.Sinkhorn(blur=blur, tol=1e-3, max_iter=20000).evaluate(x.double(), ctx).grad
            cell["reference_s"] = time.perf_counter() - t0
            for name, opts in (("old", old_opts), ("new", {})):
                obj = flowaug.Sinkhorn(blur=blur, **opts)
                last = {}

                def cold():
                    last["out"] = flowaug.flow(x, reference=ref, objective=obj, steps=1, step_size=TAU,
                                               track_objective=False, guard=False)

                cold()  # warm-up: reference preparation
                t, once = time_baseline(cold, args.repeats)
                out = last["out"]
                cell.update({f"{name}_cold_ms": 1e3 * t, f"{name}_cold_runs": 1 if once else args.repeats,
                             f"{name}_cold_iterations": out.iterations[-1],
                             f"{name}_cos": cosine((x - out.x) / TAU, g_ref)})
                # steady state: steps of a flow, each warm-started from the previous one (as the step section)
                t_warm, iters_warm = warm_steps(x, ref, obj, args.repeats)
                cell.update({f"{name}_warm_ms": 1e3 * t_warm, f"{name}_warm_iterations": iters_warm})
            emit(args, results, "coldstart", rows, cell,
                 shown={k: (round(v, 4) if isinstance(v, float) else v) for k, v in cell.items()})
    return rows


def warm_steps(x, ref, obj, repeats):
    """Median time and median iterations of warm-started flow steps of ``obj`` (after two steps)."""
    state = {"x": x, "warm": None}
    iters = []

    def one():
        out = flowaug.flow(state["x"], reference=ref, objective=obj, steps=1, step_size=TAU, warm=state["warm"],
                           track_objective=False, guard=False)
        iters.append(out.iterations[-1])
        state["x"], state["warm"] = out.x, out.warm  # the solver state carries to the next step

    one()
    one()
    med, _ = median_time(one, repeats=repeats, warmup=0)
    timed = sorted(iters[2:])
    return med, timed[len(timed) // 2]


def coldstart_table(rows) -> str:
    def ms(v):
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"

    out = [[r["d"], r["blur"], r["old_cold_iterations"], r["new_cold_iterations"], ms(r["old_cold_ms"]),
            ms(r["new_cold_ms"]), f"{r['old_cold_ms'] / r['new_cold_ms']:.2f}", f"{r['old_cos']:.4f}",
            f"{r['new_cos']:.4f}", r["old_warm_iterations"], r["new_warm_iterations"], ms(r["old_warm_ms"]),
            ms(r["new_warm_ms"])] for r in rows]
    return markdown_table(["d", "blur", "cold iters old", "cold iters new", "cold ms old", "cold ms new",
                           "old/new", "cos old", "cos new", "warm iters old", "warm iters new", "warm ms old",
                           "warm ms new"], out)


# ------------------------------------------------------------------------------------------ section: overhead
#: per-batch FlowTransform variants of the overhead section: what changed in the cost of a batch flow
OVERHEAD_VARIANTS = {
    "kernel cache off, new sample per batch": dict(span=0.0, resample="batch"),
    "kernel cache on, new sample per batch": dict(span=None, resample="batch"),
    "kernel cache on, one sample per epoch": dict(span=None, resample="epoch"),
}


def section_overhead(args, results):
    """FlowTransform on MNIST batches of 256 toward USPS (steps=5, reference_size=1024), in LeNet-5 training
    steps on the same batches: variants and training steps interleaved batch by batch in one process, medians.
    "kernel cache off" rebuilds the dense backend's exp kernel at every softmin (the log-domain pass of
    flowaug <= 0.1); the Sinkhorn solver is today's in every variant."""
    import flowaug.backends.dense as dense
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.models import LeNet5

    mx, my = load_dataset("mnist", "train", data_dir=args.data)
    ux, uy = load_dataset("usps", "train", data_dir=args.data)
    mx, my = mx[:256 * 24].float() / 255, my[:256 * 24]
    ux = resize_images(ux.float() / 255, (28, 28))
    batches = [(mx[i * 256:(i + 1) * 256], my[i * 256:(i + 1) * 256]) for i in range(8 if args.quick else 20)]
    model = LeNet5(first=5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def train_step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    default_span = dense._SPAN_LIMIT
    transforms = {name: flowaug.FlowTransform((ux, uy), steps=5, reference_size=1024, seed=0,
                                              resample=v["resample"]).fit((mx, my))
                  for name, v in OVERHEAD_VARIANTS.items()}
    times = {name: [] for name in [*OVERHEAD_VARIANTS, "train step"]}
    from tqdm.auto import tqdm

    for i, (xb, yb) in enumerate(tqdm([batches[0]] + batches, desc="overhead", leave=False)):
        t0 = time.perf_counter()
        train_step(xb, yb)
        if i:  # the first round warms up every variant
            times["train step"].append(time.perf_counter() - t0)
        for name, v in OVERHEAD_VARIANTS.items():
            dense._SPAN_LIMIT = default_span if v["span"] is None else v["span"]
            t0 = time.perf_counter()
            transforms[name](xb, yb)
            if i:
                times[name].append(time.perf_counter() - t0)
    dense._SPAN_LIMIT = default_span
    med = {name: statistics.median(v) for name, v in times.items()}
    train = med["train step"]
    res = {"threads": torch.get_num_threads(), "batches": len(batches), "train_step_ms": 1e3 * train,
           "flow_ms": {name: 1e3 * med[name] for name in OVERHEAD_VARIANTS},
           "flow_in_train_steps": {name: med[name] / train for name in OVERHEAD_VARIANTS}}

    def run(loader):
        it = iter(loader)
        x, y = next(it)  # warm-up batch (workers started)
        train_step(x, y)
        t0, count = time.perf_counter(), 0
        for _ in range(len(batches)):
            x, y = next(it)
            train_step(x, y)
            count += len(x)
        return count / (time.perf_counter() - t0)

    best = transforms["kernel cache on, one sample per epoch"]
    data = TensorDataset(mx, my)
    plain = run(DataLoader(data, batch_size=256, shuffle=True))
    main = run(best(x, y) for x, y in DataLoader(data, batch_size=256, shuffle=True))
    workers = run(DataLoader(data, batch_size=256, shuffle=True, num_workers=2, persistent_workers=True,
                             collate_fn=flowaug.FlowCollate(best)))
    res["images_per_s"] = {"no flow": plain, "FlowTransform after the DataLoader": main,
                           "FlowTransform in collate_fn, 2 workers": workers}
    res["overhead"] = {"after the DataLoader": plain / main, "collate_fn, 2 workers": plain / workers}
    previous = results.get("overhead", {})
    by_threads = previous.get("by_threads", {}) if isinstance(previous, dict) else {}
    by_threads[str(torch.get_num_threads())] = res  # runs with other thread counts are kept
    results["overhead"] = {"by_threads": by_threads}
    write_json(args.out, results)
    print(json.dumps(res), flush=True)
    return res


# ------------------------------------------------------------------------------------------ section: memory
MEMORY_PROBE = """
import json, resource, sys, time, torch, flowaug
n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
x, y = torch.rand(n, d, generator=g), torch.rand(n, d, generator=g) + 0.1
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    out = flowaug.flow(x, reference=y, objective=flowaug.MMD("gaussian"), steps=1, backend=backend,
                       track_objective=False)
    status = "ok:" + out.backend
except MemoryError as err:
    status = "refused: " + str(err)
print(json.dumps({"status": status, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "base_mb": base / 1024, "seconds": time.perf_counter() - t0}))
"""


def section_memory(args, results):
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384, 65536]
    rows = [r for r in results.get("memory", []) if r["d"] not in args.memory_d]  # other dimensions: kept
    for d in args.memory_d:
        for n in sizes:
            for backend in ("tensorized", "keops"):
                if backend == "keops" and d == 784 and n > 4096:
                    rows.append({"n": n, "d": d, "backend": backend, "status": "skipped: 15+ min of KeOps "
                                 "compute per case on this CPU; memory is linear in N + M (see d = 64)"})
                    continue
                res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(n), str(d), backend],
                                     capture_output=True, text=True, timeout=3600,
                                     cwd=os.path.join(os.path.dirname(__file__), ".."))
                line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
                row = {"n": n, "d": d, "backend": backend}
                row.update(json.loads(line[-1]) if line else {"status": "crashed: " + res.stderr[-300:]})
                emit(args, results, "memory", rows, row)
    return rows


# ------------------------------------------------------------------------------------------ section: precompute
def section_precompute(args, results):
    from torch.utils.data import TensorDataset

    mx, my = load_dataset("mnist", "train", data_dir=args.data)
    ux, uy = load_dataset("usps", "train", data_dir=args.data)
    ux = (resize_images(ux.float() / 255, (28, 28)) * 255).round().to(torch.uint8)
    n = 6000 if args.quick else len(mx)
    steps = 20
    t0 = time.perf_counter()
    data = flowaug.FlowDataset(TensorDataset(mx[:n], my[:n]), (ux, uy), steps=steps, step_size=0.2,
                               class_map="same", chunk_size=4096, progress=True)
    seconds = time.perf_counter() - t0
    res = {"points": n, "reference": len(ux), "steps": steps, "seconds": seconds,
           "point_steps_per_s": n * steps / seconds, "config": "class_map='same', chunk_size=4096, step_size=0.2"}
    results["precompute"] = res
    write_json(args.out, results)
    print(json.dumps(res), flush=True)
    del data
    return res


# ------------------------------------------------------------------------------------------ section: chunked
CHUNKED_PROBE = """
import json, resource, statistics, sys, time, warnings, torch, flowaug
from flowaug.backends import ChunkedPair
warnings.filterwarnings("ignore", message=".*did not converge.*")
c = json.loads(sys.argv[1])
dev = torch.device(c["device"])
cuda = dev.type == "cuda"
g = torch.Generator().manual_seed(0)
x = torch.rand(c["n"], c["d"], generator=g).to(dev)
y = (torch.rand(c["m"], c["d"], generator=g) + 0.1).to(dev)
if c["objective"] == "mmd":
    obj = flowaug.MMD("gaussian")
else:
    obj = flowaug.Sinkhorn(max_iter=c["max_iter"])
info = {}

def sync():
    if cuda:
        torch.cuda.synchronize(dev)

def step():
    if c["kind"] == "softmin":  # one call of the Sinkhorn primitive (a cost pass, an exp pass)
        ChunkedPair(x, y).softmin(1.0, torch.zeros(c["m"], device=dev))
    else:
        out = flowaug.flow(x, reference=y, objective=obj, steps=1, backend=c["backend"], track_objective=False)
        info.update(ran_on=out.backend, iterations=out.iterations[-1] if out.iterations else None)
    sync()

if c["backend"] == "keops":  # build KeOps' formulas (they depend on d, not on N) before the clock starts
    flowaug.flow(x[:64], reference=y[:64], objective=obj, steps=1, backend="keops", track_objective=False)
if cuda:
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
row = {"threads": torch.get_num_threads(),
       "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu"}
try:
    t0 = time.perf_counter()
    step()  # warm-up; a slow cell's only run
    times = [time.perf_counter() - t0]
    if times[0] <= c["slow"]:
        times = []
        for _ in range(c["repeats"]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    row.update(status="ok", ms=1e3 * statistics.median(times), runs=len(times))
except MemoryError as err:
    row.update(status="refused: " + str(err).split(";")[0])
peak = torch.cuda.max_memory_allocated(dev) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
row.update(info, peak_mb_above_baseline=(peak - base) / 2**20)
print(json.dumps(row))
"""
CHUNKED_SINKHORN_CAP = 5  # iteration cap of the Sinkhorn cells at N = M = 65,536 on the CPU (see chunked_cells)


def chunked_cells(device: str, quick: bool) -> list[dict]:
    """The cells of the chunked section: side-by-side dense / chunked / KeOps where all fit, and the large
    cells. The CPU's N = M = 65,536 Sinkhorn step is capped at CHUNKED_SINKHORN_CAP iterations per solve (one
    chunked softmin there costs seconds; a converged cold step runs about 100 of them): its time is the
    epsilon-scaling plus the capped solve, reported with the iterations it ran. The KeOps MMD step at that size
    (1,171 s) is in the memory section and is not run again."""
    cells = []

    def add(kind, objective, backend, n, d, max_iter=1000):
        cells.append({"device": device, "kind": kind, "objective": objective, "backend": backend, "n": n, "m": n,
                      "d": d, "max_iter": max_iter})

    if device == "cuda":  # everything fits on the GPU (dense at 65,536: 64 GiB)
        for n in ([4096, 65536] if quick else [4096, 16384, 65536]):
            for objective in ("mmd", "sinkhorn"):
                for backend in ("tensorized", "chunked", "keops"):
                    add("step", objective, backend, n, 64)
        return cells
    side = 1024 if quick else 4096
    for objective in ("mmd", "sinkhorn"):
        for backend in ("tensorized", "chunked", "keops"):
            add("step", objective, backend, side, 64)
    if quick:
        add("step", "mmd", "chunked", 8192, 64)
        return cells
    add("step", "mmd", "tensorized", 65536, 64)  # refused: 64 GiB
    add("step", "mmd", "chunked", 65536, 64)
    add("step", "sinkhorn", "chunked", 65536, 64, max_iter=CHUNKED_SINKHORN_CAP)
    # the whole MNIST train set toward 60,000 points, jointly: d = 784 pixels + 19 label coordinates
    add("softmin", "sinkhorn", "chunked", 60000, 803)
    return cells


def _cell_key(cell: dict) -> tuple:
    return tuple(cell[k] for k in ("device", "kind", "objective", "backend", "n", "m", "d", "max_iter"))


def section_chunked(args, results):
    """Each cell in its own process (peak memory: ru_maxrss, or CUDA's peak allocation, above the baseline after
    the data are made); each finished cell is written to the JSON at once and skipped when the section is run
    again, so a long run can be resumed."""
    rows = [r for r in results.get("chunked", []) if r.get("status", "").startswith(("ok", "refused"))]
    done = {_cell_key(r) for r in rows}
    for cell in chunked_cells(args.device, args.quick):
        if _cell_key(cell) in done:
            print("done before:", json.dumps(cell), flush=True)
            continue
        probe = dict(cell, repeats=args.repeats, slow=SLOW)
        res = subprocess.run([sys.executable, "-c", CHUNKED_PROBE, json.dumps(probe)], capture_output=True, text=True,
                             timeout=4 * 3600, cwd=os.path.join(os.path.dirname(__file__), ".."))
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        row = dict(cell)
        row.update(json.loads(line[-1]) if line else {"status": "crashed: " + res.stderr[-300:]})
        emit(args, results, "chunked", rows, row)
    return rows


def chunked_table(rows) -> str:
    out = []
    for r in rows:
        ms = r.get("ms")
        out.append([r["device"], r["kind"], r["objective"], r["n"], r["d"], r["backend"], r["status"][:60],
                    "" if ms is None else (f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"), r.get("runs", ""),
                    r.get("iterations") or "", r["max_iter"] if r["objective"] == "sinkhorn" else "",
                    f"{r['peak_mb_above_baseline']:.0f}" if "peak_mb_above_baseline" in r else "", r.get("threads", "")])
    return markdown_table(["device", "cell", "objective", "N = M", "d", "backend", "status", "ms", "runs",
                           "iterations (x-y, x-x)", "max_iter", "peak MB above baseline", "threads"], out)


def report(results: dict) -> str:
    """Markdown tables of every section present in ``results`` (the JSON this script writes)."""
    out = []
    if results.get("step"):
        out += ["### One flow step", "", step_table(results["step"]), ""]
    if results.get("defaults"):
        out += ["### One step at flowaug's defaults (d = 784, N = 256)", "", markdown_table(
            ["objective", "backend", "M", "ms", "runs", "Sinkhorn iterations (x-y, x-x)"],
            [[r["objective"], r["backend"], r["m"], f"{r['ms']:.1f}" if r["ms"] < 100 else f"{r['ms']:.0f}",
              r["runs"], r["iterations"] or ""] for r in results["defaults"]]), ""]
    for threads, o in sorted(results.get("overhead", {}).get("by_threads", {}).items()):
        out += [f"### Per-batch flow cost in LeNet-5 training steps ({threads} thread(s), B = 256, 28 x 28)", "",
                f"One LeNet-5 training step: {o['train_step_ms']:.1f} ms (median of {o['batches']} batches, "
                "interleaved with the flows).", "", markdown_table(
                    ["FlowTransform (steps=5, reference_size=1024)", "ms per batch", "training steps"],
                    [[k, f"{v:.1f}", f"{o['flow_in_train_steps'][k]:.2f}"] for k, v in o["flow_ms"].items()]),
                "", markdown_table(
                    ["loader (kernel cache, one sample per epoch)", "images/s", "slowdown"],
                    [[k, f"{v:.0f}", f"{o['images_per_s']['no flow'] / v:.2f}"] for k, v in o["images_per_s"].items()]),
                ""]
    if results.get("memory"):
        rows = []
        for r in results["memory"]:
            extra = r.get("peak_mb", 0) - r.get("base_mb", 0)
            status = r["status"].split(";")[0] if not r["status"].startswith("ok") else r["status"]
            rows.append([r["n"], r["d"], r["backend"], status[:90],
                         f"{extra:.0f}" if "peak_mb" in r else "", f"{r['seconds']:.1f}" if "seconds" in r else ""])
        out += ["### Memory of one MMD flow step (N = M), each case in its own process", "", markdown_table(
            ["N = M", "d", "backend", "status", "peak RSS above baseline (MB)", "seconds (incl. KeOps build)"],
            rows), ""]
    if results.get("chunked"):
        out += ["### Dense, chunked and KeOps (one cold step, random data in [0, 1]^d)", "", chunked_table(results["chunked"]), ""]
    if results.get("coldstart"):
        out += ["### Sinkhorn cold start: before (over-relaxation, scaling 0.5) vs Anderson (N = 256, M = 4096)", "",
                coldstart_table(results["coldstart"]), ""]
    if results.get("condense"):
        out += ["### One condensation iteration (MNIST, 256 real images per class, DSA; median seconds)", "",
                markdown_table(["width", "IPC", "method", "s / iteration", "x DM", "runs"],
                               [[r["width"], r["ipc"], r["method"], f"{r['s_per_iteration']:.3f}",
                                 f"{r['ratio_to_dm']:.2f}", r["runs"]] for r in results["condense"]]), ""]
    if results.get("precompute"):
        r = results["precompute"]
        out += ["### Whole-dataset precompute", "", f"{r['points']} points toward {r['reference']}, {r['steps']} "
                f"steps ({r['config']}): {r['seconds']:.0f} s, {r['point_steps_per_s']:.0f} point-steps/s.", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", metavar="DIR", help="folder of NAME/{train,test}.npz; default: torchvision")
    p.add_argument("--out", default="benchmarks/results/speed.json")
    p.add_argument("--sections", nargs="+", choices=SECTIONS,
                   help="default: all; with --device: chunked (the only section that runs on a GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="device of the chunked section (default cpu); cuda needs a visible GPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a small grid (N=256, M=1024, d in {64, 784}, dense)")
    p.add_argument("--no-pot", action="store_true", help="skip POT")
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024], help="moving points")
    p.add_argument("--m", type=int, nargs="+", default=[1024, 4096], help="reference points")
    p.add_argument("--d", type=int, nargs="+", default=[2, 64, 784], help="dimensions")
    p.add_argument("--backends", nargs="+", default=["tensorized", "keops"], choices=["tensorized", "chunked", "keops"])
    p.add_argument("--memory-d", type=int, nargs="+", default=[64, 784], help="dimensions of the memory section")
    p.add_argument("--full-keops", action="store_true", help="also run the KeOps Sinkhorn at d = 784 (minutes)")
    p.add_argument("--keops-baselines", action="store_true", help="also time geomloss's online backend (slow)")
    p.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as handle:
            print(report(json.load(handle)))
        return
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (medians over at least 5 runs)")
    if args.sections is None:
        args.sections = ["chunked"] if args.device else list(SECTIONS)
    args.device = args.device or "cpu"
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False; "
                    f"torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a machine with a GPU, "
                    "or use --device cpu")
        if set(args.sections) - {"chunked"}:
            p.error(f"--device cuda runs the chunked section only, got --sections {' '.join(args.sections)}")
    warnings.filterwarnings("ignore", message=".*did not converge.*")
    results = {"machine": machine(), "config": vars(args), "blur": BLUR, "tau": TAU}
    if os.path.exists(args.out):  # keep sections computed by an earlier run of another section
        with open(args.out) as handle:
            previous = json.load(handle)
        results.update({k: v for k, v in previous.items() if k in SECTIONS})
    t0 = time.time()
    if "step" in args.sections:
        rows = section_step(args, results)
        print(step_table(rows))
    if "defaults" in args.sections:
        section_defaults(args, results)
    if "overhead" in args.sections:
        section_overhead(args, results)
    if "memory" in args.sections:
        section_memory(args, results)
    if "precompute" in args.sections:
        section_precompute(args, results)
    if "chunked" in args.sections:
        section_chunked(args, results)
    if "coldstart" in args.sections:
        section_coldstart(args, results)
    if "condense" in args.sections:
        section_condense(args, results)
    results["seconds"] = time.time() - t0
    write_json(args.out, results)
    print(report(results))
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
