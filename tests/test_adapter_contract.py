"""FlowTransform and FlowAnnealing behave like the torchvision and Lightning pieces they stand beside (issue 12)."""

from __future__ import annotations

import pickle
import typing
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

import flowaug
from flowaug import FlowAnnealing, FlowCollate, FlowTransform

from .conftest import TensorPairs, identity_calls, tiny_images
from .lightning_helpers import Recorder, loader, trainer


def reference():
    return tiny_images(30, seed=1)


class TestFlowCollate:
    def test_pickle_round_trip(self):
        c = FlowCollate(FlowTransform(reference(), steps=1, seed=0))
        back = pickle.loads(pickle.dumps(c))
        items = [(x, y) for x, y in zip(*tiny_images(4))]
        assert all(torch.equal(a, b) for a, b in zip(c(items), back(items)))

    def test_works_in_spawned_workers(self):
        x, y = tiny_images(8)
        dl = DataLoader(TensorPairs(x, y), batch_size=4, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=FlowCollate(FlowTransform(reference(), steps=1, seed=0)))
        batches = list(dl)
        assert len(batches) == 2 and not torch.equal(batches[0][0], x[:4])


class TestNormalizedData:
    def test_clamp_auto_never_moves_what_the_flow_did_not(self):
        rx, ry = reference()
        x, y = tiny_images(8)
        normalized = (x - 0.13) / 0.31  # v2.Normalize before the batch transform: [-0.42, 2.8]
        t = FlowTransform((rx, ry), strength=0.01, seed=0)
        with pytest.warns(RuntimeWarning, match="normalize the reference the same way"):
            out, _ = t(normalized, y)
        assert float((out - normalized).abs().mean()) < 0.1  # was 0.5: clipped into the reference's [0, 1]
        assert float(out.min()) < 0 and float(out.max()) > 1.5

    def test_same_units_do_not_warn(self):
        rx, ry = reference()
        x, y = tiny_images(8)
        t = FlowTransform(((rx - 0.13) / 0.31, ry), steps=1, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            t((x - 0.13) / 0.31, y)


class TestInputs:
    def test_bare_tensor_is_an_unlabeled_batch(self):
        x, _ = tiny_images(8)
        out = FlowTransform(reference(), steps=1, seed=0)(x)
        assert isinstance(out, torch.Tensor) and out.shape == x.shape and not torch.equal(out, x)

    @pytest.mark.parametrize("second", ["same size", "other crop"])
    def test_two_image_batches_are_refused(self, second):
        x, y = tiny_images(8)
        other = x.clone() if second == "same size" else torch.rand(8, 1, 4, 4)  # multi-crop views
        with pytest.raises(ValueError, match="2 image batches"):
            FlowTransform(reference(), steps=1)({"image": x, "image2": other, "labels": y})

    def test_extra_leaves_of_another_shape_pass_through(self):
        x, y = tiny_images(8)
        index = torch.arange(8)
        out = FlowTransform(reference(), steps=1, seed=0)(x, y, index)
        assert out[2] is index and not torch.equal(out[0], x)

    @pytest.mark.parametrize("extra", ["mask", "boxes"])
    def test_geometry_is_refused_like_mixup(self, extra):
        x, y = tiny_images(4)
        leaf = (tv_tensors.Mask(torch.zeros(4, 6, 6, dtype=torch.uint8)) if extra == "mask" else
                tv_tensors.BoundingBoxes(torch.zeros(4, 4), format="XYXY", canvas_size=(6, 6)))
        with pytest.raises(ValueError, match="does not support"):
            FlowTransform(reference(), steps=1)(tv_tensors.Image(x), y, leaf)

    def test_video_against_image_reference_names_the_fix(self):
        video = tv_tensors.Video(torch.rand(2, 3, 1, 6, 6))
        with pytest.raises(ValueError, match=r"flatten\(0, 1\)"):
            FlowTransform(reference(), steps=1)(video, torch.tensor([0, 1]))

    def test_a_five_dimensional_batch_is_told_the_accepted_shapes(self):
        """Issue 26: (1, B, C, H, W) was refused as "a batch of 1"."""
        x, y = tiny_images(4)
        with pytest.raises(ValueError, match=r"accepts batches of shape \(B, \*\(1, 6, 6\)\) or \(B, 36\).*got shape "
                                             r"\(1, 4, 1, 6, 6\)"):
            FlowTransform(reference(), steps=1)(x[None], y)

    def test_frames_of_a_video_flow_as_images(self):
        video = torch.rand(2, 3, 1, 6, 6)
        frames = FlowTransform(reference(), steps=1, seed=0)(video.flatten(0, 1), torch.arange(6) % 3)[0]
        assert frames.shape == (6, 1, 6, 6)

    def test_class_map_without_labels_is_refused(self):
        x, _ = tiny_images(4)
        with pytest.raises(ValueError, match="class_map=.*needs labels"):
            FlowTransform(reference(), steps=1, class_map="same")(x)

    def test_fit_reads_dict_batches(self):
        x, y = tiny_images(12)

        class Dicts(torch.utils.data.Dataset):
            def __len__(self):
                return 12

            def __getitem__(self, i):
                return {"image": x[i], "labels": y[i]}

        t = FlowTransform(reference(), steps=1).fit(DataLoader(Dicts(), batch_size=4))
        assert torch.allclose(t.source_stats.means, flowaug.ClassStats().update(x, y).means)


class TestSeeding:
    def test_no_seed_follows_the_global_rng(self):
        t = FlowTransform(reference(), steps=1, p=0.5)
        x, y = tiny_images(4)
        torch.manual_seed(0)
        first = identity_calls(t, x, y, 16)
        torch.manual_seed(0)
        assert identity_calls(t, x, y, 16) == first and 0 < sum(first) < 16

    def test_warm_starts_restart_every_epoch(self):
        """A run resumed at epoch 1 starts with no solver state; the uninterrupted run must flow epoch 1's
        batches identically, so warm starts may not carry over from epoch 0."""
        x, y = tiny_images(8)
        full = FlowTransform(reference(), steps=2, seed=0).fit((x, y))  # online statistics depend on history
        full.set_epoch(0)
        full(x[:4], y[:4])
        full.set_epoch(1)
        resumed = FlowTransform(reference(), steps=2, seed=0).fit((x, y))
        resumed.set_epoch(1)
        assert torch.equal(full(x[4:], y[4:])[0], resumed(x[4:], y[4:])[0])


class TestStepInterval:
    def test_step_interval_with_workers_warns(self, tmp_path):
        t = FlowTransform(reference(), steps=1, seed=0)
        cb = FlowAnnealing(t, "linear", interval="step", log=False)
        with pytest.warns(RuntimeWarning, match="not reproducible"):
            trainer(tmp_path, 1, [cb]).fit(Recorder(dim=36), loader(TensorPairs(*tiny_images(8)), workers=1))


class TestTypes:
    def test_public_arguments_are_typed(self):
        for fn, names in [(FlowTransform.__init__, ["reference", "labels_getter", "config"]),
                          (flowaug.flow, ["reference", "config", "source_stats", "generator"])]:
            hints = typing.get_type_hints(fn)
            assert all(name in hints for name in names), fn

    def test_package_is_typed_and_lists_its_names(self):
        import importlib.resources

        assert importlib.resources.files("flowaug").joinpath("py.typed").is_file()
        assert {"FlowAnnealing", "FlowCollate", "FlowConfig"} <= set(dir(flowaug))


class TestResample:
    def test_one_reference_sample_per_epoch(self):
        t = FlowTransform(reference(), steps=1, seed=0, reference_size=10, resample="epoch")
        x, y = tiny_images(4)
        t.set_epoch(0)
        samples = [t.make_params([x])["reference_index"] for _ in range(3)]
        assert all(torch.equal(s, samples[0]) for s in samples) and len(samples[0]) == 10
        t.set_epoch(1)
        other = t.make_params([x])["reference_index"]
        assert not torch.equal(other, samples[0])
        t.set_epoch(0)
        assert torch.equal(t.make_params([x])["reference_index"], samples[0])  # a function of (seed, epoch)

    def test_per_epoch_sample_keeps_warm_starts(self):
        x, y = tiny_images(8)
        t = FlowTransform(reference(), steps=1, seed=0, reference_size=10, resample="epoch")
        t(x[:4], y[:4])
        assert t._warm  # the solver state was kept for the next batch
        u = FlowTransform(reference(), steps=1, seed=0, reference_size=10)
        u(x[:4], y[:4])
        assert not u._warm  # a new sample per batch: potentials would describe other points

    def test_bad_resample_is_named(self):
        with pytest.raises(ValueError, match="resample"):
            FlowTransform(reference(), resample="step")
