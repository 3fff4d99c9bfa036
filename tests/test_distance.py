"""flowaug.distance.otdd is symmetric in its two datasets (subsampling, automatic blur, label embedding)."""

from __future__ import annotations

import pytest
import torch

from flowaug.distance import auto_blur, otdd
from flowaug.labels import ClassStats, LabelEmbedding


def labeled(n, dim, classes, seed, shift=0.0, scale=1.0):
    """(n, dim) features with a class-dependent offset, (n,) labels in 0..classes-1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = scale * torch.randn(n, dim, generator=g) + shift
    x[:, 0] += 1.5 * y  # class structure along the first axis
    return x, y


@pytest.fixture(scope="module")
def pair():
    """Two labeled datasets of different sizes, spreads and class structures (3 and 5 classes)."""
    a, ya = labeled(90, 4, 3, seed=0)
    b, yb = labeled(70, 4, 5, seed=1, shift=1.0, scale=0.5)
    return a, ya, b, yb


@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("label_weight", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("max_samples", [None, 50])
def test_otdd_is_symmetric(pair, covariance, label_weight, max_samples):
    a, ya, b, yb = pair
    kw = {"covariance": covariance, "label_weight": label_weight, "max_samples": max_samples}
    ab, ba = otdd(a, ya, b, yb, **kw), otdd(b, yb, a, ya, **kw)
    assert ab > 0 and abs(ab - ba) < 1e-3 * ab


def test_a_dataset_sample_does_not_depend_on_its_position(pair):
    a, ya, _, _ = pair
    # both positions draw the same 40 of the 90 points, so a dataset is at distance 0 from itself
    assert abs(otdd(a, ya, a, ya, max_samples=40)) < 1e-6
    assert otdd(a, ya, a, ya, max_samples=40, seed=1) == pytest.approx(0.0, abs=1e-6)


def test_auto_blur_is_symmetric_and_used_by_default(pair):
    a, ya, b, yb = pair
    assert auto_blur(a, b) == pytest.approx(auto_blur(b, a), rel=1e-12)
    assert auto_blur(a, a) < auto_blur(a, b) < auto_blur(b, b) or auto_blur(b, b) < auto_blur(a, b) < auto_blur(a, a)
    assert otdd(a, ya, b, yb) == pytest.approx(otdd(a, ya, b, yb, blur=auto_blur(a, b)), rel=1e-12)


def test_label_embedding_distances_are_symmetric(pair):
    a, ya, b, yb = pair
    ab = LabelEmbedding.fit(ClassStats().update(a, ya), ClassStats().update(b, yb))
    ba = LabelEmbedding.fit(ClassStats().update(b, yb), ClassStats().update(a, ya))
    assert torch.allclose(ab.class_costs(), ba.class_costs().T, rtol=1e-10, atol=1e-10)
    assert torch.allclose(torch.cdist(ab.source, ab.source), torch.cdist(ba.reference, ba.reference), atol=1e-10)
    assert torch.allclose(torch.cdist(ab.reference, ab.reference), torch.cdist(ba.source, ba.source), atol=1e-10)


def test_bad_inputs_name_the_argument(pair):
    a, ya, b, yb = pair
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        otdd([[0.0]], ya, b, yb)
    with pytest.raises(ValueError, match="x2 must hold N >= 2 samples"):
        otdd(a, ya, b[:1], yb[:1])
    with pytest.raises(TypeError, match=r"y1 with shape \(90,\) must hold integer class ids"):
        otdd(a, ya.float(), b, yb)
    with pytest.raises(ValueError, match=r"y2 must have shape \(70,\) to match the batch"):
        otdd(a, ya, b, yb[:5])
    with pytest.raises(ValueError, match="x1 and x2 must have the same number of features, got 4 and 3"):
        otdd(a, ya, b[:, :3], yb)
    with pytest.raises(ValueError, match="max_samples must be an int >= 2"):
        otdd(a, ya, b, yb, max_samples=1)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        otdd(a, ya, b, yb, seed=-1)
