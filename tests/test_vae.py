"""Tests for dlarch_lib.vae (chapter 27)."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.distributions import Normal, kl_divergence

from dlarch_lib import vae


def _gaussian(b: int = 4, z: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, z, generator=g, dtype=torch.float64), torch.randn(b, z, generator=g, dtype=torch.float64)


def _images(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- ELBO pieces


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = _gaussian()
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    torch.testing.assert_close(vae.gaussian_kl(mu, logvar), ref)
    assert vae.gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max() == 0  # q = p


def test_gaussian_kl_hand_case():
    # mu = 1, sigma^2 = 1 in one dimension: KL = 1/2
    assert vae.gaussian_kl(torch.ones(1, 1), torch.zeros(1, 1)).item() == pytest.approx(0.5)


def test_reparameterize_is_mu_plus_sigma_eps_and_differentiable():
    mu, logvar = _gaussian()
    eps = torch.randn_like(mu)
    mu.requires_grad_()
    z = vae.reparameterize(mu, logvar, eps)
    torch.testing.assert_close(z, mu + (0.5 * logvar).exp() * eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    with pytest.raises(ValueError, match="eps must have shape"):
        vae.reparameterize(mu, logvar, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="equal shape"):
        vae.gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_gradient_estimators_agree_with_analytic():
    # f(z) = sum z^2: E f = sum mu^2 + sigma^2, so d/dmu = 2 mu and d/dlogvar = sigma^2
    mu, logvar = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.0, -1.0], dtype=torch.float64)
    f = lambda z: z.pow(2).sum(1)
    want_mu, want_lv = 2 * mu, logvar.exp()
    p_mu, p_lv = vae.pathwise_gradient(f, mu, logvar, n=20_000)
    s_mu, s_lv = vae.score_function_gradient(f, mu, logvar, n=200_000)
    torch.testing.assert_close(p_mu, want_mu, atol=0.05, rtol=0)
    torch.testing.assert_close(p_lv, want_lv, atol=0.05, rtol=0)
    torch.testing.assert_close(s_mu, want_mu, atol=0.1, rtol=0)
    torch.testing.assert_close(s_lv, want_lv, atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="equal shape"):
        vae.pathwise_gradient(f, mu, logvar[:1])
    with pytest.raises(ValueError, match="equal shape"):
        vae.score_function_gradient(f, mu[None], logvar[None])


# ----------------------------------------------------------------------------- model


def test_vae_shapes_and_errors():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=16)
    x = _images(5)
    logits, mu, logvar = m(x)
    assert logits.shape == (5, 1, 8, 8) and mu.shape == logvar.shape == (5, 4)
    with pytest.raises(ValueError, match="expected images"):
        m.encode(torch.zeros(5, 64))
    with pytest.raises(ValueError, match="expected z"):
        m.decode(torch.zeros(5, 3))
    with pytest.raises(ValueError, match=">= 1"):
        vae.VAE(z_dim=0)


def test_elbo_terms_match_hand_computation():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=16)
    x = _images(6)
    torch.manual_seed(3)
    rec, kl = vae.elbo_terms(m, x)
    torch.manual_seed(3)
    logits, mu, logvar = m(x)
    p = torch.sigmoid(logits)
    manual = -(x * p.log() + (1 - x) * (1 - p).log()).sum((1, 2, 3))
    torch.testing.assert_close(rec, manual, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kl, vae.gaussian_kl(mu, logvar))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vae.elbo_terms(m, x * 2)


def test_negative_elbo_seeded_and_training_lowers_it():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=32)
    x = _images(64)
    before = vae.negative_elbo(m, x, n_samples=2)
    assert before.shape == (64,) and torch.equal(before, vae.negative_elbo(m, x, n_samples=2))
    hist = vae.train_vae(m, x, epochs=8, batch_size=32, lr=3e-3, progress=False)
    assert len(hist.train_loss) == 8 and hist.train_loss[-1] < hist.train_loss[0]
    assert hist.steps == 16 and len(hist.logs["reconstruction"]) == len(hist.logs["kl"]) == 16
    assert vae.negative_elbo(m, x).mean() < before.mean()
    assert not m.training
    with pytest.raises(ValueError, match="epochs"):
        vae.train_vae(m, x, epochs=0)
    with pytest.raises(ValueError, match="n_samples"):
        vae.negative_elbo(m, x, n_samples=0)


def test_sample_reconstruct_interpolate():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=16).eval()
    s = m.sample(7, torch.Generator().manual_seed(2))  # the sampling API of chapter 8's ImageGenerator
    assert s.shape == (7, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
    torch.testing.assert_close(s, m.sample(7, torch.Generator().manual_seed(2)))
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(s, torch.sigmoid(m.decode(z)).detach())
    x = _images(3)
    assert vae.reconstruct(m, x).shape == x.shape
    path = vae.interpolate(m, x[0], x[1], steps=5)
    assert path.shape == (5, 1, 8, 8)
    torch.testing.assert_close(path[0], vae.reconstruct(m, x[:1])[0])  # t = 0 is x_a's reconstruction
    torch.testing.assert_close(path[-1], vae.reconstruct(m, x[1:2])[0])
    with pytest.raises(ValueError, match="steps"):
        vae.interpolate(m, x[0], x[1], steps=1)
    with pytest.raises(ValueError, match="n must be"):
        m.sample(0)


def test_elbo_step_is_the_mean_negative_elbo():
    torch.manual_seed(0)
    m, x = vae.VAE(z_dim=3, hidden=8), _images(5)
    torch.manual_seed(1)
    out = vae.elbo_step(m, (x,))
    torch.manual_seed(1)
    rec, kl = vae.elbo_terms(m, x)
    torch.testing.assert_close(out["loss"], (rec + kl).mean())
    torch.testing.assert_close(out["kl"], kl.mean())
    assert out["loss"].requires_grad


def test_seeded_functions_leave_the_callers_stream_alone():
    torch.manual_seed(0)
    m, x = vae.VAE(z_dim=3, hidden=8), _images(6)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    vae.negative_elbo(m, x, n_samples=2, seed=1)
    vae.augment_by_posterior(m, x, torch.arange(6), copies=2, seed=1)
    vae.train_vae(m, x, epochs=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- uses


def test_roc_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 6, (50,), generator=g).double()  # many ties
        labels = torch.randint(0, 2, (50,), generator=g)
        assert vae.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert vae.roc_auc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 1])) == 1.0
    assert vae.roc_auc(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0, 0, 1])) == 0.0
    with pytest.raises(ValueError, match="positive and one negative"):
        vae.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        vae.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))


def test_augment_by_posterior_shapes_and_labels():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=16).eval()
    x, y = _images(3), torch.tensor([3, 1, 4])
    xa, ya = vae.augment_by_posterior(m, x, y, copies=4)
    assert xa.shape == (12, 1, 8, 8) and torch.equal(ya, torch.tensor([3] * 4 + [1] * 4 + [4] * 4))
    assert 0 <= xa.min() and xa.max() <= 1
    with pytest.raises(ValueError, match="labels"):
        vae.augment_by_posterior(m, x, y[:2])


def test_nats_to_bits_per_pixel():
    assert vae.nats_to_bits_per_pixel(64 * math.log(2)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vae.nats_to_bits_per_pixel(1.0, pixels=0)


# ----------------------------------------------------------------------------- beta-VAE, active units


def test_beta_schedule_and_step():
    assert vae.beta_schedule(4.0)(0) == 4.0 and vae.beta_schedule(4.0)(10**6) == 4.0
    ramp = vae.beta_schedule(2.0, warmup_steps=10)
    assert [ramp(t) for t in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=">= 0"):
        vae.beta_schedule(-1.0)
    torch.manual_seed(0)
    m, x = vae.VAE(z_dim=3, hidden=8), _images(5)
    step = vae.beta_elbo_step(3.0, warmup_steps=2)
    weights = []
    for _ in range(3):
        torch.manual_seed(1)
        out = step(m, (x,))
        weights.append(out["beta"])
        torch.testing.assert_close(out["loss"], out["reconstruction"] + out["beta"] * out["kl"])
    assert weights == [0.0, 1.5, 3.0]
    torch.manual_seed(1)
    plain = vae.elbo_step(m, (x,))
    torch.manual_seed(1)
    torch.testing.assert_close(vae.beta_elbo_step(1.0)(m, (x,))["loss"], plain["loss"])  # beta = 1 is the ELBO


def test_large_beta_lowers_the_rate():
    x = _images(64)
    kls = []
    for beta in (0.25, 8.0):
        torch.manual_seed(0)
        m = vae.VAE(z_dim=4, hidden=32)
        hist = vae.train_vae(m, x, epochs=10, batch_size=32, lr=3e-3, progress=False, beta=beta)
        kls.append(hist.logs["kl"][-1])
        assert hist.logs["beta"][-1] == beta
    assert kls[1] < kls[0] / 2


def test_active_units_is_the_variance_of_the_posterior_mean():
    torch.manual_seed(0)
    m = vae.VAE(z_dim=4, hidden=16).eval()
    x = _images(20)
    n, activity = vae.active_units(m, x, threshold=0.0)
    mu, _ = m.encode(x)
    torch.testing.assert_close(activity, mu.double().var(0).detach())
    assert n == 4 and activity.shape == (4,)
    with torch.no_grad():  # make unit 0 ignore the image: its posterior mean is a constant
        m.encoder[2].weight[0].zero_()
    n0, activity0 = vae.active_units(m, x, threshold=1e-12)
    assert n0 == 3 and activity0[0] == 0
    with pytest.raises(ValueError, match="two images"):
        vae.active_units(m, x[:1])


# ----------------------------------------------------------------------------- forward versus reverse KL


def test_kl_on_grid_matches_the_closed_form():
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    p, q = Normal(0.5, 1.2), Normal(-0.3, 0.7)
    got = vae.kl_on_grid(p.log_prob(x).exp(), q.log_prob(x).exp(), x)
    torch.testing.assert_close(got, kl_divergence(p, q).double(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="equal shape"):
        vae.kl_on_grid(x, x[:-1], x)


def test_fit_gaussian_kl_forward_matches_moments_and_reverse_finds_a_mode():
    x = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    p = 0.5 * Normal(-2.0, 0.5).log_prob(x).exp() + 0.5 * Normal(2.0, 0.5).log_prob(x).exp()
    mu_f, std_f = vae.fit_gaussian_kl(p, x, "forward", mu0=0.5, std0=1.0, steps=600)
    assert abs(mu_f) < 0.02 and abs(std_f - math.sqrt(0.25 + 4.0)) < 0.02  # moment matching
    mu_r, std_r = vae.fit_gaussian_kl(p, x, "reverse", mu0=0.5, std0=1.0, steps=600)
    assert abs(mu_r - 2.0) < 0.05 and abs(std_r - 0.5) < 0.05  # one mode, its own width
    with pytest.raises(ValueError, match="direction"):
        vae.fit_gaussian_kl(p, x, "sideways")
