"""Cross-attention and sparse attention: sliding windows and the Longformer pattern.

Two ways to compute the same thing:

- *dense + mask* (for teaching and testing): build a bool ``(T, T)`` mask with
  :func:`local_window_mask` or :func:`longformer_mask` and hand it to
  :func:`dlarch_lib.attention.scaled_dot_product_attention`. It still computes all ``T^2`` scores.
- *blocked* (for real): :func:`sliding_window_attention` and :func:`longformer_attention` cut the
  sequence into blocks of ``w`` positions and score each block of queries against the three blocks
  of keys around it (plus the global tokens), so time and memory grow like ``O(T w)``; the
  ``T x T`` matrix is never built.

Masks are bool with ``True`` = *may attend*, as in :mod:`dlarch_lib.attention`. ``window`` is the
one-sided half-width ``w``: query ``i`` sees keys ``j`` with ``|i - j| <= w`` (or ``i - w <= j <= i``
when causal). The module ends with the small *lookup* task of the chapter, which needs cross-attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.attention import MultiHeadAttention, TransformerBlock, scaled_dot_product_attention


def _check_window(T: int, window: int) -> None:
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if window < 0:
        raise ValueError(f"window must be >= 0 (a one-sided half-width), got {window}")


def _global_index(global_idx: Sequence[int] | torch.Tensor, T: int, device: torch.device | str | None) -> torch.Tensor:
    """Sorted unique positions ``(G,)`` as a long tensor, checked to lie in ``[0, T)``."""
    idx = torch.as_tensor(global_idx, dtype=torch.long, device=device).flatten().unique()  # sorted
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= T):
        raise ValueError(f"global_idx must lie in [0, {T}), got min {int(idx.min())}, max {int(idx.max())}")
    return idx


def local_window_mask(
    T: int, window: int, causal: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(T, T)`` bool band: ``True`` where ``|i - j| <= window`` (and ``j <= i`` if ``causal``)."""
    _check_window(T, window)
    i = torch.arange(T, device=device)[:, None]  # (T, 1) query positions
    j = torch.arange(T, device=device)[None, :]  # (1, T) key positions
    mask = (i - j).abs() <= window
    return mask & (j <= i) if causal else mask


def longformer_mask(
    T: int, window: int, global_idx: Sequence[int] | torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(T, T)`` bool Longformer pattern: the local band, plus full rows and columns at ``global_idx``.

    A global token attends to every position and every position attends to it.
    """
    _check_window(T, window)
    g = _global_index(global_idx, T, device)
    mask = local_window_mask(T, window, device=device)
    mask[g, :] = True  # global queries see everything
    mask[:, g] = True  # everyone sees the global keys
    return mask


def _blocked_scores(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Scores of each query against the keys near it, computed block by block.

    The sequence is cut into ``nb`` blocks of ``b = max(w, 1)`` positions (the last one zero-padded).
    Queries in block ``n`` are scored against the keys of blocks ``n - 1, n, n + 1`` (``n - 1, n`` if
    causal): ``K = 3b`` (or ``2b``) keys, which include every key within ``w``. One batched matmul,
    ``O(T b d)`` work and ``O(T b)`` scores; the ``T x T`` matrix never exists.

    Returns ``scores (..., nb, b, K)``, ``keep (nb, b, K)`` bool (key inside the sequence and the window),
    ``key_pos (nb, b, K)``, the values ``v_win (..., nb, K, d_v)`` and ``b``.
    """
    T = q.shape[-2]
    b = max(w, 1)
    nb, right = -(-T // b), 0 if causal else 1  # number of blocks; blocks looked at on the right
    n_win, tail = 2 + right, -(-T // b) * b - T  # blocks per window; padding at the end

    def windows(x: torch.Tensor) -> torch.Tensor:  # (..., T, d) -> (..., nb, n_win * b, d)
        x = F.pad(x, (0, 0, b, tail + right * b)).unflatten(-2, (nb + n_win - 1, b))  # (..., nb + n_win - 1, b, d)
        return x.unfold(-3, n_win, 1).movedim(-1, -3).flatten(-3, -2)  # (..., nb, n_win * b, d)

    q_blocks = F.pad(q, (0, 0, 0, tail)).unflatten(-2, (nb, b))  # (..., nb, b, d)
    k_win, v_win = windows(k), windows(v)  # (..., nb, K, d)
    scores = q_blocks @ k_win.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., nb, b, K)
    start = torch.arange(nb, device=q.device)[:, None, None] * b  # (nb, 1, 1) first position of each block
    q_pos = start + torch.arange(b, device=q.device)[None, :, None]  # (nb, b, 1)
    key_pos = start - b + torch.arange(n_win * b, device=q.device)[None, None, :]  # (nb, 1, K)
    offset = key_pos - q_pos  # (nb, b, K): j - i
    keep = (key_pos >= 0) & (key_pos < T) & (offset >= -w) & (offset <= (0 if causal else w))
    keep = keep | (q_pos >= T)  # padded query rows: anything finite (they are cut off at the end)
    return scores, keep, key_pos.expand_as(keep), v_win, b


def _band_index(T: int, b: int, w: int, causal: bool, device: torch.device) -> torch.Tensor:
    """Column, among a block's ``K`` keys, of the key at offset ``o = -w .. w`` from each query: ``(nb, b, W)``."""
    nb = -(-T // b)
    r = torch.arange(b, device=device)[:, None]  # (b, 1) the query's place in its block
    o = torch.arange(-w, (0 if causal else w) + 1, device=device)[None, :]  # (1, W)
    return (b + r + o).expand(nb, b, o.shape[1])  # block n - 1 occupies columns [0, b)


def _band_positions(T: int, left: int, right: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Key position ``j = i + o`` for every query ``i`` and offset ``o`` in ``[-left, right]``: ``(T, W)``,
    and whether it lies inside the sequence, ``(T, W)`` bool."""
    pos = torch.arange(T, device=device)[:, None] + torch.arange(-left, right + 1, device=device)[None, :]
    return pos, (pos >= 0) & (pos < T)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim < 2 or q.shape[:-1] != k.shape[:-1] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "self-attention needs q, k (..., T, d_k) and v (..., T, d_v) with the same leading dims; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local attention in ``O(T w)`` time and memory: query ``i`` attends to keys ``|i - j| <= window``.

    Shapes: q, k ``(..., T, d_k)``, v ``(..., T, d_v)``. Returns ``out (..., T, d_v)`` and the *banded*
    weights ``(..., T, W)``, where column ``c`` is the key at ``j = i - window + c`` and
    ``W = 2 window + 1`` (``window + 1`` if ``causal``). Equal to dense attention with
    :func:`local_window_mask`; a window ``>= T - 1`` gives full attention (it is clamped to ``T - 1``).
    """
    _check_qkv(q, k, v)
    T = q.shape[-2]
    _check_window(T, window)
    w = min(window, T - 1)  # a wider window only adds padding
    scores, keep, _, v_win, b = _blocked_scores(q, k, v, w, causal)  # (..., nb, b, K)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)  # (..., nb, b, K)
    out = (weights @ v_win).flatten(-3, -2)[..., :T, :]  # (..., nb, b, d_v) -> (..., T, d_v)
    index = _band_index(T, b, w, causal, q.device).expand(*weights.shape[:-1], -1)  # (..., nb, b, W)
    band = weights.gather(-1, index).flatten(-3, -2)[..., :T, :]  # (..., T, W)
    return out, band


def longformer_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, global_idx: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Longformer self-attention: a sliding window plus a few global tokens, in ``O(T (w + G))``.

    Ordinary queries attend to their window and to the ``G`` global keys (a global key inside the
    window is counted once). Global queries attend to all ``T`` keys. Equal to dense attention with
    :func:`longformer_mask`. Shapes: q, k ``(..., T, d_k)``, v ``(..., T, d_v)`` -> ``(..., T, d_v)``.
    """
    _check_qkv(q, k, v)
    T = q.shape[-2]
    _check_window(T, window)
    g = _global_index(global_idx, T, q.device)  # (G,)
    w = min(window, T - 1)
    scores, keep, key_pos, v_win, b = _blocked_scores(q, k, v, w, causal=False)  # (..., nb, b, K)
    is_global = torch.zeros(T + 1, dtype=torch.bool, device=q.device)  # slot T stands for "outside"
    is_global[g] = True
    keep = keep & ~is_global[torch.where((key_pos >= 0) & (key_pos < T), key_pos, T)]  # globals: own columns
    nb = scores.shape[-3]
    k_g, v_g = k[..., g, :], v[..., g, :]  # (..., G, d)
    to_global = F.pad(q, (0, 0, 0, nb * b - T)) @ k_g.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (..., nb b, G)
    local = scores.masked_fill(~keep, float("-inf"))  # (..., nb, b, K)
    weights = torch.softmax(torch.cat([local, to_global.unflatten(-2, (nb, b))], dim=-1), dim=-1)  # (..., nb, b, K + G)
    w_local, w_glob = weights.split([scores.shape[-1], g.numel()], dim=-1)
    out = (w_local @ v_win).flatten(-3, -2) + w_glob.flatten(-3, -2) @ v_g  # (..., nb b, d_v)
    out = out[..., :T, :]
    if g.numel():
        out_g, _ = scaled_dot_product_attention(q[..., g, :], k, v)  # (..., G, d_v): G x T scores
        out = out.index_copy(-2, g, out_g)
    return out


def sliding_window_score_count(T: int, window: int, causal: bool = False) -> int:
    """How many scores :func:`sliding_window_attention` computes: ``ceil(T / b) * b * K`` with
    ``b = max(w, 1)``, ``K = 3b`` (``2b`` if causal) and ``w = min(window, T - 1)``; at most about ``3 T w``.

    Dense attention computes ``T * T``. The blocks cost a constant factor (``3b`` keys scored where
    ``2w + 1`` are used) in exchange for one large, fast matrix product.
    """
    _check_window(T, window)
    b = max(min(window, T - 1), 1)
    return -(-T // b) * b * (2 if causal else 3) * b


def band_to_dense(band: torch.Tensor, window: int, causal: bool = False) -> torch.Tensor:
    """Scatter banded weights ``(..., T, W)`` from :func:`sliding_window_attention` into ``(..., T, T)``.

    For pictures and tests only: it builds the ``T x T`` matrix the banded form avoids.
    """
    T, W = band.shape[-2], band.shape[-1]
    w = min(window, T - 1)
    left, right = w, 0 if causal else w
    if W != left + 1 + right:
        raise ValueError(f"band has width {W}, but window={window} (causal={causal}) at T={T} needs {left + 1 + right}")
    pos, inside = _band_positions(T, left, right, band.device)  # (T, W)
    dense = band.new_zeros(*band.shape[:-1], T + 1)  # one spare column collects the padding
    index = torch.where(inside, pos, T).expand_as(band)
    return dense.scatter_add(-1, index, band.masked_fill(~inside, 0.0))[..., :T]


# --- The lookup task: a decoder query must read a value out of the encoder's memory ---------------


def make_lookup_task(
    n: int, n_pairs: int = 8, n_keys: int = 16, n_values: int = 16, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``n`` lookups. Returns ``x (n, 2 n_pairs + 1)`` long and ``y (n,)`` long.

    ``x[:, :n_pairs]`` are distinct keys (ids in ``[0, n_keys)``), ``x[:, n_pairs:2 n_pairs]`` the value
    stored with each key (ids in ``[0, n_values)``), and ``x[:, -1]`` a query: one of the stored keys.
    The answer ``y`` is the value stored with the queried key.
    """
    if n < 1 or n_pairs < 1 or n_values < 1:
        raise ValueError(f"n, n_pairs and n_values must be >= 1; got {n}, {n_pairs}, {n_values}")
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs ({n_pairs}) cannot exceed n_keys ({n_keys}): the keys are distinct")
    keys = torch.rand(n, n_keys, generator=generator).argsort(dim=1)[:, :n_pairs]  # (n, P) distinct keys
    values = torch.randint(n_values, (n, n_pairs), generator=generator)  # (n, P)
    slot = torch.randint(n_pairs, (n,), generator=generator)  # (n,) which pair is asked for
    rows = torch.arange(n)
    x = torch.cat([keys, values, keys[rows, slot, None]], dim=1)  # (n, 2P + 1)
    return x, values[rows, slot]


class LookupModel(nn.Module):
    """Encoder-decoder for :func:`make_lookup_task`; ``forward(x (B, 2P + 1)) -> logits (B, n_values)``.

    Encoder: one embedding per (key, value) pair, ``e_key + e_value``, then a self-attention
    :class:`~dlarch_lib.attention.TransformerBlock` over the ``P`` pairs (the memory, ``(B, P, d)``).
    Decoder: the query key's embedding reads the memory with cross-attention (``mode="cross"``),
    or sees only the memory's mean (``mode="mean"``), then an MLP gives the value's logits.
    """

    def __init__(
        self, n_keys: int = 16, n_values: int = 16, d_model: int = 64, n_heads: int = 4, mode: str = "cross"
    ) -> None:
        super().__init__()
        if mode not in ("cross", "mean"):
            raise ValueError(f"mode must be 'cross' or 'mean', got {mode!r}")
        self.mode = mode
        self.key_emb = nn.Embedding(n_keys, d_model)  # shared by the encoder's keys and the decoder's query
        self.value_emb = nn.Embedding(n_values, d_model)
        self.encoder = TransformerBlock(d_model, n_heads)
        self.ln_q, self.ln_m = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.cross = MultiHeadAttention(d_model, n_heads)  # used by "cross"
        self.pool = nn.Linear(d_model, d_model)  # used by "mean"
        self.head = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, n_values)
        )
        self.last_weights: torch.Tensor | None = None  # (B, h, 1, P) cross-attention of the last call

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 2P + 1) -> memory (B, P, d)``: the encoder never sees the query."""
        P = (x.shape[1] - 1) // 2
        return self.encoder(self.key_emb(x[:, :P]) + self.value_emb(x[:, P : 2 * P]))  # (B, P, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, 2P + 1)`` token ids as made by :func:`make_lookup_task` -> logits ``(B, n_values)``."""
        if x.ndim != 2 or x.shape[1] < 3 or x.shape[1] % 2 == 0:
            raise ValueError(f"x must be (B, 2 * n_pairs + 1) token ids, got shape {tuple(x.shape)}")
        memory = self.encode(x)  # (B, P, d)
        query = self.key_emb(x[:, -1:])  # (B, 1, d): the decoder's only token
        if self.mode == "cross":
            read, weights = self.cross(self.ln_q(query), self.ln_m(memory), return_weights=True)  # (B, 1, d)
            self.last_weights = weights.detach()  # (B, h, 1, P)
        else:
            read = self.pool(self.ln_m(memory).mean(dim=1, keepdim=True))  # (B, 1, d): a summary, no lookup
        return self.head(query + read)[:, 0]  # (B, n_values)


# --- Linear attention: a positive kernel instead of the softmax -------------------------------------


def _check_cross_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q ``(..., T_q, d)``, k ``(..., T_k, d)``, v ``(..., T_k, d_v)`` with the same leading dims."""
    if q.ndim < 2 or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attention needs q (..., T_q, d), k (..., T_k, d) and v (..., T_k, d_v) with the same leading dims; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1``, the positive feature map of Katharopoulos et al. (2020), elementwise."""
    return F.elu(x) + 1.0


def kernel_attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The weights linear attention uses, built the slow way: ``(..., T_q, d), (..., T_k, d) -> (..., T_q, T_k)``.

    ``A_ij = phi(q_i) . phi(k_j) / sum_l phi(q_i) . phi(k_l)`` (over ``l <= i`` when causal): the
    quadratic form that :func:`linear_attention` computes without building it.
    """
    _check_cross_qkv(q, k, k)
    scores = elu_feature_map(q) @ elu_feature_map(k).transpose(-2, -1)  # (..., T_q, T_k), all > 0
    if causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("causal attention needs as many queries as keys")
        T = q.shape[-2]
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), 0.0)
    return scores / scores.sum(-1, keepdim=True)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Kernelized attention in ``O(T d d_v)``: ``(..., T_q, d), (..., T_k, d), (..., T_k, d_v) -> (..., T_q, d_v)``.

    Output ``i`` is ``phi(q_i)^T S / phi(q_i)^T z`` with ``S = sum_j phi(k_j) v_j^T`` ``(d, d_v)`` and
    ``z = sum_j phi(k_j)`` ``(d,)``: the ``T x T`` matrix of :func:`kernel_attention_weights` is never
    built. ``causal=True`` uses prefix sums ``S_i, z_i`` over ``j <= i`` (the recurrent form; this
    teaching version stores all ``T`` states, ``O(T d d_v)`` memory).
    """
    _check_cross_qkv(q, k, v)
    fq, fk = elu_feature_map(q), elu_feature_map(k)  # (..., T_q, d), (..., T_k, d)
    if causal:
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("causal attention needs as many queries as keys")
        S = torch.einsum("...td,...te->...tde", fk, v).cumsum(-3)  # (..., T, d, d_v): S_i for every i
        z = fk.cumsum(-2)  # (..., T, d)
        num = torch.einsum("...td,...tde->...te", fq, S)  # (..., T, d_v)
        den = (fq * z).sum(-1, keepdim=True)  # (..., T, 1)
    else:
        S = torch.einsum("...td,...te->...de", fk, v)  # (..., d, d_v): one state for all queries
        z = fk.sum(-2)  # (..., d)
        num = fq @ S  # (..., T_q, d_v)
        den = fq @ z[..., None]  # (..., T_q, 1)
    return num / (den + eps)


class LinearMultiHeadAttention(MultiHeadAttention):
    """:class:`~dlarch_lib.attention.MultiHeadAttention` with :func:`linear_attention` in each head.

    Same projections, shapes and ``forward``; only :meth:`attend` changes. No mask (``causal=True`` at
    construction gives the causal form).
    ``return_weights=True`` also returns the per-head weights ``(B, h, T_q, T_k)``, built the slow way.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False) -> None:
        super().__init__(d_model, n_heads)
        self.causal = causal

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`linear_attention` per head; the weights are built the slow way only when asked for."""
        if mask is not None:
            raise ValueError("linear attention takes no mask (use causal=True for the causal form)")
        out = linear_attention(q, k, v, self.causal)  # (B, h, T_q, d_k)
        weights = kernel_attention_weights(q, k, self.causal) if need_weights else out.new_empty(0)
        return out, weights


class MemoryReader(nn.Module):
    """One query reads ``P`` stored (key, value) pairs with ONE attention layer of a chosen kind.

    ``forward(x (B, 2P + 1)) -> logits (B, n_values)`` on :func:`make_lookup_task` data. The memory is
    ``e_key + e_value`` per pair (no encoder, so nothing travels between slots); the query key's
    embedding reads it with softmax attention (``kind="dense"``), with softmax attention over the
    last ``window`` slots only (``kind="local"``: what a query at the end of a sequence reaches in one
    sliding-window layer), or with :class:`LinearMultiHeadAttention` (``kind="linear"``).
    """

    def __init__(
        self,
        kind: str,
        n_keys: int,
        n_values: int = 16,
        d_model: int = 32,
        n_heads: int = 4,
        window: int = 8,
    ) -> None:
        super().__init__()
        if kind not in ("dense", "local", "linear"):
            raise ValueError(f"kind must be 'dense', 'local' or 'linear', got {kind!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.kind, self.window = kind, window
        self.key_emb = nn.Embedding(n_keys, d_model)
        self.value_emb = nn.Embedding(n_values, d_model)
        self.ln_q, self.ln_m = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = (
            LinearMultiHeadAttention(d_model, n_heads) if kind == "linear" else MultiHeadAttention(d_model, n_heads)
        )
        self.head = nn.Sequential(
            nn.LayerNorm(d_model), nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, n_values)
        )

    def forward(
        self, x: torch.Tensor, return_weights: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x (B, 2P + 1)`` -> logits ``(B, n_values)`` (and the read's weights ``(B, h, 1, P)``)."""
        if x.ndim != 2 or x.shape[1] < 3 or x.shape[1] % 2 == 0:
            raise ValueError(f"x must be (B, 2 * n_pairs + 1) token ids, got shape {tuple(x.shape)}")
        P = (x.shape[1] - 1) // 2
        memory = self.ln_m(self.key_emb(x[:, :P]) + self.value_emb(x[:, P : 2 * P]))  # (B, P, d)
        query = self.key_emb(x[:, -1:])  # (B, 1, d)
        mask = None
        if self.kind == "local":
            mask = torch.arange(P, device=x.device) >= P - self.window  # (P,): the last `window` slots
            mask = mask[None, None, :]  # (1, 1, P) -> every example, every head
        read, weights = self.attn(self.ln_q(query), memory, memory, mask=mask, return_weights=True)  # (B, 1, d)
        logits = self.head(query + read)[:, 0]  # (B, n_values)
        return (logits, weights) if return_weights else logits
