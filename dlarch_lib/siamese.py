"""Siamese networks: one encoder, shared by every branch, trained so distances mean similarity.

- :class:`EmbeddingNet`   a small CNN mapping an 8x8 image to a (unit-length) embedding
- :class:`SiameseNet`     applies the *same* encoder to K inputs: pairs (K=2), triplets (K=3)
- :func:`contrastive_loss`   Hadsell, Chopra & LeCun (2006), on pairs
- :func:`triplet_loss`       Schroff, Kalenichenko & Philbin (2015), on triplets
- :func:`batch_hard_triplet_loss`   hardest positive and negative per anchor inside a batch
- :func:`contrastive_step`, :func:`triplet_step`, :func:`batch_hard_step`   the three training
  steps for the book's engine ``dlarch_lib.core.train.fit``
- :func:`sample_pairs`, :func:`sample_triplets`   seeded index samplers over a label vector
- :func:`one_shot_accuracy`  N-way one-shot episodes with nearest-support classification
- :func:`info_nce_logits`, :func:`info_nce_loss`   InfoNCE / NT-Xent (SimCLR) on two views
- :func:`augment_digits`, :class:`ProjectionNet`, :func:`make_simclr_step`   two-view training
- :func:`semi_hard_triplets`, :func:`semi_hard_triplet_loss`, :func:`semi_hard_step`   FaceNet mining
- :func:`equal_error_rate`   the operating point of a ROC curve where FPR = 1 - TPR
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _check_embeddings(name: str, *zs: torch.Tensor) -> None:
    """Raise unless every tensor is ``(B, D)`` and they all have the same shape."""
    for z in zs:
        if z.ndim != 2:
            raise ValueError(f"{name}: embeddings must be (B, D), got shape {tuple(z.shape)}")
    if any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"{name}: embeddings must share one shape, got {[tuple(z.shape) for z in zs]}")


def _check_margin(margin: float) -> None:
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")


class EmbeddingNet(nn.Module):
    """A small CNN: ``(B, 1, 8, 8)`` digits -> ``(B, dim)`` embeddings, L2-normalised by default."""

    def __init__(self, dim: int = 32, width: int = 8, normalize: bool = True) -> None:
        super().__init__()
        if dim < 1 or width < 1:
            raise ValueError(f"dim and width must be >= 1, got dim={dim}, width={width}")
        self.dim, self.normalize = dim, normalize
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),  # (B, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),  # (B, 2w, 8, 8)
            nn.MaxPool2d(2),  # (B, 2w, 4, 4)
            nn.Flatten(),  # (B, 32w)
        )
        self.head = nn.Sequential(nn.Linear(32 * width, 128), nn.ReLU(), nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images ``(B, 1, 8, 8)`` as ``(B, dim)``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"EmbeddingNet expects images (B, 1, 8, 8), got {tuple(x.shape)}")
        z = self.head(self.features(x))  # (B, dim)
        return F.normalize(z, dim=1) if self.normalize else z


class SiameseNet(nn.Module):
    """K branches, one encoder: ``(B, K, C, H, W)`` -> ``(B, K, D)``.

    K=2 gives the classic Siamese pair network, K=3 a triplet network. There is only one
    set of weights (the encoder's); every branch is the same function, so the distance
    between two embeddings is symmetric and an input compared with itself is at distance 0.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode every branch of ``x`` ``(B, K, C, H, W)`` with the shared encoder."""
        if x.ndim != 5:
            raise ValueError(f"SiameseNet expects stacked inputs (B, K, C, H, W), got {tuple(x.shape)}")
        k = x.shape[1]
        z = self.encoder(rearrange(x, "b k c h w -> (b k) c h w"))  # one pass, all branches: (B*K, D)
        return rearrange(z, "(b k) d -> b k d", k=k)

    def distance(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Euclidean distance ``(B,)`` between the embeddings of ``x1`` and ``x2`` ``(B, C, H, W)``."""
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        z = self(torch.stack([x1, x2], dim=1))  # (B, 2, D)
        return (z[:, 0] - z[:, 1]).norm(dim=1)


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Contrastive loss (Hadsell et al. 2006), averaged over the batch.

    ``L = same * d^2 / 2 + (1 - same) * max(0, margin - d)^2 / 2`` with ``d = ||z1 - z2||``;
    ``z1, z2`` are ``(B, D)``, ``same`` is ``(B,)`` with 1 for a similar pair, 0 otherwise.
    """
    _check_embeddings("contrastive_loss", z1, z2)
    _check_margin(margin)
    if same.shape != z1.shape[:1]:
        raise ValueError(f"same must be (B,) = {tuple(z1.shape[:1])}, got {tuple(same.shape)}")
    same = same.to(z1.dtype)
    d = (z1 - z2).norm(dim=1)  # (B,)
    pull = same * d.pow(2)  # similar pairs: pulled together
    push = (1 - same) * F.relu(margin - d).pow(2)  # dissimilar pairs: pushed out to the margin
    return 0.5 * (pull + push).mean()


def triplet_loss(anchor: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Triplet loss (Schroff et al. 2015): mean of ``max(0, d(a, p) - d(a, n) + margin)``.

    Euclidean distances; all three inputs are ``(B, D)``. Matches ``nn.TripletMarginLoss``.
    """
    _check_embeddings("triplet_loss", anchor, pos, neg)
    _check_margin(margin)
    d_ap = (anchor - pos).norm(dim=1)  # (B,)
    d_an = (anchor - neg).norm(dim=1)  # (B,)
    return F.relu(d_ap - d_an + margin).mean()


def batch_hard_triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on embeddings ``(B, D)`` with labels ``(B,)``.

    Each sample is an anchor; its positive is the *farthest* same-label sample and its negative
    the *nearest* other-label sample in the batch. Anchors without a positive or a negative are
    skipped; a batch with no usable anchor is an error.
    """
    _check_embeddings("batch_hard_triplet_loss", z)
    _check_margin(margin)
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be (B,) = {tuple(z.shape[:1])}, got {tuple(labels.shape)}")
    dist = torch.cdist(z, z)  # (B, B)
    same = labels[:, None] == labels[None, :]  # (B, B)
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    pos_mask, neg_mask = same & ~eye, ~same
    usable = pos_mask.any(dim=1) & neg_mask.any(dim=1)  # (B,)
    if not usable.any():
        raise ValueError("batch_hard_triplet_loss needs a batch with two samples of one label and another label")
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(dim=1)  # (B,)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(dim=1)  # (B,)
    return F.relu(hardest_pos - hardest_neg + margin)[usable].mean()


def contrastive_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Step on pairs: stacked pairs ``(B, 2, 1, 8, 8)`` and same-flags ``(B,)`` through a :class:`SiameseNet`.

    Returns the :func:`contrastive_loss` (margin 1) of the two branches' embeddings.
    """
    pairs, same = batch
    z = model(pairs)  # (B, 2, D): one encoder, both branches
    return contrastive_loss(z[:, 0], z[:, 1], same, margin=1.0)


def triplet_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Step on triplets: stacked (anchor, positive, negative) ``(B, 3, 1, 8, 8)`` through a :class:`SiameseNet`.

    The second tensor of ``batch`` (the anchors' labels) is not used. Returns the :func:`triplet_loss` (margin 0.2).
    """
    triplets, _ = batch
    z = model(triplets)  # (B, 3, D)
    return triplet_loss(z[:, 0], z[:, 1], z[:, 2], margin=0.2)


def batch_hard_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Step on labelled images ``(B, 1, 8, 8)``, ``(B,)`` through the encoder itself.

    Returns the :func:`batch_hard_triplet_loss` (margin 0.2): the triplets are mined inside the batch.
    """
    images, labels = batch
    return batch_hard_triplet_loss(model(images), labels, margin=0.2)


def _class_index(labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The distinct labels and, for each, the indices where it occurs."""
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
    classes = labels.unique()
    if len(classes) < 2:
        raise ValueError(f"need at least two classes, got {classes.tolist()}")
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    if any(len(m) < 2 for m in members):
        raise ValueError("every class needs at least two samples to form a positive pair")
    return classes, members


def _pick(members: torch.Tensor, g: torch.Generator, n: int = 1) -> torch.Tensor:
    return members[torch.randperm(len(members), generator=g)[:n]]


def sample_pairs(labels: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` index pairs ``(i, j)`` and ``same`` flags ``(n,)``: half similar, half dissimilar.

    Similar pairs: a random class, two distinct members. Dissimilar: two random distinct classes.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    classes, members = _class_index(labels)
    g = torch.Generator().manual_seed(seed)
    i, j = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    same = (torch.arange(n) % 2 == 0).long()  # alternate similar / dissimilar
    for t in range(n):
        if same[t]:
            c = int(torch.randint(len(classes), (1,), generator=g))
            i[t], j[t] = _pick(members[c], g, 2)
        else:
            c1, c2 = torch.randperm(len(classes), generator=g)[:2].tolist()
            i[t], j[t] = _pick(members[c1], g)[0], _pick(members[c2], g)[0]
    return i, j, same


def sample_triplets(labels: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` index triplets (anchor, positive, negative): anchor and positive share a label."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    classes, members = _class_index(labels)
    g = torch.Generator().manual_seed(seed)
    a, p, q = (torch.empty(n, dtype=torch.long) for _ in range(3))
    for t in range(n):
        c1, c2 = torch.randperm(len(classes), generator=g)[:2].tolist()
        a[t], p[t] = _pick(members[c1], g, 2)
        q[t] = _pick(members[c2], g)[0]
    return a, p, q


def one_shot_accuracy(
    z: torch.Tensor, labels: torch.Tensor, n_way: int = 5, episodes: int = 200, queries: int = 5, seed: int = 0
) -> torch.Tensor:
    """Per-episode accuracy ``(episodes,)`` of N-way one-shot nearest-support classification.

    Each episode draws ``n_way`` classes, one support embedding per class and ``queries`` other
    embeddings per class; a query gets the class of its nearest support (Euclidean distance).
    ``z`` ``(N, D)`` are precomputed embeddings (raw pixels work too), ``labels`` ``(N,)``.
    """
    if z.ndim != 2 or labels.shape != z.shape[:1]:
        raise ValueError(f"expected z (N, D) and labels (N,), got {tuple(z.shape)} and {tuple(labels.shape)}")
    classes = labels.unique()
    if not 2 <= n_way <= len(classes):
        raise ValueError(f"n_way must be in [2, {len(classes)}] (the number of classes), got {n_way}")
    if episodes < 1 or queries < 1:
        raise ValueError(f"episodes and queries must be >= 1, got {episodes} and {queries}")
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    if any(len(m) < 1 + queries for m in members):
        raise ValueError(f"every class needs at least {1 + queries} samples (1 support + {queries} queries)")
    g = torch.Generator().manual_seed(seed)
    acc = torch.empty(episodes)
    for e in range(episodes):
        chosen = torch.randperm(len(classes), generator=g)[:n_way]
        support, query = [], []
        for c in chosen.tolist():
            idx = _pick(members[c], g, 1 + queries)
            support.append(idx[0])
            query.append(idx[1:])
        s, q = torch.stack(support), torch.stack(query)  # (n_way,), (n_way, queries)
        dist = torch.cdist(z[q.flatten()], z[s])  # (n_way*queries, n_way)
        target = torch.arange(n_way).repeat_interleave(queries)  # query row r belongs to way r // queries
        acc[e] = (dist.argmin(dim=1) == target).float().mean()
    return acc


def _check_views(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> None:
    _check_embeddings("info_nce", z1, z2)
    if len(z1) < 2:
        raise ValueError(f"info_nce needs N >= 2 pairs (the other pairs are the negatives), got N={len(z1)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def info_nce_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The NT-Xent classification problem: logits ``(2N, 2N)`` and targets ``(2N,)``.

    ``z1[k]`` and ``z2[k]`` ``(N, D)`` are two views of example ``k``. The 2N embeddings are
    L2-normalised and stacked as ``[z1; z2]``; logit ``(i, j)`` is ``cos(z_i, z_j) / temperature``
    and the diagonal (a view compared with itself) is ``-inf``, so each row is a softmax over the
    2N - 1 other views: one positive (the other view of the same example) and 2N - 2 negatives.
    ``F.cross_entropy(logits, targets)`` is then :func:`info_nce_loss`.
    """
    _check_views(z1, z2, temperature)
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D), unit length
    logits = z @ z.T / temperature  # (2N, 2N) cosine similarities / tau
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))  # a view is not its own positive
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # row k <-> row k + N
    return logits, targets


def info_nce_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """InfoNCE / NT-Xent loss of SimCLR (Chen et al. 2020), averaged over all 2N views.

    ``L = mean_i [ -s_{i,pos(i)} + log sum_{j != i} exp(s_{ij}) ]`` with ``s = cos / temperature``;
    ``z1, z2`` are ``(N, D)`` (not necessarily normalised), ``N >= 2``.
    """
    logits, targets = info_nce_logits(z1, z2, temperature)  # (2N, 2N), (2N,)
    positive = logits.gather(1, targets[:, None]).squeeze(1)  # (2N,)
    return (torch.logsumexp(logits, dim=1) - positive).mean()  # the -inf diagonal adds exp(-inf) = 0


def augment_digits(
    x: torch.Tensor, generator: torch.Generator, max_shift: float = 1.0, max_degrees: float = 15.0, noise: float = 0.1
) -> torch.Tensor:
    """A random view of every image in ``x`` ``(B, 1, H, W)``: rotate, shift, add noise.

    Each image gets its own rotation, uniform in ``+-max_degrees``, and shift, uniform in
    ``+-max_shift`` pixels per axis (one ``affine_grid`` / ``grid_sample``, zero padding), then
    Gaussian noise of standard deviation ``noise``. The random numbers come from ``generator``
    (a CPU generator), so views are reproducible on every device.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_digits expects images (B, C, H, W), got {tuple(x.shape)}")
    if max_shift < 0 or max_degrees < 0 or noise < 0:
        raise ValueError(f"max_shift, max_degrees and noise must be >= 0, got {max_shift}, {max_degrees}, {noise}")
    b, _, h, w = x.shape
    u = torch.rand(b, 3, generator=generator) * 2 - 1  # (B, 3) uniform in [-1, 1]
    angle = u[:, 0] * math.radians(max_degrees)
    cos, sin = angle.cos(), angle.sin()
    shift = u[:, 1:] * max_shift * torch.tensor([2 / w, 2 / h])  # pixels -> grid units ([-1, 1] spans the image)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)  # (B, H, W, 2)
    out = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)  # (B, C, H, W)
    return out + noise * torch.randn(out.shape, generator=generator).to(x)


class ProjectionNet(nn.Module):
    """SimCLR's encoder + projection head: ``x -> g(f(x))``; the loss sees ``g``, evaluation uses ``f``."""

    def __init__(self, encoder: nn.Module, dim_in: int, dim_out: int = 32, hidden: int = 64) -> None:
        super().__init__()
        if min(dim_in, dim_out, hidden) < 1:
            raise ValueError(f"dim_in, dim_out and hidden must be >= 1, got {dim_in}, {dim_out}, {hidden}")
        self.encoder = encoder
        self.projection = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project the encoder's embedding of ``x``: ``(B, dim_in) -> (B, dim_out)``."""
        return self.projection(self.encoder(x))


def make_simclr_step(
    generator: torch.Generator, temperature: float = 0.5, **augment: float
) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]:
    """A step for ``fit``: two random views of each image of a batch, then :func:`info_nce_loss`.

    The batch is ``(images (B, 1, 8, 8), ...)``; labels, if present, are ignored (self-supervised).
    ``augment`` is passed to :func:`augment_digits`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def simclr_step(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images = batch[0]
        views = torch.cat([augment_digits(images, generator, **augment) for _ in range(2)])  # (2B, 1, 8, 8)
        z1, z2 = model(views).chunk(2)  # (B, P) each
        return info_nce_loss(z1, z2, temperature)

    return simclr_step


def semi_hard_triplets(
    z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FaceNet's semi-hard triplets of a batch: index tensors ``(anchor, positive, negative)``.

    For every ordered positive pair ``(a, p)`` (same label, ``a != p``) the semi-hard negatives are
    those farther than the positive but inside the margin, ``d(a, p) < d(a, n) < d(a, p) + margin``;
    the nearest of them is chosen. Pairs without a semi-hard negative are left out. ``z`` ``(B, D)``.
    """
    _check_embeddings("semi_hard_triplets", z)
    _check_margin(margin)
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be (B,) = {tuple(z.shape[:1])}, got {tuple(labels.shape)}")
    dist = torch.cdist(z, z).detach()  # (B, B): mining picks indices, no gradient
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    a, p = torch.nonzero(same & ~eye, as_tuple=True)  # (P,) every positive pair
    d_ap = dist[a, p][:, None]  # (P, 1)
    d_an = dist[a]  # (P, B)
    semi_hard = ~same[a] & (d_an > d_ap) & (d_an < d_ap + margin)  # (P, B)
    n = d_an.masked_fill(~semi_hard, float("inf")).argmin(dim=1)  # (P,) the nearest semi-hard negative
    keep = semi_hard.any(dim=1)
    return a[keep], p[keep], n[keep]


def semi_hard_triplet_loss(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean :func:`triplet_loss` over the :func:`semi_hard_triplets` of a batch (0 when there are none)."""
    a, p, n = semi_hard_triplets(z, labels, margin)
    if len(a) == 0:
        return z.sum() * 0.0  # no semi-hard triplet: zero loss, still part of the graph
    return triplet_loss(z[a], z[p], z[n], margin)


def semi_hard_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Step on labelled images ``(B, 1, 8, 8)``, ``(B,)``: :func:`semi_hard_triplet_loss` (margin 0.2)."""
    images, labels = batch
    return semi_hard_triplet_loss(model(images), labels, margin=0.2)


def equal_error_rate(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    """The equal error rate of a ROC curve: the false-positive rate where it equals ``1 - tpr``.

    ``fpr`` and ``tpr`` ``(T,)`` are the curve's points in order of increasing ``fpr`` (as
    ``sklearn.metrics.roc_curve`` returns them); the crossing is found by linear interpolation.
    """
    fpr, tpr = torch.as_tensor(fpr, dtype=torch.float64), torch.as_tensor(tpr, dtype=torch.float64)
    if fpr.ndim != 1 or fpr.shape != tpr.shape or len(fpr) < 2:
        raise ValueError(f"fpr and tpr must be (T,) with T >= 2, got {tuple(fpr.shape)} and {tuple(tpr.shape)}")
    if (fpr.diff() < 0).any():
        raise ValueError("fpr must be non-decreasing (a ROC curve in order)")
    gap = fpr - (1 - tpr)  # (T,) increases along the curve: < 0 before the crossing, >= 0 after
    k = int(torch.nonzero(gap >= 0)[0, 0]) if (gap >= 0).any() else len(gap) - 1
    if k == 0 or gap[k] == gap[k - 1]:
        return float(fpr[k])
    w = gap[k] / (gap[k] - gap[k - 1])  # linear interpolation between points k - 1 and k
    return float(w * fpr[k - 1] + (1 - w) * fpr[k])
