"""Re-purposing a frozen model: flow a new domain toward the model's training data.

A LeNet-5 (Bonet, Vauthier & Korba's variant, 1x1 first convolution) is trained on 5,000 MNIST images (500
per class) and frozen. USPS images (resized to 28 x 28) are flowed toward those MNIST images, and the frozen
model's accuracy is measured along the flow. Every number reported is the LAST step of a flow whose length
was fixed beforehand (never the best step along the curve).

  unlabeled (pixel Sinkhorn)        USPS test flowed in pixel space; no USPS labels used
  unlabeled, pseudo-labels          USPS test, class-wise flow whose classes are the frozen model's own
                                    predictions, re-predicted every --segment steps; no USPS labels used
  unlabeled (frozen-feature OT)     USPS test flowed so that its features in the frozen model's
                                    penultimate layer match the MNIST features (Sinkhorn divergence in
                                    feature space, gradient back to the pixels). No USPS test labels used.
                                    Its settings (layer, blur, step size, number of steps) are chosen on a
                                    held-out part of USPS TRAIN (whose labels are used for that choice only)
                                    and then applied once, fixed, to USPS test.
  label-aware (class-wise), oracle  USPS TRAIN, each class flowed toward the MNIST class of the same digit
                                    (its own labels steer the flow), scored against those same labels. It
                                    measures how recognisable the flowed data is to the frozen model (data
                                    generation), not accuracy on unseen data: hence "oracle".

Unlabeled variants are scored against the true USPS test labels, which they never see.

The geometry baseline (``--inputs raw framed``, the default): a practitioner's first move is to put USPS
digits in MNIST's frame (``mnist_frame``: the ink box resized to fit 20 x 20 keeping its aspect ratio, placed
in 28 x 28 and centred by its centre of mass with a whole-pixel shift, as MNIST was made). The frozen model is
scored on framed USPS test, and every label-free flow above runs twice: from raw USPS (resized 16 -> 28, as
before) and from framed USPS, the frozen-feature flow with its settings chosen separately for each on held-out
USPS train (raw, or framed the same way). The oracle runs once, on raw USPS train. ``mnist_frame`` is checked
on MNIST test itself (nearly the identity; JSON ``frame``).

    OMP_NUM_THREADS=1 python benchmarks/repurpose.py --data ../shared/data --threads 1 \\
        --out benchmarks/results/repurpose_usps_mnist.json
    OMP_NUM_THREADS=1 python benchmarks/repurpose.py --data ../shared/data --threads 1 --quick \\
        --out /tmp/repurpose_quick.json      # a one-minute check of the whole pipeline

Writes the curves (JSON, PNG), a grid of flowed digits (PNG) and prints a table. Published anchor (Bonet et
al. 2025): 41.8% at step 0 and 98.3% after 50,000 steps, against OT-aligned labels, with class-wise flows.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flowaug  # noqa: E402
from benchmarks.common import machine, markdown_table, write_json  # noqa: E402
from flowaug.data import load_dataset, resize_images  # noqa: E402
from benchmarks.models import LeNet5, accuracy, per_class, train_classifier  # noqa: E402
from flowaug.plotting import image_grid, objective_curve  # noqa: E402


@torch.no_grad()
def predict(model, x):
    return torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])


def features(model, x, layer):
    """The frozen LeNet-5's activations at ``layer``: "fc1" (84, penultimate, after ReLU) or "conv3" (120)."""
    h = F.avg_pool2d(F.relu(model.conv1(x)), 2)
    h = F.avg_pool2d(F.relu(model.conv2(h)), 2)
    h = F.relu(model.conv3(h)).flatten(1)
    return h if layer == "conv3" else F.relu(model.fc1(h))


def mnist_frame(x: torch.Tensor, box: int = 20, size: int = 28, centre: float = 14.5) -> torch.Tensor:
    """Put digits in MNIST's frame, as MNIST itself was made: each image's ink bounding box (pixels > 0) is
    resized to fit a ``box`` x ``box`` square keeping its aspect ratio, placed in a ``size`` x ``size`` field,
    and shifted by a whole number of pixels so that its centre of mass lands on ``centre`` (continuous
    coordinates, pixel i spans [i, i + 1]; 14.5 is MNIST's own mean, i.e. pixel 14).

    ``x``: (N, H, W) or (N, 1, H, W), uint8 in 0..255 or float in [0, 1]. Returns float (N, 1, size, size).

    How: one affine ``grid_sample`` per batch (bilinear, zero padding, a per-image scale and translation,
    vectorised). The centre-of-mass shift is an INTEGER translation, as in MNIST (its centres of mass spread
    +-0.5 px around 14.5, std 0.29): a first pass places the scaled box with its top-left corner on whole
    pixels, the centre of mass of that image is measured, and the second pass is the same affine map moved by
    the rounded difference, i.e. the first pass rolled by whole pixels (zero fill, no wrap-around) and never
    interpolated twice. A digit whose box is already ``box`` pixels (MNIST) is therefore copied pixel for
    pixel; upscaling (USPS, 16 -> 20) is bilinear. Downscaling (a box larger than ``box``) is bilinear without
    antialiasing. Images without ink come back empty.
    """
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"x: expected one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"x: expected (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    n, h, w = x.shape
    ink = x > 0
    rows, cols = ink.any(2), ink.any(1)
    ir, ic = torch.arange(h), torch.arange(w)
    top = torch.where(rows, ir, h).min(1).values.float()
    bottom = torch.where(rows, ir, -1).max(1).values.float() + 1
    left = torch.where(cols, ic, w).min(1).values.float()
    right = torch.where(cols, ic, -1).max(1).values.float() + 1
    empty = ~rows.any(1)
    bh, bw = (bottom - top).clamp(min=1), (right - left).clamp(min=1)
    scale = box / torch.maximum(bh, bw)
    # where the scaled box's top-left corner goes in the output: centred in the size x size field, on whole pixels
    oy = torch.floor((size - scale * bh) / 2)
    ox = torch.floor((size - scale * bw) / 2)
    grid_pos = torch.arange(size, dtype=torch.float32) + 0.5  # output pixel centres, continuous coordinates

    def sample(oy, ox):
        # output pixel centre o -> input position top + (o - oy) / scale, then to grid_sample's [-1, 1]
        iy = top[:, None] + (grid_pos[None] - oy[:, None]) / scale[:, None]
        ix = left[:, None] + (grid_pos[None] - ox[:, None]) / scale[:, None]
        gy = (2 * iy / h - 1)[:, :, None].expand(n, size, size)
        gx = (2 * ix / w - 1)[:, None, :].expand(n, size, size)
        grid = torch.stack([gx, gy], dim=-1)
        return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    first = sample(oy, ox)
    mass = first.sum((1, 2, 3)).clamp(min=1e-12)
    cy = (first[:, 0].sum(2) * grid_pos).sum(1) / mass
    cx = (first[:, 0].sum(1) * grid_pos).sum(1) / mass
    dy, dx = torch.round(centre - cy), torch.round(centre - cx)
    out = sample(oy + dy, ox + dx).clamp(0, 1)
    out[empty] = 0
    return out


def frame_check(model, data_dir, source):
    """``mnist_frame`` on MNIST test itself: it should be (nearly) the identity."""
    x, y = load_dataset(source, "test", data_dir=data_dir)
    x = x.float() / 255
    framed = mnist_frame(x)
    diff = (framed - x).abs()
    per_image = diff.flatten(1).amax(1)
    return {"images": len(x), "unchanged (max abs diff < 1e-5)": int((per_image < 1e-5).sum()),
            "mean abs pixel diff": float(diff.mean()), "max abs pixel diff": float(diff.max()),
            "frozen-model accuracy raw": accuracy(model, x, y), "frozen-model accuracy framed": accuracy(model, framed, y)}


def feature_objective(model, mx, layer, blur):
    """The debiased Sinkhorn divergence between the frozen model's ``layer`` features of the moving images and
    of the MNIST reference images: :class:`flowaug.Embedded` with a fixed embedding, whose gradient flows back
    through the network to the pixels (each image moves by J_phi(x)^T times its Sinkhorn displacement in
    feature space); ``flowaug.flow`` does the Euler steps and the clamp. Features are divided by the MNIST
    features' RMS distance to their mean, so that ``blur`` is in units of the feature spread.
    """
    with torch.no_grad():
        ref = torch.cat([features(model, mx[i : i + 1024], layer) for i in range(0, len(mx), 1024)])
        scale = float((ref - ref.mean(0)).square().sum(1).mean().sqrt())
    return flowaug.Embedded(flowaug.Sinkhorn(blur=blur), FrozenFeatures(model, layer, scale)), scale


class FrozenFeatures(torch.nn.Module):
    """The frozen model's ``layer`` features divided by ``scale``: the fixed embedding of the feature flow."""

    def __init__(self, model, layer, scale):
        super().__init__()
        self.model, self.layer, self.scale = model, layer, scale

    def forward(self, x):
        return features(self.model, x, self.layer) / self.scale


def run_flow(name, x0, score_y, reference, model, args, mode, steps, step_size, objective=None, log=True):
    """Flow in segments of ``args.segment`` steps (warm-started), scoring against ``score_y`` after each.

    ``score_y`` is used only for scoring, except in mode "labels" (the oracle) where it also steers the flow.
    """
    objective = objective or flowaug.Sinkhorn()
    x, warm = x0, {}
    curve = {"steps": [0], "accuracy": [accuracy(model, x0, score_y)], "seconds": [0.0]}
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        k = min(args.segment, steps - done)
        if mode in ("unlabeled", "features"):
            out = flowaug.flow(x, None, reference, objective=objective, steps=k, step_size=step_size,
                               clamp=(0.0, 1.0), warm=warm, track_objective=False)
        else:
            labels = score_y if mode == "labels" else predict(model, x)  # pseudo-labels: the frozen model's
            if mode == "pseudo":
                warm = {}  # the classes change between segments
            out = flowaug.flow(x, labels, reference, objective=objective, steps=k, step_size=step_size,
                               clamp=(0.0, 1.0), class_map="same", warm=warm, track_objective=False)
        x, warm = out.x, out.warm or {}
        done += k
        curve["steps"].append(done)
        curve["accuracy"].append(accuracy(model, x, score_y))
        curve["seconds"].append(time.perf_counter() - t0)
        if log:
            print(f"{name}: step {done}: {100 * curve['accuracy'][-1]:.1f}%  [{curve['seconds'][-1]:.0f} s]",
                  flush=True)
    return curve, x


def select_feature_setting(model, mx, reference, sx, sy, args):
    """Grid over (layer, blur, step size) on the held-out USPS-train images ``sx``; each flows
    ``args.select_steps`` steps. The chosen setting and number of steps maximise the held-out accuracy
    (ties: fewer steps, listed order). ``sy`` is used for this choice only."""
    trials = []
    for layer, blur, tau in itertools.product(args.layers, args.blurs, args.feature_step_sizes):
        objective, _ = feature_objective(model, mx, layer, blur)
        t0 = time.perf_counter()
        curve, _ = run_flow("select", sx, sy, reference, model, args, "features", args.select_steps, tau,
                            objective=objective, log=False)
        best = max(range(len(curve["accuracy"])), key=lambda i: (curve["accuracy"][i], -i))
        trials.append({"layer": layer, "blur": blur, "step_size": tau, "steps": curve["steps"],
                       "accuracy": curve["accuracy"], "best_steps": curve["steps"][best],
                       "best_accuracy": curve["accuracy"][best]})
        print(f"select: layer {layer}, blur {blur}, step size {tau}: held-out "
              + " ".join(f"{s}:{100 * a:.1f}" for s, a in zip(curve["steps"], curve["accuracy"]))
              + f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    chosen = max(trials, key=lambda t: t["best_accuracy"])
    return chosen, trials


def paired_change(model, before, after, y):
    """Accuracy of ``after`` minus accuracy of ``before`` on the same images (points), with a 95 % normal interval
    over the images of the per-image differences (correct after - correct before). It covers the sampling of the
    test images only: one frozen model, one run of each flow."""
    d = (predict(model, after) == y).float() - (predict(model, before) == y).float()
    mean, half = float(d.mean()), 1.96 * float(d.std()) / len(d) ** 0.5
    return {"points": 100 * mean, "ci95": [100 * (mean - half), 100 * (mean + half)], "images": len(d)}


def fmt_change(c):
    return f"{c['points']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="mnist", help="the frozen model's training data")
    p.add_argument("--target", default="usps", help="the new domain")
    p.add_argument("--data", metavar="DIR", help="folder of NAME/{train,test}.npz; default: torchvision")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=50, help="training epochs of the frozen model (as in transfer.py)")
    p.add_argument("--segment", type=int, default=10, help="steps between accuracy measurements")
    p.add_argument("--step-size", type=float, default=0.5, help="pixel-space Sinkhorn flows")
    p.add_argument("--pixel-steps", type=int, default=20,
                   help="steps of the unlabeled pixel flow (one step costs several class-wise steps)")
    p.add_argument("--pseudo-steps", type=int, default=100)
    p.add_argument("--oracle-steps", type=int, default=50, help="steps of the class-wise flow of USPS train")
    p.add_argument("--select-n", type=int, default=500, help="held-out USPS-train images for choosing settings")
    p.add_argument("--select-steps", type=int, default=40, help="longest flow tried on the held-out images")
    p.add_argument("--layers", nargs="+", default=["fc1", "conv3"], choices=["fc1", "conv3"])
    p.add_argument("--blurs", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--feature-step-sizes", nargs="+", type=float, default=[1.0, 4.0])
    p.add_argument("--variants", nargs="+", default=["unlabeled", "pseudo", "features", "labels"],
                   choices=["unlabeled", "pseudo", "features", "labels"])
    p.add_argument("--inputs", nargs="+", default=["raw", "framed"], choices=["raw", "framed"],
                   help="what the label-free flows start from: USPS resized 16 -> 28 (raw), or put in MNIST's "
                        "frame by mnist_frame (framed)")
    p.add_argument("--model-cache", metavar="PATH", help="load/save the frozen model's weights here")
    p.add_argument("--out", default="benchmarks/results/repurpose.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="few steps, 5 epochs, a one-setting grid")
    args = p.parse_args(argv)
    defaults = {a: p.get_default(a) for a in ("layers", "blurs", "feature_step_sizes", "select_steps", "select_n")}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.segment = 5, 5
        args.pixel_steps = args.pseudo_steps = args.oracle_steps = args.select_steps = 10
        args.select_n, args.layers, args.blurs, args.feature_step_sizes = 300, ["fc1"], [0.3], [4.0]
    start = time.perf_counter()
    torch.manual_seed(0)
    mx, my = load_dataset(args.source, "train", data_dir=args.data)
    mx, my = per_class(mx.float() / 255, my, args.per_class, seed=0)
    size = tuple(mx.shape[-2:])
    ux_u8, uy = load_dataset(args.target, "test", data_dir=args.data)
    ux = resize_images(ux_u8.float() / 255, size)
    tx_u8, ty = load_dataset(args.target, "train", data_dir=args.data)
    tx = resize_images(tx_u8.float() / 255, size)
    held = torch.randperm(len(tx), generator=torch.Generator().manual_seed(1))[: args.select_n]
    sx, sy = tx[held], ty[held]
    starts = {"raw": (ux, sx)}
    if "framed" in args.inputs:
        if size != (28, 28):
            raise ValueError(f"--inputs framed puts digits in MNIST's 28 x 28 frame; the source is {size}")
        starts["framed"] = (mnist_frame(ux_u8), mnist_frame(tx_u8[held]))
    t0 = time.perf_counter()
    model = LeNet5(first=1)
    if args.model_cache and os.path.exists(args.model_cache):
        model.load_state_dict(torch.load(args.model_cache))
        model.eval()
    else:
        model = train_classifier(model, mx, my, epochs=args.epochs)
        if args.model_cache:
            torch.save(model.state_dict(), args.model_cache)
    for param in model.parameters():
        param.requires_grad_(False)
    train_seconds = time.perf_counter() - t0
    print(f"frozen LeNet-5: {100 * accuracy(model, mx, my):.1f}% on its training images, "
          f"{100 * accuracy(model, ux, uy):.1f}% on {args.target} test, "
          f"{100 * accuracy(model, tx, ty):.1f}% on {args.target} train ({train_seconds:.0f} s)", flush=True)
    no_flow = {"raw": accuracy(model, ux, uy)}
    check = None
    if "framed" in args.inputs:
        no_flow["framed"] = accuracy(model, starts["framed"][0], uy)
        check = frame_check(model, args.data, args.source)
        print(f"framed {args.target} test: {100 * no_flow['framed']:.1f}% (raw {100 * no_flow['raw']:.1f}%); "
              f"mnist_frame on {args.source} test: {check['unchanged (max abs diff < 1e-5)']} of {check['images']} "
              f"images unchanged, accuracy {100 * check['frozen-model accuracy raw']:.1f}% raw, "
              f"{100 * check['frozen-model accuracy framed']:.1f}% framed", flush=True)
    reference = flowaug.Reference(mx, my)
    kinds = {"unlabeled": "unlabeled (pixel Sinkhorn)", "pseudo": "unlabeled, pseudo-labels"}
    curves, finals, selection, results = {}, {}, {}, []
    for inp in args.inputs:
        x0, hx = starts[inp]
        for v in [v for v in args.variants if v != "labels"]:
            if v in ("unlabeled", "pseudo"):
                name = f"{inp} USPS test: {kinds[v]}"
                steps = args.pixel_steps if v == "unlabeled" else args.pseudo_steps
                curves[name], finals[inp, v] = run_flow(name, x0, uy, reference, model, args, v, steps,
                                                        args.step_size)
                setting = {"step_size": args.step_size, "steps": steps}
            else:
                chosen, trials = select_feature_setting(model, mx, reference, hx, sy, args)
                objective, scale = feature_objective(model, mx, chosen["layer"], chosen["blur"])
                name = (f"{inp} USPS test: unlabeled (frozen-feature OT: {chosen['layer']}, blur {chosen['blur']}, "
                        f"step size {chosen['step_size']})")
                if chosen["best_steps"] == 0:  # no setting raised the held-out accuracy at any step count tried
                    name = (f"{inp} USPS test: unlabeled (frozen-feature OT): 0 steps chosen, every setting "
                            "lowered the held-out accuracy")
                curves[name], finals[inp, v] = run_flow(name, x0, uy, reference, model, args, "features",
                                                        chosen["best_steps"], chosen["step_size"],
                                                        objective=objective)
                setting = {k: chosen[k] for k in ("layer", "blur", "step_size")} | {"steps": chosen["best_steps"]}
                selection[inp] = {
                    "how": (f"{len(hx)} USPS-train images (seeded random subset, seed 1; {inp}) held out; every "
                            "setting of the grid below flowed them for select_steps steps, scored every segment "
                            "steps against their labels (used only for this choice); the (setting, step count) "
                            "with the highest held-out accuracy (ties: fewer steps, then grid order) was then run "
                            "once on USPS test, whose labels are used only for scoring, and its last step is "
                            "reported."),
                    "grid": {"layer": args.layers, "blur": args.blurs, "step_size": args.feature_step_sizes,
                             "steps": list(range(0, args.select_steps + 1, args.segment))},
                    "chosen": {k: chosen[k] for k in ("layer", "blur", "step_size", "best_steps", "best_accuracy")},
                    "feature_scale": scale, "trials": trials}
            c = curves[name]
            results.append({"input": inp, "variant": v, "name": name, "setting": setting,
                            "step 0": c["accuracy"][0], "last step": c["accuracy"][-1], "steps": c["steps"][-1],
                            "seconds": c["seconds"][-1],
                            "change vs its start": paired_change(model, x0, finals[inp, v], uy),
                            "change vs raw USPS": paired_change(model, ux, finals[inp, v], uy)})
    if "labels" in args.variants:
        name = "oracle: label-aware (class-wise), raw USPS train scored on its own steering labels"
        curves[name], finals["raw", "labels"] = run_flow(name, tx, ty, reference, model, args, "labels",
                                                         args.oracle_steps, args.step_size)
        c = curves[name]
        results.append({"input": "raw", "variant": "labels", "name": name, "oracle": True,
                        "setting": {"step_size": args.step_size, "steps": args.oracle_steps},
                        "step 0": c["accuracy"][0], "last step": c["accuracy"][-1], "steps": c["steps"][-1],
                        "seconds": c["seconds"][-1], "change vs its start": paired_change(model, tx, finals["raw", "labels"], ty)})
    png = os.path.splitext(args.out)[0] + ".png"
    short = {"unlabeled": "pixel", "pseudo": "pseudo", "features": "feature OT", "labels": "oracle (train)"}
    legend = {r["name"]: f"{'' if r['variant'] == 'labels' else r['input'] + ': '}{short[r['variant']]}"
              + (f" ({r['steps']} steps)" if r["variant"] == "features" else "") for r in results}
    objective_curve({legend[k]: (c["steps"], [100 * a for a in c["accuracy"]]) for k, c in curves.items()}, png,
                    xlabel="flow steps", ylabel="frozen-model accuracy (%)",
                    title=f"{args.target} toward {args.source}: frozen-model accuracy")
    cols = torch.cat([torch.nonzero(uy == c).flatten()[:1] for c in range(10)])
    tcols = torch.cat([torch.nonzero(ty == c).flatten()[:1] for c in range(10)])
    rows, labels = [], []
    for inp in args.inputs:
        rows.append(starts[inp][0][cols])
        labels.append(f"{inp} {args.target} test")
        for v in [v for v in args.variants if v != "labels"]:
            rows.append(finals[inp, v][cols])
            labels.append(f"{inp}: {short[v]}")
    if "labels" in args.variants:
        rows += [tx[tcols], finals["raw", "labels"][tcols]]
        labels += [f"{args.target} train", "oracle (train)"]
    grid_png = os.path.splitext(args.out)[0] + "_grid.png"
    image_grid(rows, grid_png, row_labels=labels, title="after the flow (last step)")
    table_rows = [[f"{inp} {args.target} test", "no flow", f"{100 * no_flow[inp]:.1f}", f"{100 * no_flow[inp]:.1f}",
                   "" if inp == "raw" else fmt_change(paired_change(model, ux, starts[inp][0], uy)), 0, ""]
                  for inp in no_flow]
    for r in results:
        change = fmt_change(r["change vs its start"])
        if "change vs raw USPS" in r and r["input"] != "raw":
            change += f"; vs raw {fmt_change(r['change vs raw USPS'])}"
        table_rows.append([f"{r['input']} {args.target} {'train' if r.get('oracle') else 'test'}",
                           r["name"].split(": ", 1)[1] if not r.get("oracle") else "**oracle**: label-aware "
                           "(class-wise), scored on its own steering labels",
                           f"{100 * r['step 0']:.1f}", f"{100 * r['last step']:.1f}", change, r["steps"],
                           f"{r['seconds']:.0f}"])
    table = markdown_table(["input", "flow", "step 0 (%)", "last step (%)",
                            "change, points [95% CI over images]", "steps", "seconds"], table_rows)
    print(table)
    grid_used = {a: getattr(args, a) for a in defaults}
    write_json(args.out, {
        "config": vars(args), "machine": machine(), "no_flow": no_flow, "results": results, "curves": curves,
        "table": table, "seconds_total": time.perf_counter() - start, "seconds_training": train_seconds,
        "reported": "last step of each flow (step counts fixed beforehand, never the best step)",
        "change_intervals": ("paired over the test images (correct after - correct before per image), normal "
                             "95 % interval: the sampling of test images only; one frozen model (seed 0), one "
                             "run of each flow"),
        "frame": {"how": mnist_frame.__doc__.split("\n\n")[0].replace("\n    ", " "),
                  "centre of mass shift": "integer (whole-pixel) translation folded into one affine grid_sample; "
                                          "resize bilinear",
                  "check_on_source_test": check},
        "feature_flow_selection": selection,
        "feature_grid": {"used": grid_used, "default": defaults, "reduced": grid_used != defaults,
                         "note": ("the same grid for every input (raw and framed)" if grid_used == defaults else
                                  "reduced from the default grid, the same way for every input (raw and framed)")},
        "published": {"step 0": 41.8, "after 50,000 steps": 98.3}})
    print(f"wrote {args.out}, {png}, {grid_png}")


if __name__ == "__main__":
    main()
