"""flowaug.paths: the flow path, the plain entropic map and GOAT's exact-plan path (analytic and reference cases)."""


import pytest
import torch
from torch import nn

from flowaug.paths import FlowPath, PlanPath, entropic_path


def clouds(n=40, m=50, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64) + 2


class TestEntropicPath:
    def test_end_point_is_the_entropic_barycentric_map_of_pot(self):
        import ot

        x, y = clouds()
        blur = 1.0
        end = entropic_path(blur, dtype=torch.float64).__call__(x, y, [1.0]).domains[0]
        cost = torch.cdist(x, y).square() / 2  # geomloss's p = 2 cost, eps = blur^2
        plan = torch.as_tensor(ot.sinkhorn(torch.full((40,), 1 / 40, dtype=torch.float64).numpy(),
                                           torch.full((50,), 1 / 50, dtype=torch.float64).numpy(), cost.numpy(),
                                           reg=blur**2, stopThr=1e-12, numItermax=10**5))
        barycentric = plan @ y / plan.sum(1, keepdim=True)  # (N, d)
        assert torch.allclose(end, barycentric, atol=1e-3)

    def test_the_debiased_flow_step_is_not_the_map(self):
        x, y = clouds()
        from flowaug import Sinkhorn

        flow_end = FlowPath(objective=Sinkhorn(1.0), steps=1, dtype=torch.float64)(x, y, [1.0]).domains[0]
        map_end = entropic_path(1.0, dtype=torch.float64)(x, y, [1.0]).domains[0]
        # the map contracts the cloud toward blurred averages; the debiased step keeps its spread
        assert map_end.std(0).mean() < 0.9 * flow_end.std(0).mean()


class TestPlanPath:
    def test_a_translation_is_followed_exactly_with_one_to_one_rows(self):
        x, _ = clouds(n=30, m=30)
        y = x[torch.randperm(30, generator=torch.Generator().manual_seed(1))] + torch.tensor([5.0, 0.0, 0.0],
                                                                                          dtype=torch.float64)
        path = PlanPath()(x, y, [0.5, 1.0])
        assert sorted(path.rows.tolist()) == list(range(30))
        assert torch.allclose(path.domains[1], x[path.rows] + torch.tensor([5.0, 0, 0], dtype=torch.float64))
        assert torch.allclose(path.domains[0], x[path.rows] + torch.tensor([2.5, 0, 0], dtype=torch.float64))


class TestClassifierPotential:
    def test_keeps_particles_inside_their_class_while_they_move(self):
        g = torch.Generator().manual_seed(0)
        x = torch.cat([torch.randn(30, 2, generator=g) * 0.3 - 2, torch.randn(30, 2, generator=g) * 0.3 + 2])
        y = torch.arange(60) // 30
        target = torch.randn(60, 2, generator=g) * 0.3 + torch.tensor([-2.0, 0.0])  # all on class 0's side
        clf = nn.Linear(2, 2)
        with torch.no_grad():
            clf.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            clf.bias.zero_()
        ce = lambda z: nn.functional.cross_entropy(clf(z), y).item()
        plain = FlowPath(steps=10)(x, target, [1.0]).domains[0]
        guided = FlowPath(steps=10, classifier_weight=5.0)(x, target, [1.0], y_from=y, classifier=clf).domains[0]
        assert ce(guided) < 0.5 * ce(plain)
        assert (guided[30:, 0] > 0).float().mean() > 0.9 > (plain[30:, 0] > 0).float().mean()
        with pytest.raises(ValueError, match="needs a classifier and y_from"):
            FlowPath(classifier_weight=1.0)(x, target, [0.5])
