"""One label policy, one way to configure, nothing silent (issue 20): the engine and both adapters accept and
refuse the same inputs in the same words; a FlowConfig is the same as the same keywords; what cannot be
flowed consistently is refused."""

from __future__ import annotations

import pickle
import re
import warnings

import pytest
import torch
from torchvision.transforms import v2

import flowaug
from flowaug import FlowConfig, FlowDataset, FlowTransform, Reference
from flowaug.policy import LabelPlan, label_plan, pair_classes_by_name

from .conftest import TensorPairs, tiny_images


def labeled_ref(n=30, seed=1):
    return tiny_images(n, seed=seed)


class TestLabelPlan:
    def test_pickle_round_trip(self):
        plan = LabelPlan("joint", True)
        assert pickle.loads(pickle.dumps(plan)) == plan

    @pytest.mark.parametrize("options, has_y, ref_labeled, kind", [
        ({}, True, True, "joint"),
        ({}, False, True, "features"),
        ({}, True, False, "features"),
        ({"label_weight": 0.0}, True, True, "features"),
        ({"labels": "flow"}, True, True, "joint"),
        ({"class_map": "same"}, True, True, "classwise"),
        ({"class_map": "ot", "labels": "flow"}, True, True, "classwise"),
    ])
    def test_what_runs(self, options, has_y, ref_labeled, kind):
        rx, ry = labeled_ref()
        ref = Reference(rx, ry if ref_labeled else None)
        plan = label_plan(FlowConfig(**options), ry[:4] if has_y else None, ref)
        assert plan.kind == kind
        assert plan.labels_move == (options.get("labels") == "flow")

    @pytest.mark.parametrize("options, has_y, ref_labeled, match", [
        ({"labels": "flow"}, True, False, "the reference has no labels"),
        ({"labels": "flow"}, False, True, r"the batch has no labels"),
        ({"labels": "flow", "label_weight": 0.0}, True, True, "label_weight is 0"),
        ({"class_map": "same"}, True, False, "the reference has no labels"),
        ({"class_map": "ot"}, False, True, "the batch has no labels"),
    ])
    def test_engine_and_adapters_refuse_alike(self, options, has_y, ref_labeled, match):
        """Was: the adapters dropped class_map / labels='flow' for an unlabeled reference without a word."""
        rx, ry = labeled_ref()
        ref = (rx, ry) if ref_labeled else rx
        x, y = tiny_images(12, seed=2)
        messages = []
        with pytest.raises(ValueError, match=match) as err:
            flowaug.flow(x, y if has_y else None, ref, **options)
        messages.append(str(err.value))
        with pytest.raises(ValueError, match=match) as err:
            FlowTransform(ref, labels_getter="default" if has_y else None, **options)
        messages.append(str(err.value))
        if has_y:  # a wrapped dataset always has labels
            with pytest.raises(ValueError, match=match) as err:
                FlowDataset(TensorPairs(x, y), ref, progress=False, **options)
            messages.append(str(err.value))
            with pytest.raises(ValueError, match=match) as err:
                FlowDataset(TensorPairs(x, y), ref, mode="online", **options)
            messages.append(str(err.value))
        assert len(set(messages)) == 1, messages

    def test_adapters_run_the_engines_flow(self):
        """The transform flows a batch exactly as flow() does with the transform's config."""
        rx, ry = labeled_ref()
        x, y = tiny_images(12, seed=2)
        for options in ({}, {"labels": "flow"}, {"class_map": "same"}):
            t = FlowTransform((rx, ry), steps=3, step_size=0.5, **options)
            out = flowaug.flow(x, y, (rx, ry), t.config)
            fx, fy = t(x, y)
            torch.testing.assert_close(fx, out.x)
            assert torch.equal(fy, out.labels)


class TestOneWayToConfigure:
    def test_flow_accepts_a_config(self):
        rx, ry = labeled_ref()
        x, y = tiny_images(12, seed=2)
        cfg = FlowConfig(objective="mmd", steps=3, step_size=0.5)
        a = flowaug.flow(x, y, (rx, ry), cfg)
        b = flowaug.flow(x, y, (rx, ry), objective="mmd", steps=3, step_size=0.5)
        assert torch.equal(a.x, b.x)
        c = flowaug.flow(x, y, (rx, ry), cfg, steps=1)  # keywords apply over the config
        assert len(c.times) == 2
        with pytest.raises(TypeError, match="unknown option"):
            flowaug.flow(x, y, (rx, ry), stepz=3)
        with pytest.raises(TypeError, match="config must be a FlowConfig"):
            flowaug.flow(x, y, (rx, ry), {"steps": 3})

    @pytest.mark.parametrize("adapter", ["transform", "dataset"])
    def test_a_config_is_the_same_as_the_same_keywords(self, adapter):
        """Was: FlowTransform(ref, FlowConfig(objective="mmd", ...)) got clamp=None, the keywords clamp='auto'."""
        rx, ry = labeled_ref()
        x, y = tiny_images(12, seed=2)
        options = {"objective": "mmd", "steps": 3, "step_size": 0.5}
        if adapter == "transform":
            a, b = FlowTransform((rx, ry), FlowConfig(**options)), FlowTransform((rx, ry), **options)
        else:
            a = FlowDataset(TensorPairs(x, y), (rx, ry), FlowConfig(**options), mode="online")
            b = FlowDataset(TensorPairs(x, y), (rx, ry), mode="online", **options)
        assert a.config == b.config and a.config.clamp == "auto"
        assert "clamp='auto'" in repr(a)  # repr shows what is in force
        if adapter == "transform":
            assert torch.equal(a(x * 3, y)[0], b(x * 3, y)[0])

    def test_options_given_explicitly_are_kept(self):
        rx, ry = labeled_ref()
        t = FlowTransform((rx, ry), FlowConfig(steps=10, clamp=None))  # equal to flow()'s defaults, but given
        assert t.config.steps == 10 and t.config.clamp is None
        assert FlowConfig(steps=3).replace(momentum=0.1).given == {"steps", "momentum"}
        assert pickle.loads(pickle.dumps(FlowConfig(steps=3))).given == {"steps"}


class TestRefusedInputs:
    def test_per_image_transform_is_refused(self):
        """Was: in a Dataset's v2.Compose, one (1, 28, 28) image was flowed as a one-point batch and collapsed."""
        rx, ry = labeled_ref()
        t = FlowTransform(rx, steps=2)
        data = TensorPairs(*tiny_images(8, seed=3), transform=v2.Compose([v2.Identity(), t]))
        with pytest.raises(ValueError, match="batch transform"):
            data[0]
        with pytest.raises(ValueError, match="batch of 1"):
            t(rx[:1])
        with pytest.raises(ValueError, match="non-empty batch"):
            t(rx[:0], ry[:0])

    def test_a_one_item_online_read_at_strength_zero_is_the_item(self):
        x, y = tiny_images(8, seed=3)
        fd = FlowDataset(TensorPairs(x, y), labeled_ref(), mode="online", strength=0.0)
        assert torch.equal(fd[2][0], x[2])

    def test_nan_in_a_wrapped_dataset_names_the_item(self):
        """Was: a 'looks random' warning (NaN != NaN), then the engine's error about 'x' with no index."""
        x, y = tiny_images(8, seed=3)
        x = x.clone()
        x[5, 0, 1, 1] = float("nan")
        for mode, call in (("precompute", lambda fd: None), ("online", lambda fd: fd.__getitems__([4, 5]))):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                with pytest.raises(ValueError, match=r"dataset\[5\] input must be finite, got 1 NaN"):
                    call(FlowDataset(TensorPairs(x, y), labeled_ref(), mode=mode, progress=False))

    def test_to_an_unavailable_device_fails_at_once(self):
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        t = FlowTransform(labeled_ref(), steps=2)
        before = t.reference
        with pytest.raises(RuntimeError, match="cannot move to that device"):
            t.to("cuda")
        assert t.reference is before and t.reference.device.type == "cpu"

    def test_to_a_dtype_moves_the_reference_and_the_computation(self):
        t = FlowTransform(labeled_ref(), steps=2).to(torch.float64)
        assert t.reference.features.dtype == torch.float64 and t.config.dtype == torch.float64
        x, y = tiny_images(6, seed=4)
        assert t(x.double(), y)[0].dtype == torch.float64
        t.half()  # half precision: the flow keeps computing as it did (see TestReviewFindings)
        assert t.config.dtype == torch.float64

    def test_torch_compile_graph_breaks_around_the_flow(self):
        """Was: Dynamo traced into the solver (82 graphs, 228 frames, recompilation limits hit); now the flow is
        one graph break and the step around it compiles."""
        torch._dynamo.reset()
        t = FlowTransform(labeled_ref(), steps=2, seed=0)
        x, y = tiny_images(6, seed=4)
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm.forward

        def step(a, b):
            fx, _ = t(a, b)
            return fx.sum() * 2

        t.set_epoch(0)  # the same draws for both calls
        value = torch.compile(step, backend=backend)(x, y)
        t.set_epoch(0)
        assert float(value) == pytest.approx(float(step(x, y)))
        assert len(graphs) <= 3, f"{len(graphs)} graphs: Dynamo traced into the flow"

    def test_fit_then_transform(self):
        """Was: t.fit(d).transform(x) was a TypeError (torchvision's per-leaf hook)."""
        rx, ry = labeled_ref()
        x, y = tiny_images(12, seed=2)
        t = FlowTransform((rx, ry), steps=2, labels_getter=None)
        out = t.fit((x, y)).transform(x)
        assert out.shape == x.shape and not torch.equal(out, x)


class TestWarningsOnce:
    def test_three_batches_of_0_255_data_say_each_thing_once(self):
        """Was: 8 warnings, most saying 'use a larger blur (e.g. 'auto')' with blur already 'auto'."""
        rx, ry = labeled_ref(60)
        t = FlowTransform((rx, ry), steps=2, seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(3):
                x, y = tiny_images(24, seed=10 + i)
                t(x * 255, y)
        texts = [str(w.message) for w in caught]
        assert any("different units" in m for m in texts)
        assert sum("different units" in m for m in texts) == 1
        assert sum("did not converge" in m for m in texts) <= 1
        assert not any("e.g. 'auto'" in m for m in texts)
        assert len(texts) <= 3, texts


class TestClassNames:
    class Named(TensorPairs):
        def __init__(self, x, y, classes):
            super().__init__(x, y)
            self.classes = classes

    def test_same_pairs_by_name_when_both_sides_name_classes(self):
        """Was: indices were paired (ImageFolder sorts names: 'eight' is 0 on one side, 2 on the other)."""
        rx, ry = labeled_ref(30)
        ref = Reference(rx, ry, classes=["zero", "one", "eight"])
        # the source: same images, classes renumbered alphabetically (eight=0, one=1, zero=2)
        x, y = tiny_images(12, seed=2)
        renumber = torch.tensor([2, 1, 0])
        source = self.Named(x, renumber[y], ["eight", "one", "zero"])
        fd = FlowDataset(source, ref, class_map="same", steps=4, step_size=1.0, progress=False)
        assert fd.config.class_map == (2, 1, 0)
        t = FlowTransform(ref, class_map="same", classes=source.classes, steps=4)
        assert t.config.class_map == (2, 1, 0)
        fx, _ = t(x, renumber[y])
        # each class lands on its own reference class: the band of class k stays where k's band is
        for k in range(3):
            own = rx[ry == k].mean(0)
            assert (fx[y == k].mean(0) - own).norm() < 0.5 * (x[y == k].mean(0) - rx[ry != k].mean(0)).norm()

    def test_unmatched_names_are_refused_with_the_fix(self):
        cfg = FlowConfig(class_map="same")
        with pytest.raises(ValueError, match="no class named"):
            pair_classes_by_name(cfg, ["cat", "dog"], ["0", "1"])
        assert pair_classes_by_name(cfg, None, ["0", "1"]) is cfg  # a side without names: indices, as documented
        assert pair_classes_by_name(cfg, ["a", "b"], ["a", "b", "c"]) is cfg


def test_messages_name_the_argument():
    rx, _ = labeled_ref()
    with pytest.raises(ValueError) as err:
        FlowTransform(rx, labels="flow")
    assert re.search(r"labels='flow'.*use labels='fixed'", str(err.value))


class TestReviewFindings:
    """Found by an independent review of the issue-20 changes."""

    def test_half_precision_modules_keep_the_flow_in_float32(self):
        """Was: Lightning's bf16-true / 16-true (module.to(bfloat16)) raised inside the cast, leaving the module
        half converted."""
        model = torch.nn.Module()
        model.lin = torch.nn.Linear(3, 2)
        model.aug = FlowTransform(labeled_ref(), steps=1)
        model.to(torch.bfloat16)
        assert model.lin.weight.dtype == torch.bfloat16
        assert model.aug.config.dtype == torch.float32 and model.aug.reference.features.dtype == torch.float32
        x, y = tiny_images(6, seed=4)
        assert model.aug(x.bfloat16(), y)[0].dtype == torch.bfloat16

    def test_float_after_double_switches_back(self):
        t = FlowTransform(labeled_ref(), steps=1, dtype=torch.float64)
        t.float()
        assert t.config.dtype == torch.float32
        with pytest.raises(RuntimeError, match="meta device"):
            t.to("meta")

    def test_soft_labels_have_one_shape_flowed_or_not(self):
        """Was: (B,) ids when a batch was skipped (p, strength 0), (B, K') when flowed."""
        rx, ry = labeled_ref()
        x, y = tiny_images(16, seed=2)
        t = FlowTransform((rx, ry), labels="flow", soft=True, steps=1, p=0.5, seed=0)
        shapes = {tuple(t(x, y)[1].shape) for _ in range(8)}
        assert shapes == {(16, 3)}
        t.strength = 0.0
        skipped = t(x, y)[1]
        assert torch.equal(skipped.argmax(1), y) and torch.allclose(skipped.sum(1), torch.ones(16))

    def test_online_dataset_soft_labels_have_one_shape_at_strength_zero(self):
        """An online FlowDataset at strength 0 serves items itself: its soft labels must match the transform's."""
        rx, ry = labeled_ref()
        x, y = tiny_images(8, seed=2)
        fd = FlowDataset(TensorPairs(x, y), (rx, ry), mode="online", labels="flow", soft=True, steps=1)
        flowed = fd.__getitems__([0, 1])
        fd.strength = 0.0
        skipped = fd.__getitems__([0, 1])
        assert [tuple(t[1].shape) for t in skipped] == [tuple(t[1].shape) for t in flowed] == [(3,), (3,)]
        assert [int(t[1].argmax()) for t in skipped] == y[:2].tolist() and int(fd[2][1].argmax()) == int(y[2])

    def test_one_named_side_says_indices_are_paired(self):
        rx, ry = labeled_ref()
        ref = Reference(rx, ry, classes=["zero", "one", "two"])
        with pytest.warns(RuntimeWarning, match="pairs classes by index: only the reference names"):
            FlowTransform(ref, class_map="same")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            FlowTransform(ref, class_map="same", classes=["zero", "one", "two"])

    def test_a_nan_in_a_batch_names_the_sample(self):
        x, y = tiny_images(8, seed=2)
        x = x.clone()
        x[3, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="the first in sample 3"):
            FlowTransform(labeled_ref(), steps=1)(x, y)
