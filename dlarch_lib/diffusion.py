"""Chapter 27's pointer to diffusion models: a tiny DDPM (denoising diffusion probabilistic model).

- The forward (noising) process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`` with a
  :class:`NoiseSchedule`; :func:`q_sample` draws ``x_t`` from ``x_0`` in one go with the closed form
  ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``, ``abar_t = prod_{s <= t} (1 - beta_s)``;
  :func:`noise_step_by_step` runs the chain one step at a time (to check the closed form).
- :class:`Denoiser`, an MLP ``eps_theta(x_t, t)`` for points in ``R^d``; :func:`ddpm_loss`, the
  epsilon-prediction loss ``|| eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2``;
  :func:`train_ddpm` (through the book's engine ``dlarch_lib.core.train.fit``).
- :func:`ddpm_sample`, ancestral sampling from ``x_T ~ N(0, I)`` down to ``x_0``.

Time steps are 0-based here: ``t = 0 .. T-1`` index ``beta_1 .. beta_T`` of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import History, fit, model_device


@dataclass(frozen=True)
class NoiseSchedule:
    """The variances ``betas (T,)`` of the forward process and what follows from them (float64, CPU)."""

    betas: torch.Tensor

    def __post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or len(b) < 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError(f"betas must be a non-empty (T,) tensor with values in (0, 1), got shape {tuple(b.shape)}")

    @property
    def T(self) -> int:
        """Number of noising steps."""
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        """``1 - beta_t``, ``(T,)``."""
        return 1 - self.betas.double()

    @property
    def alpha_bars(self) -> torch.Tensor:
        """``abar_t = prod_{s <= t} (1 - beta_s)``, ``(T,)``: the signal fraction left after step ``t``."""
        return torch.cumprod(self.alphas, dim=0)


def linear_schedule(T: int = 100, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Ho et al.'s linear schedule, ``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``.

    Their values are for ``T = 1000``; for a shorter chain ``beta_end`` is scaled by ``1000 / T`` (capped
    below 1) so that ``abar_T`` is again close to 0 and ``x_T`` close to pure noise.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    scale = 1000 / T
    end = min(beta_end * scale, 0.5)
    start = min(beta_start * scale, end)
    return NoiseSchedule(torch.linspace(start, end, T, dtype=torch.float64))


def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, eps: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    ``x0 (B, d)``, ``t (B,)`` long, ``eps (B, d)`` -> ``(B, d)``.
    """
    if x0.ndim != 2 or eps.shape != x0.shape or t.shape != (len(x0),):
        raise ValueError(
            f"expected x0 and eps (B, d) and t (B,), got {tuple(x0.shape)}, {tuple(eps.shape)}, {tuple(t.shape)}"
        )
    if int(t.min()) < 0 or int(t.max()) >= schedule.T:
        raise ValueError(f"t must lie in [0, {schedule.T - 1}]")
    abar = schedule.alpha_bars.to(x0.device, x0.dtype)[t][:, None]  # (B, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


def noise_step_by_step(
    x0: torch.Tensor, steps: int, schedule: NoiseSchedule, generator: torch.Generator
) -> torch.Tensor:
    """Run ``x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t`` for ``steps`` steps: ``(B, d) -> (B, d)``.

    After ``steps = t + 1`` steps the result is distributed as ``q(x_t | x_0)`` (see :func:`q_sample`).
    """
    if not 0 <= steps <= schedule.T:
        raise ValueError(f"steps must lie in [0, {schedule.T}], got {steps}")
    x = x0.double()
    for s in range(steps):
        b = float(schedule.betas[s])
        x = (1 - b) ** 0.5 * x + b**0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x


class Denoiser(nn.Module):
    """An MLP ``eps_theta(x_t, t)`` for points ``x_t (B, d)``: the time ``t (B,)`` enters as sinusoidal features.

    ``forward(x, t) -> (B, d)``, the predicted noise.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, T: int = 100, time_features: int = 16) -> None:
        super().__init__()
        if min(dim, hidden, T) < 1 or time_features < 2 or time_features % 2:
            raise ValueError(
                f"need dim, hidden, T >= 1 and an even time_features >= 2, got {dim}, {hidden}, {T}, {time_features}"
            )
        self.dim, self.T = dim, T
        freqs = torch.exp(torch.linspace(0, 4, time_features // 2))  # (F/2,) from 1 to e^4
        self.freqs: torch.Tensor
        self.register_buffer("freqs", freqs, persistent=False)
        self.net = nn.Sequential(
            nn.Linear(dim + time_features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim or t.shape != (len(x),):
            raise ValueError(f"expected x (B, {self.dim}) and t (B,), got {tuple(x.shape)} and {tuple(t.shape)}")
        phase = (t.float() / self.T)[:, None] * self.freqs  # (B, F/2)
        return self.net(torch.cat([x, phase.sin(), phase.cos()], dim=1))


def ddpm_loss(model: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """The epsilon-prediction loss on a batch ``x0 (B, d)``: mean of ``||eps - eps_theta(x_t, t)||^2 / d``.

    Draws ``t`` uniformly from ``0 .. T-1`` and ``eps ~ N(0, I)`` from the global generator.
    """
    t = torch.randint(0, schedule.T, (len(x0),), device=x0.device)  # (B,)
    eps = torch.randn_like(x0)
    return ((model(q_sample(x0, t, schedule, eps), t) - eps) ** 2).mean()


def train_ddpm(
    model: Denoiser,
    data: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
) -> History:
    """Minimise :func:`ddpm_loss` on points ``data (N, d)`` with Adam for ``steps`` steps (fresh batches each step).

    The learning rate starts at ``lr`` and decays to 0 on a cosine.

    Trains on the model's device and leaves the model in eval mode; seeded by ``seed``.
    """
    if data.ndim != 2 or data.shape[1] != model.dim:
        raise ValueError(f"expected data (N, {model.dim}), got {tuple(data.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = model_device(model)
    data = data.to(device, torch.float32)
    g = torch.Generator().manual_seed(seed)

    def batches():  # an endless stream of random batches
        while True:
            yield data[torch.randint(0, len(data), (batch_size,), generator=g).to(device)]

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)  # lr decays to 0: a quieter end
    with seeded(seed):
        history = fit(
            model,
            batches(),
            lambda m, x0: ddpm_loss(model, x0, schedule),  # m is model
            steps=steps,
            optimizer=optimizer,
            scheduler=cosine,
            progress=progress,
            desc="DDPM",
        )
    model.eval()
    return history


@torch.no_grad()
def ddpm_sample(model: Denoiser, n: int, schedule: NoiseSchedule, generator: torch.Generator) -> torch.Tensor:
    """Ancestral sampling: ``x_T ~ N(0, I)``, then for ``t = T-1 .. 0``

    ``x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t) + sqrt(beta_t) z``
    (no noise at the last step). Returns ``(n, d)`` float32 on the CPU; the noise comes from ``generator``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = model_device(model)
    betas, alphas, abars = schedule.betas.double(), schedule.alphas, schedule.alpha_bars
    x = torch.randn(n, model.dim, generator=generator, dtype=torch.float64)  # (n, d) on the CPU
    for t in range(schedule.T - 1, -1, -1):
        tt = torch.full((n,), t, dtype=torch.long, device=device)
        eps = model(x.float().to(device), tt).double().cpu()  # (n, d)
        x = (x - betas[t] / (1 - abars[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            x = x + betas[t].sqrt() * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x.float()
