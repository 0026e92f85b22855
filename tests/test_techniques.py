import math

import pytest
import torch
from torch import nn

from dlarch_lib import modular, rnn
from dlarch_lib import techniques as T
from dlarch_lib.core.data import load_digits_split


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


# ----------------------------------------------------------------- schedules


def test_step_lr_matches_steplr_and_hand_values():
    lrs = T.scheduler_lrs(T.torch_scheduler("step", _opt(0.1), 50, step_size=7, gamma=0.5), 50)
    assert lrs == pytest.approx([T.step_lr(t, base_lr=0.1, step_size=7, gamma=0.5) for t in range(50)], abs=1e-15)
    assert T.step_lr(6, base_lr=1.0, step_size=7) == 1.0 and T.step_lr(7, base_lr=1.0, step_size=7) == pytest.approx(
        0.1
    )


def test_cosine_lr_matches_cosine_annealing_and_endpoints():
    lrs = T.scheduler_lrs(T.torch_scheduler("cosine", _opt(0.1), 40, min_lr=0.01), 41)
    ours = [T.cosine_lr(t, base_lr=0.1, total_steps=40, min_lr=0.01) for t in range(41)]
    assert lrs == pytest.approx(ours, abs=1e-12)
    assert T.cosine_lr(20, base_lr=1.0, total_steps=40) == pytest.approx(0.5)
    assert T.cosine_lr(100, base_lr=1.0, total_steps=40, min_lr=0.2) == pytest.approx(0.2)  # flat after the end


def test_warmup_cosine_matches_sequential_lr_and_lambda_lr():
    total, warm = 60, 8
    ours = [T.warmup_cosine_lr(t, base_lr=0.1, warmup_steps=warm, total_steps=total) for t in range(total)]
    seq = T.scheduler_lrs(T.torch_scheduler("warmup_cosine", _opt(0.1), total, warmup_steps=warm), total)
    lam = T.scheduler_lrs(
        torch.optim.lr_scheduler.LambdaLR(_opt(0.1), T.schedule_factor("warmup_cosine", total, warm)), total
    )
    assert seq == pytest.approx(ours, abs=1e-12) and lam == pytest.approx(ours, abs=1e-12)
    assert ours[0] == pytest.approx(0.1 / warm) and ours[warm - 1] == pytest.approx(0.1) and max(ours) <= 0.1 + 1e-12


def test_schedule_factor_names_and_errors():
    for name in T.SCHEDULES:
        f = T.schedule_factor(name, 30, 3)
        assert 0.0 <= f(29) <= 1.0
    assert T.schedule_factor("constant", 30)(17) == 1.0
    assert T.schedule_factor("step", 30)(10) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        T.schedule_factor("linear", 30)
    with pytest.raises(ValueError, match="unknown torch scheduler"):
        T.torch_scheduler("linear", _opt(), 30)
    with pytest.raises(ValueError, match="warmup_steps"):
        T.warmup_cosine_lr(0, base_lr=1.0, warmup_steps=30, total_steps=30)
    with pytest.raises(ValueError, match="step must be"):
        T.cosine_lr(-1, base_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="step_size"):
        T.step_lr(0, base_lr=1.0, step_size=0)
    with pytest.raises(ValueError, match="total_steps"):
        T.cosine_lr(0, base_lr=1.0, total_steps=0)


# ----------------------------------------------------------------- dropout


def test_dropout_matches_nn_dropout_under_the_same_seed():
    x = torch.randn(64, 33)
    torch.manual_seed(5)
    ref = nn.Dropout(0.3)(x)
    torch.manual_seed(5)
    assert torch.equal(T.Dropout(0.3)(x), ref)


def test_dropout_keeps_the_mean_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.full((200_000,), 2.0)
    out = T.dropout(x, 0.4)
    assert out.mean().item() == pytest.approx(2.0, rel=0.01)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(2.0 / 0.6)))  # dropped, or scaled by 1/(1-p)
    assert out.var().item() == pytest.approx(4.0 * 0.4 / 0.6, rel=0.03)
    layer = T.Dropout(0.4).eval()
    assert torch.equal(layer(x), x) and torch.equal(T.dropout(x, 0.0), x)


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError, match="dropout probability"):
        T.dropout(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="dropout probability"):
        T.Dropout(-0.1)


# ----------------------------------------------------------------- weight decay vs L2


@pytest.mark.parametrize("decoupled, cls", [(False, torch.optim.Adam), (True, torch.optim.AdamW)])
def test_adam_step_matches_torch_adam_and_adamw(decoupled, cls):
    torch.manual_seed(0)
    w0 = torch.randn(5, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = cls([p], lr=0.05, weight_decay=0.1)
    w, state = w0.clone(), T.AdamState.zeros_like(w0)
    for _ in range(25):
        grad = torch.randn(5, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        w = T.adam_step(w, grad, state, lr=0.05, weight_decay=0.1, decoupled=decoupled)
    torch.testing.assert_close(w, p.detach())
    assert state.t == 25


def test_adam_l2_differs_from_adamw_and_ignores_lambda_without_loss_gradient():
    w0, zero = torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    steps = []
    for lam in (1e-3, 1e-1):
        l2 = T.adam_step(w0, zero, T.AdamState.zeros_like(w0), lr=0.01, weight_decay=lam)
        decoupled = T.adam_step(w0, zero, T.AdamState.zeros_like(w0), lr=0.01, weight_decay=lam, decoupled=True)
        assert l2.item() == pytest.approx(1.0 - 0.01, abs=1e-6)  # a step of lr, whatever lambda is
        assert decoupled.item() == pytest.approx(1.0 - 0.01 * lam)
        steps.append((l2.item(), decoupled.item()))
    assert steps[0][0] == pytest.approx(steps[1][0], abs=1e-6) and steps[0][1] != steps[1][1]


def test_sgd_l2_and_decoupled_coincide_and_match_torch():
    torch.manual_seed(1)
    w0 = torch.randn(4, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.1, weight_decay=0.3)
    w_l2, w_dec = w0.clone(), w0.clone()
    for _ in range(10):
        grad = torch.randn(4, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        w_l2 = T.sgd_step(w_l2, grad, lr=0.1, weight_decay=0.3)
        w_dec = T.sgd_step(w_dec, grad, lr=0.1, weight_decay=0.3, decoupled=True)
    torch.testing.assert_close(w_l2, w_dec)
    torch.testing.assert_close(w_l2, p.detach())


def test_optimizer_steps_reject_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        T.adam_step(torch.zeros(3), torch.zeros(2), T.AdamState.zeros_like(torch.zeros(3)), lr=0.1)
    with pytest.raises(ValueError, match="one shape"):
        T.sgd_step(torch.zeros(3), torch.zeros(2), lr=0.1)


# ----------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(16, 6), (8, 6, 5)])
def test_batchnorm_matches_nn_batchnorm1d_in_train_and_eval(shape):
    torch.manual_seed(0)
    ours, ref = T.BatchNorm1d(6, momentum=0.2), nn.BatchNorm1d(6, momentum=0.2)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.normal_()
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    for _ in range(4):  # train mode: batch statistics, running statistics updated
        x = 3.0 * torch.randn(*shape) + 1.5
        out_ours, out_ref = ours(x), ref(x)
        torch.testing.assert_close(out_ours, out_ref)
        g_ours = torch.autograd.grad(out_ours.pow(2).sum(), (ours.weight, ours.bias))
        g_ref = torch.autograd.grad(out_ref.pow(2).sum(), (ref.weight, ref.bias))
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x[:1]), ref(x)[:1])  # eval: each sample on its own


def test_batchnorm_train_output_is_standardised():
    bn = T.BatchNorm1d(3)
    out = bn(5.0 + 2.0 * torch.randn(256, 3))
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_batchnorm_errors():
    with pytest.raises(ValueError, match="expected"):
        T.BatchNorm1d(4)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="more than one value"):
        T.BatchNorm1d(4)(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="momentum"):
        T.BatchNorm1d(4, momentum=0.0)
    with pytest.raises(ValueError, match="num_features"):
        T.BatchNorm1d(0)


# ----------------------------------------------------------------- clipping and the RNN


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    (10 * a(x)).pow(2).sum().backward()
    (10 * b(x)).pow(2).sum().backward()
    n_ours = T.clip_grad_norm(a.parameters(), 1.0)
    n_ref = nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    torch.testing.assert_close(n_ours, n_ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert torch.sqrt(sum(p.grad.pow(2).sum() for p in a.parameters())).item() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="max_norm"):
        T.clip_grad_norm(a.parameters(), 0.0)


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, 0.2])
    assert T.clip_grad_norm([p], 1.0).item() == pytest.approx(0.3)
    torch.testing.assert_close(p.grad, torch.tensor([0.1, 0.2, 0.2]))


def test_rnn_regressor_shapes_spectral_scale_and_errors():
    model = T.RNNRegressor(hidden=8, recurrent_scale=1.5)
    assert model(torch.zeros(3, 7, 2)).shape == (3,)
    singular = torch.linalg.svdvals(model.rnn.weight_hh_l0.detach())
    torch.testing.assert_close(singular, torch.full((8,), 1.5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(3, 7))


def test_clipping_rescues_an_exploding_rnn():
    x, y = rnn.adding_problem(256, 10, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = T.RNNRegressor(hidden=32)
    torch.manual_seed(0)
    clipped = T.RNNRegressor(hidden=32)
    plain_run = T.train_rnn(plain, x, y, steps=60, lr=0.5, seed=0)
    clip_run = T.train_rnn(clipped, x, y, steps=60, lr=0.5, clip=0.5, seed=0)
    assert not math.isfinite(plain_run.loss[-1]) and plain_run.steps == len(plain_run.loss) < 60  # stopped
    assert len(plain_run.logs["grad_norm"]) == len(plain_run.loss) - 1  # no update after the overflow
    assert all(math.isfinite(v) for v in plain_run.loss[:-1])  # it stopped at the first non-finite loss
    # (the weights themselves may already be lost: the gradient can overflow one step before the loss does)
    norms = clip_run.logs["grad_norm"]
    assert len(clip_run.loss) == len(norms) == 60 and all(math.isfinite(v) for v in clip_run.loss) and max(norms) > 0.5


def test_clipped_sgd_step_records_the_norm_before_clipping_and_clips():
    torch.manual_seed(0)
    model, reference = nn.Linear(3, 1), nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3), 100 * torch.randn(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = T.clipped_sgd_step(opt, clip=0.5)(nn.Sequential(model, nn.Flatten(0)), (x, y))
    torch.nn.functional.mse_loss(reference(x).squeeze(1), y).backward()
    grads = [p.grad for p in reference.parameters()]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 0.5
    for p, q, g in zip(model.parameters(), reference.parameters(), grads):  # one SGD step of length 0.1 * 0.5
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * g * 0.5 / norm, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------- the digits MLP and its training


def test_train_classifier_logs_the_schedule_and_learns():
    split = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = modular.build_model(modular.MLPConfig(width=32, dropout=0.1))
    before = torch.get_rng_state()
    history = T.train_classifier(model, split, epochs=3, lr=1e-2, schedule="warmup_cosine")
    assert torch.equal(torch.get_rng_state(), before)  # dropout drew inside seeded(seed)
    steps = 3 * math.ceil(len(split.y_train) / 64)
    expected = [1e-2 * T.schedule_factor("warmup_cosine", steps, int(0.1 * steps))(t) for t in range(steps)]
    assert history.logs["lr"] == pytest.approx(expected) and len(history.loss) == history.steps == steps
    assert history.epochs == 3 and history.epoch_loss[-1] < history.epoch_loss[0]
    assert history.last("test_acc") > 0.8 and len(history.evals["test_acc"]) == 1
    assert not model.training  # evaluated on the test set, in eval mode
    with pytest.raises(ValueError, match="epochs"):
        T.train_classifier(model, split, epochs=0)


def test_train_classifier_is_reproducible_from_its_seed():
    split = load_digits_split(seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = modular.build_model(modular.MLPConfig(width=16, norm="batch", dropout=0.2))
        runs.append(T.train_classifier(model, split, epochs=1, seed=3).loss)
    assert runs[0] == runs[1]


# ----------------------------------------------------------------- SGD with momentum


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_step_matches_torch_sgd_at_every_step(nesterov):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    opt = torch.optim.SGD([p], lr=0.03, momentum=0.8, nesterov=nesterov)
    w, buf = w0.clone(), None
    for _ in range(20):
        grad = torch.randn(5, generator=gen, dtype=torch.float64)
        p.grad = grad.clone()
        opt.step()
        w, buf = T.momentum_step(w, grad, buf, lr=0.03, momentum=0.8, nesterov=nesterov)
        torch.testing.assert_close(w, p.detach())


def test_heavy_ball_equals_the_buffer_form_only_at_a_constant_rate():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(15, 3, generator=gen, dtype=torch.float64)
    for lrs, same in (([0.1] * 15, True), ([0.1] * 5 + [0.02] * 10, False)):
        w_pt, buf = torch.ones(3, dtype=torch.float64), None
        w_hb, w_prev = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        for grad, lr in zip(grads, lrs):
            w_pt, buf = T.momentum_step(w_pt, grad, buf, lr=lr, momentum=0.9)
            w_hb, w_prev = T.heavy_ball_step(w_hb, w_prev, grad, lr=lr, beta=0.9), w_hb
        assert torch.allclose(w_pt, w_hb, atol=1e-12) == same


def test_momentum_steps_reject_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        T.momentum_step(torch.zeros(3), torch.zeros(2), None, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum"):
        T.momentum_step(torch.zeros(3), torch.zeros(3), None, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="one shape"):
        T.heavy_ball_step(torch.zeros(3), torch.zeros(3), torch.zeros(4), lr=0.1, beta=0.9)


def test_tuned_heavy_ball_has_the_predicted_spectral_radius():
    kappa = 50.0
    tuned = T.tuned_rates(kappa)
    lr, beta = tuned["heavy ball"]
    r_hb = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    assert beta == pytest.approx(r_hb**2) and tuned["plain"] == (pytest.approx(2 / (kappa + 1)), 0.0)
    for lam in torch.linspace(1.0, kappa, 7, dtype=torch.float64):
        m = torch.tensor([[1 + beta - lr * lam.item(), -beta], [1.0, 0.0]], dtype=torch.float64)
        assert torch.linalg.eigvals(m).abs().max().item() == pytest.approx(r_hb, rel=1e-5)
    with pytest.raises(ValueError, match="kappa"):
        T.tuned_rates(0.5)


def test_quadratic_iterations_momentum_beats_plain_by_about_sqrt_kappa():
    kappa = 400.0
    curv = torch.logspace(0, math.log10(kappa), 10, dtype=torch.float64)
    tuned = T.tuned_rates(kappa)
    plain = T.quadratic_iterations(curv, lr=tuned["plain"][0])
    heavy = T.quadratic_iterations(curv, lr=tuned["heavy ball"][0], momentum=tuned["heavy ball"][1])
    assert math.sqrt(kappa) / 2 < plain / heavy <= math.sqrt(kappa) * 1.05
    assert T.quadratic_iterations(torch.ones(3, dtype=torch.float64), lr=1.0) == 1  # exact in one step
    assert T.quadratic_iterations(curv, lr=1e-4, max_steps=50) == 50  # never reached
    with pytest.raises(ValueError, match="positive"):
        T.quadratic_iterations(torch.tensor([1.0, 0.0]), lr=0.1)


# ----------------------------------------------------------------- initialisation


def test_init_std_matches_nn_init_and_rejects_bad_input():
    for scheme, init in (
        ("he", lambda t, g: nn.init.kaiming_normal_(t, nonlinearity="relu", generator=g)),
        ("xavier", lambda t, g: nn.init.xavier_normal_(t, generator=g)),
    ):
        ours = torch.empty(30, 70).normal_(0, T.init_std(70, 30, scheme), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours, init(torch.empty(30, 70), torch.Generator().manual_seed(2)))
    assert T.init_std(100, 100, "lecun") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown scheme"):
        T.init_std(10, 10, "orthogonal")
    with pytest.raises(ValueError, match="fans"):
        T.init_std(0, 10, "he")


def test_activation_stds_follow_the_variance_recursion():
    gen = torch.Generator().manual_seed(0)
    he = T.activation_stds(20, 256, T.init_std(256, 256, "he"), generator=gen)
    xavier = T.activation_stds(20, 256, T.init_std(256, 256, "xavier"), generator=gen)
    assert len(he) == 20 and 0.5 < he[-1] / he[0] < 2.0
    assert xavier[-1] / xavier[0] == pytest.approx(2.0**-9.5, rel=0.5)  # 1/sqrt(2) per ReLU layer, 19 of them
    with pytest.raises(ValueError, match="weight_std"):
        T.activation_stds(3, 8, 0.0)


# ----------------------------------------------------------------- gradient accumulation


def test_accumulate_gradients_equals_the_big_batch_without_batchnorm_only():
    split = load_digits_split(seed=0)
    x, y = split.x_train[:32], split.y_train[:32]
    gaps = {}
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        model = modular.build_model(modular.MLPConfig(width=16, norm=norm))
        model.zero_grad()
        big_loss = nn.functional.cross_entropy(model(x), y)
        big_loss.backward()
        big = T.flat_grad(model)
        loss = T.accumulate_gradients(model, x, y, 4)
        gaps[norm] = ((T.flat_grad(model) - big).norm() / big.norm()).item()
        if norm == "none":
            torch.testing.assert_close(T.flat_grad(model), big)
            assert loss == pytest.approx(big_loss.item(), rel=1e-5)
    assert gaps["batch"] > 0.01
    with pytest.raises(ValueError, match="equal pieces"):
        T.accumulate_gradients(model, x[:30], y[:30], 4)
    with pytest.raises(ValueError, match="equal pieces"):
        T.accumulate_gradients(model, x, y[:16], 2)


def test_flat_grad_fills_missing_gradients_with_zeros():
    model = nn.Linear(3, 2)
    assert torch.equal(T.flat_grad(model), torch.zeros(8))


# ----------------------------------------------------------------- mixed precision


def test_fp16_flush_fraction_hand_values_and_errors():
    grads = torch.tensor([1e-9, 1e-3, 0.0, -2e-9, 0.5])
    assert T.fp16_flush_fraction(grads) == pytest.approx(0.5)  # two of the four non-zero entries flush
    assert T.fp16_flush_fraction(grads, 2.0**16) == 0.0
    with pytest.raises(ValueError, match="scale"):
        T.fp16_flush_fraction(grads, 0.0)
    with pytest.raises(ValueError, match="non-zero"):
        T.fp16_flush_fraction(torch.zeros(3))


def test_dynamic_loss_scaler_skips_backs_off_and_grows_like_grad_scaler():
    torch.manual_seed(0)
    ours_net, ref_net = nn.Linear(4, 1), nn.Linear(4, 1)
    ref_net.load_state_dict(ours_net.state_dict())
    ours_opt = torch.optim.SGD(ours_net.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.1)
    ours = T.DynamicLossScaler(init_scale=2.0**8, growth_interval=2)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    x = torch.randn(8, 6, 4)
    stepped = []
    for t in range(8):
        factor = math.inf if t == 3 else 1.0
        ours_opt.zero_grad()
        (ours.scale * factor * ours_net(x[t]).pow(2).mean()).backward()
        stepped.append(ours.step(ours_opt))
        ref_opt.zero_grad()
        ref.scale(factor * ref_net(x[t]).pow(2).mean()).backward()
        ref.step(ref_opt)
        ref.update()
        assert ours.scale == ref.get_scale()
        for p, q in zip(ours_net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(p, q)
    assert stepped == [True, True, True, False, True, True, True, True]
    assert ours.scale == 2.0**8 * 2 * 0.5 * 2 * 2  # grew at steps 1, 5, 7; halved at 3
    with pytest.raises(ValueError, match="growth_factor"):
        T.DynamicLossScaler(growth_factor=1.0)


def test_train_classifier_with_bfloat16_autocast_and_an_ema():
    split = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = modular.build_model(modular.MLPConfig(width=32))
    ema = T.EMA(model, decay=0.9)
    history = T.train_classifier(model, split, epochs=2, lr=1e-2, autocast_dtype=torch.bfloat16, ema=ema)
    assert ema.updates == history.steps + 1
    assert history.last("test_acc") > 0.8 and history.last("ema_test_acc") > 0.8
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in float32


# ----------------------------------------------------------------- EMA and LayerNorm


def test_ema_matches_averaged_model_and_copies_buffers():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = modular.build_model(modular.MLPConfig(width=8, norm="batch"))
    ours = T.EMA(model, decay=0.8)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(6):
        ours.update(model)
        ref.update_parameters(model)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p, q in zip(ours.module.parameters(), ref.module.parameters()):
        torch.testing.assert_close(p, q)
        assert not p.requires_grad
    assert any(not torch.allclose(p, w) for p, w in zip(ours.module.parameters(), model.parameters()))
    ours.update(model)
    for b, c in zip(ours.module.buffers(), model.buffers()):
        assert torch.equal(b, c)  # the running statistics are copied, not averaged
    with pytest.raises(ValueError, match="decay"):
        T.EMA(model, decay=1.5)


def test_layer_norm_matches_f_layer_norm_and_ignores_the_batch():
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    w, b = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    out = T.layer_norm(x, w, b)
    torch.testing.assert_close(out, nn.functional.layer_norm(x, (10,), w, b))
    torch.testing.assert_close(T.layer_norm(x[:1], w, b), out[:1])
    with pytest.raises(ValueError, match="weight and bias"):
        T.layer_norm(x, w[:5], b[:5])
