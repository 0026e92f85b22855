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
