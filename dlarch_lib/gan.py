"""Chapter 08: generative adversarial networks, from the minimax game to StyleGAN2's pieces.

- Theory on discrete distributions: :func:`optimal_discriminator`, :func:`gan_value`,
  :func:`js_divergence` (the value at the optimal discriminator is ``2 JSD - log 4``).
- Losses on discriminator logits: :func:`discriminator_loss`, :func:`generator_loss`
  (``"saturating"`` is the minimax loss, ``"non_saturating"`` the one used in practice).
- A DCGAN for 8x8 digits (:class:`DCGANGenerator`, :class:`DCGANDiscriminator`), the two held
  by one :class:`GAN`; the game's step :func:`gan_step` (two optimizers) and :func:`train_gan`,
  which plays it with the book's engine ``dlarch_lib.core.train.fit``.
- The sampling API of every generative model in the book: :class:`ImageGenerator`
  (``model.sample(n, generator)``), which the GAN here and the VAE of chapter 27 share.
- Scoring samples with a classifier: :func:`classifier_score` (class coverage, histogram
  entropy, confidence, Inception-style score) and :func:`frechet_distance` on its features.
- StyleGAN2 pieces at small scale: :class:`MappingNetwork`, :func:`modulated_conv2d` /
  :class:`ModulatedConv2d` (modulation, demodulation, the grouped-convolution trick),
  :class:`NoiseInjection`, :func:`mix_styles` and a tiny :class:`StyleGenerator`, trained with StyleGAN2's
  recipe at toy scale: :func:`r1_penalty`, :func:`style_gan_step` (style mixing, non-saturating loss, R1)
  and :func:`train_style_gan` (a slower mapping network, Adam ``(0, 0.99)``).
- Mode collapse on a 2-D ring of Gaussians (:func:`ring_centres`, :func:`sample_ring`,
  :func:`mode_coverage`): several runs side by side (:class:`EnsembleMLP`, :class:`ToyGAN`, optionally
  conditional on the mode), trained by :func:`train_toy_gan` with the standard loss or WGAN-GP
  (:func:`gradient_penalty`, :func:`wasserstein_losses`).

Images on the outside are ``(N, 1, 8, 8)`` in [0, 1] (as :mod:`dlarch_lib.core.data` gives them);
inside the GAN they live in [-1, 1] (tanh output), see :func:`to_signed` / :func:`to_unit`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dlarch_lib.core.train import Evaluate, History, fit, model_device

# ----------------------------------------------------------------------------- theory


def _check_distributions(p: torch.Tensor, q: torch.Tensor) -> None:
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"expected two 1-D distributions of equal length, got {tuple(p.shape)} and {tuple(q.shape)}")
    for name, t in (("p", p), ("q", q)):
        if (t < 0).any() or abs(float(t.sum()) - 1.0) > 1e-6:
            raise ValueError(f"{name} must be non-negative and sum to 1 (sums to {float(t.sum()):.6f})")


def optimal_discriminator(p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """``D*(x) = p_data(x) / (p_data(x) + p_g(x))`` on a finite support ``(K,)`` (0.5 where both are 0)."""
    _check_distributions(p_data, p_g)
    total = p_data + p_g
    return torch.where(total > 0, p_data / total.clamp_min(1e-300), torch.full_like(total, 0.5))


def gan_value(d: torch.Tensor, p_data: torch.Tensor, p_g: torch.Tensor) -> torch.Tensor:
    """``V(D, G) = E_{p_data}[log D] + E_{p_g}[log(1 - D)]`` for a discriminator ``d`` ``(K,)`` in (0, 1)."""
    _check_distributions(p_data, p_g)
    if d.shape != p_data.shape:
        raise ValueError(f"d has shape {tuple(d.shape)}, distributions have {tuple(p_data.shape)}")
    real = torch.where(p_data > 0, p_data * torch.log(d), torch.zeros_like(d))  # 0 log 0 = 0
    fake = torch.where(p_g > 0, p_g * torch.log1p(-d), torch.zeros_like(d))
    return real.sum() + fake.sum()


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum p log(p / q)`` in nats (``inf`` if p puts mass where q has none)."""
    _check_distributions(p, q)
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence ``KL(p || m)/2 + KL(q || m)/2`` with ``m = (p + q)/2``, in nats (max log 2)."""
    m = (p + q) / 2
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


# ----------------------------------------------------------------------------- losses


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``-V`` for the discriminator: ``-log D(x) - log(1 - D(G(z)))``, from logits (``D = sigmoid``)."""
    # -log sigmoid(r) = softplus(-r);  -log(1 - sigmoid(f)) = softplus(f)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, kind: str = "non_saturating") -> torch.Tensor:
    """The generator's loss from the discriminator's logits on fakes.

    ``"saturating"``: minimise ``log(1 - D(G(z))) = -softplus(f)`` (the minimax game itself);
    its gradient ``-D`` vanishes when the discriminator confidently rejects the fakes.
    ``"non_saturating"``: minimise ``-log D(G(z)) = softplus(-f)``; gradient ``-(1 - D)``.
    """
    if kind == "saturating":
        return -F.softplus(fake_logits).mean()
    if kind == "non_saturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown generator loss {kind!r}; expected 'saturating' or 'non_saturating'")


# ----------------------------------------------------------------------------- DCGAN


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2 - 1


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (clamped)."""
    return ((images + 1) / 2).clamp(0, 1)


class DCGANGenerator(nn.Module):
    """DCGAN generator for 8x8 images: ``z (B, z_dim) -> (B, 1, 8, 8)`` in [-1, 1].

    Linear to a ``(2w, 4, 4)`` map, a stride-2 transposed convolution to ``(w, 8, 8)``,
    a 3x3 convolution to one channel, tanh. Batch norm and ReLU in between, as in DCGAN.
    """

    def __init__(self, z_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        if z_dim < 1 or width < 1:
            raise ValueError(f"z_dim and width must be >= 1, got {z_dim}, {width}")
        self.z_dim, self.width = z_dim, width
        self.project = nn.Sequential(
            nn.Linear(z_dim, 2 * width * 16, bias=False), nn.BatchNorm1d(2 * width * 16), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),  # 4x4 -> 8x8
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        h = rearrange(self.project(z), "b (c h w) -> b c h w", h=4, w=4)  # (B, 2w, 4, 4)
        return self.body(h)  # (B, 1, 8, 8)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator for 8x8 images: ``(B, 1, 8, 8)`` in [-1, 1] -> logits ``(B,)``.

    Two stride-2 4x4 convolutions (8 -> 4 -> 2) with LeakyReLU(0.2), no pooling, then a linear
    layer. No batch norm on the input layer, as in DCGAN.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),  # 8 -> 4
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1),  # 4 -> 2
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"expected images of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        return self.net(x).squeeze(1)  # (B,)


class ImageGenerator(nn.Module):
    """A generative model of images with a latent code ``z ~ N(0, I)`` of size ``z_dim``.

    The book's one sampling API, shared by the GAN (this chapter) and the VAE (chapter 27): a
    subclass sets ``z_dim`` and defines :meth:`images`; :meth:`generate` and :meth:`sample` are
    inference (eval mode, no gradients, the mode restored after) on the model's own device, and
    return images on the CPU.
    """

    z_dim: int

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes ``(B, z_dim)`` -> images ``(B, C, H, W)`` in [0, 1], differentiable, in the current mode."""
        raise NotImplementedError(f"{type(self).__name__} must define images(z)")

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [0, 1] (on the CPU) for given codes ``z`` ``(B, z_dim)``, in eval mode."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        was_training = self.training
        self.eval()
        images = self.images(z.to(model_device(self))).cpu()
        self.train(was_training)
        return images

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` in [0, 1] from ``z ~ N(0, I)``, drawn on the CPU from ``generator``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self.generate(torch.randn(n, self.z_dim, generator=generator))


class GAN(ImageGenerator):
    """The two players as one module, so that moving, auditing and mode switches reach both.

    ``generator`` maps ``(B, z_dim)`` to images in [-1, 1]; ``discriminator`` maps images in
    [-1, 1] to logits ``(B,)``. As an :class:`ImageGenerator` it samples images in [0, 1].
    """

    def __init__(self, generator: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        z_dim = getattr(generator, "z_dim", None)
        if not isinstance(z_dim, int):
            raise ValueError(f"the generator needs an int attribute z_dim, {type(generator).__name__} has none")
        self.generator, self.discriminator, self.z_dim = generator, discriminator, z_dim

    def images(self, z: torch.Tensor) -> torch.Tensor:
        return to_unit(self.generator(z))


def gan_step(
    model: GAN,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    loss: str = "non_saturating",
) -> dict[str, float]:
    """One round of the game: a discriminator update, then a generator update (for ``fit(optimizer=None)``).

    ``batch`` is real images ``(B, 1, H, W)`` in [-1, 1] and codes ``z`` ``(B, z_dim)``. Bind the two
    optimizers with ``functools.partial``; returns the numbers :func:`train_gan` records.
    """
    real, z = batch
    G, D = model.generator, model.discriminator
    fake = G(z)  # (B, 1, H, W)
    # discriminator: fakes detached, so only D learns from this loss
    real_logits, fake_logits = D(real), D(fake.detach())
    d_loss = discriminator_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()
    # generator: through the (just updated) discriminator
    g_loss = generator_loss(D(fake), loss)
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {
        "d_loss": d_loss.item(),
        "g_loss": g_loss.item(),
        "d_real": torch.sigmoid(real_logits).mean().item(),  # mean D(x) on the real batch
        "d_fake": torch.sigmoid(fake_logits).mean().item(),  # mean D(G(z)) on the fake batch
    }


def _real_and_noise(
    images: torch.Tensor, batch_size: int, z_dim: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches for :func:`gan_step`: ``batch_size`` real images drawn with replacement, fresh ``z``."""
    while True:
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        yield images[index], torch.randn(batch_size, z_dim, generator=generator)


def _check_real_images(images: torch.Tensor) -> None:
    """Raise unless ``images`` are real images ``(N, 1, H, W)`` with values in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected real images (N, 1, H, W), got {tuple(images.shape)}")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError("real images must be in [0, 1]")


def train_gan(
    model: GAN,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    loss: str = "non_saturating",
    generator: torch.Generator | None = None,
    evaluate: Evaluate | None = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> History:
    """Play :func:`gan_step` ``steps`` times on real ``images`` ``(N, 1, H, W)`` in [0, 1] (Adam, DCGAN settings).

    Trains on the model's device (move it there first). The real batches and the codes ``z`` are
    drawn from ``generator`` (the global generator if ``None``). ``evaluate(model)`` runs every
    ``eval_every`` steps (e.g. to keep samples of a fixed ``z``). The history's ``logs`` hold
    ``d_loss``, ``g_loss``, ``d_real`` and ``d_fake`` per step.
    """
    _check_real_images(images)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    generator_loss(torch.zeros(1), loss)  # validates ``loss`` before any work
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)
    step = functools.partial(gan_step, opt_g=opt_g, opt_d=opt_d, loss=loss)
    data = _real_and_noise(to_signed(images), batch_size, model.z_dim, generator)
    return fit(
        model,
        data,
        step,
        steps=steps,
        optimizer=None,
        evaluate=evaluate,
        eval_every=eval_every,
        progress=progress,
        desc="GAN",
    )


# ----------------------------------------------------------------------------- scoring


def _batched(
    fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``fn`` over ``images`` in batches moved to ``device``; the results joined on the CPU."""
    return torch.cat([fn(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features ``(N, F)`` from ``classifier.features`` for images ``(N, 1, H, W)`` in [0, 1].

    Runs on the classifier's device; the features come back on the CPU in float64.
    """
    features = getattr(classifier, "features", None)
    if not callable(features):
        raise ValueError(f"{type(classifier).__name__} has no features(x) method")
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got {tuple(images.shape)}")
    was_training = classifier.training
    classifier.eval()
    feats = _batched(features, images, batch_size, model_device(classifier)).double()
    classifier.train(was_training)
    if feats.ndim != 2:
        raise ValueError(f"features(x) must return (N, F), got {tuple(feats.shape)}")
    return feats


@torch.no_grad()
def classifier_score(
    classifier: nn.Module, images: torch.Tensor, num_classes: int = 10, min_share: float = 0.02, batch_size: int = 512
) -> dict[str, float]:
    """Score a set of images ``(N, 1, H, W)`` in [0, 1] with a trained classifier (on its own device).

    - ``coverage``: classes that receive at least ``min_share`` of the predicted labels;
    - ``entropy``: entropy (nats) of the predicted-label histogram (``log num_classes`` if uniform);
    - ``confidence``: mean max softmax probability (sharp, recognisable digits score high);
    - ``inception_score``: ``exp(E_x KL(p(y|x) || p(y)))``, between 1 and ``num_classes``.
    """
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty batch of images (N, C, H, W), got {tuple(images.shape)}")
    was_training = classifier.training
    classifier.eval()
    logits = _batched(classifier, images, batch_size, model_device(classifier)).double()  # (N, C)
    classifier.train(was_training)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"classifier returned {tuple(logits.shape)}, expected (N, {num_classes})")
    probs = logits.softmax(dim=1)  # p(y|x)
    hist = torch.bincount(probs.argmax(dim=1), minlength=num_classes).double() / len(probs)
    entropy = -(hist[hist > 0] * hist[hist > 0].log()).sum()
    marginal = probs.mean(dim=0)  # p(y)
    kl = (probs * (probs.clamp_min(1e-30).log() - marginal.clamp_min(1e-30).log())).sum(dim=1)  # (N,)
    return {
        "coverage": int((hist >= min_share).sum()),
        "entropy": float(entropy),
        "confidence": float(probs.max(dim=1).values.mean()),
        "inception_score": float(kl.mean().exp()),
    }


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance_gaussians(
    mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    """Squared Fréchet (2-Wasserstein) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``.

    ``|mu_a - mu_b|^2 + tr(cov_a + cov_b - 2 (cov_a^{1/2} cov_b cov_a^{1/2})^{1/2})``.
    """
    if mu_a.ndim != 1 or mu_a.shape != mu_b.shape or cov_a.shape != (len(mu_a),) * 2 or cov_b.shape != cov_a.shape:
        raise ValueError(
            f"shapes do not match: mu {tuple(mu_a.shape)}, {tuple(mu_b.shape)}; "
            f"cov {tuple(cov_a.shape)}, {tuple(cov_b.shape)}"
        )
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)  # (cov_a cov_b)^{1/2} has the same trace
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N_a, F)`` and ``(N_b, F)``.

    With Inception features this is the FID; the book uses a digits classifier's features.
    """
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"expected features (N_a, F) and (N_b, F), got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("need at least 2 samples in each set to estimate a covariance")
    a, b = feats_a.double(), feats_b.double()
    return frechet_distance_gaussians(
        a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1), b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1)
    )


# ----------------------------------------------------------------------------- StyleGAN2 pieces


MAPPING_INITS = ("default", "he")


class MappingNetwork(nn.Module):
    """StyleGAN's mapping ``f: z -> w``: normalise ``z`` to unit RMS, then an MLP with LeakyReLU(0.2).

    ``(B, z_dim) -> (B, w_dim)``. (StyleGAN uses 8 layers and a 100x lower learning rate here.)
    ``init="default"`` keeps ``nn.Linear``'s initialisation, under which every layer shrinks the signal,
    so ``w`` barely depends on ``z``; ``init="he"`` draws weights from ``N(0, 2 / ((1 + a^2) fan_in))``
    (``a = 0.2``, the LeakyReLU slope) with zero biases, which keeps the mean square of the activations
    at 1 through the layers, as StyleGAN's equalised learning rate does at initialisation.
    """

    def __init__(self, z_dim: int = 32, w_dim: int = 32, depth: int = 4, init: str = "default") -> None:
        super().__init__()
        if min(z_dim, w_dim, depth) < 1:
            raise ValueError(f"z_dim, w_dim and depth must be >= 1, got {z_dim}, {w_dim}, {depth}")
        if init not in MAPPING_INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {MAPPING_INITS}")
        self.z_dim, self.w_dim = z_dim, w_dim
        layers: list[nn.Module] = []
        for i in range(depth):
            linear = nn.Linear(z_dim if i == 0 else w_dim, w_dim)
            if init == "he":
                nn.init.normal_(linear.weight, std=math.sqrt(2 / ((1 + 0.2**2) * linear.in_features)))
                nn.init.zeros_(linear.bias)
            layers += [linear, nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm
        return self.net(z)


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    eps: float = 1e-8,
    fused: bool = True,
) -> torch.Tensor:
    """StyleGAN2's modulated convolution, one weight per sample, as a single grouped convolution.

    ``x (B, I, H, W)``, ``weight (O, I, k, k)``, ``styles (B, I)`` -> ``(B, O, H, W)`` ('same' padding).
    Modulate: ``w'_{bij..} = s_{bi} w_{ij..}``; demodulate: divide each output filter by
    ``sqrt(sum_{i,k} w'^2 + eps)`` so unit-variance inputs give unit-variance outputs.
    ``fused=False`` computes the same thing without per-sample weights: scale the input channels by
    ``s``, run one shared ``conv2d``, multiply each output channel by its demodulation factor (faster
    on a CPU and in training; StyleGAN2's code trains this way).
    """
    if x.ndim != 4 or weight.ndim != 4 or styles.ndim != 2:
        raise ValueError(
            "expected x (B, I, H, W), weight (O, I, k, k), styles (B, I); "
            f"got {tuple(x.shape)}, {tuple(weight.shape)}, {tuple(styles.shape)}"
        )
    b, i = x.shape[:2]
    o, _, k, k2 = weight.shape
    if weight.shape[1] != i or styles.shape != (b, i) or k != k2 or k % 2 == 0:
        raise ValueError(
            f"inconsistent shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)} (odd square kernel), "
            f"styles {tuple(styles.shape)}"
        )
    if not fused:
        out = F.conv2d(x * styles[:, :, None, None], weight, padding=k // 2)  # (B, O, H, W)
        if demodulate:  # sum_{i,k} (s_i w_oik)^2 = sum_i s_i^2 sum_k w_oik^2
            out = out * torch.rsqrt(styles.pow(2) @ weight.pow(2).sum(dim=(2, 3)).T + eps)[:, :, None, None]
        return out
    w = weight[None] * styles[:, None, :, None, None]  # (B, O, I, k, k)
    if demodulate:
        w = w * torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4), keepdim=True) + eps)
    # grouped-conv trick: the batch becomes B groups of one big (B*I)-channel image
    out = F.conv2d(
        rearrange(x, "b i h w -> 1 (b i) h w"), rearrange(w, "b o i k l -> (b o) i k l"), padding=k // 2, groups=b
    )
    return rearrange(out, "1 (b o) h w -> b o h w", b=b)


class ModulatedConv2d(nn.Module):
    """A modulated convolution layer: an affine map ``A: w -> s`` (bias 1) and :func:`modulated_conv2d`.

    ``forward(x (B, I, H, W), w (B, w_dim)) -> (B, O, H, W)``. The weight is stored as N(0, 1) and
    scaled by ``1/sqrt(fan_in)`` at run time (equalised learning rate). In training mode the layer uses
    the unfused form of :func:`modulated_conv2d` (same result, faster), in eval mode the grouped one.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, w_dim: int, demodulate: bool = True
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.ones_(self.affine.bias)  # styles start near 1: the layer starts as a plain convolution
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w)  # (B, I)
        return modulated_conv2d(x, self.weight * self.scale, styles, self.demodulate, fused=not self.training)


class NoiseInjection(nn.Module):
    """Add per-pixel Gaussian noise with a learned per-channel strength (initialised to 0).

    ``x (B, C, H, W) + strength[c] * noise (B, 1, H, W)``: the noise is shared across channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        if noise.shape != (x.shape[0], 1, *x.shape[2:]):
            raise ValueError(f"noise must have shape {(x.shape[0], 1, *x.shape[2:])}, got {tuple(noise.shape)}")
        return x + self.strength * noise


def mix_styles(w1: torch.Tensor, w2: torch.Tensor, num_ws: int, crossover: int | torch.Tensor) -> torch.Tensor:
    """Style mixing: ``(B, w_dim)`` x 2 -> ``(B, num_ws, w_dim)``, ``w1`` for layers ``< crossover``, then ``w2``.

    ``crossover`` is one int for the whole batch or an integer tensor ``(B,)``, one crossover per sample.
    """
    if w1.shape != w2.shape or w1.ndim != 2:
        raise ValueError(f"expected two (B, w_dim) tensors of equal shape, got {tuple(w1.shape)} and {tuple(w2.shape)}")
    if isinstance(crossover, torch.Tensor):
        if crossover.shape != (len(w1),) or crossover.is_floating_point():
            raise ValueError(f"a crossover tensor must be integer of shape ({len(w1)},), got {tuple(crossover.shape)}")
        bad = bool(((crossover < 0) | (crossover > num_ws)).any())
        cut = crossover.to(w1.device)[:, None, None]  # (B, 1, 1)
    else:
        bad, cut = not 0 <= crossover <= num_ws, torch.tensor(crossover, device=w1.device)
    if bad:
        raise ValueError(f"crossover must be in [0, {num_ws}], got {crossover}")
    layer = torch.arange(num_ws, device=w1.device)[None, :, None]  # (1, L, 1)
    return torch.where(layer < cut, w1[:, None], w2[:, None])  # (B, L, w_dim)


class StyleGenerator(nn.Module):
    """A tiny StyleGAN2-style generator for 8x8 images: ``z (B, z_dim) -> (B, 1, 8, 8)`` in [-1, 1].

    A learned constant ``(C, 4, 4)``; synthesis layers ``modconv 3x3 -> noise -> bias -> LeakyReLU``
    (the first at 4x4, the rest after nearest 2x upsampling at 8x8); a 1x1 ``toRGB`` modulated
    convolution without demodulation. Layer ``l`` reads style ``ws[:, l]``; ``num_ws = layers + 1``.
    ``mapping_init`` is the :class:`MappingNetwork`'s ``init`` (``"he"`` to train it, see there).
    """

    def __init__(
        self,
        z_dim: int = 32,
        w_dim: int = 32,
        channels: int = 32,
        layers: int = 3,
        mapping_depth: int = 4,
        mapping_init: str = "default",
    ) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError(f"layers must be >= 2 (one at 4x4, one at 8x8), got {layers}")
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, layers + 1
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_depth, init=mapping_init)
        self.const = nn.Parameter(torch.randn(1, channels, 4, 4))
        self.convs = nn.ModuleList(ModulatedConv2d(channels, channels, 3, w_dim) for _ in range(layers))
        self.noises = nn.ModuleList(NoiseInjection(channels) for _ in range(layers))
        self.biases = nn.Parameter(torch.zeros(layers, channels))
        self.to_rgb = ModulatedConv2d(channels, 1, 1, w_dim, demodulate=False)

    def synthesis(self, ws: torch.Tensor, noise: bool = True) -> torch.Tensor:
        """Per-layer styles ``ws (B, num_ws, w_dim)`` -> images ``(B, 1, 8, 8)``; ``noise=False`` turns noise off."""
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"expected ws of shape (B, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        x = self.const.expand(ws.shape[0], -1, -1, -1)  # (B, C, 4, 4)
        for layer, (conv, inject) in enumerate(zip(self.convs, self.noises)):
            if layer == 1:
                x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 8, 8)
            x = conv(x, ws[:, layer])
            x = inject(x, None if noise else torch.zeros_like(x[:, :1]))
            x = F.leaky_relu(x + self.biases[layer][None, :, None, None], 0.2)
        return torch.tanh(self.to_rgb(x, ws[:, -1]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.mapping(z)  # (B, w_dim)
        return self.synthesis(w[:, None].expand(-1, self.num_ws, -1))


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The R1 penalty ``E_x ||grad_x D(x)||^2`` on real samples (Mescheder et al. 2018), graph kept.

    ``real (B, ...)`` must require gradients and ``real_logits (B,)`` be the discriminator's logits computed
    from it (so the forward pass is shared with the loss). Each sample must be scored on its own (no batch
    norm) for the gradient of the summed logits to be each sample's own gradient. StyleGAN2 adds
    ``gamma / 2`` times this to the discriminator's loss: it pushes the discriminator's gradient on the
    data towards 0, which damps the oscillation of the game near its equilibrium.
    """
    if not real.requires_grad:
        raise ValueError("real must require gradients (call real.requires_grad_() before scoring it)")
    if real_logits.shape != real.shape[:1]:
        raise ValueError(f"expected logits of shape ({len(real)},), got {tuple(real_logits.shape)}")
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


def style_gan_step(
    model: GAN,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
    *,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
) -> dict[str, float]:
    """One round of the game for a :class:`StyleGenerator`: style mixing, non-saturating loss, R1.

    ``batch`` is real images ``(B, 1, H, W)`` in [-1, 1], two codes ``z1, z2`` ``(B, z_dim)``, a crossover
    ``(B,)`` per sample (``num_ws``: no mixing) and this step's R1 weight ``gamma`` (0: no penalty). The
    fakes take their first ``crossover`` styles from ``z1`` and the rest from ``z2`` (:func:`mix_styles`).
    The discriminator minimises :func:`discriminator_loss` plus ``gamma / 2`` times :func:`r1_penalty`; the
    generator minimises the non-saturating :func:`generator_loss` through the updated discriminator.
    """
    real, z1, z2, crossover, r1_gamma = batch
    G, D = model.generator, model.discriminator
    if not isinstance(G, StyleGenerator):
        raise ValueError(f"style_gan_step needs a StyleGenerator, got {type(G).__name__}")
    ws = mix_styles(G.mapping(z1), G.mapping(z2), G.num_ws, crossover)  # (B, num_ws, w_dim)
    fake = G.synthesis(ws)  # (B, 1, H, W)
    real = real.detach().requires_grad_(r1_gamma > 0)
    real_logits, fake_logits = D(real), D(fake.detach())
    d_loss = discriminator_loss(real_logits, fake_logits)
    penalty = r1_penalty(real_logits, real) if r1_gamma > 0 else torch.zeros((), device=real.device)
    opt_d.zero_grad(set_to_none=True)
    (d_loss + r1_gamma / 2 * penalty).backward()
    opt_d.step()
    g_loss = generator_loss(D(fake), "non_saturating")
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    return {
        "d_loss": d_loss.item(),
        "g_loss": g_loss.item(),
        "r1": penalty.item(),
        "d_real": torch.sigmoid(real_logits).mean().item(),
        "d_fake": torch.sigmoid(fake_logits).mean().item(),
    }


def train_style_gan(
    model: GAN,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.0, 0.99),
    mapping_lr: float = 0.01,
    mixing_prob: float = 0.9,
    r1_gamma: float = 0.1,
    r1_every: int = 4,
    generator: torch.Generator | None = None,
    evaluate: Evaluate | None = None,
    eval_every: int | None = None,
    progress: bool = True,
) -> History:
    """Train a GAN whose generator is a :class:`StyleGenerator` with StyleGAN2's recipe, at toy scale.

    Adam with ``betas`` (StyleGAN2: ``(0, 0.99)``) and learning rate ``lr``, the mapping network's scaled
    by ``mapping_lr`` (StyleGAN: 0.01); style-mixing regularisation: a fraction ``mixing_prob`` of the
    fakes mix two codes at a crossover uniform in ``[1, num_ws)``; R1 of weight ``r1_gamma``
    (:func:`style_gan_step`), applied lazily as in StyleGAN2: on every ``r1_every``-th step, with weight
    ``r1_gamma * r1_every``, which costs a double backward pass only on those steps. Real batches, codes and
    crossovers are drawn on the CPU from ``generator``.
    """
    G = model.generator
    if not isinstance(G, StyleGenerator):
        raise ValueError(f"train_style_gan needs a GAN whose generator is a StyleGenerator, got {type(G).__name__}")
    _check_real_images(images)
    if steps < 1 or batch_size < 1 or r1_every < 1:
        raise ValueError(f"steps, batch_size and r1_every must be >= 1, got {steps}, {batch_size}, {r1_every}")
    if not 0 <= mixing_prob <= 1 or r1_gamma < 0 or mapping_lr <= 0:
        raise ValueError(
            f"need 0 <= mixing_prob <= 1, r1_gamma >= 0, mapping_lr > 0; got {mixing_prob}, {r1_gamma}, {mapping_lr}"
        )
    synthesis = [p for name, p in G.named_parameters() if not name.startswith("mapping.")]
    groups: list[dict[str, Any]] = [
        {"params": synthesis},
        {"params": list(G.mapping.parameters()), "lr": lr * mapping_lr},  # StyleGAN: 100x slower mapping
    ]
    opt_g = torch.optim.Adam(groups, lr=lr, betas=betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=betas)
    signed, num_ws = to_signed(images), G.num_ws

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
        for k in itertools.count():
            index = torch.randint(0, len(signed), (batch_size,), generator=generator)
            z = torch.randn(2, batch_size, G.z_dim, generator=generator)
            cut = torch.randint(1, num_ws, (batch_size,), generator=generator)
            mix = torch.rand(batch_size, generator=generator) < mixing_prob
            gamma = r1_gamma * r1_every if k % r1_every == 0 else 0.0  # lazy R1
            yield signed[index], z[0], z[1], torch.where(mix, cut, num_ws), gamma

    step = functools.partial(style_gan_step, opt_g=opt_g, opt_d=opt_d)
    return fit(
        model,
        batches(),
        step,
        steps=steps,
        optimizer=None,
        evaluate=evaluate,
        eval_every=eval_every,
        progress=progress,
        desc="StyleGAN",
    )


# ----------------------------------------------------------------------------- 2-D testbed
# Mode collapse, WGAN-GP and conditioning on a ring of Gaussians.
#
# Shapes: ``R`` independent training runs are held side by side in one module (one weight matrix per run,
# multiplied with ``torch.baddbmm``), so a few seeds train for little more than the price of one on a CPU.
# Points are ``(R, B, 2)``, labels ``(R, B)``, codes ``(R, B, z_dim)``.


def ring_centres(modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """The ``modes`` centres ``(K, 2)`` evenly spaced on a circle of ``radius``, the first at angle 0."""
    if modes < 1 or radius <= 0:
        raise ValueError(f"modes must be >= 1 and radius > 0, got {modes}, {radius}")
    angle = 2 * math.pi * torch.arange(modes, dtype=torch.float32) / modes  # (K,)
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)


def sample_ring(
    n: int,
    *,
    runs: int = 1,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.05,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``modes`` equal Gaussians (standard deviation ``std``) on a ring: points ``(runs, n, 2)``, labels ``(runs, n)``.

    The mode of each point is uniform unless ``labels`` ``(runs, n)`` fixes it; everything is drawn on the
    CPU from ``generator``.
    """
    if n < 1 or runs < 1 or std <= 0:
        raise ValueError(f"n and runs must be >= 1 and std > 0, got {n}, {runs}, {std}")
    if labels is None:
        labels = torch.randint(0, modes, (runs, n), generator=generator)
    elif labels.shape != (runs, n) or int(labels.min()) < 0 or int(labels.max()) >= modes:
        raise ValueError(f"labels must be (runs, n) = {(runs, n)} in [0, {modes}), got {tuple(labels.shape)}")
    centres = ring_centres(modes, radius)[labels]  # (runs, n, 2)
    return centres + std * torch.randn(runs, n, 2, generator=generator), labels


def nearest_mode(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For points ``(..., 2)``: the index of the nearest centre ``(...)`` and the distance to it ``(...)``."""
    if points.shape[-1] != centres.shape[-1] or centres.ndim != 2:
        raise ValueError(
            f"points (..., D) and centres (K, D) must agree, got {tuple(points.shape)}, {tuple(centres.shape)}"
        )
    dist = torch.linalg.vector_norm(points[..., None, :] - centres.to(points), dim=-1)  # (..., K)
    d, index = dist.min(dim=-1)
    return index, d


def mode_coverage(
    points: torch.Tensor, centres: torch.Tensor, std: float, *, within: float = 3.0, min_share: float = 0.25
) -> dict[str, float]:
    """How many modes a sample ``(n, 2)`` of one generator covers, and how many of its points are good.

    A point is *high quality* when it lies within ``within * std`` of its nearest centre; a mode is
    *covered* when at least ``min_share`` of its fair share ``n / K`` of high-quality points lands on it.
    Returns ``modes`` (an int, 0 to K), ``high_quality`` (a fraction) and ``balance`` (the smallest
    covered mode's count over the largest mode's count, 0 if none covered).
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"expected a non-empty sample (n, 2) of one generator, got {tuple(points.shape)}")
    if std <= 0 or within <= 0 or not 0 < min_share <= 1:
        raise ValueError(f"need std > 0, within > 0 and 0 < min_share <= 1, got {std}, {within}, {min_share}")
    index, dist = nearest_mode(points, centres)
    good = dist < within * std  # (n,)
    counts = torch.bincount(index[good], minlength=len(centres)).float()  # (K,)
    covered = counts >= min_share * len(points) / len(centres)
    balance = float(counts[covered].min() / counts.max()) if covered.any() else 0.0
    return {"modes": int(covered.sum()), "high_quality": float(good.float().mean()), "balance": balance}


class EnsembleLinear(nn.Module):
    """``runs`` independent linear layers applied side by side: ``(R, B, in) -> (R, B, out)``.

    Run ``r`` computes ``x[r] @ weight[r] + bias[r]``, i.e. ``F.linear(x[r], weight[r].T, bias[r])``;
    initialised as ``nn.Linear`` is (uniform in ``+-1/sqrt(in)``), from the global generator.
    """

    def __init__(self, runs: int, in_features: int, out_features: int) -> None:
        super().__init__()
        if min(runs, in_features, out_features) < 1:
            raise ValueError(
                f"runs, in_features and out_features must be >= 1, got {runs}, {in_features}, {out_features}"
            )
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(runs, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(runs, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs, fan_in = self.weight.shape[:2]
        if x.ndim != 3 or x.shape[0] != runs or x.shape[2] != fan_in:
            raise ValueError(f"expected x of shape ({runs}, B, {fan_in}), got {tuple(x.shape)}")
        return torch.baddbmm(self.bias, x, self.weight)  # (R, B, out)


class EnsembleMLP(nn.Module):
    """``runs`` independent MLPs ``in -> hidden -> hidden -> out`` (ReLU): ``(R, B, in) -> (R, B, out)``."""

    def __init__(self, runs: int, in_features: int, out_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.runs, self.in_features = runs, in_features
        self.net = nn.Sequential(
            EnsembleLinear(runs, in_features, hidden),
            nn.ReLU(),
            EnsembleLinear(runs, hidden, hidden),
            nn.ReLU(),
            EnsembleLinear(runs, hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def member(self, run: int) -> nn.Sequential:
        """Run ``run`` as a plain ``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU`` (a copy, for checking)."""
        if not 0 <= run < self.runs:
            raise ValueError(f"run must be in [0, {self.runs}), got {run}")
        layers: list[nn.Module] = []
        for layer in self.net:
            if isinstance(layer, EnsembleLinear):
                linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
                with torch.no_grad():
                    linear.weight.copy_(layer.weight[run].T)
                    linear.bias.copy_(layer.bias[run, 0])
                layers.append(linear)
            else:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).to(model_device(self))


class ToyGAN(nn.Module):
    """``runs`` GANs on 2-D points, side by side; conditional on a label in ``[0, num_classes)`` if ``num_classes > 0``.

    The generator maps ``[z, onehot(y)]`` ``(R, B, z_dim + C)`` to points ``(R, B, 2)``; the critic (the
    discriminator) maps ``[x, onehot(y)]`` ``(R, B, 2 + C)`` to scores ``(R, B)``. Conditioning by
    concatenating the label to both inputs is the conditional GAN of Mirza and Osindero.
    """

    def __init__(self, runs: int = 1, z_dim: int = 2, hidden: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        if min(runs, z_dim, hidden) < 1 or num_classes < 0:
            raise ValueError(
                f"runs, z_dim, hidden must be >= 1 and num_classes >= 0, got {runs}, {z_dim}, {hidden}, {num_classes}"
            )
        self.runs, self.z_dim, self.num_classes = runs, z_dim, num_classes
        self.generator = EnsembleMLP(runs, z_dim + num_classes, 2, hidden)
        self.critic = EnsembleMLP(runs, 2 + num_classes, 1, hidden)

    def _with_labels(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.num_classes == 0:
            if labels is not None:
                raise ValueError("this ToyGAN is unconditional (num_classes=0): pass no labels")
            return x
        if labels is None or labels.shape != x.shape[:2]:
            got = None if labels is None else tuple(labels.shape)
            raise ValueError(f"a conditional ToyGAN needs labels of shape {tuple(x.shape[:2])}, got {got}")
        return torch.cat([x, F.one_hot(labels, self.num_classes).to(x)], dim=-1)  # (R, B, D + C)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``z`` ``(R, B, z_dim)`` (and labels ``(R, B)``) -> points ``(R, B, 2)``, differentiable."""
        return self.generator(self._with_labels(z, labels))

    def score(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Points ``(R, B, 2)`` (and labels) -> critic scores (logits for a standard GAN) ``(R, B)``."""
        return self.critic(self._with_labels(x, labels)).squeeze(-1)

    @torch.no_grad()
    def sample(
        self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``n`` points per run ``(R, n, 2)`` on the CPU, ``z ~ N(0, I)`` drawn on the CPU from ``generator``."""
        z = torch.randn(self.runs, n, self.z_dim, generator=generator)
        device = model_device(self)
        return self.generate(z.to(device), None if labels is None else labels.to(device)).cpu()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    t: torch.Tensor | None = None,
    *,
    event_dims: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WGAN-GP's penalty ``E[(||grad f(x_hat)|| - 1)^2]`` at ``x_hat = t real + (1 - t) fake``, ``t ~ U(0, 1)``.

    ``real`` and ``fake`` have shape ``batch + event`` where the last ``event_dims`` dimensions make one
    sample (1 for points ``(..., D)``, 3 for images ``(B, C, H, W)``). ``t`` has shape ``batch + (1,) *
    event_dims`` (drawn on the CPU from ``generator`` if ``None``). The critic must score every sample on
    its own (no batch norm), so the gradient of the sum of its scores is each sample's own gradient.
    The result keeps the graph (``create_graph=True``): its gradient reaches the critic's parameters.
    """
    if real.shape != fake.shape or not 1 <= event_dims < real.ndim:
        raise ValueError(
            f"real and fake must share a shape with 1 <= event_dims < ndim, got {tuple(real.shape)}, "
            f"{tuple(fake.shape)}, event_dims={event_dims}"
        )
    t_shape = real.shape[: real.ndim - event_dims] + (1,) * event_dims
    if t is None:
        t = torch.rand(t_shape, generator=generator).to(real)
    elif t.shape != t_shape:
        raise ValueError(f"t must have shape {tuple(t_shape)}, got {tuple(t.shape)}")
    x_hat = (t * real + (1 - t) * fake.detach()).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    norms = torch.linalg.vector_norm(grad, dim=tuple(range(-event_dims, 0)))  # batch shape
    return (norms - 1).pow(2).mean()


def wasserstein_losses(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The WGAN losses from critic scores ``(...)``: critic ``E f(fake) - E f(real)``, generator ``-E f(fake)``.

    The critic's loss is minus the dual estimate of ``W1`` (Kantorovich-Rubinstein) for a 1-Lipschitz critic.
    """
    return fake_scores.mean() - real_scores.mean(), -fake_scores.mean()


TOY_LOSSES = ("non_saturating", "wgan_gp")


def toy_gan_step(
    model: ToyGAN,
    batch: tuple[torch.Tensor, ...],
    *,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    loss: str = "non_saturating",
    gp_weight: float = 1.0,
) -> dict[str, float]:
    """``n`` critic updates, then one generator update, for every run of a :class:`ToyGAN` at once.

    ``batch`` (from :func:`train_toy_gan`): real points ``(n, R, B, 2)`` with labels ``(n, R, B)``, codes
    ``(n + 1, R, B, z_dim)``, labels for the generator's update ``(R, B)`` and interpolation weights
    ``(n, R, B, 1)``. A critic update's fakes get the labels of its real batch (ignored if unconditional).
    ``loss`` is ``"non_saturating"`` (the standard GAN) or ``"wgan_gp"`` (Wasserstein critic plus the
    gradient penalty of weight ``gp_weight``).
    """
    real, real_labels, z, gen_labels, t = batch
    cond = model.num_classes > 0
    critic_loss = torch.zeros(())
    for k in range(len(real)):
        y = real_labels[k] if cond else None  # (R, B)
        fake = model.generate(z[k], y).detach()  # (R, B, 2)
        real_scores, fake_scores = model.score(real[k], y), model.score(fake, y)  # (R, B) each
        if loss == "wgan_gp":
            penalty = gradient_penalty(functools.partial(model.score, labels=y), real[k], fake, t[k])
            critic_loss = wasserstein_losses(real_scores, fake_scores)[0] + gp_weight * penalty
        else:
            critic_loss = discriminator_loss(real_scores, fake_scores)
        opt_d.zero_grad(set_to_none=True)
        (critic_loss * model.runs).backward()  # the runs are independent: each gets the gradient of its own mean
        opt_d.step()
    y = gen_labels if cond else None
    fake_scores = model.score(model.generate(z[-1], y), y)  # (R, B)
    gen_loss = -fake_scores.mean() if loss == "wgan_gp" else generator_loss(fake_scores)
    opt_g.zero_grad(set_to_none=True)
    (gen_loss * model.runs).backward()
    opt_g.step()
    return {"d_loss": critic_loss.item(), "g_loss": gen_loss.item()}


def train_toy_gan(
    model: ToyGAN,
    *,
    steps: int,
    loss: str = "non_saturating",
    n_critic: int = 1,
    gp_weight: float = 1.0,
    batch_size: int = 256,
    lr: float = 2e-3,
    betas: tuple[float, float] = (0.5, 0.9),
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.05,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> History:
    """Train every run of ``model`` on the ring of :func:`sample_ring` for ``steps`` generator updates.

    Each step makes ``n_critic`` critic updates and one generator update (:func:`toy_gan_step`, Adam).
    Real points, labels, codes and interpolation weights are drawn on the CPU from ``generator``; a
    conditional model (``num_classes == modes``) draws the fakes' labels uniformly.
    """
    if loss not in TOY_LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {TOY_LOSSES}")
    if steps < 1 or n_critic < 1 or batch_size < 1:
        raise ValueError(f"steps, n_critic and batch_size must be >= 1, got {steps}, {n_critic}, {batch_size}")
    if model.num_classes not in (0, modes):
        raise ValueError(f"a conditional model needs num_classes == modes ({modes}), got {model.num_classes}")
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(model.critic.parameters(), lr=lr, betas=betas)
    runs, n = model.runs, n_critic

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            real, real_labels = sample_ring(
                n * batch_size, runs=runs, modes=modes, radius=radius, std=std, generator=generator
            )
            real = rearrange(real, "r (n b) d -> n r b d", n=n)  # (n, R, B, 2)
            real_labels = rearrange(real_labels, "r (n b) -> n r b", n=n)
            z = torch.randn(n + 1, runs, batch_size, model.z_dim, generator=generator)
            gen_labels = torch.randint(0, modes, (runs, batch_size), generator=generator)
            t = torch.rand(n, runs, batch_size, 1, generator=generator)
            yield real, real_labels, z, gen_labels, t

    step = functools.partial(toy_gan_step, opt_g=opt_g, opt_d=opt_d, loss=loss, gp_weight=gp_weight)
    return fit(model, batches(), step, steps=steps, optimizer=None, progress=progress, desc=loss)
