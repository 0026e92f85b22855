"""Tests for dlarch_lib.frameworks (chapter 29)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from dlarch_lib import frameworks as fw
from dlarch_lib.core.measure import count_parameters
from dlarch_lib.core.train import fit


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fw.create_model("mlp", width=16, depth=2)


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_compile_report_matches_eager_outputs():
    model, (x, _) = small_mlp(), batch(32)
    report = fw.compile_report(model, x, backend="eager", repeats=3, warmup=1)
    assert report.backend == "eager"
    assert report.max_abs_diff < 1e-5
    assert report.compile_wall_s > 0 and report.eager_ms > 0 and report.compiled_ms > 0
    assert report.speedup == pytest.approx(report.eager_ms / report.compiled_ms)


def test_compile_report_rounds_keep_each_versions_best_round(monkeypatch):
    model, (x, _) = small_mlp(), batch(8)
    medians = iter([5.0, 1.0, 3.0, 4.0, 7.0, 2.0])  # eager, compiled, eager, compiled, ... (one time per round)
    monkeypatch.setattr(fw.measure, "timings_ms", lambda fn, repeats, warmup, **kw: [next(medians)])
    report = fw.compile_report(model, x, backend="eager", repeats=1, warmup=0, rounds=3)
    assert (report.eager_ms, report.compiled_ms) == (3.0, 1.0)  # the lowest median of each, over its rounds


def test_compile_report_break_even():
    r = fw.CompileReport("x", compile_wall_s=1.0, compile_cpu_s=1.0, eager_ms=2.0, compiled_ms=1.0, max_abs_diff=0.0)
    assert r.speedup == 2.0 and r.break_even_calls == pytest.approx(1000.0)
    slower = fw.CompileReport("x", 1.0, 1.0, eager_ms=1.0, compiled_ms=2.0, max_abs_diff=0.0)
    assert math.isinf(slower.break_even_calls)


def test_compile_report_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        fw.compile_report(lambda x: x, torch.zeros(1))
    with pytest.raises(TypeError, match="tensor"):
        fw.compile_report(small_mlp(), [1.0])
    with pytest.raises(ValueError, match="backend"):
        fw.compile_report(small_mlp(), torch.zeros(1, 64), backend="no_such_backend")
    with pytest.raises(ValueError, match="rounds"):
        fw.compile_report(small_mlp(), torch.zeros(1, 1, 8, 8), backend="eager", rounds=0)


def test_per_example_grads_match_loop():
    model, (x, y) = small_mlp(), batch(5)
    fast = fw.per_example_grads(model, x, y)
    slow = fw.per_example_grads_loop(model, x, y)
    assert fast.keys() == slow.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert fast[name].shape == (5, *p.shape)
        assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6)


def test_per_example_grads_average_to_batch_gradient():
    model, (x, y) = small_mlp(), batch(8)
    per = fw.per_example_grads(model, x, y)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # mean over the batch
    for name, p in model.named_parameters():
        assert_close(per[name].mean(0), p.grad, rtol=1e-4, atol=1e-6)


def test_per_example_grads_bad_shapes():
    model, (x, y) = small_mlp(), batch(4)
    with pytest.raises(ValueError, match="same B"):
        fw.per_example_grads(model, x, y[:3])
    with pytest.raises(ValueError, match="same B"):
        fw.per_example_grads_loop(model, x, y[:, None])


def test_functional_loss_equals_module_loss():
    model, (x, y) = small_mlp(), batch(4)
    loss = fw.functional_loss(model)
    assert_close(loss(fw.params_of(model), x, y), F.cross_entropy(model(x), y).detach())
    zero = {k: torch.zeros_like(v) for k, v in fw.params_of(model).items()}
    assert_close(loss(zero, x, y), torch.tensor(math.log(10.0)))  # all logits 0: uniform over 10 classes


def test_jacobian_rows_matches_jacrev_and_hand_case():
    w = torch.randn(3, 4)
    f = lambda v: torch.tanh(w @ v)
    v = torch.randn(4)
    jac = fw.jacobian_rows(f, v)
    assert jac.shape == (3, 4)
    assert_close(jac, torch.func.jacrev(f)(v))
    a = torch.tensor([1.0, 2.0])
    assert_close(fw.jacobian_rows(lambda t: t**2, a), torch.diag(2 * a))  # d(x_i^2)/dx_j = 2 x_i delta_ij


def test_functional_sgd_step_is_pure():
    p = {"w": torch.ones(2)}
    g = {"w": torch.full((2,), 0.5)}
    new = fw.functional_sgd_step(p, g, lr=0.2)
    assert_close(new["w"], torch.full((2,), 0.9))
    assert_close(p["w"], torch.ones(2))  # input unchanged
    with pytest.raises(ValueError, match="lr"):
        fw.functional_sgd_step(p, g, lr=0.0)
    with pytest.raises(ValueError, match="different names"):
        fw.functional_sgd_step(p, {"v": g["w"]}, lr=0.1)


def test_functional_sgd_through_the_engine_equals_torch_optim_sgd():
    data = [batch(8, seed=s) for s in range(4)]
    model = small_mlp(1)
    twin = small_mlp(1)
    step = fw.FunctionalSGD(model, lr=0.1)
    history = fit(model, data, step, steps=len(data), optimizer=None, progress=False)
    ref = fit(twin, data, steps=len(data), optimizer=torch.optim.SGD(twin.parameters(), lr=0.1), progress=False)
    assert history.steps == ref.steps == 4
    assert history.loss == pytest.approx(ref.loss, rel=1e-5)
    for name, p in twin.named_parameters():
        assert_close(step.params[name], p.detach(), rtol=1e-5, atol=1e-6)
    assert_close(
        fw.params_of(model)["blocks.1.0.weight"], fw.params_of(small_mlp(1))["blocks.1.0.weight"]
    )  # model untouched
    assert all(p.grad is None for p in model.parameters())  # no .grad fields, no backward()
    with pytest.raises(ValueError, match="lr"):
        fw.FunctionalSGD(model, lr=0.0)


def test_per_example_grads_loop_leaves_grad_fields_alone():
    model, (x, y) = small_mlp(), batch(3)
    fw.per_example_grads_loop(model, x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", fw.list_models())
def test_zoo_models_classify_digits(name):
    model = fw.create_model(name, num_classes=7).eval()
    x, _ = batch(3)
    assert model(x).shape == (3, 7)
    assert count_parameters(model) > 0


def test_zoo_names_and_errors():
    assert fw.list_models() == ["cnn", "mlp", "small_resnet", "tiny_efficientnet"]
    assert fw.list_models("*net*") == ["small_resnet", "tiny_efficientnet"]
    assert count_parameters(fw.create_model("mlp", width=8, depth=1)) == 64 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(ValueError, match="did you mean 'small_resnet'"):
        fw.create_model("small_resnt")
    with pytest.raises(TypeError, match="create_model\\('small_resnet'\\)"):
        fw.create_model("small_resnet", no_such_arg=1)


def test_pinned_jax_runs_on_the_cpu():
    """Chapter 29 trains the same MLP in JAX: the pinned JAX must import and differentiate here."""
    import jax
    import jax.numpy as jnp

    assert float(jax.grad(lambda x: (x**2).sum())(jnp.arange(3.0))[2]) == 4.0
