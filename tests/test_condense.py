"""Dataset condensation: distribution matching is exactly a flow (mean matching, step 2 lr / IPC), runs resume
exactly, the DSA draw is shared by both batches and differentiable, results are written atomically."""

from __future__ import annotations

import importlib
import os
import pickle

import pytest
import torch

import flowaug
from flowaug import Condensed, condense
from flowaug.condense import RandomEmbedding
from flowaug.dsa import STRATEGIES, SiameseAugment
from flowaug.networks import ConvNet

from .conftest import tiny_images

condense_module = importlib.import_module("flowaug.condense")  # the attribute flowaug.condense is the function


def data(n=60, classes=3):
    return tiny_images(n, classes=classes, seed=5, size=8)


class TestCondense:
    def test_pickle_round_trip(self, tmp_path):
        x, y = data()
        syn = condense((x, y), 2, iterations=2, real_per_class=8, width=4, progress=False)
        back = pickle.loads(pickle.dumps(syn))
        assert torch.equal(back.images, syn.images) and back.info == syn.info
        factory = pickle.loads(pickle.dumps(RandomEmbedding(1, 3, (8, 8), width=4)))
        assert isinstance(factory().net, ConvNet)

    def test_distribution_matching_is_a_flow(self):
        """DM's update (SGD on the images of sum_c ||mean phi(real_c) - mean phi(syn_c)||^2, lr, momentum) is the
        class-wise flow of the linear-kernel MMD with step 2 lr / IPC and the same heavy ball."""
        x, y = data()
        ipc, lr, momentum, steps = 4, 0.7, 0.5, 5
        torch.manual_seed(0)
        net = ConvNet(1, 3, (8, 8), width=6).requires_grad_(False)
        flowed = condense((x, y), ipc, objective="linear", embedding=net.features, iterations=steps, real_per_class=1000,
                          step_size=2 * lr / ipc, momentum=momentum, seed=3, progress=False,
                          checkpoint_every=steps).images
        syn, labels = condense_module._initial(x, y, ipc, "real", 3)
        syn = syn.clone().requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=lr, momentum=momentum)
        for _ in range(steps):
            loss = sum((net.embed(x[y == c]).mean(0) - net.embed(syn[labels == c]).mean(0)).square().sum()
                       for c in range(3))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(flowed, syn.detach(), rtol=1e-4, atol=1e-5)

    def test_mean_gap_shrinks(self):
        x, y = data()
        torch.manual_seed(1)
        net = ConvNet(1, 3, (8, 8), width=6).requires_grad_(False)
        syn = condense((x, y), 3, objective="sinkhorn", embedding=net.features, iterations=30, real_per_class=1000,
                       step_size=2.0, seed=0, init="noise", progress=False)
        start, _ = condense_module._initial(x, y, 3, "noise", 0)

        def gap(images):
            return sum(float((net.embed(x[y == c]).mean(0) - net.embed(images[syn.labels == c]).mean(0)).norm())
                       for c in range(3))

        assert gap(syn.images) < 0.5 * gap(start)

    def test_resume_is_exact(self, tmp_path, monkeypatch):
        x, y = data()
        kwargs = dict(iterations=6, real_per_class=8, width=4, seed=2, checkpoint_every=2, progress=False)
        whole = condense((x, y), 2, **kwargs).images
        path = str(tmp_path / "run.pt")
        real_flow, calls = condense_module.flow, []

        def interrupted(*args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_flow(*args, **kw)

        monkeypatch.setattr(condense_module, "flow", interrupted)
        with pytest.raises(KeyboardInterrupt):
            condense((x, y), 2, checkpoint=path, **kwargs)
        monkeypatch.setattr(condense_module, "flow", real_flow)
        assert torch.load(path, weights_only=True)["iterations"] == 2
        resumed = condense((x, y), 2, checkpoint=path, **kwargs).images
        assert torch.equal(resumed, whole)
        assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
        with pytest.raises(ValueError, match="other data or settings"):
            condense((x, y), 2, checkpoint=path, **{**kwargs, "seed": 9})

    def test_save_and_grid(self, tmp_path):
        x, y = data()
        syn = condense((x, y), 2, iterations=1, real_per_class=8, width=4, progress=False)
        syn.save(str(tmp_path / "syn.npz"))
        import numpy as np

        saved = np.load(tmp_path / "syn.npz")
        assert saved["x"].shape == (6, 1, 8, 8) and saved["y"].tolist() == syn.labels.tolist()
        assert os.path.getsize(syn.grid(str(tmp_path / "syn.png"), real=x)) > 0
        assert isinstance(syn[0][1], int) and len(syn) == 6

    def test_bad_arguments(self):
        x, y = data()
        with pytest.raises(ValueError, match="fewer than images_per_class"):
            condense((x, y), 50, iterations=1, progress=False)
        with pytest.raises(ValueError, match="init must be one of"):
            condense((x, y), 2, init="zeros", progress=False)
        with pytest.raises(TypeError, match="data must be"):
            condense(42, 2, progress=False)
        with pytest.raises(ValueError, match="objective must be one of"):
            condense((x, y), 2, objective="kl", progress=False)
        assert isinstance(Condensed(x[:2], y[:2]), torch.utils.data.Dataset)


class TestSiameseAugment:
    def test_pickle_round_trip(self):
        aug = pickle.loads(pickle.dumps(SiameseAugment("scale_rotate")))
        assert aug.strategies == ("scale", "rotate")

    @pytest.mark.parametrize("strategy", STRATEGIES)
    def test_one_draw_transforms_both_batches_alike(self, strategy):
        aug = SiameseAugment(strategy)
        g = torch.Generator().manual_seed(0)
        a, b = torch.rand(3, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
        params = aug.draw(generator=g)
        together = aug.apply(torch.cat([a, b]), params)
        torch.testing.assert_close(together, torch.cat([aug.apply(a, params), aug.apply(b, params)]))

    def test_differentiable_and_not_the_identity(self):
        aug = SiameseAugment("rotate")
        x = torch.rand(4, 1, 8, 8, requires_grad=True)
        out = aug.apply(x, {"kind": "rotate", "angle": torch.tensor([0.2])})
        out.sum().backward()
        assert x.grad is not None and float(x.grad.abs().sum()) > 0
        assert not torch.allclose(out, x)
        still = aug.apply(x, {"kind": "scale", "scale": torch.ones(1, 2)})
        torch.testing.assert_close(still, x, atol=1e-5, rtol=0)

    def test_per_image_draws(self):
        aug = SiameseAugment("crop")
        params = aug.draw(6, generator=torch.Generator().manual_seed(1))
        assert params["shift"].shape == (6, 2)
        with pytest.raises(ValueError, match="strategy part must be one of"):
            SiameseAugment("color_blur")


class TestConvNet:
    def test_pickle_round_trip(self):
        net = ConvNet(1, 10, (28, 28), width=4)
        back = pickle.loads(pickle.dumps(net))
        x = torch.rand(2, 1, 28, 28)
        torch.testing.assert_close(back(x), net(x))
        assert net.embed(x).shape == (2, 4 * 3 * 3)

    def test_too_small_images_are_refused(self):
        with pytest.raises(ValueError, match="too small"):
            ConvNet(1, 10, (4, 4), width=4)


def test_condense_is_exported():
    assert flowaug.condense is condense and "condense" in flowaug.__all__
