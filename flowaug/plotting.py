"""Pictures of flows: image grids along the flow, objective curves, 2-D scatter animations.

matplotlib is imported inside each function with the non-interactive Agg backend, so importing flowaug
never touches a display. Every function writes its file atomically (temporary file, then rename) and
returns the path.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ._io import atomic_path

__all__ = ["animate_2d", "image_grid", "objective_curve", "save_atomic"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_atomic(fig, path: str, **kwargs) -> str:
    """``fig.savefig`` to a temporary file in the target folder, then rename."""
    with atomic_path(path, suffix=os.path.splitext(path)[1] or ".png") as tmp:
        fig.savefig(tmp, **kwargs)
    return path


def _as_image(t: torch.Tensor):
    t = t.detach().float().cpu()
    if t.ndim == 3 and t.shape[0] in (1, 3):
        t = t[0] if t.shape[0] == 1 else t.permute(1, 2, 0)
    return t.clamp(0, 1).numpy() if t.ndim == 3 else t.numpy()


def image_grid(rows: Sequence[torch.Tensor], path: str, *, row_labels: Sequence[str] | None = None,
               columns: int = 12, title: str | None = None, cmap: str = "gray",
               column_labels: Sequence[str] | None = None) -> str:
    """A grid whose rows are batches of images (e.g. snapshots along a flow, then the reference).

    Args:
        rows: each (N, C, H, W) or (N, H, W); the first ``columns`` images of each are drawn.
        row_labels: text at the left of each row (e.g. ``"t = 0.5"``).
        column_labels: text above each column (e.g. class names).
    """
    plt = _plt()
    n_rows = len(rows)
    cols = min(columns, min(len(r) for r in rows))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 0.9 + (1.2 if row_labels else 0), n_rows * 0.95),
                             squeeze=False)
    for r, batch in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(_as_image(batch[c]), cmap=cmap, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        if row_labels:
            axes[r][0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=9)
    for c, text in enumerate(list(column_labels or [])[:cols]):
        axes[0][c].set_title(text, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = save_atomic(fig, path, dpi=100)
    plt.close(fig)
    return out


def objective_curve(curves: dict, path: str, *, xlabel: str = "flow time", ylabel: str = "objective",
                    logy: bool = False, title: str | None = None) -> str:
    """Lines ``name -> (x values, y values)`` on one axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (xs, ys) in curves.items():
        ax.plot(list(map(float, xs)), list(map(float, ys)), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = save_atomic(fig, path, dpi=120)
    plt.close(fig)
    return out


def animate_2d(trajectory: Sequence[torch.Tensor], path: str, *, reference: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, times: Sequence[float] | None = None, fps: int = 5) -> str:
    """A GIF of 2-D points moving along a flow (one frame per snapshot), over the reference in grey."""
    plt = _plt()
    from matplotlib import animation

    frames = [t.detach().float().cpu().reshape(len(t), -1)[:, :2] for t in trajectory]
    allp = torch.cat(frames + ([reference.float().cpu()[:, :2]] if reference is not None else []))
    lo, hi = allp.min(0).values, allp.max(0).values
    pad = 0.05 * (hi - lo).clamp_min(1e-6)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
    ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    if reference is not None:
        r = reference.float().cpu()
        ax.scatter(r[:, 0], r[:, 1], s=6, c="lightgrey")
    colors = None if labels is None else labels.cpu().numpy()
    scat = ax.scatter(frames[0][:, 0], frames[0][:, 1], s=8, c=colors, cmap="tab10")
    title = ax.set_title("")

    def update(i):
        scat.set_offsets(frames[i].numpy())
        title.set_text(f"t = {times[i]:.2f}" if times is not None else f"frame {i}")
        return scat, title

    anim = animation.FuncAnimation(fig, update, frames=len(frames), blit=False)
    try:
        with atomic_path(path, suffix=".gif") as tmp:
            anim.save(tmp, writer=animation.PillowWriter(fps=fps))
    finally:
        plt.close(fig)
    return path
