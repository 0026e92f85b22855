"""Object detection by hand (chapter 25): IoU, NMS, mAP, a YOLO-style detector and RoIAlign.

Boxes are ``(x0, y0, x1, y1)`` in pixel edges (``x1, y1`` exclusive), as in
:mod:`dlarch_lib.shapes`, whose generated images give the detection set
(:func:`detection_set`). Class ids are ``1..num_classes``; 0 is background.

- :func:`box_iou` pairwise intersection over union, :func:`nms` and :func:`batched_nms`;
- :func:`average_precision` (all-point interpolated) and :func:`mean_average_precision`;
- :func:`encode_grid` / :func:`decode_grid` YOLO grid targets, :class:`TinyYOLO`,
  :func:`yolo_loss`, its training step :func:`yolo_step` (for ``dlarch_lib.core.train.fit``),
  :func:`yolo_detect`;
- :func:`bilinear_sample`, :func:`roi_align`, :func:`roi_pool` (the two-stage crop) and
  :func:`jitter_proposals` (RoIs made from perturbed ground truth, for an exercise);
- Faster R-CNN's pieces: :func:`encode_boxes` / :func:`decode_boxes` (the box-regression
  deltas), :func:`make_anchors`, :func:`match_anchors`, :class:`RPNHead`, :func:`rpn_loss`,
  :func:`rpn_step`, :func:`rpn_proposals`, :func:`proposal_targets`, :func:`sample_proposals`,
  :class:`RoIBoxHead`, :func:`box_head_step`, :func:`two_stage_detect`;
- :func:`coco_map`, COCO's mAP@[.5:.95] with 101-point interpolation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dlarch_lib.core.train import model_device
from dlarch_lib.shapes import CLASSES, ShapesSet, make_shapes


def detection_set(n: int, size: int = 32, max_shapes: int = 3, seed: int = 0) -> ShapesSet:
    """``n`` seeded images with 1..``max_shapes`` shapes each, boxes and labels (see :func:`make_shapes`).

    Radii 3..7 px on 32 x 32 images (objects 6..14 px wide); radii scale with ``size``.
    """
    scale = size / 32
    return make_shapes(n, size=size, max_shapes=max_shapes, seed=seed, radius=(3.0 * scale, 7.0 * scale))


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (K, 4) as (x0, y0, x1, y1), got {tuple(boxes.shape)}")


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``(K,)`` of boxes ``(K, 4)``; a box with ``x1 < x0`` or ``y1 < y0`` has area 0."""
    _check_boxes(boxes)
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``(N, M)`` of boxes ``a`` ``(N, 4)`` and ``b`` ``(M, 4)``: ``|A ∩ B| / |A ∪ B|``."""
    _check_boxes(a, "a")
    _check_boxes(b, "b")
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)  # (N, M), 0 when disjoint
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5, sort: bool = True) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first.

    Take the best remaining box, drop every box overlapping it with IoU > ``iou_threshold``,
    repeat. ``sort=False`` visits boxes in the given order instead (a bug, kept to show why
    the sort matters).
    """
    _check_boxes(boxes)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {tuple(scores.shape)}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    order = scores.argsort(descending=True, stable=True) if sort else torch.arange(len(scores))
    overlaps = (box_iou(boxes, boxes) > iou_threshold).tolist()  # (K, K) as lists: the loop is plain Python
    suppressed = [False] * len(scores)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed = [s or o for s, o in zip(suppressed, overlaps[i])]  # drop every box overlapping box i
    return torch.tensor(keep, dtype=torch.long)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float = 0.5
) -> torch.Tensor:
    """NMS run separately per class: boxes of different ``labels`` never suppress each other."""
    _check_boxes(boxes)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and scores {tuple(scores.shape)} must match")
    per_class = [
        torch.nonzero(labels == c).flatten()[nms(boxes[labels == c], scores[labels == c], iou_threshold)]
        for c in labels.unique()
    ]
    keep = torch.cat(per_class) if per_class else torch.zeros(0, dtype=torch.long)
    return keep[scores[keep].argsort(descending=True, stable=True)]


def precision_recall(tp: torch.Tensor, scores: torch.Tensor, num_gt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Recall and precision ``(K + 1,)`` after each of the ``K`` detections ranked by ``scores``.

    Entry 0 is the empty ranking (R = 0, P = 1).
    """
    if tp.shape != scores.shape or tp.ndim != 1:
        raise ValueError(
            f"tp and scores must be 1-D and of equal shape, got {tuple(tp.shape)} and {tuple(scores.shape)}"
        )
    if num_gt < 1:
        raise ValueError(f"num_gt must be >= 1, got {num_gt}")
    hits = tp[scores.argsort(descending=True, stable=True)].double().cumsum(0)  # TP_k
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), hits / num_gt])
    precision = torch.cat([torch.ones(1, dtype=torch.float64), hits / torch.arange(1, len(hits) + 1)])
    return recall, precision


def average_precision(
    tp: torch.Tensor, scores: torch.Tensor, num_gt: int, interpolate: bool = True, recall_points: int | None = None
) -> float:
    """AP of detections ranked by ``scores`` with true-positive flags ``tp`` against ``num_gt`` objects.

    All-point interpolation (PASCAL VOC 2010+): the precision envelope
    ``p̂(r) = max_{r' >= r} p(r')`` integrated over recall. ``interpolate=False`` gives the
    plain sum ``Σ (R_k - R_{k-1}) P_k`` (what ``sklearn.metrics.average_precision_score`` computes).
    ``recall_points=101`` is COCO's rule instead: the mean of ``p̂(r)`` at ``r = 0, 0.01, ..., 1``
    (0 where the recall is never reached).
    """
    recall, precision = precision_recall(tp, scores, num_gt)
    if recall_points is not None:
        if recall_points < 2:
            raise ValueError(f"recall_points must be >= 2, got {recall_points}")
        recall, precision = recall[1:], precision[1:]  # (K,): the ranks only, as COCO's evaluator
        envelope = precision.flip(0).cummax(0).values.flip(0)  # (K,) non-increasing in k
        levels = torch.linspace(0, 1, recall_points, dtype=torch.float64)  # (R,)
        first = torch.searchsorted(recall, levels)  # first rank with recall >= r; K when never reached
        padded = torch.cat([envelope, torch.zeros(1, dtype=torch.float64)])
        return float(padded[first].mean())
    if interpolate:  # envelope: running maximum from the right
        precision = precision.flip(0).cummax(0).values.flip(0)
    return float(((recall[1:] - recall[:-1]) * precision[1:]).sum())


def _greedy_match(iou_rows: list[list[float]], iou_threshold: float, rule: str) -> list[bool]:
    """True-positive flags of detections whose IoU rows (one per detection, best score first) are given.

    Plain Python lists: the loop runs once per detection, and tensor calls there would dominate.
    """
    taken = [False] * (len(iou_rows[0]) if iou_rows else 0)
    flags = []
    for row in iou_rows:
        candidates = [j for j in range(len(row)) if rule == "voc" or not taken[j]]
        j = max(candidates, key=row.__getitem__, default=-1)  # the first of equal IoUs, as torch.max
        hit = j >= 0 and row[j] >= iou_threshold and not taken[j]
        if hit:
            taken[j] = True
        flags.append(hit)
    return flags


def _as_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``: an IoU in float32 is compared with a float32 threshold, as torch does."""
    return float(torch.tensor(value, dtype=dtype))


def match_detections(
    boxes: torch.Tensor, scores: torch.Tensor, gt_boxes: torch.Tensor, iou_threshold: float = 0.5, rule: str = "voc"
) -> torch.Tensor:
    """True-positive flags ``(K,)`` for one image and one class.

    ``rule="voc"``: in score order each detection takes the ground-truth box it overlaps most; it
    is a true positive if that IoU is >= ``iou_threshold`` and the box is not taken yet, else a
    false positive. ``rule="coco"``: each detection takes the best box *among those not taken yet*
    with IoU >= ``iou_threshold`` (the COCO evaluator's rule), so a duplicate cannot hide a
    second object it also overlaps.
    """
    if rule not in ("voc", "coco"):
        raise ValueError(f"rule must be 'voc' or 'coco', got {rule!r}")
    tp = torch.zeros(len(scores), dtype=torch.bool)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return tp
    order = scores.argsort(descending=True, stable=True)  # (K,) best first
    iou = box_iou(boxes[order], gt_boxes)  # (K, G)
    tp[order] = torch.tensor(_greedy_match(iou.tolist(), _as_dtype(iou_threshold, iou.dtype), rule))
    return tp


def _pooled_matches(
    pred_boxes: list[torch.Tensor],
    pred_scores: list[torch.Tensor],
    pred_labels: list[torch.Tensor],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    iou_thresholds: Sequence[float],
    rule: str,
) -> dict[int, tuple[list[torch.Tensor], torch.Tensor, int]]:
    """Per class: true-positive flags (one tensor per threshold), scores and the number of objects.

    The detections of a class are pooled over all images; each image's IoUs are computed once and
    matched at every threshold.
    """
    lengths = {len(pred_boxes), len(pred_scores), len(pred_labels), len(gt_boxes), len(gt_labels)}
    if len(lengths) != 1:
        raise ValueError(f"all lists need one entry per image, got lengths {sorted(lengths)}")
    if rule not in ("voc", "coco"):
        raise ValueError(f"rule must be 'voc' or 'coco', got {rule!r}")
    pooled = {}
    for c in sorted(torch.cat(gt_labels).unique().tolist()):
        flags: list[list[bool]] = [[] for _ in iou_thresholds]
        scores, num_gt = [], 0
        for b, s, lab, gb, gl in zip(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels):
            order = s[lab == c].argsort(descending=True, stable=True)
            b, s, g = b[lab == c][order], s[lab == c][order], gb[gl == c]  # detections best first, objects
            iou = box_iou(b, g)  # (K, G)
            rows = iou.tolist() if len(g) else [[] for _ in range(len(b))]
            for f, t in zip(flags, iou_thresholds):
                f += _greedy_match(rows, _as_dtype(t, iou.dtype), rule)
            scores.append(s)
            num_gt += len(g)
        pooled[c] = ([torch.tensor(f, dtype=torch.bool) for f in flags], torch.cat(scores), num_gt)
    return pooled


def mean_average_precision(
    pred_boxes: list[torch.Tensor],
    pred_scores: list[torch.Tensor],
    pred_labels: list[torch.Tensor],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    iou_threshold: float = 0.5,
    rule: str = "voc",
    recall_points: int | None = None,
) -> dict[str, float | dict[int, float]]:
    """mAP@``iou_threshold`` over a data set: ``{"map": mean, "ap": {class: AP}}``.

    Every argument is a list with one tensor per image. Detections of each class are pooled
    over all images, ranked by score, and matched per image (the rule of :func:`match_detections`,
    ``rule``). Classes without ground truth are left out of the mean. ``recall_points`` is
    passed to :func:`average_precision` (``None``: all-point interpolation).
    """
    pooled = _pooled_matches(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, [iou_threshold], rule)
    ap = {
        c: average_precision(flags[0], scores, num_gt, recall_points=recall_points)
        for c, (flags, scores, num_gt) in pooled.items()
    }
    return {"map": sum(ap.values()) / max(len(ap), 1), "ap": ap}


# ----------------------------------------------------------------------------- one stage: YOLO


def encode_grid(boxes: torch.Tensor, labels: torch.Tensor, size: int, grid: int, anchor: float) -> torch.Tensor:
    """YOLO targets ``(6, S, S)`` for one image: objectness, cell offsets ox, oy, log(w/a), log(h/a), class.

    The cell containing a box centre is responsible for it (one object per cell: when two
    centres share a cell, the larger box wins). ``class`` is ``label - 1`` (0-based).
    """
    _check_boxes(boxes)
    if size % grid:
        raise ValueError(f"image size {size} must be divisible by the grid {grid}")
    cell = size / grid
    target = torch.zeros(6, grid, grid)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / cell  # (K, 2) in cell units
    wh = boxes[:, 2:] - boxes[:, :2]  # (K, 2) in pixels
    for k in (wh.prod(1)).argsort().tolist():  # small to large: larger boxes overwrite
        col, row = centre[k].floor().long().clamp(0, grid - 1).tolist()
        target[:, row, col] = torch.cat(
            [
                torch.ones(1),
                centre[k] - torch.tensor([col, row]),
                torch.log(wh[k] / anchor),
                (labels[k] - 1).float().view(1),
            ]
        )
    return target


def decode_grid(
    obj: torch.Tensor, offsets: torch.Tensor, log_wh: torch.Tensor, size: int, anchor: float
) -> torch.Tensor:
    """Boxes ``(N, S, S, 4)`` from cell offsets ``(N, 2, S, S)`` in [0, 1] and ``log(w/a)`` ``(N, 2, S, S)``.

    ``obj`` ``(N, S, S)`` is only checked for shape; every cell gets a box.
    """
    n, _, grid, _ = offsets.shape
    if obj.shape != (n, grid, grid) or log_wh.shape != offsets.shape:
        raise ValueError(
            f"obj {tuple(obj.shape)}, offsets {tuple(offsets.shape)}, log_wh {tuple(log_wh.shape)} disagree"
        )
    cell = size / grid
    cols = torch.arange(grid, dtype=offsets.dtype).view(1, 1, grid)
    rows = torch.arange(grid, dtype=offsets.dtype).view(1, grid, 1)
    cx, cy = (cols + offsets[:, 0]) * cell, (rows + offsets[:, 1]) * cell  # (N, S, S)
    w, h = anchor * log_wh[:, 0].exp(), anchor * log_wh[:, 1].exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TinyYOLO(nn.Module):
    """A one-stage detector: a stride-4 conv backbone and a 1x1 head with ``5 + C`` maps per cell.

    Output ``(N, 5 + C, S, S)``: objectness logit, offset logits (x, y), log(w/a), log(h/a), class logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = len(CLASSES),
        width: int = 16,
        size: int = 32,
        anchor: float = 8.0,
    ):
        super().__init__()
        if size % 4:
            raise ValueError(f"size must be divisible by 4 (stride of the backbone), got {size}")
        self.size, self.grid, self.anchor, self.num_classes = size, size // 4, anchor, num_classes
        self.backbone = nn.Sequential(  # (N, C_in, H, W) -> (N, 4w, H/4, W/4)
            _conv(in_channels, width, 2),
            _conv(width, 2 * width),
            _conv(2 * width, 2 * width, 2),
            _conv(2 * width, 4 * width),
            _conv(4 * width, 4 * width),
        )
        self.head = nn.Conv2d(4 * width, 5 + num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw predictions ``(N, 5 + C, S, S)`` for images ``(N, C_in, size, size)``."""
        if x.ndim != 4 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"expected images (N, C, {self.size}, {self.size}), got {tuple(x.shape)}")
        return self.head(self.backbone(x))


def yolo_loss(pred: torch.Tensor, target: torch.Tensor, coord_weight: float = 5.0) -> torch.Tensor:
    """Objectness BCE over all cells + (box MSE x ``coord_weight`` + class CE) over object cells."""
    if pred.shape[0] != target.shape[0] or pred.shape[-2:] != target.shape[-2:] or target.shape[1] != 6:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} disagree (target needs 6 maps)")
    obj = target[:, 0] > 0.5  # (N, S, S)
    loss = F.binary_cross_entropy_with_logits(pred[:, 0], target[:, 0], reduction="sum")
    p, t = pred.permute(0, 2, 3, 1)[obj], target.permute(0, 2, 3, 1)[obj]  # (K, 5 + C), (K, 6)
    box = F.mse_loss(p[:, 1:3].sigmoid(), t[:, 1:3], reduction="sum") + F.mse_loss(
        p[:, 3:5], t[:, 3:5], reduction="sum"
    )
    cls = F.cross_entropy(p[:, 5:], t[:, 5].long(), reduction="sum")
    return (loss + coord_weight * box + cls) / pred.shape[0]


def yolo_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The detector's training step: :func:`yolo_loss` of ``model(images)`` against the grid targets.

    ``batch`` is images ``(N, C_in, size, size)`` and targets ``(N, 6, S, S)`` from :func:`encode_grid`.
    """
    images, targets = batch
    return yolo_loss(model(images), targets)


@torch.no_grad()
def yolo_detect(
    model: TinyYOLO,
    images: torch.Tensor,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    use_nms: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Boxes, scores (objectness x class probability) and labels (1..C) per image, after per-class NMS.

    The network runs in eval mode on its own device; decoding and NMS run on the CPU, where the
    results are returned.
    """
    model.eval()
    pred = model(images.to(model_device(model))).cpu()  # (N, 5 + C, S, S)
    boxes = decode_grid(pred[:, 0], pred[:, 1:3].sigmoid(), pred[:, 3:5], model.size, model.anchor).flatten(
        1, 2
    )  # (N, S*S, 4)
    cls_prob, cls = pred[:, 5:].softmax(1).max(1)  # (N, S, S)
    scores = (pred[:, 0].sigmoid() * cls_prob).flatten(1)  # (N, S*S)
    labels = (cls + 1).flatten(1)
    out_b, out_s, out_l = [], [], []
    for b, s, lab in zip(boxes, scores, labels):
        keep = s > score_threshold
        b, s, lab = b[keep].clamp(0, model.size), s[keep], lab[keep]
        if use_nms:
            k = batched_nms(b, s, lab, iou_threshold)
            b, s, lab = b[k], s[k], lab[k]
        out_b.append(b)
        out_s.append(s)
        out_l.append(lab)
    return out_b, out_s, out_l


# ----------------------------------------------------------------------------- two stages: RoIAlign


def _bilinear(features: torch.Tensor, batch: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``(*x.shape, C)`` of ``features`` ``(N, C, H, W)`` at image ``batch`` (broadcast with x, y)."""
    _, _, h, w = features.shape
    batch = batch.expand(x.shape)  # one image index per sample point
    outside = (x < -0.5) | (x > w + 0.5) | (y < -0.5) | (y > h + 0.5)
    u = (x - 0.5).clamp(0, w - 1)  # continuous column index: pixel centres sit at integers
    v = (y - 0.5).clamp(0, h - 1)
    j0, i0 = u.floor().long().clamp(max=max(w - 2, 0)), v.floor().long().clamp(max=max(h - 2, 0))
    j1, i1 = (j0 + 1).clamp(max=w - 1), (i0 + 1).clamp(max=h - 1)
    a, b = (u - j0)[..., None], (v - i0)[..., None]  # fractional parts in [0, 1]
    nhwc = features.permute(0, 2, 3, 1).contiguous()  # channels last: each gather reads C adjacent numbers
    f = lambda i, j: nhwc[batch, i, j]  # (..., C)
    out = (1 - a) * (1 - b) * f(i0, j0) + a * (1 - b) * f(i0, j1) + (1 - a) * b * f(i1, j0) + a * b * f(i1, j1)
    return out.masked_fill(outside[..., None], 0.0)


def bilinear_sample(feature: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of ``feature`` ``(C, H, W)`` at continuous points ``x, y`` (any equal shape).

    Coordinates are in pixel units with the centre of pixel ``(i, j)`` at ``(j + 0.5, i + 0.5)``.
    Points more than half a pixel outside the map give 0; near the border the edge pixel is repeated.
    Returns ``(C, *x.shape)``.
    """
    if feature.ndim != 3 or x.shape != y.shape:
        raise ValueError(
            "need feature (C, H, W) and x, y of equal shape, "
            f"got {tuple(feature.shape)}, {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return _bilinear(feature[None], torch.zeros((), dtype=torch.long), x, y).movedim(-1, 0)


def _check_rois(features: torch.Tensor, rois: torch.Tensor) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be (N, C, H, W), got {tuple(features.shape)}")
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) as (batch_index, x0, y0, x1, y1), got {tuple(rois.shape)}")


def roi_align(
    features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float = 1.0, sampling_ratio: int = 2
) -> torch.Tensor:
    """RoIAlign: features ``(K, C, P, P)`` for ``rois`` ``(K, 5)`` given in image pixels.

    Each RoI is scaled by ``spatial_scale`` (no rounding), cut into ``P x P`` bins, and each
    bin averages ``sampling_ratio²`` bilinear samples on a regular grid inside it.
    """
    _check_rois(features, rois)
    if output_size < 1 or sampling_ratio < 1:
        raise ValueError(f"output_size and sampling_ratio must be >= 1, got {output_size}, {sampling_ratio}")
    if len(rois) > 4096:  # bound the memory of the sample tensors: K x C x (P s)^2 each
        return torch.cat(
            [roi_align(features, chunk, output_size, spatial_scale, sampling_ratio) for chunk in rois.split(4096)]
        )
    p, s = output_size, sampling_ratio
    steps = (torch.arange(p * s, dtype=features.dtype) + 0.5) / (p * s)  # (Q,) with Q = P*s, fractions in (0, 1)
    box = rois[:, 1:].to(features.dtype) * spatial_scale  # (K, 4) in feature-map pixels, not rounded
    xs = box[:, 0:1] + (box[:, 2:3] - box[:, 0:1]) * steps  # (K, Q)
    ys = box[:, 1:2] + (box[:, 3:4] - box[:, 1:2]) * steps
    q = p * s
    samples = _bilinear(
        features, rois[:, 0].long().view(-1, 1, 1), xs[:, None, :].expand(-1, q, -1), ys[:, :, None].expand(-1, -1, q)
    )
    return F.avg_pool2d(samples.permute(0, 3, 1, 2), s)  # (K, C, P, P): mean of s x s samples per bin


def roi_pool(
    features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float = 1.0, mode: str = "max"
) -> torch.Tensor:
    """RoIPool (Fast R-CNN): the RoI is rounded to whole cells, cut into bins at integer edges, max-pooled.

    ``mode="avg"`` average-pools the same integer bins instead: the rounding without the max's bias,
    to separate the two sources of RoIPool's error from RoIAlign.
    """
    if mode not in ("max", "avg"):
        raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    _check_rois(features, rois)
    _, c, h, w = features.shape
    out = features.new_zeros(len(rois), c, output_size, output_size)
    for k, roi in enumerate(rois):
        x0, y0, x1, y1 = (roi[1:] * spatial_scale).round().long().tolist()  # quantisation 1
        x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
        x1, y1 = min(max(x1, x0 + 1), w), min(max(y1, y0 + 1), h)
        crop = features[int(roi[0]), :, y0:y1, x0:x1]
        out[k] = pool(crop, output_size)  # quantisation 2: integer bin edges
    return out


def jitter_proposals(
    boxes: list[torch.Tensor],
    labels: list[torch.Tensor],
    per_image: int,
    size: int,
    seed: int = 0,
    iou_threshold: float = 0.5,
    jitter: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training RoIs for the second stage: jittered ground truth and random boxes, labelled by IoU.

    Each image gets ``per_image`` ground-truth boxes moved by Gaussian noise of ``jitter`` times
    their size, and ``per_image // 2`` uniformly random boxes. Returns ``rois`` ``(K, 5)``
    (batch index, x0, y0, x1, y1) and targets ``(K,)``: the class of the ground-truth box with
    IoU >= ``iou_threshold``, else 0 (background).
    """
    g = torch.Generator().manual_seed(seed)
    rois, targets = [], []
    for i, (gt, gl) in enumerate(zip(boxes, labels)):
        src = gt[torch.randint(len(gt), (per_image,), generator=g)]  # (P, 4)
        wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)
        jittered = src + jitter * wh * torch.randn(per_image, 4, generator=g)
        rand = torch.rand(per_image // 2, 4, generator=g) * size
        rand = torch.cat([rand[:, :2].minimum(rand[:, 2:]), rand[:, :2].maximum(rand[:, 2:]) + 2], 1)
        cand = torch.cat([jittered, rand]).clamp(0, size)
        cand = cand[(cand[:, 2:] - cand[:, :2]).min(1).values >= 2]  # drop degenerate boxes
        best, j = box_iou(cand, gt).max(1)
        targets.append(torch.where(best >= iou_threshold, gl[j], 0))
        rois.append(torch.cat([torch.full((len(cand), 1), float(i)), cand], 1))
    return torch.cat(rois), torch.cat(targets)


# ----------------------------------------------------------------------------- Faster R-CNN: anchors, RPN, box head


def _centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centres and sizes ``cx, cy, w, h`` (each ``(K,)``) of boxes ``(K, 4)``."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + w / 2, boxes[:, 1] + h / 2, w, h


def encode_boxes(reference: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Box-regression deltas ``(K, 4)`` that move each ``reference`` box ``(K, 4)`` onto its ``target`` ``(K, 4)``.

    R-CNN's parametrisation: ``t_x = (x* - x_a) / w_a``, ``t_y = (y* - y_a) / h_a``,
    ``t_w = log(w* / w_a)``, ``t_h = log(h* / h_a)``, with centres ``(x, y)`` and sizes ``(w, h)``.
    Shifts are measured in units of the reference's own size, so the same delta means the same
    relative move for a small and a large box. Both boxes need positive width and height.
    """
    _check_boxes(reference, "reference")
    _check_boxes(target, "target")
    if reference.shape != target.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and target {tuple(target.shape)} must match")
    xa, ya, wa, ha = _centre_size(reference)
    x, y, w, h = _centre_size(target)
    if (wa <= 0).any() or (ha <= 0).any() or (w <= 0).any() or (h <= 0).any():
        raise ValueError("encode_boxes needs boxes of positive width and height")
    return torch.stack([(x - xa) / wa, (y - ya) / ha, (w / wa).log(), (h / ha).log()], dim=1)


def decode_boxes(
    reference: torch.Tensor, deltas: torch.Tensor, max_log_scale: float = math.log(1000 / 16)
) -> torch.Tensor:
    """Boxes ``(K, 4)`` from ``reference`` boxes ``(K, 4)`` and deltas ``(K, 4)``: the inverse of :func:`encode_boxes`.

    ``x* = x_a + w_a t_x``, ``w* = w_a exp(t_w)``. ``t_w, t_h`` are clamped at ``max_log_scale``
    (Detectron's bound), so an untrained network cannot overflow ``exp``.
    """
    _check_boxes(reference, "reference")
    if deltas.shape != reference.shape:
        raise ValueError(f"deltas {tuple(deltas.shape)} must have the shape of reference {tuple(reference.shape)}")
    xa, ya, wa, ha = _centre_size(reference)
    x, y = xa + wa * deltas[:, 0], ya + ha * deltas[:, 1]
    w = wa * deltas[:, 2].clamp(max=max_log_scale).exp()
    h = ha * deltas[:, 3].clamp(max=max_log_scale).exp()
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=1)


def make_anchors(
    feature_size: tuple[int, int], stride: float, sizes: Sequence[float], ratios: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """Anchor boxes ``(H * W * A, 4)`` over an ``H x W`` feature map, ``A = len(sizes) * len(ratios)``.

    Every cell ``(i, j)`` gets, centred on its image position ``((j + 0.5) s, (i + 0.5) s)``, one
    box per size ``a`` and aspect ratio ``r = h / w``: ``w = a / sqrt(r)``, ``h = a sqrt(r)`` (area ``a²``).
    Order: row ``i``, then column ``j``, then size, then ratio, the order :class:`RPNHead` flattens in.
    """
    h, w = feature_size
    if h < 1 or w < 1 or stride <= 0 or not sizes or not ratios:
        raise ValueError(
            f"need a non-empty map, stride > 0, sizes and ratios; got {feature_size}, {stride}, {sizes}, {ratios}"
        )
    if min(sizes) <= 0 or min(ratios) <= 0:
        raise ValueError(f"sizes and ratios must be positive, got {sizes}, {ratios}")
    shape = torch.tensor([[a / math.sqrt(r), a * math.sqrt(r)] for a in sizes for r in ratios])  # (A, 2) as w, h
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * stride, (torch.arange(w) + 0.5) * stride, indexing="ij")
    centres = torch.stack([xs, ys], -1).reshape(-1, 1, 2)  # (H*W, 1, 2)
    return torch.cat([centres - shape / 2, centres + shape / 2], -1).reshape(-1, 4)  # (H*W*A, 4)


def match_anchors(
    anchors: torch.Tensor, gt_boxes: torch.Tensor, positive: float = 0.7, negative: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Faster R-CNN's anchor labels ``(A,)`` (1 object, 0 background, -1 ignored) and matched box index ``(A,)``.

    An anchor is positive when its best IoU with a ground-truth box is >= ``positive``, or when it
    is (one of) the anchors with the highest IoU for some box, so every object gets a positive
    anchor unless it shares its best anchor with another object (the anchor then regresses to the
    later one); negative when its best IoU is < ``negative``; ignored in between. An image without
    objects has only negatives.
    """
    _check_boxes(anchors, "anchors")
    _check_boxes(gt_boxes, "gt_boxes")
    if not 0.0 <= negative <= positive <= 1.0:
        raise ValueError(f"need 0 <= negative <= positive <= 1, got {negative}, {positive}")
    labels = torch.zeros(len(anchors), dtype=torch.long)
    if len(gt_boxes) == 0:
        return labels, torch.zeros(len(anchors), dtype=torch.long)
    iou = box_iou(anchors, gt_boxes)  # (A, G)
    best, matched = iou.max(1)  # (A,)
    labels[best >= negative] = -1
    labels[best >= positive] = 1
    best_per_gt = iou.max(0).values  # (G,)
    is_best = (iou == best_per_gt[None]) & (best_per_gt[None] > 0)  # (A, G): ties all count
    anchor_idx, gt_idx = is_best.nonzero(as_tuple=True)
    labels[anchor_idx] = 1
    matched[anchor_idx] = gt_idx  # a best anchor regresses to the box it is best for
    return labels, matched


def rpn_targets(
    anchors: torch.Tensor, gt_boxes: list[torch.Tensor], positive: float = 0.7, negative: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training targets of the RPN for a list of images: labels ``(N, A)`` and deltas ``(N, A, 4)``.

    Labels come from :func:`match_anchors`; deltas (:func:`encode_boxes`) from each anchor to its
    matched box, zero where the label is not 1.
    """
    labels, deltas = [], []
    for gt in gt_boxes:
        lab, idx = match_anchors(anchors, gt, positive, negative)
        d = torch.zeros(len(anchors), 4)
        pos = lab == 1
        if pos.any():
            d[pos] = encode_boxes(anchors[pos], gt[idx[pos]])
        labels.append(lab)
        deltas.append(d)
    return torch.stack(labels), torch.stack(deltas)


class RPNHead(nn.Module):
    """Region proposal network head: a 3x3 conv, then per anchor an objectness logit and 4 box deltas.

    Input features ``(N, C, H, W)``; output objectness ``(N, H*W*A)`` and deltas ``(N, H*W*A, 4)``,
    flattened in the order of :func:`make_anchors`.
    """

    def __init__(self, channels: int, num_anchors: int, hidden: int = 64):
        super().__init__()
        if channels < 1 or num_anchors < 1:
            raise ValueError(f"channels and num_anchors must be >= 1, got {channels}, {num_anchors}")
        self.num_anchors = num_anchors
        self.conv = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.objectness = nn.Conv2d(hidden, num_anchors, 1)
        self.deltas = nn.Conv2d(hidden, 4 * num_anchors, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness logits ``(N, H*W*A)`` and deltas ``(N, H*W*A, 4)``."""
        if features.ndim != 4:
            raise ValueError(f"features must be (N, C, H, W), got {tuple(features.shape)}")
        x = self.conv(features)
        n, _, h, w = x.shape
        obj = self.objectness(x).permute(0, 2, 3, 1).reshape(n, -1)  # (N, A, H, W) -> (N, H*W*A)
        deltas = self.deltas(x).view(n, self.num_anchors, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return obj, deltas


def rpn_loss(
    obj: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, target_deltas: torch.Tensor, box_weight: float = 1.0
) -> torch.Tensor:
    """Balanced objectness BCE (mean over positives + mean over negatives) + smooth-L1 on positives' deltas.

    ``obj`` and ``labels`` are ``(N, A)`` (labels 1, 0 or -1 = ignored); deltas ``(N, A, 4)``.
    Averaging the two classes separately gives them equal weight, as Faster R-CNN's 1:1 sampling
    of anchors does, without the random draw.
    """
    if obj.shape != labels.shape or deltas.shape != target_deltas.shape or deltas.shape[:2] != obj.shape:
        raise ValueError(
            f"obj {tuple(obj.shape)}, labels {tuple(labels.shape)}, deltas {tuple(deltas.shape)}, "
            f"targets {tuple(target_deltas.shape)} disagree"
        )
    pos, neg = labels == 1, labels == 0
    bce = F.binary_cross_entropy_with_logits(obj, pos.to(obj.dtype), reduction="none")  # (N, A)
    loss = bce[neg].mean() if neg.any() else obj.sum() * 0
    if pos.any():
        loss = loss + bce[pos].mean() + box_weight * F.smooth_l1_loss(deltas[pos], target_deltas[pos], beta=1 / 9)
    return loss


def rpn_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Training step of an :class:`RPNHead` for ``fit``: batch = features, anchor labels, anchor deltas."""
    features, labels, target_deltas = batch
    obj, deltas = model(features)
    return rpn_loss(obj, deltas, labels, target_deltas)


@torch.no_grad()
def rpn_proposals(
    obj: torch.Tensor,
    deltas: torch.Tensor,
    anchors: torch.Tensor,
    size: int,
    pre_nms: int = 200,
    post_nms: int = 50,
    iou_threshold: float = 0.7,
    min_size: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Proposals per image: boxes ``(P, 4)`` and objectness ``(P,)``, ``P <= post_nms``.

    Decode every anchor (:func:`decode_boxes`), clip to the ``size x size`` image, drop boxes
    narrower than ``min_size``, keep the ``pre_nms`` best, run :func:`nms` at ``iou_threshold``
    and keep the ``post_nms`` best survivors. Runs on the CPU.
    """
    if obj.ndim != 2 or deltas.shape != (*obj.shape, 4) or anchors.shape != (obj.shape[1], 4):
        raise ValueError(
            f"obj {tuple(obj.shape)}, deltas {tuple(deltas.shape)}, anchors {tuple(anchors.shape)} disagree"
        )
    out_b, out_s = [], []
    for o, d in zip(obj.cpu(), deltas.cpu()):
        boxes = decode_boxes(anchors, d).clamp(0, size)  # (A, 4)
        scores = o.sigmoid()
        keep = ((boxes[:, 2:] - boxes[:, :2]).min(1).values >= min_size).nonzero().flatten()
        keep = keep[scores[keep].argsort(descending=True, stable=True)[:pre_nms]]
        keep = keep[nms(boxes[keep], scores[keep], iou_threshold)[:post_nms]]
        out_b.append(boxes[keep])
        out_s.append(scores[keep])
    return out_b, out_s


def proposal_targets(
    rois: torch.Tensor, gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], iou_threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Second-stage targets for ``rois`` ``(K, 5)`` (batch index, box): classes ``(K,)`` and deltas ``(K, 4)``.

    A RoI takes the class of its best-overlapping ground-truth box in its image when the IoU is
    >= ``iou_threshold``, else 0 (background); its deltas (:func:`encode_boxes`) lead to that box,
    zero for background.
    """
    if rois.ndim != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be (K, 5) as (batch_index, x0, y0, x1, y1), got {tuple(rois.shape)}")
    classes, deltas = torch.zeros(len(rois), dtype=torch.long), torch.zeros(len(rois), 4)
    for i in rois[:, 0].long().unique().tolist():
        rows = (rois[:, 0] == i).nonzero().flatten()
        if len(gt_boxes[i]) == 0:
            continue
        best, j = box_iou(rois[rows, 1:], gt_boxes[i]).max(1)
        fg = best >= iou_threshold
        classes[rows[fg]] = gt_labels[i][j[fg]]
        if fg.any():
            deltas[rows[fg]] = encode_boxes(rois[rows[fg], 1:], gt_boxes[i][j[fg]])
    return classes, deltas


def sample_proposals(
    proposals: list[torch.Tensor],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    per_image: int = 16,
    fg_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou: tuple[float, float] = (0.0, 0.5),
    add_gt: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Faster R-CNN's minibatch of RoIs for the second stage: rois ``(K, 5)``, classes ``(K,)``, deltas ``(K, 4)``.

    Per image, the candidates are its proposals ``(P_i, 4)`` (plus its ground-truth boxes when
    ``add_gt``, so that every object has at least one perfect foreground RoI). A candidate is
    foreground when its best IoU with an object is >= ``fg_iou`` and background when that IoU lies
    in ``[bg_iou[0], bg_iou[1])``. Up to ``round(fg_fraction * per_image)`` foreground RoIs are
    drawn at random without replacement, and background fills the rest of the ``per_image`` slots
    (fewer RoIs when an image runs short). Classes and deltas come from :func:`proposal_targets`.
    """
    if not len(proposals) == len(gt_boxes) == len(gt_labels):
        raise ValueError(
            "need one proposal, box and label tensor per image, "
            f"got {len(proposals)}, {len(gt_boxes)}, {len(gt_labels)}"
        )
    if per_image < 1 or not 0.0 <= fg_fraction <= 1.0:
        raise ValueError(f"need per_image >= 1 and fg_fraction in [0, 1], got {per_image}, {fg_fraction}")
    if not 0.0 <= bg_iou[0] <= bg_iou[1] <= fg_iou <= 1.0:
        raise ValueError(f"need 0 <= bg_iou[0] <= bg_iou[1] <= fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
    rois = []
    for i, (props, gt) in enumerate(zip(proposals, gt_boxes)):
        _check_boxes(props, "proposals")
        cand = torch.cat([props, gt]) if add_gt else props  # (P, 4)
        best = box_iou(cand, gt).max(1).values if len(gt) else torch.zeros(len(cand))  # (P,)
        fg = (best >= fg_iou).nonzero().flatten()
        bg = ((best >= bg_iou[0]) & (best < bg_iou[1])).nonzero().flatten()
        n_fg = min(round(fg_fraction * per_image), len(fg))
        n_bg = min(per_image - n_fg, len(bg))
        fg = fg[torch.randperm(len(fg), generator=generator)[:n_fg]]
        bg = bg[torch.randperm(len(bg), generator=generator)[:n_bg]]
        chosen = cand[torch.cat([fg, bg])]  # (n_fg + n_bg, 4), foreground first
        rois.append(torch.cat([torch.full((len(chosen), 1), float(i)), chosen], 1))
    out = torch.cat(rois) if rois else torch.zeros(0, 5)
    classes, deltas = proposal_targets(out, gt_boxes, gt_labels, fg_iou)
    return out, classes, deltas


class RoIBoxHead(nn.Module):
    """Fast R-CNN's second stage: RoI features ``(K, C, P, P)`` -> class logits ``(K, 1 + C)`` and deltas ``(K, 4)``.

    The deltas (class-agnostic) refine the RoI's box with :func:`decode_boxes`.
    """

    def __init__(self, channels: int, output_size: int = 4, num_classes: int = len(CLASSES), hidden: int = 128):
        super().__init__()
        self.output_size = output_size
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(channels * output_size**2, hidden), nn.ReLU())
        self.classify = nn.Linear(hidden, 1 + num_classes)
        self.regress = nn.Linear(hidden, 4)

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``(K, 1 + C)`` and box deltas ``(K, 4)``."""
        if roi_features.ndim != 4 or roi_features.shape[-1] != self.output_size:
            raise ValueError(
                f"expected RoI features (K, C, {self.output_size}, {self.output_size}), got {tuple(roi_features.shape)}"
            )
        z = self.trunk(roi_features)
        return self.classify(z), self.regress(z)


def box_head_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Training step of a :class:`RoIBoxHead`: cross-entropy on all RoIs + smooth-L1 on the foreground's deltas."""
    x, classes, target_deltas = batch
    logits, deltas = model(x)
    loss = F.cross_entropy(logits, classes)
    fg = classes > 0
    if fg.any():
        loss = loss + F.smooth_l1_loss(deltas[fg], target_deltas[fg], beta=1 / 9)
    return loss


@torch.no_grad()
def two_stage_detect(
    head: RoIBoxHead,
    features: torch.Tensor,
    proposals: list[torch.Tensor],
    size: int,
    spatial_scale: float,
    refine: bool = True,
    iou_threshold: float = 0.5,
    roi_features: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Second stage on ``proposals`` (one ``(P_i, 4)`` tensor per image of ``features`` ``(N, C, H, W)``).

    RoIAlign, classify, move each box by its deltas (``refine=False`` keeps the proposal), score
    it by its best foreground class and run per-class NMS. Returns boxes, scores, labels per image (CPU).
    ``roi_features`` ``(K, C, P, P)``, the RoIAlign of all proposals in order, skips the crop when
    it was computed before.
    """
    if len(proposals) != len(features):
        raise ValueError(f"need one proposal tensor per image: {len(proposals)} for {len(features)} images")
    head.eval()
    device = model_device(head)
    rois = torch.cat([torch.cat([torch.full((len(p), 1), float(i)), p], 1) for i, p in enumerate(proposals)])
    if roi_features is None:
        roi_features = roi_align(features, rois, head.output_size, spatial_scale)  # (K, C, P, P)
    elif roi_features.shape[0] != len(rois):
        raise ValueError(f"roi_features has {roi_features.shape[0]} rows for {len(rois)} proposals")
    x = roi_features
    logits, deltas = (t.cpu() for t in head(x.to(device)))
    boxes = decode_boxes(rois[:, 1:], deltas).clamp(0, size) if refine else rois[:, 1:]
    scores, labels = logits.softmax(1)[:, 1:].max(1)  # best foreground class
    out_b, out_s, out_l = [], [], []
    for b, s, lab in zip(*(t.split([len(p) for p in proposals]) for t in (boxes, scores, labels + 1))):
        keep = batched_nms(b, s, lab, iou_threshold)
        out_b.append(b[keep])
        out_s.append(s[keep])
        out_l.append(lab[keep])
    return out_b, out_s, out_l


def proposal_recall(proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor], iou_threshold: float = 0.5) -> float:
    """Fraction of ground-truth boxes that some proposal of their image overlaps with IoU >= ``iou_threshold``."""
    if len(proposals) != len(gt_boxes):
        raise ValueError(f"need one proposal tensor per image, got {len(proposals)} for {len(gt_boxes)}")
    found = total = 0
    for p, gt in zip(proposals, gt_boxes):
        total += len(gt)
        if len(p) and len(gt):
            found += int((box_iou(p, gt).max(0).values >= iou_threshold).sum())
    return found / max(total, 1)


COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
"""The ten IoU thresholds 0.50, 0.55, ..., 0.95 of COCO's primary metric."""


def coco_map(
    pred_boxes: list[torch.Tensor],
    pred_scores: list[torch.Tensor],
    pred_labels: list[torch.Tensor],
    gt_boxes: list[torch.Tensor],
    gt_labels: list[torch.Tensor],
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
) -> dict[str, float | dict[float, float]]:
    """COCO's mAP@[.5:.95]: the mean over ``iou_thresholds`` of the mAP at each, with 101-point AP.

    Returns ``{"map": mean, "per_iou": {threshold: mAP}}``. Matching uses COCO's rule
    (:func:`match_detections` with ``rule="coco"``). Not modelled: COCO's cap of 100 detections
    per image, its area ranges and its "crowd" boxes.
    """
    if not iou_thresholds or not all(0.0 < t <= 1.0 for t in iou_thresholds):
        raise ValueError(f"iou_thresholds must be a non-empty list in (0, 1], got {iou_thresholds}")
    pooled = _pooled_matches(pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels, iou_thresholds, "coco")
    per_iou = {  # mean over classes of the 101-point AP at each threshold
        t: sum(average_precision(flags[k], scores, n, recall_points=101) for flags, scores, n in pooled.values())
        / max(len(pooled), 1)
        for k, t in enumerate(iou_thresholds)
    }
    return {"map": sum(per_iou.values()) / len(per_iou), "per_iou": per_iou}


def draw_detections(
    ax,
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor | None = None,
    gt_boxes: torch.Tensor | None = None,
) -> None:
    """Draw ``image`` ``(C, H, W)`` with predicted boxes (solid, coloured by class) and ground truth (dashed gold)."""
    import matplotlib.patches as patches

    colours = ("tab:red", "tab:blue", "tab:green", "tab:orange")
    ax.imshow(image.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
    for b in [] if gt_boxes is None else gt_boxes.tolist():
        ax.add_patch(
            patches.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec="gold", ls="--", lw=1)
        )
    for k, (b, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
        colour = colours[(label - 1) % 4]
        ax.add_patch(
            patches.Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec=colour, lw=1.5)
        )
        text = CLASSES[label - 1][:3] + ("" if scores is None else f" {scores[k]:.2f}")
        ax.text(b[0] - 0.5, b[1] - 1, text, color=colour, fontsize=6)
    ax.set_axis_off()


def iou_matrix_brute_force(
    a: list[tuple[float, float, float, float]], b: list[tuple[float, float, float, float]]
) -> list[list[float]]:
    """IoU by counting the unit cells of integer boxes (a slow reference for tests and exercises)."""

    def cells(box):
        x0, y0, x1, y1 = (int(v) for v in box)
        return {(x, y) for x in range(x0, x1) for y in range(y0, y1)}

    return [[len(cells(p) & cells(q)) / max(len(cells(p) | cells(q)), 1) for q in b] for p in a]


__all__ = [
    "CLASSES",
    "detection_set",
    "box_area",
    "box_iou",
    "nms",
    "batched_nms",
    "precision_recall",
    "average_precision",
    "match_detections",
    "mean_average_precision",
    "encode_grid",
    "decode_grid",
    "TinyYOLO",
    "yolo_loss",
    "yolo_step",
    "yolo_detect",
    "bilinear_sample",
    "roi_align",
    "roi_pool",
    "jitter_proposals",
    "encode_boxes",
    "decode_boxes",
    "make_anchors",
    "match_anchors",
    "rpn_targets",
    "RPNHead",
    "rpn_loss",
    "rpn_step",
    "rpn_proposals",
    "proposal_targets",
    "sample_proposals",
    "RoIBoxHead",
    "box_head_step",
    "two_stage_detect",
    "proposal_recall",
    "COCO_IOU_THRESHOLDS",
    "coco_map",
    "draw_detections",
    "iou_matrix_brute_force",
]
