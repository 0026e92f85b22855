"""Recurrent networks: an LSTM written from scratch, gradient-flow probes, a character LM.

- :class:`LSTMCell` and :class:`LSTM` compute exactly what ``nn.LSTMCell`` / ``nn.LSTM``
  compute (same parameter names and gate order i, f, g, o), so weights copy both ways.
- :func:`input_gradient_norms` measures how much the last output depends on each input,
  the quantity that vanishes in a plain RNN (Bengio et al., 1994).
- :class:`CharLSTM`, :func:`lm_step`, :func:`train_char_lm` and :func:`eval_nats` make a
  character-level language model trained for a fixed number of steps (chapter 6 reuses the
  last three for a Transformer at the same compute budget).
- :func:`generate` is the book's one sampler for every language model (chapters 5, 6 and 26),
  with temperature and top-k (:func:`sampling_probs`).

Shapes: B batch, T time, I input size, H hidden size, L layers, V vocabulary.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.text import CharCorpus
from dlarch_lib.core.train import Evaluate, History, Step, fit, model_device

State = tuple[torch.Tensor, torch.Tensor]


class LSTMCell(nn.Module):
    """One LSTM step, written out. Same parameters and gate order (i, f, g, o) as ``nn.LSTMCell``.

    ``weight_ih`` is ``(4H, I)``, ``weight_hh`` is ``(4H, H)``; row blocks are the input gate,
    forget gate, candidate ``g`` and output gate. Stacking ``[weight_hh | weight_ih]`` gives the
    single matrix ``W`` that multiplies the concatenation ``[h_{t-1}, x_t]`` in the textbook form.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size} and {hidden_size}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))  # (4H, I)
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))  # (4H, H)
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))  # (4H,)
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))  # (4H,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's initialisation: every entry uniform in ``[-1/sqrt(H), 1/sqrt(H)]``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def gates(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four gate activations ``(i, f, g, o)``, each ``(B, H)``, for input ``x`` and state ``h``."""
        z = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh  # (B, 4H)
        z_i, z_f, z_g, z_o = z.chunk(4, dim=-1)  # 4 x (B, H)
        return torch.sigmoid(z_i), torch.sigmoid(z_f), torch.tanh(z_g), torch.sigmoid(z_o)

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        """One step: ``x (B, I)``, ``state = (h, c)`` each ``(B, H)`` (zeros if None) -> new ``(h, c)``."""
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"LSTMCell expects x of shape (B, {self.input_size}), got {tuple(x.shape)}")
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            state = (zeros, zeros)
        h, c = state
        if h.shape != (x.shape[0], self.hidden_size) or c.shape != h.shape:
            raise ValueError(
                f"state (h, c) must both be {(x.shape[0], self.hidden_size)}, got {tuple(h.shape)} and {tuple(c.shape)}"
            )
        i, f, g, o = self.gates(x, h)
        c = f * c + i * g  # the cell state: the constant error carousel when f = 1
        h = o * torch.tanh(c)
        return h, c

    @classmethod
    def from_torch(cls, ref: nn.LSTMCell) -> LSTMCell:
        """A copy of ``ref`` (an ``nn.LSTMCell`` with biases) as a from-scratch cell."""
        if ref.bias is False:
            raise ValueError("only LSTM cells with biases are supported (bias=True)")
        cell = cls(ref.input_size, ref.hidden_size).to(ref.weight_ih.device, ref.weight_ih.dtype)
        cell.load_state_dict(ref.state_dict())  # identical parameter names and layouts
        return cell


class LSTM(nn.Module):
    """A stack of :class:`LSTMCell` unrolled over time; the interface of ``nn.LSTM`` (unidirectional).

    ``forward(x, (h0, c0))`` with ``x (B, T, I)`` (or ``(T, B, I)`` if ``batch_first=False``) and
    ``h0, c0 (L, B, H)`` returns ``out (B, T, H)`` (top layer's ``h`` at every step) and ``(h_n, c_n)``.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first = batch_first
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(LSTMCell(n_in, hidden_size) for n_in in sizes)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Run the whole sequence; see the class docstring for shapes."""
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"LSTM expects a 3-D input with last dimension {self.input_size}, got {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I) -> (B, T, I)
        batch, steps = x.shape[:2]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            state = (zeros, zeros)
        expected = (self.num_layers, batch, self.hidden_size)
        if state[0].shape != expected or state[1].shape != expected:
            raise ValueError(
                f"state (h0, c0) must both be {expected}, got {tuple(state[0].shape)} and {tuple(state[1].shape)}"
            )
        layer_input = x  # (B, T, I) for layer 0, (B, T, H) above
        h_n, c_n = [], []
        for layer, cell in enumerate(self.cells):
            h, c = state[0][layer], state[1][layer]  # (B, H)
            outputs = []
            for t in range(steps):
                h, c = cell(layer_input[:, t], (h, c))
                outputs.append(h)
            layer_input = torch.stack(outputs, dim=1)  # (B, T, H)
            h_n.append(h)
            c_n.append(c)
        out = layer_input if self.batch_first else layer_input.transpose(0, 1)
        return out, (torch.stack(h_n), torch.stack(c_n))  # (B, T, H), 2 x (L, B, H)

    @classmethod
    def from_torch(cls, ref: nn.LSTM) -> LSTM:
        """Copy the weights of ``ref`` (``nn.LSTM``: unidirectional, with biases, no projection)."""
        if ref.bidirectional or ref.proj_size or not ref.bias:
            raise ValueError("only unidirectional nn.LSTM with biases and no projection (proj_size=0) is supported")
        model = cls(ref.input_size, ref.hidden_size, ref.num_layers, ref.batch_first)
        first = ref.all_weights[0][0]  # weight_ih_l0
        model.to(first.device, first.dtype)
        with torch.no_grad():
            for k, cell in enumerate(model.cells):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(ref, f"{name}_l{k}"))
        return model

    def to_torch(self) -> nn.LSTM:
        """An ``nn.LSTM`` holding a copy of these weights (so it runs the fused/cuDNN kernel)."""
        first = next(self.parameters())  # cells[0].weight_ih
        ref = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, batch_first=self.batch_first)
        ref.to(first.device, first.dtype)
        with torch.no_grad():
            for k, cell in enumerate(self.cells):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref, f"{name}_l{k}").copy_(getattr(cell, name))
        return ref


def set_forget_bias(lstm: nn.Module, value: float) -> nn.Module:
    """Set the forget-gate bias of every layer of an ``nn.LSTM``/:class:`LSTM` to ``value`` (in place).

    The effective bias is ``bias_ih + bias_hh``; rows ``H:2H`` are the forget gate. We put
    ``value`` in ``bias_ih`` and zero in ``bias_hh``. Returns ``lstm`` for chaining.
    """
    H = getattr(lstm, "hidden_size", None)
    if not isinstance(H, int):
        raise ValueError(f"set_forget_bias needs an LSTM with an int hidden_size, got {type(lstm).__name__}")
    biases = [(n, p) for n, p in lstm.named_parameters() if n.split(".")[-1].startswith(("bias_ih", "bias_hh"))]
    if not biases:
        raise ValueError("set_forget_bias needs an LSTM with bias_ih/bias_hh parameters")
    with torch.no_grad():
        for name, p in biases:
            p[H : 2 * H] = value if "bias_ih" in name else 0.0
    return lstm


def input_gradient_norms(rnn: nn.Module, steps: int, batch: int = 32, seed: int = 0) -> torch.Tensor:
    """``||dL/dx_t||`` for ``L`` = sum of the last step's output, by distance ``d = T-1-t`` from the end.

    ``rnn`` is a batch-first recurrent module (``nn.RNN``, ``nn.LSTM``, :class:`LSTM`, ...) whose
    ``forward`` returns ``(out (B, T, H), state)``. Inputs are standard normal, seeded. Returns
    ``(steps,)``: entry ``d`` is the mean over the batch of the per-sequence gradient norm at ``x_{T-1-d}``.
    """
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got {steps} and {batch}")
    input_size = getattr(rnn, "input_size", None)
    if not getattr(rnn, "batch_first", False) or not isinstance(input_size, int):
        raise ValueError("input_gradient_norms needs a batch_first recurrent module with an int input_size")
    param = next(rnn.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, input_size, generator=g).to(param.device, param.dtype).requires_grad_(True)
    out, _ = rnn(x)  # (B, T, H)
    (grad,) = torch.autograd.grad(out[:, -1].sum(), x)  # (B, T, I)
    norms = grad.norm(dim=-1).mean(dim=0)  # (T,)
    return norms.flip(0).detach().cpu()  # index = distance from the last step


class CharLSTM(nn.Module):
    """Character-level language model: embedding -> ``nn.LSTM`` -> linear read-out to ``V`` logits.

    It uses PyTorch's fused ``nn.LSTM`` for speed; :class:`LSTM` computes the same function.
    """

    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 256, layers: int = 1) -> None:
        super().__init__()
        if min(vocab_size, embed, hidden, layers) < 1:
            raise ValueError(
                f"vocab_size, embed, hidden and layers must be >= 1, got {(vocab_size, embed, hidden, layers)}"
            )
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """``idx (B, T)`` character ids -> logits ``(B, T, V)`` for the next character, and the final state."""
        if idx.ndim != 2:
            raise ValueError(f"CharLSTM expects ids of shape (B, T), got {tuple(idx.shape)}")
        out, state = self.lstm(self.embed(idx), state)  # (B, T, H)
        return self.head(out), state


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """The distribution a sampler draws from: ``softmax(logits / T)`` restricted to the ``top_k`` largest.

    ``logits`` ``(..., V)`` -> probabilities ``(..., V)`` in float32. Below ``T = 1`` the distribution is
    sharper, above it flatter; ``temperature == 0`` means greedy: all mass on the argmax. Ties at the
    k-th value are broken by :func:`torch.topk` (exactly ``k`` entries survive).
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


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    n: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``n`` tokens after ``prompt`` (ids ``(B, T0)``, ``T0 >= 1``) from a language model: ``(B, T0 + n)``.

    The book's one sampler, for every language model. ``model`` maps ids ``(B, T)`` to next-token
    logits ``(B, T, V)``, or to ``(logits, state)`` like :class:`CharLSTM`. A model with a state
    reads the prompt once and then only each new token, its state carried forward (one recurrent
    step per token); a model without one re-reads the sequence so far, cut to its last
    ``model.context`` tokens if it has that attribute (a Transformer's positions end there).
    Each token is drawn from :func:`sampling_probs` (``temperature``, ``top_k``; ``temperature=0``
    is greedy and draws nothing) with ``generator``, which must live on the model's device. The
    prompt is moved to the model's device; the model samples in eval mode and gets its mode back.
    """
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be (B, T0) ids with T0 >= 1, got shape {tuple(prompt.shape)}")
    if n < 0 or temperature < 0:
        raise ValueError(f"need n >= 0 and temperature >= 0, got n={n}, temperature={temperature}")
    context = getattr(model, "context", None)
    idx = prompt.to(model_device(model))  # (B, T0)
    state: Any = None
    was_training = model.training
    model.eval()
    for _ in range(n):
        out = model(idx[:, -context:] if context else idx) if state is None else model(idx[:, -1:], state)
        logits, state = out if isinstance(out, tuple) else (out, None)  # (B, T, V), state or None
        probs = sampling_probs(logits[:, -1], temperature, top_k)  # (B, V)
        if temperature == 0:
            nxt = probs.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of a model that returns either logits or ``(logits, extra)``."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def lm_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A language model's training step: the mean cross-entropy of the next character at every position.

    ``batch`` is ``(x, y)``: windows of ids ``(B, T)`` and the same windows one character later, so
    position ``t`` of the logits ``(B, T, V)`` is scored on ``y[:, t] = x[:, t + 1]``. All ``T``
    predictions come out of one pass. A recurrent model starts every window from a zero state
    (no state is carried between batches), as :func:`eval_nats` scores it.
    """
    x, y = batch
    logits = _logits(model, x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def eval_nats(
    model: nn.Module,
    corpus: CharCorpus,
    *,
    split: str = "val",
    context: int = 128,
    batch_size: int = 64,
    max_windows: int | None = None,
) -> float:
    """Mean cross-entropy in nats/char over non-overlapping windows of ``context`` characters.

    Deterministic: the windows tile the whole split, or ``max_windows`` of them spread evenly
    over it. Each window starts from a fresh state, as a Transformer with that context would.
    Works for any model mapping ids ``(B, T)`` to logits ``(B, T, V)`` (or ``(logits, state)``),
    on the model's device.
    """
    data = {"train": corpus.train, "val": corpus.val}.get(split)
    if data is None:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    windows = (len(data) - 1) // context
    if windows < 1:
        raise ValueError(f"context {context} is longer than the {split} text ({len(data)})")
    index = torch.arange(windows)  # (W,)
    if max_windows is not None and max_windows < windows:
        index = torch.linspace(0, windows - 1, max(max_windows, 1)).long()  # evenly spread
    device = model_device(model)
    was_training = model.training
    model.eval()
    starts = index * context  # (W,)
    offsets = torch.arange(context)  # (T,)
    total, count = 0.0, 0
    for chunk in starts.split(batch_size):
        x = data[chunk[:, None] + offsets].to(device)  # (b, T)
        y = data[chunk[:, None] + offsets + 1].to(device)  # (b, T)
        logits = _logits(model, x)  # (b, T, V)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def train_char_lm(
    model: nn.Module,
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
    desc: str = "train",
) -> History:
    """Train a next-character model with :func:`lm_step` on random windows, through the book's ``fit``.

    Each step draws ``batch_size`` random training windows of ``context`` characters (seeded by
    ``seed``); AdamW without weight decay at ``lr``, gradient norm clipped at ``clip_grad_norm``.
    The run stops after exactly ``steps`` steps, never on a clock, so its result does not depend on
    the speed of the machine or on what else runs on it: a chapter that compares models at equal
    cost converts the cost into a number of steps first. Every ``eval_every`` steps the validation
    loss :func:`eval_nats` on ``eval_windows`` windows spread over the split is recorded. Returns
    the :class:`~dlarch_lib.core.train.History`: ``loss`` per step, ``val_loss`` at ``eval_steps``
    (nats/char). The device is the model's.
    """
    if min(batch_size, context) < 1:
        raise ValueError(f"batch_size and context must be >= 1, got {batch_size} and {context}")
    return train_on_stream(
        model,
        lambda gen: corpus.batch("train", batch_size, context, gen),  # (B, T), (B, T)
        lm_step,
        lambda m: {"loss": eval_nats(m, corpus, context=context, max_windows=eval_windows)},
        steps=steps,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        clip_grad_norm=clip_grad_norm,
        progress=progress,
        desc=desc,
    )


def train_on_stream(
    model: nn.Module,
    draw_batch: Callable[[torch.Generator], Any],
    step: Step,
    evaluate: Evaluate,
    *,
    steps: int,
    lr: float,
    seed: int = 0,
    eval_every: int = 100,
    clip_grad_norm: float = 1.0,
    progress: bool = True,
    desc: str = "train",
) -> History:
    """The book's language-model recipe: ``fit`` on a fresh batch ``draw_batch(generator)`` per step.

    AdamW without weight decay at ``lr``, gradient norm clipped at ``clip_grad_norm``, exactly
    ``steps`` steps, ``evaluate(model)`` every ``eval_every`` steps; the batches draw from one
    generator seeded by ``seed``. :func:`train_char_lm` (chapter 5) and
    :func:`dlarch_lib.lm.train_mlm` (chapter 26) are this recipe with their batch, step and evaluation.
    """
    if min(steps, eval_every) < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    gen = torch.Generator().manual_seed(seed)
    return fit(
        model,
        (draw_batch(gen) for _ in itertools.count()),
        step,
        steps=steps,
        optimizer="adamw",
        lr=lr,
        clip_grad_norm=clip_grad_norm,
        evaluate=evaluate,
        eval_every=eval_every,
        progress=progress,
        desc=desc,
    )


# --- chapter 5, part 2: a long-dependency task, the GRU, truncated BPTT, bidirectional stacks --------------


def adding_problem(batch: int, steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The adding problem (Hochreiter and Schmidhuber, 1997; in the form of Le et al., 2015).

    Each of ``batch`` sequences has ``steps`` time steps of two features: a value drawn uniformly
    from ``[0, 1)`` and a marker that is 1 at exactly two steps, one in the first half
    (``t < steps // 2``) and one in the second, 0 elsewhere. The target is the sum of the two
    marked values. Returns ``x (B, T, 2)`` (value, marker) and ``y (B,)``, drawn on the CPU from
    ``generator`` (a CPU ``torch.Generator``).
    """
    if batch < 1 or steps < 2:
        raise ValueError(f"adding_problem needs batch >= 1 and steps >= 2, got {batch} and {steps}")
    values = torch.rand(batch, steps, generator=generator)  # (B, T)
    half = steps // 2
    first = torch.randint(0, half, (batch,), generator=generator)  # (B,) in [0, T/2)
    second = torch.randint(half, steps, (batch,), generator=generator)  # (B,) in [T/2, T)
    markers = torch.zeros(batch, steps)  # (B, T)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=-1)  # (B, T, 2)
    y = (values * markers).sum(dim=1)  # (B,)
    return x, y


class SequenceRegressor(nn.Module):
    """A recurrent layer (``"rnn"``: tanh ``nn.RNN``, ``"lstm"``, ``"gru"``) with a linear read-out at the last step.

    ``forward(x)`` maps ``x (B, T, I)`` to one number per sequence, ``(B,)``: the regression output
    for tasks such as :func:`adding_problem`. PyTorch's fused layers are used for speed; the chapter
    proves :class:`LSTMCell` and :class:`GRUCell` equal to their cells first.
    """

    KINDS: dict[str, type[nn.Module]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size} and {hidden_size}")
        self.kind, self.input_size, self.hidden_size = kind, input_size, hidden_size
        self.rnn = self.KINDS[kind](input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, T, I)`` -> ``(B,)``: the linear read-out of the last hidden state."""
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"SequenceRegressor expects x of shape (B, T, {self.input_size}), got {tuple(x.shape)}")
        out, _ = self.rnn(x)  # (B, T, H)
        return self.head(out[:, -1]).squeeze(-1)  # (B,)


def mse_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A regression step for ``fit``: the mean squared error of ``model(x)`` against ``y`` (same shape)."""
    x, y = batch
    pred = model(x)
    if pred.shape != y.shape:
        raise ValueError(f"the model's output {tuple(pred.shape)} does not match the target {tuple(y.shape)}")
    return F.mse_loss(pred, y)


class GRUCell(nn.Module):
    """One GRU step, written out. Same parameters and gate order (r, z, n) as ``nn.GRUCell``.

    ``weight_ih`` is ``(3H, I)`` and ``weight_hh`` is ``(3H, H)``; their row blocks are the reset
    gate ``r``, the update gate ``z`` and the candidate ``n``. The reset gate multiplies the recurrent
    part of the candidate *after* its bias, ``r * (W_hn h + b_hn)``, as PyTorch (and cuDNN) do.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size} and {hidden_size}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size))  # (3H, I)
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))  # (3H, H)
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size))  # (3H,)
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size))  # (3H,)
        bound = 1.0 / math.sqrt(hidden_size)  # PyTorch's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def gates(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reset gate ``r``, update gate ``z`` and candidate ``n``, each ``(B, H)``."""
        i_r, i_z, i_n = (x @ self.weight_ih.T + self.bias_ih).chunk(3, dim=-1)  # 3 x (B, H)
        h_r, h_z, h_n = (h @ self.weight_hh.T + self.bias_hh).chunk(3, dim=-1)  # 3 x (B, H)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return r, z, torch.tanh(i_n + r * h_n)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """One step: ``x (B, I)`` and ``h (B, H)`` (zeros if None) -> the new ``h (B, H)``."""
        if x.ndim != 2 or x.shape[1] != self.input_size:
            raise ValueError(f"GRUCell expects x of shape (B, {self.input_size}), got {tuple(x.shape)}")
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        if h.shape != (x.shape[0], self.hidden_size):
            raise ValueError(f"h must be {(x.shape[0], self.hidden_size)}, got {tuple(h.shape)}")
        r, z, n = self.gates(x, h)
        return (1 - z) * n + z * h  # z is the fraction of the old state kept

    @classmethod
    def from_torch(cls, ref: nn.GRUCell) -> GRUCell:
        """A copy of ``ref`` (an ``nn.GRUCell`` with biases) as a from-scratch cell."""
        if ref.bias is False:
            raise ValueError("only GRU cells with biases are supported (bias=True)")
        cell = cls(ref.input_size, ref.hidden_size).to(ref.weight_ih.device, ref.weight_ih.dtype)
        cell.load_state_dict(ref.state_dict())  # identical parameter names and layouts
        return cell


class BiLSTM(nn.Module):
    """A stacked bidirectional LSTM made of :class:`LSTM` layers; the interface of ``nn.LSTM(bidirectional=True)``.

    Layer ``l`` runs one LSTM forward in time and another over the time-reversed sequence, then
    concatenates their outputs step by step, so every output sees the whole sequence. The next layer
    reads those ``2H`` features. ``forward(x)`` with ``x (B, T, I)`` (batch first, zero initial state)
    returns ``out (B, T, 2H)`` (forward half first) and ``(h_n, c_n)``, each ``(2L, B, H)`` in
    PyTorch's order: layer 0 forward, layer 0 backward, layer 1 forward, ...
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) < 1:
            raise ValueError(
                f"input_size, hidden_size and num_layers must be >= 1, got {(input_size, hidden_size, num_layers)}"
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        sizes = [input_size] + [2 * hidden_size] * (num_layers - 1)
        self.forward_layers = nn.ModuleList(LSTM(n_in, hidden_size) for n_in in sizes)
        self.backward_layers = nn.ModuleList(LSTM(n_in, hidden_size) for n_in in sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Run the stack over ``x (B, T, I)``; see the class docstring for shapes."""
        if x.ndim != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"BiLSTM expects x of shape (B, T, {self.input_size}), got {tuple(x.shape)}")
        h_n, c_n = [], []
        layer_input = x  # (B, T, I), then (B, T, 2H)
        for fwd, bwd in zip(self.forward_layers, self.backward_layers, strict=True):
            out_f, (h_f, c_f) = fwd(layer_input)  # (B, T, H), 2 x (1, B, H)
            out_b, (h_b, c_b) = bwd(layer_input.flip(1))  # reads x_T first
            layer_input = torch.cat([out_f, out_b.flip(1)], dim=-1)  # (B, T, 2H), aligned in time
            h_n += [h_f[0], h_b[0]]
            c_n += [c_f[0], c_b[0]]
        return layer_input, (torch.stack(h_n), torch.stack(c_n))  # (B, T, 2H), 2 x (2L, B, H)

    @classmethod
    def from_torch(cls, ref: nn.LSTM) -> BiLSTM:
        """Copy the weights of a bidirectional, batch-first ``nn.LSTM`` with biases and no projection."""
        if not ref.bidirectional or not ref.batch_first or ref.proj_size or not ref.bias:
            raise ValueError("from_torch needs a bidirectional, batch_first nn.LSTM with biases and proj_size=0")
        model = cls(ref.input_size, ref.hidden_size, ref.num_layers)
        first = ref.all_weights[0][0]  # weight_ih_l0
        model.to(first.device, first.dtype)
        with torch.no_grad():
            for k in range(ref.num_layers):
                for suffix, layers in (("", model.forward_layers), ("_reverse", model.backward_layers)):
                    layer = layers[k]
                    assert isinstance(layer, LSTM)  # one single-layer LSTM per direction and layer
                    cell = layer.cells[0]
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(cell, name).copy_(getattr(ref, f"{name}_l{k}{suffix}"))
        return model


RecurrentState = torch.Tensor | tuple[torch.Tensor, ...]


def detach_state(state: RecurrentState) -> RecurrentState:
    """The same state cut from the graph: a tensor (``nn.RNN``/``nn.GRU``) or a tuple ``(h, c)`` (``nn.LSTM``)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)


def tbptt(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor | None],
    state: Any = None,
) -> tuple[float, Any]:
    """Truncated backpropagation through time: forward and backward ``k`` steps at a time.

    ``model`` is a batch-first recurrent module, ``model(chunk, state) -> (out, state)``, and ``x`` is
    ``(B, T, I)``. For each chunk ``x[:, s : s + k]`` the model runs from the carried state,
    ``loss_fn(out_chunk, s)`` scores its outputs (``None`` when the chunk has nothing to score), the
    loss is backpropagated at once, and the state is detached before the next chunk. So no gradient
    flows further back than the start of its chunk, and autograd never holds more than ``k`` steps of
    activations. Gradients accumulate in ``.grad`` (call ``zero_grad`` before, ``step`` after).
    Returns the summed loss and the final (detached) state.
    """
    if x.ndim != 3:
        raise ValueError(f"tbptt expects x of shape (B, T, I), got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"the truncation length k must be >= 1, got {k}")
    total = 0.0
    for start in range(0, x.shape[1], k):
        out, state = model(x[:, start : start + k], state)  # (B, <=k, H)
        loss = loss_fn(out, start)
        if loss is not None:
            loss.backward()  # frees this chunk's graph
            total += loss.item()
        state = detach_state(state)  # the truncation: the next chunk starts a new graph
        del out, loss  # an unscored chunk's graph goes now, not after the next chunk's forward
    return total, state


class SavedTensorMeter:
    """Context manager: the peak number of bytes that autograd holds for backward while it is active.

    Every tensor a graph saves for the backward pass is counted once per storage while any graph
    holds it (a saved tensor is released when its graph is freed, e.g. by ``backward()``). Storages
    listed in ``exclude`` (pass the model's parameters) are not counted, so :attr:`peak` measures the
    activations. Read :attr:`peak` (bytes) after the ``with`` block.
    """

    def __init__(self, exclude: Any = ()) -> None:
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.current = 0
        self.peak = 0
        self._holders: dict[int, int] = {}  # storage pointer -> number of saved references
        self._hooks: Any = None

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.current -= nbytes

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude:
            return t
        if key not in self._holders:
            self._holders[key] = 0
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self._holders[key] += 1
        handle = _Saved(t.detach())  # detached: holding the output itself would make a reference cycle
        weakref.finalize(handle, self._release, key, storage.nbytes())
        return handle

    @staticmethod
    def _unpack(saved: Any) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    """A saved tensor, wrapped so that :class:`SavedTensorMeter` sees when autograd lets go of it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
