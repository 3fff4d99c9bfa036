"""Differentiable Siamese augmentation (DSA, Zhao & Bilen, ICML 2021), the augmentation of DC/DSA/DM.

An augmentation's random parameters are drawn once (:meth:`SiameseAugment.draw`) and applied, by
differentiable tensor operations, to any number of batches (:meth:`SiameseAugment.apply`): the real and the
synthetic images of a condensation step see the *same* transformation, and gradients flow back to the
synthetic pixels. As in DSA's default ``"S"`` mode, one strategy is picked per draw among those named in
``strategy`` (``"color_crop_cutout_flip_scale_rotate"``; MNIST-like digits drop ``flip``). The parameter
ranges are DSA's: scale 1.2, rotation 15 degrees, translation 1/8 of the side, cutout 1/2 of the side,
brightness 1.0, saturation 2.0, contrast 0.5.

torchvision's v2 transforms draw their parameters inside each call and are not differentiable with respect
to every parameter here (cutout, integer translation): this module keeps the parameters as data so that one
draw serves two batches, which is what "Siamese" means.

Example:
    >>> import torch
    >>> aug = SiameseAugment("scale_rotate")
    >>> g = torch.Generator().manual_seed(0)
    >>> params = aug.draw(generator=g)              # one draw ...
    >>> a, b = torch.rand(4, 1, 8, 8), torch.rand(6, 1, 8, 8)
    >>> aug.apply(a, params).shape, aug.apply(b, params).shape   # ... applied to two batches
    (torch.Size([4, 1, 8, 8]), torch.Size([6, 1, 8, 8]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_int, describe

__all__ = ["STRATEGIES", "SiameseAugment"]

STRATEGIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
SCALE, ROTATE, CROP, CUTOUT = 1.2, 15.0, 0.125, 0.5
BRIGHTNESS, SATURATION, CONTRAST = 1.0, 2.0, 0.5


class SiameseAugment:
    """DSA with parameters drawn apart from their application (see the module docstring).

    Args:
        strategy: strategies joined by ``_``, each one of :data:`STRATEGIES`.
    """

    def __init__(self, strategy: str = "color_crop_cutout_scale_rotate"):
        if not isinstance(strategy, str) or not strategy:
            raise TypeError(f"strategy must be a string like 'color_crop_cutout_scale_rotate', got {describe(strategy)}")
        self.strategies = tuple(check_choice("strategy part", s, STRATEGIES) for s in strategy.split("_"))
        self.strategy = strategy

    def draw(self, n: int = 1, generator: torch.Generator | None = None) -> dict:
        """Parameters of one augmentation: ``n = 1`` for one transformation of every image (Siamese), or one
        per image of a batch of ``n``."""
        n = check_int("n", n, minimum=1)
        pick = self.strategies[int(torch.randint(len(self.strategies), (), generator=generator))]

        def rand(*shape):
            return torch.rand(n, *shape, generator=generator)

        if pick == "color":
            return {"kind": pick, "brightness": (rand() - 0.5) * BRIGHTNESS, "saturation": rand() * SATURATION,
                    "contrast": rand() + CONTRAST}
        if pick == "cutout":
            return {"kind": pick, "center": rand(2)}
        if pick == "flip":
            return {"kind": pick, "flip": rand() < 0.5}
        if pick == "scale":
            lo = 1 / SCALE
            return {"kind": pick, "scale": rand(2) * (SCALE - lo) + lo}
        if pick == "rotate":
            return {"kind": pick, "angle": (rand() - 0.5) * 2 * math.radians(ROTATE)}
        return {"kind": pick, "shift": rand(2) * 2 - 1}  # crop: translation in units of CROP x side

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """``x`` (B, C, H, W) augmented with ``params`` (from :meth:`draw` with n = 1 or n = B)."""
        if x.ndim != 4:
            raise ValueError(f"x must be images (B, C, H, W), got shape {tuple(x.shape)}")
        kind = params["kind"]
        p = {k: v.to(x.device, x.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in params.items()}
        if kind == "color":
            x = x + p["brightness"].view(-1, 1, 1, 1)
            mean = x.mean(1, keepdim=True)
            x = (x - mean) * p["saturation"].view(-1, 1, 1, 1) + mean
            mean = x.mean((1, 2, 3), keepdim=True)
            return (x - mean) * p["contrast"].view(-1, 1, 1, 1) + mean
        if kind == "cutout":
            return x * _cutout_mask(x, p["center"])
        if kind == "flip":
            return torch.where(p["flip"].to(x.device).view(-1, 1, 1, 1), x.flip(3), x)
        return _affine(x, _theta(kind, p, x))


def _theta(kind: str, p: dict, x: torch.Tensor) -> torch.Tensor:
    """(n, 2, 3) affine matrices of grid_sample (normalised coordinates, align_corners=True)."""
    n = next(v.shape[0] for k, v in p.items() if k != "kind")
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    if kind == "scale":
        theta[:, 0, 0], theta[:, 1, 1] = p["scale"][:, 0], p["scale"][:, 1]
    elif kind == "rotate":
        c, s = torch.cos(p["angle"]), torch.sin(p["angle"])
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = c, -s, s, c
    else:  # crop: a translation by a whole number of pixels, up to CROP x side (zero padding)
        h, w = x.shape[-2:]
        pixels = torch.round(p["shift"] * torch.tensor([w * CROP, h * CROP], dtype=x.dtype, device=x.device))
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2] = 2 * pixels[:, 0] / max(w - 1, 1)
        theta[:, 1, 2] = 2 * pixels[:, 1] / max(h - 1, 1)
    return theta


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.expand(x.shape[0], 2, 3) if theta.shape[0] == 1 else theta
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _cutout_mask(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) masks that zero a square of CUTOUT x side around each centre."""
    h, w = x.shape[-2:]
    ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
    cy = (center[:, 0] * (h + 1 - ch % 2)).long()  # DSA's offsets: the square may leave the image
    cx = (center[:, 1] * (w + 1 - cw % 2)).long()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    inside_r = (rows >= (cy - ch // 2)[:, None]) & (rows < (cy - ch // 2 + ch)[:, None])  # (n, H)
    inside_c = (cols >= (cx - cw // 2)[:, None]) & (cols < (cx - cw // 2 + cw)[:, None])  # (n, W)
    cut = inside_r[:, :, None] & inside_c[:, None, :]
    return (~cut).to(x.dtype)[:, None]
