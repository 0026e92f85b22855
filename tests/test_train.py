import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dlarch_lib.data import load_digits_split
from dlarch_lib.train import accuracy, evaluate, fit, make_optimizer


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
