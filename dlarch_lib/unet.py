"""Chapter 10: U-Net, a segmentation encoder-decoder whose skips concatenate.

- :class:`UNet`: ``depth`` down-sampling levels, a bottleneck and ``depth`` up-sampling levels;
  the decoder at level ``l`` concatenates the encoder's level-``l`` features (the skip).
  ``skips=False`` concatenates zeros instead: the same layers and parameter count, with the
  fine-resolution path cut, which is the ablation of the chapter.
- The training step :func:`segmentation_step` (cross-entropy plus soft Dice) for the book's
  engine ``dlarch_lib.core.train.fit``, and :func:`predict`.
- Receptive fields: the recursion is chapter 4's ``dlarch_lib.cnn.receptive_field``;
  :func:`gradient_support` measures one by autograd on a :func:`linearised` copy.
- Metrics: :func:`confusion_matrix`, :func:`iou`, :func:`dice`, :func:`boundary_band`,
  and the soft Dice loss :func:`soft_dice_loss`.
- The paper's weighted loss: :func:`border_weights` (the weight map), :func:`weighted_segmentation_step`,
  and data where objects of one class nearly touch, :func:`make_touching`, scored by :func:`gap_pixels`
  and :func:`count_objects` (instance separation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import model_device

# --------------------------------------------------------------------------- the model


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, batch norm, ReLU) layers: ``(B, c_in, H, W) -> (B, c_out, H, W)``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


def upsampler(c_in: int, c_out: int, kind: str = "transposed") -> nn.Module:
    """Double the resolution: ``(B, c_in, H, W) -> (B, c_out, 2H, 2W)``.

    ``"transposed"``: ``ConvTranspose2d(kernel 2, stride 2)``, each output pixel of a 2x2 block made by its
    own slice of the kernel. ``"resize"``: nearest-neighbour resize, then ``Conv2d(3x3, padding 1)``,
    one kernel for every output pixel (Odena et al.'s resize-convolution).
    """
    if kind == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
    if kind == "resize":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1))
    raise ValueError(f"kind must be 'transposed' or 'resize', got {kind!r}")


class UNet(nn.Module):
    """U-Net: encoder widths ``width * 2**l`` for ``l = 0..depth``, concatenating skips.

    ``skips=False`` keeps every layer (so the parameter count is identical) but feeds the
    decoder zeros where the encoder's features would go: only the bottleneck path remains.
    ``upsample="transposed"`` (the paper's 2x2 up-convolution) or ``"resize"`` (nearest-neighbour
    resize, then a 3x3 convolution: no checkerboard, see :func:`checkerboard_share`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        width: int = 16,
        depth: int = 2,
        skips: bool = True,
        upsample: str = "transposed",
    ):
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1 or not 1 <= depth <= 5:
            raise ValueError(
                f"need in_channels >= 1, num_classes >= 2, width >= 1, 1 <= depth <= 5; got "
                f"{in_channels=}, {num_classes=}, {width=}, {depth=}"
            )
        if upsample not in ("transposed", "resize"):
            raise ValueError(f"upsample must be 'transposed' or 'resize', got {upsample!r}")
        self.in_channels, self.depth, self.skips = in_channels, depth, skips
        widths = [width * 2**level for level in range(depth + 1)]  # w, 2w, ..., 2^depth w
        self.down = nn.ModuleList(DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths], widths[:-1]))
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        # level l (deepest first): upsample 2^(l+1) w -> 2^l w, then concat skip (2^l w) -> 2^l w
        self.up = nn.ModuleList(
            upsampler(widths[level + 1], widths[level], upsample) for level in reversed(range(depth))
        )
        self.fuse = nn.ModuleList(DoubleConv(2 * widths[level], widths[level]) for level in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck features ``(B, 2^depth w, H / 2^depth, W / 2^depth)`` and the skips, finest first."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[-2] % 2**self.depth or x.shape[-1] % 2**self.depth:
            raise ValueError(f"H and W must be divisible by 2**depth = {2**self.depth}, got {tuple(x.shape[-2:])}")
        skips = []
        for block in self.down:
            x = block(x)  # (B, 2^l w, H / 2^l, W / 2^l)
            skips.append(x)
            x = self.pool(x)  # (B, 2^l w, H / 2^(l+1), W / 2^(l+1))
        return self.bottleneck(x), skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` for images ``(B, in_channels, H, W)``.

        H and W must be divisible by ``2**depth``.
        """
        x, skips = self.encode(x)  # x: (B, 2^depth w, H / 2^depth, W / 2^depth)
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = up(x)  # (B, 2^l w, H / 2^l, W / 2^l)
            if not self.skips:
                skip = torch.zeros_like(skip)  # ablation: same layers, no fine-resolution information
            x = fuse(torch.cat([x, skip], dim=1))  # (B, 2^(l+1) w, ...) -> (B, 2^l w, ...)
        return self.head(x)  # (B, num_classes, H, W)


def segmentation_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The U-Net's step: cross-entropy plus :func:`soft_dice_loss` of the logits against the masks.

    ``batch`` is images ``(B, C, H, W)`` and masks ``(B, H, W)`` int64; the logits are ``(B, K, H, W)``.
    """
    images, masks = batch
    logits = model(images)
    return F.cross_entropy(logits, masks) + soft_dice_loss(logits, masks)


def weighted_segmentation_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dice_loss: bool = True
) -> torch.Tensor:
    """The paper's weighted cross-entropy ``sum_x w(x) (-log p_c(x)) / sum_x w(x)``, plus :func:`soft_dice_loss`.

    ``batch`` is images ``(B, C, H, W)``, masks ``(B, H, W)`` int64 and pixel weights ``(B, H, W)``
    (e.g. :func:`border_weights`); ``dice_loss=False`` leaves the Dice term out.
    """
    images, masks, weights = batch
    if weights.shape != masks.shape:
        raise ValueError(f"weights must have the masks' shape {tuple(masks.shape)}, got {tuple(weights.shape)}")
    logits = model(images)  # (B, K, H, W)
    nll = F.cross_entropy(logits, masks, reduction="none")  # (B, H, W): -log p_c(x)
    loss = (weights * nll).sum() / weights.sum()
    return loss + soft_dice_loss(logits, masks) if dice_loss else loss


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted masks ``(N, H, W)`` int64 on the CPU: arg-max over classes, model in eval mode on its device."""
    model.eval()
    device = model_device(model)
    return torch.cat([model(batch.to(device)).argmax(dim=1).cpu() for batch in images.split(batch_size)])


# --------------------------------------------------------------------------- receptive fields


def linearised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with ReLU -> identity and max-pool -> average pool.

    The copy is linear (affine) and has the same receptive-field geometry, so the set of
    input pixels with a non-zero gradient is exactly the receptive field (for generic weights).
    """
    clone = copy.deepcopy(model).eval()
    for module in list(clone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, child_name, nn.AvgPool2d(child.kernel_size, child.stride))
    return clone


def gradient_support(fn: Callable[[torch.Tensor], torch.Tensor], size: int, in_channels: int = 1) -> int:
    """Width (pixels) of the inputs with a non-zero gradient on the centre pixel of ``fn``'s output.

    ``fn`` maps images ``(1, in_channels, size, size)`` to feature maps ``(1, K, h, w)``; apply
    it to a :func:`linearised` model so that this width is the receptive field.
    """
    x = torch.randn(1, in_channels, size, size, requires_grad=True)
    out = fn(x)  # (1, K, h, w)
    if out.ndim != 4:
        raise ValueError(f"fn must return feature maps (1, K, h, w), got shape {tuple(out.shape)}")
    (grad,) = torch.autograd.grad(out[0, :, out.shape[-2] // 2, out.shape[-1] // 2].sum(), x)  # (1, C, size, size)
    columns = (grad[0].abs().sum(dim=(0, 1)) > 0).nonzero().flatten()  # (n,)
    return int(columns.max() - columns.min() + 1)


# --------------------------------------------------------------------------- metrics


def _check_masks(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.dtype.is_floating_point or target.dtype.is_floating_point:
        raise ValueError("pred and target must be integer class masks (take argmax of logits first)")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixel counts ``(K, K)``: row = true class, column = predicted class."""
    _check_masks(pred, target, num_classes)
    flat = target.flatten().long() * num_classes + pred.flatten().long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Per-class intersection over union ``|P ∩ T| / |P ∪ T|`` ``(K,)`` and its mean.

    A class absent from both masks has IoU ``nan`` and is left out of the mean.
    """
    cm = confusion_matrix(pred, target, num_classes).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp  # |P| + |T| - |P ∩ T|
    per_class = tp / union  # nan where union == 0
    return per_class, per_class.nanmean().item()


def dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Per-class Dice coefficient ``2 |P ∩ T| / (|P| + |T|)`` ``(K,)`` and its mean (``nan`` as in :func:`iou`)."""
    cm = confusion_matrix(pred, target, num_classes).double()
    per_class = 2 * cm.diag() / (cm.sum(0) + cm.sum(1))
    return per_class, per_class.nanmean().item()


def boundary_band(masks: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Pixels ``(N, H, W)`` bool within ``width`` pixels (Chebyshev) of a label change in ``masks`` ``(N, H, W)``."""
    if masks.ndim != 3:
        raise ValueError(f"expected masks (N, H, W), got shape {tuple(masks.shape)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    m = masks[:, None].float()  # (N, 1, H, W)
    k = 2 * width + 1
    # a window holds a label change iff its max and min differ (replicate padding: the border is no edge)
    padded = F.pad(m, (width,) * 4, mode="replicate")
    hi = F.max_pool2d(padded, k, stride=1)
    lo = -F.max_pool2d(-padded, k, stride=1)
    return (hi != lo)[:, 0]


def class_balance_weights(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class weights ``(num_classes,)``: ``1 / (K f_c)`` for a class with pixel share ``f_c`` in ``masks``
    (``K`` = classes present), 0 for an absent class, so every present class carries the same total weight."""
    counts = torch.bincount(masks.flatten(), minlength=num_classes).double()  # (K,)
    present = counts > 0
    return torch.where(present, masks.numel() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))


def two_nearest_object_distances(instances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Euclidean distances ``d1, d2`` ``(H, W)`` from each pixel to the nearest and the second-nearest object
    of one image's ``instances`` ``(H, W)`` (0 = background); ``None`` when fewer than two objects are present."""
    from scipy.ndimage import distance_transform_edt

    inst = instances.cpu().numpy()
    ids = [k for k in range(1, int(inst.max()) + 1) if (inst == k).any()]
    if len(ids) < 2:
        return None
    dist = torch.stack([torch.from_numpy(distance_transform_edt(inst != k)) for k in ids])  # (n_obj, H, W)
    d1, d2 = dist.sort(dim=0).values[:2]
    return d1, d2


def border_weights(
    instances: torch.Tensor, masks: torch.Tensor, num_classes: int, w0: float = 10.0, sigma: float = 2.0
) -> torch.Tensor:
    """The U-Net paper's pixel weights ``w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2))``: ``(N, H, W)``.

    ``instances`` ``(N, H, W)`` (0 = background, ``k >= 1`` = object ``k``) and ``masks`` ``(N, H, W)`` class ids.
    ``w_c`` is :func:`class_balance_weights` over the batch. The border term acts on background pixels;
    ``d1`` and ``d2`` (:func:`two_nearest_object_distances`) are the distances to the nearest and the
    second-nearest object, so it is large only in narrow gaps *between* two objects.
    """
    if instances.ndim != 3 or masks.shape != instances.shape:
        raise ValueError(f"expected instances and masks (N, H, W), got {tuple(instances.shape)}, {tuple(masks.shape)}")
    if sigma <= 0 or w0 < 0:
        raise ValueError(f"need sigma > 0 and w0 >= 0, got {sigma=}, {w0=}")
    weights = class_balance_weights(masks, num_classes)[masks]  # (N, H, W)
    border = torch.zeros_like(weights)
    for i, inst in enumerate(instances):
        distances = two_nearest_object_distances(inst)
        if distances is None:
            continue  # one object: no gap between two
        d1, d2 = distances
        border[i] = w0 * torch.exp(-((d1 + d2) ** 2) / (2 * sigma**2)) * (inst == 0).cpu()
    return (weights + border.to(weights.device)).float()


def checkerboard_share(maps: torch.Tensor) -> torch.Tensor:
    """Share of each map's variance that repeats with period 2: ``(..., H, W) -> (...)``, in ``[0, 1]``.

    The period-2 part of a map is, at each pixel, the mean of its phase class (row and column parity)
    minus the map's mean; the share is that part's energy over the energy of the centred map. A smooth
    map scores near 0, a pure checkerboard 1, white noise about ``3 / (H W)``. H and W must be even.
    """
    if maps.ndim < 2 or maps.shape[-1] % 2 or maps.shape[-2] % 2:
        raise ValueError(f"expected maps (..., H, W) with even H and W, got shape {tuple(maps.shape)}")
    centred = maps - maps.mean(dim=(-2, -1), keepdim=True)
    phases = centred.unflatten(-2, (-1, 2)).unflatten(-1, (-1, 2))  # (..., H/2, 2, W/2, 2)
    phase_mean = phases.mean(dim=(-4, -2), keepdim=True)  # (..., 1, 2, 1, 2): one value per parity class
    periodic = phase_mean.expand_as(phases)
    return periodic.pow(2).sum(dim=(-4, -3, -2, -1)) / centred.pow(2).sum(dim=(-2, -1)).clamp_min(1e-12)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of V-Net: ``1 - mean_c (2 sum p_c g_c + eps) / (sum p_c + sum g_c + eps)``.

    ``logits`` ``(B, K, H, W)``, ``target`` ``(B, H, W)`` int64; sums run over batch and pixels.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"expected logits (B, K, H, W) and target (B, H, W), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    probs = logits.softmax(dim=1)  # (B, K, H, W)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, K, H, W)
    inter = (probs * onehot).sum(dim=(0, 2, 3))  # (K,)
    sizes = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # (K,)
    return 1 - ((2 * inter + eps) / (sizes + eps)).mean()


# --------------------------------------------------------------------------- touching objects


class TouchingSet(NamedTuple):
    """Images whose objects (one class) are separated by gaps of a pixel or two, see :func:`make_touching`."""

    images: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]
    masks: torch.Tensor  # (N, H, W) int64, 0 = background, 1 = object
    instances: torch.Tensor  # (N, H, W) int64, 0 = background, k >= 1 = object k


def make_touching(
    n: int,
    size: int = 32,
    objects: tuple[int, int] = (2, 4),
    gap: tuple[float, float] = (1.0, 2.0),
    seed: int = 0,
    noise: float = 0.08,
) -> TouchingSet:
    """``n`` images, each a disc of 2..4 cells of one class split by straight gaps ``gap`` pixels wide.

    A disc of radius ``size/4 .. 3 size/8`` is cut into ``k`` Voronoi cells (``k`` uniform in ``objects``)
    around seeds spread evenly in angle; a pixel belongs to the cell of its nearest seed unless it lies
    within half the gap width of the bisector with another seed, where it stays background. Cells have
    one grey level per image, 0.3..0.5 above or below the background; Gaussian noise ``noise`` on top.
    Seeded: the same ``seed`` gives the same set.
    """
    k_min, k_max = objects
    if n < 1 or size < 16 or not 2 <= k_min <= k_max <= 6:
        raise ValueError(f"need n >= 1, size >= 16, 2 <= objects[0] <= objects[1] <= 6; got {n=}, {size=}, {objects=}")
    if not 0.5 <= gap[0] <= gap[1] <= size / 8 or noise < 0:
        raise ValueError(f"need 0.5 <= gap[0] <= gap[1] <= size / 8 and noise >= 0, got {gap=}, {noise=}")
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)
    K = k_max
    count = torch.randint(k_min, k_max + 1, (n,), generator=g)  # (N,)
    radius = size * (0.25 + 0.125 * u(n))  # (N,) the disc
    centre = size / 2 + (size / 2 - radius - 1)[:, None] * (2 * u(n, 2) - 1)  # (N, 2) inside the image
    slot = torch.arange(K).view(1, K)
    angle = 2 * torch.pi * (slot + 0.3 * u(n, K)) / count[:, None] + 2 * torch.pi * u(n, 1)  # (N, K) spread out
    dist = radius[:, None] * (0.35 + 0.3 * u(n, K))  # (N, K) from the disc's centre
    seeds = centre[:, None] + dist[..., None] * torch.stack([angle.cos(), angle.sin()], dim=-1)  # (N, K, 2) x, y
    half_gap = (gap[0] + (gap[1] - gap[0]) * u(n)) / 2  # (N,)

    grid = torch.arange(size, dtype=torch.float32) + 0.5
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1)  # (H, W, 2): x, y of each pixel centre
    sq = ((xy[None, :, :, None] - seeds[:, None, None]) ** 2).sum(-1)  # (N, H, W, K) squared distance to seeds
    sq = torch.where((slot < count[:, None])[:, None, None], sq, torch.inf)  # unused slots are infinitely far
    nearest = sq.argmin(dim=-1)  # (N, H, W)
    d_near = sq.gather(-1, nearest[..., None])  # (N, H, W, 1)
    sep = (seeds[:, :, None] - seeds[:, None]).norm(dim=-1)  # (N, K, K) seed separations
    sep_near = sep.gather(1, nearest.flatten(1)[..., None].expand(-1, -1, K)).view(n, size, size, K)  # (N, H, W, K)
    # distance from the pixel to the bisector of its seed and seed j: (|x - s_j|^2 - |x - s_i|^2) / (2 |s_i - s_j|)
    to_bisector = (sq - d_near) / (2 * sep_near.clamp_min(1e-6))  # (N, H, W, K); inf for unused slots
    to_bisector = torch.where(slot.view(1, 1, 1, K) == nearest[..., None], torch.inf, to_bisector)
    in_disc = ((xy[None] - centre[:, None, None]) ** 2).sum(-1) <= radius[:, None, None] ** 2  # (N, H, W)
    inside = in_disc & (to_bisector.min(dim=-1).values >= half_gap[:, None, None])
    instances = torch.where(inside, nearest + 1, 0)  # (N, H, W)

    background = 0.25 + 0.5 * u(n)
    sign = torch.where(u(n) < 0.5, -1.0, 1.0)
    level = (background + sign * (0.3 + 0.2 * u(n)))[:, None, None]  # (N, 1, 1)
    images = torch.where(inside, level, background[:, None, None])[:, None]  # (N, 1, H, W)
    images = (images + noise * torch.randn(images.shape, generator=g)).clamp(0.0, 1.0).float()
    return TouchingSet(images, inside.long(), instances)


def gap_pixels(instances: torch.Tensor, max_sum: float = 3.0) -> torch.Tensor:
    """Background pixels ``(N, H, W)`` bool with ``d1 + d2 <= max_sum`` (:func:`two_nearest_object_distances`):
    the narrow gaps between two objects of ``instances`` ``(N, H, W)``."""
    if instances.ndim != 3:
        raise ValueError(f"expected instances (N, H, W), got shape {tuple(instances.shape)}")
    out = torch.zeros(instances.shape, dtype=torch.bool)
    for i, inst in enumerate(instances):
        distances = two_nearest_object_distances(inst)
        if distances is not None:
            out[i] = (distances[0] + distances[1] <= max_sum) & (inst.cpu() == 0)
    return out


def count_objects(foreground: torch.Tensor, min_size: int = 1) -> torch.Tensor:
    """Number of 4-connected components of at least ``min_size`` pixels in each image's ``foreground``
    ``(N, H, W)`` (bool or 0/1): ``(N,)`` int64.

    Applied to a predicted mask it counts the objects a model keeps apart; a gap filled in merges two,
    and ``min_size`` leaves out specks of a few stray pixels.
    """
    from scipy.ndimage import label

    if foreground.ndim != 3:
        raise ValueError(f"expected foreground masks (N, H, W), got shape {tuple(foreground.shape)}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    counts = []
    for f in foreground.cpu().bool().numpy():
        components, n = label(f)  # (H, W) component ids 1..n, 0 = background
        sizes = torch.bincount(torch.from_numpy(components).flatten(), minlength=n + 1)[1:]  # (n,)
        counts.append(int((sizes >= min_size).sum()))
    return torch.tensor(counts, dtype=torch.long)
