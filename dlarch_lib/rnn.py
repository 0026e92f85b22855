"""Recurrent networks: an LSTM written from scratch, gradient-flow probes, a character LM.

- :class:`LSTMCell` and :class:`LSTM` compute exactly what ``nn.LSTMCell`` / ``nn.LSTM``
  compute (same parameter names and gate order i, f, g, o), so weights copy both ways.
- :func:`input_gradient_norms` measures how much the last output depends on each input,
  the quantity that vanishes in a plain RNN (Bengio et al., 1994).
- :class:`CharLSTM`, :func:`train_char_lm` and :func:`eval_nats` make a character-level
  language model trained for a fixed number of steps (chapter 06 reuses the last two
  for a Transformer at the same compute budget).

Shapes: B batch, T time, I input size, H hidden size, L layers, V vocabulary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars, as in dlarch_lib.core.train

from dlarch_lib.core.text import CharCorpus

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
        model.to(ref.weight_ih_l0.device, ref.weight_ih_l0.dtype)
        with torch.no_grad():
            for k, cell in enumerate(model.cells):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(cell, name).copy_(getattr(ref, f"{name}_l{k}"))
        return model

    def to_torch(self) -> nn.LSTM:
        """An ``nn.LSTM`` holding a copy of these weights (so it runs the fused/cuDNN kernel)."""
        first = self.cells[0].weight_ih
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
    H = lstm.hidden_size
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
    if not getattr(rnn, "batch_first", False):
        raise ValueError("input_gradient_norms needs a batch_first recurrent module")
    param = next(rnn.parameters())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, rnn.input_size, generator=g).to(param.device, param.dtype).requires_grad_(True)
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

    @torch.no_grad()
    def generate(
        self, prompt: torch.Tensor, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample ``n`` characters after ``prompt`` (ids ``(T0,)``, T0 >= 1); returns the new ids ``(n,)``.

        Each character is drawn from ``softmax(logits / temperature)``: below 1 sharper, above 1 flatter.
        The state is carried forward, so each step costs one LSTM step.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError(f"prompt must be a non-empty 1-D tensor of ids, got shape {tuple(prompt.shape)}")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        logits, state = self(prompt.to(device)[None])  # (1, T0, V)
        new = []
        for _ in range(n):
            probs = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)  # (V,)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (1,)
            new.append(nxt)
            logits, state = self(nxt.to(device)[None], state)  # (1, 1, V)
        self.train(was_training)
        return torch.cat(new) if new else prompt.new_zeros(0)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of a model that returns either logits or ``(logits, extra)``."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


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
    Works for any model mapping ids ``(B, T)`` to logits ``(B, T, V)`` (or ``(logits, state)``).
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
    device = next(model.parameters()).device
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
    batch_fn: Callable[[str, int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    desc: str = "train",
) -> dict[str, Any]:
    """Train a next-character model with AdamW on random windows for exactly ``steps`` steps.

    The objective can be swapped (chapter 26 trains a masked LM with the same loop): ``batch_fn(split,
    batch_size, context, generator) -> (x, y)`` draws a batch (default ``corpus.batch``), ``loss_fn(model,
    x, y)`` scores it (default next-character cross-entropy) and ``eval_fn(model)`` is the validation
    loss (default :func:`eval_nats` on ``eval_windows`` windows).

    The run stops on its step count, never on a clock, so its result does not depend on the speed of
    the machine or on what else runs on it: a chapter that compares models at equal cost converts the
    cost into a number of steps first. Every ``eval_every`` steps (and at the end) it records the mean
    training loss since the last record and :func:`eval_nats` on the ``eval_windows`` validation
    windows spread over the split. Returns a dict with ``steps`` (done), ``seconds`` (wall time of
    the training steps, evaluations excluded; for information only), ``step``, ``train_loss`` and
    ``val_loss`` (lists, nats/char).
    """
    if steps < 1 or batch_size < 1 or context < 1 or eval_every < 1:
        raise ValueError(
            f"steps, batch_size, context and eval_every must be >= 1, got {(steps, batch_size, context, eval_every)}"
        )
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    batch_fn = batch_fn or corpus.batch
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(_logits(m, x).flatten(0, 1), y.flatten()))
    eval_fn = eval_fn or (lambda m: eval_nats(m, corpus, context=context, max_windows=eval_windows))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history: dict[str, Any] = {"steps": 0, "seconds": 0.0, "step": [], "train_loss": [], "val_loss": []}
    running, seen, train_time = 0.0, 0, 0.0
    bar = tqdm(range(1, steps + 1), desc=desc, disable=not progress, mininterval=0.5)
    model.train()
    for step in bar:
        start = time.perf_counter()
        x, y = batch_fn("train", batch_size, context, gen)  # (B, T), (B, T)
        x, y = x.to(device), y.to(device)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        opt.step()
        running += loss.item()
        seen += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            val = eval_fn(model)
            history["step"].append(step)
            history["train_loss"].append(running / seen)
            history["val_loss"].append(val)
            running, seen = 0.0, 0
            bar.set_postfix(train=f"{history['train_loss'][-1]:.3f}", val=f"{val:.3f}")
        history["steps"] = step
    bar.close()
    history["seconds"] = train_time
    return history
