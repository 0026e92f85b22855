import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dlarch_lib.core.data import load_digits_split
from dlarch_lib.core.train import accuracy, evaluate, fit, make_optimizer


def test_accuracy_and_shape_errors():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="expected logits"):
        accuracy(logits, torch.tensor([0, 1]))


def test_fit_learns_digits_with_a_linear_model():
    torch.manual_seed(0)
    split = load_digits_split()
    train, val, test = split.loaders(batch_size=64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    history = fit(model, train, epochs=15, lr=0.01, val_loader=val, progress=False)
    assert history.epochs == 15 and history.steps == 15 * math.ceil(split.sizes()["train"] / 64)
    assert history.train_loss[-1] < history.train_loss[0]
    assert evaluate(model, test)["acc"] > 0.9


def test_fit_stops_on_its_epoch_count_not_a_clock():
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    history = fit(nn.Linear(4, 2), DataLoader(data, 8), epochs=3, progress=False)
    assert history.epochs == 3 and history.steps == 3 * 8 and history.seconds >= 0
    with pytest.raises(TypeError, match="max_seconds"):  # no wall-clock budget: results must not depend on load
        fit(nn.Linear(4, 2), DataLoader(data, 8), epochs=1, max_seconds=1.0, progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(nn.Linear(2, 2), "rmsprop", 0.1)
    with pytest.raises(ValueError, match="epochs"):
        fit(nn.Linear(2, 2), DataLoader(TensorDataset(torch.randn(2, 2), torch.zeros(2).long())), epochs=0)
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(nn.Linear(2, 2), DataLoader(TensorDataset(torch.randn(0, 2), torch.zeros(0).long())))


def test_optimizers_by_name():
    model = nn.Linear(2, 2)
    assert isinstance(make_optimizer(model, "sgd", 0.1), torch.optim.SGD)
    assert isinstance(make_optimizer(model, "adamw", 0.1, 0.01), torch.optim.AdamW)


def _hand_loop(model, loader, epochs, lr):
    """The textbook loop, written out: the engine must match it exactly."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def test_fit_equals_the_hand_written_loop_and_weights_epoch_means_by_batch_size():
    data = TensorDataset(torch.randn(50, 4), torch.randint(0, 3, (50,)))
    loader = DataLoader(data, batch_size=16)  # 16, 16, 16, 2: unequal batches
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    torch.manual_seed(0)
    b = nn.Linear(4, 3)
    history = fit(a, loader, epochs=2, lr=0.05, progress=False)
    _hand_loop(b, loader, epochs=2, lr=0.05)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    sizes = [16, 16, 16, 2]
    expected = sum(loss * n for loss, n in zip(history.loss[4:], sizes)) / 50
    assert history.epoch_loss[1] == pytest.approx(expected)
    assert history.epoch_loss[1] != pytest.approx(sum(history.loss[4:]) / 4)  # an unweighted mean differs


def test_fit_by_steps_on_an_endless_stream_with_evaluation_and_scheduler():
    def stream():
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randn(8, 2, generator=g)
            yield x, (x[:, 0] > 0).long()

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    calls = []
    history = fit(
        model,
        stream(),
        steps=25,
        optimizer=opt,
        scheduler=sched,
        eval_every=10,
        evaluate=lambda m: calls.append(m.training) or {"w": m.weight.norm()},
        progress=False,
    )
    assert history.steps == 25 and len(history.loss) == 25 and history.epochs == 0
    assert history.eval_steps == [10, 20] and len(history.evals["w"]) == 2
    assert calls == [False, False]  # evaluation runs in eval mode
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.1**2)  # stepped once per step


def test_fit_with_a_step_that_optimises_itself_and_an_early_stop():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(m, batch):
        (x,) = batch
        loss = (m(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "norm": m.weight.norm()}

    data = [(torch.ones(4, 2),)] * 5
    history = fit(model, data, step, epochs=10, optimizer=None, stop=lambda h: h.loss[-1] < 1e-3, progress=False)
    assert history.steps < 50 and history.loss[-1] < 1e-3 and len(history.logs["norm"]) == history.steps
    with pytest.raises(ValueError, match="no loss tensor"):
        fit(model, data, lambda m, b: {"n": 1.0}, epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs=, steps="):
        fit(model, data, step)


def test_fit_draws_nothing_from_a_loaders_generator_beyond_its_passes():
    """Two epochs shuffle exactly as two passes of the hand-written loop over the same loader."""
    data = TensorDataset(torch.arange(12.0).unsqueeze(1), torch.zeros(12).long())
    seen = []

    def record(model, batch):
        seen.append(batch[0].squeeze(1).tolist())
        return model(batch[0]).sum()

    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    fit(nn.Linear(1, 2), loader, record, epochs=2, progress=False)
    loader = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    expected = [x.squeeze(1).tolist() for _ in range(2) for x, _ in loader]
    assert seen == expected
