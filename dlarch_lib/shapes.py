"""Procedurally generated shapes: images with per-pixel masks and boxes (chapters 10 and 25).

:func:`make_shapes` draws up to ``max_shapes`` circles, squares and triangles per image on a
textured, noisy background, fully seeded and vectorised over the whole batch (a few thousand
32x32 images take a fraction of a second). The same set serves

- segmentation: ``masks`` ``(N, H, W)`` int64, 0 = background, ``1 + CLASSES.index(name)``;
- detection: ``boxes[i]`` ``(k_i, 4)`` in pixel edges ``(x0, y0, x1, y1)`` (x1, y1 exclusive),
  tight around the *visible* pixels of each object, and ``labels[i]`` ``(k_i,)`` in 1..3;
- instances: ``instances`` ``(N, H, W)`` int64, 0 = background, ``1 + j`` for the ``j``-th shape
  drawn (which object owns each pixel, where ``masks`` only says which class).

Later shapes are painted over earlier ones; an object hidden completely gets no box.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLASSES = ("circle", "square", "triangle")
"""Foreground classes; class id ``c`` in masks and labels is ``1 + CLASSES.index(name)``."""
NUM_CLASSES = len(CLASSES) + 1  # with background 0


@dataclass(frozen=True)
class ShapesSet:
    """A batch of shape images with segmentation masks and detection boxes."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1], C = 1 or 3
    masks: torch.Tensor  # (N, H, W) int64, 0 = background, 1..3 = CLASSES
    boxes: list[torch.Tensor]  # N tensors (k_i, 4) float32: x0, y0, x1, y1 in pixel edges
    labels: list[torch.Tensor]  # N tensors (k_i,) int64 in 1..3
    instances: torch.Tensor | None = None  # (N, H, W) int64, 0 = background, 1 + j = the j-th shape drawn

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: slice) -> ShapesSet:
        """A sub-set by slice, e.g. ``data[:1000]``."""
        if not isinstance(index, slice):
            raise TypeError(f"index a ShapesSet with a slice, got {type(index).__name__}")
        instances = None if self.instances is None else self.instances[index]
        return ShapesSet(self.images[index], self.masks[index], self.boxes[index], self.labels[index], instances)

    def class_frequencies(self) -> torch.Tensor:
        """Fraction of pixels of each class ``(NUM_CLASSES,)``, background first."""
        return torch.bincount(self.masks.flatten(), minlength=NUM_CLASSES).float() / self.masks.numel()


def _footprint(cls: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean footprints ``(N, H, W)`` of one shape per image: class ``cls``, centre, radius, all ``(N,)``."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    cls, cx, cy, r = (t.view(-1, 1, 1) for t in (cls, cx, cy, r))  # (N, 1, 1)
    dx = grid.view(1, 1, size) - cx  # (N, 1, W)
    dy = grid.view(1, size, 1) - cy  # (N, H, 1)
    circle = dx**2 + dy**2 <= r**2  # (N, H, W) by broadcasting
    square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)  # 0.8: about the circle's area
    # triangle: apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    return (circle & (cls == 1)) | (square & (cls == 2)) | (triangle & (cls == 3))


def _tight_boxes(visible: torch.Tensor) -> torch.Tensor:
    """Tight boxes ``(N, 4)`` around the True pixels of ``visible`` ``(N, H, W)`` (garbage where empty)."""
    size_h, size_w = visible.shape[-2:]
    cols, rows = visible.any(dim=-2).float(), visible.any(dim=-1).float()  # (N, W), (N, H)
    x0 = cols.argmax(dim=-1)  # first True column
    x1 = size_w - cols.flip(-1).argmax(dim=-1)  # one past the last True column
    y0 = rows.argmax(dim=-1)
    y1 = size_h - rows.flip(-1).argmax(dim=-1)
    return torch.stack([x0, y0, x1, y1], dim=-1).float()


def make_shapes(
    n: int,
    size: int = 32,
    max_shapes: int = 3,
    seed: int = 0,
    noise: float = 0.05,
    texture: float = 0.1,
    radius: tuple[float, float] = (3.0, 7.0),
    channels: int = 1,
) -> ShapesSet:
    """Generate ``n`` images of ``size`` x ``size`` pixels with 1..``max_shapes`` shapes each.

    Every shape has a random class, centre, radius in ``radius`` (pixels) and grey level
    (or colour) that differs from the background by 0.25..0.5, darker or lighter. On top of
    the picture come a random stripe pattern of amplitude ``texture`` (edges that are *not*
    object boundaries) and Gaussian pixel noise of standard deviation ``noise``; values are
    clipped to [0, 1]. The same ``seed`` gives the same set.
    """
    if n < 1 or size < 8 or max_shapes < 1:
        raise ValueError(f"need n >= 1, size >= 8 and max_shapes >= 1; got n={n}, size={size}, max_shapes={max_shapes}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    r_min, r_max = radius
    if not 1.0 <= r_min <= r_max or 2 * r_max >= size:
        raise ValueError(f"radius must satisfy 1 <= min <= max < size/2, got {radius} for size {size}")
    if noise < 0 or texture < 0:
        raise ValueError(f"noise and texture must be >= 0, got noise={noise}, texture={texture}")
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)
    S = max_shapes

    # geometry of S shape slots per image; slot j is used when j < count
    count = torch.randint(1, S + 1, (n, 1), generator=g)  # (N, 1)
    present = torch.arange(S).view(1, S) < count  # (N, S)
    cls = torch.randint(1, len(CLASSES) + 1, (n, S), generator=g)  # (N, S)
    r = r_min + (r_max - r_min) * u(n, S)
    cx = r + (size - 2 * r) * u(n, S)  # the shape fits inside the image
    cy = r + (size - 2 * r) * u(n, S)

    # painter's algorithm: the last slot covering a pixel owns it (-1 = background)
    owner = torch.full((n, size, size), -1, dtype=torch.long)  # (N, H, W)
    for j in range(S):
        footprint = _footprint(cls[:, j], cx[:, j], cy[:, j], r[:, j], size) & present[:, j, None, None]
        owner.masked_fill_(footprint, j)
    table = torch.cat([torch.zeros(n, 1, dtype=torch.long), cls], dim=1)  # (N, 1 + S): class of owner + 1
    masks = table.gather(1, (owner + 1).flatten(1)).view_as(owner)  # (N, H, W)

    # intensities: background level, each shape differs from it by +-(0.25..0.5) per channel
    background = 0.25 + 0.5 * u(n, 1, channels)  # (N, 1, C)
    sign = torch.where(u(n, S, channels) < 0.5, -1.0, 1.0)
    colour = torch.cat([background, background + sign * (0.25 + 0.25 * u(n, S, channels))], dim=1)  # (N, 1 + S, C)
    index = (owner + 1).flatten(1)[..., None].expand(-1, -1, channels)  # (N, H*W, C)
    images = colour.gather(1, index).transpose(1, 2).reshape(n, channels, size, size)  # (N, C, H, W)

    # stripes with random period (4..10 px), orientation and phase, then pixel noise
    grid = torch.arange(size, dtype=torch.float32)
    angle, period, phase = torch.pi * u(n), 4 + 6 * u(n), 2 * torch.pi * u(n)
    k = (2 * torch.pi / period)[:, None, None]
    proj = torch.cos(angle)[:, None, None] * grid.view(1, 1, size) + torch.sin(angle)[:, None, None] * grid.view(
        1, size, 1
    )
    stripes = torch.sin(k * proj + phase[:, None, None])  # (N, H, W)
    images = images + texture * stripes[:, None] + noise * torch.randn(images.shape, generator=g)
    images = images.clamp(0.0, 1.0).float()

    # detection targets: tight boxes around visible pixels, dropping fully hidden objects
    visible = [owner == j for j in range(S)]  # S x (N, H, W)
    boxes_all = torch.stack([_tight_boxes(v) for v in visible], dim=1)  # (N, S, 4)
    keep = torch.stack([v.flatten(1).any(dim=1) for v in visible], dim=1)  # (N, S)
    boxes = [boxes_all[i][keep[i]] for i in range(n)]
    labels = [cls[i][keep[i]] for i in range(n)]
    return ShapesSet(images=images, masks=masks, boxes=boxes, labels=labels, instances=owner + 1)
