"""Language models, two ways: BERT-style masked language modelling with a bidirectional encoder,
GPT-style causal language modelling with a decoder, and sampling with temperature and top-k.

The encoder reuses chapter 6's :class:`~dlarch_lib.attention.TransformerBlock` without the causal
mask; the decoder *is* chapter 6's :class:`~dlarch_lib.attention.GPT`. Character-level data comes from
:mod:`dlarch_lib.core.text` (the Python reference manual in ``pydoc_data.topics``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import rnn
from dlarch_lib.attention import GPT, TransformerBlock
from dlarch_lib.core.text import CharCorpus

IGNORE = -100  # target value of positions that carry no loss (F.cross_entropy's default ignore_index)


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
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, dropout=dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size + 1, bias=False)
        self.head.weight = self.tok.weight  # tied, as in GPT and BERT
        self.apply(GPT._init)
        for block in self.blocks:
            for lin in (block.attn.out_proj, block.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * n_layers))

    def features(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> contextual vectors ``(B, T, d)``.

        ``pad`` (optional, ``(B, T)`` bool, ``True`` = real token, e.g. from
        :func:`~dlarch_lib.attention.padding_mask`) hides padded keys from attention.
        """
        x = GPT.embed_tokens(self, idx)  # (B, T, d): same checks and embeddings as the GPT
        mask = None if pad is None else pad[:, None, :]  # (B, 1, T_k): no causal mask
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, T)`` -> logits over the vocabulary and ``[MASK]`` ``(B, T, V + 1)``."""
        return self.head(self.features(idx, pad))

    @torch.no_grad()
    def embed(self, idx: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Mean-pooled features ``(B, d)`` of unmasked passages ``(B, T)`` (for a linear probe).

        A passage longer than the context is cut into windows of ``context`` characters (``T`` must
        then be a multiple of it); the features of all its windows are averaged.
        """
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
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


@torch.no_grad()
def eval_mlm(model: Encoder, corpus: CharCorpus, *, context: int, windows: int = 128, seed: int = 1234) -> float:
    """MLM loss (nats per *selected* character) on ``windows`` fixed, seeded validation windows."""
    gen = torch.Generator().manual_seed(seed)  # the same windows and the same masks every call
    x, y = mlm_batch(corpus, "val", windows, context, gen)
    device = next(model.parameters()).device
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
) -> dict[str, Any]:
    """Train ``model`` on the MLM objective with AdamW: :func:`dlarch_lib.rnn.train_char_lm`'s loop with the MLM batch, loss and evaluation.

    Returns a dict with ``steps``, ``seconds`` (training time), and the lists ``step``,
    ``train_loss`` (mean since the last record) and ``val_loss`` (:func:`eval_mlm`), in nats per
    selected character.
    """
    return rnn.train_char_lm(
        model,
        corpus,
        steps=steps,
        batch_size=batch_size,
        context=context,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        eval_windows=eval_windows,
        clip_grad_norm=clip_grad_norm,
        progress=progress,
        batch_fn=lambda split, b, t, gen: mlm_batch(corpus, split, b, t, gen),
        loss_fn=lambda m, x, y: mlm_loss(m(x), y),
        eval_fn=lambda m: eval_mlm(m, corpus, context=context, windows=eval_windows),
        desc="MLM",
    )


# ----------------------------------------------------------------------------- sampling (GPT)
def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution a sampler draws from: ``softmax(logits / T)`` restricted to the ``top_k`` largest.

    ``logits`` ``(..., V)`` -> probabilities ``(..., V)``. ``temperature == 0`` means greedy: all mass on
    the argmax. Ties at the k-th value are broken by :func:`torch.topk` (exactly ``k`` entries survive).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    V = logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= V:
        raise ValueError(f"top_k must be in [1, {V}] or None, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), V).float()
    if top_k is not None and top_k < V:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits / temperature, dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of distributions ``(..., V)`` -> ``(...)`` (``0 log 0 = 0``)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1)


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One draw per row from :func:`sampling_probs`: ``logits (B, V)`` -> ids ``(B, 1)``."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, V), got {tuple(logits.shape)}")
    probs = sampling_probs(logits, temperature, top_k)
    if temperature == 0:
        return probs.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Autoregressive sampling from a causal LM with temperature and top-k: ``(B, T) -> (B, T + n)``.

    Like :meth:`dlarch_lib.attention.GPT.generate`, but with ``top_k`` and with ``temperature=0`` (greedy).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.context :])[:, -1]  # (B, V)
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
    model.train(was_training)
    return idx


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
