"""The flow engine: analytic cases, objective decrease, labels, contracts on inputs and outputs."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from geomloss import SamplesLoss

import flowaug
from flowaug import MMD, Custom, Interaction, Potential, Sinkhorn, SlicedWasserstein

from .conftest import autograd_value_and_gradient, blobs, ours_value_and_gradient, tiny_images


def quadratic_pull(z):
    """Potential pulling every point toward 2 (a named function: picklable)."""
    return 0.5 * (z - 2.0).square().sum(1)


def soft_repulsion(a, b):
    return torch.exp(-(a - b).square().sum(-1))


class TestFlowResult:
    def test_pickle_round_trip(self):
        x, y = blobs(20, [[0.0, 0.0], [3.0, 0.0]])
        ref = blobs(20, [[0.0, 2.0], [3.0, 2.0]], seed=1)
        out = flowaug.flow(x, y, ref, steps=2, snapshots=[0, 2])
        back = pickle.loads(pickle.dumps(out))
        assert torch.equal(back.x, out.x) and torch.equal(back.objective, out.objective)
        assert len(back.trajectory) == 2


class TestFlowAnalytic:
    def test_gaussian_to_shifted_gaussian(self):
        """N(0, I) flowed toward N(m, I): mean within 5% of |m| of m, divergence down >= 90%."""
        g = torch.Generator().manual_seed(0)
        d, m = 5, torch.tensor([3.0, -2.0, 1.0, 0.0, 2.0])
        x = torch.randn(400, d, generator=g)
        ref = torch.randn(600, d, generator=g) + m
        out = flowaug.flow(x, reference=ref, steps=10, objective=Sinkhorn(blur=0.5))
        assert (out.x.mean(0) - m).norm() <= 0.05 * m.norm()
        loss = SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.9, debias=True)
        before, after = float(loss(x, ref)), float(loss(out.x, ref))
        assert after <= 0.1 * before, (before, after)

    def test_gaussian_covariance_is_matched(self):
        """Toward N(0, diag(4, 1/4)) the flowed standard deviations approach (2, 1/2)."""
        g = torch.Generator().manual_seed(1)
        x = torch.randn(500, 2, generator=g)
        ref = torch.randn(800, 2, generator=g) * torch.tensor([2.0, 0.5])
        out = flowaug.flow(x, reference=ref, steps=15, objective=Sinkhorn(blur=0.2))
        assert torch.allclose(out.x.std(0), torch.tensor([2.0, 0.5]), rtol=0.1)


OBJECTIVES = [
    pytest.param(lambda: Sinkhorn(blur=0.5), 0.2, id="sinkhorn"),
    pytest.param(lambda: Sinkhorn(blur=0.5, debias=False), 0.2, id="sinkhorn-biased"),
    pytest.param(lambda: MMD("gaussian"), 0.5, id="mmd-gaussian"),
    pytest.param(lambda: MMD("laplacian"), 0.5, id="mmd-laplacian"),
    pytest.param(lambda: MMD("energy"), 0.2, id="mmd-energy"),
    pytest.param(lambda: Potential(quadratic_pull), 0.1, id="potential"),
    pytest.param(lambda: Interaction(soft_repulsion), 0.1, id="interaction"),
    pytest.param(lambda: Custom(lambda x, y: x.square().sum() / x.shape[0]), 0.1, id="custom"),
    pytest.param(lambda: Sinkhorn(blur=0.5) + 0.5 * MMD("energy"), 0.2, id="sum"),
]


class TestObjectiveDecrease:
    @pytest.mark.parametrize("make, tau", OBJECTIVES)
    def test_monotone_for_small_steps(self, make, tau):
        x, _ = blobs(40, [[0.0, 0.0], [1.0, 1.0]], std=0.5, seed=3)
        ref, _ = blobs(50, [[2.0, 0.0], [3.0, 1.0]], std=0.5, seed=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no step-size halving allowed here
            out = flowaug.flow(x, reference=ref, objective=make(), steps=8, step_size=tau)
        values = out.objective
        assert torch.all(values[1:] <= values[:-1] + 1e-6), values
        assert values[-1] < values[0]

    def test_sliced_decreases_the_true_sliced_distance(self):
        """Sliced steps use random directions; the distance on a fixed large set of directions drops."""
        x, _ = blobs(60, [[0.0, 0.0]], std=0.5, seed=5)
        ref, _ = blobs(60, [[2.0, 1.0]], std=0.5, seed=6)
        theta = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
        theta = theta / theta.norm(dim=1, keepdim=True)

        def sw(a):
            return ((a @ theta.T).sort(0).values - (ref @ theta.T).sort(0).values).square().mean()

        prev = sw(x)
        gen = torch.Generator().manual_seed(0)
        z = x
        for _ in range(5):
            z = flowaug.flow(z, reference=ref, objective=SlicedWasserstein(64), steps=1, step_size=0.5, generator=gen).x
            cur = sw(z)
            assert cur < prev
            prev = cur
        assert prev < 0.1 * sw(x)


class TestAgainstGeomloss:
    """Closed-form Wasserstein gradients equal N times geomloss's autograd gradients."""

    def setup_method(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(48, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(64, 4, generator=g, dtype=torch.float64) + 1

    def _ours(self, objective):
        return ours_value_and_gradient(objective, self.x, self.y)

    def _geomloss(self, loss):
        return autograd_value_and_gradient(loss, self.x, self.y)

    def test_sinkhorn(self):
        ours_v, ours_g = self._ours(Sinkhorn(blur=1.0, tol=1e-9, max_iter=50000))
        ref_v, ref_g = self._geomloss(SamplesLoss("sinkhorn", p=2, blur=1.0, scaling=0.9999, debias=True))
        assert ours_v == pytest.approx(ref_v, rel=1e-6)
        assert torch.allclose(ours_g, ref_g, rtol=1e-3, atol=1e-4)

    @pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
    def test_mmd(self, kernel):
        ours_v, ours_g = self._ours(MMD(kernel, bandwidth=1.5, normalize=False))
        ref_v, ref_g = self._geomloss(SamplesLoss(kernel, blur=1.5))
        assert ours_v == pytest.approx(ref_v, rel=1e-4)
        assert torch.allclose(ours_g, ref_g, rtol=1e-6, atol=1e-9)

    def test_energy_matches_autograd_off_the_diagonal(self):
        """geomloss's energy gradient is NaN (sqrt at 0 on the diagonal); compare with a safe autograd."""
        ours_v, ours_g = self._ours(MMD("energy", normalize=False))
        x = self.x.clone().requires_grad_(True)

        def mean_dist(a, b, same):
            d2 = (a[:, None] - b[None]).square().sum(-1)
            if same:
                d2 = d2 + torch.eye(len(a), dtype=d2.dtype)  # keep sqrt differentiable; diagonal removed below
                return (d2.sqrt() * (1 - torch.eye(len(a), dtype=d2.dtype))).mean()
            return d2.sqrt().mean()

        value = -0.5 * mean_dist(x, x, True) + mean_dist(x, self.y, False) - 0.5 * mean_dist(self.y, self.y, True)
        (grad,) = torch.autograd.grad(value, x)
        assert ours_v == pytest.approx(float(value), rel=1e-8)
        assert torch.allclose(ours_g, grad * len(x), rtol=1e-8, atol=1e-10)


class TestComposition:
    def test_weighted_sum_has_gradient_of_the_sum(self):
        from flowaug.objectives import Context

        g = torch.Generator().manual_seed(2)
        z, y = torch.randn(30, 3, generator=g), torch.randn(40, 3, generator=g)
        ctx = Context(z_ref=y, ref_half=(y**2).sum(1) / 2, backend="tensorized", feature_dim=3)
        a, b = Sinkhorn(blur=0.7), MMD("gaussian", bandwidth=1.0)
        va, ga = a.evaluate(z, ctx)[:2]
        vb, gb = b.evaluate(z, ctx)[:2]
        vs, gs = (a + 0.1 * b).evaluate(z, ctx)[:2]
        assert torch.allclose(gs, ga + 0.1 * gb, atol=1e-5)
        assert float(vs) == pytest.approx(float(va) + 0.1 * float(vb), rel=1e-5)

    def test_repr_lists_terms_and_weights(self):
        text = repr(Sinkhorn(blur=0.5) + 0.1 * MMD("energy"))
        assert "Sinkhorn(blur=0.5" in text and "0.1 * MMD(kernel='energy'" in text


class TestLabels:
    def crossed(self, n=150):
        """Source class 0 sits where reference class 1 is, and vice versa (separated in features)."""
        x, y = blobs(n, [[0.0, 0.0], [6.0, 0.0]], std=0.4, seed=7)
        ref_x, ref_y = blobs(n, [[6.0, 1.0], [0.0, 1.0]], std=0.4, seed=8)
        return x, y, ref_x, ref_y

    def test_flow_mode_decodes_to_the_class_it_moved_to(self):
        x, y, rx, ry = self.crossed()
        out = flowaug.flow(x, y, (rx, ry), labels="flow", steps=10)
        # where did each point go? the reference class occupying that region
        region_class = torch.where(out.x[:, 0] < 3, torch.tensor(1), torch.tensor(0))
        assert (out.labels == region_class).float().mean() >= 0.95
        assert (out.labels == 1 - y).float().mean() >= 0.95
        assert torch.allclose(out.soft_labels.sum(1), torch.ones(len(x)), atol=1e-5)
        assert torch.equal(out.soft_labels.argmax(1), out.labels)

    def test_class_decoding_assigns_whole_classes(self):
        x, y, rx, ry = self.crossed()
        out = flowaug.flow(x, y, (rx, ry), labels="flow", decode="class", steps=10)
        assert out.class_map.tolist() == [1, 0]
        assert torch.equal(out.labels, 1 - y)

    def test_fixed_mode_returns_labels_unchanged(self):
        x, y, rx, ry = self.crossed()
        y_before = y.clone()
        out = flowaug.flow(x, y, (rx, ry), labels="fixed", steps=5)
        assert torch.equal(out.labels, y_before) and out.soft_labels is None

    def test_label_aware_flow_keeps_classes_apart(self):
        """With labels fixed, class 0 is transported to the reference class most like it (OTDD cost)."""
        x, y = blobs(100, [[0.0, 0.0], [0.0, 4.0]], std=0.3, seed=9)
        rx, ry = blobs(100, [[5.0, 0.0], [5.0, 4.0]], std=0.3, seed=10)
        out = flowaug.flow(x, y, (rx, ry), steps=10, label_weight=1.0)
        assert torch.allclose(out.x[y == 0].mean(0), torch.tensor([5.0, 0.0]), atol=0.2)
        assert torch.allclose(out.x[y == 1].mean(0), torch.tensor([5.0, 4.0]), atol=0.2)

    def test_soft_input_labels(self):
        x, y, rx, ry = self.crossed(60)
        soft = torch.nn.functional.one_hot(y, 2).float()
        hard_out = flowaug.flow(x, y, (rx, ry), labels="flow", steps=5)
        soft_out = flowaug.flow(x, soft, (rx, ry), labels="flow", steps=5)
        assert torch.allclose(hard_out.x, soft_out.x, atol=1e-5)


class TestContracts:
    def test_inputs_unchanged_and_dtype_device_preserved(self):
        x, y = tiny_images(24)
        rx, ry = tiny_images(30, seed=1)
        copies = [t.clone() for t in (x, y, rx, ry)]
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            out = flowaug.flow(x.to(dtype), y, (rx, ry), steps=2, labels="flow")
            assert out.x.dtype == dtype and out.x.device == x.device and out.x.shape == x.shape
        for before, after in zip(copies, (x, y, rx, ry)):
            assert torch.equal(before, after)

    def test_channels_last_and_non_contiguous(self):
        x, y = tiny_images(16)
        rx, ry = tiny_images(20, seed=1)
        cl = x.contiguous(memory_format=torch.channels_last)
        out = flowaug.flow(cl, y, (rx, ry), steps=2)
        assert out.x.is_contiguous(memory_format=torch.channels_last)
        base = flowaug.flow(x, y, (rx, ry), steps=2)
        assert torch.allclose(out.x, base.x, atol=1e-6)
        strided = torch.cat([x, x], 3)[..., ::2]  # a non-contiguous view
        assert not strided.is_contiguous()
        out = flowaug.flow(strided, y, (rx, ry), steps=1)
        assert out.x.shape == strided.shape

    def test_works_under_no_grad_and_inference_mode(self):
        x, y = tiny_images(16)
        rx, ry = tiny_images(20, seed=1)
        base = flowaug.flow(x, y, (rx, ry), steps=2).x
        with torch.no_grad():
            assert torch.equal(flowaug.flow(x, y, (rx, ry), steps=2).x, base)
        with torch.inference_mode():
            assert torch.equal(flowaug.flow(x, y, (rx, ry), steps=2).x, base)

    def test_never_runs_under_autocast(self):
        x, y = tiny_images(16)
        rx, ry = tiny_images(20, seed=1)
        base = flowaug.flow(x, y, (rx, ry), steps=2).x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(flowaug.flow(x, y, (rx, ry), steps=2).x, base)

    def test_float64_computation(self):
        x, y = blobs(30, [[0.0, 0.0]], seed=1)
        ref, _ = blobs(30, [[1.0, 1.0]], seed=2)
        out32 = flowaug.flow(x, reference=ref, steps=3)
        out64 = flowaug.flow(x, reference=ref, steps=3, dtype=torch.float64)
        assert out64.x.dtype == torch.float32
        assert torch.allclose(out32.x, out64.x, atol=1e-3)


class TestOptions:
    def test_clamp_keeps_pixels_in_range(self):
        x, y = tiny_images(20)
        rx, ry = tiny_images(20, seed=1)
        out = flowaug.flow(x, y, (rx * 1.5, ry), steps=3, clamp=(0.0, 1.0), step_size=2.0)
        assert float(out.x.min()) >= 0.0 and float(out.x.max()) <= 1.0

    def test_snapshots_and_times(self):
        x, _ = blobs(30, [[0.0, 0.0]])
        ref, _ = blobs(30, [[2.0, 0.0]], seed=1)
        out = flowaug.flow(x, reference=ref, steps=4, step_size=0.5, snapshots=3)
        assert out.trajectory_times == [0.0, 1.0, 2.0]
        assert torch.equal(out.trajectory[0], x) and torch.equal(out.trajectory[-1], out.x)
        assert out.times.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]

    def test_momentum_reaches_the_target(self):
        x, _ = blobs(50, [[0.0, 0.0]], seed=1)
        ref, _ = blobs(50, [[3.0, 0.0]], seed=2)
        out = flowaug.flow(x, reference=ref, steps=20, step_size=0.2, momentum=0.5)
        assert (out.x.mean(0) - torch.tensor([3.0, 0.0])).norm() < 0.15

    def test_entropy_adds_noise_of_the_right_size(self):
        x = torch.zeros(4000, 2)
        out = flowaug.flow(x, objective=flowaug.Entropy(0.5), steps=1, step_size=0.5,
                           generator=torch.Generator().manual_seed(0))
        # one step of Langevin: variance 2 * tau * T = 0.5
        assert torch.allclose(out.x.var(0), torch.full((2,), 0.5), rtol=0.1)

    def test_warm_state_reused_across_calls(self):
        x, _ = blobs(40, [[0.0, 0.0]], seed=1)
        ref, _ = blobs(60, [[2.0, 0.0]], seed=2)
        first = flowaug.flow(x, reference=ref, steps=3)
        again = flowaug.flow(first.x, reference=ref, steps=1, warm=first.warm)
        cold = flowaug.flow(first.x, reference=ref, steps=1)
        assert torch.allclose(again.x, cold.x, atol=1e-3)  # both within the solver tolerance
        assert again.iterations[0][0] <= cold.iterations[0][0]


class TestClasswise:
    def setup_method(self):
        # source class k at (3k, 0); reference class k at (3k, 5): same label sets, shifted domain
        self.x, self.y = blobs(60, [[0.0, 0.0], [3.0, 0.0], [6.0, 0.0]], std=0.3, seed=11)
        self.rx, self.ry = blobs(50, [[0.0, 5.0], [3.0, 5.0], [6.0, 5.0]], std=0.3, seed=12)

    def test_same_moves_each_class_onto_its_reference_class(self):
        out = flowaug.flow(self.x, self.y, (self.rx, self.ry), class_map="same", steps=10)
        for k in range(3):
            assert torch.allclose(out.x[self.y == k].mean(0), self.rx[self.ry == k].mean(0), atol=0.1)
        assert torch.equal(out.labels, self.y)
        assert torch.all(out.objective[1:] <= out.objective[:-1] + 1e-6)

    def test_explicit_map_and_flowed_labels(self):
        perm = torch.tensor([2, 0, 1])
        out = flowaug.flow(self.x, self.y, (self.rx, self.ry), class_map=perm, labels="flow", steps=10)
        assert torch.equal(out.labels, perm[self.y])
        for k in range(3):
            assert torch.allclose(out.x[self.y == k].mean(0), self.rx[self.ry == perm[k]].mean(0), atol=0.1)

    def test_ot_pairing_recovers_the_correspondence(self):
        out = flowaug.flow(self.x, self.y, (self.rx, self.ry), class_map="ot", steps=3)
        assert out.class_map.tolist() == [0, 1, 2]

    def test_missing_reference_class_is_named(self):
        with pytest.raises(ValueError, match="class 3"):
            flowaug.flow(self.x, self.y, (self.rx, self.ry), class_map=torch.tensor([0, 1, 3]), steps=1)

    @pytest.mark.parametrize("objective", [Sinkhorn(blur=0.5, tol=1e-4), MMD("gaussian", bandwidth=2.0),
                                           MMD("energy", normalize=False)], ids=["sinkhorn", "mmd", "energy"])
    def test_classwise_flow_equals_independent_class_flows(self, objective):
        """A class-wise flow moves each class exactly as a flow of that class alone toward its reference class
        would (same velocities), and reports the class-size-weighted objective. (Fixed scales: "auto" scales
        come from the whole reference in a class-wise flow, from the class alone in a flow of one class.)"""
        x, y = self.x[::2], self.y[::2]  # unequal class proportions between batch and reference
        x, y = torch.cat([x, x[y == 0][:7] + 0.1]), torch.cat([y, y[y == 0][:7]])
        kwargs = dict(steps=4, step_size=0.5, objective=objective)
        joint = flowaug.flow(x, y, (self.rx, self.ry), class_map="same", **kwargs)
        total = torch.zeros_like(joint.objective)
        for k in range(3):
            alone = flowaug.flow(x[y == k], reference=self.rx[self.ry == k], **kwargs)
            assert torch.allclose(joint.x[y == k], alone.x, atol=1e-4)
            total += (y == k).float().mean() * alone.objective
        assert torch.allclose(joint.objective, total, rtol=1e-3, atol=1e-6)

    def test_guard_halvings_are_reported_in_the_times(self):
        """Bug: class-wise flows whose step the guard halved reported the un-halved times."""
        with pytest.warns(RuntimeWarning, match="halving"):
            out = flowaug.flow(self.x, self.y, (self.rx, self.ry), class_map="same", objective="energy",
                               steps=4, step_size=40.0)
        assert out.step_size < 40.0
        steps_taken = out.times.diff()
        assert torch.allclose(steps_taken[-1], torch.tensor(out.step_size, dtype=torch.float64))
        assert float(out.times[-1]) < 4 * 40.0
