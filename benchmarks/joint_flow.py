"""A joint flow of the whole MNIST train set (60,000 images) toward a 60,000-point reference with FlowDataset.

Issue 13 asks whether this is possible at all on a small machine: the dense backend would need
3 x 60,000^2 x 4 bytes = 40 GiB for one step, KeOps is 13-100x slower than dense on this CPU, and the chunked
backend streams row blocks of the cost in bounded memory. The reference is the same 60,000 digits shifted
two pixels to the right (a synthetic domain shift: this measures scale, not augmentation quality). One MMD
step (Gaussian kernel, median bandwidth), features only, one chunk of 60,000: time and peak memory above
the process baseline are written to JSON.

    python benchmarks/joint_flow.py --data ../shared/data --out benchmarks/results/joint_flow.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import flowaug  # noqa: E402
from benchmarks.common import machine, write_json  # noqa: E402
from flowaug.data import load_dataset  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", metavar="DIR", help="folder of NAME/{train,test}.npz (default: torchvision)")
    p.add_argument("--out", default="benchmarks/results/joint_flow.json")
    p.add_argument("--n", type=int, default=60000, help="images flowed (and reference size)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--objective", default="mmd", choices=["mmd", "sinkhorn"])
    args = p.parse_args(argv)
    x, y = load_dataset("mnist", "train", data_dir=args.data)
    x, y = x[: args.n], y[: args.n]
    reference = torch.roll(x, shifts=2, dims=-1)  # the same digits, two pixels to the right
    data = torch.utils.data.TensorDataset(x, y)
    base = peak_mb()
    t0 = time.perf_counter()
    fd = flowaug.FlowDataset(data, (reference, y), objective=args.objective, steps=args.steps, step_size=0.5,
                             label_weight=0.0, chunk_size=args.n, backend="chunked", progress=True)
    seconds = time.perf_counter() - t0
    moved = float((fd[0][0].float() - x[0].float()).abs().mean())
    res = {"machine": machine(), "threads": torch.get_num_threads(), "n": args.n, "reference": args.n,
           "steps": args.steps, "objective": args.objective, "backend": "chunked",
           "chunk_bytes": int(os.environ.get("FLOWAUG_CHUNK_BYTES", 256 * 2**20)), "seconds": seconds,
           "peak_mb_above_baseline": peak_mb() - base, "mean_abs_change_item0": moved}
    write_json(args.out, res)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
