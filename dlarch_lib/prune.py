"""Chapter 14: pruning -- magnitude masks by hand, masks that survive training, and channel removal.

- :func:`prunable_layers` lists the ``Linear``/``Conv2d`` layers of a model; :func:`sparsity`
  and :func:`layer_sparsities` measure the fraction of their weights that are exactly zero.
- :func:`magnitude_masks` computes unstructured magnitude masks by hand, per layer or global;
  :func:`magnitude_prune` applies them with ``torch.nn.utils.prune`` (a mask buffer and a
  forward pre-hook, so pruned weights stay zero while training) and can be called again with
  a higher target, which is iterative pruning along :func:`geometric_schedule`.
  :func:`remove_masks` makes the zeros permanent; :func:`rewind` resets the surviving
  weights to their initial values (a lottery-ticket rewind); :func:`clone` copies a pruned model.
- :func:`seed_unstructured_pruning` and :func:`seed_structured_pruning` are the seed's two
  sketches, kept to show what goes wrong: a one-shot ``weight.data *= mask`` regrows under
  training, and rebinding the loop variable ``module = pruned_module`` changes nothing.
- :func:`filter_l1_norms` and :func:`channel_keep_indices` rank output channels (filters,
  neurons) by L1 norm; :func:`mask_channels` zeroes the weakest ones with
  ``prune.ln_structured``; :func:`prune_channels` really removes them, rebuilding every layer
  of a chain (``Conv2d``/``Linear`` with channel-wise layers in between) smaller.
- :func:`nm_mask` keeps the ``n`` largest of every ``m`` consecutive inputs (2:4 semi-structured
  sparsity, the pattern of NVIDIA's sparse tensor cores); :func:`is_nm_sparse` checks the pattern,
  :func:`apply_masks` puts given masks on a model and :func:`nm_prune` prunes a whole model to N:M.
- :func:`snip_scores` is SNIP's connection sensitivity ``|w * dL/dw|`` for pruning at
  initialisation; :func:`random_masks` is its random baseline.
- :func:`imp_with_rewinding` is iterative magnitude pruning that rewinds the survivors to an
  early iterate after every round (the lottery ticket with rewinding).

Timing the variants is :mod:`dlarch_lib.core.measure`'s job: ``measure.best_ms`` over
``measure.inference_call(model, x)`` of each variant, the variants taking turns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import nn
from torch.nn.utils import prune

from dlarch_lib.modular import Chain

PRUNABLE = (nn.Linear, nn.Conv2d)
"""Layer types whose ``weight`` this chapter prunes (biases stay dense)."""

_CHANNELWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, Chain)


# --- measuring sparsity --------------------------------------------------------------------


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Linear | nn.Conv2d]]:
    """``(name, layer)`` for every ``Linear`` and ``Conv2d`` in ``model``, in registration order."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to prune")
    return layers


def layer_sparsities(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in each prunable layer's (masked) ``weight``."""
    return {name: (layer.weight == 0).float().mean().item() for name, layer in prunable_layers(model)}


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all prunable weights together (biases excluded)."""
    weights = [layer.weight for _, layer in prunable_layers(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


# --- unstructured magnitude pruning ----------------------------------------------------------


def _check_amount(amount: float) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount (the fraction of weights to prune) must be a number in [0, 1), got {amount!r}")


def magnitude_masks(weights: Sequence[torch.Tensor], amount: float, scope: str = "global") -> list[torch.Tensor]:
    """Binary masks (1 = keep) that zero the ``amount`` fraction of smallest-magnitude weights.

    ``scope="layer"`` prunes ``round(amount * n_l)`` weights of each tensor separately;
    ``scope="global"`` ranks all weights together and prunes ``round(amount * sum n_l)``, so
    layers with many small weights lose more. Same rule (and tie-breaking) as
    ``prune.l1_unstructured`` and ``prune.global_unstructured``.
    """
    _check_amount(amount)
    weights = list(weights)
    if not weights:
        raise ValueError("magnitude_masks needs at least one weight tensor")
    if scope == "layer":
        return [magnitude_masks([w], amount, "global")[0] for w in weights]
    if scope != "global":
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    scores = torch.cat([w.detach().abs().flatten() for w in weights])  # (sum n_l,)
    mask = torch.ones_like(scores)
    n_prune = round(amount * scores.numel())
    if n_prune:
        mask[torch.topk(scores, n_prune, largest=False).indices] = 0.0
    return [m.view_as(w) for m, w in zip(mask.split([w.numel() for w in weights]), weights)]


def magnitude_prune(model: nn.Module, amount: float, scope: str = "global") -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune`` until ``amount`` of its weights are masked.

    ``amount`` is the target sparsity of the prunable weights (per layer for ``scope="layer"``,
    over all of them for ``"global"``). Calling it again with a higher target prunes the
    smallest *surviving* weights only (masks only grow), which is iterative pruning. Each
    layer gets ``weight_orig`` (trained), ``weight_mask`` (a buffer) and a hook that sets
    ``weight = weight_orig * weight_mask`` before every forward pass.
    """
    _check_amount(amount)
    layers = [layer for _, layer in prunable_layers(model)]
    masked = [int((getattr(m, "weight_mask", torch.ones(1)) == 0).sum()) for m in layers]  # already pruned
    if scope == "layer":
        for layer, done in zip(layers, masked):
            extra = round(amount * layer.weight.numel()) - done
            if extra < 0:
                raise ValueError(f"target sparsity {amount} is below the current one; masks only grow")
            prune.l1_unstructured(layer, "weight", amount=extra)  # extra counts among the survivors
    elif scope == "global":
        extra = round(amount * sum(m.weight.numel() for m in layers)) - sum(masked)
        if extra < 0:
            raise ValueError(f"target sparsity {amount} is below the current one; masks only grow")
        prune.global_unstructured([(m, "weight") for m in layers], prune.L1Unstructured, amount=extra)
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return model


def geometric_schedule(final: float, steps: int) -> list[float]:
    """Target sparsities ``s_k = 1 - (1 - final)^(k / steps)``, ``k = 1..steps``.

    Each step prunes the same fraction ``p = 1 - (1 - final)^(1 / steps)`` of the weights
    that are still alive, and after ``steps`` steps the sparsity is ``final``.
    """
    _check_amount(final)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return [1.0 - (1.0 - final) ** (k / steps) for k in range(1, steps + 1)]


def remove_masks(model: nn.Module) -> nn.Module:
    """Make every pruning mask permanent (``prune.remove``): plain ``weight`` tensors with zeros, no hooks."""
    for module in model.modules():
        for name in [n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")]:
            prune.remove(module, name)
    return model


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy the weights of ``state`` (a state dict of the *unpruned* model) into ``model``, keeping its masks.

    A pruned parameter ``x.weight`` lives in ``x.weight_orig``; the mask hook then zeroes
    the pruned entries again. Rewinding to the initial weights is the lottery-ticket experiment.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = name[: -len("_orig")] if name.endswith("_orig") else name
            if key not in state:
                raise ValueError(f"state has no entry {key!r} for parameter {name!r}")
            if state[key].shape != param.shape:
                raise ValueError(f"{key}: state has shape {tuple(state[key].shape)}, model {tuple(param.shape)}")
            param.copy_(state[key])
    return refresh_masks(model)


def refresh_masks(model: nn.Module) -> nn.Module:
    """Recompute every masked ``x = x_orig * x_mask`` now, without autograd (the hook does it at each forward)."""
    with torch.no_grad():
        for module in model.modules():
            for name in [n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")]:
                setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works for a pruned model just after a training step.

    After a forward pass with autograd, a masked ``weight`` is a non-leaf tensor, which
    ``copy.deepcopy`` refuses to copy; :func:`refresh_masks` first turns it into a plain one.
    """
    return copy.deepcopy(refresh_masks(model))


def seed_unstructured_pruning(model: nn.Module, pruning_ratio: float = 0.5) -> nn.Module:
    """The seed's one-shot sketch (kept to show the bug): zero small weights with ``weight.data *= mask``.

    Nothing remembers which weights were pruned, so the first optimizer step after it
    moves them away from zero again: training regrows the pruned weights.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d):
            importance = torch.abs(module.weight)
            threshold = torch.quantile(importance, pruning_ratio)
            mask = importance > threshold
            module.weight.data *= mask.float()
    return model


# --- structured (channel) pruning ------------------------------------------------------------


def filter_l1_norms(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output channel: ``(O, ...) -> (O,)`` (a conv filter or a neuron's weight row)."""
    if weight.ndim < 2:
        raise ValueError(f"weight must be (out, in, ...), got shape {tuple(weight.shape)}")
    return weight.detach().abs().flatten(1).sum(dim=1)


def channel_keep_indices(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Sorted indices of the output channels to keep: all but the ``round(amount * O)`` of smallest L1 norm."""
    _check_amount(amount)
    norms = filter_l1_norms(weight)  # (O,)
    n_keep = norms.numel() - round(amount * norms.numel())
    if n_keep < 1:
        raise ValueError(f"amount {amount} would remove all {norms.numel()} channels")
    return torch.topk(norms, n_keep).indices.sort().values


def _conv_like(conv: nn.Conv2d, c_in: int, c_out: int, bias: bool) -> nn.Conv2d:
    """A fresh ``Conv2d`` with ``conv``'s kernel, stride, padding and dilation but ``c_in -> c_out`` channels."""
    pair = lambda t: (t[0], t[1])  # torch stores these as tuples of any length; a 2-d conv has two
    padding = conv.padding if isinstance(conv.padding, str) else pair(conv.padding)
    return nn.Conv2d(
        c_in,
        c_out,
        pair(conv.kernel_size),
        pair(conv.stride),
        padding,
        pair(conv.dilation),
        bias=bias,
        padding_mode=conv.padding_mode,
    )


def _seed_prune_channels(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    """A new, smaller ``Conv2d`` with only the output channels ``keep`` (correct on its own)."""
    small = _conv_like(conv, conv.in_channels, len(keep), bias=conv.bias is not None)
    with torch.no_grad():
        small.weight.copy_(conv.weight[keep])
        if conv.bias is not None and small.bias is not None:
            small.bias.copy_(conv.bias[keep])
    return small.to(conv.weight.device)


def seed_structured_pruning(model: nn.Module, pruning_ratio: float = 0.5) -> nn.Module:
    """The seed's structured sketch (kept to show the bug), with its helper functions filled in.

    ``module = pruned_module`` rebinds a local name; the model still holds the old layer, so
    the returned model is unchanged. (Had it been replaced, the next layer's input channels
    would no longer match.)
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            importance = filter_l1_norms(module.weight)  # compute_channel_importance
            keep_channels = torch.topk(
                importance, k=int(module.out_channels * (1 - pruning_ratio))
            ).indices  # select_top_k
            pruned_module = _seed_prune_channels(module, keep_channels)  # prune_channels
            module = pruned_module
    return model


def _chain_leaves(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, leaf)`` in forward order, for a model that is a chain of containers."""
    leaves = []
    for name, child in model.named_children():
        if isinstance(child, _CONTAINERS):
            leaves += _chain_leaves(child)
        elif isinstance(child, PRUNABLE + _NORMS + _CHANNELWISE):
            leaves.append((model, name, child))
        else:
            raise ValueError(
                f"cannot prune channels through {type(child).__name__} ({name!r}): "
                "only chains of Linear/Conv2d with channel-wise layers in between"
            )
    return leaves


def mask_channels(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` whose weakest output channels are zeroed by masks (same size, same speed).

    For every prunable layer but the last, ``prune.ln_structured(n=1, dim=0)`` masks the
    ``amount`` fraction of filters with the smallest L1 norm; the same mask is put on the
    bias and on a BatchNorm that follows, so a masked channel outputs exactly zero.
    """
    _check_amount(amount)
    masked = clone(model)
    leaves = _chain_leaves(masked)
    positions = [i for i, (_, _, m) in enumerate(leaves) if isinstance(m, PRUNABLE)]
    for pos, nxt in zip(positions, positions[1:]):
        layer = leaves[pos][2]
        prune.ln_structured(layer, "weight", amount=amount, n=1, dim=0)
        channel_mask = layer.get_buffer("weight_mask").flatten(1)[:, 0]  # (O,)
        for _, _, module in [leaves[pos]] + leaves[pos + 1 : nxt]:
            for name in ("bias", "weight") if isinstance(module, _NORMS) else ("bias",):
                if getattr(module, name, None) is not None:
                    prune.custom_from_mask(module, name, channel_mask)
    return masked


def _slice_layer(
    layer: nn.Linear | nn.Conv2d, keep_in: torch.Tensor | None, keep_out: torch.Tensor | None, channels_in: int
) -> nn.Linear | nn.Conv2d:
    """A new ``Linear``/``Conv2d`` with only the input channels ``keep_in`` and output channels ``keep_out``."""
    w = layer.weight.detach()  # (O, I, ...) for both layer types
    b = None if layer.bias is None else layer.bias.detach()
    if keep_out is not None:
        w, b = w[keep_out], None if b is None else b[keep_out]
    if keep_in is not None:
        if isinstance(layer, nn.Conv2d):
            w = w[:, keep_in]
        else:  # a Linear after Flatten sees channels_in blocks of `positions` features: (O, C * S)
            if w.shape[1] % channels_in:
                raise ValueError(f"{w.shape[1]} input features are not a multiple of the {channels_in} channels before")
            w = w.view(w.shape[0], channels_in, -1)[:, keep_in].flatten(1)  # (O, C, S) -> (O, C' * S)
    new: nn.Linear | nn.Conv2d
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"grouped convolutions (groups={layer.groups}) are not supported")
        new = _conv_like(layer, w.shape[1], w.shape[0], bias=b is not None)
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None and new.bias is not None:
            new.bias.copy_(b)
    return new.to(layer.weight.device)


def _slice_norm(norm: nn.BatchNorm1d | nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm1d | nn.BatchNorm2d:
    """A BatchNorm over the channels ``keep`` only, with their statistics."""
    new = type(norm)(len(keep), norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                getattr(new, name).copy_(getattr(norm, name)[keep])
    return new.to(keep.device if norm.weight is None else norm.weight.device)


def prune_channels(model: nn.Module, amount: float) -> nn.Module:
    """A physically smaller copy of ``model`` without its ``amount`` weakest channels per hidden layer.

    ``model`` must be a chain (``nn.Sequential``/:class:`~dlarch_lib.modular.Chain`, possibly
    nested) of ``Conv2d``/``Linear`` layers with channel-wise layers in between (ReLU,
    pooling, BatchNorm, Flatten, ...). For each layer but the last, the output channels of
    :func:`channel_keep_indices` survive; the layer is rebuilt with only those rows, a
    BatchNorm after it with only those channels, and the next layer with only those input
    channels (for a ``Linear`` after ``Flatten``, the matching blocks of columns). It computes
    the same function as :func:`mask_channels` with fewer parameters and FLOPs.
    """
    _check_amount(amount)
    small = clone(model)
    leaves = _chain_leaves(small)
    positions = [i for i, (_, _, m) in enumerate(leaves) if isinstance(m, PRUNABLE)]
    if len(positions) < 2:
        raise ValueError("channel pruning needs at least two Linear/Conv2d layers (the last one is kept whole)")
    keep_in: torch.Tensor | None = None
    channels_in = 0
    for k, pos in enumerate(positions):
        parent, name, _ = leaves[pos]
        layer = cast("nn.Linear | nn.Conv2d", leaves[pos][2])  # a position of a prunable layer
        keep_out = channel_keep_indices(layer.weight, amount) if k < len(positions) - 1 else None  # last: whole
        setattr(parent, name, _slice_layer(layer, keep_in, keep_out, channels_in))
        if keep_out is not None:
            for norm_parent, norm_name, module in leaves[pos + 1 : positions[k + 1]]:
                if isinstance(module, _NORMS):
                    setattr(norm_parent, norm_name, _slice_norm(module, keep_out))
        keep_in, channels_in = keep_out, layer.weight.shape[0]
    return small


# --- semi-structured N:M sparsity ------------------------------------------------------------


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask (1 = keep) that keeps the ``n`` largest ``|w|`` of every ``m`` consecutive inputs.

    ``weight`` is ``(out, in)`` or ``(out, in, k, k)``; the groups run along the flattened
    input dimension of each output row (``(O, I) -> (O, I / m, m)``), which is the layout that
    NVIDIA's sparse tensor cores and ``torch.sparse.to_sparse_semi_structured`` expect for 2:4.
    Ties are broken like ``torch.topk``. Same mask as ``torch.ao.pruning.WeightNormSparsifier``
    with ``sparse_block_shape=(1, m)`` and ``zeros_per_block=m - n``.
    """
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be ints, got n={n!r}, m={m!r}")
    if not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m for N:M sparsity, got n={n}, m={m}")
    if weight.ndim < 2:
        raise ValueError(f"weight must be (out, in, ...), got shape {tuple(weight.shape)}")
    rows = weight.detach().flatten(1)  # (O, I)
    if rows.shape[1] % m:
        raise ValueError(f"{rows.shape[1]} inputs per output are not a multiple of the group size m={m}")
    groups = rows.abs().view(rows.shape[0], -1, m)  # (O, I / m, m)
    mask = torch.zeros_like(groups)
    mask.scatter_(-1, groups.topk(n, dim=-1).indices, 1.0)  # n ones per group
    return mask.view_as(weight)


def is_nm_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive inputs of every output has at most ``n`` non-zeros."""
    rows = weight.detach().flatten(1)  # (O, I)
    if rows.shape[1] % m:
        return False
    return bool(((rows != 0).view(rows.shape[0], -1, m).sum(-1) <= n).all())


def apply_masks(model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
    """Put one given mask on the ``weight`` of each prunable layer (``prune.custom_from_mask``), in order.

    The masks combine with any mask already there, as with every ``torch.nn.utils.prune`` method.
    """
    layers = prunable_layers(model)
    masks = list(masks)
    if len(masks) != len(layers):
        raise ValueError(f"{len(masks)} masks for {len(layers)} prunable layers")
    for (name, layer), mask in zip(layers, masks):
        if mask.shape != layer.weight.shape:
            raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, weight {tuple(layer.weight.shape)}")
        prune.custom_from_mask(layer, "weight", mask.to(layer.weight.device))
    return model


def nm_prune(model: nn.Module, n: int = 2, m: int = 4) -> nn.Module:
    """Prune every prunable layer of ``model`` in place to N:M sparsity (:func:`nm_mask`), mask kept in training."""
    return apply_masks(model, [nm_mask(layer.weight, n, m) for _, layer in prunable_layers(model)])


# --- pruning at initialisation: SNIP and its baselines ----------------------------------------


def snip_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """SNIP's connection sensitivity ``|dL/dw * w|`` of every prunable weight, from one batch ``(x, y)``.

    ``L`` is the cross-entropy of ``model(x)`` against the labels ``y``. With a mask ``c`` on the
    weights (``w -> c * w``), ``dL/dc`` at ``c = 1`` is ``dL/dw * w``: the first-order change of the
    loss when a connection is removed (Lee et al., 2019). Gradients are taken with
    ``torch.autograd.grad``, so ``model``'s ``.grad`` fields are left alone.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    layers = [layer for _, layer in prunable_layers(model)]
    if any(hasattr(layer, "weight_orig") for layer in layers):
        raise ValueError("snip_scores needs an unpruned model (its weights are pruned with masks already)")
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [layer.weight for layer in layers])
    return [(g * layer.weight).detach().abs() for g, layer in zip(grads, layers)]


def random_masks(
    weights: Sequence[torch.Tensor], amount: float, generator: torch.Generator, scope: str = "layer"
) -> list[torch.Tensor]:
    """Masks that prune a random ``amount`` fraction of the weights (per tensor or over all of them).

    The same counting as :func:`magnitude_masks`, with uniform random scores drawn from ``generator``.
    """
    scores = [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]
    return magnitude_masks(scores, amount, scope)


# --- the lottery ticket: iterative magnitude pruning with rewinding ----------------------------


def imp_with_rewinding(
    model: nn.Module,
    rewind_state: dict[str, torch.Tensor],
    levels: Sequence[float],
    train: Callable[[nn.Module], object],
    scope: str = "global",
) -> list[nn.Module]:
    """Iterative magnitude pruning with rewinding (Frankle and Carbin, 2019; Frankle et al., 2020).

    ``model`` is trained; ``rewind_state`` is a state dict of the same, unpruned model from
    earlier in its training (``θ_k``; at ``k = 0`` the initialisation). For each target sparsity
    in ``levels`` (increasing): prune the smallest surviving trained weights
    (:func:`magnitude_prune`), rewind the survivors to ``rewind_state`` (:func:`rewind`) and
    retrain with ``train(model)``. Returns a copy of the trained model after each round.
    """
    levels = list(levels)
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"levels must be a non-empty increasing list of sparsities, got {levels}")
    rounds = []
    for level in levels:
        magnitude_prune(model, level, scope)
        rewind(model, rewind_state)
        train(model)
        rounds.append(clone(model))
    return rounds
