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
"""

from __future__ import annotations

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
