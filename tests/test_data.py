import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dlarch_lib.core.data import TensorBatches, digits_arrays, load_digits_split, stratified_split


def test_digits_split_shapes_ranges_and_disjointness():
    split = load_digits_split(val_frac=0.1, test_frac=0.2, seed=0)
    sizes = split.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=2)
    assert split.x_train.shape[1:] == (1, 8, 8) and split.x_train.dtype == torch.float32
    assert 0.0 <= split.x_train.min() and split.x_train.max() <= 1.0
    assert split.y_train.dtype == torch.int64 and split.num_classes == 10


def test_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    train, val, test = stratified_split(labels, 0.1, 0.2, seed=0)
    assert len(set(train) | set(val) | set(test)) == 1000
    assert np.bincount(labels[test]).tolist() == [20] * 10
    again = stratified_split(labels, 0.1, 0.2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))


@pytest.mark.parametrize("val,test", [(-0.1, 0.2), (0.1, 1.0), (0.5, 0.5)])
def test_bad_fractions_are_rejected(val, test):
    with pytest.raises(ValueError, match="frac"):
        stratified_split(np.zeros(10), val, test)


def test_zero_validation_fraction():
    labels = np.repeat(np.arange(2), 10)
    train, val, test = stratified_split(labels, 0.0, 0.5)
    assert len(val) == 0 and len(train) == len(test) == 10


def test_class_subset_and_bad_classes():
    images, labels = digits_arrays(classes=(0, 1))
    assert set(labels.tolist()) == {0, 1} and images.shape[1:] == (8, 8)
    with pytest.raises(ValueError, match="subset of 0..9"):
        digits_arrays(classes=(3, 12))


def test_loaders_batch_shapes():
    split = load_digits_split()
    train, val, test = split.loaders(batch_size=32)
    x, y = next(iter(train))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert torch.equal(torch.cat([b[1] for b in test]), split.y_test)  # evaluation batches in order
    assert [len(b[1]) for b in val] == [min(512, len(split.y_val))]
    with pytest.raises(ValueError, match="batch_size"):
        load_digits_split().loaders(batch_size=0)


def test_tensor_batches_cover_every_row_once_per_pass_in_a_new_seeded_order():
    x, y, z = torch.arange(10.0)[:, None], torch.arange(10), torch.arange(10) * 2
    batches = TensorBatches(x, y, z, batch_size=4, generator=torch.Generator().manual_seed(0))
    first, second = list(batches), list(batches)
    assert len(batches) == 3 and [len(b[1]) for b in first] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in first]).tolist()) == list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) and torch.equal(2 * by, bz) for bx, by, bz in first)  # rows aligned
    assert not torch.equal(torch.cat([b[1] for b in first]), torch.cat([b[1] for b in second]))  # reshuffled
    again = list(TensorBatches(x, y, z, batch_size=4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))  # the generator decides the order
    before = torch.get_rng_state()
    list(batches)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is not drawn from
    with pytest.raises(ValueError, match="one non-zero length"):
        TensorBatches(x, y[:3], batch_size=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(x, y, batch_size=0, generator=torch.Generator())


@pytest.mark.parametrize("n, batch_size", [(10, 4), (12, 4), (1000, 64)])
def test_tensor_batches_like_dataloader_serve_the_dataloaders_batches(n, batch_size):
    # Split.loaders replaced DataLoader(shuffle=True, generator) by device-resident batches: every chapter's
    # training must see the very same batches, epoch after epoch
    x, y = torch.randn(n, 3), torch.arange(n)
    loader = DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=torch.Generator().manual_seed(5))
    ours = TensorBatches(x, y, batch_size=batch_size, generator=torch.Generator().manual_seed(5), like_dataloader=True)
    for _ in range(3):
        expected, got = list(loader), list(ours)
        assert len(expected) == len(got)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    plain = TensorBatches(x, y, batch_size=batch_size, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(next(iter(plain))[1], next(iter(ours))[1])  # the DataLoader's order is a choice
    with pytest.raises(ValueError, match="generator"):
        TensorBatches(x, y, batch_size=4, like_dataloader=True)
