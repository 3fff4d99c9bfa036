"""Maximum mean discrepancy with Gaussian, Laplacian, energy and linear kernels.

    MMD^2(a, b) = <a, K_xx a> / 2 - <a, K_xy b> + <b, K_yy b> / 2          (geomloss's convention)

    N grad_{x_i} = sum_k a_k phi_ik (x_i - x_k) - sum_j b_j phi_ij (x_i - y_j),

with ``grad_x k(x, y) = phi(x, y) (x - y)``. Both sums come from one pass per pair and one matrix
product; ``<b, K_yy b>`` depends on the reference alone and is computed once, lazily (geomloss's
``SamplesLoss("gaussian")`` recomputes it at every call, which is most of the time at M = 4096).

The linear kernel ``k(x, y) = <x, y>`` (not in geomloss) gives ``MMD^2 = ||mean x - mean y||^2 / 2``: mean
matching, the loss of distribution matching (Zhao & Bilen 2023) in an embedding (:class:`~flowaug.Embedded`).
Its gradient ``mean x - mean y`` is the same for every point and costs O(N + M), so it has its own path.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_real
from .base import Context, Evaluation, Objective

__all__ = ["MMD", "KERNELS"]

KERNELS = ("gaussian", "laplacian", "energy", "linear")
_EXP_FLOOR = -80.0  # see flowaug.backends.dense: exp below -88 takes a slow path on CPU


class _Gaussian:
    """k = exp(-||x - y||^2 / (2 s^2)) = exp(-C / s^2), phi = -k / s^2."""

    name = "gaussian"

    def __init__(self, s: float):
        self.s2 = s * s

    def dense_terms(self, cost, scratch, w, y):
        k = torch.mul(cost, -1.0 / self.s2, out=scratch).clamp_(min=_EXP_FLOOR).exp_()  # (N, M)
        ksum = k @ w  # (N,)
        k.mul_(w[None, :])
        return ksum, ksum * (-1.0 / self.s2), (k @ y).mul_(-1.0 / self.s2)

    def keops_terms(self, c_ij, param):
        k = (-(c_ij * param(1.0 / self.s2))).exp()
        return k, k * param(-1.0 / self.s2)


class _Laplacian:
    """k = exp(-||x - y|| / s), phi = -k / (s ||x - y||) (0 at x = y)."""

    name = "laplacian"

    def __init__(self, s: float):
        self.s = s

    def dense_terms(self, cost, scratch, w, y):
        r = cost.mul_(2).sqrt_()  # (N, M), overwrites the cost
        k = torch.mul(r, -1.0 / self.s, out=scratch).clamp_(min=_EXP_FLOOR).exp_()
        ksum = k @ w
        inv = r.reciprocal_()
        inv.masked_fill_(torch.isinf(inv), 0.0)  # 1 / r, 0 where r = 0
        k.mul_(inv).mul_(w[None, :]).mul_(-1.0 / self.s)
        return ksum, k.sum(1), k @ y

    def keops_terms(self, c_ij, param):
        two_c = c_ij * param(2.0)
        k = (-(two_c.sqrt() * param(1.0 / self.s))).exp()
        return k, -(k * two_c.rsqrt()) * param(1.0 / self.s)  # KeOps' rsqrt(0) is 0


class _Energy:
    """k = -||x - y||, phi = -1 / ||x - y|| (0 at x = y)."""

    name = "energy"

    def dense_terms(self, cost, scratch, w, y):
        r = cost.mul_(2).sqrt_()
        ksum = -(r @ w)
        inv = torch.reciprocal(r, out=scratch)
        inv.masked_fill_(torch.isinf(inv), 0.0)  # 0 where r = 0
        inv.mul_(w[None, :]).neg_()
        return ksum, inv.sum(1), inv @ y

    def keops_terms(self, c_ij, param):
        two_c = c_ij * param(2.0)
        return -two_c.sqrt(), -two_c.rsqrt()


class MMD(Objective):
    """Squared MMD to the reference.

    Args:
        kernel: ``"gaussian"``, ``"laplacian"``, ``"energy"`` (the energy distance; no bandwidth) or
            ``"linear"`` (mean matching; no bandwidth, the value is already a squared length).
        bandwidth: kernel scale ``s`` in data units, or ``"auto"``: the median pairwise distance between
            reference points (the median heuristic). A fixed small bandwidth is a trap in high dimension:
            at d = 784, s = 0.5 on [0, 1] images gives kernel values (and gradients) of exactly 0.
        normalize: report ``s^2 MMD^2`` (energy: ``median distance x MMD^2``), a length squared like the
            Sinkhorn divergence, so that step sizes carry over between objectives and data scales (the
            Wasserstein gradient of a plain Gaussian MMD^2 has size about ``distance / s^2``). False gives
            geomloss's ``SamplesLoss`` values.

    Example:
        >>> import torch, flowaug
        >>> g = torch.Generator().manual_seed(0)
        >>> x, ref = torch.randn(64, 2, generator=g), torch.randn(80, 2, generator=g) + 1
        >>> out = flowaug.flow(x, reference=ref, objective=flowaug.MMD("energy"), steps=30, step_size=0.5)
        >>> bool(out.objective[-1] < 0.2 * out.objective[0])
        True
    """

    needs_reference = True

    def __init__(self, kernel: str = "gaussian", bandwidth="auto", *, normalize: bool = True):
        self.kernel = check_choice("kernel", kernel, KERNELS)
        if bandwidth != "auto":
            bandwidth = check_real("bandwidth", bandwidth, low=0, low_open=True)
        self.bandwidth = bandwidth
        self.normalize = bool(normalize)

    def factor(self, ctx: Context) -> float:
        """Unit of the objective: ``s^2`` (Gaussian, Laplacian) or the median distance (energy) when
        ``normalize``, so that Wasserstein gradients are lengths and ``step_size`` means what it means for
        Sinkhorn (tau = 1 moves a point by about its distance to the reference) at any data scale."""
        if not self.normalize or self.kernel == "linear":
            return 1.0
        return ctx.median_distance() if self.kernel == "energy" else self.scale(ctx) ** 2

    def scale(self, ctx: Context) -> float:
        return ctx.median_distance() if self.bandwidth == "auto" else self.bandwidth

    def _kernel(self, ctx):
        if self.kernel == "energy":
            return _Energy()
        s = self.scale(ctx)
        return _Gaussian(s) if self.kernel == "gaussian" else _Laplacian(s)

    def evaluate(self, z, ctx, state=None):
        if self.kernel == "linear":
            return self._linear(z, ctx)
        kernel = self._kernel(ctx)
        n = z.shape[0]
        a = z.new_full((n,), 1.0 / n)
        b = ctx.ref_weights_log(z).exp()
        x_half = (z * z).sum(1).mul_(0.5)
        k_xx, p_xx, py_xx = ctx.pair(z, z, x_half=x_half, tag="xx").kernel_terms(kernel, a)
        k_xy, p_xy, py_xy = ctx.pair(z, x_half=x_half, tag="xy").kernel_terms(kernel, b)
        grad = z * (p_xx - p_xy)[:, None] - py_xx + py_xy  # (N, D)
        per_point = 0.5 * k_xx - k_xy  # (N,)
        unit = self.factor(ctx)
        return Evaluation((a @ per_point) * unit, grad.mul_(unit))

    @staticmethod
    def _linear(z, ctx) -> Evaluation:
        """``<mx, mx> / 2 - <mx, my>`` (the constant ``<my, my> / 2`` apart); ``N grad_i = mx - my``."""
        mx = z.mean(0)  # (D,)
        my = ctx.ref_weights_log(z).exp() @ ctx.z_ref  # (D,)
        value = 0.5 * (mx @ mx) - mx @ my
        return Evaluation(value, (mx - my).expand_as(z).clone())

    def constant(self, ctx):
        if self.kernel == "linear":
            my = ctx.ref_weights_log(ctx.z_ref).exp() @ ctx.z_ref
            return 0.5 * float(my @ my)
        key = ("mmd.self", self.kernel, self.scale(ctx) if self.kernel != "energy" else None)
        cacheable = ctx.ref_subset is None
        if cacheable and key in ctx.cache:
            return ctx.cache[key]
        y = ctx.z_ref
        b = ctx.ref_weights_log(y).exp()
        k_yy, _, _ = ctx.pair(y, y, x_half=ctx.ref_half, tag="yy").kernel_terms(self._kernel(ctx), b)
        value = 0.5 * float(b @ k_yy) * self.factor(ctx)
        if cacheable:
            ctx.cache[key] = value
        return value
