"""Re-purposing a frozen model: flow a new domain toward the model's training data.

A LeNet-5 (Bonet, Vauthier & Korba's variant, 1x1 first convolution) is trained on 5,000 MNIST images (500
per class) and frozen. The USPS test split (2,007 images, resized to 28 x 28) is flowed toward those MNIST
images, and the frozen model's accuracy against the TRUE USPS labels is measured along the flow for

  unlabeled                  a Sinkhorn flow in pixel space; no USPS labels used
  unlabeled, pseudo-labels   class-wise flow whose classes are the frozen model's own predictions,
                             re-predicted every --segment steps; no USPS labels used
  label-aware (class-wise)   each USPS class flows toward the MNIST class of the same digit (true labels)

    python benchmarks/repurpose.py --data ../shared/data --out benchmarks/results/repurpose.json

Writes the curves (JSON, PNG) and prints a table. Published anchor (Bonet et al. 2025): 41.8% at step 0 and
98.3% after 50,000 steps, against OT-aligned labels, with class-wise flows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import flowaug  # noqa: E402
from benchmarks.common import machine, markdown_table, write_json  # noqa: E402
from flowaug.data import load_dataset, resize_images  # noqa: E402
from flowaug.demo import LeNet5, accuracy, per_class, train_classifier  # noqa: E402
from flowaug.plotting import image_grid, objective_curve  # noqa: E402


@torch.no_grad()
def predict(model, x):
    return torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])


def run_flow(name, ux, uy, reference, model, args, mode):
    """Flow in segments of ``args.segment`` steps (warm-started), measuring accuracy after each."""
    objective = flowaug.Sinkhorn()
    x, warm = ux, {}
    total = args.unlabeled_steps if mode == "unlabeled" and args.unlabeled_steps else args.steps
    curve = {"steps": [0], "accuracy": [accuracy(model, ux, uy)], "seconds": [0.0]}
    t0 = time.perf_counter()
    done = 0
    while done < total:
        k = min(args.segment, total - done)
        if mode == "unlabeled":
            out = flowaug.flow(x, None, reference, objective=objective, steps=k, step_size=args.step_size,
                               clamp=(0.0, 1.0), warm=warm, track_objective=False)
        else:
            labels = uy if mode == "labels" else predict(model, x)  # pseudo-labels: the frozen model's
            if mode == "pseudo":
                warm = {}  # the classes change between segments
            out = flowaug.flow(x, labels, reference, objective=objective, steps=k, step_size=args.step_size,
                               clamp=(0.0, 1.0), class_map="same", warm=warm, track_objective=False)
        x, warm = out.x, out.warm
        done += k
        curve["steps"].append(done)
        curve["accuracy"].append(accuracy(model, x, uy))
        curve["seconds"].append(time.perf_counter() - t0)
        print(f"{name}: step {done}: {100 * curve['accuracy'][-1]:.1f}%  [{curve['seconds'][-1]:.0f} s]", flush=True)
    return curve, x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="mnist", help="the frozen model's training data")
    p.add_argument("--target", default="usps", help="the new domain, flowed (its test split)")
    p.add_argument("--data", metavar="DIR", help="folder of NAME/{train,test}.npz; default: torchvision")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=50, help="training epochs of the frozen model (as in transfer.py)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--unlabeled-steps", type=int, default=None, metavar="N",
                   help="steps of the unlabeled flow (default: --steps; one step costs ~10x a class-wise step)")
    p.add_argument("--segment", type=int, default=10, help="steps between accuracy measurements")
    p.add_argument("--step-size", type=float, default=0.5)
    p.add_argument("--variants", nargs="+", default=["unlabeled", "pseudo", "labels"],
                   choices=["unlabeled", "pseudo", "labels"])
    p.add_argument("--out", default="benchmarks/results/repurpose.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="20 steps, 5 epochs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.epochs, args.segment = 20, 5, 5
    torch.manual_seed(0)
    mx, my = load_dataset(args.source, "train", data_dir=args.data)
    mx, my = per_class(mx.float() / 255, my, args.per_class, seed=0)
    ux, uy = load_dataset(args.target, "test", data_dir=args.data)
    ux = resize_images(ux.float() / 255, tuple(mx.shape[-2:]))
    t0 = time.perf_counter()
    model = train_classifier(LeNet5(first=1), mx, my, epochs=args.epochs)
    for param in model.parameters():
        param.requires_grad_(False)
    print(f"frozen LeNet-5: {100 * accuracy(model, mx, my):.1f}% on its training images, "
          f"{100 * accuracy(model, ux, uy):.1f}% on {args.target} test ({time.perf_counter() - t0:.0f} s)", flush=True)
    reference = flowaug.Reference(mx, my)
    names = {"unlabeled": "unlabeled", "pseudo": "unlabeled, pseudo-labels", "labels": "label-aware (class-wise)"}
    curves, finals = {}, {}
    for v in args.variants:
        curves[names[v]], finals[v] = run_flow(names[v], ux, uy, reference, model, args, v)
    png = os.path.splitext(args.out)[0] + ".png"
    objective_curve({k: (c["steps"], [100 * a for a in c["accuracy"]]) for k, c in curves.items()}, png,
                    xlabel="flow steps", ylabel="frozen-model accuracy (%)",
                    title=f"{args.target} flowed toward {args.source}: accuracy on the true labels")
    cols = torch.cat([torch.nonzero(uy == c).flatten()[:1] for c in range(10)])
    grid_png = os.path.splitext(args.out)[0] + "_grid.png"
    image_grid([ux[cols]] + [finals[v][cols] for v in args.variants], grid_png,
               row_labels=[f"{args.target}"] + [names[v] for v in args.variants], title="after the flow")
    rows = []
    for name, c in curves.items():
        best = max(range(len(c["accuracy"])), key=lambda i: c["accuracy"][i])
        reach95 = next((s for s, a in zip(c["steps"], c["accuracy"]) if a >= 0.95), None)
        rows.append([name, f"{100 * c['accuracy'][0]:.1f}", f"{100 * c['accuracy'][-1]:.1f} (step {c['steps'][-1]})",
                     f"{100 * c['accuracy'][best]:.1f} (step {c['steps'][best]})",
                     "" if reach95 is None else reach95, f"{c['seconds'][-1]:.0f}"])
    table = markdown_table(["flow", "step 0 (%)", "last step (%)", "best (%)", "first step >= 95%",
                            "seconds"], rows)
    print(table)
    write_json(args.out, {"config": vars(args), "machine": machine(), "curves": curves, "table": table,
                          "published": {"step 0": 41.8, "after 50,000 steps": 98.3}})
    print(f"wrote {args.out}, {png}, {grid_png}")


if __name__ == "__main__":
    main()
