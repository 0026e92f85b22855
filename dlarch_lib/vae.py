"""Chapter 27: the variational autoencoder (VAE), and what it is good for next to a GAN.

- The two pieces of the ELBO: :func:`gaussian_kl` (``KL(N(mu, diag sigma^2) || N(0, I))`` in
  closed form) and :func:`reparameterize` (``z = mu + sigma * eps``).
- Two gradient estimators of ``d/d mu, d/d log sigma^2`` of ``E_q[f(z)]``:
  :func:`pathwise_gradient` (reparameterisation) and :func:`score_function_gradient` (REINFORCE).
- A small MLP :class:`VAE` for 8x8 digits in [0, 1] (Bernoulli/BCE decoder), :func:`elbo_terms`,
  :func:`negative_elbo`, the training step :func:`elbo_step` and :func:`train_vae` (through the
  book's engine ``dlarch_lib.core.train.fit``), :func:`reconstruct`, :func:`interpolate`. The VAE
  samples through chapter 8's :class:`~dlarch_lib.gan.ImageGenerator` API: ``model.sample(n, generator)``.
- beta-VAE and KL annealing: ``train_vae(..., beta=, warmup_steps=)`` through :func:`beta_elbo_step`;
  :func:`active_units` (Burda et al.'s activity statistic) to count the latent units in use.
- Forward versus reverse KL in one dimension: :func:`kl_on_grid`, :func:`fit_gaussian_kl`.
- Uses: :func:`roc_auc` (anomaly detection scored by -ELBO) and :func:`augment_by_posterior`
  (extra labelled images decoded from ``q(z|x)`` of the few labelled ones).

Images are ``(N, 1, 8, 8)`` in [0, 1] as :mod:`dlarch_lib.core.data` gives them; all nats are per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dlarch_lib.core.data import TensorBatches
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import History, Step, fit, model_device
from dlarch_lib.gan import ImageGenerator

# ----------------------------------------------------------------------------- the two ELBO pieces


def _check_gaussian(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    if mu.shape != logvar.shape or mu.ndim != 2:
        raise ValueError(
            f"expected mu and logvar of equal shape (B, z_dim), got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag exp(logvar)) || N(0, I))`` per row, in nats: ``(B, z) -> (B,)``.

    ``1/2 sum_j (mu_j^2 + sigma_j^2 - log sigma_j^2 - 1)``.
    """
    _check_gaussian(mu, logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(dim=1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """``z = mu + exp(logvar / 2) * eps`` with ``eps ~ N(0, I)`` (drawn if not given): ``(B, z) -> (B, z)``.

    The randomness sits in ``eps``, so ``z`` is a differentiable function of ``mu`` and ``logvar``.
    """
    _check_gaussian(mu, logvar)
    if eps is None:
        eps = torch.randn_like(mu)
    if eps.shape != mu.shape:
        raise ValueError(f"eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
    return mu + torch.exp(0.5 * logvar) * eps


def pathwise_gradient(
    f: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor, logvar: torch.Tensor, n: int = 10_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterisation estimate of ``grad_{mu, logvar} E_{z ~ N(mu, exp(logvar))}[f(z)]``.

    ``mu``, ``logvar`` are ``(z,)``; ``f`` maps ``(n, z) -> (n,)``. Returns two ``(z,)`` tensors.
    """
    if mu.ndim != 1 or mu.shape != logvar.shape or n < 1:
        raise ValueError(
            f"expected mu, logvar of equal shape (z,) and n >= 1, got {tuple(mu.shape)}, {tuple(logvar.shape)}, n={n}"
        )
    mu, logvar = mu.detach().double().requires_grad_(), logvar.detach().double().requires_grad_()
    eps = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = reparameterize(mu.expand(n, -1), logvar.expand(n, -1), eps)  # (n, z)
    g_mu, g_logvar = torch.autograd.grad(f(z).mean(), (mu, logvar))
    return g_mu, g_logvar


@torch.no_grad()
def score_function_gradient(
    f: Callable[[torch.Tensor], torch.Tensor], mu: torch.Tensor, logvar: torch.Tensor, n: int = 10_000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-function (REINFORCE) estimate of the same gradient: ``E[f(z) grad log q(z)]``.

    For a diagonal Gaussian ``d log q / d mu = (z - mu) / sigma^2`` and
    ``d log q / d logvar = ((z - mu)^2 / sigma^2 - 1) / 2``. Needs no gradient of ``f``.
    """
    if mu.ndim != 1 or mu.shape != logvar.shape or n < 1:
        raise ValueError(
            f"expected mu, logvar of equal shape (z,) and n >= 1, got {tuple(mu.shape)}, {tuple(logvar.shape)}, n={n}"
        )
    mu, logvar = mu.double(), logvar.double()
    eps = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sigma = torch.exp(0.5 * logvar)
    fz = f(mu + sigma * eps)[:, None]  # (n, 1)
    return (fz * eps / sigma).mean(0), (fz * (eps.pow(2) - 1) / 2).mean(0)


# ----------------------------------------------------------------------------- the model


class VAE(ImageGenerator):
    """An MLP VAE for ``(B, 1, 8, 8)`` images in [0, 1].

    Encoder ``64 -> hidden -> (mu, logvar) in R^z_dim``; decoder ``z -> hidden -> 64`` pixel logits
    (Bernoulli means ``sigmoid(logits)``). ``forward(x)`` returns ``(logits (B, 1, 8, 8), mu, logvar)``.
    ``sample(n, generator)`` decodes ``z ~ N(0, I)`` to the decoder means (see :class:`ImageGenerator`).
    """

    def __init__(self, z_dim: int = 8, hidden: int = 256, side: int = 8) -> None:
        super().__init__()
        if min(z_dim, hidden, side) < 1:
            raise ValueError(f"z_dim, hidden and side must be >= 1, got {z_dim}, {hidden}, {side}")
        self.z_dim, self.side = z_dim, side
        pixels = side * side
        self.encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, side, side) -> mu (B, z), logvar (B, z)`` of ``q(z|x)``."""
        if x.ndim != 4 or x.shape[1:] != (1, self.side, self.side):
            raise ValueError(f"expected images of shape (B, 1, {self.side}, {self.side}), got {tuple(x.shape)}")
        mu, logvar = self.encoder(rearrange(x, "b 1 h w -> b (h w)")).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, z_dim) -> pixel logits (B, 1, side, side)``."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        return rearrange(self.decoder(z), "b (h w) -> b 1 h w", h=self.side)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder means ``sigmoid(decode(z))``: ``(B, z_dim) -> (B, 1, side, side)`` in [0, 1]."""
        return torch.sigmoid(self.decode(z))


def elbo_terms(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sample estimate of the two ELBO terms per image: ``(reconstruction (B,), kl (B,))`` in nats.

    ``model`` is a :class:`VAE` (``model(x) -> (logits, mu, logvar)``), ``x`` images ``(B, 1, H, W)``.

    ``reconstruction = -log p(x|z) = BCE(sigmoid(logits), x)`` summed over pixels, ``z ~ q(z|x)``;
    ``-ELBO = reconstruction + kl``.
    """
    if float(x.min()) < 0 or float(x.max()) > 1:
        raise ValueError("images must be in [0, 1]")
    logits, mu, logvar = model(x)
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=(1, 2, 3))  # (B,)
    return rec, gaussian_kl(mu, logvar)


@torch.no_grad()
def negative_elbo(model: VAE, images: torch.Tensor, n_samples: int = 1, seed: int = 0) -> torch.Tensor:
    """``-ELBO`` per image ``(N,)`` in nats (float64, on the CPU), averaged over ``n_samples`` draws of ``z``.

    Runs on the model's device in eval mode; the draws of ``z`` are seeded by ``seed``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    was_training = model.training
    model.eval()
    images = images.to(model_device(model))
    total = torch.zeros(len(images), dtype=torch.float64)
    with seeded(seed):
        for _ in range(n_samples):
            rec, kl = elbo_terms(model, images)
            total += (rec + kl).double().cpu()
    model.train(was_training)
    return total / n_samples


def beta_schedule(beta: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """The weight of the KL term at optimizer step ``t`` (0, 1, ...): ``beta * min(1, t / warmup_steps)``.

    ``warmup_steps = 0`` gives the constant ``beta`` (a beta-VAE; ``beta = 1`` is the ELBO). With
    ``warmup_steps > 0`` the weight rises linearly from 0 (KL annealing).
    """
    if beta < 0 or warmup_steps < 0:
        raise ValueError(f"beta and warmup_steps must be >= 0, got {beta}, {warmup_steps}")
    if warmup_steps == 0:
        return lambda t: beta
    return lambda t: beta * min(1.0, t / warmup_steps)


def beta_elbo_step(beta: float = 1.0, warmup_steps: int = 0) -> Step:
    """A training step minimising ``reconstruction + beta_t * kl`` with ``beta_t`` from :func:`beta_schedule`.

    The returned step counts its own calls (one per optimizer step). It records the two terms
    (``reconstruction``, ``kl``, nats per image) and the weight used (``beta``). With ``beta = 1``,
    ``warmup_steps = 0`` it is :func:`elbo_step`.
    """
    weight = beta_schedule(beta, warmup_steps)
    calls = [0]

    def step(model: nn.Module, batch: tuple[torch.Tensor]) -> dict[str, Any]:
        (images,) = batch
        rec, kl = elbo_terms(model, images)  # (B,), (B,)
        b = weight(calls[0])
        calls[0] += 1
        return {"loss": (rec + b * kl).mean(), "reconstruction": rec.mean(), "kl": kl.mean(), "beta": b}

    return step


def elbo_step(model: nn.Module, batch: tuple[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's training step: the mean ``-ELBO`` of a batch ``(images,)``, images ``(B, 1, H, W)`` in [0, 1].

    ``loss`` is minimised; its two terms are recorded too (``reconstruction``, ``kl``, nats per image).
    """
    (images,) = batch
    rec, kl = elbo_terms(model, images)  # (B,), (B,): one reparameterised z per image
    return {"loss": (rec + kl).mean(), "reconstruction": rec.mean(), "kl": kl.mean()}


def train_vae(
    model: VAE,
    images: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    beta: float = 1.0,
    warmup_steps: int = 0,
) -> History:
    """Minimise the mean ``-ELBO`` on ``images (N, 1, 8, 8)`` with :func:`elbo_step` and Adam.

    ``beta`` and ``warmup_steps`` weight the KL term as in :func:`beta_elbo_step` (a beta-VAE, KL
    annealing); the defaults train on the plain ``-ELBO``.

    Trains on the model's device (move it there first) and leaves the model in eval mode. The
    shuffling and the draws of ``z`` are seeded by ``seed``; the caller's random stream is untouched.
    ``History.train_loss`` is the train ``-ELBO`` per epoch.
    """
    if images.ndim != 4 or float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError(f"expected images (N, 1, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    batches = TensorBatches(images, batch_size=batch_size, generator=torch.Generator().manual_seed(seed))
    with seeded(seed):  # the reparameterisation noise draws from the global generator
        step = elbo_step if (beta == 1.0 and warmup_steps == 0) else beta_elbo_step(beta, warmup_steps)
        history = fit(model, batches, step, epochs=epochs, lr=lr, progress=progress, desc="VAE")
    model.eval()
    return history


@torch.no_grad()
def active_units(model: VAE, images: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al.'s activity of each latent unit: ``A_j = Var_x(E_q[z_j | x]) = Var_x(mu_j(x))``.

    ``images (N, 1, H, W)`` with ``N >= 2``. Returns ``(number of units with A_j > threshold, A (z_dim,))``
    (``A`` in float64 on the CPU). An inactive unit's posterior mean ignores the image: the decoder
    cannot use it, and its KL can be driven to zero (posterior collapse of that unit).
    """
    if len(images) < 2 or threshold < 0:
        raise ValueError(f"need at least two images and threshold >= 0, got {len(images)}, {threshold}")
    mu, _ = model.encode(images.to(model_device(model)))  # (N, z)
    activity = mu.double().var(dim=0).cpu()  # (z,): unbiased variance over the images
    return int((activity > threshold).sum()), activity


# ----------------------------------------------------------------------------- forward versus reverse KL


def kl_on_grid(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = integral p log(p / q) dx`` by the trapezoid rule on an even grid ``x (G,)``.

    ``p``, ``q`` are densities on the grid ``(G,)``; points where ``p = 0`` contribute zero.
    Differentiable in ``p`` and ``q``.
    """
    if p.ndim != 1 or p.shape != q.shape or p.shape != x.shape or len(x) < 2:
        raise ValueError(
            f"expected p, q, x of equal shape (G,), G >= 2, got {tuple(p.shape)}, {tuple(q.shape)}, {tuple(x.shape)}"
        )
    integrand = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - torch.log(q.clamp_min(1e-300))), 0 * p)
    return torch.trapezoid(integrand, x)


def fit_gaussian_kl(
    p: torch.Tensor,
    x: torch.Tensor,
    direction: str,
    mu0: float = 0.0,
    std0: float = 1.0,
    steps: int = 300,
    lr: float = 0.05,
) -> tuple[float, float]:
    """Fit one Gaussian ``q = N(mu, std^2)`` to a density ``p (G,)`` on the grid ``x (G,)``.

    ``direction="forward"`` minimises ``KL(p || q)`` (maximum likelihood: mass-covering),
    ``"reverse"`` minimises ``KL(q || p)`` (mode-seeking). Adam on ``(mu, log std)`` from
    ``(mu0, std0)``, in float64; returns ``(mu, std)``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if std0 <= 0 or steps < 1:
        raise ValueError(f"need std0 > 0 and steps >= 1, got {std0}, {steps}")
    p, x = p.double(), x.double()
    mu = torch.tensor(float(mu0), dtype=torch.float64, requires_grad=True)
    log_std = torch.tensor(math.log(std0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, log_std], lr=lr)
    for _ in range(steps):
        q = torch.exp(-0.5 * ((x - mu) / log_std.exp()) ** 2 - log_std) / math.sqrt(2 * math.pi)  # (G,)
        loss = kl_on_grid(p, q, x) if direction == "forward" else kl_on_grid(q, p, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(mu.detach()), float(log_std.detach().exp())


@torch.no_grad()
def reconstruct(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """Decoder means at the posterior means: ``sigmoid(decode(mu(x)))``, ``(N, 1, 8, 8)`` in [0, 1] on the CPU."""
    mu, _ = model.encode(images.to(model_device(model)))
    return model.images(mu).cpu()


@torch.no_grad()
def interpolate(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """Decode ``(1 - t) mu(x_a) + t mu(x_b)`` for ``steps`` values of ``t`` in [0, 1].

    ``x_a``, ``x_b`` are single images ``(1, H, W)``; returns ``(steps, 1, H, W)`` on the CPU.
    """
    if x_a.shape != x_b.shape or x_a.ndim != 3:
        raise ValueError(
            f"expected two single images (1, H, W) of equal shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}"
        )
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    mu, _ = model.encode(torch.stack([x_a, x_b]).to(model_device(model)))  # (2, z)
    t = torch.linspace(0, 1, steps, device=mu.device)[:, None]  # (steps, 1)
    return model.images((1 - t) * mu[0] + t * mu[1]).cpu()


# ----------------------------------------------------------------------------- uses


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve for ``scores (N,)`` (higher = more anomalous) and ``labels (N,)`` in {0, 1}.

    The Mann-Whitney form: the probability that a random positive scores above a random
    negative, ties counting one half, computed from average ranks.
    """
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"expected scores and labels of equal shape (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.long()
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    n_pos, n_neg = int(labels.sum()), int((1 - labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("need at least one positive and one negative example")
    s = scores.double()
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(s, return_inverse=True)  # average ranks over ties
    mean_rank = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(uniq)).double()
    rank_sum = mean_rank[inverse][labels == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def augment_by_posterior(
    model: VAE, images: torch.Tensor, labels: torch.Tensor, copies: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each labelled image draw ``copies`` codes ``z ~ q(z|x)`` and decode them, keeping the label.

    ``images (N, 1, 8, 8)``, ``labels (N,)`` -> ``(N * copies, 1, 8, 8)`` decoder means (on the CPU)
    and ``(N * copies,)`` labels. The draws are seeded by ``seed``. Assumes a small move in latent
    space keeps the class.
    """
    if len(images) != len(labels) or copies < 1:
        raise ValueError(f"need as many labels as images and copies >= 1, got {len(images)}, {len(labels)}, {copies}")
    mu, logvar = model.encode(images.to(model_device(model)))
    mu, logvar = mu.repeat_interleave(copies, 0), logvar.repeat_interleave(copies, 0)  # (N*copies, z)
    with seeded(seed):
        z = reparameterize(mu, logvar)
    return model.images(z).cpu(), labels.repeat_interleave(copies, 0)


def nats_to_bits_per_pixel(nats: float, pixels: int = 64) -> float:
    """Convert nats per image to bits per pixel: ``nats / (pixels ln 2)``."""
    if pixels < 1:
        raise ValueError(f"pixels must be >= 1, got {pixels}")
    return nats / (pixels * math.log(2))
