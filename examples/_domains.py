"""Two small image domains built on the fly, shared by the examples (no download, a few seconds anywhere)."""

import torch


def domain(n, shift, seed, noise=0.1):
    """Images (N, 1, 12, 12) in [0, 1] whose class sets a bar's row; ``shift`` moves and thickens the bar;
    ``noise`` is the amplitude of the uniform background noise.

    >>> x, y = domain(8, 1, seed=0)
    >>> tuple(x.shape), y.tolist()[:4], bool(x.min() >= 0 and x.max() <= 1)
    ((8, 1, 12, 12), [0, 1, 2, 3], True)
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = noise * torch.rand(n, 1, 12, 12, generator=g)
    for k in range(4):
        rows = slice(2 + 2 * k + shift, 3 + 2 * k + 2 * shift)
        x[y == k, :, rows, 2:10] += 0.8
    return x.clamp(0, 1), y
