"""flowaug.gradual: generated domains along flows, self-training, the gradual-adaptation recipe."""

import copy
import math
import pickle
from itertools import pairwise

import pytest
import torch
from torch import nn

from flowaug.gradual import adapt, domain_times, flow_domains, pseudo_labels, self_train


def blobs(angle_deg: float, n: int = 200, seed: int = 0, radius: float = 3.0):
    """Two Gaussian classes at +-radius along the direction ``angle_deg``: a shift that rotates the classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    a = math.radians(angle_deg)
    centre = torch.tensor([math.cos(a), math.sin(a)]) * radius
    x = torch.randn(n, 2, generator=g) * 0.5 + torch.where(y[:, None] == 0, centre, -centre)
    return x, y


def linear_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Identity(), nn.Linear(2, 2))


def acc(model, x, y) -> float:
    return float((pseudo_labels(model, x, confidence=0.0)[0] == y).float().mean())


def params(model):
    return [p.detach().clone() for p in model.parameters()]


class TestDomainTimes:
    def test_linear_and_schedules(self):
        assert domain_times(1) == [0.5]
        cos = domain_times(4, "cos")
        assert all(0 < a < b < 1 for a, b in pairwise(cos))
        with pytest.raises(ValueError, match="n_domains"):
            domain_times(0)


class TestFlowDomains:
    def test_path_walks_from_source_to_target(self):
        a, _ = blobs(0.0, seed=1)
        b = a + torch.tensor([10.0, -4.0])
        path = flow_domains(a, b, 3, steps=3)
        assert len(path) == 3 and all(d.shape == a.shape for d in path)
        shift = torch.tensor([10.0, -4.0])
        for t, d in zip((0.25, 0.5, 0.75), path):  # a translation: the domain at time t is translated by t * shift
            assert torch.allclose(d.mean(0) - a.mean(0), t * shift, atol=0.3)

    def test_classwise_keeps_classes_together_where_plain_ot_swaps_them(self):
        x_a, y_a = blobs(0.0, seed=2)
        x_b, y_b = blobs(180.0, seed=3)  # each class now sits where the other class was
        end_cw = flow_domains(x_a, x_b, 1, y_from=y_a, y_to=y_b, steps=5, schedule=lambda p: 2 * p)[0]
        end_plain = flow_domains(x_a, x_b, 1, steps=5, schedule=lambda p: 2 * p)[0]  # t = 1: the end points
        nearest = lambda e: y_b[torch.cdist(e, x_b).argmin(1)]
        assert (nearest(end_cw) == y_a).float().mean() > 0.95
        assert (nearest(end_plain) == y_a).float().mean() < 0.05

    def test_a_class_the_target_labels_lack_flows_toward_all_of_it_with_a_warning(self):
        x_a, y_a = blobs(0.0, seed=5)
        x_b = torch.randn(50, 2, generator=torch.Generator().manual_seed(6)) + torch.tensor([0.0, 8.0])
        y_b = torch.zeros(50, dtype=torch.long)  # the model calls every target sample class 0
        with pytest.warns(RuntimeWarning, match=r"no samples of class\(es\) \[1\]"):
            end = flow_domains(x_a, x_b, 1, y_from=y_a, y_to=y_b, steps=5, schedule=lambda p: 2 * p)[0]
        assert torch.isfinite(end).all()
        assert end[y_a == 1, 1].mean() > 7 and (end[y_a == 1, 1] > 3).all()  # class 1 went to the target too

    def test_inputs_not_mutated_and_sizes_may_differ(self):
        x_a, y_a = blobs(0.0, n=120)
        x_b, y_b = blobs(40.0, n=90, seed=4)
        before = [t.clone() for t in (x_a, y_a, x_b, y_b)]
        path = flow_domains(x_a, x_b, 2, y_from=y_a, y_to=y_b)
        assert [d.shape for d in path] == [x_a.shape] * 2
        assert all(torch.equal(u, v) for u, v in zip(before, (x_a, y_a, x_b, y_b)))

    def test_bad_input(self):
        x, y = blobs(0.0)
        with pytest.raises(ValueError, match="y_from and y_to"):
            flow_domains(x, x, 2, y_from=y)
        with pytest.raises(ValueError, match=r"y_to must have shape \(200,\)"):
            flow_domains(x, x, 2, y_from=y, y_to=y[:-1])
        with pytest.raises(ValueError, match="same sample shape"):
            flow_domains(x, torch.rand(10, 3), 2)
        with pytest.raises(ValueError, match="x_to must be a float tensor"):
            flow_domains(x, torch.arange(10), 2)
        with pytest.raises(TypeError, match="unknown option"):
            flow_domains(x, x, 2, stepz=3)


class TestPseudoLabels:
    def test_filter_and_mode(self):
        x, y = blobs(0.0)
        model = self_train(linear_model(), x, y, epochs=20, generator=torch.Generator().manual_seed(0))
        model.train()
        labels, keep = pseudo_labels(model, x, confidence=0.1)
        assert model.training  # restored
        assert (labels == y).float().mean() > 0.95
        assert int(keep.sum()) == len(x) - len(x) // 10

    def test_non_finite_outputs_raise(self):
        model = linear_model()
        with pytest.raises(FloatingPointError, match="not finite"):
            pseudo_labels(model, torch.full((4, 2), float("nan")))


class TestSelfTrain:
    def test_pickle_round_trip_of_the_result(self):
        x, y = blobs(0.0)
        model = self_train(linear_model(), x, y, epochs=2, generator=torch.Generator().manual_seed(0))
        clone = pickle.loads(pickle.dumps(model))
        assert torch.equal(clone(x), model(x))

    def test_learns_carried_labels_and_leaves_teacher_unchanged(self):
        x, y = blobs(0.0)
        teacher = linear_model()
        before = params(teacher)
        student = self_train(teacher, x, y, epochs=20, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(before, params(teacher)))
        assert acc(student, x, y) > 0.95

    def test_seeded_runs_repeat(self):
        x, _ = blobs(20.0)
        teacher = self_train(linear_model(), *blobs(0.0), epochs=5, generator=torch.Generator().manual_seed(0))
        a = self_train(teacher, x, epochs=3, generator=torch.Generator().manual_seed(7))
        b = self_train(teacher, x, epochs=3, generator=torch.Generator().manual_seed(7))
        assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))

    def test_dropout_comes_from_the_generator_and_the_global_stream_is_untouched(self):
        x, y = blobs(0.0)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 2))
        state = torch.random.get_rng_state()
        a = self_train(model, x, y, epochs=2, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(123)  # another global state: the same result
        b = self_train(model, x, y, epochs=2, generator=torch.Generator().manual_seed(3))
        assert all(torch.equal(p, q) for p, q in zip(params(a), params(b)))
        torch.set_rng_state(state)
        self_train(model, x, y, epochs=1, generator=torch.Generator().manual_seed(3))
        assert torch.equal(torch.random.get_rng_state(), state)

    def test_bad_labels(self):
        x, y = blobs(0.0)
        with pytest.raises(ValueError, match=r"labels must have shape \(200,\)"):
            self_train(linear_model(), x, y[:-1])
        with pytest.raises(TypeError, match="labels with shape .* must hold integer class ids"):
            self_train(linear_model(), x, y.float())
        with pytest.raises(ValueError, match="batch_size"):
            self_train(linear_model(), x, y, batch_size=1)
        with pytest.raises(ValueError, match=r"labels go up to 5 but the model outputs 2 classes \(0..1\)"):
            self_train(linear_model(), x, torch.where(y == 1, 5, 0))
        with pytest.raises(ValueError, match=r"\(N, K\) class logits with K >= 2"):
            self_train(nn.Sequential(nn.Identity(), nn.Linear(2, 1)), x, y)
        with pytest.raises(ValueError, match="x must be a non-empty"):
            pseudo_labels(linear_model(), x[:0])


class TestAdapt:
    @pytest.mark.parametrize("train_encoder", [True, False])
    def test_gradual_shift_is_followed_where_the_source_model_fails(self, train_encoder):
        source = blobs(0.0, seed=10)
        domains = [blobs(a, seed=11 + i)[0] for i, a in enumerate((45, 90, 135, 180))]
        target_test = blobs(180.0, seed=99)  # the classes have swapped places
        model = self_train(linear_model(), *source, epochs=20, lr=0.05, generator=torch.Generator().manual_seed(0))
        assert acc(model, *target_test) < 0.05
        seen = []
        adapted = adapt(model[0], model[1], source, domains, generated=2, epochs=5, lr=0.05,
                        train_encoder=train_encoder, generator=torch.Generator().manual_seed(0),
                        on_path=lambda *a: seen.append(a))
        assert acc(adapted, *target_test) > 0.95 and not adapted.training
        assert [s[0] for s in seen] == [0, 1, 2, 3] and all(len(s[4].domains) == 2 for s in seen)

    def test_arguments_not_changed(self):
        source = blobs(0.0)
        model = self_train(linear_model(), *source, epochs=5, generator=torch.Generator().manual_seed(0))
        snapshot = copy.deepcopy(model.state_dict())
        adapt(model[0], model[1], source, [blobs(20.0)[0]], generated=1, epochs=1)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())

    def test_bad_input(self):
        model = linear_model()
        with pytest.raises(ValueError, match="domains must be a non-empty list"):
            adapt(model[0], model[1], blobs(0.0), [])
        with pytest.raises(ValueError, match="domains must be a non-empty list"):
            adapt(model[0], model[1], blobs(0.0), torch.stack([blobs(10.0)[0], blobs(20.0)[0]]))

    def test_refusals_name_the_input(self):
        source = blobs(0.0)
        model = self_train(linear_model(), *source, epochs=5, generator=torch.Generator().manual_seed(0))
        enc, head = model[0], model[1]
        x = blobs(20.0)[0]
        with pytest.raises(ValueError, match=r"domains\[1\] must be a float tensor .* N >= 2"):
            adapt(enc, head, source, [x, x[:1]], generated=1, epochs=1)
        with pytest.raises(ValueError, match=r"domains\[0\] must be a float tensor"):
            adapt(enc, head, source, [x[:0]], generated=1, epochs=1)
        with pytest.raises(TypeError, match=r"domains\[0\] has dtype torch.float16"):
            adapt(enc, head, source, [x.half()], generated=1, epochs=1)
        bad = x.clone()
        bad[3, 1] = float("nan")
        with pytest.raises(ValueError, match=r"domains\[0\]"):
            adapt(enc, head, source, [bad], generated=1, epochs=1)
        with pytest.raises(ValueError, match="source labels go up to 2 but the head outputs 2 classes"):
            adapt(enc, head, (source[0], torch.where(source[1] == 1, 2, 0)), [x], generated=1, epochs=1)
        with pytest.raises(TypeError, match="source must be an \\(x, y\\) pair"):
            adapt(enc, head, source[0], [x], generated=1, epochs=1)

    @pytest.mark.parametrize("out", [1, 0])
    def test_one_logit_and_flat_heads_are_refused(self, out):
        head = nn.Sequential(nn.Linear(2, 1), nn.Flatten(0)) if out == 0 else nn.Linear(2, 1)
        with pytest.raises(ValueError, match=r"\(N, K\) class logits with K >= 2.*nn.Linear\(d, 2\)"):
            adapt(nn.Identity(), head, blobs(0.0), [blobs(20.0)[0]], generated=1, epochs=1)

    def test_an_untrained_source_model_is_said(self):
        from flowaug._checks import FlowWarning

        model = linear_model()
        nn.init.zeros_(model[1].weight), nn.init.zeros_(model[1].bias)  # as if never trained: always class 0
        with pytest.warns(FlowWarning, match=r"scores 50.0 % on its own source data .* train it on the source first"):
            adapt(model[0], model[1], blobs(0.0), [blobs(20.0)[0]], generated=0, epochs=1)

    def test_a_tensor_dataset_source_is_the_same_as_the_pair(self):
        source = blobs(0.0)
        model = self_train(linear_model(), *source, epochs=5, generator=torch.Generator().manual_seed(0))
        runs = [adapt(model[0], model[1], src, [blobs(30.0)[0]], generated=1, epochs=1,
                      generator=torch.Generator().manual_seed(1))
                for src in (source, torch.utils.data.TensorDataset(*source))]
        assert all(torch.equal(a, b) for a, b in zip(params(runs[0]), params(runs[1])))


class TestWalk:
    @pytest.mark.parametrize("train_encoder", [True, False])
    def test_a_walk_resumed_from_any_stage_ends_exactly_as_the_whole_walk(self, train_encoder):
        from flowaug.gradual import WalkOptions, walk

        source = blobs(0.0, n=60)
        domains = [blobs(a, n=60, seed=5 + a)[0] for a in (30, 60)]
        model = nn.Sequential(nn.Linear(2, 4), nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(4, 2)))
        model = self_train(model, *source, epochs=10, lr=0.05, generator=torch.Generator().manual_seed(0))
        opts = WalkOptions(generated=2, epochs=2, lr=0.05, batch_size=16, train_encoder=train_encoder)
        states = []
        whole = walk(model[0], model[1], source, domains, opts, generator=torch.Generator().manual_seed(7),
                     on_stage=states.append)
        assert len(states) == 2 * 3 and [(s["gap"], s["stage"]) for s in states[:3]] == [(0, 1), (0, 2), (1, 0)]
        for state in (states[0], states[2], states[4]):
            g = torch.Generator()
            resumed = walk(model[0], model[1], source, domains, opts, generator=g, state=state)
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params(whole), params(resumed)))

    def test_the_three_paths_share_the_walk(self):
        from flowaug.paths import PlanPath, entropic_path

        source = blobs(0.0)
        model = self_train(linear_model(), *source, epochs=10, lr=0.05, generator=torch.Generator().manual_seed(0))
        seen = {}
        for name, path in (("plan", PlanPath()), ("entropic", entropic_path())):
            adapt(model[0], model[1], source, [blobs(40.0)[0]], generated=2, epochs=1, path=path,
                  on_path=lambda gap, enc, fa, fb, p, name=name: seen.setdefault(name, p))
        assert len(seen["plan"].rows) >= 200 and torch.equal(seen["entropic"].rows, torch.arange(200))
        with pytest.raises(ValueError, match="flow_options or path, not both"):
            adapt(model[0], model[1], source, [blobs(40.0)[0]], path=PlanPath(), flow_options={"steps": 2})
