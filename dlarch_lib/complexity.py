"""Chapter 21: complexity analysis -- parameters, FLOPs, activation memory, measured scaling.

Closed forms, each checked in the tests against what PyTorch actually builds and computes:

- parameters: :func:`linear_params`, :func:`conv2d_params`, :func:`mha_params`,
  :func:`lstm_params`, :func:`gpt_params`; :func:`seed_conv_params` is the seed's formula
  (section 10.1.2), kept to show where it goes wrong.
- FLOPs of one forward pass: :func:`linear_flops`, :func:`conv2d_flops`, :func:`mha_flops`,
  :func:`lstm_flops`, :func:`gpt_flops`. The convention is ``torch.utils.flop_counter``'s:
  a multiply-add is 2 FLOPs and only matrix products and convolutions are counted (bias adds,
  activations, softmax and normalisation are not). :func:`dlarch_lib.core.measure.forward_flops`
  runs the counter.
- activation memory: :func:`saved_activation_bytes` measures the tensors autograd keeps for
  the backward pass; :func:`mlp_saved_bytes` and :func:`cnn_saved_bytes` predict them.
- :func:`largest_intermediate` counts the elements of the largest tensor a computation creates
  (chapter 7's assignment checks with it that local attention never builds the ``T x T`` matrix).
- arithmetic intensity: :func:`traffic_bytes` (two memory-traffic models) and
  :func:`arithmetic_intensity`; :func:`book_models` gives the book's models at their chapter sizes.
- scaling: :func:`loglog_slope`, the exponent of a measured power law (time the calls with
  :func:`dlarch_lib.core.measure.best_ms`).
- training and inference memory: :func:`attention_saved_bytes` (attention's ``T^2`` probabilities),
  :func:`kv_cache_bytes`, :data:`ADAM_BYTES_PER_PARAM` and :func:`training_state_bytes` (weights,
  gradients, master copies, optimizer state), :class:`CheckpointedSequential` and
  :func:`checkpoint_saved_bytes` (gradient checkpointing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dlarch_lib.cnn import IntOrPair, _pair, conv_output_size
from dlarch_lib.core.measure import forward_flops
from dlarch_lib.core.runtime import seeded
from dlarch_lib.modular import CNNConfig


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# --- parameters ----------------------------------------------------------------------------


def linear_params(d_in: int, d_out: int, bias: bool = True) -> int:
    """Parameters of ``nn.Linear(d_in, d_out)``: ``d_in d_out`` weights plus ``d_out`` biases."""
    _positive(d_in=d_in, d_out=d_out)
    return d_in * d_out + (d_out if bias else 0)


def conv2d_params(c_in: int, c_out: int, kernel: IntOrPair, groups: int = 1, bias: bool = True) -> int:
    """Parameters of ``nn.Conv2d``: ``c_out (c_in / groups) k_h k_w`` weights plus ``c_out`` biases.

    Each output channel sees only the ``c_in / groups`` input channels of its group.
    """
    _positive(c_in=c_in, c_out=c_out, groups=groups)
    kh, kw = _pair(kernel, "kernel", 1)
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide c_in={c_in} and c_out={c_out}")
    return c_out * (c_in // groups) * kh * kw + (c_out if bias else 0)


def seed_conv_params(layers: Sequence[tuple[int, int, int, int]]) -> int:
    """The seed's formula (10.1.2): ``sum_l (W_l H_l C_in^l C_out^l + C_out^l)``, layers ``(W, H, C_in, C_out)``.

    Kept to be compared with the truth: it ignores groups, assumes every layer has a bias, and
    leaves out normalisation and linear layers (see chapter 21).
    """
    total = 0
    for i, layer in enumerate(layers):
        if len(layer) != 4:
            raise ValueError(f"layer {i} must be (kernel_w, kernel_h, c_in, c_out), got {layer!r}")
        w, h, c_in, c_out = layer
        total += w * h * c_in * c_out + c_out
    return total


def mha_params(d_model: int, bias: bool = True) -> int:
    """Parameters of multi-head attention: four ``d x d`` projections (Q, K, V, O), ``4 d^2 + 4 d``.

    Independent of the number of heads: the heads split ``d`` between them.
    """
    _positive(d_model=d_model)
    return 4 * linear_params(d_model, d_model, bias)


def lstm_params(d_in: int, hidden: int, layers: int = 1, biases: int = 2) -> int:
    """Parameters of a unidirectional LSTM: per layer ``4 (h (d + h) + biases h)``.

    Four gates (i, f, g, o), each a ``h x (d + h)`` matrix on ``[x_t, h_{t-1}]``. The textbook
    form (and the seed, 4.2.1) has one bias per gate (``biases=1``); ``nn.LSTM`` keeps two,
    ``b_ih`` and ``b_hh`` (``biases=2``), whose sum is the effective bias. Layers above the
    first take ``d = h``.
    """
    _positive(d_in=d_in, hidden=hidden, layers=layers)
    if biases not in (0, 1, 2):
        raise ValueError(f"biases must be 0, 1 or 2 bias vectors per gate, got {biases!r}")
    per_layer = lambda d: 4 * (hidden * (d + hidden) + biases * hidden)
    return per_layer(d_in) + (layers - 1) * per_layer(hidden)


def gpt_params(vocab_size: int, context: int, d_model: int, n_layers: int, mlp_ratio: int = 4) -> int:
    """Parameters of :class:`dlarch_lib.attention.GPT` (tied output layer).

    Embeddings ``V d + T_max d``; per block two LayerNorms ``4 d``, attention ``4 d^2 + 4 d``
    and the MLP ``2 r d^2 + r d + d``; a final LayerNorm ``2 d``. With ``r = 4``: ``12 d^2 + 13 d``
    per block.
    """
    _positive(vocab_size=vocab_size, context=context, d_model=d_model, n_layers=n_layers, mlp_ratio=mlp_ratio)
    d, r = d_model, mlp_ratio
    block = 4 * d + mha_params(d) + linear_params(d, r * d) + linear_params(r * d, d)
    return vocab_size * d + context * d + n_layers * block + 2 * d


# --- FLOPs (multiply-add = 2; matmuls and convolutions only) -------------------------------


def linear_flops(d_in: int, d_out: int, tokens: int = 1) -> int:
    """Forward FLOPs of ``nn.Linear`` on ``tokens`` input vectors: ``2 tokens d_in d_out`` (bias adds not counted)."""
    _positive(d_in=d_in, d_out=d_out, tokens=tokens)
    return 2 * tokens * d_in * d_out


def conv2d_flops(
    c_in: int,
    c_out: int,
    size: IntOrPair,
    kernel: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    batch: int = 1,
) -> int:
    """Forward FLOPs of ``nn.Conv2d`` on a ``(batch, c_in, H, W)`` input (``size = (H, W)``).

    ``2 N c_out H_out W_out (c_in / groups) k_h k_w``: each output value is a dot product of
    length ``(c_in / groups) k_h k_w``; ``H_out, W_out`` come from :func:`conv_output_size`.
    """
    conv2d_params(c_in, c_out, kernel, groups)  # validates channels, groups, kernel
    _positive(batch=batch)
    (h, w), (kh, kw) = _pair(size, "size", 1), _pair(kernel, "kernel", 1)
    (sh, sw), (ph, pw), (dh, dw) = (
        _pair(stride, "stride", 1),
        _pair(padding, "padding", 0),
        _pair(dilation, "dilation", 1),
    )
    ho, wo = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    return 2 * batch * c_out * ho * wo * (c_in // groups) * kh * kw


def mha_flops(T: int, d_model: int, n_heads: int, T_k: int | None = None, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs of multi-head attention, by term, for ``T`` queries and ``T_k`` keys (default ``T``).

    ``projections``: Q and O on ``T`` tokens, K and V on ``T_k``, ``2 (2 T + 2 T_k) d^2``;
    ``scores``: ``Q K^T`` for every head, ``h * 2 T T_k (d / h) = 2 T T_k d``;
    ``mix``: ``A V``, also ``2 T T_k d``. The head count cancels; ``total`` is the sum.
    """
    _positive(T=T, d_model=d_model, n_heads=n_heads, batch=batch)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    T_k = T if T_k is None else T_k
    _positive(T_k=T_k)
    terms = {
        "projections": batch * (2 * linear_flops(d_model, d_model, T) + 2 * linear_flops(d_model, d_model, T_k)),
        "scores": batch * n_heads * 2 * T * T_k * (d_model // n_heads),
        "mix": batch * n_heads * 2 * T * T_k * (d_model // n_heads),
    }
    return {**terms, "total": sum(terms.values())}


def lstm_flops(d_in: int, hidden: int, T: int, batch: int = 1, layers: int = 1) -> int:
    """Forward matmul FLOPs of an LSTM over ``T`` steps: ``2 B T 4h (d + h)`` per layer (``d = h`` above the first).

    The gate non-linearities and the cell update (``O(B T h)`` elementwise work) are not counted.
    """
    _positive(d_in=d_in, hidden=hidden, T=T, batch=batch, layers=layers)
    per_layer = lambda d: 2 * batch * T * 4 * hidden * (d + hidden)
    return per_layer(d_in) + (layers - 1) * per_layer(hidden)


def gpt_flops(
    T: int, vocab_size: int, d_model: int, n_heads: int, n_layers: int, mlp_ratio: int = 4, batch: int = 1
) -> int:
    """Forward FLOPs of :class:`dlarch_lib.attention.GPT` on ``(batch, T)`` tokens.

    Per block: attention :func:`mha_flops` plus the MLP ``2 * linear_flops(d, r d, T)``; then the
    output layer ``linear_flops(d, V, T)``. Embedding look-ups cost no FLOPs. With ``r = 4`` this
    is ``L (24 T d^2 + 4 T^2 d) + 2 T d V`` per sequence.
    """
    _positive(n_layers=n_layers, mlp_ratio=mlp_ratio, vocab_size=vocab_size)
    d = d_model
    block = mha_flops(T, d, n_heads)["total"] + linear_flops(d, mlp_ratio * d, T) + linear_flops(mlp_ratio * d, d, T)
    return batch * (n_layers * block + linear_flops(d, vocab_size, T))


# --- activation memory ---------------------------------------------------------------------


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``model(x)``, parameters excluded.

    Measured with ``torch.autograd.graph.saved_tensors_hooks``: every saved tensor passes through
    the pack hook. A tensor saved by two ops (a ReLU output that the next layer also saves) or a
    view of another counts once: storages are keyed by their address. Under ``torch.no_grad()``
    nothing is saved and the answer is 0.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out  # frees the graph; the storages were counted while it was alive
    return sum(storages.values())


def mlp_saved_bytes(batch: int, widths: Sequence[int], dtype_bytes: int = 4) -> int:
    """Predicted :func:`saved_activation_bytes` of a Linear-ReLU MLP ``widths[0] -> ... -> widths[-1]``.

    Each ``Linear`` saves its input and each ``ReLU`` its output, which is the next ``Linear``'s
    input (one tensor): ``dtype_bytes * batch * sum(widths[:-1])``. The logits are not saved.
    """
    _positive(batch=batch, dtype_bytes=dtype_bytes)
    if len(widths) < 2:
        raise ValueError(f"an MLP needs at least an input and an output width, got {list(widths)}")
    return dtype_bytes * batch * sum(widths[:-1])


def cnn_saved_bytes(config: CNNConfig, batch: int, dtype_bytes: int = 4) -> int:
    """Predicted :func:`saved_activation_bytes` of ``build_model(config)`` (``norm='none'``), per ``batch``.

    Per conv block at input side ``S`` with ``C_in -> C`` channels: the conv input
    ``C_in S^2`` and the ReLU output ``C S^2`` (``dtype_bytes`` each; the max-pool saves that same
    tensor) plus the pool's int64 argmax indices ``C (S/2)^2`` (8 bytes each). Then the head saves
    its input, the last pooled map.
    """
    if not isinstance(config, CNNConfig) or config.norm != "none":
        raise ValueError("cnn_saved_bytes models a CNNConfig with norm='none'")
    _positive(batch=batch, dtype_bytes=dtype_bytes)
    channels = [config.in_channels] + [config.width * 2**i for i in range(config.depth)]
    side, total = config.image_size, 0
    for c_in, c in zip(channels, channels[1:]):
        total += dtype_bytes * (c_in + c) * side**2 + 8 * c * (side // 2) ** 2
        side //= 2
    return batch * (total + dtype_bytes * channels[-1] * side**2)


class _OpRecorder(TorchDispatchMode):
    """Watches every non-view aten op (views allocate and move nothing).

    ``bytes``: the bytes the ops read (tensor inputs) and write (tensor outputs);
    ``largest_numel``: the element count of the largest tensor an op returned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.bytes, self.largest_numel = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            outputs = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.largest_numel = max([self.largest_numel, *outputs])
        return out


def largest_intermediate(fn: Callable[[], Any]) -> int:
    """Elements of the largest tensor that any operation creates while ``fn()`` runs.

    Views (``unfold``, ``transpose``, slicing) allocate nothing and are not counted; tensors made
    before the call are not counted either. A memory check without allocator statistics: local
    attention over ``T`` positions stays far below the ``T * T`` elements of a dense score matrix.
    """
    if not callable(fn):
        raise TypeError(f"fn must be a callable taking no arguments, got {type(fn).__name__}")
    mode = _OpRecorder()
    with mode:
        fn()
    return mode.largest_numel


# --- arithmetic intensity ------------------------------------------------------------------


def traffic_bytes(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Two models of the memory traffic of one forward pass of ``model(x)`` (no grad).

    ``ideal``: parameters, input and output each cross the memory bus once (a perfect cache,
    the least traffic any implementation needs); ``unfused``: every aten op reads its inputs and
    writes its output from memory (what eager PyTorch does when tensors exceed the cache).
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    mode = _OpRecorder()
    with torch.no_grad(), mode:
        out = model(x)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    ideal = params + x.numel() * x.element_size() + sum(t.numel() * t.element_size() for t in outs)
    return {"ideal": ideal, "unfused": mode.bytes}


def arithmetic_intensity(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of ``model(x)`` (flop counter), both traffic models, and FLOPs per byte for each."""
    flops = forward_flops(model, x)
    traffic = traffic_bytes(model, x)
    return {
        "flops": flops,
        **{f"{k}_bytes": v for k, v in traffic.items()},
        **{f"{k}_intensity": flops / v for k, v in traffic.items()},
    }


def book_models(
    vocab_size: int, batch: int = 1, *, device: torch.device | str
) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """The book's models at their chapter ("ci") sizes, each with an example input of ``batch`` examples.

    ``SmallResNet`` (chapter 4, width 32) on ``(B, 1, 8, 8)`` digits; ``GPT`` (chapter 6: context 64,
    d 64, 4 heads, 2 layers) and ``CharLSTM`` (chapter 5: embed 64, hidden 256) on ``(B, 64)`` ids.
    The CharLSTM's LSTM is replaced by the from-scratch :class:`dlarch_lib.rnn.LSTM` with the same
    weights, because the flop counter cannot see inside the fused ``nn.LSTM`` kernel.
    Models (in eval mode) and inputs are made on the CPU inside ``seeded(0)`` -- the same on every
    machine, the caller's random stream untouched -- then moved to ``device``.
    """
    from dlarch_lib.attention import GPT
    from dlarch_lib.cnn import SmallResNet
    from dlarch_lib.rnn import LSTM, CharLSTM

    _positive(vocab_size=vocab_size, batch=batch)
    with seeded(0):
        ids = torch.randint(0, vocab_size, (batch, 64))
        lstm_lm = CharLSTM(vocab_size, embed=64, hidden=256)
        lstm_lm.lstm = LSTM.from_torch(lstm_lm.lstm)  # type: ignore[assignment]  # same interface, countable
        models = {
            "SmallResNet (ch. 4)": (SmallResNet(width=32), torch.randn(batch, 1, 8, 8)),
            "GPT (ch. 6)": (GPT(vocab_size, 64, 64, 4, 2), ids),
            "CharLSTM (ch. 5)": (lstm_lm, ids),
        }
    return {name: (model.to(device).eval(), x.to(device)) for name, (model, x) in models.items()}


# --- measured scaling ----------------------------------------------------------------------


def loglog_slope(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(times)`` against ``log(sizes)``: the exponent ``p`` in ``time ~ size^p``."""
    n, t = np.asarray(sizes, dtype=float), np.asarray(times, dtype=float)
    if n.shape != t.shape or n.ndim != 1 or len(n) < 2:
        raise ValueError(f"need two equal-length 1-D sequences of at least 2 points, got {n.shape} and {t.shape}")
    if (n <= 0).any() or (t <= 0).any():
        raise ValueError("sizes and times must be positive to take logarithms")
    return float(np.polyfit(np.log(n), np.log(t), 1)[0])


# --- training memory: attention, the KV cache, optimizer state, checkpointing --------------


def attention_saved_bytes(
    batch: int, T: int, d_model: int, n_heads: int, masked: bool = False, dtype_bytes: int = 4
) -> int:
    """Predicted :func:`saved_activation_bytes` of ``attention.MultiHeadAttention(d_model, n_heads)``
    in self-attention on a ``(batch, T, d_model)`` input (dropout 0).

    Linear in ``T``: the input (saved by the Q, K, V projections, one tensor), contiguous copies of
    Q, of ``K^T`` and of V (the matmuls save their operands), and the concatenated heads (the output
    projection's input): ``5 B T d`` numbers. Quadratic in ``T``: the softmax output, ``B h T^2``
    numbers, saved by the softmax and by ``A V``. With a boolean ``(T, T)`` mask the masked weights
    are a second ``B h T^2`` tensor, and each of the two ``masked_fill`` calls saves its own inverted
    mask (``T^2`` bytes each).
    """
    _positive(batch=batch, T=T, d_model=d_model, n_heads=n_heads, dtype_bytes=dtype_bytes)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
    linear = dtype_bytes * 5 * batch * T * d_model
    quadratic = dtype_bytes * batch * n_heads * T * T
    if masked:
        quadratic = 2 * quadratic + 2 * T * T  # the masked weights, and two bool masks of one byte
    return linear + quadratic


def kv_cache_bytes(
    n_layers: int, T: int, d_model: int, batch: int = 1, dtype_bytes: int = 2, d_kv: int | None = None
) -> int:
    """Bytes of a key/value cache: ``2 L B T d_kv b`` (a key and a value of width ``d_kv`` per layer and position).

    ``d_kv`` defaults to ``d_model`` (multi-head attention: ``h`` heads of width ``d / h``); with
    grouped-query attention it is ``h_kv d / h`` for ``h_kv`` key/value heads.
    """
    d_kv = d_model if d_kv is None else d_kv
    _positive(n_layers=n_layers, T=T, d_model=d_model, batch=batch, dtype_bytes=dtype_bytes, d_kv=d_kv)
    return 2 * n_layers * batch * T * d_kv * dtype_bytes


ADAM_BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "fp32": {"weights": 4, "grads": 4, "adam m": 4, "adam v": 4},
    "mixed, fp32 master": {"weights": 2, "grads": 2, "master weights": 4, "adam m": 4, "adam v": 4},
    "autocast": {"weights": 4, "grads": 4, "adam m": 4, "adam v": 4, "fp16 weight copies": 2},
}
"""Bytes per parameter of training with Adam, by layout (the sums are 16, 16 and 18).

``fp32``: everything in single precision. ``mixed, fp32 master``: the model (weights and
gradients) in half precision, the optimizer on a single-precision master copy (Micikevicius et
al.; ZeRO's ``2 + 2 + 12``). ``autocast``: an fp32 model whose matrix products run in half
precision; the half-precision copies of the weights live through forward and backward.
"""


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes held for training ``model`` with ``optimizer``, measured from the tensors themselves.

    ``weights``: the model's parameters; ``grads``: their ``.grad``; ``master``: parameters the
    optimizer updates that are not the model's (a master copy in mixed precision) and their grads;
    ``optimizer``: every tensor in ``optimizer.state`` (Adam: ``exp_avg``, ``exp_avg_sq`` and a
    one-number ``step`` per parameter tensor). Storages are counted once; ``total`` is the sum.
    """
    if not isinstance(model, nn.Module) or not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"need an nn.Module and a torch.optim.Optimizer, got {type(model).__name__}, {type(optimizer).__name__}"
        )
    seen: set[int] = set()

    def nbytes(tensors: Sequence[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    own = {id(p) for p in params}
    opt_params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    out = {
        "weights": nbytes(params),
        "grads": nbytes([p.grad for p in params]),
        "master": nbytes(opt_params) + nbytes([p.grad for p in opt_params]),
        "optimizer": nbytes(state),
    }
    return {**out, "total": sum(out.values())}


class CheckpointedSequential(nn.Module):
    """An ``nn.Sequential`` run in ``segments`` pieces with ``torch.utils.checkpoint.checkpoint_sequential``.

    In training each segment but the last keeps only its input; its inner activations are recomputed
    in the backward pass (non-reentrant checkpointing). ``segments=1`` is the plain network.
    Under ``torch.no_grad()`` it runs the plain network: nothing would be saved anyway.
    """

    def __init__(self, net: nn.Sequential, segments: int) -> None:
        super().__init__()
        if not isinstance(net, nn.Sequential):
            raise TypeError(f"net must be an nn.Sequential, got {type(net).__name__}")
        _positive(segments=segments)
        if segments > len(net):
            raise ValueError(f"segments ({segments}) must not exceed the number of modules ({len(net)})")
        self.net, self.segments = net, segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``net(x)``, checkpointed when autograd records."""
        if self.segments == 1 or not torch.is_grad_enabled():
            return self.net(x)
        from torch.utils.checkpoint import checkpoint_sequential

        return cast(torch.Tensor, checkpoint_sequential(self.net, self.segments, x, use_reentrant=False))


def checkpoint_saved_bytes(n_blocks: int, segments: int, block_bytes: int) -> int:
    """Predicted saved bytes of a chain of ``n_blocks`` blocks cut into ``segments`` equal checkpointed segments.

    Each block saves its input and one output of ``block_bytes`` that the next block saves as its
    input (Linear then ReLU), so the plain chain saves ``(n + 1)`` such tensors. Checkpointed, each of
    the first ``k - 1`` segments keeps only its input and the last segment (``n / k`` blocks) saves as
    usual: ``(k + n / k) block_bytes``, smallest near ``k = sqrt(n)``.
    """
    _positive(n_blocks=n_blocks, segments=segments, block_bytes=block_bytes)
    if n_blocks % segments:
        raise ValueError(f"segments ({segments}) must divide n_blocks ({n_blocks})")
    return (segments + n_blocks // segments) * block_bytes
