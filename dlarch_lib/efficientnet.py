"""Chapter 24: EfficientNet pieces for 8x8 digits, compound scaling, and transfer learning.

- :class:`SqueezeExcite` re-weights channels with a gate in (0, 1) computed from the pooled map.
- :class:`MBConv` is the inverted-residual block: expand 1x1, depthwise 3x3, SE, project 1x1,
  identity shortcut when the shapes match.
- :func:`conv_cost` gives the parameters and FLOPs of a standard or a depthwise-separable
  convolution in closed form (checked against ``torch.utils.flop_counter`` in the tests).
- :func:`compound_multipliers` and :func:`scaled_config` apply compound scaling
  (depth ``alpha^phi``, width ``beta^phi``, resolution ``gamma^phi``) to a base
  :class:`EffNetConfig`; :class:`TinyEfficientNet` builds it (the input is resized to the
  config's resolution inside ``forward``).
- :func:`few_shot_indices`, :func:`replace_head` and :func:`extract_features` are the three
  small tools of the transfer-learning experiment; :func:`pareto_front` marks the
  accuracy-cost front.
- :func:`relu_manifold_loss` and :func:`relu_loss_probability` measure and predict how much of a
  low-dimensional manifold a ReLU destroys in ``n`` dimensions (why MBConv's projection is linear).
- :func:`drop_path` is stochastic depth (a residual branch dropped per sample, survivors rescaled);
  :func:`random_shift` and :func:`shift_augment_step` are random-shift augmentation for the digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import model_device


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(W2 silu(W1 mean_hw(x)))`` channel by channel.

    Squeeze: global average pool ``(N, C, H, W) -> (N, C)``. Excite: a bottleneck MLP
    ``C -> reduced -> C`` with a sigmoid, giving one gate in (0, 1) per channel.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        if channels < 1 or reduced < 1:
            raise ValueError(f"need channels >= 1 and reduced >= 1, got {channels}, {reduced}")
        self.reduce = nn.Linear(channels, reduced)
        self.expand = nn.Linear(reduced, channels)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Channel gates ``(N, C)`` in (0, 1) for ``x`` of shape ``(N, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.reduce.in_features:
            raise ValueError(f"SqueezeExcite expects (N, {self.reduce.in_features}, H, W), got {tuple(x.shape)}")
        squeezed = x.mean(dim=(2, 3))  # (N, C)
        return torch.sigmoid(self.expand(F.silu(self.reduce(squeezed))))  # (N, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``: each channel scaled by its gate."""
        return x * self.gate(x)[:, :, None, None]


class MBConv(nn.Module):
    """Mobile inverted bottleneck block (MobileNetV2 / EfficientNet), with SE.

    ``(N, in, H, W)`` -> expand 1x1 to ``expand * in`` (skipped when ``expand == 1``) -> BN, SiLU
    -> depthwise ``kernel x kernel`` with ``stride`` -> BN, SiLU -> SE -> project 1x1 to ``out`` -> BN
    (no activation: a linear bottleneck) -> ``+ x`` when ``stride == 1`` and ``in == out``.
    With ``drop_path = p > 0`` and the shortcut, training drops the branch of each sample with
    probability ``p`` (stochastic depth, :func:`drop_path`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: int = 4,
        stride: int = 1,
        kernel: int = 3,
        se_ratio: float = 0.25,
        bn_momentum: float = 0.1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if min(in_channels, out_channels, expand, stride) < 1:
            raise ValueError(
                f"need in, out, expand, stride >= 1; got {in_channels}, {out_channels}, {expand}, {stride}"
            )
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd int, got {kernel}")
        if not 0.0 < se_ratio <= 1.0:
            raise ValueError(f"se_ratio must be in (0, 1], got {se_ratio}")
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        hidden = in_channels * expand
        bn = lambda c: nn.BatchNorm2d(c, momentum=bn_momentum)
        self.expand_conv: nn.Module = (
            nn.Identity()
            if expand == 1
            else nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), bn(hidden), nn.SiLU())
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, padding=kernel // 2, groups=hidden, bias=False),
            bn(hidden),
            nn.SiLU(),
        )
        self.se = SqueezeExcite(
            hidden, max(1, int(in_channels * se_ratio))
        )  # reduced from the block input, as in EfficientNet
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), bn(out_channels))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_prob = drop_path  # stochastic depth on the residual branch (only with the shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W) -> (N, out, H', W')`` with ``H' = ceil(H / stride)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MBConv expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        out = self.project(self.se(self.depthwise(self.expand_conv(x))))
        return x + drop_path(out, self.drop_prob, self.training) if self.use_residual else out


def conv_cost(c_in: int, c_out: int, kernel: int, height: int, width: int, separable: bool = False) -> tuple[int, int]:
    """(parameters, FLOPs) of a bias-free, stride-1, 'same'-padded ``kernel x kernel`` convolution.

    Standard: ``k^2 C_in C_out`` weights and ``2 H W k^2 C_in C_out`` FLOPs (one multiply and one
    add per weight per output pixel, the convention of ``torch.utils.flop_counter``).
    Depthwise-separable (depthwise ``k x k`` then pointwise 1x1): ``k^2 C_in + C_in C_out``
    weights and ``2 H W (k^2 C_in + C_in C_out)`` FLOPs.
    """
    if min(c_in, c_out, kernel, height, width) < 1:
        raise ValueError(
            f"all sizes must be >= 1, got c_in={c_in}, c_out={c_out}, kernel={kernel}, height={height}, width={width}"
        )
    params = kernel * kernel * c_in + c_in * c_out if separable else kernel * kernel * c_in * c_out
    return params, 2 * height * width * params


def compound_multipliers(
    phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15
) -> tuple[float, float, float]:
    """(depth, width, resolution) multipliers ``(alpha^phi, beta^phi, gamma^phi)``.

    The defaults are EfficientNet's grid-searched values; ``alpha beta^2 gamma^2 = 1.92``, so each
    unit of ``phi`` multiplies the FLOPs by about 2.
    """
    if min(alpha, beta, gamma) < 1.0:
        raise ValueError(f"alpha, beta, gamma must be >= 1 (scaling up), got {alpha}, {beta}, {gamma}")
    if phi < 0:
        raise ValueError(f"phi must be >= 0, got {phi}")
    return alpha**phi, beta**phi, gamma**phi


@dataclass(frozen=True)
class EffNetConfig:
    """A :class:`TinyEfficientNet`: stem width, per-stage (width, depth, stride), input resolution."""

    stem: int = 8
    widths: tuple[int, ...] = (8, 12, 16)
    depths: tuple[int, ...] = (1, 2, 2)
    strides: tuple[int, ...] = (1, 2, 1)
    resolution: int = 8
    expand: int = 3
    num_classes: int = 10
    bn_momentum: float = 0.3  # runs of a few dozen steps: running statistics must keep up (PyTorch default 0.1)
    drop_path: float = 0.0  # stochastic depth of the last block; block l of L gets drop_path * l / L

    def __post_init__(self) -> None:
        if not (len(self.widths) == len(self.depths) == len(self.strides)) or not self.widths:
            raise ValueError(
                f"widths, depths and strides need the same non-zero length, got "
                f"{self.widths}, {self.depths}, {self.strides}"
            )
        if min(self.widths + self.depths + self.strides) < 1 or min(self.stem, self.resolution, self.expand) < 1:
            raise ValueError(f"every size must be >= 1, got {self}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")


def _round_width(channels: float, divisor: int = 2) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (never down by more than 10%)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def scaled_config(
    base: EffNetConfig, phi: float, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15
) -> EffNetConfig:
    """``base`` compound-scaled by ``phi``: depths ``ceil(d alpha^phi)``, widths ``~w beta^phi``
    (multiples of 2), resolution ``round(r gamma^phi)``."""
    d, w, r = compound_multipliers(phi, alpha, beta, gamma)
    return replace(
        base,
        stem=_round_width(base.stem * w),
        widths=tuple(_round_width(c * w) for c in base.widths),
        depths=tuple(math.ceil(n * d - 1e-9) for n in base.depths),
        resolution=int(round(base.resolution * r)),
    )


class TinyEfficientNet(nn.Module):
    """An EfficientNet for small grey images: resize -> stem 3x3 -> stages of :class:`MBConv` -> pool -> linear.

    The input ``(N, C, H, W)`` is resized (bilinear) to ``config.resolution`` squared, so a
    higher-resolution member of a family sees an upsampled digit. Stage ``s`` has
    ``depths[s]`` blocks of width ``widths[s]``; its first block has stride ``strides[s]``.
    Block ``l`` of ``L`` (counting from 0) has stochastic depth ``config.drop_path * l / L``.
    """

    def __init__(self, config: EffNetConfig = EffNetConfig(), in_channels: int = 1) -> None:
        super().__init__()
        self.config = config
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, config.stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.stem, momentum=config.bn_momentum),
            nn.SiLU(),
        )
        blocks: list[nn.Module] = []
        c, n_blocks = config.stem, sum(config.depths)
        for width, depth, stride in zip(config.widths, config.depths, config.strides):
            for i in range(depth):
                p = config.drop_path * len(blocks) / n_blocks  # linear ramp: the first block is never dropped
                blocks.append(
                    MBConv(
                        c,
                        width,
                        expand=config.expand,
                        stride=stride if i == 0 else 1,
                        bn_momentum=config.bn_momentum,
                        drop_path=p,
                    )
                )
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.num_features = c
        self.head = nn.Linear(c, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, C, H, W) -> (N, num_features)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TinyEfficientNet expects (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        r = self.config.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)  # (N, C, r, r)
        return self.blocks(self.stem(x)).mean(dim=(2, 3))  # (N, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(x))


def few_shot_indices(labels: torch.Tensor | np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``per_class`` examples of every label in ``labels`` (seeded, without replacement)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        pool = np.flatnonzero(labels == label)
        if len(pool) < per_class:
            raise ValueError(f"label {label} has only {len(pool)} examples, fewer than per_class={per_class}")
        chosen.append(rng.choice(pool, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` (with ``head`` and ``num_features``) a fresh linear head for ``num_classes``; returns it.

    The head is initialised on the CPU (the same weights on every device) and put on the model's
    device. A chapter still moves the result with ``.to(RUN.device)``, as every model it trains.
    """
    if not hasattr(model, "head") or not hasattr(model, "num_features"):
        raise TypeError(f"{type(model).__name__} has no 'head' and 'num_features' to replace")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    device = model_device(model)
    model.head = nn.Linear(cast(int, model.num_features), num_classes).to(device)
    return model


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``model.features(x)`` in eval mode without gradients: ``(N, C, H, W) -> (N, num_features)``.

    Feature extraction (a frozen backbone) is then a linear classifier fitted on these rows.
    The model runs on its own device, ``batch_size`` rows at a time; the features come back on the CPU.
    """
    if not hasattr(model, "features"):
        raise TypeError(f"{type(model).__name__} has no 'features' method")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    features = cast(Callable[[torch.Tensor], torch.Tensor], model.features)
    out = torch.cat([features(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def pareto_front(costs: list[float] | np.ndarray, scores: list[float] | np.ndarray) -> np.ndarray:
    """Sorted indices of the Pareto-optimal points: no other point is at most as costly and strictly better,
    or strictly cheaper and at least as good (lower cost and higher score are better)."""
    costs, scores = np.asarray(costs, dtype=float), np.asarray(scores, dtype=float)
    if costs.shape != scores.shape or costs.ndim != 1:
        raise ValueError(f"costs and scores must be 1-D of the same length, got {costs.shape} and {scores.shape}")
    keep = [
        i
        for i in range(len(costs))
        if not np.any(((costs <= costs[i]) & (scores > scores[i])) | ((costs < costs[i]) & (scores >= scores[i])))
    ]
    return np.array(keep, dtype=int)


def relu_loss_probability(n: int, d: int = 2) -> float:
    """Probability that ``relu(T x)`` does not determine ``x`` for a fixed ``x != 0`` in ``R^d``.

    ``T`` is an ``(n, d)`` matrix with i.i.d. standard normal entries. The rows with ``t_i . x > 0``
    keep ``t_i . x``; the others output 0. ``x`` is determined exactly when at least ``d`` rows are
    positive (any ``d`` Gaussian rows are linearly independent), and each row is positive with
    probability 1/2 independently, so the answer is ``P(Binomial(n, 1/2) < d)``.
    """
    if d < 1 or n < 1:
        raise ValueError(f"need n >= 1 and d >= 1, got n={n}, d={d}")
    return sum(math.comb(n, k) for k in range(min(d, n + 1))) / 2**n


def relu_manifold_loss(
    points: torch.Tensor, n: int, generator: torch.Generator, relu: bool = True
) -> tuple[float, float]:
    """Embed ``points`` ``(N, d)`` into ``R^n`` by a random Gaussian ``T`` ``(n, d)``, apply ReLU, map back.

    Returns ``(lost, error)``: ``lost`` is the fraction of points that ``relu(T x)`` does not determine
    (fewer than ``d`` linearly independent active rows of ``T``); ``error`` is the relative error
    ``|H W - X|_F / |X|_F`` of the best linear read-out ``W`` ``(n, d)`` (least squares) from the
    features ``H = relu(X T^T)`` back to the points: what a following linear layer could recover.
    With ``relu=False`` the map is linear and both are 0 (up to rounding) once ``n >= d``.
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"points must be (N, d) with N >= 1, got {tuple(points.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    x = points.double()  # (N, d)
    d = x.shape[1]
    t = torch.randn(n, d, generator=generator, dtype=torch.float64)  # (n, d)
    z = x @ t.T  # (N, n)
    h = z.clamp_min(0) if relu else z  # (N, n)
    active = z > 0 if relu else torch.ones_like(z, dtype=torch.bool)  # (N, n)
    ranks = torch.linalg.matrix_rank(t[None] * active[:, :, None])  # (N,): rank of the active rows
    lost = (ranks < d).double().mean().item()
    read_out = torch.linalg.lstsq(h, x).solution  # (n, d): the best linear decoder
    error = ((h @ read_out - x).norm() / x.norm().clamp_min(1e-12)).item()
    return lost, error


def drop_path(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic depth on a residual branch ``x`` ``(N, ...)``: keep sample ``i`` with probability ``1 - p``.

    In training each sample's branch is multiplied by ``b_i / (1 - p)`` with ``b_i ~ Bernoulli(1 - p)``,
    so its expected value is ``x`` and evaluation (``training=False``) returns ``x`` unchanged. ``p = 0``
    is the identity. The draw uses the CPU ``generator`` (or the global one), the same on every device.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop probability p must be in [0, 1), got {p}")
    if x.ndim < 1:
        raise ValueError("drop_path needs a batch dimension, got a scalar")
    if not training or p == 0.0:
        return x
    keep = (torch.rand(x.shape[0], generator=generator) >= p).to(x.device)  # (N,), drawn on the CPU
    scale = keep.to(x.dtype) / (1.0 - p)  # (N,)
    return x * scale.view(-1, *([1] * (x.ndim - 1)))  # broadcast over (C, H, W)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift every image of ``x`` ``(N, C, H, W)`` by its own random integer offsets in ``[-max_shift, max_shift]``.

    Zero padding fills the uncovered border (a random crop of the zero-padded image). The offsets
    are drawn on the CPU from ``generator`` (or the global generator), so a seed gives the same
    shifts on every device. ``max_shift = 0`` returns ``x``.
    """
    if x.ndim != 4:
        raise ValueError(f"random_shift expects (N, C, H, W), got {tuple(x.shape)}")
    if max_shift < 0 or max_shift >= min(x.shape[-2:]):
        raise ValueError(f"max_shift must be in [0, min(H, W)), got {max_shift} for {tuple(x.shape)}")
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    dy, dx = torch.randint(-s, s + 1, (2, n), generator=generator).to(x.device)  # (N,) each
    padded = F.pad(x, (s, s, s, s))  # (N, C, H + 2s, W + 2s)
    rows = torch.arange(h, device=x.device)[None] + s - dy[:, None]  # (N, H): content moves down by dy
    cols = torch.arange(w, device=x.device)[None] + s - dx[:, None]  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]  # (N, 1, 1)
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def shift_augment_step(
    max_shift: int, generator: torch.Generator
) -> Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A training step for ``fit``: cross-entropy on a :func:`random_shift` of the batch ``(x, y)``."""
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")

    def step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(random_shift(x, max_shift, generator)), y)

    return step
