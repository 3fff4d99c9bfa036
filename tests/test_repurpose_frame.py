"""benchmarks/repurpose.py's mnist_frame: USPS digits put in MNIST's frame (20 x 20 box, 28 x 28 field, centre of
mass on pixel 14 by a whole-pixel shift)."""

from __future__ import annotations

import torch

from benchmarks.repurpose import mnist_frame


def _com(x):
    pos = torch.arange(x.shape[-1], dtype=torch.float32) + 0.5
    m = x.sum((-1, -2))
    return (x.sum(-1) * pos).sum(-1) / m, (x.sum(-2) * pos).sum(-1) / m


def _digit(h=20, w=12, size=28, top=4, left=8, seed=0):
    """A random 'digit' whose ink box is exactly h x w, placed at (top, left) in a size x size field."""
    g = torch.Generator().manual_seed(seed)
    ink = torch.rand(h, w, generator=g)  # every pixel > 0, so the ink box is the whole h x w block
    x = torch.zeros(size, size)
    x[top:top + h, left:left + w] = ink
    return x


def test_a_digit_already_in_mnist_frame_is_unchanged():
    x = _digit()
    cy, cx = _com(x)
    # shift it by whole pixels so its centre of mass is within half a pixel of 14.5, as MNIST's are
    x = torch.roll(x, (int(torch.round(14.5 - cy)), int(torch.round(14.5 - cx))), (0, 1))
    out = mnist_frame(x[None])
    assert out.shape == (1, 1, 28, 28)
    torch.testing.assert_close(out[0, 0], x)


def test_whole_pixel_translations_do_not_matter():
    x = _digit(top=2, left=1)
    moved = torch.roll(x, (5, 9), (0, 1))  # still inside the field
    torch.testing.assert_close(mnist_frame(x[None]), mnist_frame(moved[None]))


def test_usps_like_digits_fill_a_20_pixel_box_centred_by_mass():
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(8, 16, 16)
    x[:, :, 3:13] = torch.rand(8, 16, 10, generator=g)  # 16 tall, 10 wide
    out = mnist_frame((255 * x).round().to(torch.uint8))
    assert out.shape == (8, 1, 28, 28) and out.min() >= 0 and out.max() <= 1
    cy, cx = _com(out[:, 0])
    assert ((cy - 14.5).abs() <= 0.5 + 1e-4).all() and ((cx - 14.5).abs() <= 0.5 + 1e-4).all()
    # 16 rows scaled by 20 / 16 fill 20 rows; bilinear upsampling adds a fringe one pixel wide on each side,
    # weighing at most 0.1 (the output pixel centre lies 0.4 input pixels outside the box)
    rows = (out[:, 0] > 0).any(2).sum(1)
    assert ((rows >= 20) & (rows <= 22)).all()
    assert ((out[:, 0] > 0.1 + 1e-6).any(2).sum(1) <= 20).all()


def test_input_forms_agree_and_empty_images_stay_empty():
    x = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    x[1] = 0
    a = mnist_frame(x)
    torch.testing.assert_close(a, mnist_frame(x.float() / 255))
    torch.testing.assert_close(a, mnist_frame(x[:, None]))
    assert a[1].abs().sum() == 0
