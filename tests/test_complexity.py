"""Tests for dlarch_lib.complexity: closed forms against real modules and the flop counter."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from dlarch_lib import attention, rnn
from dlarch_lib import complexity as cx
from dlarch_lib.core.measure import count_parameters, forward_flops
from dlarch_lib.modular import CNNConfig, MLPConfig, build_model


@pytest.mark.parametrize("d_in,d_out,bias", [(3, 5, True), (7, 2, False), (1, 1, True)])
def test_linear_params_and_flops(d_in, d_out, bias):
    layer = nn.Linear(d_in, d_out, bias=bias)
    assert cx.linear_params(d_in, d_out, bias) == count_parameters(layer)
    assert cx.linear_flops(d_in, d_out, tokens=6) == forward_flops(layer, torch.randn(2, 3, d_in))


def test_conv2d_params_and_flops_random_configs():
    rng = random.Random(0)
    for _ in range(25):
        g = rng.choice([1, 2, 4])
        c_in, c_out = g * rng.randint(1, 3), g * rng.randint(1, 3)
        k, s, p, d = (rng.randint(1, 4), rng.randint(1, 3)), rng.randint(1, 3), rng.randint(0, 2), rng.randint(1, 2)
        size = (d * (k[0] - 1) + 1 + rng.randint(0, 6), d * (k[1] - 1) + 1 + rng.randint(0, 6))
        bias = rng.random() < 0.5
        conv = nn.Conv2d(c_in, c_out, k, s, p, d, groups=g, bias=bias)
        assert cx.conv2d_params(c_in, c_out, k, g, bias) == count_parameters(conv)
        flops = forward_flops(conv, torch.randn(2, c_in, *size))
        assert cx.conv2d_flops(c_in, c_out, size, k, s, p, d, g, batch=2) == flops


def test_conv_known_case():
    # 3x3, 8 -> 16 channels, 10x10 input, same padding: 2 * 16 * 100 * 8 * 9 FLOPs
    assert cx.conv2d_flops(8, 16, 10, 3, padding=1) == 2 * 16 * 100 * 72
    assert cx.conv2d_params(8, 8, 3, groups=8, bias=False) == 72  # depthwise


def test_seed_formula_overcounts_groups_and_misses_batchnorm():
    assert cx.seed_conv_params([(3, 3, 8, 8)]) == 8 * 8 * 9 + 8
    assert cx.seed_conv_params([(3, 3, 8, 8)]) != cx.conv2d_params(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match="layer 0"):
        cx.seed_conv_params([(3, 3, 8)])


@pytest.mark.parametrize("T,T_k,d,h", [(5, 5, 16, 4), (3, 7, 12, 3), (1, 1, 8, 8)])
def test_mha_against_module_and_counter(T, T_k, d, h):
    mha = attention.MultiHeadAttention(d, h)
    assert cx.mha_params(d) == count_parameters(mha)
    assert cx.mha_params(d) == count_parameters(nn.MultiheadAttention(d, h))
    q, kv = torch.randn(2, T, d), torch.randn(2, T_k, d)
    terms = cx.mha_flops(T, d, h, T_k=T_k, batch=2)
    counter = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        mha(q, kv)
    assert terms["total"] == counter.get_total_flops()
    assert terms["scores"] == terms["mix"] == 2 * 2 * T * T_k * d
    assert cx.mha_flops(T, d, 1, T_k=T_k) == cx.mha_flops(T, d, h, T_k=T_k)  # heads cancel


@pytest.mark.parametrize("d,h,layers", [(5, 6, 1), (3, 4, 2), (8, 2, 3)])
def test_lstm_params_and_flops(d, h, layers):
    ref = nn.LSTM(d, h, layers, batch_first=True)
    assert cx.lstm_params(d, h, layers, biases=2) == count_parameters(ref)
    assert cx.lstm_params(d, h, layers, biases=1) == count_parameters(ref) - 4 * h * layers
    assert forward_flops(ref, torch.randn(2, 7, d)) == 0  # the counter cannot see the fused kernel
    ours = rnn.LSTM.from_torch(ref)
    assert cx.lstm_flops(d, h, T=7, batch=2, layers=layers) == forward_flops(ours, torch.randn(2, 7, d))


def test_gpt_params_and_flops():
    gpt = attention.GPT(vocab_size=11, context=16, d_model=32, n_heads=4, n_layers=2)
    assert cx.gpt_params(11, 16, 32, 2) == count_parameters(gpt)
    assert cx.gpt_flops(16, 11, 32, 4, 2, batch=3) == forward_flops(gpt, torch.zeros(3, 16, dtype=torch.long))


def test_saved_activation_bytes_mlp_and_cnn():
    x = torch.randn(8, 1, 8, 8)
    mlp = build_model(MLPConfig(width=32, depth=3))
    assert cx.saved_activation_bytes(mlp, x) == cx.mlp_saved_bytes(8, [64, 32, 32, 32, 10])
    config = CNNConfig(width=4, depth=2)
    assert cx.saved_activation_bytes(build_model(config), x) == cx.cnn_saved_bytes(config, 8)
    with torch.no_grad():
        assert cx.saved_activation_bytes(mlp, x) == 0
    with pytest.raises(ValueError, match="norm='none'"):
        cx.cnn_saved_bytes(CNNConfig(norm="batch"), 8)
    with pytest.raises(ValueError, match="at least"):
        cx.mlp_saved_bytes(8, [64])
    with pytest.raises(TypeError):
        cx.saved_activation_bytes(lambda t: t, x)


def test_traffic_and_intensity():
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    traffic = cx.traffic_bytes(layer, x)
    assert traffic["ideal"] == 4 * (16 * 8 + 4 * 16 + 4 * 8)
    assert traffic["unfused"] >= traffic["ideal"]
    ai = cx.arithmetic_intensity(layer, x)
    assert ai["flops"] == 2 * 4 * 16 * 8
    assert ai["ideal_intensity"] == pytest.approx(ai["flops"] / traffic["ideal"])


def test_book_models_run_and_match_formulas():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    models = cx.book_models(vocab_size=20, batch=2, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)  # seeded inside: the caller's stream is untouched
    again = cx.book_models(vocab_size=20, batch=2, device="cpu")
    for (model, x), (model_2, x_2) in zip(models.values(), again.values()):  # and the same models every time
        assert torch.equal(x, x_2) and all(torch.equal(p, q) for p, q in zip(model.parameters(), model_2.parameters()))
    assert len(models) == 3
    for model, x in models.values():
        assert model(x) is not None and not model.training
    lstm_lm, ids = models["CharLSTM (ch. 5)"]
    assert forward_flops(lstm_lm, ids) == cx.lstm_flops(64, 256, T=64, batch=2) + cx.linear_flops(256, 20, 2 * 64)


def test_scaling_helpers():
    assert cx.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        cx.loglog_slope([1], [1])
    with pytest.raises(ValueError, match="positive"):
        cx.loglog_slope([1, 0], [1, 2])


@pytest.mark.parametrize(
    "call",
    [
        lambda: cx.linear_params(0, 3),
        lambda: cx.conv2d_params(3, 4, 3, groups=2),
        lambda: cx.conv2d_flops(4, 4, 2, 5),  # kernel larger than the input
        lambda: cx.mha_flops(4, 10, 3),
        lambda: cx.lstm_params(3, 4, biases=3),
        lambda: cx.lstm_flops(3, 4, T=0),
        lambda: cx.book_models(0, device="cpu"),
    ],
)
def test_bad_input_is_a_clear_error(call):
    with pytest.raises(ValueError):
        call()


def test_largest_intermediate_sees_the_dense_score_matrix_only_in_dense_attention():
    from dlarch_lib import sparse_attention as sa

    T = 128
    q, k, v = (torch.randn(1, T, 8) for _ in range(3))
    assert cx.largest_intermediate(lambda: attention.scaled_dot_product_attention(q, k, v)) >= T * T
    assert cx.largest_intermediate(lambda: sa.sliding_window_attention(q, k, v, 2)) < T * T // 4
    assert cx.largest_intermediate(lambda: q.transpose(-2, -1).unfold(-1, 5, 1)) == 0  # views allocate nothing
    assert cx.largest_intermediate(lambda: q + 1) == T * 8
    with pytest.raises(TypeError):
        cx.largest_intermediate(q)


@pytest.mark.parametrize("B,T,d,h", [(1, 5, 8, 2), (2, 9, 12, 3), (3, 16, 16, 1)])
def test_attention_saved_bytes_matches_the_measurement(B, T, d, h):
    mha = attention.MultiHeadAttention(d, h)
    x = torch.randn(B, T, d)
    assert cx.saved_activation_bytes(mha, x) == cx.attention_saved_bytes(B, T, d, h)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha  # a submodule: its parameters are not counted as saved activations

        def forward(self, x):
            return self.mha(x, mask=attention.causal_mask(T))

    assert cx.saved_activation_bytes(Masked(), x) == cx.attention_saved_bytes(B, T, d, h, masked=True)
    # the quadratic term: doubling T at fixed everything else adds b B h (4T^2 - T^2) and 5 b B d T
    grow = cx.attention_saved_bytes(B, 2 * T, d, h) - cx.attention_saved_bytes(B, T, d, h)
    assert grow == 4 * (B * h * 3 * T * T + 5 * B * d * T)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        cx.attention_saved_bytes(B, T, 10, 3)
    with pytest.raises(ValueError, match="T must be"):
        cx.attention_saved_bytes(B, 0, d, h)


def test_kv_cache_bytes_matches_the_gpt_cache():
    gpt = attention.GPT(vocab_size=13, context=32, d_model=16, n_heads=4, n_layers=3).eval()
    ids = torch.randint(0, 13, (2, 11), generator=torch.Generator().manual_seed(0))
    cache = gpt.new_cache()
    with torch.no_grad():
        gpt.forward_cached(ids[:, :7], cache)
        gpt.forward_cached(ids[:, 7:], cache)
    assert sum(t.nbytes for t in cache.keys + cache.values) == cx.kv_cache_bytes(3, 11, 16, batch=2, dtype_bytes=4)
    assert cx.kv_cache_bytes(80, 4096, 8192, d_kv=1024) * 8 == cx.kv_cache_bytes(80, 4096, 8192)  # GQA, 8 groups
    with pytest.raises(ValueError, match="d_kv"):
        cx.kv_cache_bytes(2, 4, 8, d_kv=0)


def test_training_state_bytes_adam_fp32_and_master_weights():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False))
    P, n_t = count_parameters(model), 3
    opt = torch.optim.Adam(model.parameters())
    before = cx.training_state_bytes(model, opt)
    assert before == {"weights": 4 * P, "grads": 0, "master": 0, "optimizer": 0, "total": 4 * P}
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    after = cx.training_state_bytes(model, opt)
    assert after["total"] == sum(cx.ADAM_BYTES_PER_PARAM["fp32"].values()) * P + 4 * n_t
    half = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False)).half()
    master = [p.detach().float().requires_grad_() for p in half.parameters()]
    opt_mixed = torch.optim.Adam(master)
    half(torch.randn(4, 5).half()).float().sum().backward()
    for p, m in zip(half.parameters(), master):
        m.grad = p.grad.float()
    opt_mixed.step()
    with_master_grads = cx.training_state_bytes(half, opt_mixed)
    for m in master:
        m.grad = None
    mixed = cx.training_state_bytes(half, opt_mixed)
    assert with_master_grads["master"] == mixed["master"] + 4 * P  # the fp32 grads, while they exist
    assert mixed["total"] == sum(cx.ADAM_BYTES_PER_PARAM["mixed, fp32 master"].values()) * P + 4 * n_t
    assert sum(cx.ADAM_BYTES_PER_PARAM["autocast"].values()) == 18
    with pytest.raises(TypeError):
        cx.training_state_bytes(model, None)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_checkpointed_sequential_saves_the_predicted_bytes_and_the_same_gradients(k):
    torch.manual_seed(0)
    chain = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(6)])
    x = torch.randn(5, 8)
    model = cx.CheckpointedSequential(chain, k)
    assert cx.saved_activation_bytes(model, x) == cx.checkpoint_saved_bytes(6, k, 4 * 5 * 8)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad(set_to_none=True)
    chain(x).sum().backward()
    for g, p in zip(grads, chain.parameters()):
        torch.testing.assert_close(g, p.grad)
    with torch.no_grad():
        torch.testing.assert_close(model(x), chain(x))


def test_checkpointing_errors():
    chain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match="must not exceed"):
        cx.CheckpointedSequential(chain, 3)
    with pytest.raises(TypeError, match="nn.Sequential"):
        cx.CheckpointedSequential(nn.Linear(2, 2), 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must divide"):
        cx.checkpoint_saved_bytes(16, 3, 4)
    assert cx.checkpoint_saved_bytes(16, 4, 1) == 8 < cx.checkpoint_saved_bytes(16, 1, 1) == 17
