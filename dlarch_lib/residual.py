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
    """One pre-activation block ``h -> [h +] W relu(norm(h)) + b`` on ``(N, width)`` tensors.

    ``residual=True`` adds the identity skip; ``norm=True`` puts a BatchNorm before the ReLU.
    """

    def __init__(self, width: int, residual: bool, norm: bool = False) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.residual = residual
        self.norm = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.linear = nn.Linear(width, width)

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The residual function ``F(h)``: ``(N, width) -> (N, width)``."""
        return self.linear(F.relu(self.norm(h)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h + F(h)`` for a residual block, ``F(h)`` for a plain one; ``(N, width) -> (N, width)``."""
        if h.ndim != 2 or h.shape[1] != self.linear.in_features:
            raise ValueError(f"Block expects (N, {self.linear.in_features}) input, got {tuple(h.shape)}")
        return h + self.branch(h) if self.residual else self.branch(h)


class DeepNet(nn.Module):
    """A deep narrow classifier: stem ``Linear(in, width)``, ``depth`` blocks, head ``Linear(width, classes)``.

    ``residual`` switches every block between ``h + F(h)`` and ``F(h)``; with the same
    ``torch.manual_seed`` a plain and a residual net get identical weights.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 32,
        depth: int = 40,
        residual: bool = True,
        norm: bool = False,
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
        self.blocks = nn.ModuleList(Block(width, residual, norm) for _ in range(depth))
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


def he_init_(model: DeepNet) -> DeepNet:
    """Re-initialise every block in place with He et al.'s ReLU init: ``W ~ N(0, 2/width)``, ``b = 0``.

    This keeps a *plain* ReLU stack's signal and gradient norms constant with depth (in expectation).
    """
    for block in model.block_list():
        nn.init.kaiming_normal_(block.linear.weight, nonlinearity="relu")
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
