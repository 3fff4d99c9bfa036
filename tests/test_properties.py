"""Property-based tests (hypothesis) over shapes, dtypes and labels: never NaN, never mutated, structure kept."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowaug
from flowaug import ClassStats, FlowTransform, LabelEmbedding

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def problems(draw):
    n = draw(st.integers(2, 24))
    m = draw(st.integers(2, 24))
    shape = draw(st.sampled_from([(3,), (1, 4, 4), (2, 3, 2), (7,)]))
    classes = draw(st.integers(2, 4))
    m = max(m, classes)  # every reference class present (class-wise flows need them)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x = torch.randn(n, *shape, generator=g) * scale
    ref = torch.randn(m, *shape, generator=g) * scale + draw(st.floats(-2, 2)) * scale
    y = torch.randint(0, classes, (n,), generator=g)
    ry = torch.arange(m) % classes
    return x, y, ref, ry


def bits(t):
    return t.flatten().view(torch.uint8) if t.is_floating_point() else t


@SETTINGS
@given(problems(), st.sampled_from(DTYPES), st.sampled_from(["sinkhorn", "mmd", "energy", "sliced"]),
       st.sampled_from(["fixed", "flow"]), st.booleans())
def test_flow_never_nan_never_mutates_keeps_structure(problem, dtype, objective, labels, classwise):
    x, y, ref, ry = problem
    x = x.to(dtype)
    before = [bits(t).clone() for t in (x, y, ref, ry)]
    out = flowaug.flow(x, y, (ref, ry), objective=objective, labels=labels, steps=2, step_size=0.5,
                       class_map="same" if classwise else None, generator=torch.Generator().manual_seed(0))
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and out.x.device == x.device
    assert torch.isfinite(out.x.float()).all()
    assert out.objective is not None and torch.isfinite(out.objective).all()
    assert out.labels.shape == y.shape
    if labels == "flow":
        assert torch.allclose(out.soft_labels.sum(1), torch.ones(len(x)), atol=1e-4)
        assert int(out.labels.max()) < int(ry.max()) + 1
    else:
        assert torch.equal(out.labels, y)
    assert all(torch.equal(a, bits(b)) for a, b in zip(before, (x, y, ref, ry)))


@SETTINGS
@given(problems(), st.sampled_from(DTYPES + [torch.uint8]), st.sampled_from(["tuple", "dict"]),
       st.floats(0, 1), st.booleans())
def test_flow_transform_structure_dtype_and_purity(problem, dtype, container, strength, soft):
    x, y, ref, ry = problem
    x = x.sigmoid()  # image-like values in [0, 1]
    ref = ref.sigmoid()
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    t = FlowTransform((ref, ry), steps=2, strength=strength, labels="flow", soft=soft, seed=0)
    before = [bits(v).clone() for v in (x, y)]
    batch = (x, y) if container == "tuple" else {"image": x, "labels": y, "id": "kept"}
    out = t(batch)
    ox, oy = (out[0], out[1]) if container == "tuple" else (out["image"], out["labels"])
    assert type(out) is type(batch)
    assert ox.shape == x.shape and ox.dtype == x.dtype
    if not ox.dtype == torch.uint8:
        assert torch.isfinite(ox.float()).all()
    if strength == 0:  # the identity; soft labels keep their (B, K') shape, one-hot of the batch's classes
        assert ox is x and (torch.equal(oy.argmax(1), y) and oy.shape == (len(x), int(ry.max()) + 1) if soft
                            else oy is y)
    else:
        assert oy.shape == ((len(x), int(ry.max()) + 1) if soft else y.shape)
    assert all(torch.equal(a, bits(b)) for a, b in zip(before, (x, y)))


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**16))
def test_label_embedding_is_an_isometry(k_src, k_ref, dim, seed):
    """||e_k - e_l||^2 equals the W2^2 between diagonal class Gaussians, for every source/reference pair."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(8 * k_src, dim, generator=g), torch.arange(8 * k_src) % k_src
    xr, yr = torch.randn(8 * k_ref, dim, generator=g) * 2 + 1, torch.arange(8 * k_ref) % k_ref
    s, r = ClassStats().update(xs, ys), ClassStats().update(xr, yr)
    emb = LabelEmbedding.fit(s, r)
    direct = torch.cdist(s.means, r.means).square() + torch.cdist(s.stds, r.stds).square()
    assert emb.dim <= max(1, k_src + k_ref - 1)
    assert torch.allclose(emb.class_costs(), direct, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(st.integers(1, 5), st.integers(2, 40), st.integers(0, 2**16))
def test_class_stats_streaming_equals_one_pass(batches, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * batches, 3, generator=g) * 10 + 1000  # a large offset: a precision trap
    y = torch.randint(0, 3, (n * batches,), generator=g)
    whole = ClassStats().update(x, y)
    streamed = ClassStats()
    for chunk_x, chunk_y in zip(x.chunk(batches), y.chunk(batches)):
        streamed.update(chunk_x, chunk_y)
    assert torch.allclose(streamed.means, whole.means, rtol=1e-12, atol=1e-9)
    assert torch.allclose(streamed.stds, whole.stds, rtol=1e-9, atol=1e-9)
    for c in range(3):
        if int((y == c).sum()) > 1:
            assert torch.allclose(whole.stds[c], x[y == c].double().std(0, unbiased=False), atol=1e-8)


@pytest.mark.parametrize("single", ["pooled", "zero"])
def test_merge_equals_update(single):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randint(0, 5, (50,), generator=g)
    a = ClassStats(single_sample=single).update(x[:20], y[:20])
    b = ClassStats(single_sample=single).update(x[20:], y[20:])
    whole = ClassStats(single_sample=single).update(x, y)
    merged = a.merge(b)
    assert torch.allclose(merged.means, whole.means) and torch.allclose(merged.stds, whole.stds)
