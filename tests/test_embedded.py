"""Ground costs in an embedding (flowaug.Embedded): gradients equal autograd through phi of geomloss's loss,
the identity embedding is the plain flow, backends agree, a fixed reference is embedded once, fresh random
embeddings repeat under a seed, and every entry point (flow, FlowTransform, FlowDataset) takes it."""

from __future__ import annotations

import pickle

import pytest
import torch
from geomloss import SamplesLoss

import flowaug
from flowaug import MMD, Embedded, FlowDataset, FlowTransform, Reference, Sinkhorn
from .conftest import TensorPairs, autograd_value_and_gradient, ours_value_and_gradient, tiny_images


def mlp(seed=0, d_in=4, d_out=3, dtype=torch.float64):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 8), torch.nn.Tanh(), torch.nn.Linear(8, d_out)).to(dtype)
    return net.requires_grad_(False)


class CountingPhi(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return x.flatten(1)[:, :5] * 2


class TestEmbedded:
    def setup_method(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(56, 4, generator=g, dtype=torch.float64) + 1

    def _ours(self, objective):
        return ours_value_and_gradient(objective, self.x, self.y)

    def _autograd(self, loss, phi):
        return autograd_value_and_gradient(loss, self.x, self.y, phi)

    def test_pickle_round_trip(self):
        obj = Embedded(Sinkhorn(blur=0.5), mlp(), reference_size=10)
        back = pickle.loads(pickle.dumps(obj))
        assert repr(back) == repr(obj) and back.reference_size == 10

    def test_sinkhorn_gradient_is_the_pull_back_of_geomloss(self):
        phi = mlp()
        ours_v, ours_g = self._ours(Embedded(Sinkhorn(blur=0.5, tol=1e-10, max_iter=50000), phi))
        ref_v, ref_g = self._autograd(SamplesLoss("sinkhorn", p=2, blur=0.5, scaling=0.9999, debias=True), phi)
        assert ours_v == pytest.approx(ref_v, rel=1e-5)
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-3, atol=1e-5)

    @pytest.mark.parametrize("kernel", ["gaussian", "laplacian"])
    def test_mmd_gradient_is_the_pull_back_of_geomloss(self, kernel):
        phi = mlp(1)
        ours_v, ours_g = self._ours(Embedded(MMD(kernel, bandwidth=0.8, normalize=False), phi))
        ref_v, ref_g = self._autograd(SamplesLoss(kernel, blur=0.8), phi)
        assert ours_v == pytest.approx(ref_v, rel=1e-4)  # as for the plain MMD (test_flow): sqrt of a clamped cost
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-6, atol=1e-9)

    def test_linear_kernel_is_mean_matching(self):
        """The loss of distribution matching: ||mean phi(x) - mean phi(y)||^2 / 2."""
        phi = mlp(2)
        ours_v, ours_g = self._ours(Embedded(MMD("linear"), phi))
        ref_v, ref_g = self._autograd(lambda u, v: 0.5 * (u.mean(0) - v.mean(0)).square().sum(), phi)
        assert ours_v == pytest.approx(ref_v, rel=1e-10)
        torch.testing.assert_close(ours_g, ref_g)

    def test_identity_embedding_is_the_plain_flow(self):
        rx, ry = tiny_images(40, seed=1)
        x, y = tiny_images(20, seed=2)
        for options in ({}, {"class_map": "same", "objective": Sinkhorn(blur=0.3)}):
            inner = options.pop("objective", Sinkhorn())
            plain = flowaug.flow(x, y, (rx, ry), steps=3, objective=inner, **options)
            embedded = flowaug.flow(x, y, (rx, ry), steps=3, objective=Embedded(inner, lambda v: v.flatten(1)),
                                    **options)
            torch.testing.assert_close(embedded.x, plain.x, rtol=1e-4, atol=1e-5)

    def test_label_aware_flow_keeps_the_label_part(self):
        rx, ry = tiny_images(40, seed=1)
        x, y = tiny_images(20, seed=2)
        plain = flowaug.flow(x, y, (rx, ry), steps=2, labels="flow")
        embedded = flowaug.flow(x, y, (rx, ry), steps=2, labels="flow",
                                objective=Embedded(Sinkhorn(), lambda v: v.flatten(1)))
        torch.testing.assert_close(embedded.x, plain.x, rtol=1e-4, atol=1e-5)
        assert torch.equal(embedded.labels, plain.labels)

    def test_backends_agree(self):
        rx, ry = tiny_images(60, seed=1)
        x, _ = tiny_images(30, seed=2)
        phi = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 6)).requires_grad_(False)
        outs = [flowaug.flow(x, None, rx, objective=Embedded(Sinkhorn(), phi), steps=3, backend=b).x
                for b in ("tensorized", "chunked")]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)

    def test_objective_decreases_with_a_fixed_embedding(self):
        rx, _ = tiny_images(60, seed=1)
        x, _ = tiny_images(30, seed=2)
        phi = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 6), torch.nn.Tanh()).requires_grad_(False)
        out = flowaug.flow(x, None, rx, objective=Embedded(Sinkhorn(), phi), steps=6, step_size=0.5)
        values = out.objective.tolist()
        assert all(b <= a + 1e-6 for a, b in zip(values, values[1:])) and values[-1] < 0.5 * values[0]

    def test_a_fixed_reference_is_embedded_once(self):
        rx, ry = tiny_images(60, seed=1)
        ref = Reference(rx, ry)
        phi = CountingPhi()
        obj = Embedded(Sinkhorn(), phi)
        for seed in (2, 3):
            flowaug.flow(tiny_images(20, seed=seed)[0], None, ref, objective=obj, steps=4)
        assert phi.calls.count(60) == 1  # the reference, once; the batches (20) at every evaluation
        assert phi.calls.count(20) >= 8

    def test_fresh_embeddings_repeat_under_a_seed(self):
        rx, ry = tiny_images(60, seed=1)
        x, y = tiny_images(20, seed=2)

        def factory():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 8), torch.nn.ReLU())

        obj = Embedded(MMD("linear"), factory=factory, reference_size=12)
        assert obj.stochastic

        def run(seed):
            return flowaug.flow(x, y, (rx, ry), objective=obj, class_map="same", steps=3, step_size=0.5,
                                generator=torch.Generator().manual_seed(seed)).x

        torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
        assert not torch.equal(run(0), run(1))
        assert not torch.equal(run(0), x)

    def test_adapters_take_it(self):
        rx, ry = tiny_images(40, seed=1)
        x, y = tiny_images(20, seed=2)
        obj = Embedded(Sinkhorn(), torch.nn.Flatten())
        t = FlowTransform((rx, ry), objective=obj, steps=2, class_map="same")
        torch.testing.assert_close(t(x, y)[0], flowaug.flow(x, y, (rx, ry), t.config).x)
        fd = FlowDataset(TensorPairs(x, y), (rx, ry), objective=obj, steps=2, class_map="same", progress=False)
        assert not torch.equal(fd[0][0], x[0])

    def test_bad_arguments_name_themselves(self):
        with pytest.raises(ValueError, match="exactly one of phi"):
            Embedded(Sinkhorn())
        with pytest.raises(TypeError, match="phi must be callable"):
            Embedded(Sinkhorn(), phi=3)
        rx, _ = tiny_images(20, seed=1)
        with pytest.raises(ValueError, match="phi must map a batch"):
            flowaug.flow(rx[:8], None, rx, objective=Embedded(Sinkhorn(), lambda v: v[:1].flatten(1)), steps=1)
