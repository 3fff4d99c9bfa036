"""FlowTransform: the torchvision v2 batch-transform contract."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision import tv_tensors

from flowaug import ClassStats, FlowTransform, Reference

from .conftest import TensorPairs, tiny_images


def make(**kwargs):
    rx, ry = tiny_images(40, seed=1)
    kwargs.setdefault("steps", 3)
    kwargs.setdefault("seed", 0)
    return FlowTransform((rx * 0.5 + 0.4, ry), **kwargs)


def batch(n=12, seed=0):
    return tiny_images(n, seed=seed)


class TestFlowTransform:
    def test_pickle_round_trip(self):
        t = make(labels="flow", p=0.7, strength=0.6)
        back = pickle.loads(pickle.dumps(t))
        assert repr(back) == repr(t) and back.strength == 0.6
        x, y = batch()
        torch.manual_seed(0)
        a = t(x, y)
        torch.manual_seed(0)
        b = back(x, y)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        back.strength = 0.1  # a plain pickle copy owns its value
        assert t.strength == 0.6

    def test_repr_shows_hyperparameters_not_tensors(self):
        text = repr(make(steps=7, p=0.5))
        assert "steps=7" in text and "p=0.5" in text and "Reference(samples=40" in text
        assert "tensor(" not in text

    def test_strength_zero_is_the_identity(self):
        x, y = batch()
        t = make(strength=0.0)
        out_x, out_y = t(x, y)
        assert out_x is x and out_y is y

    def test_p_zero_never_changes_a_batch(self):
        t = make(p=0.0)
        for seed in range(5):
            x, y = batch(seed=seed)
            out = t(x, y)
            assert out[0] is x and out[1] is y

    def test_p_applies_to_that_fraction_of_batches(self):
        t = make(p=0.3, steps=1)
        x, y = batch()
        changed = sum(not torch.equal(t(x, y)[0], x) for _ in range(60))
        assert 8 <= changed <= 30

    def test_moves_toward_the_reference(self):
        t = make(steps=5, labels="fixed")
        x, y = batch(30)
        ref = t.reference.features
        out, _ = t(x, y)
        assert (out.flatten(1).mean(0) - ref.mean(0)).norm() < 0.3 * (x.flatten(1).mean(0) - ref.mean(0)).norm()

    def test_strength_scales_the_flow_time(self):
        x, y = batch(30)
        full = make(steps=4, step_size=0.1, label_weight=0)  # short flow time: far from converged
        half = make(steps=4, step_size=0.1, label_weight=0, strength=0.5)
        ref_mean = full.reference.features.mean(0)
        d0 = (x.flatten(1).mean(0) - ref_mean).norm()
        d_half = (half(x, y)[0].flatten(1).mean(0) - ref_mean).norm()
        d_full = (full(x, y)[0].flatten(1).mean(0) - ref_mean).norm()
        assert d_full < d_half < d0

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8])
    def test_structure_dtype_device_preserved(self, dtype):
        x, y = batch()
        x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
        t = make()
        out_x, out_y = t(x, y)
        assert out_x.dtype == dtype and out_x.shape == x.shape and out_x.device == x.device
        assert torch.equal(out_y, y)

    def test_tv_tensor_image_and_dict_batches(self):
        x, y = batch()
        t = make(labels="flow")
        out = t({"image": tv_tensors.Image(x), "labels": y, "meta": "kept"})
        assert isinstance(out["image"], tv_tensors.Image) and out["meta"] == "kept"
        assert out["labels"].shape == y.shape and out["labels"].dtype == y.dtype

    def test_labels_getter_callable_and_none(self):
        x, y = batch()
        t = make(labels_getter=lambda b: b[1]["target"])
        out = t((x, {"target": y}))
        assert torch.equal(out[1]["target"], y) and not torch.equal(out[0], x)
        unlabeled = make(labels_getter=None)
        assert unlabeled(x).shape == x.shape

    def test_flat_batches(self):
        x, y = batch()
        rx, ry = tiny_images(40, seed=1)
        t = FlowTransform((rx.flatten(1), ry), steps=2)
        out_x, _ = t(x.flatten(1), y)
        assert out_x.shape == (12, 36)

    def test_flow_labels_hard_and_soft(self):
        x, y = batch()
        hard = make(labels="flow")(x, y)[1]
        assert hard.shape == y.shape and int(hard.max()) < 3
        soft = make(labels="flow", soft=True)(x, y)[1]
        assert soft.shape == (12, 3) and torch.allclose(soft.sum(1), torch.ones(12), atol=1e-5)
        soft_in = torch.nn.functional.one_hot(y, 3).float()
        soft_out = make(labels="flow")(x, soft_in)[1]
        assert soft_out.shape == (12, 3) and soft_out.dtype == torch.float32

    def test_seeded_randomness_is_reproducible(self):
        x, y = batch()
        a = make(reference_size=10, seed=3, p=0.5)
        b = make(reference_size=10, seed=3, p=0.5)
        for _ in range(4):
            assert torch.equal(a(x, y)[0], b(x, y)[0])
        c = make(reference_size=10, seed=4, p=0.5)
        assert any(not torch.equal(a(x, y)[0], c(x, y)[0]) for _ in range(4))

    def test_fit_source_statistics(self):
        x, y = batch(40)
        t = make().fit((x, y))
        assert isinstance(t.source_stats, ClassStats) and t.source_stats.counts.tolist() == [14, 13, 13]
        from_dataset = make().fit(TensorPairs(x, y))
        assert torch.allclose(from_dataset.source_stats.means, t.source_stats.means)

    def test_online_statistics_accumulate(self):
        t = make()
        for seed in range(3):
            t(*batch(12, seed=seed))
        assert float(t.source_stats.counts.sum()) == 36

    def test_in_a_collate_fn_with_workers(self):
        x, y = batch(48)
        t = make()
        loader = DataLoader(TensorPairs(x, y), batch_size=12, num_workers=2,
                            collate_fn=lambda items: t(*default_collate(items)))
        seen = [bx for bx, _ in loader]
        assert len(seen) == 4 and all(bx.shape == (12, 1, 6, 6) for bx in seen)
        assert not torch.equal(torch.cat(seen), x)

    def test_reference_given_as_dataset_or_reference(self):
        rx, ry = tiny_images(40, seed=1)
        a = FlowTransform(TensorPairs(rx, ry), steps=2, seed=0)
        b = FlowTransform(Reference(rx, ry), steps=2, seed=0)
        x, y = batch()
        assert torch.allclose(a(x, y)[0], b(x, y)[0])

    def test_deepcopy_is_independent(self):
        t = make(strength=0.4)
        c = copy.deepcopy(t)
        c.strength = 0.9
        assert t.strength == 0.4
