"""Encoder-decoder models for sequences: a digit-reversal task, a fixed-vector (bottleneck)
GRU encoder-decoder, the same model with attention over the encoder states, a Transformer
encoder-decoder, decoding by greedy search, beam search and top-k / nucleus sampling, and
label smoothing.

- :func:`make_reversal_batch` draws a seeded batch of the task "reverse a digit string",
  tokenised with ``PAD``/``BOS``/``EOS`` and padded (:func:`pad_sequences`).
- :class:`BottleneckSeq2Seq` (Sutskever et al., 2014; Cho et al., 2014) hands the decoder one
  vector, the encoder's final state. :class:`AttentionSeq2Seq` (Bahdanau et al., 2015;
  Luong et al., 2015) lets every decoder step attend to all encoder states. Both have exactly
  the same parameters; only the way the context vector is formed differs.
- :func:`teacher_forcing_step` (the training step), :func:`train_seq2seq` (it through the book's
  ``fit``), :func:`exact_match`, :func:`accuracy_by_length` and :func:`anti_diagonal_mass` (how
  close an attention map is to the reversal alignment).
- :func:`greedy_search`, :func:`beam_search` and :func:`exhaustive_search` work on any
  ``step_fn(prefixes) -> log-probs``; :meth:`Seq2Seq.step_fn` makes one from a trained model
  and a source sequence, :func:`step_fn_from_table` from a hand-written distribution.
- :class:`TransformerSeq2Seq` (Vaswani et al., 2017): :class:`EncoderLayer` and
  :class:`DecoderLayer` (causal self-attention, cross-attention to the memory, MLP; post-LN or
  pre-LN) stacked by :class:`TransformerEncoderDecoder`, which loads and equals ``nn.Transformer``.
- :meth:`EncoderDecoder.sample_decode` draws from :func:`truncated_probs` (top-k, Fan et al.,
  2018; nucleus, Holtzman et al., 2020). :func:`label_smoothed_cross_entropy` and
  :func:`label_smoothing_step` (Szegedy et al., 2016); :func:`max_probs` measures confidence.

Shapes: B batch, S source length, T target length, V vocabulary, E embedding, H hidden size,
K beams. Training, evaluation and decoding run on the model's device.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlarch_lib.attention import (
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positions,
)
from dlarch_lib.core.train import History, Step, fit, model_device
from dlarch_lib.rnn import sampling_probs

PAD, BOS, EOS = 0, 1, 2
DIGIT0 = 3  # token id of the digit "0"; "9" is 12
VOCAB_SIZE = DIGIT0 + 10

StepFn = Callable[[torch.Tensor], torch.Tensor]  # prefixes (K, t) -> next-token log-probs (K, V)


# --- the task: tokens, padding, batches -------------------------------------------------------


def encode_digits(s: str) -> list[int]:
    """``"307"`` -> ``[6, 3, 10]``: one token per digit (no BOS/EOS)."""
    if not s.isdigit() or not s.isascii():
        raise ValueError(f"expected a non-empty string of digits 0-9, got {s!r}")
    return [DIGIT0 + int(c) for c in s]


def decode_tokens(ids: Sequence[int] | torch.Tensor) -> str:
    """Token ids -> digit string; skips ``BOS``/``PAD`` and stops at the first ``EOS``."""
    out = []
    for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
        if i == EOS:
            break
        if i >= DIGIT0:
            out.append(str(i - DIGIT0))
        elif i not in (PAD, BOS):
            raise ValueError(f"unknown token id {i}")
    return "".join(out)


def pad_sequences(seqs: Sequence[Sequence[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(B, max_len)`` and return it with the lengths ``(B,)``."""
    if len(seqs) == 0 or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_sequences needs at least one sequence and no empty ones")
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out, lengths


class Batch(NamedTuple):
    """A padded batch. ``tgt_in = [BOS] + y`` is fed to the decoder, ``tgt_out = y + [EOS]`` is predicted."""

    src: torch.Tensor  # (B, S) source tokens, PAD after src_lengths
    src_lengths: torch.Tensor  # (B,)
    tgt_in: torch.Tensor  # (B, T) decoder inputs
    tgt_out: torch.Tensor  # (B, T) targets, PAD where there is no token


def make_batch(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> Batch:
    """Tokenised pairs (without BOS/EOS) -> a padded :class:`Batch`."""
    if len(sources) != len(targets):
        raise ValueError(f"got {len(sources)} sources but {len(targets)} targets")
    src, src_lengths = pad_sequences(sources)
    tgt_in, _ = pad_sequences([[BOS, *t] for t in targets])
    tgt_out, _ = pad_sequences([[*t, EOS] for t in targets])
    return Batch(src, src_lengths, tgt_in, tgt_out)


def make_reversal_batch(n: int, min_len: int, max_len: int, generator: torch.Generator) -> Batch:
    """``n`` random digit strings of length uniform in ``[min_len, max_len]`` and their reversals."""
    if n < 1 or not 1 <= min_len <= max_len:
        raise ValueError(f"need n >= 1 and 1 <= min_len <= max_len, got n={n}, min_len={min_len}, max_len={max_len}")
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)  # (n,)
    digits = torch.randint(0, 10, (n, max_len), generator=generator) + DIGIT0  # (n, max_len)
    t = torch.arange(max_len)[None, :]  # (1, max_len)
    real = t < lengths[:, None]  # (n, max_len): True at the real tokens
    src = digits.masked_fill(~real, PAD)
    rev = src.gather(1, (lengths[:, None] - 1 - t).clamp(min=0)).masked_fill(~real, PAD)  # y_t = x_{L-1-t}
    pad = torch.full((n, 1), PAD)
    tgt_out = torch.cat([rev, pad], dim=1).scatter(1, lengths[:, None], EOS)  # y + [EOS]
    tgt_in = torch.cat([torch.full((n, 1), BOS), rev], dim=1)  # [BOS] + y
    width = int(lengths.max())  # trim to the longest string in the batch
    return Batch(src[:, :width], lengths, tgt_in[:, : width + 1], tgt_out[:, : width + 1])


# --- sampling: top-k and nucleus (top-p) truncation ------------------------------------------


def truncated_probs(
    logits: torch.Tensor, *, top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """The distribution a sampler draws from: ``softmax(logits / T)``, truncated, renormalised: ``(..., V)``.

    ``top_k`` keeps the ``k`` most probable tokens (:func:`dlarch_lib.rnn.sampling_probs`, which
    also applies the temperature; ``temperature=0`` is greedy). ``top_p`` then keeps the *nucleus*
    (Holtzman et al., 2020): the most probable tokens, in decreasing order, up to and including
    the first one at which their mass reaches ``p`` -- the smallest set with mass ``>= p``.
    ``top_p=1`` keeps every token of positive probability.
    """
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = sampling_probs(logits, temperature, top_k)  # (..., V) float32, top-k applied
    if top_p is not None:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (..., V)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more probable tokens
        keep_sorted = before < top_p  # the first token that reaches p is kept, the rest are not
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


# --- what every encoder-decoder here can do: greedy and sampled decoding ----------------------


class EncoderDecoder(nn.Module):
    """Base of the chapter's models: ``forward(src, src_lengths, tgt_in) -> logits (B, T, V)``.

    A subclass supplies :meth:`_stepper`, which encodes a batch once and returns a function from
    the prefixes decoded so far ``(B, t)`` to the next-token logits ``(B, V)``; greedy and sampled
    decoding are the same loop with a different choice of token.
    """

    def _stepper(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def _decode_loop(
        self,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        max_len: int,
        choose: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Decode from ``BOS``, ``choose(logits (B, V)) -> tokens (B,)``: ``(B, <= max_len)``, PAD after EOS."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        device = model_device(self)
        src, src_lengths = src.to(device), src_lengths.to(device)
        next_logits = self._stepper(src, src_lengths)
        B = src.shape[0]
        y = torch.full((B, 1), BOS, dtype=torch.long, device=device)  # (B, t): the prefixes so far
        done, out = torch.zeros(B, dtype=torch.bool, device=device), []
        for _ in range(max_len):
            tok = choose(next_logits(y))  # (B,)
            out.append(tok.masked_fill(done, PAD))
            done |= tok == EOS
            y = torch.cat([y, tok[:, None]], dim=1)
            if done.all():
                break
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, src_lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Pick the most likely token at every step: ``(B, <= max_len)`` tokens, ``PAD`` after ``EOS``.

        It stops early once every row has emitted ``EOS``. Runs (and returns) on the model's device.
        """
        return self._decode_loop(src, src_lengths, max_len, lambda logits: logits.argmax(-1))

    @torch.no_grad()
    def sample_decode(
        self,
        src: torch.Tensor,
        src_lengths: torch.Tensor,
        max_len: int,
        *,
        generator: torch.Generator,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Draw every token from :func:`truncated_probs` (top-k and/or nucleus): like :meth:`greedy_decode`.

        The draws use ``generator``, a CPU generator, so a seed gives the same samples on any
        device. The model runs in its current mode (call ``eval()`` first).
        """
        if generator.device.type != "cpu":
            raise ValueError(f"sample_decode draws on the CPU; pass a CPU generator, got one on {generator.device}")

        def choose(logits: torch.Tensor) -> torch.Tensor:
            probs = truncated_probs(logits, top_k=top_k, top_p=top_p, temperature=temperature).cpu()  # (B, V)
            return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)  # (B,)

        return self._decode_loop(src, src_lengths, max_len, choose)


# --- the models -----------------------------------------------------------------------------


class Seq2Seq(EncoderDecoder):
    """GRU encoder-decoder; subclasses say how the context ``c_t`` is formed (:meth:`context`).

    Encoder: embedding, then a bidirectional GRU with ``H/2`` units per direction, giving the
    memory ``m_1..m_S`` (each ``H``) and the final state ``h_S = [fwd_S; bwd_1]``.
    Decoder: a GRU started at ``h_S`` reads ``y_{t-1}``; its state ``s_t`` and a context ``c_t``
    give ``p(y_t | y_<t, x) = softmax(W_out tanh(W_c [c_t; s_t]))``.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, emb: int = 32, hidden: int = 64) -> None:
        super().__init__()
        if vocab_size <= DIGIT0 or emb < 1 or hidden < 2 or hidden % 2:
            raise ValueError(
                f"need vocab_size > {DIGIT0}, emb >= 1 and an even hidden >= 2; got {vocab_size}, {emb}, {hidden}"
            )
        self.vocab_size, self.hidden = vocab_size, hidden
        self.embed = nn.Embedding(vocab_size, emb, padding_idx=PAD)  # shared by encoder and decoder
        self.encoder = nn.GRU(emb, hidden // 2, batch_first=True, bidirectional=True)
        self.decoder = nn.GRU(emb, hidden, batch_first=True)
        self.context_proj = nn.Linear(hidden, hidden, bias=False)  # bottleneck: W h_S; attention: query W s_t
        self.combine = nn.Linear(2 * hidden, hidden)  # W_c
        self.out = nn.Linear(hidden, vocab_size)  # W_out

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``src (B, S)``, lengths ``(B,)`` -> memory ``(B, S, H)`` (zeros at padding), final state ``(B, H)``."""
        if src.ndim != 2 or src_lengths.shape != (src.shape[0],):
            raise ValueError(
                f"expected src (B, S) and src_lengths (B,), got {tuple(src.shape)} and {tuple(src_lengths.shape)}"
            )
        if int(src_lengths.min()) < 1 or int(src_lengths.max()) > src.shape[1]:
            raise ValueError(f"src_lengths must lie in [1, {src.shape[1]}]")
        packed = pack_padded_sequence(self.embed(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.encoder(packed)  # h_n (2, B, H/2): last forward state, first backward state
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, H)
        return memory, torch.cat([h_n[0], h_n[1]], dim=-1)  # (B, H)

    def context(
        self, states: torch.Tensor, memory: torch.Tensor, src_lengths: torch.Tensor, final: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context vectors ``(B, T, H)`` for decoder states ``(B, T, H)``, and attention weights or None."""
        raise NotImplementedError

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_lengths: torch.Tensor,
        final: torch.Tensor,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the decoder over ``tgt_in (B, T)`` from ``state (B, H)`` (default: the encoder's ``final``).

        Returns logits ``(B, T, V)``, the last decoder state ``(B, H)`` and the attention
        weights ``(B, T, S)`` (None for the bottleneck model).
        """
        if tgt_in.ndim != 2 or tgt_in.shape[0] != memory.shape[0]:
            raise ValueError(f"tgt_in must be (B, T) with B = {memory.shape[0]}, got {tuple(tgt_in.shape)}")
        h0 = final if state is None else state
        states, h_last = self.decoder(self.embed(tgt_in), h0[None].contiguous())  # (B, T, H), (1, B, H)
        ctx, weights = self.context(states, memory, src_lengths, final)  # (B, T, H)
        logits = self.out(torch.tanh(self.combine(torch.cat([ctx, states], dim=-1))))  # (B, T, V)
        return logits, h_last[0], weights

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``src (B, S)``, ``src_lengths (B,)``, ``tgt_in (B, T)`` -> logits ``(B, T, V)``."""
        memory, final = self.encode(src, src_lengths)
        return self.decode(tgt_in, memory, src_lengths, final)[0]

    def _stepper(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Encode once; the closure reads only the newest token of each prefix, carrying the GRU state."""
        memory, final = self.encode(src, src_lengths)
        state = final

        def next_logits(prefixes: torch.Tensor) -> torch.Tensor:  # (B, t) -> (B, V)
            nonlocal state
            logits, state, _ = self.decode(prefixes[:, -1:], memory, src_lengths, final, state)  # one step: T = 1
            return logits[:, -1]

        return next_logits

    @torch.no_grad()
    def attention_map(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, T, S)`` while reading ``tgt_in`` (raises for the bottleneck model).

        Runs (and returns) on the model's device.
        """
        device = model_device(self)
        src, src_lengths, tgt_in = src.to(device), src_lengths.to(device), tgt_in.to(device)
        memory, final = self.encode(src, src_lengths)
        weights = self.decode(tgt_in, memory, src_lengths, final)[2]
        if weights is None:
            raise ValueError(f"{type(self).__name__} has no attention")
        return weights

    @torch.no_grad()
    def step_fn(self, src: torch.Tensor, src_length: int) -> StepFn:
        """A ``step_fn`` for :func:`beam_search` on one source ``src (S,)``.

        It maps prefixes ``(K, t)`` (each starting with ``BOS``) to next-token log-probs ``(K, V)``
        by re-reading the prefix with the decoder (simple, and cheap for short outputs). The model
        runs on its device; the log-probs come back on the device of the prefixes.
        """
        if src.ndim != 1:
            raise ValueError(f"step_fn takes one source sequence (S,), got shape {tuple(src.shape)}")
        device = model_device(self)
        lengths = torch.tensor([src_length], device=device)
        memory, final = self.encode(src[None].to(device), lengths)  # (1, S, H), (1, H)

        @torch.no_grad()
        def fn(prefixes: torch.Tensor) -> torch.Tensor:
            K = prefixes.shape[0]
            memory_k, lengths_k, final_k = memory.expand(K, -1, -1), lengths.expand(K), final.expand(K, -1)
            logits = self.decode(prefixes.to(device), memory_k, lengths_k, final_k)[0]  # (K, t, V)
            return F.log_softmax(logits[:, -1], dim=-1).to(prefixes.device)  # (K, V)

        return fn


class BottleneckSeq2Seq(Seq2Seq):
    """The fixed-vector encoder-decoder: every step sees the same context ``c = W h_S``."""

    def context(self, states, memory, src_lengths, final):
        return self.context_proj(final)[:, None].expand_as(states), None  # (B, T, H)


class AttentionSeq2Seq(Seq2Seq):
    """Encoder-decoder with attention: ``c_t = sum_j a_tj m_j``, ``a_t = softmax((W s_t) . m_j / sqrt(H))``.

    Luong et al.'s "general" score, computed by the library's scaled dot-product attention with
    padded source positions masked out.
    """

    def context(self, states, memory, src_lengths, final):
        mask = padding_mask(src_lengths, memory.shape[1])[:, None, :]  # (B, 1, S): True = real token
        return scaled_dot_product_attention(self.context_proj(states), memory, memory, mask)  # (B,T,H), (B,T,S)


# --- the Transformer encoder-decoder --------------------------------------------------------


def _attend(attn: MultiHeadAttention, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return cast(torch.Tensor, attn(q, kv, kv, mask))  # (B, T_q, d)


class EncoderLayer(nn.Module):
    """A Transformer encoder layer: self-attention, then a ReLU MLP, each a residual branch.

    Post-LN (``norm_first=False``; Vaswani et al., 2017): ``x = LN(x + SA(x))``, ``x = LN(x + MLP(x))``.
    Pre-LN (``norm_first=True``): ``x = x + SA(LN(x))``, ``x = x + MLP(LN(x))``. Sub-module names
    follow ``nn.TransformerEncoderLayer``; there is no dropout. ``mask`` (bool, True = attend) is
    the source padding mask ``(B, 1, S)``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm_first: bool = False) -> None:
        super().__init__()
        if d_ff < 1:
            raise ValueError(f"d_ff must be >= 1, got {d_ff}")
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The position-wise MLP ``W_2 relu(W_1 x + b_1) + b_2``: ``(B, T, d) -> (B, T, d)``."""
        return self.linear2(F.relu(self.linear1(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, S, d) -> (B, S, d)``."""
        if self.norm_first:
            h = self.norm1(x)
            x = x + _attend(self.self_attn, h, h, mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + _attend(self.self_attn, x, x, mask))
        return self.norm2(x + self.mlp(x))


class DecoderLayer(nn.Module):
    """A Transformer decoder layer: causal self-attention, cross-attention to the memory, a ReLU MLP.

    Post-LN: ``y = LN(y + SA(y))``, ``y = LN(y + CA(y, m))``, ``y = LN(y + MLP(y))``; pre-LN
    normalises the input of each branch instead. The queries of the cross-attention come from the
    decoder, its keys and values from the encoder's memory ``m``. Sub-module names follow
    ``nn.TransformerDecoderLayer`` (``multihead_attn`` is the cross-attention).
    """

    last_weights: torch.Tensor  # (B, h, T, S): the cross-attention weights of the last call

    def __init__(self, d_model: int, n_heads: int, d_ff: int, norm_first: bool = False) -> None:
        super().__init__()
        if d_ff < 1:
            raise ValueError(f"d_ff must be >= 1, got {d_ff}")
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.multihead_attn = MultiHeadAttention(d_model, n_heads)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def mlp(self, y: torch.Tensor) -> torch.Tensor:
        """The position-wise MLP: ``(B, T, d) -> (B, T, d)``."""
        return self.linear2(F.relu(self.linear1(y)))

    def cross(self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention: queries ``y (B, T, d)``, keys and values ``memory (B, S, d)``; weights ``(B, h, T, S)``."""
        out, weights = self.multihead_attn(y, memory, memory, memory_mask, return_weights=True)
        self.last_weights = weights.detach()  # kept for attention maps
        return cast(torch.Tensor, out)

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y (B, T, d)``, ``memory (B, S, d)`` -> ``(B, T, d)``; ``tgt_mask (T, T)``, ``memory_mask (B, 1, S)``."""
        if self.norm_first:
            h = self.norm1(y)
            y = y + _attend(self.self_attn, h, h, tgt_mask)
            y = y + self.cross(self.norm2(y), memory, memory_mask)
            return y + self.mlp(self.norm3(y))
        y = self.norm1(y + _attend(self.self_attn, y, y, tgt_mask))
        y = self.norm2(y + self.cross(y, memory, memory_mask))
        return self.norm3(y + self.mlp(y))


class TransformerEncoderDecoder(nn.Module):
    """The Transformer's encoder-decoder stack on embedded sequences, laid out like ``nn.Transformer``.

    ``n_layers`` :class:`EncoderLayer` then a LayerNorm give the memory; ``n_layers``
    :class:`DecoderLayer`, each with cross-attention to that memory, then a LayerNorm give the
    decoder's output. Masks are bool with True = attend (the opposite of ``nn.Transformer``'s).
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, d_ff: int, norm_first: bool = False) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.encoder_layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, norm_first) for _ in range(n_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(d_model, n_heads, d_ff, norm_first) for _ in range(n_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def encode(self, x: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded source ``(B, S, d)`` -> memory ``(B, S, d)``; ``src_mask (B, 1, S)``."""
        for layer in self.encoder_layers:
            x = layer(x, src_mask)
        return self.encoder_norm(x)

    def decode(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embedded target ``(B, T, d)`` and memory ``(B, S, d)`` -> ``(B, T, d)``."""
        for layer in self.decoder_layers:
            y = layer(y, memory, tgt_mask, memory_mask)
        return self.decoder_norm(y)

    def forward(
        self,
        src: torch.Tensor,
        tgt: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``src (B, S, d)``, ``tgt (B, T, d)`` -> ``(B, T, d)``; ``src_mask`` masks padded keys in both stacks."""
        return self.decode(tgt, self.encode(src, src_mask), tgt_mask, src_mask)

    @torch.no_grad()
    def load_from_torch(self, ref: nn.Transformer) -> TransformerEncoderDecoder:
        """Copy the weights of an ``nn.Transformer`` of the same shape (returns ``self``)."""
        ref_enc, ref_dec = cast(nn.TransformerEncoder, ref.encoder), cast(nn.TransformerDecoder, ref.decoder)
        if len(ref_enc.layers) != len(self.encoder_layers) or len(ref_dec.layers) != len(self.decoder_layers):
            raise ValueError(
                f"layer counts differ: torch has {len(ref_enc.layers)} + {len(ref_dec.layers)}, "
                f"this one {len(self.encoder_layers)} + {len(self.decoder_layers)}"
            )
        pairs: list[tuple[nn.Module, nn.Module]] = [
            *zip(self.encoder_layers, ref_enc.layers),
            *zip(self.decoder_layers, ref_dec.layers),
        ]
        for mine, theirs in pairs:
            if mine.norm_first != theirs.norm_first:
                raise ValueError(f"norm_first differs: torch {theirs.norm_first}, this one {mine.norm_first}")
            for name, child in mine.named_children():
                if isinstance(child, MultiHeadAttention):
                    child.load_from_torch(getattr(theirs, name))
                else:
                    child.load_state_dict(getattr(theirs, name).state_dict())
        assert ref_enc.norm is not None and ref_dec.norm is not None  # nn.Transformer always has both
        self.encoder_norm.load_state_dict(ref_enc.norm.state_dict())
        self.decoder_norm.load_state_dict(ref_dec.norm.state_dict())
        return self


class TransformerSeq2Seq(EncoderDecoder):
    """A Transformer encoder-decoder for the reversal task (Vaswani et al., 2017), no dropout.

    Tokens are embedded (one table for source and target, scaled by ``sqrt(d)``) and added to
    sinusoidal positions; :class:`TransformerEncoderDecoder` maps them to decoder outputs, and a
    linear layer to next-token logits. Padded source positions are masked as keys everywhere;
    the decoder's self-attention is causal. ``max_len`` bounds both sequence lengths.
    """

    positions: torch.Tensor  # (max_len, d) sinusoidal encodings, a buffer

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        d_ff: int = 128,
        norm_first: bool = True,
        max_len: int = 64,
    ) -> None:
        super().__init__()
        if vocab_size <= DIGIT0 or max_len < 2:
            raise ValueError(f"need vocab_size > {DIGIT0} and max_len >= 2, got {vocab_size} and {max_len}")
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)  # sqrt(d) * embedding: entries of variance 1
        with torch.no_grad():
            self.embed.weight[PAD] = 0.0
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.transformer = TransformerEncoderDecoder(d_model, n_heads, n_layers, d_ff, norm_first)
        self.out = nn.Linear(d_model, vocab_size)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> ``sqrt(d) * embedding + position`` ``(B, T, d)``."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"expected token ids (B, T) with T <= {self.max_len}, got shape {tuple(tokens.shape)}")
        return self.embed(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.shape[1]]

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``src (B, S)``, lengths ``(B,)`` -> memory ``(B, S, d)`` and the key mask ``(B, 1, S)`` (True = real)."""
        if src.ndim != 2 or src_lengths.shape != (src.shape[0],):
            raise ValueError(
                f"expected src (B, S) and src_lengths (B,), got {tuple(src.shape)} and {tuple(src_lengths.shape)}"
            )
        if int(src_lengths.min()) < 1 or int(src_lengths.max()) > src.shape[1]:
            raise ValueError(f"src_lengths must lie in [1, {src.shape[1]}]")
        mask = padding_mask(src_lengths, src.shape[1])[:, None, :]  # (B, 1, S)
        return self.transformer.encode(self.embed_tokens(src), mask), mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder inputs ``(B, T)``, memory ``(B, S, d)``, key mask ``(B, 1, S)`` -> logits ``(B, T, V)``."""
        if tgt_in.ndim != 2 or tgt_in.shape[0] != memory.shape[0]:
            raise ValueError(f"tgt_in must be (B, T) with B = {memory.shape[0]}, got {tuple(tgt_in.shape)}")
        causal = causal_mask(tgt_in.shape[1], device=tgt_in.device)  # (T, T)
        return self.out(self.transformer.decode(self.embed_tokens(tgt_in), memory, causal, mask))

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``src (B, S)``, ``src_lengths (B,)``, ``tgt_in (B, T)`` -> logits ``(B, T, V)``."""
        memory, mask = self.encode(src, src_lengths)
        return self.decode(tgt_in, memory, mask)

    def _stepper(self, src: torch.Tensor, src_lengths: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Encode once; the closure re-reads each whole prefix (a causal decoder keeps no state here)."""
        memory, mask = self.encode(src, src_lengths)
        return lambda prefixes: self.decode(prefixes, memory, mask)[:, -1]  # (B, t) -> (B, V)

    @torch.no_grad()
    def attention_map(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """The last decoder layer's cross-attention, averaged over heads, while reading ``tgt_in``: ``(B, T, S)``."""
        device = model_device(self)
        self(src.to(device), src_lengths.to(device), tgt_in.to(device))
        last = cast(DecoderLayer, self.transformer.decoder_layers[-1])
        return last.last_weights.mean(1)  # (B, h, T, S) -> (B, T, S)

    @torch.no_grad()
    def step_fn(self, src: torch.Tensor, src_length: int) -> StepFn:
        """A ``step_fn`` for :func:`beam_search` on one source ``src (S,)``, as :meth:`Seq2Seq.step_fn`."""
        if src.ndim != 1:
            raise ValueError(f"step_fn takes one source sequence (S,), got shape {tuple(src.shape)}")
        device = model_device(self)
        memory, mask = self.encode(src[None].to(device), torch.tensor([src_length], device=device))

        @torch.no_grad()
        def fn(prefixes: torch.Tensor) -> torch.Tensor:
            K = prefixes.shape[0]
            logits = self.decode(prefixes.to(device), memory.expand(K, -1, -1), mask.expand(K, -1, -1))
            return F.log_softmax(logits[:, -1], dim=-1).to(prefixes.device)  # (K, V)

        return fn


# --- training and evaluation ----------------------------------------------------------------


def sequence_loss(logits: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per target token, ignoring ``PAD``: logits ``(B, T, V)``, targets ``(B, T)``."""
    if logits.ndim != 3 or logits.shape[:2] != tgt_out.shape:
        raise ValueError(
            f"expected logits (B, T, V) and tgt_out (B, T), got {tuple(logits.shape)} and {tuple(tgt_out.shape)}"
        )
    return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)


def sequence_log_prob(logits: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """``log p(y | x) = sum_t log p(y_t | y_<t, x)`` for each row: ``(B, T, V)``, ``(B, T)`` -> ``(B,)``."""
    if logits.ndim != 3 or logits.shape[:2] != tgt_out.shape:
        raise ValueError(
            f"expected logits (B, T, V) and tgt_out (B, T), got {tuple(logits.shape)} and {tuple(tgt_out.shape)}"
        )
    logp = F.log_softmax(logits, dim=-1).gather(-1, tgt_out[..., None])[..., 0]  # (B, T)
    return (logp * (tgt_out != PAD)).sum(dim=1)


def label_smoothed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, eps: float, ignore_index: int = PAD
) -> torch.Tensor:
    """Cross-entropy against the smoothed target ``q = (1 - eps) onehot(y) + eps / V``, mean over kept rows.

    ``logits (N, V)``, ``target (N,)``; rows whose target is ``ignore_index`` are left out. Written as
    the decomposition ``(1 - eps) * (-log p_y) + eps * mean_v(-log p_v)``; equal to
    ``F.cross_entropy(logits, target, label_smoothing=eps, ignore_index=ignore_index)``.
    """
    if logits.ndim != 2 or target.shape != (logits.shape[0],):
        raise ValueError(f"expected logits (N, V) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    keep = target != ignore_index  # (N,)
    logp = F.log_softmax(logits[keep], dim=-1)  # (N', V)
    nll = -logp.gather(1, target[keep][:, None])[:, 0]  # (N',): cross-entropy with the one-hot target
    uniform = -logp.mean(dim=-1)  # (N',): cross-entropy with the uniform distribution
    return ((1 - eps) * nll + eps * uniform).mean()


def label_smoothing_step(eps: float) -> Step:
    """A teacher-forcing step whose loss is :func:`label_smoothed_cross_entropy` with smoothing ``eps``."""
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")

    def step(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch.src, batch.src_lengths, batch.tgt_in)  # (B, T, V)
        return label_smoothed_cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), eps)

    return step


@torch.no_grad()
def max_probs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's confidence at every real target token, ``max_v p(v | y_<t, x)`` (teacher-forced): ``(N,)``.

    ``N`` counts the non-``PAD`` targets of ``batch``. The model is put in eval mode and gets its
    mode back; it runs on its device, and the result comes back on the CPU.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    src, src_lengths, tgt_in, tgt_out = (t.to(device) for t in batch)
    probs = model(src, src_lengths, tgt_in).softmax(-1).amax(-1)  # (B, T)
    model.train(was_training)
    return probs[tgt_out != PAD].cpu()


def teacher_forcing_step(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The encoder-decoder's training step: teacher forcing.

    The decoder reads the *true* prefix ``tgt_in = [BOS] + y`` and is scored on ``tgt_out = y + [EOS]``:
    one cross-entropy per target token (:func:`sequence_loss`, ``PAD`` ignored), all ``T`` terms from
    one pass, with no sampling inside the step.
    """
    logits = model(batch.src, batch.src_lengths, batch.tgt_in)  # (B, T, V)
    return sequence_loss(logits, batch.tgt_out)


def train_seq2seq(
    model: EncoderDecoder,
    *,
    steps: int,
    batch_size: int = 64,
    min_len: int = 1,
    max_len: int = 12,
    lr: float = 3e-3,
    seed: int = 0,
    step: Step = teacher_forcing_step,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """Train on fresh reversal batches with ``step`` (:func:`teacher_forcing_step`), through the book's ``fit``.

    Every step draws a new :class:`Batch` (seeded by ``seed``), so there are no epochs: ``fit`` runs
    for ``steps`` steps. Adam with a one-cycle learning-rate schedule (warm-up over the first 10% of
    the steps to ``lr``, then cosine decay) and gradient clipping at norm 1. Another ``step(model,
    batch) -> loss`` changes the objective and keeps the rest. Returns the
    :class:`~dlarch_lib.core.train.History` (``loss``: the loss of every step). The device is the model's.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    return fit(
        model,
        (make_reversal_batch(batch_size, min_len, max_len, gen) for _ in itertools.count()),
        step,
        steps=steps,
        optimizer=optimizer,
        scheduler=schedule,
        clip_grad_norm=1.0,
        progress=progress,
        desc=desc,
    )


def exact_match(pred: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """Per row, True when the prediction equals the target up to and including ``EOS``: ``(B,)`` bool.

    Both are ``(B, *)`` token tensors with ``PAD`` after ``EOS``; they may differ in width.
    """
    if pred.ndim != 2 or tgt_out.ndim != 2 or pred.shape[0] != tgt_out.shape[0]:
        raise ValueError(f"expected (B, T) tensors with the same B, got {tuple(pred.shape)} and {tuple(tgt_out.shape)}")
    T = max(pred.shape[1], tgt_out.shape[1])
    pred, tgt_out = (F.pad(x, (0, T - x.shape[1]), value=PAD) for x in (pred, tgt_out))
    return (pred == tgt_out).all(dim=1)


@torch.no_grad()
def accuracy_by_length(
    model: EncoderDecoder, lengths: Sequence[int], n_per_length: int = 200, seed: int = 1
) -> dict[int, float]:
    """Exact-match accuracy of greedy decoding on ``n_per_length`` fresh strings of each length.

    The model is put in eval mode and gets its mode back; the strings are seeded by ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    result = {}
    for L in lengths:
        src, src_lengths, _, tgt_out = make_reversal_batch(n_per_length, L, L, gen)
        pred = model.greedy_decode(src, src_lengths, max_len=L + 2)  # (B, <= L + 2), on the model's device
        result[int(L)] = exact_match(pred.cpu(), tgt_out).float().mean().item()
    model.train(was_training)
    return result


def anti_diagonal_mass(weights: torch.Tensor, src_lengths: torch.Tensor, band: int = 0) -> torch.Tensor:
    """How much attention falls on the reversal alignment: ``(B,)``, each in ``[0, 1]``.

    ``weights (B, T, S)`` are the attention weights while reading ``tgt_in``; row ``t < L``
    predicts ``y_t = x_{L-1-t}``, so its "right" source position is ``L-1-t``. Returns, per
    example, the mean over those ``L`` rows of the weight within ``band`` positions of it
    (the EOS row is left out). 1 means a perfect anti-diagonal.
    """
    if weights.ndim != 3 or src_lengths.shape != (weights.shape[0],):
        raise ValueError(
            "expected weights (B, T, S) and src_lengths (B,), "
            f"got {tuple(weights.shape)} and {tuple(src_lengths.shape)}"
        )
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    B, T, S = weights.shape
    if int(src_lengths.min()) < 1 or int(src_lengths.max()) > min(S, T):
        raise ValueError(f"src_lengths must lie in [1, {min(S, T)}] for weights of shape {tuple(weights.shape)}")
    L = src_lengths.to(weights.device)[:, None]  # (B, 1)
    t = torch.arange(T, device=weights.device)[None, :]  # (1, T)
    target = (L - 1 - t)[..., None]  # (B, T, 1): the aligned source position of row t
    j = torch.arange(S, device=weights.device)[None, None, :]  # (1, 1, S)
    mass = (weights * ((j - target).abs() <= band)).sum(-1)  # (B, T)
    return (mass * (t < L)).sum(1) / L[:, 0]


# --- decoding: greedy and beam search on any step function --------------------------------


def step_fn_from_table(table: dict[tuple[int, ...], dict[int, float]], vocab_size: int) -> StepFn:
    """A ``step_fn`` for a hand-written distribution: ``table[prefix] = {token: probability}``.

    ``prefix`` is the tuple of tokens after ``BOS``; each row must sum to 1. Asking for a
    prefix that is not in the table raises ``KeyError``.
    """
    logp = {}
    for prefix, row in table.items():
        if abs(sum(row.values()) - 1.0) > 1e-6 or any(p < 0 for p in row.values()):
            raise ValueError(f"row {prefix} is not a probability distribution: {row}")
        if any(not 0 <= tok < vocab_size for tok in row):
            raise ValueError(f"row {prefix} has a token outside [0, {vocab_size})")
        vec = torch.full((vocab_size,), -math.inf)
        for tok, p in row.items():
            vec[tok] = math.log(p) if p > 0 else -math.inf
        logp[tuple(prefix)] = vec

    def fn(prefixes: torch.Tensor) -> torch.Tensor:
        return torch.stack([logp[tuple(p[1:].tolist())] for p in prefixes])  # (K, V); p[0] is BOS

    return fn


def exhaustive_search(step_fn: StepFn, bos: int, eos: int, max_len: int) -> tuple[list[int], float]:
    """The most probable sequence ending in ``eos`` within ``max_len`` tokens, by trying them all.

    Exact but exponential (up to ``V^max_len`` prefixes); for checking beam search on tiny problems.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    best: tuple[list[int], float] = ([], -math.inf)
    stack: list[tuple[list[int], float]] = [([bos], 0.0)]
    while stack:
        seq, score = stack.pop()
        logp = step_fn(torch.tensor([seq]))[0]  # (V,)
        for tok in torch.nonzero(logp > -math.inf)[:, 0].tolist():
            s = score + float(logp[tok])
            if tok == eos:
                if s > best[1]:
                    best = (seq[1:] + [tok], s)
            elif len(seq) < max_len:
                stack.append((seq + [tok], s))
    return best


def greedy_search(step_fn: StepFn, bos: int, eos: int, max_len: int) -> tuple[list[int], float]:
    """Take the arg-max token until ``eos`` or ``max_len`` tokens; returns ``(tokens, log-prob)``.

    ``tokens`` excludes ``bos`` and includes ``eos`` when it was produced.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    seq, score = [bos], 0.0
    for _ in range(max_len):
        logp = step_fn(torch.tensor([seq]))[0]  # (V,)
        tok = int(logp.argmax())
        seq.append(tok)
        score += float(logp[tok])
        if tok == eos:
            break
    return seq[1:], score


def beam_search(step_fn: StepFn, bos: int, eos: int, beam_size: int, max_len: int) -> tuple[list[int], float]:
    """Keep the ``beam_size`` most probable prefixes at every step; return the best finished one.

    Scores are summed log-probabilities (no length normalisation). A prefix that emits ``eos``
    leaves the beam as a finished hypothesis. Because log-probs are <= 0, a prefix's score can
    only fall as it grows, so the search stops as soon as the best finished score is at least the
    best live score: no live prefix can overtake it. If nothing finishes within ``max_len``
    tokens, the best live prefix is returned. ``beam_size=1`` is greedy search.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    live = torch.tensor([[bos]])  # (K, t) prefixes
    live_scores = torch.zeros(1, dtype=torch.float64)  # (K,) in float64, like greedy's Python floats
    best_seq: list[int] | None = None
    best_score = -math.inf
    for _ in range(max_len):
        logp = step_fn(live)  # (K, V)
        if logp.ndim != 2 or logp.shape[0] != live.shape[0]:
            raise ValueError(
                f"step_fn must return (K, V) log-probs for K={live.shape[0]} prefixes, got {tuple(logp.shape)}"
            )
        V = logp.shape[1]
        cand = (live_scores[:, None] + logp.double()).flatten()  # (K * V,) scores of every one-token extension
        top_values, top_indices = cand.topk(min(beam_size, cand.numel()))
        possible = top_values > -math.inf  # never extend by a token of probability 0
        top_values, top_indices = top_values[possible], top_indices[possible]
        beam_idx, tok = top_indices // V, top_indices % V
        seqs = torch.cat([live[beam_idx], tok[:, None]], dim=1)  # (k, t + 1)
        finished = tok == eos
        for s, sc in zip(seqs[finished], top_values[finished]):
            if float(sc) > best_score:
                best_seq, best_score = s[1:].tolist(), float(sc)
        live, live_scores = seqs[~finished], top_values[~finished]
        if live.shape[0] == 0 or best_score >= float(live_scores.max()):
            break
    if best_seq is None:  # nothing finished: return the best unfinished prefix
        i = int(live_scores.argmax())
        best_seq, best_score = live[i, 1:].tolist(), float(live_scores[i])
    return best_seq, best_score
