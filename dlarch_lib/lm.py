"""Language models, two ways: BERT-style masked language modelling with a bidirectional encoder,
and GPT-style causal language modelling with a decoder; the entropy of a sampler's distribution.

The encoder reuses chapter 6's :class:`~dlarch_lib.attention.TransformerBlock` without the causal
mask; the decoder *is* chapter 6's :class:`~dlarch_lib.attention.GPT`, trained by chapter 5's
:func:`~dlarch_lib.rnn.train_char_lm` and sampled by chapter 5's :func:`~dlarch_lib.rnn.generate`
(temperature and top-k: :func:`~dlarch_lib.rnn.sampling_probs`). The encoder trains through the
book's ``fit`` with :func:`mlm_step`. Character-level data comes from :mod:`dlarch_lib.core.text`
(the Python reference manual in ``pydoc_data.topics``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.attention import GPT, TransformerBlock
from dlarch_lib.core.text import CharCorpus
from dlarch_lib.core.train import History, model_device
from dlarch_lib.distill import IGNORE  # -100: a target that carries no loss (F.cross_entropy's ignore_index)
from dlarch_lib.rnn import train_on_stream


# ----------------------------------------------------------------------------- masking (BERT)
def mask_tokens(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    *,
    p: float = 0.15,
    p_mask: float = 0.8,
    p_random: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: select each position with probability ``p``; of the selected,
    ``p_mask`` become ``mask_id``, ``p_random`` a uniformly random token in ``[0, vocab_size)``,
    and the rest keep their token.

    ``ids`` ``(..., T)`` int64 with values in ``[0, vocab_size)``. Returns ``(inputs, targets)``,
    both shaped like ``ids``: ``targets`` is the original token at selected positions and
    :data:`IGNORE` (-100) elsewhere, so the loss is taken on the selected positions only.
    """
    if ids.dtype != torch.long:
        raise TypeError(f"ids must be int64 token ids, got {ids.dtype}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if p_mask < 0 or p_random < 0 or p_mask + p_random > 1.0:
        raise ValueError(f"need p_mask, p_random >= 0 and p_mask + p_random <= 1, got {p_mask}, {p_random}")
    if vocab_size < 1 or mask_id < vocab_size:
        raise ValueError(f"mask_id ({mask_id}) must be a new id >= vocab_size ({vocab_size} >= 1)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
    u = torch.rand(ids.shape, generator=generator).to(ids.device)  # selection draw
    r = torch.rand(ids.shape, generator=generator).to(ids.device)  # what happens to a selected token
    selected = u < p
    to_mask = selected & (r < p_mask)
    to_random = selected & (r >= p_mask) & (r < p_mask + p_random)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    targets = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return inputs, targets


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the selected positions (``targets != -100``) only.

    ``logits`` ``(B, T, V)``, ``targets`` ``(B, T)``. Raises if no position is selected.
    """
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"need logits (B, T, V) and targets (B, T); got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not bool((targets != IGNORE).any()):
        raise ValueError("no selected position: the MLM loss is undefined")
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


# ----------------------------------------------------------------------------- the encoder (BERT)
class Encoder(nn.Module):
    """A bidirectional Transformer encoder for masked language modelling (BERT layout, tiny).

    Same parts as :class:`~dlarch_lib.attention.GPT` -- token + learned position embeddings, pre-LN
    :class:`~dlarch_lib.attention.TransformerBlock` s, final LayerNorm, tied read-out -- but no causal
    mask: every position attends to every other. The vocabulary gets one extra id, ``mask_id =
    vocab_size``, for ``[MASK]``. ``forward(idx (B, T)) -> logits (B, T, vocab_size + 1)``.
    """

    def __init__(
        self, vocab_size: int, context: int, d_model: int, n_heads: int, n_layers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if vocab_size < 1 or context < 1 or n_layers < 1:
            raise ValueError(f"vocab_size, context and n_layers must be >= 1; got {vocab_size}, {context}, {n_layers}")
        self.vocab_size, self.context, self.mask_id = vocab_size, context, vocab_size
        self.tok = nn.Embedding(vocab_size + 1, d_model)  # + [MASK]
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        blocks = [TransformerBlock(d_model, n_heads, dropout=dropout) for _ in range(n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size + 1, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT and BERT
        self.apply(GPT._init)
        GPT.shrink_residual_projections(blocks)

    def features(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> contextual vectors ``(B, T, d)``.

        ``pad`` (optional, ``(B, T)`` bool, ``True`` = real token, e.g. from
        :func:`~dlarch_lib.attention.padding_mask`) hides padded keys from attention.
        """
        # (B, T, d): the GPT's checks and embeddings; an Encoder has the same tok, pos, drop and context
        x = GPT.embed_tokens(self, idx)  # type: ignore[arg-type]
        mask = None if pad is None else pad[:, None, :]  # (B, 1, T_k): no causal mask
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> logits over the vocabulary and ``[MASK]`` ``(B, T, V + 1)``."""
        return self.head(self.features(idx, pad))

    @torch.no_grad()
    def embed(self, idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Mean-pooled features ``(B, d)`` of unmasked passages ``(B, T)`` (for a linear probe), on the model's device.

        A passage longer than the context is cut into windows of ``context`` characters (``T`` must
        then be a multiple of it); the features of all its windows are averaged.
        """
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        idx = idx.to(model_device(self))
        B, T = idx.shape
        n = 1
        if T > self.context:
            if T % self.context:
                raise ValueError(f"passage length {T} must be <= or a multiple of the context {self.context}")
            n = T // self.context
            idx = idx.reshape(B * n, self.context)  # (B n, context): consecutive windows of each passage
        was_training = self.training
        self.eval()
        out = torch.cat([self.features(chunk).mean(dim=1) for chunk in idx.split(batch_size)])  # (B n, d)
        self.train(was_training)
        return out.reshape(B, n, -1).mean(dim=1)  # (B, d)


def mlm_batch(
    corpus: CharCorpus,
    split: str,
    batch_size: int,
    context: int,
    generator: torch.Generator | None = None,
    **mask_args: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``corpus`` corrupted by :func:`mask_tokens`: ``(inputs, targets)``, each ``(B, T)``."""
    x, _ = corpus.batch(split, batch_size, context, generator)  # (B, T); the next-char targets are unused
    return mask_tokens(x, corpus.vocab_size, corpus.vocab_size, generator=generator, **mask_args)


def mlm_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The masked language model's training step: cross-entropy at the selected positions only.

    ``batch`` is ``(inputs, targets)`` from :func:`mlm_batch`, each ``(B, T)``: corrupted ids, and
    the original id at the ~15% selected positions (-100 elsewhere, no loss). The encoder sees the
    whole window in both directions.
    """
    inputs, targets = batch
    return mlm_loss(model(inputs), targets)  # logits (B, T, V + 1)


@torch.no_grad()
def eval_mlm(model: nn.Module, corpus: CharCorpus, *, context: int, windows: int = 128, seed: int = 1234) -> float:
    """MLM loss (nats per *selected* character) on ``windows`` fixed, seeded validation windows."""
    gen = torch.Generator().manual_seed(seed)  # the same windows and the same masks every call
    x, y = mlm_batch(corpus, "val", windows, context, gen)
    device = model_device(model)
    was_training = model.training
    model.eval()
    logits = model(x.to(device))
    model.train(was_training)
    return mlm_loss(logits.float(), y.to(device)).item()


def train_mlm(
    model: Encoder,
    corpus: CharCorpus,
    *,
    steps: int,
    batch_size: int,
    context: int,
    lr: float,
    seed: int = 0,
    eval_every: int = 100,
    eval_windows: int = 128,
    clip_grad_norm: float = 1.0,
    progress: bool = True,
) -> History:
    """Train ``model`` on the MLM objective: :func:`mlm_step` on fresh :func:`mlm_batch` es, through ``fit``.

    The recipe of :func:`dlarch_lib.rnn.train_char_lm`, :func:`dlarch_lib.rnn.train_on_stream` (AdamW
    without weight decay, gradient clipping, exactly ``steps`` steps, evaluation every ``eval_every``
    steps), with the MLM batch, step and evaluation (:func:`eval_mlm`). Returns the
    :class:`~dlarch_lib.core.train.History`: ``loss`` per step and ``val_loss`` at ``eval_steps``, in
    nats per selected character.
    """
    if min(batch_size, context) < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
    return train_on_stream(
        model,
        lambda gen: mlm_batch(corpus, "train", batch_size, context, gen),  # (B, T), (B, T)
        mlm_step,
        lambda m: {"loss": eval_mlm(m, corpus, context=context, windows=eval_windows)},
        steps=steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        clip_grad_norm=clip_grad_norm,
        progress=progress,
        desc="MLM",
    )


# ----------------------------------------------------------------------------- sampling (GPT)
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of distributions ``(..., V)`` -> ``(...)`` (``0 log 0 = 0``).

    For the distributions :func:`dlarch_lib.rnn.sampling_probs` gives a sampler.
    """
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


# ----------------------------------------------------------------------------- a topic classification task
def topic_passages(
    topics: dict[str, str], names: list[str], length: int, *, train_frac: float = 0.7, per_topic: int | None = None
) -> tuple[list[str], list[int], list[str], list[int]]:
    """Cut each named topic into non-overlapping passages of ``length`` characters; label = topic index.

    The split is by position: the first ``train_frac`` of each topic's text gives training passages,
    the rest test passages, so no test passage overlaps a training one. ``per_topic`` caps the number
    of training passages per topic (and the test passages at ``per_topic`` as well).
    Returns ``(train_texts, train_labels, test_texts, test_labels)``.
    """
    if length < 1 or not 0.0 < train_frac < 1.0:
        raise ValueError(f"need length >= 1 and train_frac in (0, 1), got {length}, {train_frac}")
    missing = [n for n in names if n not in topics]
    if missing:
        raise ValueError(f"unknown topics: {missing}")
    out: tuple[list[str], list[int], list[str], list[int]] = ([], [], [], [])
    for label, name in enumerate(names):
        text = topics[name]
        cut = int(len(text) * train_frac)
        for part, (texts, labels) in ((text[:cut], out[:2]), (text[cut:], out[2:])):
            chunks = [part[i : i + length] for i in range(0, len(part) - length + 1, length)]
            if per_topic is not None:
                chunks = chunks[:per_topic]
            if not chunks:
                raise ValueError(f"topic {name!r} is too short for passages of {length} characters")
            texts.extend(chunks)
            labels.extend([label] * len(chunks))
    return out


def char_counts(texts: list[str], vocab: list[str]) -> torch.Tensor:
    """Bag of characters: ``(N, len(vocab))`` counts of each vocabulary character in each text."""
    index = {c: i for i, c in enumerate(vocab)}
    out = torch.zeros(len(texts), len(vocab))
    for row, t in enumerate(texts):
        for c in t:
            if c not in index:
                raise ValueError(f"character {c!r} is not in the vocabulary")
            out[row, index[c]] += 1
    return out
