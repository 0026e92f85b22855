"""Chapter 23: neural radiance fields (NeRF) on a procedurally rendered scene.

- Encoding and model: :func:`positional_encoding`, :class:`CoordinateMLP` (the spectral-bias
  demo), :class:`TinyNeRF`, the radiance field ``F(x, d) -> (rgb, sigma)``.
- Cameras: :func:`look_at`, :func:`pose_on_sphere`, :func:`random_poses`, :func:`focal_from_fov`,
  :func:`get_rays` (pinhole camera, OpenGL convention: the camera looks down its ``-z`` axis).
- Volume rendering: :func:`sample_along_rays`, :func:`composite` (the alpha-compositing
  quadrature ``C = sum_i T_i alpha_i c_i``), :func:`render_rays`, :func:`render_image`, and
  :class:`VolumeRenderer`, an ``nn.Module`` mapping rays to colours for ``train.fit``.
- Hierarchical sampling: :func:`sample_pdf` (inverse-transform sampling of the coarse weights),
  :func:`render_at` (any sorted samples per ray) and :func:`render_hierarchical` (coarse, then fine).
- Data: :class:`SoftSpheresScene`, an analytic field (optionally with a view-dependent highlight)
  rendered by the same renderer, :func:`render_views`, :func:`rays_of_views`; the metric :func:`psnr`.
- View dependence: :func:`direction_averaged`, the field with its colour averaged over rotated viewing
  directions (:func:`azimuth_rotations`).

A *field* is any callable ``field(points (..., 3), dirs (..., 3)) -> (rgb (..., 3), sigma (...))``:
the analytic scene and the network are interchangeable inside the renderer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Field = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- encoding and models


def positional_encoding(x: torch.Tensor, L: int, include_input: bool = True) -> torch.Tensor:
    """gamma(x) = [x, sin(2^0 pi x), cos(2^0 pi x), ..., sin(2^(L-1) pi x), cos(2^(L-1) pi x)].

    ``x`` ``(..., D)`` -> ``(..., D * (2L + include_input))``; each block has ``D`` entries, so
    block ``2k`` (after the input) is ``sin(2^k pi x)``. ``L = 0`` returns ``x`` (or an empty last
    axis when ``include_input`` is false).
    """
    if not isinstance(L, int) or L < 0:
        raise ValueError(f"L (number of frequencies) must be a non-negative int, got {L!r}")
    if x.ndim < 1:
        raise ValueError("positional_encoding needs x with a last (coordinate) axis, got a scalar")
    freqs = math.pi * 2.0 ** torch.arange(L, dtype=x.dtype, device=x.device)  # (L,)
    angles = x[..., None, :] * freqs[:, None]  # (..., L, D)
    sincos = torch.stack([angles.sin(), angles.cos()], dim=-2)  # (..., L, 2, D)
    parts = [x] if include_input else []
    parts.append(sincos.flatten(-3))  # (..., L*2*D): sin_0, cos_0, sin_1, cos_1, ...
    return torch.cat(parts, dim=-1)


def encoded_dim(D: int, L: int, include_input: bool = True) -> int:
    """Width of :func:`positional_encoding` of a ``D``-dimensional input."""
    return D * (2 * L + int(include_input))


def mlp(in_dim: int, width: int, depth: int, out_dim: int) -> nn.Sequential:
    """``depth`` hidden (Linear, ReLU) layers of ``width`` units, then a Linear to ``out_dim``.

    ``depth = 0`` is a single Linear ``in_dim -> out_dim``.
    """
    if min(in_dim, width, out_dim) < 1 or depth < 0:
        raise ValueError(
            f"need in_dim, width, out_dim >= 1 and depth >= 0; got {in_dim=}, {width=}, {depth=}, {out_dim=}"
        )
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width if depth else in_dim, out_dim))
    return nn.Sequential(*layers)


class CoordinateMLP(nn.Module):
    """An MLP on coordinates ``(..., in_dim) -> (..., out_dim)``, raw (``L=None``) or encoded.

    The spectral-bias experiment compares the two with everything else equal.
    """

    def __init__(self, in_dim: int = 1, out_dim: int = 1, width: int = 64, depth: int = 3, L: int | None = None):
        super().__init__()
        self.in_dim, self.L = in_dim, L
        self.net = mlp(in_dim if L is None else encoded_dim(in_dim, L), width, depth, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected coordinates (..., {self.in_dim}), got shape {tuple(x.shape)}")
        return self.net(x if self.L is None else positional_encoding(x, self.L))


class TinyNeRF(nn.Module):
    """A small radiance field ``F(x, d) -> (rgb, sigma)``.

    ``gamma(x)`` (``L_pos`` frequencies) -> ``depth`` (Linear, ReLU) layers of ``width`` units -> a
    feature ``h``. The density ``sigma = softplus(w . h + b) >= 0`` reads the feature only, so it
    depends on position alone. The colour ``rgb = sigmoid(.)`` in ``[0, 1]`` is a linear read-out
    of ``h`` when ``L_dir`` is None (no view dependence, as in the original tiny NeRF notebook),
    otherwise one ReLU layer of ``head_width`` units (default ``width // 2``) on ``[h, gamma(d)]``
    (``L_dir`` frequencies).
    """

    def __init__(
        self, L_pos: int = 6, L_dir: int | None = 2, width: int = 128, depth: int = 4, head_width: int | None = None
    ):
        super().__init__()
        head_width = width // 2 if head_width is None else head_width
        if (
            not isinstance(L_pos, int)
            or L_pos < 0
            or (L_dir is not None and L_dir < 0)
            or width < 2
            or depth < 1
            or head_width < 1
        ):
            raise ValueError(
                "need L_pos >= 0, L_dir None or >= 0, width >= 2, depth >= 1, head_width >= 1; "
                f"got {L_pos=}, {L_dir=}, {width=}, {depth=}, {head_width=}"
            )
        self.L_pos, self.L_dir = L_pos, L_dir
        self.trunk = mlp(encoded_dim(3, L_pos), width, depth - 1, width).append(nn.ReLU())  # -> h (..., width)
        self.sigma = nn.Linear(width, 1)
        self.color: nn.Module
        if L_dir is None:
            self.color = nn.Linear(width, 3)
        else:
            dir_dim = encoded_dim(3, L_dir)
            self.color = nn.Sequential(nn.Linear(width + dir_dim, head_width), nn.ReLU(), nn.Linear(head_width, 3))

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points ``x`` and unit directions ``d``, both ``(..., 3)`` -> rgb ``(..., 3)``, sigma ``(...)``."""
        if x.shape[-1] != 3 or d.shape != x.shape:
            raise ValueError(
                f"expected points and directions of the same shape (..., 3); got {tuple(x.shape)} and {tuple(d.shape)}"
            )
        h, sigma = self.features(x)
        return self.colour(h, d), sigma

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The position-only part: points ``(..., 3)`` -> feature ``h`` ``(..., width)``, sigma ``(...)``."""
        h = self.trunk(positional_encoding(x, self.L_pos))  # (..., width), after a ReLU
        return h, F.softplus(self.sigma(h)[..., 0])  # sigma (...,) >= 0, position only

    def colour(self, h: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The colour head: feature ``h`` ``(..., width)`` and directions ``(..., 3)`` -> rgb ``(..., 3)``."""
        if self.L_dir is None:
            return torch.sigmoid(self.color(h))  # (..., 3) in [0, 1]
        assert isinstance(self.color, nn.Sequential)
        first, rest = self.color[0], self.color[1:]
        assert isinstance(first, nn.Linear)
        # first(cat[h, gamma(d)]) = W_h h + W_d gamma(d) + b, computed without the concatenation; a ray's
        # direction is expanded over its samples (stride 0), so gamma(d) is computed once per ray and broadcast
        if d.ndim >= 2 and d.stride(-2) == 0:
            d = d[..., :1, :]  # (..., 1, 3)
        width = h.shape[-1]
        z = F.linear(h, first.weight[:, :width]) + F.linear(
            positional_encoding(d, self.L_dir), first.weight[:, width:], first.bias
        )  # (..., width // 2)
        return torch.sigmoid(rest(z))  # (..., 3) in [0, 1]


# --------------------------------------------------------------------------- cameras


def _vec(v: Sequence[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32)
    if t.shape != (3,):
        raise ValueError(f"expected a 3-vector, got shape {tuple(t.shape)}")
    return t


def look_at(
    eye: Sequence[float] | torch.Tensor,
    target: Sequence[float] | torch.Tensor = (0, 0, 0),
    up: Sequence[float] | torch.Tensor = (0, 0, 1),
) -> torch.Tensor:
    """Camera-to-world pose ``(4, 4)`` of a camera at ``eye`` looking at ``target``.

    Columns of the rotation: camera ``x`` (right), ``y`` (up), ``z`` (backwards, so the camera
    looks down ``-z``); the last column is the camera centre ``eye``.
    """
    eye, target, up = _vec(eye), _vec(target), _vec(up)
    forward = target - eye
    if forward.norm() < 1e-8:
        raise ValueError("look_at: eye and target coincide")
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    if right.norm() < 1e-6:
        raise ValueError("look_at: the up vector is parallel to the viewing direction")
    right = right / right.norm()
    true_up = torch.linalg.cross(right, forward)
    pose = torch.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, true_up, -forward, eye
    return pose


def pose_on_sphere(azimuth_deg: float, elevation_deg: float, radius: float) -> torch.Tensor:
    """Pose ``(4, 4)`` of a camera on a sphere of ``radius`` around the origin, looking at it."""
    if radius <= 0 or not -90 < elevation_deg < 90:
        raise ValueError(f"need radius > 0 and -90 < elevation < 90 degrees; got {radius=}, {elevation_deg=}")
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    eye = radius * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return look_at(eye)


def random_poses(n: int, radius: float, elevation: tuple[float, float] = (-10.0, 60.0), seed: int = 0) -> torch.Tensor:
    """``n`` poses ``(n, 4, 4)`` at uniform random azimuth and elevation (degrees), seeded."""
    if n < 1:
        raise ValueError(f"need n >= 1 poses, got {n}")
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=g) * 360.0
    el = elevation[0] + torch.rand(n, generator=g) * (elevation[1] - elevation[0])
    return torch.stack([pose_on_sphere(a.item(), e.item(), radius) for a, e in zip(az, el)])


def focal_from_fov(width: int, fov_deg: float) -> float:
    """Focal length in pixels of a pinhole camera ``width`` pixels wide with horizontal field of view ``fov_deg``."""
    if width < 1 or not 0 < fov_deg < 180:
        raise ValueError(f"need width >= 1 and 0 < fov < 180 degrees; got {width=}, {fov_deg=}")
    return 0.5 * width / math.tan(math.radians(fov_deg) / 2)


def get_rays(H: int, W: int, focal: float, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through the centres of the ``H x W`` pixels of a pinhole camera with pose ``(4, 4)``.

    Returns origins ``(H, W, 3)`` (all the camera centre) and unit directions ``(H, W, 3)``.
    Row 0 is the top of the image, column 0 its left.
    """
    if pose.shape != (4, 4):
        raise ValueError(f"pose must be a (4, 4) camera-to-world matrix, got shape {tuple(pose.shape)}")
    if H < 1 or W < 1 or focal <= 0:
        raise ValueError(f"need H, W >= 1 and focal > 0; got {H=}, {W=}, {focal=}")
    rows = torch.arange(H, dtype=pose.dtype, device=pose.device) + 0.5
    cols = torch.arange(W, dtype=pose.dtype, device=pose.device) + 0.5
    j, i = torch.meshgrid(rows, cols, indexing="ij")
    cam_dirs = torch.stack([(i - W / 2) / focal, -(j - H / 2) / focal, -torch.ones_like(i)], dim=-1)  # (H, W, 3)
    dirs = cam_dirs @ pose[:3, :3].T  # rotate into the world: (H, W, 3)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    return pose[:3, 3].expand(H, W, 3), dirs


# --------------------------------------------------------------------------- volume rendering


class Render(NamedTuple):
    """What :func:`render_rays` returns for ``R`` rays and ``N`` samples per ray."""

    rgb: torch.Tensor  # (R, 3) composited colour (with the background)
    depth: torch.Tensor  # (R,) expected termination distance sum_i w_i t_i
    acc: torch.Tensor  # (R,) accumulated opacity sum_i w_i = 1 - T_{N+1}
    weights: torch.Tensor  # (R, N) w_i = T_i alpha_i


def sample_along_rays(
    n_rays: int,
    near: float,
    far: float,
    n_samples: int,
    stratified: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[near, far]`` into ``n_samples`` equal bins; one sample per bin.

    Returns distances ``t`` ``(n_rays, n_samples)`` (bin midpoints, or uniform in each bin if
    ``stratified``) and the bin widths ``delta`` ``(n_samples,)``, which sum to ``far - near``.
    """
    if not 0 <= near < far or n_samples < 1:
        raise ValueError(f"need 0 <= near < far and n_samples >= 1; got {near=}, {far=}, {n_samples=}")
    edges = torch.linspace(near, far, n_samples + 1)  # (N+1,)
    delta = edges[1:] - edges[:-1]  # (N,)
    u = torch.rand(n_rays, n_samples, generator=generator) if stratified else torch.full((n_rays, n_samples), 0.5)
    return edges[:-1] + u * delta, delta


def composite(sigma: torch.Tensor, rgb: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha compositing: ``C = sum_i T_i alpha_i c_i``.

    ``sigma`` ``(R, N)``, ``rgb`` ``(R, N, 3)``, ``delta`` ``(N,)`` or ``(R, N)``. With
    ``alpha_i = 1 - exp(-sigma_i delta_i)`` and ``T_i = prod_{j<i} (1 - alpha_j)
    = exp(-sum_{j<i} sigma_j delta_j)``, returns colour ``(R, 3)`` and weights ``w_i = T_i alpha_i`` ``(R, N)``.
    """
    if sigma.ndim != 2 or rgb.shape != (*sigma.shape, 3):
        raise ValueError(f"expected sigma (R, N) and rgb (R, N, 3); got {tuple(sigma.shape)} and {tuple(rgb.shape)}")
    tau = sigma * delta  # (R, N) optical thickness of each bin
    alpha = 1.0 - torch.exp(-tau)  # (R, N)
    # T_i = exp(-sum_{j<i} tau_j): an exclusive cumulative sum (T_1 = 1); exp of a sum is stabler than a cumprod
    T = torch.exp(-torch.cumsum(F.pad(tau[:, :-1], (1, 0)), dim=-1))  # (R, N)
    weights = T * alpha  # (R, N)
    return (weights[..., None] * rgb).sum(dim=-2), weights  # (R, 3), (R, N)


def render_rays(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    near: float,
    far: float,
    n_samples: int,
    stratified: bool = False,
    background: float = 1.0,
    generator: torch.Generator | None = None,
) -> Render:
    """Volume-render ``R`` rays ``origins, dirs`` ``(R, 3)`` through ``field`` with ``n_samples`` per ray."""
    if origins.ndim != 2 or origins.shape[-1] != 3 or dirs.shape != origins.shape:
        raise ValueError(
            f"expected origins and dirs of shape (R, 3); got {tuple(origins.shape)} and {tuple(dirs.shape)}"
        )
    t, delta = sample_along_rays(origins.shape[0], near, far, n_samples, stratified, generator)  # (R, N), (N,)
    t = t.to(origins)
    points = origins[:, None, :] + t[..., None] * dirs[:, None, :]  # (R, N, 3)
    rgb, sigma = field(points, dirs[:, None, :].expand_as(points))  # (R, N, 3), (R, N)
    color, weights = composite(sigma, rgb, delta.to(origins))  # (R, 3), (R, N)
    acc = weights.sum(dim=-1)  # (R,)
    return Render(color + (1.0 - acc[:, None]) * background, (weights * t).sum(dim=-1), acc, weights)


def sample_pdf(
    edges: torch.Tensor,
    weights: torch.Tensor,
    n: int,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``n`` distances per ray from the piecewise-constant density the ``weights`` put on the bins.

    ``edges`` ``(R, N + 1)`` are each ray's bin edges, ``weights`` ``(R, N)`` non-negative (a coarse
    pass's ``w_i``). Inverse-transform sampling: ``t = F^{-1}(u)`` for the piecewise-linear CDF ``F``,
    with ``u`` uniform (or the ``n`` midpoints ``(k + 1/2) / n`` if ``deterministic``). A small floor
    on the weights keeps every bin reachable. Returns ``(R, n)``, unsorted.
    """
    if edges.ndim != 2 or weights.shape != (edges.shape[0], edges.shape[1] - 1):
        raise ValueError(
            f"expected edges (R, N + 1) and weights (R, N); got {tuple(edges.shape)}, {tuple(weights.shape)}"
        )
    if n < 1 or (weights < 0).any():
        raise ValueError(f"need n >= 1 and non-negative weights; got n={n}, min weight {weights.min().item()}")
    pdf = weights + 1e-5
    pdf = pdf / pdf.sum(dim=-1, keepdim=True)  # (R, N)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), pdf.cumsum(dim=-1)], dim=-1)  # (R, N + 1), from 0 to 1
    R = weights.shape[0]
    if deterministic:
        u = ((torch.arange(n, dtype=pdf.dtype, device=pdf.device) + 0.5) / n).expand(R, n).contiguous()
    else:
        u = torch.rand(R, n, generator=generator, dtype=pdf.dtype).to(pdf.device)  # (R, n)
    upper = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)  # (R, n): bin = upper - 1
    c0, c1 = cdf.gather(-1, upper - 1), cdf.gather(-1, upper)
    e0, e1 = edges.gather(-1, upper - 1), edges.gather(-1, upper)
    return e0 + (u - c0) / (c1 - c0).clamp_min(1e-12) * (e1 - e0)  # linear inside the bin


def render_at(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    t: torch.Tensor,
    near: float,
    far: float,
    background: float = 1.0,
) -> tuple[Render, torch.Tensor]:
    """Render rays ``(R, 3)`` at given distances ``t`` ``(R, N)`` (any order, any spacing).

    Each sample stands for the bin between the midpoints to its neighbours (``near`` and ``far`` at
    the ends), so that bins tile ``[near, far]``. Returns the :class:`Render` (with ``t`` sorted) and the
    bin edges ``(R, N + 1)``.
    """
    if t.ndim != 2 or t.shape[0] != origins.shape[0]:
        raise ValueError(f"expected t (R, N) for {origins.shape[0]} rays, got {tuple(t.shape)}")
    t, _ = t.sort(dim=-1)
    mids = (t[:, 1:] + t[:, :-1]) / 2  # (R, N - 1)
    edges = torch.cat([torch.full_like(t[:, :1], near), mids, torch.full_like(t[:, :1], far)], dim=-1)  # (R, N + 1)
    points = origins[:, None, :] + t[..., None] * dirs[:, None, :]  # (R, N, 3)
    rgb, sigma = field(points, dirs[:, None, :].expand_as(points))  # (R, N, 3), (R, N)
    color, weights = composite(sigma, rgb, edges[:, 1:] - edges[:, :-1])  # (R, 3), (R, N)
    acc = weights.sum(dim=-1)  # (R,)
    return Render(color + (1.0 - acc[:, None]) * background, (weights * t).sum(dim=-1), acc, weights), edges


def render_hierarchical(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    near: float,
    far: float,
    n_coarse: int,
    n_fine: int,
    deterministic: bool = True,
    background: float = 1.0,
    generator: torch.Generator | None = None,
) -> Render:
    """NeRF's two passes with one field: ``n_coarse`` bin midpoints, then ``n_fine`` more samples drawn
    from the coarse weights (:func:`sample_pdf`); the fine render uses all ``n_coarse + n_fine`` samples.

    The render uses ``n_coarse + n_fine`` distinct points per ray; this short version evaluates the
    coarse points twice. (The paper trains a second, "fine" network and evaluates it at all of them,
    ``2 n_coarse + n_fine`` evaluations in all.)
    """
    t_coarse, _ = sample_along_rays(origins.shape[0], near, far, n_coarse)  # (R, N_c) midpoints
    t_coarse = t_coarse.to(origins)
    coarse, edges = render_at(field, origins, dirs, t_coarse, near, far, background)
    t_fine = sample_pdf(edges, coarse.weights.detach(), n_fine, deterministic, generator)  # (R, N_f)
    fine, _ = render_at(field, origins, dirs, torch.cat([t_coarse, t_fine], dim=-1), near, far, background)
    return fine


@torch.no_grad()
def render_image(
    field: Field,
    pose: torch.Tensor,
    H: int,
    W: int,
    focal: float,
    near: float,
    far: float,
    n_samples: int,
    background: float = 1.0,
    chunk: int = 4096,
) -> Render:
    """Render a whole ``H x W`` view (midpoint samples, in chunks of rays).

    Returns a :class:`Render` whose fields are images: rgb ``(H, W, 3)``, depth and acc ``(H, W)``,
    weights ``(H, W, n_samples)``.
    """
    origins, dirs = get_rays(H, W, focal, pose)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)  # (H*W, 3)
    parts = [
        render_rays(field, origins[s : s + chunk], dirs[s : s + chunk], near, far, n_samples, background=background)
        for s in range(0, origins.shape[0], chunk)
    ]
    joined = [torch.cat(field_parts) for field_parts in zip(*parts)]  # rgb (H*W, 3), depth (H*W,), ...
    return Render(*(j.reshape(H, W, *j.shape[1:]) for j in joined))


class VolumeRenderer(nn.Module):
    """Rays ``(B, 6)`` (origin, direction) -> rendered colour ``(B, 3)`` through a learnable field.

    Stratified samples in training mode (so the network sees every depth), bin midpoints in
    eval mode: with this wrapper ``dlarch_lib.core.train.fit`` trains a NeRF with ``F.mse_loss``.
    """

    def __init__(self, field: nn.Module, near: float, far: float, n_samples: int, background: float = 1.0):
        super().__init__()
        sample_along_rays(1, near, far, n_samples)  # validates the range
        self.field, self.near, self.far, self.n_samples, self.background = field, near, far, n_samples, background

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        if rays.ndim != 2 or rays.shape[-1] != 6:
            raise ValueError(f"expected rays (B, 6) = origin and direction, got shape {tuple(rays.shape)}")
        return render_rays(
            self.field,
            rays[:, :3],
            rays[:, 3:],
            self.near,
            self.far,
            self.n_samples,
            stratified=self.training,
            background=self.background,
        ).rgb


# --------------------------------------------------------------------------- the analytic scene


@dataclass(frozen=True)
class Sphere:
    """A soft sphere: centre, radius, colour (RGB in [0, 1]) and peak density."""

    center: tuple[float, float, float]
    radius: float
    color: tuple[float, float, float]
    density: float = 40.0


DEFAULT_SPHERES = (
    Sphere((0.35, -0.25, 0.0), 0.55, (0.90, 0.25, 0.20)),
    Sphere((-0.45, 0.35, 0.15), 0.45, (0.20, 0.45, 0.90)),
    Sphere((0.0, 0.45, -0.45), 0.30, (0.25, 0.80, 0.30)),
)


class SoftSpheresScene:
    """An analytic radiance field: soft spheres, diffusely shaded, with an optional specular highlight.

    Sphere ``k`` has density ``s_k(x) = density_k * sigmoid((r_k - |x - c_k|) / softness)``; the
    field's density is ``sum_k s_k`` and its colour the ``s_k``-weighted mean of the spheres' colours.
    Sphere ``k`` seen along the ray direction ``d`` has the colour
    ``(1 - m_k) * diffuse_k + m_k * white``, with the diffuse (Lambertian) term
    ``diffuse_k = color_k * (ambient + (1 - ambient) * max(0, n_k . light))`` and the Blinn-Phong
    highlight ``m_k = specular * max(0, n_k . h)^shininess``, where ``n_k`` is the sphere's outward
    normal and ``h = (light - d) / |light - d|`` the half vector between the light and the viewer.
    ``specular = 0`` (the default) gives a view-independent (Lambertian) field that ignores ``d``.
    Call it like a network: ``scene(points, dirs) -> (rgb, sigma)``.
    """

    def __init__(
        self,
        spheres: Sequence[Sphere] = DEFAULT_SPHERES,
        softness: float = 0.03,
        light: Sequence[float] = (0.3, -0.5, 0.8),
        ambient: float = 0.35,
        specular: float = 0.0,
        shininess: float = 20.0,
    ):
        if not spheres or softness <= 0 or not 0 <= ambient <= 1:
            raise ValueError(
                "need at least one sphere, softness > 0 and 0 <= ambient <= 1; "
                f"got {len(spheres)=}, {softness=}, {ambient=}"
            )
        if not 0 <= specular <= 1 or not shininess > 0:
            raise ValueError(f"need 0 <= specular <= 1 and shininess > 0; got {specular=}, {shininess=}")
        self.centers = torch.tensor([s.center for s in spheres])  # (K, 3)
        self.radii = torch.tensor([s.radius for s in spheres])  # (K,)
        self.colors = torch.tensor([s.color for s in spheres])  # (K, 3)
        self.peaks = torch.tensor([s.density for s in spheres])  # (K,)
        self.softness, self.ambient = softness, ambient
        self.specular, self.shininess = float(specular), float(shininess)
        self.light = _vec(light) / _vec(light).norm()

    def highlight(self, normals: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Blinn-Phong strength ``specular * max(0, n . h)^shininess`` in ``[0, specular]``.

        ``normals`` ``(..., K, 3)`` unit outward normals, ``d`` ``(..., 3)`` unit ray directions
        (from the camera into the scene) -> ``(..., K)``. Largest where ``-d`` is the mirror image of
        the light about the normal.
        """
        half = F.normalize(self.light.to(d) - d, dim=-1)  # (..., 3): between the light and the viewer -d
        cos_h = (normals @ half[..., None])[..., 0].clamp_min(0)  # (..., K)
        return self.specular * cos_h**self.shininess

    def __call__(self, x: torch.Tensor, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """points ``(..., 3)`` and ray directions ``(..., 3)`` -> rgb ``(..., 3)``, sigma ``(...)``.

        The directions are needed only when ``specular > 0``; otherwise they are ignored.
        """
        if x.shape[-1] != 3:
            raise ValueError(f"expected points (..., 3), got shape {tuple(x.shape)}")
        if self.specular > 0 and (d is None or d.shape != x.shape):
            raise ValueError(
                f"a specular scene needs directions of the points' shape {tuple(x.shape)}, "
                f"got {None if d is None else tuple(d.shape)}"
            )
        offset = x[..., None, :] - self.centers  # (..., K, 3)
        dist = offset.norm(dim=-1).clamp_min(1e-9)  # (..., K)
        normals = offset / dist[..., None]  # (..., K, 3) outward unit normals
        s = self.peaks * torch.sigmoid((self.radii - dist) / self.softness)  # (..., K) per-sphere density
        shade = self.ambient + (1 - self.ambient) * (normals @ self.light).clamp_min(0)  # (..., K)
        colors = shade[..., None] * self.colors  # (..., K, 3) diffuse
        if self.specular > 0 and d is not None:
            m = self.highlight(normals, F.normalize(d, dim=-1))[..., None]  # (..., K, 1)
            colors = (1 - m) * colors + m  # blend towards white: stays in [0, 1]
        sigma = s.sum(dim=-1)  # (...)
        rgb = (s[..., None] * colors).sum(dim=-2) / (sigma[..., None] + 1e-9)  # (..., 3)
        return rgb, sigma


def azimuth_rotations(degrees: Sequence[float]) -> torch.Tensor:
    """Rotations ``(K, 3, 3)`` about the vertical ``z`` axis by the given angles (degrees)."""
    if len(degrees) < 1:
        raise ValueError("need at least one angle")
    a = torch.tensor([math.radians(float(v)) for v in degrees])  # (K,)
    c, s, zero, one = a.cos(), a.sin(), torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).reshape(-1, 3, 3)


def direction_averaged(field: Field, rotations: torch.Tensor) -> Field:
    """The field with its colour averaged over rotated copies of the viewing direction.

    ``rotations`` ``(K, 3, 3)``; returns ``g(x, d) = mean_k field(x, R_k d)``, colour and density.
    With rotations about the vertical axis by a few angles around 0, ``R_k d`` are the directions
    of the same pixel seen by cameras a little further round the scene, so ``g`` keeps the colour
    that nearby views share and averages out what changes between them: ``field(x, d) - g(x, d)``
    is the view-dependent part of the colour. (A NeRF's density does not depend on ``d``, so its
    mean density is its density.) For a :class:`TinyNeRF` the trunk runs once, the colour head ``K`` times.
    """
    if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or rotations.shape[0] < 1:
        raise ValueError(f"expected rotations (K, 3, 3) with K >= 1, got shape {tuple(rotations.shape)}")

    def averaged(x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if d.shape != x.shape or x.shape[-1] != 3:
            raise ValueError(
                f"expected points and directions (..., 3) of one shape; got {tuple(x.shape)}, {tuple(d.shape)}"
            )
        K = rotations.shape[0]
        R = rotations.to(d).reshape(K, *([1] * (d.ndim - 1)), 3, 3)  # (K, 1.., 3, 3)
        ds = (R @ d[..., None])[..., 0]  # (K, ..., 3) rotated directions
        if isinstance(field, TinyNeRF):  # the trunk reads x only: run it once, the colour head K times
            h, sigma = field.features(x)  # (..., width), (...)
            return field.colour(h.unsqueeze(0).expand(K, *h.shape), ds).mean(dim=0), sigma
        rgb, sigma = field(x.unsqueeze(0).expand(K, *x.shape), ds)  # (K, ..., 3), (K, ...)
        return rgb.mean(dim=0), sigma.mean(dim=0)

    return averaged


def render_views(
    scene: Field,
    poses: torch.Tensor,
    H: int,
    W: int,
    focal: float,
    near: float,
    far: float,
    n_samples: int = 128,
    background: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth images ``(V, H, W, 3)`` and depth maps ``(V, H, W)`` of ``scene`` from ``poses`` ``(V, 4, 4)``."""
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"expected poses (V, 4, 4), got shape {tuple(poses.shape)}")
    renders = [render_image(scene, p, H, W, focal, near, far, n_samples, background) for p in poses]
    return torch.stack([r.rgb for r in renders]), torch.stack([r.depth for r in renders])


def rays_of_views(poses: torch.Tensor, H: int, W: int, focal: float) -> torch.Tensor:
    """All rays of the views ``poses`` ``(V, 4, 4)`` as ``(V*H*W, 6)`` rows (origin, direction), pixel order."""
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"expected poses (V, 4, 4), got shape {tuple(poses.shape)}")
    return torch.cat([torch.cat(get_rays(H, W, focal, p), dim=-1).reshape(-1, 6) for p in poses])


def psnr(pred: torch.Tensor, target: torch.Tensor, max_val: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(max_val^2 / MSE)`` in dB (``inf`` for identical images)."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr needs images of the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}")
    mse = F.mse_loss(pred.float(), target.float()).item()
    return math.inf if mse == 0 else 10.0 * math.log10(max_val**2 / mse)
