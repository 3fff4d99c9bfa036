"""FlowDataset: wrapping, precompute with snapshots, the on-disk cache, online mode."""

from __future__ import annotations

import glob
import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import flowaug.datasets
from flowaug import FlowDataset

from .conftest import TensorPairs, tiny_images


def data(n=40, seed=0, uint8=False):
    x, y = tiny_images(n, seed=seed)
    if uint8:
        x = (x * 255).round().to(torch.uint8)
    return TensorPairs(x, y)


def reference():
    rx, ry = tiny_images(50, seed=9)
    return rx * 0.5 + 0.4, ry


class TestFlowDataset:
    def test_pickle_round_trip(self):
        fd = FlowDataset(data(), reference(), steps=3, progress=False)
        back = pickle.loads(pickle.dumps(fd))
        assert len(back) == len(fd)
        assert torch.equal(back[5][0], fd[5][0]) and back[5][1] == fd[5][1]

    def test_len_and_items_like_the_wrapped_dataset(self):
        ds = data(uint8=True)
        fd = FlowDataset(ds, reference(), steps=3, progress=False)
        assert len(fd) == len(ds)
        x, y = fd[7]
        assert x.shape == ds[7][0].shape and x.dtype == torch.uint8 and y == ds[7][1]

    def test_strength_selects_snapshots(self):
        ds = data()
        fd = FlowDataset(ds, reference(), steps=4, snapshots=[0, 2, 4], progress=False)
        fd.strength = 0.0
        assert all(torch.equal(fd[i][0], ds[i][0]) for i in range(len(ds)))
        start = torch.stack([fd[i][0] for i in range(len(ds))])
        fd.strength = 0.5
        middle = torch.stack([fd[i][0] for i in range(len(ds))])
        fd.strength = 1.0
        end = torch.stack([fd[i][0] for i in range(len(ds))])
        ref_mean = fd.reference.features.mean(0)
        gaps = [(t.flatten(1).mean(0) - ref_mean).norm() for t in (start, middle, end)]
        assert gaps[0] > gaps[1] > gaps[2]
        fd.strength = 0.25  # between snapshots 0 and 2: the midpoint
        quarter = torch.stack([fd[i][0] for i in range(len(ds))])
        assert torch.allclose(quarter, (start + middle) / 2, atol=1e-6)

    def test_matches_the_engine_when_one_chunk(self):
        ds = data()
        fd = FlowDataset(ds, reference(), steps=3, progress=False, chunk_size=1000)
        from flowaug import flow

        x = torch.stack([ds[i][0] for i in range(len(ds))])
        y = torch.tensor([ds[i][1] for i in range(len(ds))])
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
        direct = flow(x[order], y[order], reference(), steps=3, clamp=fd.reference.value_range()).x
        served = torch.stack([fd[i][0] for i in order.tolist()])
        assert torch.allclose(served, direct, atol=1e-6)

    def test_flowed_labels(self):
        fd = FlowDataset(data(), reference(), steps=3, labels="flow", progress=False)
        assert all(0 <= fd[i][1] < 3 for i in range(len(fd)))
        soft = FlowDataset(data(), reference(), steps=3, labels="flow", soft=True, progress=False)
        _, p = soft[0]
        assert p.shape == (3,) and float(p.sum()) == pytest.approx(1, abs=1e-5)

    def test_cache_is_reused(self, tmp_path, monkeypatch):
        first = FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        assert first.cache_status == "built" and len(glob.glob(str(tmp_path / "*.cache"))) == 1

        def no_flow(*args, **kwargs):
            raise AssertionError("the cached result should have been used")

        monkeypatch.setattr(flowaug.datasets, "run", no_flow)
        second = FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        assert second.cache_status == "loaded"
        assert all(torch.equal(first[i][0], second[i][0]) for i in range(len(first)))

    @pytest.mark.parametrize("change", ["reference", "steps", "objective", "data"])
    def test_cache_is_invalidated_by_changes(self, tmp_path, change):
        FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        ref = reference()
        kwargs = dict(steps=3, cache_dir=str(tmp_path), progress=False)
        ds = data()
        if change == "reference":
            ref = (ref[0] * 0.9, ref[1])
        elif change == "steps":
            kwargs["steps"] = 4
        elif change == "objective":
            kwargs["objective"] = "mmd"
        else:
            ds = data(seed=3)
        again = FlowDataset(ds, ref, **kwargs)
        assert again.cache_status == "built"
        assert len(glob.glob(str(tmp_path / "*.cache"))) == 2

    def test_corrupted_cache_is_rebuilt(self, tmp_path):
        first = FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        (path,) = glob.glob(str(tmp_path / "*.cache"))
        raw = bytearray(open(path, "rb").read())
        raw[-100] ^= 0xFF
        open(path, "wb").write(bytes(raw))
        with pytest.warns(RuntimeWarning, match="checksum"):
            again = FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        assert again.cache_status == "built"
        assert all(torch.equal(first[i][0], again[i][0]) for i in range(len(first)))

    def test_truncated_cache_is_rebuilt(self, tmp_path):
        FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        (path,) = glob.glob(str(tmp_path / "*.cache"))
        size = os.path.getsize(path)
        with open(path, "r+b") as handle:
            handle.truncate(size // 2)
        with pytest.warns(RuntimeWarning, match="truncated"):
            again = FlowDataset(data(), reference(), steps=3, cache_dir=str(tmp_path), progress=False)
        assert again.cache_status == "built"

    def test_online_mode_flows_each_batch(self):
        ds = data(48)
        fd = FlowDataset(ds, reference(), mode="online", steps=2)
        assert torch.equal(fd[3][0], ds[3][0])  # single items are not flowed
        batches = list(DataLoader(fd, batch_size=12))
        assert len(batches) == 4
        x = torch.cat([b[0] for b in batches])
        assert x.shape == (48, 1, 6, 6) and not torch.equal(x, torch.stack([ds[i][0] for i in range(48)]))
        fd.strength = 0.0
        same = torch.cat([b[0] for b in DataLoader(fd, batch_size=12)])
        assert torch.equal(same, torch.stack([ds[i][0] for i in range(48)]))
