"""Character-level text that ships with Python: the reference manual in ``pydoc_data.topics``.

About 465k characters of the Python language reference (the exact size depends on the
Python version, so chapters print it). Nothing is downloaded.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch


def python_reference_text() -> str:
    """The text of every topic of ``pydoc_data.topics``, joined in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class CharCorpus:
    """A text encoded as character ids with a 90/10 train/validation split."""

    vocab: list[str]  # id -> character
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Characters -> ids ``(len(text),)``; unknown characters are an error."""
        index = {c: i for i, c in enumerate(self.vocab)}
        missing = sorted(set(text) - set(index))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {missing[:10]}")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids -> text."""
        return "".join(self.vocab[int(i)] for i in ids)

    def batch(
        self, split: str, batch_size: int, context: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``(B, T)`` and next-character targets ``(B, T)``."""
        data = {"train": self.train, "val": self.val}.get(split)
        if data is None:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if context >= len(data):
            raise ValueError(f"context {context} is longer than the {split} text ({len(data)})")
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)  # (B,)
        offsets = torch.arange(context)  # (T,)
        x = data[starts[:, None] + offsets]  # (B, T)
        y = data[starts[:, None] + offsets + 1]  # (B, T)
        return x, y


def char_corpus(text: str | None = None, val_frac: float = 0.1, max_chars: int | None = None) -> CharCorpus:
    """Encode ``text`` (default: the Python reference) and split it: first 90% train, last 10% validation."""
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    text = python_reference_text() if text is None else text
    if max_chars is not None:
        text = text[:max_chars]
    if len(text) < 10:
        raise ValueError("text too short to split")
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)  # (N,)
    cut = int(len(ids) * (1.0 - val_frac))
    return CharCorpus(vocab, ids[:cut], ids[cut:])


def unigram_nats(corpus: CharCorpus) -> float:
    """Validation cross-entropy (nats/char) of add-one-smoothed character frequencies from train."""
    counts = torch.bincount(corpus.train, minlength=corpus.vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return -logp[corpus.val].mean().item()


def bigram_nats(corpus: CharCorpus, alpha: float = 1.0) -> float:
    """Validation cross-entropy (nats/char) of an add-``alpha`` bigram model fitted on train."""
    v = corpus.vocab_size
    pairs = corpus.train[:-1] * v + corpus.train[1:]
    counts = torch.bincount(pairs, minlength=v * v).double().view(v, v) + alpha  # (V, V)
    logp = torch.log(counts / counts.sum(dim=1, keepdim=True))
    return -logp[corpus.val[:-1], corpus.val[1:]].mean().item()


def entropy_nats(text: str) -> float:
    """Empirical character entropy of ``text`` in nats (a unigram lower bound on that text)."""
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log(c / n) for c in counts.values())
