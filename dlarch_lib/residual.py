"""Residual connections: a deep plain network and its residual twin, and the tools to compare them.

A block computes a branch ``F(h) = W act(norm(h)) + b`` (pre-activation order, He et al. 2016).
The *plain* network stacks ``h <- F(h)``; the *residual* network stacks ``h <- h + F(h)``.
Both are built from the same blocks with the same initialisation, so the skip is the only
difference. Inputs are flattened images ``(N, C, H, W)`` or vectors ``(N, D)``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import model_device


class Block(nn.Module):
    """One block on ``(N, width)`` tensors, pre-activation by default.

    ``order="pre"`` (He et al. 2016b): ``h -> [h +] W relu(norm(h)) + b``, the skip is a pure identity.
    ``order="post"`` (the original ResNet): ``h -> relu([h +] norm(W h + b))``, the ReLU comes after
    the addition, so the skip passes through it. ``residual=True`` adds the identity skip;
    ``norm=True`` adds a BatchNorm (before the ReLU in the branch, or after the linear layer).
    """

    def __init__(self, width: int, residual: bool, norm: bool = False, order: str = "pre") -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if order not in ("pre", "post"):
            raise ValueError(f"order must be 'pre' or 'post', got {order!r}")
        self.residual = residual
        self.order = order
        self.norm = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.linear = nn.Linear(width, width)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual function ``F(h)``: ``(N, width) -> (N, width)``."""
        if self.order == "post":
            return self.norm(self.linear(h))  # norm(W h + b); the ReLU follows the addition
        return self.linear(F.relu(self.norm(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[h +] F(h)`` (pre) or ``relu([h +] F(h))`` (post); ``(N, width) -> (N, width)``."""
        if h.ndim != 2 or h.shape[1] != self.linear.in_features:
            raise ValueError(f"Block expects (N, {self.linear.in_features}) input, got {tuple(h.shape)}")
        out = h + self.branch(h) if self.residual else self.branch(h)
        return F.relu(out) if self.order == "post" else out


class DeepNet(nn.Module):
    """A deep narrow classifier: stem ``Linear(in, width)``, ``depth`` blocks, head ``Linear(width, classes)``.

    ``residual`` switches every block between ``h + F(h)`` and ``F(h)``; with the same
    ``torch.manual_seed`` a plain and a residual net get identical weights. ``order`` is the
    blocks' ``"pre"``- or ``"post"``-activation order (:class:`Block`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 32,
        depth: int = 40,
        residual: bool = True,
        norm: bool = False,
        order: str = "pre",
    ) -> None:
        super().__init__()
        if min(in_features, num_classes, width) < 1:
            raise ValueError(
                f"in_features, num_classes and width must be >= 1, got {in_features}, {num_classes}, {width}"
            )
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_features = in_features
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(Block(width, residual, norm, order) for _ in range(depth))
        self.head_norm = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[h_0, h_1, ..., h_depth]``, each ``(N, width)``: the stem output and every block's output."""
        h = x.flatten(1)  # (N, C, H, W) -> (N, C*H*W)
        if h.shape[1] != self.in_features:
            raise ValueError(f"DeepNet expects {self.in_features} input features per example, got {h.shape[1]}")
        states = [self.stem(h)]
        for block in self.blocks:
            states.append(block(states[-1]))
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(F.relu(self.head_norm(self.hidden_states(x)[-1])))

    def block_list(self) -> list[Block]:
        """The blocks, in order (``self.blocks`` typed as :class:`Block`)."""
        return [cast(Block, block) for block in self.blocks]


def he_init_(model: DeepNet, scale: float = 1.0) -> DeepNet:
    """Re-initialise every block in place with He et al.'s ReLU init: ``W ~ N(0, 2 scale^2/width)``, ``b = 0``.

    With ``scale=1`` this keeps a *plain* ReLU stack's signal and gradient norms constant with depth
    (in expectation); a residual stack usually takes ``scale = 1/sqrt(depth)``, a small branch.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    for block in model.block_list():
        nn.init.kaiming_normal_(block.linear.weight, nonlinearity="relu")
        with torch.no_grad():
            block.linear.weight.mul_(scale)
        nn.init.zeros_(block.linear.bias)
    return model


def layer_grad_norms(model: DeepNet, x: torch.Tensor, y: torch.Tensor, wrt: str = "weight") -> torch.Tensor:
    """Gradient norms of the cross-entropy loss, one per block: a ``(depth,)`` tensor.

    ``wrt="weight"``: ``||dL/dW_l||`` of block ``l``'s weight matrix (what the optimiser sees);
    ``wrt="hidden"``: ``||dL/dh_l||`` of the block's input ``h_l`` (what the theory predicts).
    Parameter gradients already stored in ``model`` are left unchanged. ``x`` and ``y`` are
    moved to the model's device; the norms come back float64 on the CPU (squaring float32
    entries of ~1e-20 would underflow to a norm of 0).
    """
    if wrt not in ("weight", "hidden"):
        raise ValueError(f"wrt must be 'weight' or 'hidden', got {wrt!r}")
    device = model_device(model)
    states = model.hidden_states(x.to(device))
    logits = model.head(F.relu(model.head_norm(states[-1])))
    loss = F.cross_entropy(logits, y.to(device))
    inputs = [b.linear.weight for b in model.block_list()] if wrt == "weight" else states[:-1]
    grads = torch.autograd.grad(loss, inputs)
    return torch.stack([g.double().norm() for g in grads]).detach().cpu()  # (depth,)


def block_jacobians(model: DeepNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The branch Jacobians ``J_l = dF_l/dh_l`` at one example ``x`` (shape ``(in_features,)`` or an image).

    Returns ``depth`` matrices ``(width, width)`` on the model's device (``x`` is moved there),
    evaluated along the model's own forward pass. Put a model with BatchNorm in eval mode first
    (a single example has no batch statistics).
    """
    states = model.hidden_states(x.reshape(1, -1).to(model_device(model)))
    jacobians = []
    for block, state in zip(model.block_list(), states[:-1]):
        branch = lambda h, b=block: b.branch(h[None])[0]  # (width,) -> (width,)
        jacobian = torch.autograd.functional.jacobian(branch, state[0].detach(), vectorize=True)
        jacobians.append(cast(torch.Tensor, jacobian))
    return jacobians


def jacobian_by_path_length(jacobians: list[torch.Tensor]) -> torch.Tensor:
    """Split ``(I + J_L) ... (I + J_1)`` into the sum over paths, grouped by path length.

    Entry ``k`` of the result ``(L + 1, d, d)`` is the sum over all ``C(L, k)`` ways of choosing
    ``k`` blocks ``i_1 < ... < i_k`` of ``J_{i_k} ... J_{i_1}``; the entries sum to the full product.
    """
    if not jacobians:
        raise ValueError("need at least one Jacobian")
    d = jacobians[0].shape[0]
    if any(j.shape != (d, d) for j in jacobians):
        raise ValueError(f"all Jacobians must be square ({d}, {d}), got {[tuple(j.shape) for j in jacobians]}")
    terms = jacobians[0].new_zeros(len(jacobians) + 1, d, d)  # dtype and device of the Jacobians
    terms[0] = torch.eye(d, dtype=terms.dtype, device=terms.device)
    for i, jac in enumerate(jacobians, start=1):  # multiply (I + J_i) on the left
        terms[1 : i + 1] = terms[1 : i + 1] + jac @ terms[:i]  # a path either skips block i or goes through it
    return terms


class HighwayBlock(nn.Module):
    """A highway layer (Srivastava et al. 2015) on ``(N, width)``: ``y = T(h) H(h) + (1 - T(h)) h``.

    ``H(h) = W_H relu(h) + b_H`` is the same pre-activation branch as :class:`Block`, and the
    transform gate ``T(h) = sigmoid(W_T h + b_T)`` decides per unit how much of it replaces ``h``.
    ``gate_bias`` initialises ``b_T``: a negative value starts every layer close to the identity.
    """

    def __init__(self, width: int, gate_bias: float = -3.0) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.transform = nn.Linear(width, width)  # H
        self.gate = nn.Linear(width, width)  # T, before the sigmoid
        nn.init.constant_(self.gate.bias, gate_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``T * H + (1 - T) * h``; ``(N, width) -> (N, width)``."""
        if h.ndim != 2 or h.shape[1] != self.gate.in_features:
            raise ValueError(f"HighwayBlock expects (N, {self.gate.in_features}) input, got {tuple(h.shape)}")
        t = torch.sigmoid(self.gate(h))  # (N, width), in (0, 1)
        return t * self.transform(F.relu(h)) + (1 - t) * h


def dense_param_count(in_width: int, growth: int, layers: int) -> int:
    """Parameters of a :class:`DenseBlock`: layer ``i`` maps ``in_width + i * growth`` features to ``growth``.

    ``sum_i [(k0 + i k) k + k] = L k k0 + k^2 L (L - 1) / 2 + L k`` for ``k = growth``, ``k0 = in_width``.
    """
    if min(in_width, growth, layers) < 1:
        raise ValueError(f"in_width, growth and layers must be >= 1, got {in_width}, {growth}, {layers}")
    return layers * growth * in_width + growth**2 * layers * (layers - 1) // 2 + layers * growth


class DenseBlock(nn.Module):
    """DenseNet connectivity (Huang et al. 2017) on ``(N, in_width)`` vectors.

    Layer ``i`` sees the concatenation of the input and every earlier layer's output,
    ``in_width + i * growth`` features, and adds ``growth`` new ones, ``W_i relu(x) + b_i``. The block
    returns all of them concatenated: ``(N, in_width) -> (N, in_width + layers * growth)``.
    """

    def __init__(self, in_width: int, growth: int, layers: int) -> None:
        super().__init__()
        if min(in_width, growth, layers) < 1:
            raise ValueError(f"in_width, growth and layers must be >= 1, got {in_width}, {growth}, {layers}")
        self.in_width = in_width
        self.out_width = in_width + layers * growth
        self.layers = nn.ModuleList(nn.Linear(in_width + i * growth, growth) for i in range(layers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``(N, in_width) -> (N, in_width + layers * growth)``: the input and every layer's features."""
        if h.ndim != 2 or h.shape[1] != self.in_width:
            raise ValueError(f"DenseBlock expects (N, {self.in_width}) input, got {tuple(h.shape)}")
        features = [h]
        for layer in self.layers:
            x = torch.cat(features, dim=1)  # (N, in_width + i * growth)
            features.append(layer(F.relu(x)))  # (N, growth)
        return torch.cat(features, dim=1)


class ConnectionNet(nn.Module):
    """A classifier around any body: ``Linear(in, width)`` stem, ``body``, ``Linear(body_out, classes)`` head.

    Lets a highway stack or a dense block be compared with :class:`DeepNet` on the same task;
    ``body_out`` is the width the body returns (``body.out_width`` for a :class:`DenseBlock`).
    """

    def __init__(self, in_features: int, num_classes: int, width: int, body: nn.Module, body_out: int) -> None:
        super().__init__()
        if min(in_features, num_classes, width, body_out) < 1:
            raise ValueError(
                f"in_features, num_classes, width and body_out must be >= 1, "
                f"got {in_features}, {num_classes}, {width}, {body_out}"
            )
        self.in_features = in_features
        self.stem = nn.Linear(in_features, width)
        self.body = body
        self.head = nn.Linear(body_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for inputs ``(N, ...)`` with ``in_features`` entries each."""
        h = x.flatten(1)  # (N, C, H, W) -> (N, C*H*W)
        if h.shape[1] != self.in_features:
            raise ValueError(f"ConnectionNet expects {self.in_features} input features per example, got {h.shape[1]}")
        return self.head(F.relu(self.body(self.stem(h))))


def gradient_correlation(model: nn.Module, grid: torch.Tensor) -> float:
    """Correlation of the input gradients ``f'(x_i)`` and ``f'(x_{i+1})`` at neighbouring grid points.

    ``model`` maps ``(N, 1) -> (N, 1)``; ``grid`` is a sorted 1-D tensor of ``N >= 3`` inputs. The
    derivative of the scalar output at every point comes from one backward pass (the examples are
    independent: no BatchNorm in train mode). Balduzzi et al. (2017): near ``1`` the gradient is a
    smooth function of the input; near ``0`` it is white noise ("shattered").
    """
    if grid.ndim != 1 or grid.numel() < 3:
        raise ValueError(f"grid must be a 1-D tensor of at least 3 points, got shape {tuple(grid.shape)}")
    x = grid.to(model_device(model), torch.float32)[:, None].requires_grad_(True)  # (N, 1)
    out = model(x)
    if out.shape != (grid.numel(), 1):
        raise ValueError(f"model must map (N, 1) to (N, 1), got output shape {tuple(out.shape)}")
    (g,) = torch.autograd.grad(out.sum(), x)
    g = g[:, 0].double().cpu()  # (N,)
    pair = torch.stack([g[:-1], g[1:]])  # (2, N - 1)
    return float(torch.corrcoef(pair)[0, 1])
