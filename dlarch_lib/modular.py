"""Chapter 02: modular design -- composition, registration, registries and configs.

- :class:`Chain` is the corrected version of the seed's ``ModularNeuralNetwork``: an
  ``nn.Module`` that runs its blocks in order and can return every intermediate output.
- :func:`count_parameters` and :func:`unregistered_modules` make "is every parameter
  registered?" a number you can assert on.
- :class:`Registry` maps names to builders (``@MODELS.register("mlp")``); ``NORMS`` and
  ``ACTIVATIONS`` are registries of interchangeable blocks.
- :class:`LinearConfig`, :class:`MLPConfig`, :class:`CNNConfig` are config dataclasses;
  :func:`config_from_dict`, :func:`config_to_dict` and :func:`build_model` turn a plain
  dict into a model and back, with clear errors for unknown names and bad fields.
- :func:`mlp_parameter_count` is the closed form that :func:`dlarch_lib.core.measure.count_parameters`
  checks; :class:`Residual` adds a block's input back to its output (non-sequential composition).
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


# --- composition ---------------------------------------------------------------------------


class Residual(nn.Module):
    """``x + block(x)``: a block whose input skips around it (shapes in = shapes out)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...) -> (B, ...)``, the same shape."""
        return x + self.block(x)


class Chain(nn.Module):
    """Blocks applied in order, ``x -> blocks[-1](... blocks[0](x))``.

    Unlike the seed's sketch this is an ``nn.Module`` (so it is callable and its blocks'
    parameters are registered), it calls ``super().__init__()`` before assigning
    submodules, and it does not name its list ``modules`` (which would shadow
    :meth:`nn.Module.modules`). Unlike ``nn.Sequential`` it can return every block's output.
    """

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        super().__init__()  # must come before any submodule is assigned
        blocks = list(blocks)
        if not blocks:
            raise ValueError("Chain needs at least one block")
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"block {i} is a {type(block).__name__}, not an nn.Module")
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The last block's output, or (``return_all=True``) the list of every block's output."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs if return_all else x


def unregistered_modules(model: nn.Module) -> list[str]:
    """Names of modules and parameters hidden in plain lists, tuples or dicts of ``model``.

    Such objects are invisible to ``model.parameters()``, ``.to()``, ``.train()`` and
    ``state_dict()``; an empty list is the healthy answer.
    """
    found = []
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or isinstance(value, (nn.Module, str)):
                continue
            items = (
                value.items()
                if isinstance(value, dict)
                else enumerate(value)
                if isinstance(value, (list, tuple))
                else ()
            )
            for key, item in items:
                if isinstance(item, (nn.Module, nn.Parameter)):
                    found.append(f"{prefix + '.' if prefix else ''}{attr}[{key!r}]")
    return found


# --- registries ----------------------------------------------------------------------------


class Registry(Generic[T]):
    """A named table of builders: ``@registry.register("name")`` adds one, ``get`` finds it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds the decorated object under ``name`` (names are unique)."""
        if not name.isidentifier():
            raise ValueError(f"{self.kind} names must be identifiers, got {name!r}")

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as ``name``; a ``ValueError`` lists the known names."""
        if name not in self._items:
            close = difflib.get_close_matches(str(name), self._items, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}{hint}")
        return self._items[name]

    def name_of(self, obj: T) -> str:
        """The name ``obj`` was registered under."""
        for name, item in self._items.items():
            if item is obj:
                return name
        raise ValueError(f"{obj!r} is not a registered {self.kind}")

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


NormFactory = Callable[[int, int], nn.Module]  # (features, spatial dims 0 or 2) -> module
NORMS: Registry[NormFactory] = Registry("norm")
ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
MODELS: Registry[type] = Registry("model")

NORMS.register("none")(lambda features, dims: nn.Identity())
NORMS.register("batch")(lambda features, dims: nn.BatchNorm2d(features) if dims == 2 else nn.BatchNorm1d(features))
# layer norm over all of (C, H, W) for feature maps is GroupNorm with one group
NORMS.register("layer")(lambda features, dims: nn.GroupNorm(1, features) if dims == 2 else nn.LayerNorm(features))
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("gelu")(nn.GELU)
ACTIVATIONS.register("tanh")(nn.Tanh)
ACTIVATIONS.register("sigmoid")(nn.Sigmoid)


# --- reusable blocks -----------------------------------------------------------------------


def mlp_block(
    d_in: int, d_out: int, norm: str = "none", activation: str = "relu", dropout: float = 0.0
) -> nn.Sequential:
    """Linear -> norm -> activation -> dropout: ``(B, d_in) -> (B, d_out)``."""
    layers = [nn.Linear(d_in, d_out), NORMS.get(norm)(d_out, 0), ACTIVATIONS.get(activation)()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def conv_block(c_in: int, c_out: int, norm: str = "none", activation: str = "relu") -> nn.Sequential:
    """3x3 conv -> norm -> activation -> 2x2 max-pool: ``(B, c_in, H, W) -> (B, c_out, H/2, W/2)``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), NORMS.get(norm)(c_out, 2), ACTIVATIONS.get(activation)(), nn.MaxPool2d(2)
    )


# --- configs -------------------------------------------------------------------------------


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@MODELS.register("linear")
@dataclass(frozen=True)
class LinearConfig:
    """Softmax regression on flattened images: ``(B, C, H, W) -> (B, num_classes)``."""

    in_features: int = 64
    num_classes: int = 10

    def __post_init__(self) -> None:
        _check_positive("in_features", self.in_features)
        _check_positive("num_classes", self.num_classes)

    def blocks(self) -> list[nn.Module]:
        """The model's blocks, in order."""
        return [nn.Flatten(), nn.Linear(self.in_features, self.num_classes)]


@MODELS.register("mlp")
@dataclass(frozen=True)
class MLPConfig:
    """``depth`` hidden :func:`mlp_block` s of ``width`` units, then a linear head.

    With ``skip`` every hidden block after the first is :class:`Residual` (``h + block(h)``).
    This is the book's one MLP: every chapter that trains an MLP on the digits builds it here.
    """

    in_features: int = 64
    num_classes: int = 10
    width: int = 128
    depth: int = 2
    norm: str = "none"
    activation: str = "relu"
    dropout: float = 0.0
    skip: bool = False

    def __post_init__(self) -> None:
        for name in ("in_features", "num_classes", "width", "depth"):
            _check_positive(name, getattr(self, name))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        NORMS.get(self.norm), ACTIVATIONS.get(self.activation)  # unknown names fail here

    def blocks(self) -> list[nn.Module]:
        """The model's blocks, in order."""
        dims = [self.in_features] + [self.width] * self.depth
        hidden = [mlp_block(a, b, self.norm, self.activation, self.dropout) for a, b in zip(dims, dims[1:])]
        rest: list[nn.Module] = [Residual(block) for block in hidden[1:]] if self.skip else list(hidden[1:])
        return [nn.Flatten(), hidden[0], *rest, nn.Linear(self.width, self.num_classes)]


@MODELS.register("cnn")
@dataclass(frozen=True)
class CNNConfig:
    """``depth`` :func:`conv_block` s with ``width * 2**i`` channels, then flatten and a linear head."""

    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    width: int = 16
    depth: int = 2
    norm: str = "none"
    activation: str = "relu"

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes", "width", "depth"):
            _check_positive(name, getattr(self, name))
        if self.image_size % 2**self.depth:
            raise ValueError(
                f"depth {self.depth} halves the image {self.depth} times; "
                f"image_size {self.image_size} is not divisible by {2**self.depth}"
            )
        NORMS.get(self.norm), ACTIVATIONS.get(self.activation)

    def blocks(self) -> list[nn.Module]:
        """The model's blocks, in order."""
        channels = [self.in_channels] + [self.width * 2**i for i in range(self.depth)]
        convs = [conv_block(a, b, self.norm, self.activation) for a, b in zip(channels, channels[1:])]
        side = self.image_size // 2**self.depth
        return [*convs, nn.Flatten(), nn.Linear(channels[-1] * side * side, self.num_classes)]


def _coerce(cls: type, name: str, value: Any, expected: type) -> Any:
    """``value`` as the field's type; ints are accepted for floats, bools never for numbers."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
        raise ValueError(f"field {name!r} of {MODELS.name_of(cls)!r} must be {expected.__name__}, got {value!r}")
    return value


def config_from_dict(spec: dict[str, Any]) -> Any:
    """The config dataclass described by ``{"arch": name, **fields}`` (missing fields take defaults)."""
    if not isinstance(spec, dict) or "arch" not in spec:
        raise ValueError(f"a model spec is a dict with an 'arch' key, got {spec!r}")
    rest = dict(spec)
    cls = MODELS.get(rest.pop("arch"))
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    for key in rest:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown field {key!r} for {spec['arch']!r}; valid: {', '.join(valid)}{hint}")
    return cls(**{k: _coerce(cls, k, v, hints[k]) for k, v in rest.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain (JSON-ready) dict of a config: ``{"arch": name, **every field}``."""
    return {"arch": MODELS.name_of(type(config)), **asdict(config)}


def build_model(spec: dict[str, Any] | Any) -> Chain:
    """A :class:`Chain` built from a spec dict or a config; the config is kept as ``model.config``."""
    config = config_from_dict(spec) if isinstance(spec, dict) else spec
    MODELS.name_of(type(config))  # a registered config type, or a clear error
    model = Chain(config.blocks())
    model.config = config  # a frozen dataclass: not a parameter, not a submodule
    return model


# --- measuring a design --------------------------------------------------------------------


def mlp_parameter_count(config: MLPConfig) -> int:
    """Closed form of :func:`count_parameters` for an MLP (eq. ch02 mlp-params)."""
    d, w, n, k = config.in_features, config.width, config.depth, config.num_classes
    norm = 2 * w if config.norm in ("batch", "layer") else 0  # a scale and a shift per unit
    return (d * w + w + norm) + (n - 1) * (w * w + w + norm) + (w * k + k)


# --- stem, stages, head: a design space ----------------------------------------------------


def staged_cnn(
    widths: Sequence[int], depths: Sequence[int], stem_width: int = 16, in_channels: int = 1, num_classes: int = 10
) -> nn.Sequential:
    """RegNet's template: a stem, stages that halve the resolution, and a head.

    ``(B, in_channels, H, W) -> (B, num_classes)``. The stem is a 3x3 convolution to ``stem_width``
    channels. Stage ``i`` has ``depths[i]`` blocks of width ``widths[i]`` (3x3 conv, batch norm, ReLU);
    its first block has stride 2. The head is global average pooling and a linear classifier. A
    *design space* is a distribution over ``(widths, depths)``; its quality is the distribution of
    the errors of models drawn from it (Radosavovic et al., 2020).
    """
    if len(widths) != len(depths) or not widths:
        raise ValueError(f"need one depth per stage width; got widths={list(widths)}, depths={list(depths)}")
    if min(*widths, *depths, stem_width, in_channels, num_classes) < 1:
        raise ValueError(f"all sizes must be >= 1; got {widths=}, {depths=}, {stem_width=}")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem_width, 3, padding=1), nn.BatchNorm2d(stem_width), nn.ReLU()]
    c_in = stem_width
    for width, depth in zip(widths, depths):
        for block in range(depth):
            stride = 2 if block == 0 else 1  # the stage's first block halves H and W
            layers += [nn.Conv2d(c_in, width, 3, stride=stride, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]  # head: (B, C) -> (B, classes)
    return nn.Sequential(*layers)
