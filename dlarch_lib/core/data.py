"""Offline datasets as tensors and DataLoaders.

The digits set ships with scikit-learn: 1,797 real handwritten digits, 8x8 pixels,
grey levels 0..16. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class Split:
    """Train/validation/test tensors. Images ``(N, 1, 8, 8)`` in [0, 1]; labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of distinct labels across all parts."""
        return int(torch.cat([self.y_train, self.y_val, self.y_test]).max()) + 1

    def sizes(self) -> dict[str, int]:
        """Number of examples in each part."""
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}

    def loaders(self, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Train (shuffled, seeded), validation and test loaders."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(TensorDataset(self.x_train, self.y_train), batch_size, shuffle=True, generator=generator)
        val = DataLoader(TensorDataset(self.x_val, self.y_val), 512)
        test = DataLoader(TensorDataset(self.x_test, self.y_test), 512)
        return train, val, test


def digits_arrays(classes: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All digits as ``(N, 8, 8)`` float32 images in [0, 1] and ``(N,)`` int64 labels.

    ``classes`` keeps only those digits (labels are left as they are).
    """
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # (N, 8, 8)
    labels = bunch.target.astype(np.int64)  # (N,)
    if classes is not None:
        unknown = set(classes) - set(range(10))
        if unknown or not classes:
            raise ValueError(f"classes must be a non-empty subset of 0..9, got {classes!r}")
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]
    return images, labels


def stratified_split(
    labels: np.ndarray, val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a stratified train/validation/test split of ``labels`` (each class in proportion)."""
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_frac + test_frac >= 1.0:
        raise ValueError(f"val_frac + test_frac must be < 1, got {val_frac} + {test_frac}")
    index = np.arange(len(labels))
    rest, test = (
        (index, index[:0])
        if test_frac == 0
        else train_test_split(index, test_size=test_frac, stratify=labels, random_state=seed)
    )
    if val_frac == 0:
        return np.sort(rest), index[:0], np.sort(test)
    train, val = train_test_split(
        rest, test_size=val_frac / (1.0 - test_frac), stratify=labels[rest], random_state=seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def load_digits_split(
    val_frac: float = 0.1, test_frac: float = 0.2, seed: int = 0, classes: tuple[int, ...] | None = None
) -> Split:
    """The digits as a stratified :class:`Split` of ``(N, 1, 8, 8)`` tensors in [0, 1]."""
    images, labels = digits_arrays(classes)
    train, val, test = stratified_split(labels, val_frac, test_frac, seed)

    def part(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])

    return Split(*part(train), *part(val), *part(test))


class TensorBatches:
    """Mini-batches of the rows of ``tensors``, in a fresh random order on every pass (re-iterable).

    The book's one shuffling batcher for data held in tensors: each pass draws one permutation
    ``torch.randperm(N, generator=generator)`` and yields tuples of ``(B, ...)`` slices, one per
    tensor (the last batch may be smaller). Slicing tensors that already sit on the model's device
    is much cheaper than collating rows through a ``DataLoader``, and it draws from ``generator``
    only, never from the global generator.

    >>> x, y = torch.arange(5.0), torch.arange(5)
    >>> [len(b[0]) for b in TensorBatches(x, y, batch_size=2, generator=torch.Generator().manual_seed(0))]
    [2, 2, 1]
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        if not tensors or len(tensors[0]) == 0 or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError(f"need tensors of one non-zero length, got lengths {[len(t) for t in tensors]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator

    def __len__(self) -> int:
        """Batches per pass."""
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.randperm(len(self.tensors[0]), generator=self.generator)  # (N,) on the CPU
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield tuple(t[idx.to(t.device)] for t in self.tensors)
