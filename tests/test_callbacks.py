"""FlowAnnealing: schedules, worker visibility with persistent workers, exact resume."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from flowaug import FlowAnnealing, FlowTransform
from flowaug.schedules import schedule_value

from .conftest import TensorPairs, tiny_images
from .lightning_helpers import FlowCollate, Recorder, StopAfter, StrengthProbe, loader, trainer


def transform(**kwargs):
    rx, ry = tiny_images(30, seed=1)
    return FlowTransform((rx, ry), steps=2, seed=0, **kwargs)


def seen_per_epoch(module):
    """The single strength value each epoch's batches carried (fails if an epoch mixed values)."""
    out = {}
    for epoch, values in module.seen.items():
        assert max(values) - min(values) < 1e-12, (epoch, values)
        out[epoch] = values[0]
    return out


class TestFlowAnnealing:
    def test_pickle_round_trip(self):
        cb = FlowAnnealing(transform(), "cosine", start=0.25, interval="step")
        back = pickle.loads(pickle.dumps(cb))
        assert repr(back) == repr(cb)
        assert back.value_at(7, 21) == cb.value_at(7, 21)

    @pytest.mark.parametrize("name", ["linear", "cosine", "step", "exponential"])
    def test_schedules_go_from_start_to_end(self, name):
        values = [schedule_value(name, p / 10) for p in range(11)]
        assert values[0] == 0 and values[-1] == pytest.approx(1)
        assert all(b >= a for a, b in itertools.pairwise(values))
        back = [schedule_value(name, p / 10, 1.0, 0.2) for p in range(11)]
        assert back[0] == 1 and back[-1] == pytest.approx(0.2)

    def test_cos_is_an_alias_of_cosine(self):
        # StochasticWeightAveraging(annealing_strategy="cos") spells cosine annealing "cos": accepted, and
        # normalised to "cosine" so repr, state_key (checkpoint key) and values match a "cosine" callback
        cos, cosine = FlowAnnealing(transform(), "cos"), FlowAnnealing(transform(), "cosine")
        assert cos.schedule == "cosine"
        assert repr(cos) == repr(cosine) and "schedule='cosine'" in repr(cos)
        assert cos.state_key == cosine.state_key
        assert [cos.value_at(e, 11) for e in range(11)] == [cosine.value_at(e, 11) for e in range(11)]
        assert cos.value_at(5, 11) == pytest.approx(0.5) and cos.value_at(2, 11) == pytest.approx(0.5 - 0.5 * math.cos(0.2 * math.pi))
        assert pickle.loads(pickle.dumps(cos)).schedule == "cosine"
        assert cos.state_dict() == cosine.state_dict()
        assert schedule_value("cos", 0.25) == schedule_value("cosine", 0.25)
        with pytest.raises(ValueError, match="'cos'"):  # the error lists the alias among the accepted names
            FlowAnnealing(transform(), "cosinus")

    def test_callable_schedule_and_start_fraction(self):
        cb = FlowAnnealing(transform(), lambda p: p * p, start=0.5)
        assert cb.value_at(2, total=11) == 0  # before the start (epoch 5)
        assert cb.value_at(10, total=11) == 1
        assert cb.value_at(7, total=11) == pytest.approx(0.16)

    def test_start_as_epoch_and_custom_end(self):
        cb = FlowAnnealing(transform(), "linear", start=2, end=6, start_value=0.2, end_value=0.6)
        assert [round(cb.value_at(e, 100), 6) for e in (0, 2, 4, 6, 9)] == [0.2, 0.2, 0.4, 0.6, 0.6]

    def test_bad_arguments_name_themselves(self):
        with pytest.raises(ValueError, match="schedule"):
            FlowAnnealing(transform(), "sawtooth")
        with pytest.raises(ValueError, match="interval"):
            FlowAnnealing(transform(), interval="batch")
        with pytest.raises(TypeError, match="targets\\[0\\]"):
            FlowAnnealing([object()])
        with pytest.raises(ValueError, match="start"):
            FlowAnnealing(transform(), start=1.5)

    def test_workers_see_the_schedule_with_persistent_workers(self, tmp_path):
        t = transform()
        cb = FlowAnnealing(t, "linear", log=False)
        module = Recorder()
        trainer(tmp_path, 3, [cb]).fit(module, loader(StrengthProbe(t)))
        assert seen_per_epoch(module) == {0: 0.0, 1: 0.5, 2: 1.0}
        assert len(module.pids) == 2 and torch.multiprocessing.current_process().pid not in module.pids

    def test_spawned_workers_see_the_schedule(self, tmp_path):
        t = transform()
        cb = FlowAnnealing(t, "linear", start_value=1.0, end_value=0.0, log=False)  # away from the reference
        module = Recorder()
        trainer(tmp_path, 3, [cb]).fit(module, loader(StrengthProbe(t), context="spawn"))
        assert seen_per_epoch(module) == {0: 1.0, 1: 0.5, 2: 0.0}

    def test_resume_continues_the_schedule_exactly(self, tmp_path):
        def run(root, stop=None, resume=None):
            t = transform()
            cbs = [FlowAnnealing(t, "cosine", log=False), ModelCheckpoint(dirpath=root, save_last=True)]
            if stop is not None:
                cbs.append(StopAfter(stop))
            module = Recorder()
            trainer(root, 4, cbs).fit(module, loader(StrengthProbe(t)), ckpt_path=resume)
            return seen_per_epoch(module)

        full = run(tmp_path / "full")
        first = run(tmp_path / "cut", stop=1)
        second = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "last.ckpt"))
        expected = {e: 0.5 * (1 - math.cos(math.pi * e / 3)) for e in range(4)}
        assert full == pytest.approx(expected)
        assert set(first) == {0, 1} and set(second) == {2, 3}
        assert {**first, **second} == full

    def test_step_interval_on_device(self, tmp_path):
        t = transform()
        cb = FlowAnnealing(t, "linear", interval="step", apply_to_batches=True, log=False)
        x, y = tiny_images(16)
        module = Recorder(dim=36)
        trainer(tmp_path, 2, [cb]).fit(module, loader(TensorPairs(x, y), workers=0))
        assert cb.current == pytest.approx(1.0)
        first, last = module.batches[0][0], module.batches[1][-1]
        assert torch.equal(first, x[:4])  # step 0: strength 0, the batch is untouched
        assert not torch.equal(last, x[12:16])  # last step: flowed in place on the device

    def test_flow_in_collate_fn_follows_the_schedule(self, tmp_path):
        t = transform(label_weight=0)
        cb = FlowAnnealing(t, "linear", log=False)
        x, y = tiny_images(16)
        module = Recorder(dim=36)
        trainer(tmp_path, 2, [cb]).fit(module, loader(TensorPairs(x, y), collate_fn=FlowCollate(t)))
        assert all(torch.equal(b, x[4 * i : 4 * i + 4]) for i, b in enumerate(module.batches[0]))
        assert not any(torch.equal(b, x[4 * i : 4 * i + 4]) for i, b in enumerate(module.batches[1]))


class TestExactResume:
    def test_resumed_run_flows_the_same_batches(self, tmp_path):
        """Randomised flows (p < 1, reference samples) in persistent workers: epochs 2-3 of a run resumed
        after epoch 1 see exactly the batches of an uninterrupted run."""
        x, y = tiny_images(32)

        def run(root, stop=None, resume=None):
            t = transform(p=0.6, reference_size=12).fit((x, y))  # online statistics would depend on history
            cbs = [FlowAnnealing(t, "linear", log=False), ModelCheckpoint(dirpath=root, save_last=True)]
            if stop is not None:
                cbs.append(StopAfter(stop))
            module = Recorder(dim=36)
            trainer(root, 4, cbs).fit(module, loader(TensorPairs(x, y), collate_fn=FlowCollate(t)), ckpt_path=resume)
            return module.batches

        full = run(tmp_path / "full")
        first = run(tmp_path / "cut", stop=1)
        second = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "last.ckpt"))
        assert set(first) == {0, 1} and set(second) == {2, 3}
        for epoch, batches in {**first, **second}.items():
            assert len(batches) == len(full[epoch]) == 8
            assert all(torch.equal(a, b) for a, b in zip(batches, full[epoch])), epoch
        changed = [not torch.equal(b, x[4 * i : 4 * i + 4]) for i, b in enumerate(full[3])]
        assert 0 < sum(changed) < 8  # p = 0.6: some batches flowed, some not
