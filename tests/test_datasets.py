"""FlowDataset: wrapping, precompute with snapshots, the on-disk cache, online mode."""

from __future__ import annotations

import glob
import os
import pickle

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, IterableDataset
from torchvision import tv_tensors

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
        # a small step: the flow is still on its way at step 2 (clamp="auto" no longer holds it back)
        fd = FlowDataset(ds, reference(), steps=4, step_size=0.2, snapshots=[0, 2, 4], progress=False)
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
        direct = flow(x[order], y[order], reference(), steps=3, clamp="auto").x
        served = torch.stack([fd[i][0] for i in order.tolist()])
        assert torch.allclose(served, direct, atol=1e-6)

    def test_flowed_labels(self):
        fd = FlowDataset(data(), reference(), steps=3, labels="flow", progress=False)
        assert all(0 <= fd[i][1] < 3 for i in range(len(fd)))
        soft = FlowDataset(data(), reference(), steps=3, labels="flow", soft=True, progress=False)
        _, p = soft[0]
        assert p.shape == (3,) and float(p.sum()) == pytest.approx(1, abs=1e-5)

    def test_soft_labels_below_the_last_snapshot_keep_their_form(self):
        # were hard class ids below the midpoint of the last interval, (K',) soft labels above it: a DataLoader
        # could not collate an epoch whose strength crossed it, and a loss saw two label forms
        fd = FlowDataset(data(), reference(), steps=3, labels="flow", soft=True, snapshots=3, progress=False)
        hard = FlowDataset(data(), reference(), steps=3, labels="flow", snapshots=3, progress=False)
        for strength in (0.0, 0.3, 0.6, 1.0):
            fd.strength = hard.strength = strength
            for i in (0, 7):
                p, c = fd[i][1], hard[i][1]
                assert p.shape == (3,) and p.dtype == torch.float32
                assert float(p.sum()) == pytest.approx(1, abs=1e-5)
                if strength < 1:  # one-hot of the class the hard dataset serves at that strength
                    assert int(p.argmax()) == int(c) and float(p.max()) == 1.0

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
        batches = list(DataLoader(fd, batch_size=12))
        assert len(batches) == 4
        x = torch.cat([b[0] for b in batches])
        assert x.shape == (48, 1, 6, 6) and not torch.equal(x, torch.stack([ds[i][0] for i in range(48)]))
        fd.strength = 0.0
        same = torch.cat([b[0] for b in DataLoader(fd, batch_size=12)])
        assert torch.equal(same, torch.stack([ds[i][0] for i in range(48)]))


class Items(Dataset):
    """Items built by ``make(x, y, i)`` from tiny images (PIL, tv_tensors, dicts, 3-tuples...)."""

    def __init__(self, make, n=24, **attributes):
        self.x, self.y = tiny_images(n)
        self.make = make
        self.__dict__.update(attributes)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.make(self.x[i], self.y[i], i)


def pair(x, y, i):
    return x, int(y)


def pil(x):
    return Image.fromarray((x[0] * 255).round().to(torch.uint8).numpy(), mode="L")


class TestOnlineAccessPaths:
    """Issue 12 item 2: mode="online" flows every batch a DataLoader fetches, and refuses the paths that would
    flow one item alone (a one-point measure lands on the reference's mean) instead of serving them unflowed."""

    def test_batches_flow_and_keep_their_spread(self):
        ds = data(24)
        rx, _ = reference()
        fd = FlowDataset(ds, reference(), mode="online", steps=2, seed=0)
        x, _ = next(iter(DataLoader(fd, batch_size=8)))
        raw = torch.stack([ds[i][0] for i in range(8)])
        assert not torch.equal(x, raw)
        assert float(x.flatten(1).std(0).mean()) > 0.1 * float(raw.flatten(1).std(0).mean())
        assert float((x - rx.mean(0)).flatten(1).norm(dim=1).min()) > 1e-3  # not collapsed onto the mean

    def test_single_items_are_refused_with_the_fix(self):
        ds = data(24)
        fd = FlowDataset(ds, reference(), mode="online", steps=2, seed=0)
        with pytest.raises(RuntimeError, match="cannot serve one item alone"):
            fd[3]
        fd.strength = 0.0  # the identity needs no batch
        assert torch.equal(fd[3][0], ds[3][0])

    @pytest.mark.parametrize("batch_size", [6, None])
    def test_concat_dataset_refused_online_and_flowed_precomputed(self, batch_size):
        target, source = data(12, seed=5), data(12)
        online = ConcatDataset([target, FlowDataset(source, reference(), mode="online", steps=2, seed=0)])
        with pytest.raises(RuntimeError, match="FlowCollate"):
            list(DataLoader(online, batch_size=batch_size))
        pre = FlowDataset(source, reference(), steps=2, progress=False)
        got = list(DataLoader(ConcatDataset([target, pre]), batch_size=batch_size))
        xs = torch.cat([b[0] for b in got]) if batch_size else torch.stack([b[0] for b in got])
        raw_target = torch.stack([target[i][0] for i in range(12)])
        raw_source = torch.stack([source[i][0] for i in range(12)])
        assert torch.equal(xs[:12], raw_target)
        assert bool(((xs[12:] - raw_source).flatten(1).norm(dim=1) > 1e-3).all())  # every source item flowed


class TestTransforms:
    """Issue 12 item 3: transform/target_transform after the flow; a random wrapped dataset is reported."""

    def test_transform_runs_after_the_flow_on_every_access(self):
        ds = data(24)
        noise = lambda x: x + torch.rand(x.shape)  # noqa: E731 - a random transform
        fd = FlowDataset(ds, reference(), steps=3, progress=False, transform=noise,
                         target_transform=lambda y: y + 10)
        plain = FlowDataset(ds, reference(), steps=3, progress=False)
        a, b = fd[2], fd[2]
        assert not torch.equal(a[0], b[0])  # redrawn on every access
        assert bool(((a[0] - plain[2][0]) >= 0).all()) and bool(((a[0] - plain[2][0]) <= 1).all())
        assert a[1] == plain[2][1] + 10
        online = FlowDataset(ds, reference(), mode="online", steps=2, transform=lambda x: -x,
                             target_transform=lambda y: y + 10)
        x, y = next(iter(DataLoader(online, batch_size=8)))
        assert bool((x <= 0).all()) and torch.equal(y, torch.tensor([ds[i][1] + 10 for i in range(8)]))

    def test_random_wrapped_dataset_warns(self):
        x, y = tiny_images(24)
        random_ds = TensorPairs(x, y, transform=lambda t: t + 0.01 * torch.rand(t.shape))
        with pytest.warns(RuntimeWarning, match=r"looks random.*transform="):
            FlowDataset(random_ds, reference(), steps=2, progress=False)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            FlowDataset(data(24), reference(), steps=2, progress=False)
        assert not any("looks random" in str(w.message) for w in record)

    def test_transform_must_be_callable(self):
        with pytest.raises(TypeError, match="target_transform must be a callable"):
            FlowDataset(data(), reference(), steps=2, progress=False, target_transform=3)


class TestDropIn:
    """Issue 12 item 4: item types, attributes, dict items, 3-tuples, iterable datasets."""

    @pytest.mark.parametrize("mode", ["precompute", "online"])
    def test_pil_items_stay_pil(self, mode):
        ds = Items(lambda x, y, i: (pil(x), int(y)))
        fd = FlowDataset(ds, reference(), mode=mode, steps=2, progress=False)
        items = fd.__getitems__([0, 1, 2, 3])
        assert all(isinstance(im, Image.Image) and im.mode == "L" and im.size == (6, 6) for im, _ in items)
        assert all(type(label) is int for _, label in items)
        assert any(np.asarray(items[k][0]).tolist() != np.asarray(ds[k][0]).tolist() for k in range(4))

    @pytest.mark.parametrize("mode", ["precompute", "online"])
    def test_tv_tensors_and_tensor_labels_keep_their_types(self, mode):
        ds = Items(lambda x, y, i: (tv_tensors.Image(x), y.to(torch.int32)))
        fd = FlowDataset(ds, reference(), mode=mode, steps=2, progress=False)
        for x, y in fd.__getitems__([0, 1, 2, 3]):
            assert type(x) is tv_tensors.Image and x.dtype == torch.float32 and x.shape == (1, 6, 6)
            assert isinstance(y, torch.Tensor) and y.dtype == torch.int32 and y.shape == ()

    def test_attributes_are_forwarded(self):
        ds = Items(pair, classes=["a", "b", "c"], targets=[0, 1, 2], _secret=1)
        fd = FlowDataset(ds, reference(), steps=2, progress=False)
        assert fd.classes == ["a", "b", "c"] and fd.targets == [0, 1, 2]
        with pytest.raises(AttributeError):
            fd._secret
        with pytest.raises(AttributeError, match="nothing_here"):
            fd.nothing_here
        back = pickle.loads(pickle.dumps(fd))
        assert back.classes == ["a", "b", "c"]
        flowing = FlowDataset(ds, reference(), steps=2, labels="flow", progress=False)
        with pytest.raises(AttributeError, match="labels='flow'"):
            flowing.targets

    @pytest.mark.parametrize("mode", ["precompute", "online"])
    def test_dict_items(self, mode):
        ds = Items(lambda x, y, i: {"image": x, "label": int(y), "id": f"item{i}"})
        fd = FlowDataset(ds, reference(), mode=mode, steps=2, progress=False)
        items = fd.__getitems__([0, 1, 2])
        assert [it["id"] for it in items] == ["item0", "item1", "item2"]
        assert not torch.equal(items[0]["image"], ds[0]["image"]) and items[0]["label"] == ds[0]["label"]
        odd = Items(lambda x, y, i: {"pixels": x, "cls": int(y)})
        with pytest.raises(TypeError, match=r"item_keys=\(input_key, label_key\)"):
            FlowDataset(odd, reference(), mode=mode, steps=2, progress=False)
        keyed = FlowDataset(odd, reference(), mode=mode, steps=2, progress=False, item_keys=("pixels", "cls"))
        assert set(keyed.__getitems__([0, 1])[0]) == {"pixels", "cls"}

    @pytest.mark.parametrize("mode", ["precompute", "online"])
    def test_extra_tuple_entries_pass_through(self, mode):
        ds = Items(lambda x, y, i: (x, int(y), {"index": i}))
        fd = FlowDataset(ds, reference(), mode=mode, steps=2, progress=False)
        x, y, extra = fd.__getitems__([5, 6])[0]
        assert extra == {"index": 5} and y == ds[5][1] and not torch.equal(x, ds[5][0])
        with pytest.raises(ValueError, match="item_keys must be"):
            FlowDataset(ds, reference(), mode=mode, steps=2, progress=False, item_keys=(0, 0))

    @pytest.mark.parametrize("mode", ["precompute", "online"])
    def test_iterable_dataset_is_refused(self, mode):
        class Stream(IterableDataset):
            def __iter__(self):
                return iter(data(8))

        with pytest.raises(TypeError, match="map-style Dataset.*IterableDataset Stream.*FlowTransform"):
            FlowDataset(Stream(), reference(), mode=mode, steps=2, progress=False)
