"""Attention and the Transformer, written out: scaled dot-product attention, masks,
multi-head attention, sinusoidal positions, a pre-LN block and a tiny GPT, with the key/value
cache (:class:`KVCache`) that makes its generation cost linear in the length per token.

Everything here is checked against PyTorch's own reference in the tests
(``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``). Masks are boolean and
``True`` means *may attend* (the opposite of ``nn.MultiheadAttention``'s ``attn_mask``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(d_k)) v`` and the attention weights.

    Shapes: q ``(..., T_q, d_k)``, k ``(..., T_k, d_k)``, v ``(..., T_k, d_v)``; ``mask`` is a bool
    tensor broadcastable to ``(..., T_q, T_k)`` with ``True`` = attend. A query whose row is fully
    masked gets all-zero weights and a zero output (as ``F.scaled_dot_product_attention`` does).
    ``dropout_p`` drops attention weights (pass 0 in evaluation).
    Returns ``out (..., T_q, d_v)`` and ``weights (..., T_q, T_k)``.
    """
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(
            f"q, k, v need at least 2 dims (..., T, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the last dim d_k; got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length T_k; got {k.shape[-2]} and {v.shape[-2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., T_q, T_k)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError as err:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}"
            ) from err
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # (..., T_q, T_k); rows of -inf give nan ...
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # ... which this turns into zeros
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights  # (..., T_q, d_v), (..., T_q, T_k)


def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(T, T)`` bool, lower triangular: position ``i`` may attend to ``j <= i``."""
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``(B, T)`` bool: ``True`` at the real tokens ``t < lengths[b]``, ``False`` at padding.

    To mask padded *keys* in attention, pass ``padding_mask(lengths, T)[:, None, :]`` (shape
    ``(B, 1, T_k)``, broadcast over heads and queries).
    """
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, {T}], got min {int(lengths.min())}, max {int(lengths.max())}")
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


class KVCache:
    """The keys and values of the positions a causal Transformer has already read, one pair per layer.

    Layer ``l`` holds ``keys[l]`` and ``values[l]``, each ``(B, h, T, d_k)`` (``None`` before the first
    call). :meth:`MultiHeadAttention.forward_cached` appends the new positions' keys and values and
    attends over all of them, so a model that reads its input in pieces through the cache computes what
    one pass over the whole input computes (exactly so only under a causal mask). Any model made of
    :class:`MultiHeadAttention` layers can use it: give each layer its index ``l``.
    The cache stores ``2 L B T d`` numbers for ``L`` layers of width ``d = h d_k``.
    """

    def __init__(self, n_layers: int) -> None:
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    @property
    def n_layers(self) -> int:
        """Number of layers the cache has room for."""
        return len(self.keys)

    def layer_length(self, layer: int) -> int:
        """Positions cached in ``layer`` (0 when it is empty)."""
        self._check_layer(layer)
        k = self.keys[layer]
        return 0 if k is None else k.shape[-2]

    @property
    def length(self) -> int:
        """Positions cached in the first layer: where the next token's position starts."""
        return self.layer_length(0)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``k, v (B, h, T_new, d_k)`` to ``layer``; return all its keys and values ``(B, h, T + T_new, d_k)``."""
        self._check_layer(layer)
        if k.ndim != 4 or k.shape != v.shape:
            raise ValueError(f"k and v must both be (B, h, T_new, d_k); got {tuple(k.shape)} and {tuple(v.shape)}")
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            if (old_k.shape[0], old_k.shape[1], old_k.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
                raise ValueError(
                    f"layer {layer} caches (B, h, T, d_k) = {tuple(old_k.shape)}; cannot append {tuple(k.shape)}"
                )
            k, v = torch.cat([old_k, k], dim=-2), torch.cat([old_v, v], dim=-2)  # (B, h, T + T_new, d_k)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def cropped(self, length: int) -> KVCache:
        """A new cache holding the first ``length`` positions of every layer (views, no copy): rolls back
        generation to an earlier point. Appending to it leaves this cache unchanged."""
        shortest = min(self.layer_length(layer) for layer in range(self.n_layers))
        if not 0 <= length <= shortest:
            raise ValueError(f"length must be in [0, {shortest}], got {length}")
        out = KVCache(self.n_layers)
        if length:
            out.keys = [None if k is None else k[..., :length, :] for k in self.keys]
            out.values = [None if v is None else v[..., :length, :] for v in self.values]
        return out

    def numel(self) -> int:
        """Numbers stored: ``2 L B T d`` when every layer holds ``T`` positions of width ``d``."""
        return sum(t.numel() for t in self.keys + self.values if t is not None)

    def nbytes(self) -> int:
        """Bytes stored (``numel`` times the element size)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < len(self.keys):
            raise ValueError(f"layer must be in [0, {len(self.keys)}), got {layer}")


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``Concat(head_1..head_h) W^O``, ``head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)``.

    Self-attention when ``key``/``value`` are omitted; cross-attention otherwise.
    ``mask`` (bool, ``True`` = attend) has shape ``(T_q, T_k)``, ``(B, T_q, T_k)``, ``(B, 1, T_k)``
    or ``(B, h, T_q, T_k)``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model < 1 or n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # the h matrices W_i^Q side by side
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W^O

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """query ``(B, T_q, d_model)``, key/value ``(B, T_k, d_model)`` -> ``(B, T_q, d_model)``.

        With ``return_weights=True`` also returns the weights ``(B, h, T_q, T_k)``.
        """
        key = query if key is None else key
        value = key if value is None else value
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.ndim != 3 or x.shape[-1] != self.d_model:
                raise ValueError(f"{name} must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        if mask is not None and mask.ndim == 3:
            mask = mask[:, None]  # (B, T_q or 1, T_k) -> (B, 1, T_q or 1, T_k): same for every head
        h = self.n_heads
        q = rearrange(self.q_proj(query), "b t (h d) -> b h t d", h=h)  # (B, h, T_q, d_k)
        k = rearrange(self.k_proj(key), "b t (h d) -> b h t d", h=h)  # (B, h, T_k, d_k)
        v = rearrange(self.v_proj(value), "b t (h d) -> b h t d", h=h)  # (B, h, T_k, d_k)
        out, weights = self.attend(q, k, v, mask, need_weights=return_weights)  # (B, h, T_q, d_k)
        out = self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # concat heads, then W^O
        return (out, weights) if return_weights else out

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The heads' attention: ``q (B, h, T_q, d_k)``, ``k, v (B, h, T_k, d_k)`` -> outputs ``(B, h, T_q, d_k)``
        and weights ``(B, h, T_q, T_k)``. Softmax attention here; a subclass may swap the rule and keep the rest."""
        p = self.dropout if self.training else 0.0
        return scaled_dot_product_attention(q, k, v, mask, dropout_p=p)

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """Causal self-attention for ``T_new`` new positions ``x (B, T_new, d_model)`` that follow the
        ``T`` positions in ``cache[layer]``: ``(B, T_new, d_model)``.

        Only the new positions are projected; their keys and values are appended to the cache, and new
        position ``T + i`` attends to cached and new positions ``j <= T + i``. Reading a sequence in
        pieces this way gives the same outputs as ``forward`` on the whole sequence with a causal mask.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, T_new, {self.d_model}), got {tuple(x.shape)}")
        past, T_new, h = cache.layer_length(layer), x.shape[1], self.n_heads
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=h)  # (B, h, T_new, d_k)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=h)  # only the new keys ...
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=h)  # ... and values are computed
        k, v = cache.append(layer, k, v)  # (B, h, T + T_new, d_k): the past is read, not recomputed
        mask = None
        if T_new > 1:  # new position T + i sees keys j <= T + i; a single new token sees everything
            keys_at = torch.arange(past + T_new, device=x.device)  # (T + T_new,)
            mask = keys_at[None, :] <= past + torch.arange(T_new, device=x.device)[:, None]  # (T_new, T + T_new)
        p = self.dropout if self.training else 0.0
        out, _ = scaled_dot_product_attention(q, k, v, mask, dropout_p=p)  # (B, h, T_new, d_k)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))

    @torch.no_grad()
    def load_from_torch(self, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """Copy the weights of a ``nn.MultiheadAttention`` with the same size (returns ``self``)."""
        if mha.embed_dim != self.d_model or mha.num_heads != self.n_heads:
            raise ValueError(
                f"size mismatch: torch module has d_model={mha.embed_dim}, heads={mha.num_heads}; "
                f"this one d_model={self.d_model}, heads={self.n_heads}"
            )
        if mha.in_proj_weight is None:
            raise ValueError("nn.MultiheadAttention with separate kdim/vdim is not supported")
        if (mha.in_proj_bias is None) != (self.q_proj.bias is None) or mha.bias_k is not None:
            raise ValueError("bias settings differ (or add_bias_kv=True, which is not supported)")
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)  # in_proj stacks W^Q, W^K, W^V: (3d, d)
        for proj, w in ((self.q_proj, w_q), (self.k_proj, w_k), (self.v_proj, w_v)):
            proj.weight.copy_(w)
        self.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.in_proj_bias is not None:
            for proj, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                proj.bias.copy_(b)
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self


def sinusoidal_positions(T: int, d: int) -> torch.Tensor:
    """``(T, d)`` encodings: ``PE[t, 2i] = sin(t / 10000^(2i/d))``, ``PE[t, 2i+1] = cos(...)``."""
    if T < 1 or d < 2 or d % 2:
        raise ValueError(f"need T >= 1 and an even d >= 2, got T={T}, d={d}")
    t = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(t * freq)
    pe[:, 1::2] = torch.cos(t * freq)
    return pe


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of width ``mlp_ratio * d``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be >= 1, got {mlp_ratio}")
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
            nn.Dropout(dropout),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, d) -> (B, T, d)``; ``mask`` as in :class:`MultiHeadAttention`."""
        x = x + self.drop(self.attn(self.ln1(x), mask=mask))  # the residual path is never normalised
        return x + self.mlp(self.ln2(x))

    def forward_with_weights(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward``, and also the attention weights ``(B, h, T, T)``."""
        a, weights = self.attn(self.ln1(x), mask=mask, return_weights=True)
        x = x + self.drop(a)
        return x + self.mlp(self.ln2(x)), weights

    def forward_cached(self, x: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """``forward`` for new positions ``x (B, T_new, d)`` after those in ``cache`` (causal; see
        :meth:`MultiHeadAttention.forward_cached`): ``(B, T_new, d)``."""
        x = x + self.drop(self.attn.forward_cached(self.ln1(x), cache, layer))
        return x + self.mlp(self.ln2(x))  # the MLP acts on each position alone: nothing to cache


class GPT(nn.Module):
    """A decoder-only Transformer language model (GPT-2 layout, tiny).

    Token + learned position embeddings, ``n_layers`` causal pre-LN blocks, a final LayerNorm,
    and an output layer tied to the token embedding. ``forward(idx (B, T)) -> logits (B, T, V)``.
    Sample from it with :func:`dlarch_lib.rnn.generate`.
    """

    mask: torch.Tensor  # (context, context) causal mask, a buffer

    def __init__(
        self, vocab_size: int, context: int, d_model: int, n_heads: int, n_layers: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if vocab_size < 1 or context < 1 or n_layers < 1:
            raise ValueError(f"vocab_size, context and n_layers must be >= 1; got {vocab_size}, {context}, {n_layers}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        blocks = [TransformerBlock(d_model, n_heads, dropout=dropout) for _ in range(n_layers)]
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying (GPT-2)
        self.register_buffer("mask", causal_mask(context), persistent=False)  # (context, context)
        self.apply(self._init)
        self.shrink_residual_projections(blocks)

    @staticmethod
    def shrink_residual_projections(blocks: list[TransformerBlock]) -> None:
        """GPT-2's initialisation of the layers that write into the residual stream: std 0.02 / sqrt(2 L)."""
        for block in blocks:
            for lin in (block.attn.out_proj, cast(nn.Linear, block.mlp[2])):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * len(blocks)))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` with ``T <= context`` -> token + position embeddings ``(B, T, d)``.

        Also used by :class:`dlarch_lib.lm.Encoder`, which has the same ``tok``, ``pos``, ``drop``."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the context {self.context}")
        return self.drop(self.tok(idx) + self.pos.weight[:T])  # (B, T, d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` with ``T <= context`` -> next-token logits ``(B, T, V)``."""
        x = self.embed_tokens(idx)  # (B, T, d)
        T = idx.shape[1]
        mask = self.mask[:T, :T]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))  # (B, T, V)

    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """The causal attention weights of every layer and head on ``idx (B, T)``: ``(L, B, h, T, T)``."""
        x = self.embed_tokens(idx)  # (B, T, d)
        mask = self.mask[: idx.shape[1], : idx.shape[1]]
        maps = []
        for block in self.blocks:
            x, w = cast(TransformerBlock, block).forward_with_weights(x, mask)  # w: (B, h, T, T)
            maps.append(w)
        return torch.stack(maps)

    def new_cache(self) -> KVCache:
        """An empty :class:`KVCache` with one slot per block."""
        return KVCache(len(self.blocks))

    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits ``(B, T_new, V)`` for new tokens ``idx (B, T_new)`` that follow the ``T`` tokens in ``cache``.

        The new tokens get positions ``T .. T + T_new - 1``, and their keys and values join the cache.
        Reading a sequence in pieces gives the logits of ``forward`` on the whole sequence; the total
        length cannot exceed ``context`` (the learned positions end there).
        """
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T_new) token ids with T_new >= 1, got shape {tuple(idx.shape)}")
        if cache.n_layers != len(self.blocks):
            raise ValueError(f"the cache has {cache.n_layers} layers, the model {len(self.blocks)}")
        past, T_new = cache.length, idx.shape[1]
        if past + T_new > self.context:
            raise ValueError(f"{past} cached + {T_new} new tokens exceed the context {self.context}")
        x = self.drop(self.tok(idx) + self.pos.weight[past : past + T_new])  # (B, T_new, d)
        for layer, block in enumerate(self.blocks):
            x = cast(TransformerBlock, block).forward_cached(x, cache, layer)
        return self.head(self.ln_f(x))  # (B, T_new, V)


class CachedLM(nn.Module):
    """A model with a key/value cache, seen as a language model with a state, for :func:`dlarch_lib.rnn.generate`.

    ``model`` needs ``new_cache()`` and ``forward_cached(idx, cache) -> logits`` (as :class:`GPT` has).
    ``forward(idx)`` starts a new cache and reads ``idx``; ``forward(idx, cache)`` reads only the new
    tokens. Both return ``(logits (B, T_new, V), cache)``, so the book's sampler reads the prompt once and
    then one token per step, like a recurrent network: ``rnn.generate(CachedLM(gpt), prompt, n)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not (callable(getattr(model, "new_cache", None)) and callable(getattr(model, "forward_cached", None))):
            raise ValueError(f"{type(model).__name__} has no new_cache() and forward_cached(idx, cache)")
        self.model = model

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """``(B, T_new)`` ids -> ``(logits (B, T_new, V), cache)``."""
        model = cast(GPT, self.model)  # any model with these two methods
        cache = model.new_cache() if cache is None else cache
        return model.forward_cached(idx, cache), cache


def decode_greedy(
    model: nn.Module, prompt: torch.Tensor, n: int, *, use_cache: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of ``n`` tokens after ``prompt (B, T0)``: ids ``(B, T0 + n)`` and the logits ``(B, n, V)``
    from which each new token was chosen.

    With ``use_cache=False`` every step runs ``model(ids)`` over the whole sequence so far (no cropping:
    ``T0 + n`` must fit the model's context); with ``use_cache=True`` the model (a :class:`GPT` or anything
    with ``new_cache`` and ``forward_cached``) reads the prompt once and then one token per step.
    The model is put in eval mode and gets its mode back.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T0) ids with T0 >= 1, got shape {tuple(prompt.shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    step = CachedLM(model) if use_cache else None
    was_training = model.training
    model.eval()
    ids = prompt.to(next(model.parameters()).device)  # (B, T0)
    cache: KVCache | None = None
    chosen = []
    with torch.no_grad():
        for i in range(n):
            if step is None:
                logits = model(ids)  # (B, T, V): the whole sequence again
            else:
                logits, cache = step(ids if i == 0 else ids[:, -1:], cache)  # (B, 1 or T0, V)
            chosen.append(logits[:, -1])  # (B, V)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.train(was_training)
    return ids, torch.stack(chosen, dim=1)
