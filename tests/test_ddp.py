"""Lightning DDP on CPU (strategy='ddp', gloo, 2 processes), run as a subprocess (tests/ddp_run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import flowaug

from .conftest import tiny_images
from .ddp_run import digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ddp_schedule_batches_and_sharded_precompute(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, MASTER_PORT="29517")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_run.py"), str(tmp_path)],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # the same schedule on every rank: epoch e of 0..2 at strength e / 2
    for r in ranks:
        for epoch, steps in r["seen"].items():
            assert {s["strength"] for s in steps} == {int(epoch) / 2}
    # each rank trained on its own half of the data (DistributedSampler), flowed on that rank
    idx = [sorted(i for s in r["seen"]["1"] for i in s["idx"]) for r in ranks]
    assert not set(idx[0]) & set(idx[1]) and sorted(idx[0] + idx[1]) == list(range(32))
    x, _ = tiny_images(32, seed=5)
    unflowed = {digest(x[s["idx"]]) for r in ranks for s in r["seen"]["2"]}
    flowed = {s["x"] for r in ranks for s in r["seen"]["2"]}
    assert not unflowed & flowed  # at strength 1 every batch was moved
    assert {s["x"] for r in ranks for s in r["seen"]["0"]} == {digest(x[s["idx"]]) for r in ranks for s in r["seen"]["0"]}
    # the precompute was sharded across ranks and gathered: both ranks hold the single-process result
    single = flowaug.FlowDataset(TensorDataset(*tiny_images(64, seed=3)), tiny_images(40, seed=4), steps=3,
                                 chunk_size=16, progress=False)
    expected = digest(torch.stack([single[i][0] for i in range(len(single))]))
    assert ranks[0]["flowed"] == ranks[1]["flowed"] == expected
    assert ranks[0]["chunks"] == [0, 2] and ranks[1]["chunks"] == [1, 3]  # 64 points in chunks of 16
