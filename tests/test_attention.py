"""Tests for dlarch_lib.attention: equality with PyTorch's attention, masks, positions, GPT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.attention import (
    GPT,
    CachedLM,
    KVCache,
    MultiHeadAttention,
    TransformerBlock,
    causal_mask,
    decode_greedy,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positions,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def qkv(B=2, H=3, Tq=5, Tk=7, d=8):
    return torch.randn(B, H, Tq, d), torch.randn(B, H, Tk, d), torch.randn(B, H, Tk, d)


# --- scaled dot-product attention ---------------------------------------------------------------


def test_sdpa_matches_torch_without_mask():
    q, k, v = qkv()
    out, w = scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 5, 8) and w.shape == (2, 3, 5, 7)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5))


def test_sdpa_matches_torch_with_causal_mask():
    q, k, v = qkv(Tq=6, Tk=6)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.all(w.triu(1) == 0)


def test_sdpa_matches_torch_with_padding_mask_and_fully_masked_row():
    q, k, v = qkv()
    mask = padding_mask(torch.tensor([7, 3]), 7)[:, None, None, :]  # (B, 1, 1, T_k)
    out, w = scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.all(w[1, ..., 3:] == 0)
    full = torch.ones(5, 7, dtype=torch.bool)
    full[2] = False  # query 2 sees nothing: zero weights and zero output, like PyTorch
    out, w = scaled_dot_product_attention(q, k, v, full)
    assert torch.all(w[..., 2, :] == 0) and not torch.isnan(out).any()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=full))


def test_sdpa_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="last dim d_k"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="same length T_k"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match="bool tensor"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 7))
    with pytest.raises(ValueError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 dims"):
        scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)


def test_dot_product_variance_is_d():
    d = 64
    q, k = torch.randn(20000, d), torch.randn(20000, d)
    var = (q * k).sum(-1).var().item()
    assert abs(var / d - 1) < 0.05


# --- masks ----------------------------------------------------------------------------------------


def test_causal_mask():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m[3].all() and not m[0, 1:].any()
    with pytest.raises(ValueError, match="T must be"):
        causal_mask(0)


def test_padding_mask():
    m = padding_mask(torch.tensor([2, 0, 4]), 4)
    assert m.tolist() == [[True, True, False, False], [False] * 4, [True] * 4]
    with pytest.raises(ValueError, match="1-D"):
        padding_mask(torch.tensor([[1]]), 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 4\]"):
        padding_mask(torch.tensor([5]), 4)


# --- multi-head attention -----------------------------------------------------------------------


def shared_pair(d=16, h=4, bias=True):
    ref = nn.MultiheadAttention(d, h, bias=bias, batch_first=True).eval()
    with torch.no_grad():  # make the biases non-zero so they are really compared
        if bias:
            ref.in_proj_bias.normal_()
            ref.out_proj.bias.normal_()
    ours = MultiHeadAttention(d, h, bias=bias).load_from_torch(ref).eval()
    return ours, ref


@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_matches_torch(bias):
    ours, ref = shared_pair(bias=bias)
    x = torch.randn(3, 6, 16)
    out, w = ours(x, return_weights=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_mha_causal_and_padding_masks_match_torch():
    ours, ref = shared_pair()
    x = torch.randn(2, 6, 16)
    causal = causal_mask(6)
    torch.testing.assert_close(ours(x, mask=causal), ref(x, x, x, attn_mask=~causal)[0])
    keep = padding_mask(torch.tensor([6, 4]), 6)  # (B, T)
    torch.testing.assert_close(ours(x, mask=keep[:, None, :]), ref(x, x, x, key_padding_mask=~keep)[0])


def test_mha_cross_attention_matches_torch():
    ours, ref = shared_pair()
    q, mem = torch.randn(2, 3, 16), torch.randn(2, 9, 16)
    out = ours(q, mem)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, ref(q, mem, mem)[0])


def test_mha_is_permutation_equivariant():
    mha = MultiHeadAttention(16, 4).eval()
    x, perm = torch.randn(1, 7, 16), torch.randperm(7)
    torch.testing.assert_close(mha(x)[:, perm], mha(x[:, perm]))


def test_mha_errors():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(8, 2, dropout=1.5)
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"query must be \(B, T, 8\)"):
        mha(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="size mismatch"):
        mha.load_from_torch(nn.MultiheadAttention(8, 4))
    with pytest.raises(ValueError, match="bias settings"):
        mha.load_from_torch(nn.MultiheadAttention(8, 2, bias=False))


# --- positions, block, GPT ----------------------------------------------------------------------


def test_sinusoidal_positions():
    pe = sinusoidal_positions(50, 16)
    assert pe.shape == (50, 16)
    assert pe[0, 0::2].abs().max() == 0 and torch.all(pe[0, 1::2] == 1)
    torch.testing.assert_close(pe[:, 0], torch.sin(torch.arange(50.0)))
    torch.testing.assert_close(pe.norm(dim=1), torch.full((50,), math.sqrt(8)))
    with pytest.raises(ValueError, match="even d"):
        sinusoidal_positions(10, 7)


def test_transformer_block_shapes_and_causality():
    block = TransformerBlock(16, 4).eval()
    x = torch.randn(2, 6, 16)
    y = block(x, causal_mask(6))
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)  # changing the future leaves the past unchanged
    torch.testing.assert_close(block(x2, causal_mask(6))[:, :4], y[:, :4])
    with pytest.raises(ValueError, match="mlp_ratio"):
        TransformerBlock(16, 4, mlp_ratio=0)


def test_gpt_forward_and_errors():
    gpt = GPT(vocab_size=11, context=8, d_model=16, n_heads=2, n_layers=2)
    idx = torch.randint(0, 11, (3, 8))
    assert gpt(idx).shape == (3, 8, 11)
    assert gpt.head.weight is gpt.tok.weight
    with pytest.raises(ValueError, match="exceeds the context"):
        gpt(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gpt(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="must be >= 1"):
        GPT(0, 8, 16, 2, 2)


def test_gpt_learns_a_repeating_sequence():
    gpt = GPT(vocab_size=5, context=10, d_model=16, n_heads=2, n_layers=1)
    seq = torch.arange(5).repeat(4)[None]  # 0 1 2 3 4 0 1 ...
    opt = torch.optim.AdamW(gpt.parameters(), lr=3e-2)
    for _ in range(30):
        x, y = seq[:, :10], seq[:, 1:11]
        loss = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# --- key/value cache ----------------------------------------------------------------------------


def test_cached_pieces_equal_one_causal_pass():
    gpt = GPT(vocab_size=13, context=12, d_model=16, n_heads=4, n_layers=3).eval()
    idx = torch.randint(0, 13, (2, 12))
    cache = gpt.new_cache()
    pieces = [gpt.forward_cached(idx[:, a:b], cache) for a, b in ((0, 5), (5, 6), (6, 9), (9, 12))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), gpt(idx))  # prompt in one call, then single tokens
    assert cache.length == 12 and cache.numel() == 2 * 3 * 2 * 12 * 16  # 2 L B T d
    assert cache.nbytes() == 4 * cache.numel()
    k0 = cache.keys[0]
    assert k0 is not None and k0.shape == (2, 4, 12, 4)  # (B, h, T, d_k)


def test_mha_forward_cached_matches_causal_forward():
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(3, 7, 16)
    cache = KVCache(1)
    out = torch.cat([mha.forward_cached(x[:, :3], cache, 0), mha.forward_cached(x[:, 3:], cache, 0)], dim=1)
    torch.testing.assert_close(out, mha(x, mask=causal_mask(7)))


def test_greedy_decoding_with_cache_equals_recomputation():
    gpt = GPT(vocab_size=9, context=20, d_model=16, n_heads=2, n_layers=2)
    prompt = torch.randint(0, 9, (3, 4))
    ids_full, logits_full = decode_greedy(gpt, prompt, 16, use_cache=False)
    ids_kv, logits_kv = decode_greedy(gpt, prompt, 16, use_cache=True)
    assert ids_full.shape == (3, 20) and logits_full.shape == (3, 16, 9)
    assert torch.equal(ids_kv, ids_full)
    torch.testing.assert_close(logits_kv, logits_full)
    assert not torch.allclose(logits_full[:, 0], logits_full[:, -1])  # the steps saw different contexts
    assert gpt.training  # its mode is given back


def test_cached_lm_serves_the_book_sampler():
    from dlarch_lib.rnn import generate

    gpt = GPT(vocab_size=9, context=20, d_model=16, n_heads=2, n_layers=2)
    prompt = torch.randint(0, 9, (2, 3))
    greedy = generate(CachedLM(gpt), prompt, 10, temperature=0)
    assert torch.equal(greedy, generate(gpt, prompt, 10, temperature=0))
    logits, cache = CachedLM(gpt)(prompt)
    assert logits.shape == (2, 3, 9) and cache.length == 3
    with pytest.raises(ValueError, match="new_cache"):
        CachedLM(nn.Linear(3, 3))


def test_cache_cropped_rolls_back():
    gpt = GPT(vocab_size=9, context=10, d_model=8, n_heads=2, n_layers=2).eval()
    idx = torch.randint(0, 9, (1, 10))
    cache = gpt.new_cache()
    gpt.forward_cached(idx[:, :6], cache)
    early = cache.cropped(4)
    assert early.length == 4 and cache.length == 6
    torch.testing.assert_close(gpt.forward_cached(idx[:, 4:10], early), gpt(idx)[:, 4:])
    assert cache.length == 6  # the original is untouched
    assert cache.cropped(0).numel() == 0
    with pytest.raises(ValueError, match="length must be in"):
        cache.cropped(7)


def test_attention_maps():
    gpt = GPT(vocab_size=9, context=8, d_model=16, n_heads=4, n_layers=2).eval()
    idx = torch.randint(0, 9, (3, 8))
    maps = gpt.attention_maps(idx)
    assert maps.shape == (2, 3, 4, 8, 8)  # (L, B, h, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 4, 8))
    assert torch.all(maps.triu(1) == 0)
    x = gpt.embed_tokens(idx)
    _, w0 = gpt.blocks[0].attn(gpt.blocks[0].ln1(x), mask=causal_mask(8), return_weights=True)
    torch.testing.assert_close(maps[0], w0)


def test_cache_errors():
    with pytest.raises(ValueError, match="n_layers"):
        KVCache(0)
    cache = KVCache(2)
    with pytest.raises(ValueError, match="layer must be in"):
        cache.append(2, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\(B, h, T_new, d_k\)"):
        cache.append(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5))
    cache.append(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="cannot append"):
        cache.append(0, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))  # another batch size
    gpt = GPT(vocab_size=9, context=6, d_model=8, n_heads=2, n_layers=2)
    cache = gpt.new_cache()
    gpt.forward_cached(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceed the context 6"):
        gpt.forward_cached(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="the cache has 3 layers"):
        gpt.forward_cached(torch.zeros(1, 1, dtype=torch.long), KVCache(3))
    with pytest.raises(ValueError, match=r"\(B, T_new\)"):
        gpt.forward_cached(torch.zeros(1, 0, dtype=torch.long), gpt.new_cache())
    with pytest.raises(ValueError, match=r"x must be \(B, T_new, 8\)"):
        gpt.blocks[0].attn.forward_cached(torch.zeros(1, 2, 4), gpt.new_cache(), 0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        decode_greedy(gpt, torch.zeros(1, 2, dtype=torch.long), 0, use_cache=True)
    with pytest.raises(ValueError, match="prompt must be"):
        decode_greedy(gpt, torch.zeros(2, dtype=torch.long), 3, use_cache=True)
