"""Where a step happens: the one integrator of every flow.

    z_{t+1} = z_t - tau * u_t,      u_t = v(z_t)   (or  m * u_{t-1} + v(z_t)  with momentum m)
    x_{t+1} += sqrt(2 tau T) xi     (Langevin noise of an entropy term at temperature T)
    x_{t+1} <- clamp(x_{t+1})       (optional box constraint on the features)

``v(z) = N grad_z F`` is the Wasserstein gradient returned by the objective. The divergence guard
re-tries a step with ``tau / 2`` when it produced non-finite values or (for deterministic objectives
without momentum or noise) raised the objective; after ``MAX_HALVINGS`` halvings the flow stops and keeps
the last accepted state. Everything else (labels, class-wise pairing, decoding) happens before or after
this loop, in :mod:`flowaug.flow` and :mod:`flowaug.classwise`.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ._checks import warn_user
from .objectives import Evaluation

__all__ = ["Path", "Dynamics", "integrate", "MAX_HALVINGS"]

MAX_HALVINGS = 8
_SLACK = 1e-3  # relative rise of the objective tolerated before the guard calls it divergence


@dataclass(frozen=True)
class Dynamics:
    """The step rule: what moves, how far, with what inertia, noise and box."""

    steps: int
    step_size: float
    moving: slice  # coordinates of z that move: the features, or features and label part
    feature_dim: int  # noise and clamp act on z[:, :feature_dim]
    momentum: float = 0.0
    temperature: float = 0.0
    clamp: tuple[float, float] | None = None
    guard: bool = True
    monotone: bool = True  # the objective must not rise (checked only when guard is on)
    track_last: bool = True  # evaluate the objective after the last step (for reporting)


@dataclass
class Path:
    """What :func:`integrate` returns.

    Attributes:
        z: (N, D) the last accepted state.
        values, times: objective values (without reference constant) and the flow times they were taken at.
        snapshots: ``(step, time, z)`` at the requested steps.
        step_size: tau at the end (smaller than asked when the guard halved it).
        iterations: solver iterations per evaluation.
        state: the objective's solver state after the last evaluation.
    """

    z: torch.Tensor
    values: list = field(default_factory=list)
    times: list = field(default_factory=list)
    snapshots: list = field(default_factory=list)
    step_size: float = 0.0
    iterations: list = field(default_factory=list)
    state: Any = None


def integrate(z: torch.Tensor, evaluate: Callable[[torch.Tensor, Any], Evaluation], dyn: Dynamics, *,
              state: Any = None, snapshot_steps=(), generator: torch.Generator | None = None,
              progress: bool = False) -> Path:
    """Run ``dyn.steps`` explicit Euler steps from ``z`` (N, D); ``evaluate(z, state)`` gives the objective."""
    from tqdm.auto import tqdm

    shots = set(snapshot_steps)
    ev = evaluate(z, state)
    path = Path(z=z, values=[float(ev.value)], times=[0.0], step_size=dyn.step_size, state=ev.state)
    _record_iterations(path, ev)
    if 0 in shots:
        path.snapshots.append((0, 0.0, z))
    velocity = torch.zeros_like(z) if dyn.momentum > 0 else None
    stepper = _Stepper(dyn, generator)
    t_now = 0.0
    for step in tqdm(range(dyn.steps), desc="flow", disable=not progress, leave=False):
        need_eval = step < dyn.steps - 1 or dyn.track_last
        accepted = stepper.step(path, z, ev, velocity, evaluate, step, need_eval)
        if accepted is None:
            break
        z, new_ev, upd = accepted
        if velocity is not None:
            velocity = upd
        t_now += stepper.tau
        path.z = z
        if new_ev is not None:
            ev = new_ev
            path.values.append(float(ev.value))
            path.times.append(t_now)
            path.state = ev.state
            _record_iterations(path, ev)
        if step + 1 in shots:
            path.snapshots.append((step + 1, t_now, z))
    path.step_size = stepper.tau
    return path


def _record_iterations(path: Path, ev: Evaluation) -> None:
    if ev.iterations is not None:
        path.iterations.append(ev.iterations)


class _Stepper:
    """One Euler step with the guard's halvings; holds tau (it only ever shrinks)."""

    def __init__(self, dyn: Dynamics, generator):
        self.dyn, self.generator, self.tau = dyn, generator, dyn.step_size
        self.halvings, self.warned = 0, False

    def propose(self, z: torch.Tensor, upd: torch.Tensor) -> torch.Tensor:
        dyn, d = self.dyn, self.dyn.feature_dim
        z_new = z.clone()
        z_new[:, dyn.moving] -= self.tau * upd[:, dyn.moving]
        if dyn.temperature > 0:
            noise = torch.randn(z.shape[0], d, generator=self.generator, dtype=z.dtype).to(z.device)
            z_new[:, :d] += math.sqrt(2 * self.tau * dyn.temperature) * noise
        if dyn.clamp is not None:
            z_new[:, :d].clamp_(dyn.clamp[0], dyn.clamp[1])
        return z_new

    def step(self, path: Path, z, ev: Evaluation, velocity, evaluate, step: int, need_eval: bool):
        """``(z_new, evaluation or None, update)``, or None when the guard gave up."""
        dyn = self.dyn
        while True:
            upd = ev.grad if velocity is None else velocity * dyn.momentum + ev.grad
            z_new = self.propose(z, upd)
            new_ev, finite, rises = None, bool(torch.isfinite(z_new).all()), False
            if need_eval and finite:
                new_ev = evaluate(z_new, path.state)
                finite = math.isfinite(float(new_ev.value)) and bool(torch.isfinite(new_ev.grad).all())
                slack = _SLACK * (abs(path.values[-1]) + abs(path.values[0])) + 1e-12
                rises = dyn.guard and dyn.monotone and float(new_ev.value) > path.values[-1] + slack
            if finite and not rises:
                return z_new, new_ev, upd
            if not self._halve(step, finite, velocity):
                return None

    def _halve(self, step: int, finite: bool, velocity) -> bool:
        what = "produced non-finite values" if not finite else "increased the objective"
        if not self.dyn.guard:
            raise FloatingPointError(
                f"the flow {what} at step {step} with guard=False; lower step_size or enable guard"
            )
        if self.halvings >= MAX_HALVINGS:
            warn_user(
                f"flow stopped at step {step}: it {what} after {self.halvings} step-size halvings "
                f"(step_size {self.tau:g}); returning the last accepted state", kind="guard-stopped")
            return False
        self.tau /= 2
        self.halvings += 1
        if velocity is not None:
            velocity.zero_()
        if not self.warned:
            warn_user(
                f"the flow {what} at step {step}: halving step_size to {self.tau:g} "
                "(pass a smaller step_size to avoid this)", kind="guard-halved")
            self.warned = True
        return True
