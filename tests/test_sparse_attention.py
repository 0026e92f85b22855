"""Tests for dlarch_lib.sparse_attention: masks, banded attention against dense attention, the lookup task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlarch_lib import sparse_attention as sa
from dlarch_lib.attention import scaled_dot_product_attention


def qkv(T: int, d: int = 8, seed: int = 0, lead: tuple[int, ...] = (2, 3)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*lead, T, d, generator=g) for _ in range(3))


def test_local_window_mask_values():
    m = sa.local_window_mask(5, 1)
    assert m.shape == (5, 5) and m.dtype == torch.bool
    expected = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    assert torch.equal(sa.local_window_mask(5, 1, causal=True), expected.tril())
    assert torch.equal(sa.local_window_mask(5, 0), torch.eye(5, dtype=torch.bool))


@pytest.mark.parametrize("T, w", [(1, 0), (9, 2), (16, 15), (20, 7)])
def test_local_window_mask_counts(T, w):
    assert int(sa.local_window_mask(T, w).sum()) == T * (2 * w + 1) - w * (w + 1)
    assert sa.local_window_mask(T, T - 1).all()


def test_longformer_mask_rows_and_columns():
    m = sa.longformer_mask(10, 1, [0, 7])
    assert m[0].all() and m[:, 0].all() and m[7].all() and m[:, 7].all()
    assert not m[3, 5] and m[3, 4]
    assert torch.equal(sa.longformer_mask(10, 1, []), sa.local_window_mask(10, 1))


def test_mask_errors():
    with pytest.raises(ValueError, match="window must be >= 0"):
        sa.local_window_mask(4, -1)
    with pytest.raises(ValueError, match="T must be >= 1"):
        sa.local_window_mask(0, 1)
    with pytest.raises(ValueError, match="global_idx must lie in"):
        sa.longformer_mask(4, 1, [4])


@pytest.mark.parametrize("T, w, causal", [(12, 2, False), (12, 2, True), (7, 0, False), (33, 5, True), (1, 3, False)])
def test_sliding_window_matches_dense_masked(T, w, causal):
    q, k, v = qkv(T)
    out, band = sa.sliding_window_attention(q, k, v, w, causal=causal)
    ref, ref_w = scaled_dot_product_attention(q, k, v, sa.local_window_mask(T, w, causal=causal))
    assert out.shape == (2, 3, T, 8)
    W = min(w, T - 1) * (1 if causal else 2) + 1
    assert band.shape == (2, 3, T, W)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(sa.band_to_dense(band, w, causal=causal), ref_w)
    torch.testing.assert_close(band.sum(-1), torch.ones(2, 3, T))


@pytest.mark.parametrize("w", [15, 16, 100])
def test_wide_window_is_full_attention(w):
    q, k, v = qkv(16)
    out, _ = sa.sliding_window_attention(q, k, v, w)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out_c, _ = sa.sliding_window_attention(q, k, v, w, causal=True)
    torch.testing.assert_close(out_c, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sliding_window_gradients_match():
    q, k, v = (t.requires_grad_() for t in qkv(10, lead=(1,)))
    sa.sliding_window_attention(q, k, v, 2)[0].square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    scaled_dot_product_attention(q, k, v, sa.local_window_mask(10, 2))[0].square().sum().backward()
    for ours, ref in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours, ref)


def test_sliding_window_errors():
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="same leading dims"):
        sa.sliding_window_attention(q, k[..., :5, :], v, 2)
    with pytest.raises(ValueError, match="window must be >= 0"):
        sa.sliding_window_attention(q, k, v, -2)


@pytest.mark.parametrize(
    "T, w, g", [(12, 2, [0]), (12, 1, [0, 11, 5]), (9, 3, []), (8, 20, [3, 3]), (30, 4, torch.tensor([2, 17]))]
)
def test_longformer_matches_dense_masked(T, w, g):
    q, k, v = qkv(T, seed=1)
    ref, _ = scaled_dot_product_attention(q, k, v, sa.longformer_mask(T, w, g))
    torch.testing.assert_close(sa.longformer_attention(q, k, v, w, g), ref)


def test_longformer_errors():
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match="global_idx must lie in"):
        sa.longformer_attention(q, k, v, 1, [-1])


def test_band_to_dense_error():
    with pytest.raises(ValueError, match="band has width"):
        sa.band_to_dense(torch.zeros(5, 4), 2)


def test_make_lookup_task():
    x, y = sa.make_lookup_task(50, n_pairs=4, n_keys=6, n_values=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (50, 9) and y.shape == (50,)
    keys, values, query = x[:, :4], x[:, 4:8], x[:, 8]
    assert all(len(set(row.tolist())) == 4 for row in keys)  # distinct keys
    assert keys.max() < 6 and values.max() < 5
    slot = (keys == query[:, None]).int().argmax(1)
    assert torch.equal(values[torch.arange(50), slot], y)
    with pytest.raises(ValueError, match="cannot exceed n_keys"):
        sa.make_lookup_task(3, n_pairs=5, n_keys=4)


def test_lookup_model_shapes_and_modes():
    x, _ = sa.make_lookup_task(6, generator=torch.Generator().manual_seed(0))
    for mode in ("cross", "mean"):
        model = sa.LookupModel(d_model=16, n_heads=2, mode=mode)
        assert model(x).shape == (6, 16)
    assert model.mode == "mean"
    cross = sa.LookupModel(d_model=16, n_heads=2)
    cross(x)
    assert cross.last_weights is not None and cross.last_weights.shape == (6, 2, 1, 8)
    with pytest.raises(ValueError, match="mode must be"):
        sa.LookupModel(mode="sum")
    with pytest.raises(ValueError, match="x must be"):
        cross(x[:, :-1])


def test_lookup_model_ignores_memory_order():
    """Cross-attention over the memory is a set operation: permuting the pairs changes nothing."""
    x, _ = sa.make_lookup_task(4, generator=torch.Generator().manual_seed(1))
    model = sa.LookupModel(d_model=16, n_heads=2).eval()
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(2))
    x_perm = torch.cat([x[:, :8][:, perm], x[:, 8:16][:, perm], x[:, 16:]], dim=1)
    torch.testing.assert_close(model(x_perm), model(x))


@pytest.mark.parametrize("T, w, causal", [(12, 2, False), (13, 4, True), (5, 9, False), (1, 0, False), (100, 0, True)])
def test_score_count_matches_the_blocked_scores(T, w, causal):
    q, k, v = qkv(T, lead=(1,))
    scores, keep, _, _, _ = sa._blocked_scores(q, k, v, min(w, T - 1), causal)
    assert sa.sliding_window_score_count(T, w, causal) == scores.numel() == keep.numel()
    assert sa.sliding_window_score_count(4096, 32) == 3 * 4096 * 32  # about 3 T w, not T^2
    with pytest.raises(ValueError, match="window must be"):
        sa.sliding_window_score_count(4, -1)


# --- linear attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_equals_its_quadratic_form(causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 20, 8, generator=g, dtype=torch.float64) for _ in range(3))
    weights = sa.kernel_attention_weights(q, k, causal)
    torch.testing.assert_close(sa.linear_attention(q, k, v, causal, eps=0.0), weights @ v)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 20, dtype=torch.float64))
    if causal:
        assert (weights.triu(1) == 0).all()


def test_causal_linear_attention_is_a_recurrence():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 12, 5, generator=g, dtype=torch.float64) for _ in range(3))
    S, z, outs = torch.zeros(5, 5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), []
    for t in range(12):  # an RNN with a (d, d_v) state
        fk, fq = sa.elu_feature_map(k[0, t]), sa.elu_feature_map(q[0, t])
        S, z = S + torch.outer(fk, v[0, t]), z + fk
        outs.append(fq @ S / (fq @ z))
    torch.testing.assert_close(sa.linear_attention(q, k, v, causal=True, eps=0.0)[0], torch.stack(outs))


def test_linear_attention_cross_shapes_and_errors():
    q, k, v = torch.randn(2, 1, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 3)
    assert sa.linear_attention(q, k, v).shape == (2, 1, 3)
    with pytest.raises(ValueError, match="same leading dims"):
        sa.linear_attention(q, k, torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="as many queries as keys"):
        sa.linear_attention(q, k, v, causal=True)
    mha = sa.LinearMultiHeadAttention(8, 2)
    out, w = mha(torch.randn(2, 1, 8), torch.randn(2, 7, 8), return_weights=True)
    assert out.shape == (2, 1, 8) and w.shape == (2, 2, 1, 7)
    with pytest.raises(ValueError, match="no mask"):
        mha(torch.randn(2, 3, 8), mask=torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["dense", "local", "linear"])
def test_memory_reader_kinds(kind):
    x, _ = sa.make_lookup_task(4, n_pairs=6, n_keys=12, generator=torch.Generator().manual_seed(0))
    model = sa.MemoryReader(kind, n_keys=12, d_model=16, n_heads=2, window=2)
    logits, w = model(x, return_weights=True)
    assert logits.shape == (4, 16) and w.shape == (4, 2, 1, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 2, 1))
    if kind == "local":  # only the last two slots can be read
        assert (w[..., :4] == 0).all() and (w[..., 4:] > 0).all()
    else:
        assert (w > 0).all()


def test_memory_reader_errors():
    with pytest.raises(ValueError, match="kind"):
        sa.MemoryReader("sparse", n_keys=4)
    with pytest.raises(ValueError, match="window"):
        sa.MemoryReader("local", n_keys=4, window=0)
    with pytest.raises(ValueError, match="token ids"):
        sa.MemoryReader("dense", n_keys=4)(torch.zeros(2, 4, dtype=torch.long))
