"""Tests for dlarch_lib.gan (chapter 08)."""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import gan
from dlarch_lib.core.train import History


def _dists() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    return p / p.sum(), q / q.sum()


# ----------------------------------------------------------------------------- theory


def test_optimal_discriminator_value_is_2jsd_minus_log4():
    p, q = _dists()
    d_star = gan.optimal_discriminator(p, q)
    torch.testing.assert_close(gan.gan_value(d_star, p, q), 2 * gan.js_divergence(p, q) - math.log(4))
    # D* maximises V: any other discriminator does no better
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        d = torch.rand(6, generator=g, dtype=torch.float64).clamp(0.01, 0.99)
        assert gan.gan_value(d, p, q) <= gan.gan_value(d_star, p, q) + 1e-12


def test_value_at_equilibrium_is_minus_log4_and_handles_zeros():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    d_star = gan.optimal_discriminator(p, p)
    torch.testing.assert_close(d_star, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    assert gan.gan_value(d_star, p, p).item() == pytest.approx(-math.log(4))
    q = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # disjoint supports: JSD = log 2
    assert gan.js_divergence(p, q).item() == pytest.approx(math.log(2))


def test_kl_matches_torch():
    p, q = _dists()
    torch.testing.assert_close(gan.kl_divergence(p, q), F.kl_div(q.log(), p, reduction="sum"))


def test_distribution_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        gan.js_divergence(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="equal length"):
        gan.optimal_discriminator(torch.tensor([1.0]), torch.tensor([0.5, 0.5]))
    p, q = _dists()
    with pytest.raises(ValueError, match="d has shape"):
        gan.gan_value(torch.full((3,), 0.5), p, q)


# ----------------------------------------------------------------------------- losses


def test_losses_match_bce():
    r, f = torch.randn(16), torch.randn(16)
    expected = F.binary_cross_entropy_with_logits(r, torch.ones(16)) + F.binary_cross_entropy_with_logits(
        f, torch.zeros(16)
    )
    torch.testing.assert_close(gan.discriminator_loss(r, f), expected)
    torch.testing.assert_close(gan.generator_loss(f), F.binary_cross_entropy_with_logits(f, torch.ones(16)))
    torch.testing.assert_close(
        gan.generator_loss(f, "saturating"), -F.binary_cross_entropy_with_logits(f, torch.zeros(16))
    )


def test_saturating_gradient_vanishes_when_d_is_confident():
    f = torch.tensor([-8.0], requires_grad=True)  # D(G(z)) = sigmoid(-8) ~ 3e-4
    (g_sat,) = torch.autograd.grad(gan.generator_loss(f, "saturating"), f)
    (g_ns,) = torch.autograd.grad(gan.generator_loss(f, "non_saturating"), f)
    assert abs(g_sat.item()) < 1e-3 and abs(g_ns.item()) > 0.99


def test_generator_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown generator loss"):
        gan.generator_loss(torch.zeros(2), "wasserstein")


# ----------------------------------------------------------------------------- DCGAN


def test_dcgan_shapes_and_range():
    g, d = gan.DCGANGenerator(z_dim=8, width=4), gan.DCGANDiscriminator(width=4)
    x = g(torch.randn(5, 8))
    assert x.shape == (5, 1, 8, 8) and x.abs().max() <= 1
    assert d(x).shape == (5,)
    with pytest.raises(ValueError, match="z of shape"):
        g(torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        d(torch.randn(5, 1, 16, 16))
    with pytest.raises(ValueError, match="width"):
        gan.DCGANDiscriminator(width=0)


def test_signed_unit_roundtrip():
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(gan.to_unit(gan.to_signed(x)), x)


def test_train_gan_runs_records_and_learns_the_mean():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 8, 8)
    images[:, :, 2:6, 2:6] = 1.0  # one bright square: the generator must learn to draw it
    model = gan.GAN(gan.DCGANGenerator(z_dim=4, width=8), gan.DCGANDiscriminator(width=8))
    noise = torch.Generator().manual_seed(0)
    before = (model.sample(64, noise) - images).abs().mean().item()
    fixed_z = torch.randn(4, 4, generator=noise)
    snapshots = []

    def snapshot(m: gan.GAN) -> dict[str, float]:
        assert not m.training
        snapshots.append(m.generate(fixed_z))
        return {"mean_pixel": snapshots[-1].mean().item()}

    h = gan.train_gan(
        model,
        images,
        steps=60,
        batch_size=16,
        lr=2e-3,
        generator=noise,
        evaluate=snapshot,
        eval_every=30,
        progress=False,
    )
    after = (model.sample(64, noise) - images).abs().mean().item()
    assert isinstance(h, History) and h.steps == 60 and h.loss == []
    assert all(len(h.logs[k]) == 60 for k in ("d_loss", "g_loss", "d_real", "d_fake"))
    assert h.eval_steps == [30, 60] and len(h.evals["mean_pixel"]) == 2 and snapshots[-1].shape == (4, 1, 8, 8)
    assert model.training  # fit restores training mode after each evaluation
    assert after < 0.5 * before


def test_train_gan_is_reproducible_from_its_generator():
    def run() -> torch.Tensor:
        torch.manual_seed(1)
        model = gan.GAN(gan.DCGANGenerator(z_dim=4, width=4), gan.DCGANDiscriminator(width=4))
        h = gan.train_gan(
            model, torch.rand(32, 1, 8, 8), steps=5, generator=torch.Generator().manual_seed(3), progress=False
        )
        return torch.tensor(h.logs["g_loss"])

    torch.testing.assert_close(run(), run())


def test_gan_step_updates_both_players_and_only_through_their_optimizers():
    torch.manual_seed(0)
    model = gan.GAN(gan.DCGANGenerator(z_dim=4, width=4), gan.DCGANDiscriminator(width=4))
    opt_g = torch.optim.SGD(model.generator.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(model.discriminator.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    out = gan.gan_step(model, (torch.rand(8, 1, 8, 8) * 2 - 1, torch.randn(8, 4)), opt_g=opt_g, opt_d=opt_d)
    assert set(out) == {"d_loss", "g_loss", "d_real", "d_fake"} and 0 < out["d_real"] < 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()) if b.ndim > 1)


def test_sampling_api_is_seeded_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = gan.GAN(gan.DCGANGenerator(z_dim=4, width=4), gan.DCGANDiscriminator(width=4))
    s = model.sample(7, torch.Generator().manual_seed(2))
    assert s.shape == (7, 1, 8, 8) and 0 <= s.min() and s.max() <= 1 and model.training
    torch.testing.assert_close(s, model.sample(7, torch.Generator().manual_seed(2)))
    torch.testing.assert_close(s, model.generate(torch.randn(7, 4, generator=torch.Generator().manual_seed(2))))
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    with pytest.raises(ValueError, match="expected z"):
        model.generate(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="z_dim"):
        gan.GAN(nn.Linear(2, 2), gan.DCGANDiscriminator(4))


def test_train_gan_errors():
    model = gan.GAN(gan.DCGANGenerator(4, 4), gan.DCGANDiscriminator(4))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        gan.train_gan(model, torch.full((4, 1, 8, 8), 2.0), steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown generator loss"):
        gan.train_gan(model, torch.rand(4, 1, 8, 8), steps=1, loss="hinge", progress=False)
    with pytest.raises(ValueError, match="steps"):
        gan.train_gan(model, torch.rand(4, 1, 8, 8), steps=0, progress=False)


# ----------------------------------------------------------------------------- scoring


class _StandIn(nn.Module):
    """A fixed 'classifier' for 8x8 images: class = which of 10 pixels in row 0 is brightest."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * 20  # (N, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _one_hot_images(labels: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(len(labels), 1, 8, 8)
    x.view(len(labels), -1)[torch.arange(len(labels)), labels] = 1.0
    return x


def test_classifier_score_balanced_vs_collapsed():
    balanced = gan.classifier_score(_StandIn(), _one_hot_images(torch.arange(100) % 10))
    assert balanced["coverage"] == 10
    assert balanced["entropy"] == pytest.approx(math.log(10))
    assert balanced["confidence"] > 0.99 and balanced["inception_score"] > 9.9
    collapsed = gan.classifier_score(_StandIn(), _one_hot_images(torch.full((100,), 3)))
    assert collapsed["coverage"] == 1 and collapsed["entropy"] == pytest.approx(0.0, abs=1e-12)
    assert collapsed["inception_score"] == pytest.approx(1.0, abs=1e-6)


def test_classifier_score_errors():
    with pytest.raises(ValueError, match=r"expected \(N, 5\)"):
        gan.classifier_score(_StandIn(), torch.rand(4, 1, 8, 8), num_classes=5)
    with pytest.raises(ValueError, match="non-empty"):
        gan.classifier_score(_StandIn(), torch.rand(0, 1, 8, 8))
    with pytest.raises(ValueError, match="no features"):
        gan.classifier_features(nn.Linear(2, 2), torch.rand(4, 1, 8, 8))
    assert gan.classifier_features(_StandIn(), torch.rand(4, 1, 8, 8)).shape == (4, 10)


def test_frechet_distance_closed_form_and_scipy():
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a) - sqrt(b))^2
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    va, vb = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = ((mu_a - mu_b) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum()
    got = gan.frechet_distance_gaussians(mu_a, torch.diag(va), mu_b, torch.diag(vb))
    assert got == pytest.approx(expected.item(), rel=1e-10)
    # general covariances: against scipy's matrix square root
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(5), b @ b.T + 0.1 * torch.eye(5)
    ref = torch.trace(ca + cb).item() - 2 * scipy.linalg.sqrtm((ca @ cb).numpy()).real.trace()
    assert gan.frechet_distance_gaussians(torch.zeros(5), ca, torch.zeros(5), cb) == pytest.approx(ref, rel=1e-8)


def test_frechet_distance_of_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 3.0]) + torch.tensor([2.0, 0.0])
    assert gan.frechet_distance(x, y) == pytest.approx(4.0 + 4.0, rel=0.05)  # |mu|^2 + (3 - 1)^2
    assert gan.frechet_distance(x[:10000], x[10000:]) < 0.01
    with pytest.raises(ValueError, match="at least 2"):
        gan.frechet_distance(x[:1], y)
    with pytest.raises(ValueError, match=r"\(N_a, F\)"):
        gan.frechet_distance(x, y[:, :1])


# ----------------------------------------------------------------------------- StyleGAN2 pieces


def test_mapping_network():
    m = gan.MappingNetwork(z_dim=6, w_dim=5, depth=3)
    z = torch.randn(4, 6)
    assert m(z).shape == (4, 5)
    torch.testing.assert_close(m(z), m(10 * z))  # pixel norm: only the direction of z matters
    with pytest.raises(ValueError, match="z of shape"):
        m(torch.randn(4, 5))


def test_modulated_conv2d_matches_scaling_activations():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    styles = torch.rand(3, 4, generator=g) + 0.5
    # modulating the weights = scaling the input channels; demodulating = scaling the output channels
    plain = F.conv2d(x * styles[:, :, None, None], weight, padding=1)
    torch.testing.assert_close(gan.modulated_conv2d(x, weight, styles, demodulate=False), plain)
    norms = (weight[None] * styles[:, None, :, None, None]).pow(2).sum(dim=(2, 3, 4)).add(1e-8).sqrt()  # (B, O)
    torch.testing.assert_close(gan.modulated_conv2d(x, weight, styles), plain / norms[:, :, None, None])


def test_demodulation_keeps_unit_variance_across_styles():
    torch.manual_seed(0)
    layer = gan.ModulatedConv2d(32, 32, 3, w_dim=8)
    x = torch.randn(16, 32, 24, 24)
    stds = {True: [], False: []}
    for scale in (0.1, 1.0, 10.0):
        w = scale * torch.randn(16, 8)
        for demod in (True, False):
            layer.demodulate = demod
            with torch.no_grad():
                y = layer(x, w)[:, :, 1:-1, 1:-1]  # interior: no zero padding in the receptive field
            stds[demod] += y.std(dim=(1, 2, 3)).tolist()
    assert all(0.9 < s < 1.1 for s in stds[True])
    assert max(stds[False]) / min(stds[False]) > 4  # without demodulation the scale follows the style


def test_modulated_conv2d_errors():
    with pytest.raises(ValueError, match="inconsistent shapes"):
        gan.modulated_conv2d(torch.randn(2, 3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="expected x"):
        gan.modulated_conv2d(torch.randn(3, 4, 4), torch.randn(5, 3, 3, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="odd"):
        gan.ModulatedConv2d(3, 3, 2, w_dim=4)


def test_noise_injection():
    layer = gan.NoiseInjection(3)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), x)  # strength starts at 0
    with torch.no_grad():
        layer.strength.fill_(2.0)
    noise = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(layer(x, noise), x + 2 * noise)
    with pytest.raises(ValueError, match="noise must have shape"):
        layer(x, torch.randn(2, 3, 4, 4))


def test_mix_styles():
    w1, w2 = torch.zeros(2, 3), torch.ones(2, 3)
    ws = gan.mix_styles(w1, w2, num_ws=4, crossover=1)
    assert ws.shape == (2, 4, 3)
    assert ws[:, 0].eq(0).all() and ws[:, 1:].eq(1).all()
    torch.testing.assert_close(gan.mix_styles(w1, w2, 4, 4), w1[:, None].expand(-1, 4, -1))
    with pytest.raises(ValueError, match="crossover"):
        gan.mix_styles(w1, w2, 4, 5)


def test_style_generator_mixing_changes_only_what_it_should():
    torch.manual_seed(0)
    gen = gan.StyleGenerator(z_dim=8, w_dim=8, channels=8, layers=3).eval()
    z = torch.randn(2, 8)
    assert gen(z).shape == (2, 1, 8, 8)
    w = gen.mapping(z)
    same = gan.mix_styles(w, w, gen.num_ws, 2)
    torch.testing.assert_close(
        gen.synthesis(same, noise=False), gen.synthesis(w[:, None].expand(-1, 4, -1), noise=False)
    )
    mixed = gen.synthesis(gan.mix_styles(w[:1], w[1:], gen.num_ws, 2), noise=False)
    assert not torch.allclose(mixed, gen.synthesis(same[:1], noise=False))
    with pytest.raises(ValueError, match="ws of shape"):
        gen.synthesis(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="layers"):
        gan.StyleGenerator(layers=1)


# ----------------------------------------------------------------------------- 2-D testbed


def test_ring_centres_and_samples():
    c = gan.ring_centres(8, 2.0)
    assert c.shape == (8, 2)
    torch.testing.assert_close(c.norm(dim=1), torch.full((8,), 2.0))
    torch.testing.assert_close(c[0], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(c[2], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    x, y = gan.sample_ring(4000, runs=2, std=0.1, generator=g)
    assert x.shape == (2, 4000, 2) and y.shape == (2, 4000)
    assert torch.bincount(y.flatten(), minlength=8).min() > 800  # uniform over modes
    offsets = x - c[y]
    assert abs(offsets.std().item() - 0.1) < 0.005
    fixed = torch.full((1, 5), 3)
    x3, y3 = gan.sample_ring(5, labels=fixed, std=1e-3, generator=g)
    assert torch.equal(y3, fixed) and torch.allclose(x3[0], c[3].expand(5, 2), atol=0.01)


def test_ring_errors():
    with pytest.raises(ValueError, match="radius"):
        gan.ring_centres(8, 0.0)
    with pytest.raises(ValueError, match="std"):
        gan.sample_ring(10, std=0.0)
    with pytest.raises(ValueError, match="labels must be"):
        gan.sample_ring(3, labels=torch.tensor([[0, 1, 8]]))


def test_mode_coverage_counts_modes_and_quality():
    c = gan.ring_centres(8, 2.0)
    on_three = c[torch.tensor([0, 1, 2] * 30)]  # (90, 2): exactly on three modes
    between = torch.zeros(10, 2)  # the origin: far from every mode
    s = gan.mode_coverage(torch.cat([on_three, between]), c, std=0.05)
    assert s["modes"] == 3 and s["high_quality"] == pytest.approx(0.9) and s["balance"] == pytest.approx(1.0)
    # a mode with too few points (below a quarter of its fair share) is not covered
    few = torch.cat([c[torch.zeros(97, dtype=torch.long)], c[torch.tensor([5, 5, 5])]])
    assert gan.mode_coverage(few, c, std=0.05)["modes"] == 1
    index, dist = gan.nearest_mode(c[[4, 7]] + 0.01, c)
    assert index.tolist() == [4, 7] and torch.allclose(dist, torch.full((2,), 0.01 * math.sqrt(2)))
    with pytest.raises(ValueError, match="non-empty sample"):
        gan.mode_coverage(torch.zeros(2, 5, 2), c, std=0.05)
    with pytest.raises(ValueError, match="min_share"):
        gan.mode_coverage(on_three, c, std=0.05, min_share=0.0)
    with pytest.raises(ValueError, match="must agree"):
        gan.nearest_mode(torch.zeros(4, 3), c)


def test_ensemble_mlp_members_are_plain_torch_mlps():
    torch.manual_seed(0)
    mlp = gan.EnsembleMLP(3, 4, 2, hidden=8)
    x = torch.randn(3, 5, 4)
    out = mlp(x)
    assert out.shape == (3, 5, 2)
    for r in range(3):
        torch.testing.assert_close(out[r], mlp.member(r)(x[r]))
    # the runs are independent: run 0's output has no gradient in run 1's weights
    out[0].sum().backward()
    assert all(p.grad is not None and p.grad[1:].abs().sum() == 0 for p in mlp.parameters())
    with pytest.raises(ValueError, match=r"expected x of shape \(3, B, 4\)"):
        mlp(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="run must be"):
        mlp.member(3)
    with pytest.raises(ValueError, match="runs, in_features"):
        gan.EnsembleLinear(0, 2, 2)


def test_gradient_penalty_of_a_linear_critic_is_norm_w_minus_one_squared():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    critic = lambda x: x @ w + 0.7  # grad_x f = w everywhere
    real, fake = torch.randn(2, 10, 3, generator=g, dtype=torch.float64), torch.randn(2, 10, 3, dtype=torch.float64)
    gp = gan.gradient_penalty(critic, real, fake, generator=g)
    expected = (w.detach().norm() - 1) ** 2
    torch.testing.assert_close(gp, expected)
    # create_graph: the penalty's gradient reaches the critic, d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    (grad_w,) = torch.autograd.grad(gp, w)
    torch.testing.assert_close(grad_w, 2 * (w.norm() - 1) * w / w.norm())
    # images: the norm runs over (C, H, W); a critic of unit-norm weight has zero penalty
    v = torch.randn(1, 4, 4, generator=g)
    v = v / v.norm()
    img_critic = lambda x: (x * v).sum(dim=(1, 2, 3))
    imgs = torch.randn(6, 1, 4, 4, generator=g)
    torch.testing.assert_close(gan.gradient_penalty(img_critic, imgs, imgs.flip(0), event_dims=3), torch.tensor(0.0))


def test_gradient_penalty_uses_the_interpolates():
    real, fake = torch.tensor([[2.0]]), torch.tensor([[0.0]])
    critic = lambda x: (x**2).sum(dim=-1)  # grad = 2x: at x_hat = 2t the norm is 4t
    gp = gan.gradient_penalty(critic, real, fake, torch.tensor([[0.25]]))
    torch.testing.assert_close(gp, torch.tensor(0.0))  # 4 * 0.25 = 1
    gp = gan.gradient_penalty(critic, real, fake, torch.tensor([[1.0]]))
    torch.testing.assert_close(gp, torch.tensor(9.0))  # at x_hat = real = 2 the norm is 4: (4 - 1)^2
    with pytest.raises(ValueError, match="share a shape"):
        gan.gradient_penalty(critic, real, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="t must have shape"):
        gan.gradient_penalty(critic, real, fake, torch.zeros(1))


def test_wasserstein_losses():
    critic, generator = gan.wasserstein_losses(torch.tensor([1.0, 3.0]), torch.tensor([0.0, -1.0, 1.0]))
    assert critic.item() == pytest.approx(0.0 - 2.0) and generator.item() == pytest.approx(0.0)


def test_toy_gan_conditioning_and_errors():
    torch.manual_seed(0)
    cond = gan.ToyGAN(runs=2, num_classes=8, hidden=8)
    z, y = torch.randn(2, 5, 2), torch.randint(0, 8, (2, 5))
    assert cond.generate(z, y).shape == (2, 5, 2) and cond.score(torch.randn(2, 5, 2), y).shape == (2, 5)
    assert not torch.allclose(cond.generate(z, y), cond.generate(z, (y + 1) % 8))  # the label matters
    assert cond.sample(7, torch.zeros(2, 7, dtype=torch.long), torch.Generator().manual_seed(0)).shape == (2, 7, 2)
    with pytest.raises(ValueError, match="needs labels"):
        cond.generate(z)
    plain = gan.ToyGAN(runs=2, hidden=8)
    with pytest.raises(ValueError, match="unconditional"):
        plain.generate(z, y)
    with pytest.raises(ValueError, match="unknown loss"):
        gan.train_toy_gan(plain, steps=1, loss="hinge")
    with pytest.raises(ValueError, match="num_classes == modes"):
        gan.train_toy_gan(gan.ToyGAN(num_classes=3), steps=1)
    with pytest.raises(ValueError, match="n_critic"):
        gan.train_toy_gan(plain, steps=1, n_critic=0)


@pytest.mark.parametrize("loss", gan.TOY_LOSSES)
def test_train_toy_gan_is_reproducible_and_learns_the_ring(loss):
    def run() -> tuple[gan.ToyGAN, History]:
        torch.manual_seed(0)
        model = gan.ToyGAN(runs=2, hidden=32)
        g = torch.Generator().manual_seed(1)
        return model, gan.train_toy_gan(model, steps=150, loss=loss, n_critic=2, generator=g, progress=False)

    (m1, h1), (_, h2) = run(), run()
    assert h1.steps == 150 and len(h1.logs["d_loss"]) == 150
    assert h1.logs["d_loss"] == h2.logs["d_loss"]
    points = m1.sample(500, generator=torch.Generator().manual_seed(2))  # (2, 500, 2)
    radius = points.norm(dim=-1).mean(dim=1)  # (2,): the untrained generator sits near the origin
    assert torch.all((radius - 2.0).abs() < 0.6), radius


def test_conditional_toy_gan_puts_labels_on_their_modes():
    torch.manual_seed(0)
    model = gan.ToyGAN(runs=1, num_classes=8, hidden=32)
    gan.train_toy_gan(model, steps=400, generator=torch.Generator().manual_seed(0), progress=False)
    labels = torch.arange(8).repeat(50)[None]  # (1, 400)
    points = model.sample(400, labels, torch.Generator().manual_seed(1))
    index, _ = gan.nearest_mode(points, gan.ring_centres())
    assert (index == labels).float().mean() > 0.8


# ----------------------------------------------------------------------------- training the StyleGAN2 pieces


def test_modulated_conv2d_unfused_equals_grouped():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 4, 6, 6, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    styles = torch.randn(3, 4, generator=g)
    for demod in (True, False):
        torch.testing.assert_close(
            gan.modulated_conv2d(x, weight, styles, demod, fused=False), gan.modulated_conv2d(x, weight, styles, demod)
        )
    layer = gan.ModulatedConv2d(4, 5, 3, w_dim=6)
    w = torch.randn(3, 6, generator=g)
    torch.testing.assert_close(layer.train()(x, w), layer.eval()(x, w))  # training uses the unfused form
    with pytest.raises(ValueError, match="inconsistent shapes"):
        gan.modulated_conv2d(x, weight, styles[:, :3], fused=False)


def test_mix_styles_per_sample_crossover():
    w1, w2 = torch.zeros(3, 2), torch.ones(3, 2)
    ws = gan.mix_styles(w1, w2, num_ws=4, crossover=torch.tensor([0, 2, 4]))
    assert ws.shape == (3, 4, 2)
    assert ws[0].eq(1).all() and ws[2].eq(0).all()
    assert ws[1, :2].eq(0).all() and ws[1, 2:].eq(1).all()
    with pytest.raises(ValueError, match="crossover must be in"):
        gan.mix_styles(w1, w2, 4, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="integer of shape"):
        gan.mix_styles(w1, w2, 4, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer of shape"):
        gan.mix_styles(w1, w2, 4, torch.tensor([1.0, 2.0, 3.0]))


def test_mapping_network_he_init_keeps_the_mean_square():
    z = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    he = gan.MappingNetwork(64, 64, depth=6, init="he")
    torch.manual_seed(0)
    default = gan.MappingNetwork(64, 64, depth=6)
    with torch.no_grad():
        w_he, w_default = he(z), default(z)
    assert 0.6 < w_he.pow(2).mean().item() < 1.6  # eq. (eq-ch08-signal): factor 1 per layer
    assert w_default.var(dim=0).mean().item() < 0.01 * w_he.var(dim=0).mean().item()  # factor ~0.17 per layer
    assert all(layer.bias.eq(0).all() for layer in he.net if isinstance(layer, nn.Linear))
    with pytest.raises(ValueError, match="unknown init"):
        gan.MappingNetwork(init="xavier")
    with pytest.raises(ValueError, match="unknown init"):
        gan.StyleGenerator(mapping_init="xavier")


def test_r1_penalty_of_a_linear_discriminator_is_norm_v_squared():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, generator=g, dtype=torch.float64)
    real = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64).requires_grad_()
    penalty = gan.r1_penalty(real.flatten(1) @ v + 0.3, real)
    torch.testing.assert_close(penalty, v.pow(2).sum())
    # the graph is kept: the penalty's gradient reaches the discriminator's parameters
    disc = gan.DCGANDiscriminator(width=4).double()
    gan.r1_penalty(disc(real), real).backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad and p.ndim > 1)
    with pytest.raises(ValueError, match="require gradients"):
        gan.r1_penalty(torch.zeros(5), torch.zeros(5, 1, 8, 8))
    with pytest.raises(ValueError, match="logits of shape"):
        gan.r1_penalty(torch.zeros(4), real)


def _style_gan(seed: int = 0) -> gan.GAN:
    torch.manual_seed(seed)
    generator = gan.StyleGenerator(z_dim=8, w_dim=8, channels=4, layers=3, mapping_depth=2, mapping_init="he")
    return gan.GAN(generator, gan.DCGANDiscriminator(width=4))


def test_train_style_gan_records_is_reproducible_and_slows_the_mapping():
    images = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run() -> tuple[gan.GAN, History]:
        model = _style_gan()
        return model, gan.train_style_gan(
            model, images, steps=6, batch_size=8, generator=torch.Generator().manual_seed(1), progress=False
        )

    (m1, h1), (m2, h2) = run(), run()
    assert set(h1.logs) >= {"d_loss", "g_loss", "r1", "d_real", "d_fake"} and len(h1.logs["r1"]) == 6
    assert [r > 0 for r in h1.logs["r1"]] == [True, False, False, False, True, False]  # lazy: every 4th step
    assert h1.logs["d_loss"] == h2.logs["d_loss"]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)
    start = dict(_style_gan().generator.named_parameters())
    moved = {name: (p - start[name]).abs().max().item() for name, p in m1.generator.named_parameters()}
    mapping = max(v for k, v in moved.items() if k.startswith("mapping."))
    synthesis = max(v for k, v in moved.items() if k.startswith("convs."))
    assert 0 < mapping < 0.05 * synthesis  # the mapping network learns 100x more slowly
    h = gan.train_style_gan(_style_gan(), images, steps=2, batch_size=8, r1_gamma=0.0, progress=False)
    assert h.logs["r1"] == [0.0, 0.0]
    h = gan.train_style_gan(_style_gan(), images, steps=2, batch_size=8, r1_every=1, progress=False)
    assert all(r > 0 for r in h.logs["r1"])


def test_style_gan_step_mixes_styles_per_sample():
    model = _style_gan()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: nothing moves, only the recorded numbers matter
    real = torch.rand(4, 1, 8, 8) * 2 - 1
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    g = model.generator
    torch.manual_seed(5)
    out = gan.style_gan_step(model, (real, z1, z2, torch.full((4,), g.num_ws), 0.1), opt_g=opt, opt_d=opt)
    torch.manual_seed(5)  # the same noise inputs as above
    fake = g(z1)  # crossover num_ws everywhere: no mixing
    expected = torch.sigmoid(model.discriminator(fake)).mean().item()
    assert out["d_fake"] == pytest.approx(expected, rel=1e-5)


def test_train_style_gan_errors():
    images = torch.rand(10, 1, 8, 8)
    dcgan = gan.GAN(gan.DCGANGenerator(z_dim=4, width=4), gan.DCGANDiscriminator(width=4))
    with pytest.raises(ValueError, match="StyleGenerator"):
        gan.train_style_gan(dcgan, images, steps=1)
    with pytest.raises(ValueError, match="StyleGenerator"):
        opt = torch.optim.SGD(dcgan.parameters(), lr=0.0)
        batch = (images, torch.randn(10, 4), torch.randn(10, 4), torch.ones(10), 0.0)
        gan.style_gan_step(dcgan, batch, opt_g=opt, opt_d=opt)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        gan.train_style_gan(_style_gan(), images * 2, steps=1)
    with pytest.raises(ValueError, match="steps, batch_size and r1_every"):
        gan.train_style_gan(_style_gan(), images, steps=0)
    with pytest.raises(ValueError, match="steps, batch_size and r1_every"):
        gan.train_style_gan(_style_gan(), images, steps=1, r1_every=0)
    with pytest.raises(ValueError, match="mixing_prob"):
        gan.train_style_gan(_style_gan(), images, steps=1, mixing_prob=1.5)
