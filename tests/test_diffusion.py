"""Tests for dlarch_lib.diffusion (chapter 27's DDPM pointer)."""

from __future__ import annotations

import math

import pytest
import torch

from dlarch_lib import diffusion as dfn


def test_schedule_and_closed_form_forward_process():
    s = dfn.linear_schedule(50)
    assert s.T == 50 and float(s.alpha_bars[-1]) < 1e-3 and bool((s.alpha_bars.diff() < 0).all())
    torch.testing.assert_close(s.alpha_bars, torch.cumprod(1 - s.betas, 0))
    x0 = torch.tensor([[1.5, -2.0]], dtype=torch.float64).expand(40_000, 2)
    t = 20
    chain = dfn.noise_step_by_step(x0, t + 1, s, torch.Generator().manual_seed(0))  # (n, 2)
    abar = float(s.alpha_bars[t])
    torch.testing.assert_close(chain.mean(0), math.sqrt(abar) * x0[0], atol=0.02, rtol=0)
    torch.testing.assert_close(chain.var(0), torch.full((2,), 1 - abar, dtype=torch.float64), atol=0.02, rtol=0)
    eps = torch.randn(3, 2, dtype=torch.float64)
    tt = torch.tensor([0, 5, 49])
    ab = s.alpha_bars[tt][:, None]
    torch.testing.assert_close(dfn.q_sample(x0[:3], tt, s, eps), ab.sqrt() * x0[:3] + (1 - ab).sqrt() * eps)
    with pytest.raises(ValueError, match="t must lie"):
        dfn.q_sample(x0[:3], torch.tensor([0, 1, 50]), s, eps)
    with pytest.raises(ValueError, match="T must be"):
        dfn.linear_schedule(0)
    with pytest.raises(ValueError, match="betas"):
        dfn.NoiseSchedule(torch.tensor([0.5, 1.0]))


def test_denoiser_shapes_and_errors():
    torch.manual_seed(0)
    m = dfn.Denoiser(dim=3, hidden=16, T=10)
    assert m(torch.randn(4, 3), torch.tensor([0, 3, 9, 1])).shape == (4, 3)
    with pytest.raises(ValueError, match="expected x"):
        m(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="even time_features"):
        dfn.Denoiser(time_features=3)


def test_training_lowers_the_loss_and_sampling_is_seeded():
    torch.manual_seed(0)
    s = dfn.linear_schedule(20)
    data = torch.randn(256, 2) * 0.1 + torch.tensor([1.0, -1.0])
    m = dfn.Denoiser(dim=2, hidden=32, T=20)
    hist = dfn.train_ddpm(m, data, s, steps=300, batch_size=64, progress=False)
    first, last = sum(hist.loss[:20]) / 20, sum(hist.loss[-20:]) / 20
    assert last < 0.7 * first and not m.training
    a = dfn.ddpm_sample(m, 500, s, torch.Generator().manual_seed(1))
    b = dfn.ddpm_sample(m, 500, s, torch.Generator().manual_seed(1))
    assert a.shape == (500, 2) and torch.equal(a, b)
    assert (a.mean(0) - torch.tensor([1.0, -1.0])).norm() < 0.3  # samples land near the data
    with pytest.raises(ValueError, match="expected data"):
        dfn.train_ddpm(m, torch.randn(5, 3), s, steps=1)
    with pytest.raises(ValueError, match="n must be"):
        dfn.ddpm_sample(m, 0, s, torch.Generator())
