"""Dataset condensation: distribution matching is exactly a flow (mean matching, step 2 lr / IPC), runs resume
exactly, the DSA draw is shared by both batches and differentiable, results are written atomically."""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import subprocess
import sys

import pytest
import torch

import flowaug
from flowaug import Condensed, condense
from flowaug.condense import RandomEmbedding, evaluate_synthetic
from flowaug.dsa import STRATEGIES, SiameseAugment
from flowaug.networks import ConvNet

from .conftest import tiny_images

condense_module = importlib.import_module("flowaug.condense")  # the attribute flowaug.condense is the function


def data(n=60, classes=3):
    return tiny_images(n, classes=classes, seed=5, size=8)


class StringLabels(torch.utils.data.Dataset):
    """A Dataset whose labels are strings."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], "cat"


#: (scale, shift) of the data's units: [0, 1], 0..255 floats, MNIST's Normalize
UNITS = [(1.0, 0.0), (255.0, 0.0), (1 / 0.3081, -0.1307 / 0.3081)]


class TestCondense:
    def test_pickle_round_trip(self, tmp_path):
        x, y = data()
        syn = condense((x, y), 2, iterations=2, real_per_class=8, width=4, progress=False)
        back = pickle.loads(pickle.dumps(syn))
        assert torch.equal(back.images, syn.images) and back.info == syn.info
        factory = pickle.loads(pickle.dumps(RandomEmbedding(1, 3, (8, 8), width=4)))
        assert isinstance(factory().net, ConvNet)

    @pytest.mark.parametrize("scale, shift", UNITS)
    def test_distribution_matching_is_a_flow(self, scale, shift):
        """DM's update (SGD on the images of sum_c ||mean phi(real_c) - mean phi(syn_c)||^2, lr, momentum) is the
        class-wise flow of the linear-kernel MMD with step 2 lr / IPC and the same heavy ball, on the standardized
        images: in the data's own units, DM at lr * std^2, whatever the units."""
        x, y = data()
        x = x * scale + shift
        ipc, lr, momentum, steps = 4, 0.7, 0.5, 5
        torch.manual_seed(0)
        net = ConvNet(1, 3, (8, 8), width=6).requires_grad_(False)
        out = condense((x, y), ipc, objective="linear", embedding=net.features, iterations=steps, real_per_class=1000,
                       step_size=2 * lr / ipc, momentum=momentum, seed=3, progress=False)
        syn, labels = condense_module._initial(x, y, ipc, "real", 3)
        syn = syn.clone().requires_grad_(True)
        opt = torch.optim.SGD([syn], lr=lr * out.info["data_std"][0] ** 2, momentum=momentum)
        for _ in range(steps):
            loss = sum((net.embed(x[y == c]).mean(0) - net.embed(syn[labels == c]).mean(0)).square().sum()
                       for c in range(3))
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.testing.assert_close(out.images / scale, syn.detach() / scale, rtol=1e-4, atol=2e-5)

    @pytest.mark.parametrize("scale, shift", UNITS[1:] + [(2.0, -1.0)])
    def test_the_data_units_do_not_matter(self, scale, shift):
        """Issue 26, item 1: 0..255 floats, Normalize'd or [-1, 1] data condense as [0, 1] data do (on 0..255 the
        flow barely moved: steps were absolute)."""
        x, y = data()
        kwargs = dict(iterations=3, real_per_class=8, width=4, seed=1, step_size=20.0, progress=False)
        unit = condense((x, y), 2, **kwargs)
        other = condense((x * scale + shift, y), 2, **kwargs)
        start, _ = condense_module._initial(x, y, 2, "real", 1)
        assert float((unit.images - start).abs().max()) > 0.05  # it moved ...
        torch.testing.assert_close((other.images - shift) / scale, unit.images, rtol=0, atol=1e-3)  # ... alike
        assert other.value_range() == pytest.approx((float(x.min()) * scale + shift, float(x.max()) * scale + shift))

    def test_embedding_network_is_left_unchanged_and_used_in_eval_mode(self):
        """Issue 26, item 2: BatchNorm statistics and num_batches_tracked were updated, dropout was on."""
        x, y = data()
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.Dropout(0.5), torch.nn.Flatten())
        net[1].running_mean.uniform_()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        kwargs = dict(iterations=2, real_per_class=8, seed=0, progress=False)
        first = condense((x, y), 2, embedding=net, **kwargs).images
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
        evaluated = condense((x, y), 2, embedding=copy.deepcopy(net).eval(), **kwargs).images
        assert torch.equal(first, evaluated)  # eval mode: no dropout draw, running statistics

    def test_float_labels_are_refused(self):
        """Issue 26, item 5: 0.5 was truncated to class 0."""
        x, y = data()
        with pytest.raises(TypeError, match="data labels with shape .* must hold integer class ids, got dtype"):
            condense((x, y.float() + 0.5), 2, iterations=1, progress=False)

    def test_inputs_in_other_forms(self, tmp_path):
        """numpy pairs and npz folders given as a Path are read; lists, string labels and images alone are
        refused naming the argument, without dumping the array; NaN names the data."""
        import numpy as np

        x, y = data()
        kwargs = dict(iterations=1, real_per_class=8, width=4, progress=False)
        as_numpy = condense((x.numpy(), y.numpy()), 2, **kwargs)
        assert torch.equal(as_numpy.images, condense((x, y), 2, **kwargs).images)
        (tmp_path / "digits").mkdir()
        np.savez(tmp_path / "digits" / "train.npz", x=(x[:, 0] * 255).round().byte().numpy(), y=y.numpy())
        assert len(condense(tmp_path / "digits", 2, **kwargs)) == 6
        cases = [((x, y.tolist()), TypeError, "data labels must be a torch.Tensor or a numpy array .torch.tensor"),
                 ((x.numpy(), np.array(["a", "b", "c"] * 20)), TypeError, "data labels must hold numbers.*dtype <U1"),
                 (x, TypeError, "data must be labelled.*got images alone: Tensor"),
                 (StringLabels(x), TypeError, r"data\[0\] label must be a class id.*got 'cat'"),
                 ((torch.where(x > 0.85, float("nan"), x), y), ValueError, "data images must be finite")]
        for bad, error, match in cases:
            with pytest.raises(error, match=match) as caught:
                condense(bad, 2, **kwargs)
            assert len(str(caught.value)) < 300

    def test_embedding_function_factory_or_refused(self):
        """A one-argument function is a fixed embedding (a lambda was taken as a factory); a callable that could
        be either is refused with how to say which."""
        x, y = data()
        torch.manual_seed(0)
        net = ConvNet(1, 3, (8, 8), width=4)
        kwargs = dict(iterations=2, real_per_class=1000, objective="linear", progress=False)
        by_module = condense((x, y), 2, embedding=net.features, **kwargs).images
        by_function = condense((x, y), 2, embedding=lambda t: net.features(t), **kwargs).images
        torch.testing.assert_close(by_function, by_module)
        by_factory = condense((x, y), 2, embedding=lambda: net.features, **kwargs).images
        torch.testing.assert_close(by_factory, by_module)
        for ambiguous in (lambda t=None: t, lambda *a: a):
            with pytest.raises(ValueError, match="wrap it as one of the two"):
                condense((x, y), 2, embedding=ambiguous, **kwargs)
        with pytest.raises(TypeError, match="embedding must be None, an nn.Module"):
            condense((x, y), 2, embedding="convnet", **kwargs)

    def test_device(self):
        x, y = data()
        out = condense((x, y), 2, iterations=1, real_per_class=8, width=4, device="cpu", progress=False)
        assert out.images.device.type == "cpu" and out.info["device"] == "cpu"
        if torch.cuda.is_available():
            gpu = condense((x, y), 2, iterations=1, real_per_class=8, width=4, device="cuda", progress=False)
            assert gpu.images.is_cuda and gpu.labels.is_cuda
            torch.testing.assert_close(gpu.images.cpu(), out.images, rtol=1e-3, atol=1e-3)

    def test_resume_is_exact(self, tmp_path, monkeypatch):
        x, y = data()
        kwargs = dict(iterations=6, real_per_class=8, width=4, seed=2, checkpoint_every=2, progress=False)
        whole = condense((x, y), 2, **kwargs).images
        path = str(tmp_path / "run.pt")
        real_flow, calls = condense_module.flow, []

        def interrupted(*args, **kw):
            calls.append(1)
            if len(calls) == 4:
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
        with pytest.raises(ValueError, match="other settings .seed: 2 there, 9 here"):
            condense((x, y), 2, checkpoint=path, **{**kwargs, "seed": 9})
        with pytest.raises(ValueError, match="of other data"):
            condense((x.flip(0), y), 2, checkpoint=path, **kwargs)
        with pytest.raises(ValueError, match="at iteration 6, past iterations=4"):
            condense((x, y), 2, checkpoint=path, **{**kwargs, "iterations": 4})

    def test_checkpoint_every_does_not_change_the_result(self, tmp_path):
        """Segments restarted heavy ball and reseeded the stream: the result depended on how often it was saved.
        A checkpoint also extends to more iterations exactly."""
        x, y = data()
        kwargs = dict(real_per_class=8, width=4, seed=4, progress=False)
        plain = condense((x, y), 2, iterations=5, **kwargs).images
        for every in (1, 3):
            saved = condense((x, y), 2, iterations=5, checkpoint=tmp_path / f"{every}.pt", checkpoint_every=every,
                             **kwargs).images
            assert torch.equal(saved, plain)
        condense((x, y), 2, iterations=3, checkpoint=tmp_path / "grow.pt", **kwargs)
        assert torch.equal(condense((x, y), 2, iterations=5, checkpoint=tmp_path / "grow.pt", **kwargs).images, plain)

    def test_garbage_checkpoint_is_named(self, tmp_path):
        x, y = data()
        for content in (b"not a checkpoint at all", pickle.dumps({"a": 1})):
            path = tmp_path / "junk.pt"
            path.write_bytes(content)
            with pytest.raises(ValueError, match="is not a flowaug condense checkpoint"):
                condense((x, y), 2, iterations=1, checkpoint=path, progress=False)
        torch.save({"a": 1}, tmp_path / "other.pt")
        with pytest.raises(ValueError, match="is not a flowaug condense checkpoint of this version"):
            condense((x, y), 2, iterations=1, checkpoint=tmp_path / "other.pt", progress=False)

    def test_save_load_and_grid(self, tmp_path, monkeypatch):
        import numpy as np

        x, y = data()
        x = x * 255  # 0..255 floats: the bytes are the data's range, not a clamp to [0, 1]
        syn = condense((x, y), 2, iterations=1, real_per_class=8, width=4, progress=False)
        syn.classes = ["zero", "one", "two"]
        path = syn.save(tmp_path / "syn.npz")
        saved = np.load(path)
        assert saved["x"].shape == (6, 1, 8, 8) and saved["y"].tolist() == syn.labels.tolist()
        assert (saved["x_uint8"] == 255).mean() < 0.05 and saved["x_uint8"].max() > 200
        back = Condensed.load(path)
        assert torch.equal(back.images, syn.images) and torch.equal(back.labels, syn.labels)
        assert back.classes == syn.classes and back.info == syn.info
        seen = {}
        monkeypatch.setattr("flowaug.plotting.image_grid", lambda rows, p, **kw: seen.update(kw) or p)
        syn.grid(tmp_path / "syn.png", real=x)
        assert seen["column_labels"] == ["zero", "one", "two"] and seen["row_labels"][-1] == "real"
        assert isinstance(syn[0][1], int) and len(syn) == 6
        with pytest.warns(RuntimeWarning, match=r"clipped in x_uint8"):
            Condensed(syn.images * 3, syn.labels, info=syn.info).save(tmp_path / "far.npz")
        (tmp_path / "junk.npz").write_bytes(b"junk")
        with pytest.raises(ValueError, match="not a file written by Condensed.save"):
            Condensed.load(tmp_path / "junk.npz")

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
        with pytest.raises(ValueError, match="momentum must be"):
            condense((x, y), 2, momentum=1.0, progress=False)
        kwargs = dict(iterations=1, real_per_class=8, width=4, progress=False)
        cases = [(dict(data={"x": x, "y": y}), TypeError, "data must be .* got a dict with keys"),
                 (dict(data=(x, y, y)), TypeError, "must be .images, labels., got 3 entries"),
                 (dict(device="gpu0"), ValueError, "device must be a device usable here"),
                 (dict(checkpoint=5), TypeError, "checkpoint must be None or a file path"),
                 (dict(augment="blur"), ValueError, "augment: strategy part must be one of"),
                 (dict(embedding=torch.nn.Flatten(0)), ValueError, "embedding must map a batch of 2 images"),
                 (dict(embedding=torch.nn.Linear(3, 3)), ValueError, "embedding failed on a batch of 2 images"),
                 (dict(progress="yes"), TypeError, "progress must be True or False")]
        for case, error, match in cases:
            with pytest.raises(error, match=match):
                condense(case.pop("data", (x, y)), 2, **{**kwargs, **case})
        assert isinstance(Condensed(x[:2], y[:2]), torch.utils.data.Dataset)


class TestEvaluateSynthetic:
    def test_global_stream_condensed_and_uint8(self):
        """Issue 26, item 6: the global stream was reseeded; the Condensed that condense returns and uint8 score
        images are accepted (uint8 / 255)."""
        x, y = data(30)
        syn = condense((x, y), 2, iterations=1, real_per_class=8, width=4, progress=False)
        state = torch.get_rng_state()
        kwargs = dict(width=4, epochs=1, batch_size=4)
        score = evaluate_synthetic(syn, (x, y), **kwargs)
        assert torch.equal(torch.get_rng_state(), state)
        as_bytes = ((x * 255).round().byte(), y)
        assert evaluate_synthetic((syn.images, syn.labels), as_bytes, **kwargs) == pytest.approx(score, abs=10)
        with pytest.warns(RuntimeWarning, match="same units"):
            evaluate_synthetic(syn, (x * 255, y), **kwargs)
        with pytest.raises(ValueError, match="score images must have train's image shape"):
            evaluate_synthetic(syn, (x[:, :, :4], y), **kwargs)


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


def test_submodules_are_attributes_of_the_package():
    """``import flowaug; flowaug.gradual`` raised AttributeError (a fresh interpreter: here gradual is imported)."""
    code = "import flowaug, sys; print(callable(flowaug.gradual.adapt), 'lightning' in sys.modules, 'gradual' in dir(flowaug))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.split() == ["True", "False", "True"], done.stderr
    public = [name[:-3] for name in os.listdir(os.path.dirname(flowaug.__file__))
              if name.endswith(".py") and not name.startswith("_")]
    for name in public:  # every public module, or the function of its name (flowaug.flow, flowaug.condense)
        assert getattr(flowaug, name).__name__ in (name, f"flowaug.{name}"), name
