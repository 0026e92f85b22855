"""Tests for dlarch_lib.frontier (chapter 30's outlook: FlashAttention, MoE, SSMs, DDIM, SFT and DPO)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dlarch_lib import diffusion
from dlarch_lib import frontier as fr


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("T", "bq", "bk"), [(37, 8, 5), (16, 16, 16), (9, 4, 32)])
def test_flash_attention_equals_sdpa(causal, T, bq, bk):
    q, k, v = _randn(2, 3, T, 8, seed=1), _randn(2, 3, T, 8, seed=2), _randn(2, 3, T, 8, seed=3)
    out = fr.flash_attention(q, k, v, block_q=bq, block_k=bk, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))


def test_flash_attention_is_stable_for_large_scores():
    q = _randn(1, 20, 4, seed=4) * 300  # exp of the raw scores would overflow float64
    k, v = _randn(1, 20, 4, seed=5) * 300, _randn(1, 20, 4, seed=6)
    out = fr.flash_attention(q, k, v, block_q=3, block_k=7)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_flash_traffic_matches_the_formula_and_errors():
    T, d, M = 100, 8, 400
    b_r, b_c = fr.flash_tiles(d, M)
    assert (b_r, b_c) == (10, 8) and 2 * b_r * d + 2 * b_c * d + b_r * b_c <= M
    counted: dict[str, int] = {}
    fr.flash_attention(
        _randn(T, d), _randn(T, d, seed=1), _randn(T, d, seed=2), block_q=b_r, block_k=b_c, traffic=counted
    )
    assert counted["read"] + counted["write"] == fr.attention_hbm_traffic(T, d, M)["flash"]
    traffic = fr.attention_hbm_traffic(4096, 64, 96 * 1024)
    assert traffic["standard"] > 5 * traffic["flash"]  # standard attention moves far more
    with pytest.raises(ValueError, match="M >= 5 d"):
        fr.flash_tiles(64, 100)
    with pytest.raises(ValueError, match="shapes do not match"):
        fr.flash_attention(_randn(4, 3), _randn(4, 2), _randn(4, 2))
    with pytest.raises(ValueError, match="causal"):
        fr.flash_attention(_randn(4, 3), _randn(5, 3), _randn(5, 3), causal=True)


def test_moe_routing_cost_and_aux_loss():
    torch.manual_seed(0)
    moe = fr.MoE(d=6, hidden=10, n_experts=4, k=2)
    x = torch.randn(33, 6)
    y, aux = moe(x)
    assert y.shape == (33, 6) and aux.ndim == 0
    assert moe.last_index is not None and moe.last_index.shape == (33, 2)
    # the same output from a dense loop over tokens
    probs = torch.softmax(moe.router(x), -1)
    for n in range(33):
        top_p, top_i = probs[n].topk(2)
        ref = sum(p / top_p.sum() * moe.experts[int(i)](x[n]) for p, i in zip(top_p, top_i))
        torch.testing.assert_close(y[n], ref)
    # FLOPs: only the routed tokens run through an expert
    with FlopCounterMode(display=False) as counter:
        moe(x)
    assert counter.get_total_flops() == 33 * fr.moe_cost(6, 10, 4, 2)["flops_per_token"]
    assert sum(p.numel() for p in moe.parameters()) == fr.moe_cost(6, 10, 4, 2)["params"]
    # the auxiliary loss is 1 when routing is uniform and E when everything goes to one expert
    uniform = torch.full((8, 4), 0.25)
    assert math.isclose(fr.load_balancing_loss(uniform, torch.arange(8)[:, None] % 4).item(), 1.0)
    peaked = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert math.isclose(fr.load_balancing_loss(peaked, torch.zeros(8, 1, dtype=torch.long)).item(), 4.0)
    with pytest.raises(ValueError, match="k <= n_experts"):
        fr.MoE(4, 4, 2, k=3)
    with pytest.raises(ValueError, match="expected x"):
        moe(torch.randn(3, 5))


def test_routing_specialisation():
    cluster = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert math.isclose(fr.routing_specialisation(cluster, torch.tensor([2, 2, 0, 0, 3, 3, 1, 1]), 4), 1.0)
    assert math.isclose(fr.routing_specialisation(cluster, torch.zeros(8, dtype=torch.long), 4), 0.0, abs_tol=1e-12)
    # experts split by a variable independent of the cluster: no information
    assert math.isclose(fr.routing_specialisation(cluster, torch.tensor([0, 1] * 4), 4), 0.0, abs_tol=1e-12)
    # two clusters share each expert: I = log 2, H = log 4
    assert math.isclose(fr.routing_specialisation(cluster, cluster // 2, 4), 0.5)
    with pytest.raises(ValueError, match="clusters must lie"):
        fr.routing_specialisation(cluster, cluster, 3)
    with pytest.raises(ValueError, match="non-empty"):
        fr.routing_specialisation(cluster, cluster[:3], 4)


def test_ssm_recurrence_equals_convolution():
    H, N, T = 3, 5, 40
    a = -torch.rand(H, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.1
    abar, bbar = fr.ssm_discretize(a, _randn(H, N, seed=1), torch.full((H,), 0.3, dtype=torch.float64))
    c, u = _randn(H, N, seed=2), _randn(2, H, T, seed=3)
    kernel = fr.ssm_kernel(abar, bbar, c, T)
    y_rec = fr.ssm_recurrence(abar, bbar, c, u)
    torch.testing.assert_close(fr.causal_conv_fft(kernel, u), y_rec)
    # PyTorch's conv1d is a cross-correlation: flip the kernel and pad on the left for a causal convolution
    ref = F.conv1d(F.pad(u, (T - 1, 0)), kernel.flip(-1)[:, None, :], groups=H)
    torch.testing.assert_close(y_rec, ref)
    flops = fr.ssm_flops(4096, 64)
    assert flops["conv_fft"] < flops["recurrence"] < flops["conv_direct"]
    with pytest.raises(ValueError, match="a < 0"):
        fr.ssm_discretize(-a, a, torch.ones(H, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected kernel"):
        fr.causal_conv_fft(kernel[:, :5], u)


def test_selective_scan_reduces_to_the_lti_recurrence():
    B, T, H, N = 2, 12, 3, 4
    a = -torch.rand(H, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.1
    b, c, dt = _randn(N, seed=1), _randn(N, seed=2), 0.2
    u = _randn(B, T, H, seed=3)
    y = fr.selective_scan(u, torch.full((B, T, H), dt, dtype=torch.float64), a, b.expand(B, T, N), c.expand(B, T, N))
    abar = torch.exp(dt * a)
    y_lti = fr.ssm_recurrence(abar, (dt * b).expand(H, N), c.expand(H, N), u.transpose(1, 2))
    torch.testing.assert_close(y, y_lti.transpose(1, 2))
    with pytest.raises(ValueError, match="expected b, c"):
        fr.selective_scan(u, u, a, b.expand(B, T + 1, N), c.expand(B, T, N))


class _Oracle(nn.Module):
    """The exact noise predictor for data that is one point ``x0``."""

    def __init__(self, x0: torch.Tensor, schedule: diffusion.NoiseSchedule) -> None:
        super().__init__()
        self.dim, self.x0, self.abars = len(x0), x0, schedule.alpha_bars.float()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.abars[t][:, None]
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_with_an_exact_denoiser_lands_on_the_data(steps):
    schedule = diffusion.linear_schedule(50)
    x0 = torch.tensor([1.5, -0.5])
    out = fr.ddim_sample(_Oracle(x0, schedule), 20, schedule, steps, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0.expand(20, 2), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="steps"):
        fr.ddim_sample(_Oracle(x0, schedule), 2, schedule, 51, torch.Generator())
    with pytest.raises(ValueError, match="attribute dim"):
        fr.ddim_sample(nn.Linear(2, 2), 2, schedule, 5, torch.Generator())


def test_sft_loss_ignores_the_prompt():
    tokens = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    prompt_len = torch.tensor([3, 1])
    labels = fr.sft_labels(tokens, prompt_len)
    assert labels.tolist() == [[-100, -100, 8, 9], [2, 3, 4, 0]]
    logits = _randn(2, 5, 11, seed=4)
    loss = fr.sft_loss(logits, tokens, prompt_len)
    picked = [(0, 2, 8), (0, 3, 9), (1, 0, 2), (1, 1, 3), (1, 2, 4), (1, 3, 0)]
    manual = -sum(torch.log_softmax(logits[b, i], -1)[y] for b, i, y in picked) / len(picked)
    torch.testing.assert_close(loss, manual)
    changed = logits.clone()
    changed[0, :2] += 10 * _randn(2, 11, seed=5)  # the logits that predict prompt tokens do not count
    torch.testing.assert_close(fr.sft_loss(changed, tokens, prompt_len), loss)
    with pytest.raises(ValueError, match="non-empty response"):
        fr.sft_labels(tokens, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="expected logits"):
        fr.sft_loss(logits[:, :4], tokens, prompt_len)


def test_dpo_loss_hand_case_and_prefs():
    loss, margin = fr.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.0]), beta=0.5
    )
    # beta * ((-1 + 1.5) - (-2 + 1)) = 0.5 * 1.5 = 0.75
    assert math.isclose(margin.item(), 0.75, rel_tol=1e-6)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-0.75)), rel_tol=1e-6)
    reward = torch.tensor([[0.0, 3.0]])
    _, chosen, rejected = fr.bradley_terry_prefs(reward, 4000, torch.Generator().manual_seed(0))
    assert (chosen != rejected).all()
    share = (chosen == 1).float().mean().item()
    assert abs(share - 1 / (1 + math.exp(-3.0))) < 0.02
    with pytest.raises(ValueError, match="beta"):
        fr.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.0)
    with pytest.raises(ValueError, match="one shape"):
        fr.dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=1.0)


def test_the_remaining_input_errors():
    with pytest.raises(ValueError, match="T and d"):
        fr.attention_hbm_traffic(0, 8, 400)
    with pytest.raises(ValueError, match="block sizes"):
        fr.flash_attention(_randn(4, 3), _randn(4, 3), _randn(4, 3), block_q=0)
    with pytest.raises(ValueError, match="expected probs"):
        fr.load_balancing_loss(torch.ones(4, 2), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="k <= n_experts"):
        fr.moe_cost(4, 4, 2, 3)
    a = -torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a, b"):
        fr.ssm_discretize(a, a[:, :2], torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected abar"):
        fr.ssm_recurrence(a, a, a, _randn(1, 3, 5))
    with pytest.raises(ValueError, match="T >= 1"):
        fr.ssm_kernel(a, a, a, 0)
    with pytest.raises(ValueError, match="T and N"):
        fr.ssm_flops(0, 4)
    with pytest.raises(ValueError, match="reward table"):
        fr.bradley_terry_prefs(torch.zeros(3, 1), 10, torch.Generator())
