"""Tests for dlarch_lib.distill: temperature softmax, the KD loss against PyTorch, its gradient, FitNets, training
with the distillation step through train.fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import distill as kd
from dlarch_lib import modular
from dlarch_lib.core.data import TensorBatches
from dlarch_lib.core.train import fit, loss_step


def _logits(b: int = 5, c: int = 7, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_softmax_t_limits_and_shape():
    z = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(kd.softmax_t(z, 1.0), torch.softmax(z, dim=-1))
    torch.testing.assert_close(kd.softmax_t(z, 1e6), torch.full((1, 3), 1 / 3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(kd.softmax_t(z, 1e-3), torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))
    assert kd.softmax_t(torch.randn(2, 3, 4), 2.0).shape == (2, 3, 4)
    # entropy grows with temperature
    ent = [-(p * p.log()).sum().item() for p in (kd.softmax_t(z, t) for t in (0.5, 1, 2, 4, 8))]
    assert all(a < b for a, b in zip(ent, ent[1:]))


@pytest.mark.parametrize("T", [0.0, -1.0, "4"])
def test_bad_temperature(T):
    with pytest.raises(ValueError, match="temperature"):
        kd.softmax_t(torch.zeros(1, 3), T)


@pytest.mark.parametrize("T", [1.0, 2.5, 8.0])
def test_soft_target_loss_matches_kl_div(T):
    zs, zt = _logits(seed=1), _logits(seed=2)
    ref = F.kl_div(F.log_softmax(zs / T, dim=1), F.log_softmax(zt / T, dim=1), log_target=True, reduction="batchmean")
    torch.testing.assert_close(kd.soft_target_loss(zs, zt, T), T**2 * ref)
    assert kd.soft_target_loss(zt, zt, T).abs() < 1e-12  # KL(p || p) = 0


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.0), (4.0, 0.5), (2.0, 0.9), (3.0, 1.0)])
def test_distillation_loss_matches_torch_composition(T, alpha):
    zs, zt = _logits(seed=3), _logits(seed=4)
    y = torch.tensor([0, 3, 6, 2, 1])
    ref = alpha * F.cross_entropy(zs, y) + (1 - alpha) * T**2 * F.kl_div(
        F.log_softmax(zs / T, dim=1), F.log_softmax(zt / T, dim=1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(kd.distillation_loss(zs, zt, y, T, alpha), ref)


def test_distillation_loss_ignores_unlabelled_rows():
    zs, zt = _logits(seed=5), _logits(seed=6)
    y = torch.tensor([2, kd.IGNORE, 4, kd.IGNORE, kd.IGNORE])
    ref = 0.3 * F.cross_entropy(zs, y, ignore_index=kd.IGNORE) + 0.7 * kd.soft_target_loss(zs, zt, 2.0)
    torch.testing.assert_close(kd.distillation_loss(zs, zt, y, 2.0, 0.3), ref)
    none = torch.full((5,), kd.IGNORE)
    torch.testing.assert_close(kd.distillation_loss(zs, zt, none, 2.0, 0.3), 0.7 * kd.soft_target_loss(zs, zt, 2.0))
    torch.testing.assert_close(kd.distillation_loss(zs, zt, None, 2.0, 0.3), 0.7 * kd.soft_target_loss(zs, zt, 2.0))


def test_distillation_loss_errors():
    zs = _logits()
    with pytest.raises(ValueError, match="same shape"):
        kd.distillation_loss(zs, zs[:, :3])
    with pytest.raises(ValueError, match="alpha"):
        kd.distillation_loss(zs, zs, alpha=1.5)
    with pytest.raises(ValueError, match="labels must be int64"):
        kd.distillation_loss(zs, zs, torch.zeros(5))
    with pytest.raises(ValueError, match="labels must be int64"):
        kd.distillation_loss(zs, zs, torch.zeros(4, dtype=torch.long))


def test_teacher_gets_no_gradient():
    zs, zt = _logits().requires_grad_(), _logits(seed=9).requires_grad_()
    kd.distillation_loss(zs, zt, torch.zeros(5, dtype=torch.long)).backward()
    assert zt.grad is None and zs.grad is not None


@pytest.mark.parametrize("T", [1.0, 3.0, 10.0])
def test_soft_target_grad_matches_autograd(T):
    zs, zt = _logits(b=1, seed=7).requires_grad_(), _logits(b=1, seed=8)
    (grad,) = torch.autograd.grad(kd.soft_target_loss(zs, zt, T) / T**2, zs)  # one row: batch mean = the row
    torch.testing.assert_close(grad, kd.soft_target_grad(zs.detach(), zt, T))


def test_high_temperature_limit_is_logit_matching():
    zs, zt = _logits(b=3, seed=10), _logits(b=3, seed=11)
    errors = []
    for T in (10.0, 100.0, 1000.0):
        exact, limit = kd.soft_target_grad(zs, zt, T), kd.soft_target_grad(zs, zt, T, limit=True)
        errors.append(((exact - limit).norm() / limit.norm()).item())
    assert errors[0] < 0.2 and errors[2] < 5e-3 and errors[0] > errors[1] > errors[2]  # error O(1/T)
    # and the T^2-scaled loss tends to ||centred(z_s - z_t)||^2 / (2 C), per row
    d = (zs - zs.mean(1, keepdim=True)) - (zt - zt.mean(1, keepdim=True))
    target = (d.pow(2).sum(1) / (2 * zs.shape[1])).mean()
    assert math.isclose(kd.soft_target_loss(zs, zt, 1000.0).item(), target.item(), rel_tol=1e-2)


def test_distillation_step_is_the_loss_on_x_y_teacher_batches():
    torch.manual_seed(0)
    student = modular.build_model(modular.MLPConfig(width=16, depth=1))
    x, zt = torch.rand(5, 1, 8, 8), _logits(c=10, seed=13).float()
    y = torch.tensor([1, kd.IGNORE, 3, 0, kd.IGNORE])
    step = kd.distillation_step(4.0, 0.2)
    torch.testing.assert_close(step(student, (x, y, zt)), kd.distillation_loss(student(x), zt, y, 4.0, 0.2))
    hard = kd.distillation_step(alpha=1.0)(student, (x, y, zt))  # alpha = 1: cross-entropy on the labelled rows
    torch.testing.assert_close(hard, F.cross_entropy(student(x), y, ignore_index=kd.IGNORE))
    unlabelled = kd.distillation_step(alpha=1.0)(student, (x, torch.full((5,), kd.IGNORE), zt))
    assert unlabelled.item() == 0.0 and not torch.isnan(unlabelled)
    with pytest.raises(ValueError, match="alpha"):
        kd.distillation_step(alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        kd.distillation_step(T=0.0)


def test_guided_layer_is_the_hidden_block_of_the_chain():
    student = modular.build_model(modular.MLPConfig(width=16, depth=1))
    x = torch.rand(4, 1, 8, 8)
    hidden = student(x, return_all=True)[-2]  # FitNets' guided layer: (B, width), after the ReLU
    assert hidden.shape == (4, 16) and (hidden >= 0).all()
    torch.testing.assert_close(student.blocks[-1](hidden), student(x))


def test_hint_regressor_and_loss():
    reg = kd.HintRegressor(8, 12)
    h, t = torch.randn(3, 8), torch.randn(3, 12)
    torch.testing.assert_close(kd.hint_loss(h, t, reg), ((reg(h) - t) ** 2).mean())
    conv = kd.HintRegressor(4, 6, spatial=True)
    assert conv(torch.randn(2, 4, 5, 5)).shape == (2, 6, 5, 5)
    assert isinstance(conv.proj, nn.Conv2d) and conv.proj.kernel_size == (1, 1)
    with pytest.raises(ValueError, match="4-d input"):
        conv(torch.randn(2, 4))
    with pytest.raises(ValueError, match="does not match"):
        kd.hint_loss(h, torch.randn(3, 11), reg)
    with pytest.raises(ValueError, match="student_dim"):
        kd.HintRegressor(0, 3)
    # the teacher's hint is a constant
    t.requires_grad_()
    kd.hint_loss(h, t, reg).backward()
    assert t.grad is None


def test_teacher_logits_batches_and_eval_mode():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))
    teacher.features = lambda x: x.flatten(1)[:, :5]  # type: ignore[attr-defined]
    x = torch.rand(7, 1, 8, 8)
    z = kd.teacher_logits(teacher, x, batch_size=3)
    assert not teacher.training and z.shape == (7, 10) and not z.requires_grad
    torch.testing.assert_close(z, teacher(x))  # eval mode: dropout off, so deterministic
    assert kd.teacher_logits(teacher, x, features=True).shape == (7, 5)
    assert z.device == x.device


def test_a_student_learns_to_copy_a_teacher_through_fit():
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    zt = kd.teacher_logits(teacher, 4 * x)
    student = modular.build_model(modular.MLPConfig(width=32, depth=1))
    no_labels = torch.full((256,), kd.IGNORE)  # pure soft targets
    loss = lambda: kd.distillation_loss(student(x), zt, no_labels, 2.0, 0.0).item()
    before = loss()
    data = TensorBatches(x, no_labels, zt, batch_size=128, generator=torch.Generator().manual_seed(0))
    history = fit(student, data, kd.distillation_step(2.0, 0.0), epochs=30, lr=1e-2, optimizer="adamw", progress=False)
    assert history.epochs == 30 and history.steps == 30 * 2
    assert loss() < 0.3 * before
    agree = (student(x).argmax(1) == zt.argmax(1)).float().mean().item()
    assert agree > 0.8


def test_fitnets_hint_stage_trains_the_guided_layers_and_the_regressor():
    torch.manual_seed(0)
    x, hints = torch.rand(128, 1, 8, 8), torch.randn(128, 12)
    student, regressor = modular.build_model(modular.MLPConfig(width=16, depth=1)), kd.HintRegressor(16, 12)
    guided = nn.Sequential(*student.blocks[:-1], regressor)  # the student up to its guided layer, then r
    before = kd.hint_loss(student(x, return_all=True)[-2], hints, regressor).item()
    head = student.blocks[-1].weight.detach().clone()
    fit(
        guided,
        TensorBatches(x, hints, batch_size=32, generator=torch.Generator().manual_seed(0)),
        loss_step(F.mse_loss),
        epochs=5,
        lr=1e-2,
        progress=False,
    )
    assert kd.hint_loss(student(x, return_all=True)[-2], hints, regressor).item() < before
    assert torch.equal(student.blocks[-1].weight, head)  # the head is not part of the hint stage


def test_labelled_subset_is_stratified_disjoint_and_seeded():
    y = torch.arange(10).repeat(7)  # 70 labels, 7 per class
    lab, unl = kd.labelled_subset(y, 3, seed=1)
    assert len(lab) == 30 and len(unl) == 40
    assert torch.bincount(y[lab]).tolist() == [3] * 10
    assert set(lab.tolist()).isdisjoint(unl.tolist()) and len(set(lab.tolist()) | set(unl.tolist())) == 70
    torch.testing.assert_close(kd.labelled_subset(y, 3, seed=1)[0], lab)
    assert not torch.equal(kd.labelled_subset(y, 3, seed=2)[0], lab)
    with pytest.raises(ValueError, match="per_class"):
        kd.labelled_subset(y, 8)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        kd.labelled_subset(y[None], 2)


# --- dark knowledge, measured ---------------------------------------------------------------------


def test_class_similarity_is_the_mean_soft_prediction_per_class():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    want = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(kd.class_similarity(probs, labels), want)
    torch.testing.assert_close(kd.class_similarity(probs, labels).sum(dim=1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs an example"):
        kd.class_similarity(probs, torch.tensor([0, 0, 1, 1]))  # class 2 never occurs
    with pytest.raises(ValueError, match="num_classes"):
        kd.class_similarity(probs, labels, num_classes=4)
    with pytest.raises(ValueError, match="need probs"):
        kd.class_similarity(probs, labels[:3])


def test_runner_up_excludes_the_label():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 9.0, 1.0]])
    assert kd.runner_up(scores).tolist() == [2, 1]  # the second-largest score
    assert kd.runner_up(scores, torch.tensor([0, 2])).tolist() == [2, 1]  # label = arg-max: same
    assert kd.runner_up(scores, torch.tensor([2, 3])).tolist() == [0, 2]  # label elsewhere: the arg-max of the rest
    with pytest.raises(ValueError, match="C >= 2"):
        kd.runner_up(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="labels must be int64"):
        kd.runner_up(scores, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must lie"):
        kd.runner_up(scores, torch.tensor([0, 4]))


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    b[0] = a[0] ** 3  # a monotone map: rho = 1
    b[1] = -a[1]  # reversed: rho = -1
    rho = kd.rank_correlation(a, b)
    want = torch.tensor([stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(6)], dtype=torch.float64)
    torch.testing.assert_close(rho, want)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="K >= 3"):
        kd.rank_correlation(a[:, :2], b[:, :2])
    with pytest.raises(ValueError, match="one shape"):
        kd.rank_correlation(a, b[:, :5])


# --- relational knowledge distillation ------------------------------------------------------------


def _triangle() -> torch.Tensor:
    return torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # sides 3, 4, 5


def _similar(e: torch.Tensor, scale: float = 7.0, seed: int = 0, width: int = 5) -> torch.Tensor:
    """``e`` scaled, embedded in ``width`` dimensions, rotated by a random orthogonal map and translated."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
    padded = F.pad(e, (0, width - e.shape[1]))
    return scale * padded @ q + torch.randn(width, generator=g, dtype=torch.float64)


def test_normalized_distances_match_cdist_and_a_hand_case():
    e = _triangle()
    want = torch.tensor([[0, 3, 4], [3, 0, 5], [4, 5, 0]], dtype=torch.float64) / 4  # mean distance 4
    torch.testing.assert_close(kd.normalized_distances(e), want)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = torch.cdist(x, x)
    torch.testing.assert_close(kd.normalized_distances(x), d / F.pdist(x).mean())


def test_triplet_cosines_hand_case_and_cosine_similarity():
    c = kd.triplet_cosines(_triangle())  # [vertex j, i, k]
    assert c[0, 1, 2] == pytest.approx(0.0) and c[1, 0, 2] == pytest.approx(0.6) and c[2, 0, 1] == pytest.approx(0.8)
    assert c[0, 0, 1] == 0 and c[1, 2, 2] == pytest.approx(1.0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for j, i, k in [(0, 1, 2), (3, 4, 1), (2, 0, 4)]:
        ref = F.cosine_similarity(x[i] - x[j], x[k] - x[j], dim=0)
        torch.testing.assert_close(kd.triplet_cosines(x)[j, i, k], ref)


def test_rkd_losses_hand_values():
    equilateral = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]], dtype=torch.float64)
    # distances 3/4, 1, 5/4 against 1, 1, 1: Huber 0.5 d^2 on 4 ordered pairs of 6
    assert kd.rkd_distance_loss(_triangle(), equilateral).item() == pytest.approx(4 * 0.5 * 0.25**2 / 6)
    # cosines 0, 0.6, 0.8 against 0.5 each, every vertex twice, 6 ordered triples
    assert kd.rkd_angle_loss(_triangle(), equilateral).item() == pytest.approx(2 * 0.5 * (0.25 + 0.01 + 0.09) / 6)


def test_rkd_losses_are_invariant_to_similarity_maps_but_not_to_stretching():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for scale in (0.01, 7.0, 300.0):
        y = _similar(x, scale=scale)  # 12 x 5: another width, like a teacher's embedding
        assert kd.rkd_distance_loss(y, x).item() == pytest.approx(0.0, abs=1e-10)
        assert kd.rkd_angle_loss(y, x).item() == pytest.approx(0.0, abs=1e-10)
    stretched = x * torch.tensor([1.0, 1.0, 5.0], dtype=torch.float64)  # not a similarity: relations change
    assert kd.rkd_distance_loss(stretched, x) > 1e-3 and kd.rkd_angle_loss(stretched, x) > 1e-3


def test_rkd_gradients_are_finite_with_duplicates_and_skip_the_teacher():
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    s[1] = s[0]  # two identical embeddings: the distance is 0, where sqrt has no derivative
    s.requires_grad_()
    t = torch.randn(6, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    loss = kd.rkd_distance_loss(s, t) + kd.rkd_angle_loss(s, t)
    grad_s, grad_t = torch.autograd.grad(loss, [s, t], allow_unused=True)
    assert torch.isfinite(grad_s).all() and grad_s.abs().sum() > 0
    assert grad_t is None  # the teacher is a constant


def test_rkd_errors():
    with pytest.raises(ValueError, match="same B"):
        kd.rkd_distance_loss(torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="at least 3"):
        kd.rkd_angle_loss(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least 2"):
        kd.rkd_distance_loss(torch.zeros(1, 2), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="angle_rows"):
        kd.rkd_step(angle_rows=2)
    with pytest.raises(ValueError, match="RKD weights"):
        kd.rkd_step(w_distance=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        kd.rkd_step(alpha=2.0)


def test_rkd_step_adds_the_relational_terms_to_the_kd_loss():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    student = modular.build_model(modular.MLPConfig(width=8, depth=1))
    x, y = torch.rand(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)
    z_t, h_t = torch.randn(10, 10, generator=g), torch.randn(10, 6, generator=g)
    h_s, z_s = student(x, return_all=True)[-2:]
    want = kd.distillation_loss(z_s, z_t, y, 4.0, 0.5) + 25 * kd.rkd_distance_loss(h_s, h_t)
    want = want + 50 * kd.rkd_angle_loss(h_s[:5], h_t[:5])
    torch.testing.assert_close(kd.rkd_step(4.0, 0.5, 25.0, 50.0, angle_rows=5)(student, (x, y, z_t, h_t)), want)
    short = kd.rkd_step()(student, (x[:2], y[:2], z_t[:2], h_t[:2]))  # no triplet: plain KD
    torch.testing.assert_close(short, kd.distillation_loss(student(x[:2]), z_t[:2], y[:2], 4.0, 0.5))


def test_rkd_student_learns_the_teacher_geometry_through_fit():
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    h_t = x.flatten(1)[:, :6] @ torch.randn(6, 6, generator=g)  # a teacher embedding: a linear image of x
    student = modular.build_model(modular.MLPConfig(width=16, depth=1))
    z_t, y = torch.zeros(64, 10), torch.full((64,), kd.IGNORE)

    def relational(model: nn.Module) -> float:
        with torch.no_grad():
            h = model(x, return_all=True)[-2]
        return kd.rkd_distance_loss(h, h_t).item()

    before = relational(student)
    batches = TensorBatches(x, y, z_t, h_t, batch_size=32, generator=torch.Generator().manual_seed(0))
    fit(student, batches, kd.rkd_step(alpha=0.0, w_angle=0.0), epochs=40, lr=1e-2, progress=False)
    assert relational(student) < 0.5 * before
