"""Offline datasets as tensors, and the batcher that serves them from the model's device.

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

    def loaders(
        self, batch_size: int = 64, seed: int = 0, device: torch.device | str | None = None
    ) -> tuple[TensorBatches, TensorBatches, TensorBatches]:
        """Train (shuffled, seeded), validation and test batches, with every tensor moved to ``device`` once.

        The training batches are those of ``DataLoader(..., shuffle=True, generator=seeded)``
        (:class:`TensorBatches` with ``like_dataloader=True``); evaluation batches hold 512 rows in order.
        ``device=None`` leaves the tensors where they are.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        moved = [t.to(device) if device is not None else t for t in (self.x_train, self.y_train)]
        val = [t.to(device) if device is not None else t for t in (self.x_val, self.y_val)]
        test = [t.to(device) if device is not None else t for t in (self.x_test, self.y_test)]
        generator = torch.Generator().manual_seed(seed)
        train = TensorBatches(*moved, batch_size=batch_size, generator=generator, like_dataloader=True)
        return train, TensorBatches(*val, batch_size=512), TensorBatches(*test, batch_size=512)


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

    The book's one batcher for data held in tensors: each pass draws one permutation
    ``torch.randperm(N, generator=generator)`` and yields tuples of ``(B, ...)`` slices, one per
    tensor (the last batch may be smaller); without a ``generator`` the rows come in order
    (evaluation). Slicing tensors that already sit on the model's device is much cheaper than
    collating rows through a ``DataLoader``, and it draws from ``generator`` only, never from the
    global generator. With ``like_dataloader=True`` a pass draws from ``generator`` exactly what
    ``DataLoader(TensorDataset(*tensors), batch_size, shuffle=True, generator=generator)`` draws
    (a seed for its workers, the permutation, and the empty tail permutation of its sampler), so
    the batches are the same as that loader's, now on the tensors' device.

    >>> x, y = torch.arange(5.0), torch.arange(5)
    >>> [len(b[0]) for b in TensorBatches(x, y, batch_size=2, generator=torch.Generator().manual_seed(0))]
    [2, 2, 1]
    """

    def __init__(
        self,
        *tensors: torch.Tensor,
        batch_size: int,
        generator: torch.Generator | None = None,
        like_dataloader: bool = False,
    ) -> None:
        if not tensors or len(tensors[0]) == 0 or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError(f"need tensors of one non-zero length, got lengths {[len(t) for t in tensors]}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if like_dataloader and generator is None:
            raise ValueError("like_dataloader=True needs the generator the DataLoader would shuffle with")
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.like_dataloader = like_dataloader

    def __len__(self) -> int:
        """Batches per pass."""
        return -(-len(self.tensors[0]) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = len(self.tensors[0])
        if self.generator is None:
            order = torch.arange(n)
        else:
            if self.like_dataloader:  # DataLoader's iterator draws its workers' base seed first
                torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            order = torch.randperm(n, generator=self.generator)  # (N,) on the CPU
            if self.like_dataloader:  # and RandomSampler draws one more permutation for its empty tail
                torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield tuple(t[idx.to(t.device)] for t in self.tensors)
