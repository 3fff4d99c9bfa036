"""Label-conditional potentials (LabelPotential, ClassifierPotential): gradients against autograd, in flows,
class-wise flows and the adapters; the classifier is never trained or switched out of its mode."""

import copy

import pytest
import torch
from torch import nn

import flowaug
from flowaug import ClassifierPotential, LabelPotential, Sinkhorn
from flowaug.objectives import Context


def context(x, y, shape=None):
    z_ref = torch.randn(8, x.shape[1], generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    return Context(z_ref=z_ref, ref_half=(z_ref**2).sum(1) / 2, backend="tensorized", feature_dim=x.shape[1],
                   feature_shape=shape or (x.shape[1],), labels=y)


def classifier(d=3, k=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, k))


class TestGradient:
    def test_label_potential_is_n_times_the_autograd_gradient_of_the_mean(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(10, 3, generator=g, dtype=torch.float64), torch.arange(10) % 3
        centres = torch.randn(3, 3, generator=g, dtype=torch.float64)
        fn = lambda x, y: (x - centres[y]).pow(4).sum(1)
        ev = LabelPotential(fn).evaluate(x, context(x, y))
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(xx, y).mean(), xx)
        assert torch.allclose(ev.grad, 10 * grad) and torch.isclose(ev.value, fn(x, y).mean())

    @pytest.mark.parametrize("soft", [False, True])
    def test_classifier_potential_is_the_per_particle_cross_entropy(self, soft):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(12, 3, generator=g)
        y = torch.softmax(torch.randn(12, 4, generator=g), 1) if soft else torch.arange(12) % 4
        model = classifier()
        model.train()
        before = copy.deepcopy(model.state_dict())
        ev = ClassifierPotential(model).evaluate(x, context(x, y))
        reference = copy.deepcopy(model).eval()
        xx = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(reference(xx), y), xx)
        assert torch.allclose(ev.grad, 12 * grad, atol=1e-6)
        assert model.training  # its mode is restored; batch norm statistics untouched; no .grad written
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert all(p.grad is None for p in model.parameters())

    def test_label_coordinates_get_no_gradient(self):
        x = torch.randn(6, 5)
        ctx = context(x, torch.arange(6) % 2)
        ctx.feature_dim, ctx.feature_shape = 3, (3,)  # the last 2 coordinates are a label embedding
        ev = LabelPotential(lambda f, y: f.square().sum(1)).evaluate(x, ctx)
        assert torch.equal(ev.grad[:, 3:], torch.zeros(6, 2)) and torch.allclose(ev.grad[:, :3], 2 * x[:, :3])


class TestInFlows:
    def test_needs_labels(self):
        with pytest.raises(ValueError, match="LabelPotential needs each particle's label: pass y"):
            flowaug.flow(torch.randn(6, 2), objective=LabelPotential(lambda x, y: x.sum(1)), steps=1)

    def test_wrong_shape_is_refused(self):
        with pytest.raises(ValueError, match=r"must return shape \(6,\)"):
            flowaug.flow(torch.randn(6, 2), torch.arange(6) % 2, objective=LabelPotential(lambda x, y: x), steps=1)

    def test_class_wise_flow_equals_each_class_flowed_alone(self):
        """The potential is per particle, the distribution term per class: a class-wise flow of both is each class
        flowed alone toward its own reference class with the same potential."""
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(40, 2, generator=g, dtype=torch.float64), torch.arange(40) % 2
        ref = torch.randn(50, 2, generator=g, dtype=torch.float64) + 3
        ref_y = torch.arange(50) % 2
        pull = LabelPotential(lambda f, lab: (f[:, 0] - 4.0 * lab).square() / 2)
        objective = Sinkhorn(1.0) + 0.5 * pull
        options = dict(objective=objective, steps=4, step_size=0.5, dtype=torch.float64, guard=False)
        together = flowaug.flow(x, y, (ref, ref_y), class_map="same", **options).x
        for c in (0, 1):
            alone = flowaug.flow(x[y == c], y[y == c], ref[ref_y == c], **options).x
            assert torch.allclose(together[y == c], alone, atol=1e-6)

    def test_flow_transform_steers_each_label_its_own_way(self):
        g = torch.Generator().manual_seed(3)
        ref = (torch.rand(64, 1, 4, 4, generator=g), torch.arange(64) % 2)
        pull = LabelPotential(lambda f, lab: (f.flatten(1).mean(1) - lab.to(f.dtype)).square() * 8)
        t = flowaug.FlowTransform(ref, objective=0.0 * Sinkhorn() + pull, steps=20, step_size=0.5, clamp=None, seed=0)
        x, y = torch.full((16, 1, 4, 4), 0.5), torch.arange(16) % 2
        out, labels = t(x, y)
        means = out.flatten(1).mean(1)
        assert torch.equal(labels, y) and (means[y == 1] > 0.9).all() and (means[y == 0] < 0.1).all()
