"""FlowConfig (one place for the options of a flow) and the bugs that lived where options were copied."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import flowaug
from flowaug import FlowAnnealing, FlowConfig, FlowDataset, FlowTransform, Potential
from flowaug.config import fingerprint

from .conftest import TensorPairs, blobs, identity_calls, tiny_images
from .lightning_helpers import Recorder, loader, trainer


class TestFlowConfig:
    def test_pickle_round_trip(self):
        cfg = FlowConfig(objective=flowaug.MMD("energy"), steps=3, class_map=torch.tensor([1, 0]), clamp=(0, 1))
        again = pickle.loads(pickle.dumps(cfg))
        assert again == cfg and again.fingerprint() == cfg.fingerprint()

    @pytest.mark.parametrize("option, value, error, match", [
        ("steps", -1, ValueError, "steps"),
        ("step_size", 0.0, ValueError, "step_size"),
        ("labels", "move", ValueError, "labels must be one of"),
        ("clamp", (1, 0), ValueError, "clamp"),
        ("clamp", "range", ValueError, "clamp"),
        ("class_map", torch.tensor([0.5]), TypeError, "class_map"),
        ("snapshots", [0, 11], ValueError, "snapshots must be steps in"),
        ("dtype", torch.float16, ValueError, "dtype"),
        ("guard", 1, TypeError, "guard"),
        ("objective", "wasserstein", ValueError, "objective must be one of"),
    ])
    def test_bad_options_are_named(self, option, value, error, match):
        with pytest.raises(error, match=match):
            FlowConfig(**{option: value})

    def test_replace_revalidates_and_refuses_unknown_options(self):
        cfg = FlowConfig(steps=4)
        assert cfg.replace(steps=2).steps == 2 and cfg.steps == 4  # frozen: a new object
        with pytest.raises(ValueError, match="momentum"):
            cfg.replace(momentum=1.0)
        with pytest.raises(TypeError, match="unknown FlowConfig option"):
            cfg.replace(stepz=2)

    @pytest.mark.parametrize("snapshots, expected", [(None, []), (1, [4]), (3, [0, 2, 4]), ("all", [0, 1, 2, 3, 4]),
                                                     ([4, 1, 1], [1, 4])])
    def test_one_snapshot_rule(self, snapshots, expected):
        assert FlowConfig(steps=4, snapshots=snapshots).snapshot_steps() == expected

    def test_fingerprint_hashes_code_not_addresses(self):
        a = FlowConfig(objective=Potential(lambda z: z.square().sum(1)))
        b = FlowConfig(objective=Potential(lambda z: z.square().sum(1)))
        c = FlowConfig(objective=Potential(lambda z: z.abs().sum(1)))
        assert a.fingerprint() == b.fingerprint() != c.fingerprint()
        assert a.fingerprint() != a.replace(steps=3).fingerprint()

    def test_fingerprint_sees_captured_values(self):
        def make(shift):
            return FlowConfig(objective=Potential(lambda z: (z - shift).square().sum(1)))

        assert make(1.0).fingerprint() == make(1.0).fingerprint() != make(2.0).fingerprint()

    def test_fingerprint_is_stable_across_processes(self):
        script = textwrap.dedent("""
            import flowaug
            print(flowaug.FlowConfig(objective=flowaug.Potential(lambda z: z.square().sum(1)), steps=3).fingerprint())
        """)
        runs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
                for _ in range(2)}
        assert len(runs) == 1 and len(runs.pop().strip()) == 32

    def test_unfingerprintable_values_are_refused_by_name(self):
        with pytest.raises(ValueError, match="cannot fingerprint"):
            fingerprint(object())

    def test_every_option_reachable_from_every_adapter(self):
        rx, ry = tiny_images(20, seed=1)
        options = dict(soft_temperature=0.5, guard=False, dtype=torch.float64, track_objective=True, momentum=0.2)
        t = FlowTransform((rx, ry), **options)
        fd = FlowDataset(TensorPairs(rx, ry), (rx, ry), mode="online", **options)
        for cfg in (t.config, fd.config):
            assert all(getattr(cfg, k) == v for k, v in options.items())
        with pytest.raises(TypeError, match="unknown option"):
            FlowTransform((rx, ry), stepz=3)
        base = FlowConfig(steps=2, objective="mmd")
        # a config and the same keywords make the same transform: the adapter's defaults fill what neither set
        assert FlowTransform((rx, ry), base, step_size=0.5).config == \
            FlowTransform((rx, ry), steps=2, objective="mmd", step_size=0.5).config

    def test_options_that_do_not_apply_are_refused(self):
        rx, ry = tiny_images(20, seed=1)
        with pytest.raises(ValueError, match="snapshots"):
            FlowTransform((rx, ry), snapshots=3)
        with pytest.raises(ValueError, match="snapshots"):
            FlowDataset(TensorPairs(rx, ry), (rx, ry), mode="online", snapshots=3)


class TestFixedBugs:
    """Issue 11's six bugs, each reproduced on the code before the FlowConfig redesign."""

    def test_1_cache_key_includes_soft(self, tmp_path):
        x, y = tiny_images(24)
        rx, ry = tiny_images(30, seed=1)
        kwargs = dict(steps=2, labels="flow", cache_dir=str(tmp_path), progress=False)
        hard = FlowDataset(TensorPairs(x, y), (rx, ry), soft=False, **kwargs)
        soft = FlowDataset(TensorPairs(x, y), (rx, ry), soft=True, **kwargs)
        assert hard.cache_status == "built" and soft.cache_status == "built"
        assert isinstance(hard[0][1], int)
        assert soft[0][1].shape == (3,) and float(soft[0][1].sum()) == pytest.approx(1.0)

    def test_2_callable_objectives_hit_the_cache_by_content(self, tmp_path):
        x, y = tiny_images(24)
        rx, ry = tiny_images(30, seed=1)

        def make(fn):
            return FlowDataset(TensorPairs(x, y), (rx, ry), objective=flowaug.Sinkhorn() + 0.1 * Potential(fn),
                               steps=2, cache_dir=str(tmp_path), progress=False)

        assert make(lambda z: z.square().sum(1)).cache_status == "built"
        assert make(lambda z: z.square().sum(1)).cache_status == "loaded"  # another lambda, same code
        assert make(lambda z: z.abs().sum(1)).cache_status == "built"  # other code: not served the old result

    def test_3_classwise_times_include_guard_halvings(self):
        x, y = blobs(30, [[0.0, 0.0], [3.0, 0.0]], seed=1)
        rx, ry = blobs(30, [[0.0, 5.0], [3.0, 5.0]], seed=2)
        joint = flowaug.flow(x, reference=rx, objective="energy", steps=4, step_size=40.0)
        with pytest.warns(RuntimeWarning, match="halving"):
            classwise = flowaug.flow(x, y, (rx, ry), class_map="same", objective="energy", steps=4, step_size=40.0)
        for out in (joint, classwise):
            assert float(out.times[-1]) == pytest.approx(float(out.times.diff().sum()))
            assert float(out.times.diff()[-1]) == pytest.approx(out.step_size)
        assert float(classwise.times[-1]) < 160.0

    def test_4_last_objective_is_kept_and_logged(self, tmp_path):
        rx, ry = tiny_images(30, seed=1)
        t = FlowTransform((rx, ry), steps=2, seed=0, track_objective=True)
        x, y = tiny_images(8)
        t(x, y)
        assert t.last_objective is not None and t.last_objective.shape == (3,)
        assert bool(t.last_objective[-1] < t.last_objective[0])

        class Logged(Recorder):
            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)
                self.logged = dict(self.trainer.callback_metrics)
                return loss

        module = Logged(dim=36)
        cb = FlowAnnealing(t, "linear", interval="step", apply_to_batches=True, log=True)
        trainer(tmp_path, 1, [cb]).fit(module, loader(TensorPairs(*tiny_images(16)), workers=0))
        assert "flowaug/objective" in module.logged

    def test_5_one_class_reference_is_a_feature_flow(self):
        x, _ = blobs(40, [[0.0, 0.0]], seed=1)
        rx, _ = blobs(50, [[2.0, 1.0]], seed=2)
        y, ry = torch.zeros(40, dtype=torch.long), torch.zeros(50, dtype=torch.long)
        labeled = flowaug.flow(x, y, (rx, ry), steps=3, labels="flow")
        features = flowaug.flow(x, reference=rx, steps=3)
        assert torch.allclose(labeled.x, features.x, atol=1e-3)  # equal up to the solver tolerance
        assert torch.equal(labeled.labels, ry[:40])

    def test_6_a_failed_call_changes_no_state(self):
        rx, ry = tiny_images(30, seed=1)  # classes 0, 1, 2
        t = FlowTransform((rx, ry), steps=1, class_map="same", seed=0)
        x, y = tiny_images(6)
        with pytest.raises(ValueError, match="no samples of class 12"):
            t(x, torch.tensor([0, 1, 2, 0, 1, 12]))
        assert t.source_stats is None
        soft = torch.nn.functional.one_hot(y, 3).float()
        out, labels = t(x, soft)  # a valid one-hot batch works after the failure
        assert out.shape == x.shape and torch.equal(labels, soft)


class TestAnnealable:
    def test_any_object_with_strength_and_set_epoch_joins(self, tmp_path):
        class Mine:
            def __init__(self):
                self.strength, self.epochs = 0.0, []

            def set_epoch(self, epoch):
                self.epochs.append(epoch)

        mine = Mine()
        cb = FlowAnnealing(mine, "linear", log=False)
        trainer(tmp_path, 3, [cb]).fit(Recorder(dim=36), loader(TensorPairs(*tiny_images(8)), workers=0))
        assert mine.strength == pytest.approx(1.0) and mine.epochs[-3:] == [0, 1, 2]

    def test_objects_without_set_epoch_are_refused(self):
        class StrengthOnly:
            strength = 0.0

        with pytest.raises(TypeError, match="set_epoch"):
            FlowAnnealing(StrengthOnly())

    def test_set_epoch_restarts_the_random_stream(self):
        rx, ry = tiny_images(30, seed=1)
        t = FlowTransform((rx, ry), steps=1, p=0.5, seed=3)
        x, y = tiny_images(4)
        t.set_epoch(5)
        first = identity_calls(t, x, y, 12)
        t.set_epoch(6)
        other = identity_calls(t, x, y, 12)
        t.set_epoch(5)
        assert identity_calls(t, x, y, 12) == first != other
        with pytest.raises(ValueError, match="epoch"):
            t.set_epoch(-3)


class TestReviewFindings:
    """Found by an independent review of this redesign; each failed before its fix."""

    def test_cache_key_includes_the_reference_policy(self, tmp_path):
        x, y = tiny_images(24)
        rx, ry = tiny_images(30, seed=1)
        kwargs = dict(steps=2, cache_dir=str(tmp_path), progress=False)
        pooled = FlowDataset(TensorPairs(x, y), flowaug.Reference(rx, ry, single_sample="pooled"), **kwargs)
        zero = FlowDataset(TensorPairs(x, y), flowaug.Reference(rx, ry, single_sample="zero"), **kwargs)
        assert pooled.cache_status == "built" and zero.cache_status == "built"

    def test_common_lambda_constants_fingerprint(self):
        a = FlowConfig(objective=Potential(lambda z: z[..., 0] * (z[:, 1] > 0)))
        b = FlowConfig(objective=Potential(lambda z: z[..., 0] * (z[:, 1] > 0)))
        assert a.fingerprint() == b.fingerprint()
        assert fingerprint({2, 3}) == fingerprint({3, 2}) != fingerprint(frozenset({2}))

    def test_overflowing_scales_are_refused_not_looped(self):
        x = torch.rand(8, 2) * 1e20
        with pytest.raises(FloatingPointError, match="overflow"):
            flowaug.flow(x, reference=x + 1, steps=1)

    def test_boolean_class_maps_and_soft_fixed_labels_are_refused(self):
        with pytest.raises(TypeError, match="class_map"):
            FlowConfig(class_map=(True, False))
        with pytest.raises(TypeError, match="class_map"):
            FlowConfig(class_map=torch.tensor([True, False]))
        rx, ry = tiny_images(20, seed=1)
        with pytest.raises(ValueError, match="soft=True"):
            FlowTransform((rx, ry), soft=True)
        with pytest.raises(ValueError, match="soft=True"):
            FlowDataset(TensorPairs(rx, ry), (rx, ry), soft=True, progress=False)
