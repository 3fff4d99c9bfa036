"""The integrator's contract, against closed forms: explicit Euler on a quadratic potential, snapshots and the
tracked objective. (Class-wise flows equal independent per-class flows: tests/test_flow.py.)"""

from __future__ import annotations

import pytest
import torch

import flowaug
from flowaug import Potential


class TestIntegrate:
    def test_integrator_follows_the_closed_form_euler_path(self):
        """V(z) = |z - c|^2 / 2: each explicit Euler step is z <- z - tau (z - c), so after K steps
        z_K = c + (1 - tau)^K (z_0 - c) exactly."""
        g = torch.Generator().manual_seed(0)
        x, c, tau, k = torch.randn(16, 3, generator=g, dtype=torch.float64), 2.0, 0.3, 5
        pull = Potential(lambda z: 0.5 * (z - c).square().sum(1))
        out = flowaug.flow(x, objective=pull, steps=k, step_size=tau, dtype=torch.float64, snapshots="all")
        torch.testing.assert_close(out.x, c + (1 - tau) ** k * (x - c))
        for i, snap in enumerate(out.trajectory):
            torch.testing.assert_close(snap, c + (1 - tau) ** i * (x - c))
        half = 0.5 * ((x - c) ** 2).sum(1).mean()
        assert out.objective[0].item() == pytest.approx(half.item())  # the tracked value is mean V
