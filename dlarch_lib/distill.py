"""Chapter 12: knowledge distillation — a small student learns from a trained teacher.

- :func:`softmax_t`              softmax with temperature, ``softmax(z / T)``
- :func:`soft_target_loss`       ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``, batch mean (Hinton et al. 2015)
- :func:`distillation_loss`      ``alpha CE(y, softmax(z_s)) + (1 - alpha) T^2 KL(...)``; unlabelled rows
  carry the label ``IGNORE`` and only feel the soft term
- :func:`soft_target_grad`       the closed-form gradient ``(q - p) / T`` and its high-T limit
- :func:`distillation_step`      the student's training step for ``train.fit`` on batches ``(x, y, teacher_logits)``
- :class:`HintRegressor`, :func:`hint_loss`   FitNets feature distillation (Romero et al. 2015)
- :func:`labelled_subset`        a few labels per class, the rest of the indices unlabelled
- :func:`teacher_logits`         run the frozen teacher once over the data (logits or hint features)
- :func:`class_similarity`, :func:`runner_up`, :func:`rank_correlation`   dark knowledge, measured: the
  teacher's mean soft prediction per class, each example's most similar wrong class, Spearman's rho per row
- :func:`normalized_distances`, :func:`rkd_distance_loss`, :func:`triplet_cosines`, :func:`rkd_angle_loss`,
  :func:`rkd_step`               relational knowledge distillation (Park et al. 2019)

The student is any classifier; the chapter's is chapter 2's one-hidden-layer MLP
(``modular.MLPConfig(width=32, depth=1)``), whose guided layer for FitNets is the output of its
hidden block, ``student(x, return_all=True)[-2]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import Step, model_device

IGNORE = -100  # label of an unlabelled (transfer-set) example; the value F.cross_entropy ignores by default


def _check_temperature(T: float) -> None:
    if not isinstance(T, (int, float)) or T <= 0:
        raise ValueError(f"temperature T must be a positive number, got {T!r}")


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher logits must both be (B, C) with the same shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )


def softmax_t(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Softmax with temperature over the last axis: ``p_i = exp(z_i / T) / sum_j exp(z_j / T)``.

    ``T = 1`` is the ordinary softmax; ``T -> inf`` flattens it towards uniform, ``T -> 0``
    sharpens it towards one-hot on the arg-max. ``(..., C) -> (..., C)``.
    """
    _check_temperature(T)
    return torch.softmax(logits / T, dim=-1)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``, averaged over the batch.

    Written out: ``T^2 / B * sum_b sum_i p_t[b, i] (log p_t[b, i] - log p_s[b, i])``. The ``T^2``
    undoes the ``1 / T^2`` by which the soft-target gradient shrinks, so that its size does not
    depend on ``T``. Logits ``(B, C)``; the teacher is treated as a constant (detached).
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(T)
    log_p_s = F.log_softmax(student_logits / T, dim=1)  # (B, C)
    log_p_t = F.log_softmax(teacher_logits.detach() / T, dim=1)  # (B, C)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (B,)
    return T**2 * kl.mean()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    T: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.

    The hard term uses temperature 1 (the student is deployed at ``T = 1``); it is averaged
    over the labelled rows only: rows whose label is :data:`IGNORE` (an unlabelled transfer set)
    contribute to the soft term alone. ``labels=None`` (or no labelled row) means no hard term.
    Logits ``(B, C)``, labels ``(B,)`` int64.
    """
    _check_logits(student_logits, teacher_logits)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    soft = soft_target_loss(student_logits, teacher_logits, T)
    if labels is None or alpha == 0.0:
        return (1 - alpha) * soft
    if labels.shape != student_logits.shape[:1] or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be int64 of shape ({student_logits.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )
    labelled = labels != IGNORE  # (B,) bool
    if not labelled.any():
        return (1 - alpha) * soft
    hard = F.cross_entropy(student_logits[labelled], labels[labelled])
    return alpha * hard + (1 - alpha) * soft


def soft_target_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, limit: bool = False
) -> torch.Tensor:
    """Gradient of ``KL(p_t || p_s)`` (no ``T^2``, one example per row) with respect to ``z_s``.

    Exact: ``(softmax(z_s/T) - softmax(z_t/T)) / T``. With ``limit=True`` the high-temperature
    approximation ``(z_s - z_t) / (C T^2)`` after centring each row of logits (zero mean): the
    loss becomes logit matching, ``||z_s - z_t||^2 / (2 C T^2)``. ``(B, C) -> (B, C)``.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(T)
    if limit:
        centre = lambda z: z - z.mean(dim=1, keepdim=True)
        return (centre(student_logits) - centre(teacher_logits)) / (student_logits.shape[1] * T**2)
    return (softmax_t(student_logits, T) - softmax_t(teacher_logits, T)) / T


def distillation_step(T: float = 4.0, alpha: float = 0.5) -> Step:
    """The student's training step for ``train.fit``: :func:`distillation_loss` on a batch ``(x, y, z_t)``.

    ``x`` are the inputs, ``y`` ``(B,)`` the labels (:data:`IGNORE` for a transfer-set image whose
    label the student may not see) and ``z_t`` ``(B, C)`` the teacher's logits, precomputed once
    with :func:`teacher_logits`. ``alpha = 1`` is plain cross-entropy on the labelled rows.
    """
    _check_temperature(T)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    def step(student: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y, z_teacher = batch  # (B, ...), (B,), (B, C)
        return distillation_loss(student(x), z_teacher, y, T, alpha)

    return step


class HintRegressor(nn.Module):
    """FitNets' regressor: maps the student's guided layer to the shape of the teacher's hint.

    Vectors ``(B, d_s) -> (B, d_t)`` with a linear layer, or feature maps
    ``(B, c_s, H, W) -> (B, c_t, H, W)`` with a 1x1 convolution (``spatial=True``). It exists only
    during training: the deployed student does not contain it.
    """

    def __init__(self, student_dim: int, teacher_dim: int, spatial: bool = False) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"student_dim and teacher_dim must be >= 1, got {student_dim}, {teacher_dim}")
        self.spatial = spatial
        self.proj = nn.Conv2d(student_dim, teacher_dim, 1) if spatial else nn.Linear(student_dim, teacher_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, d_s) -> (B, d_t)``, or ``(B, c_s, H, W) -> (B, c_t, H, W)`` when spatial."""
        want = 4 if self.spatial else 2
        if h.ndim != want:
            raise ValueError(
                f"HintRegressor(spatial={self.spatial}) expects a {want}-d input, got shape {tuple(h.shape)}"
            )
        return self.proj(h)


def hint_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor, regressor: nn.Module) -> torch.Tensor:
    """FitNets hint loss: mean squared error between ``regressor(student_hint)`` and the teacher's hint.

    (Romero et al. write ``1/2 ||u_h - r(v_g)||^2``; the mean instead of the half-sum only
    rescales the learning rate.) The teacher's hint is a constant (detached).
    """
    guess = regressor(student_hint)
    if guess.shape != teacher_hint.shape:
        raise ValueError(
            f"regressed student hint {tuple(guess.shape)} does not match the teacher hint {tuple(teacher_hint.shape)}"
        )
    return F.mse_loss(guess, teacher_hint.detach())


def labelled_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into ``per_class`` labelled examples of every class and the rest (unlabelled).

    Returns ``(labelled, unlabelled)`` index tensors, each sorted; seeded, so every method in a
    comparison sees the same few labels for a given seed.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got shape {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()  # (n_c,)
        if per_class < 1 or per_class > len(members):
            raise ValueError(
                f"per_class must be in 1..{len(members)} (class {c} has {len(members)} examples), got {per_class}"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    labelled = torch.cat(chosen).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[labelled] = False
    return labelled, mask.nonzero().flatten()


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, features: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Run the frozen teacher once over ``x`` (eval mode): logits ``(N, C)``, or ``teacher.features(x)``.

    The teacher does not change while the student trains, so its outputs are computed once
    instead of at every step; ``features=True`` gives the hint features (FitNets). The batches run
    on the teacher's device; the outputs are returned on the device of ``x``, beside the data.
    """
    teacher.eval()
    device = model_device(teacher)
    fn = cast(Callable[[torch.Tensor], torch.Tensor], teacher.features) if features else teacher
    return torch.cat([fn(x[i : i + batch_size].to(device)).to(x.device) for i in range(0, len(x), batch_size)])


# --- dark knowledge: what the soft targets say about the classes -------------------------------


def class_similarity(probs: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """The teacher's mean soft prediction per true class: ``S[c, j] = mean_{n: y_n = c} probs[n, j]``.

    ``probs`` ``(N, C)`` (rows summing to one, e.g. ``softmax_t(z_t, T)``), ``labels`` ``(N,)`` int64.
    Row ``c`` says how much, on average, the teacher thinks an image of class ``c`` looks like each
    class; its off-diagonal entries are the dark knowledge. Every class must occur. ``-> (C, C)``.
    """
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"need probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    c = probs.shape[1] if num_classes is None else num_classes
    if c != probs.shape[1]:
        raise ValueError(f"num_classes={c} does not match probs with {probs.shape[1]} columns")
    counts = torch.bincount(labels, minlength=c)  # (C,)
    if len(counts) != c or (counts == 0).any():
        raise ValueError(f"every class 0..{c - 1} needs an example (and no other label), got counts {counts.tolist()}")
    sums = torch.zeros(c, c, dtype=probs.dtype, device=probs.device).index_add_(0, labels, probs)  # (C, C)
    return sums / counts[:, None].to(probs.dtype)


def runner_up(scores: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's highest-scoring class other than its label: ``(N, C) -> (N,)`` int64 (``C >= 2``).

    With ``labels`` ``(N,)`` the label's column is excluded, so the result is the class the row
    finds most similar to its true class; without labels it is the class with the second-largest score.
    For a distance (smaller = closer) pass ``-distance``.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (N, C) with C >= 2, got {tuple(scores.shape)}")
    if labels is None:
        return scores.topk(2, dim=1).indices[:, 1]
    if labels.shape != scores.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels must be int64 ({scores.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}")
    own = F.one_hot(labels, scores.shape[1]).bool()  # (N, C)
    return scores.masked_fill(own, -torch.inf).argmax(dim=1)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each row of ``a`` with the same row of ``b``: ``(R, K), (R, K) -> (R,)``.

    The Pearson correlation of the ranks, ``K >= 3`` entries per row. Meant for continuous scores;
    tied entries get arbitrary distinct ranks instead of their average rank.
    """
    if a.ndim != 2 or a.shape != b.shape or a.shape[1] < 3:
        raise ValueError(f"need a and b of one shape (R, K) with K >= 3, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = (t.argsort(dim=1).argsort(dim=1).to(torch.float64) for t in (a, b))  # (R, K) ranks 0..K-1
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


# --- relational knowledge distillation (Park et al. 2019) ---------------------------------------


def _check_relational_pair(student: torch.Tensor, teacher: torch.Tensor, least: int) -> None:
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher embeddings must be (B, d_s) and (B, d_t) with the same B, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] < least:
        raise ValueError(f"relational losses need a batch of at least {least} examples, got {student.shape[0]}")


def normalized_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances divided by their mean over the pairs ``i != j``: ``(B, D) -> (B, B)``.

    ``psi_D(e_i, e_j) = ||e_i - e_j|| / mu`` with ``mu = mean_{i != j} ||e_i - e_j||``; the diagonal is 0.
    Dividing by ``mu`` makes the result invariant to scaling ``e`` (and, like any distance, to
    rotating or translating it).
    """
    sq = e.pow(2).sum(dim=1)  # (B,)
    dist = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()  # (B, B); clamp: no NaN gradient at 0
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)  # (B, B) the pairs i != j
    dist = dist * off
    return dist / dist[off].mean().clamp_min(eps)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D: Huber loss between the student's and the teacher's normalised distances, mean over ``i != j``.

    Embeddings ``(B, d_s)`` and ``(B, d_t)``: the widths may differ, since only distances are
    compared (no regressor, unlike FitNets). The teacher is a constant (detached).
    """
    _check_relational_pair(student, teacher, 2)
    b = len(student)
    ds, dt = normalized_distances(student), normalized_distances(teacher.detach())  # (B, B), zero diagonals
    return F.huber_loss(ds, dt, delta=1.0, reduction="sum") / (b * (b - 1))  # the diagonal adds 0


def triplet_cosines(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``cos`` of the angle at ``e_j`` between ``e_i - e_j`` and ``e_k - e_j``: ``(B, D) -> (B, B, B)``.

    Indexed ``[j, i, k]`` (the vertex first). Entries whose ``i`` or ``k`` equals ``j`` (a zero vector) are 0.
    """
    diff = e[None, :, :] - e[:, None, :]  # (B, B, D): diff[j, i] = e_i - e_j
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(eps)  # zero where i == j
    return unit @ unit.transpose(1, 2)  # (B, B, B): [j, i, k] = <unit[j, i], unit[j, k]>


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the triplet cosines of student and teacher, mean over distinct ``i, j, k``.

    Embeddings ``(B, d_s)`` and ``(B, d_t)``, ``B >= 3``; invariant to scaling, rotating and
    translating either embedding. The teacher is a constant (detached).
    """
    _check_relational_pair(student, teacher, 3)
    b = len(student)
    cs, ct = triplet_cosines(student), triplet_cosines(teacher.detach())  # (B, B, B)
    # a triple with j = i or j = k has cosine 0 in both, one with i = k (!= j) has cosine 1 in both: they add 0
    return F.huber_loss(cs, ct, delta=1.0, reduction="sum") / (b * (b - 1) * (b - 2))


def rkd_step(
    T: float = 4.0, alpha: float = 0.5, w_distance: float = 25.0, w_angle: float = 50.0, angle_rows: int = 32
) -> Step:
    """Training step for ``train.fit``: :func:`distillation_loss` plus the two RKD terms, on ``(x, y, z_t, h_t)``.

    ``h_t`` ``(B, d_t)`` is the teacher's embedding (e.g. its penultimate features, precomputed with
    ``teacher_logits(..., features=True)``); the student's embedding is the input of its last
    block, ``student(x, return_all=True)[-2]`` (a :class:`~dlarch_lib.modular.Chain`). The weights
    are Park et al.'s (25 for the distances, 50 for the angles). The angle term costs ``O(B^3)``, so
    it uses the first ``angle_rows`` rows of each (shuffled) batch.
    """
    _check_temperature(T)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if w_distance < 0 or w_angle < 0:
        raise ValueError(f"RKD weights must be >= 0, got {w_distance}, {w_angle}")
    if angle_rows < 3:
        raise ValueError(f"angle_rows must be >= 3 (a triplet), got {angle_rows}")

    def step(student: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, z_teacher, h_teacher = batch  # (B, ...), (B,), (B, C), (B, d_t)
        outputs = student(x, return_all=True)
        h_student, z_student = outputs[-2], outputs[-1]  # (B, d_s), (B, C)
        loss = distillation_loss(z_student, z_teacher, y, T, alpha)
        if len(x) >= 3:  # a last batch of one or two examples has no triplet
            loss = loss + w_distance * rkd_distance_loss(h_student, h_teacher)
            loss = loss + w_angle * rkd_angle_loss(h_student[:angle_rows], h_teacher[:angle_rows])
        return loss

    return step
