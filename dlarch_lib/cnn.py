"""Chapter 04: convolution from scratch, conv arithmetic, and a small ResNet on the digits.

- :func:`conv2d` is a 2-D convolution (really a cross-correlation, as in every deep learning
  library) written with slicing and one ``einsum``; it matches ``F.conv2d`` including
  stride, padding, dilation and groups.
- :func:`conv_output_size` and :func:`receptive_field` are the two formulas of conv arithmetic;
  :func:`measured_receptive_field` finds the receptive field of any model from its gradient.
- :class:`ResBlock` is the basic residual block (conv without bias before BatchNorm,
  projection shortcut when the shape changes); :class:`SmallResNet` stacks them for 8x8 digits.
- :func:`train_digits_classifier` trains a :class:`SmallResNet` on ``load_digits_split``.
- Modern blocks: :func:`depthwise_conv2d` and :func:`grouped_conv2d_by_slices` write grouped
  convolutions out; :func:`grouped_conv_cost` and :func:`block_cost` count parameters and multiply-adds;
  :class:`PlainBlock`, :class:`SeparableBlock`, :class:`BottleneckBlock` (pre-activation, as in
  chapter 3) and :class:`ConvNeXtBlock`; :class:`BlockNet` builds a digits classifier from one kind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.data import Split, load_digits_split
from dlarch_lib.core.runtime import seeded
from dlarch_lib.core.train import History, evaluate, fit, model_device

IntOrPair = int | tuple[int, int]


def _pair(value: IntOrPair, name: str, minimum: int) -> tuple[int, int]:
    """``value`` as a pair of ints, each ``>= minimum`` (ValueError naming ``name`` otherwise)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= minimum for v in pair):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair[0], pair[1]


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution along one axis.

    ``floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1``: the number of
    positions a dilated kernel of span ``dilation (kernel - 1) + 1`` fits into the padded
    input when moved ``stride`` steps at a time.
    """
    if size < 1 or kernel < 1 or stride < 1 or dilation < 1 or padding < 0:
        raise ValueError(
            f"need size, kernel, stride, dilation >= 1 and padding >= 0; got size={size}, "
            f"kernel={kernel}, stride={stride}, padding={padding}, dilation={dilation}"
        )
    span = dilation * (kernel - 1) + 1
    if size + 2 * padding < span:
        raise ValueError(f"kernel span {span} is larger than the padded input {size + 2 * padding}")
    return (size + 2 * padding - span) // stride + 1


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """2-D cross-correlation from scratch, with the semantics of ``F.conv2d``.

    x ``(N, C, H, W)``, weight ``(O, C // groups, kh, kw)``, bias ``(O,)`` or None;
    returns ``(N, O, Ho, Wo)`` with ``Ho, Wo`` from :func:`conv_output_size`.

    Unfold: for each kernel tap ``(i, j)`` take the strided slice of the zero-padded input
    that this tap sees at every output position; stack the ``kh * kw`` slices into patches
    ``(N, C, kh, kw, Ho, Wo)``. Then one ``einsum`` contracts channels and taps within each group.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"weight must be (O, C // groups, kh, kw), got shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    n, c, h, w = x.shape
    o, c_per_group, kh, kw = weight.shape
    if c % groups or o % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={c} and out_channels={o}")
    if c_per_group * groups != c:
        raise ValueError(f"weight expects {c_per_group * groups} input channels (groups={groups}), x has {c}")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"bias must have shape ({o},), got {tuple(bias.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = (
        _pair(stride, "stride", 1),
        _pair(padding, "padding", 0),
        _pair(dilation, "dilation", 1),
    )
    ho = conv_output_size(h, kh, sh, ph, dh)
    wo = conv_output_size(w, kw, sw, pw, dw)

    xp = F.pad(x, (pw, pw, ph, ph))  # (N, C, H + 2ph, W + 2pw), zeros around
    taps = [
        xp[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]  # (N, C, Ho, Wo)
        for i in range(kh)
        for j in range(kw)
    ]
    patches = torch.stack(taps, dim=2).reshape(n, groups, c_per_group, kh, kw, ho, wo)  # (N, G, C/G, kh, kw, Ho, Wo)
    wg = weight.reshape(groups, o // groups, c_per_group, kh, kw)  # (G, O/G, C/G, kh, kw)
    out = torch.einsum("ngcijyx,gocij->ngoyx", patches, wg).reshape(n, o, ho, wo)  # (N, O, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, o, 1, 1)
    return out


def receptive_field(layers: Sequence[tuple[int, ...]]) -> int:
    """Receptive field (along one axis) of a stack of layers, each ``(kernel, stride[, dilation])``.

    ``r = 1 + sum_l dilation_l (kernel_l - 1) prod_{i<l} stride_i``: layer ``l`` widens the
    field by its kernel span minus one, measured in input pixels, i.e. times the product of
    all earlier strides (the "jump"). Pooling layers count as layers with their kernel and stride.
    """
    r, jump = 1, 1
    for index, layer in enumerate(layers):
        if len(layer) not in (2, 3):
            raise ValueError(f"layer {index} must be (kernel, stride) or (kernel, stride, dilation), got {layer!r}")
        kernel, stride, dilation = (*layer, 1) if len(layer) == 2 else layer
        if kernel < 1 or stride < 1 or dilation < 1:
            raise ValueError(f"layer {index}: kernel, stride and dilation must be >= 1, got {layer!r}")
        r += dilation * (kernel - 1) * jump
        jump *= stride
    return r


def measured_receptive_field(model: nn.Module, in_channels: int = 1, size: int = 64) -> int:
    """Receptive field of ``model``'s centre output unit, read off the gradient (one axis).

    Feeds a ``(1, in_channels, size, size)`` input, backpropagates from the centre output pixel
    of channel 0 and counts the input columns with a non-zero gradient. It works on a copy whose
    weights are positive constants and whose max-pools are average pools (a max-pool sends the
    gradient to one input only), fed with ones, so that no gradient vanishes by accident.
    """
    probe = _positive_copy(model)
    x = torch.ones(1, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    y = probe(x)  # (1, O, Ho, Wo)
    if y.ndim != 4:
        raise ValueError(f"model must map images to feature maps (1, O, H, W), got {tuple(y.shape)}")
    (grad,) = torch.autograd.grad(y[0, 0, y.shape[2] // 2, y.shape[3] // 2], x)  # (1, C, size, size)
    touched = (grad[0].abs().sum(dim=(0, 1)) > 0).nonzero()  # columns with non-zero gradient
    if touched.numel() and (touched.min() == 0 or touched.max() == size - 1):
        raise ValueError(f"receptive field reaches the border of the {size}x{size} probe; use a larger size")
    return int(touched.numel())


def _positive_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model``: every parameter 1/fan-in (or 1), every max-pool an average pool."""
    import copy

    probe = copy.deepcopy(model).double().eval()
    for parent in list(probe.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0 / max(p[0].numel(), 1) if p.ndim > 1 else 1.0)
    return probe


class ResBlock(nn.Module):
    """Basic residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Both 3x3 convolutions have ``bias=False``: a bias right before BatchNorm is cancelled by
    the mean subtraction. The shortcut is the identity when the shape is unchanged, else a
    projection (1x1 conv with ``stride`` and BatchNorm). Input ``(N, in, H, W)``,
    output ``(N, out, H', W')`` with ``H' = conv_output_size(H, 3, stride, 1)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or stride < 1:
            raise ValueError(
                f"need in_channels, out_channels, stride >= 1; got {in_channels}, {out_channels}, {stride}"
            )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, H, W) -> (N, out, H', W')``."""
        if x.ndim != 4 or x.shape[1] != self.conv1.in_channels:
            raise ValueError(f"ResBlock expects (N, {self.conv1.in_channels}, H, W), got {tuple(x.shape)}")
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for ``(N, 1, 8, 8)`` digits: stem, two stages of :class:`ResBlock`, pool, linear.

    stem: 3x3 conv 1 -> width (8x8); stage 1: ``blocks[0]`` blocks at width (8x8);
    stage 2: ``blocks[1]`` blocks at ``2 width``, the first with stride 2 (4x4);
    global average pool -> :meth:`features` ``(N, 2 width)``; linear -> logits ``(N, num_classes)``.
    """

    def __init__(
        self, num_classes: int = 10, width: int = 32, blocks: tuple[int, int] = (1, 1), in_channels: int = 1
    ) -> None:
        super().__init__()
        if num_classes < 2 or width < 1 or in_channels < 1:
            raise ValueError(
                f"need num_classes >= 2, width >= 1, in_channels >= 1; got {num_classes}, {width}, {in_channels}"
            )
        if len(blocks) != 2 or min(blocks) < 1:
            raise ValueError(f"blocks must be two positive counts (stage 1, stage 2), got {blocks!r}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stage1 = [ResBlock(width, width) for _ in range(blocks[0])]
        stage2 = [ResBlock(width, 2 * width, stride=2)] + [ResBlock(2 * width, 2 * width) for _ in range(blocks[1] - 1)]
        self.stages = nn.Sequential(*stage1, *stage2)
        self.head = nn.Linear(2 * width, num_classes)
        self.num_features = 2 * width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: ``(N, C, H, W) -> (N, 2 width)`` (global average pool)."""
        if x.ndim != 4 or x.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"SmallResNet expects (N, {self.stem[0].in_channels}, H, W), got {tuple(x.shape)}")
        return self.stages(self.stem(x)).mean(dim=(2, 3))  # (N, 2 width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.head(self.features(x))


def fit_digits_classifier(
    model: nn.Module,
    split: Split,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> tuple[History, float]:
    """Train ``model`` on ``split`` (AdamW, weight decay 5e-4) and return (history, test accuracy).

    The model trains on its own device (move it to ``RUN.device`` first) and is left in eval mode.
    Validation accuracy is tracked each epoch; the test set is touched once, at the end. The
    shuffling and any dropout draw from a generator seeded by ``seed`` (:func:`seeded`), so the
    caller's random stream is untouched.
    """
    with seeded(seed):
        train, val, test = split.loaders(batch_size=batch_size, seed=seed, device=model_device(model))
        history = fit(
            model,
            train,
            epochs=epochs,
            lr=lr,
            optimizer="adamw",
            weight_decay=5e-4,
            val_loader=val,
            progress=progress,
            desc=type(model).__name__,
        )
    return history, evaluate(model, test)["acc"]


def train_digits_classifier(
    *, device: torch.device | str, epochs: int = 15, seed: int = 0, width: int = 32
) -> tuple[SmallResNet, float]:
    """Build a :class:`SmallResNet` (initialised from ``seed``) on ``device`` and train it on
    ``load_digits_split(seed=seed)``. Returns (model in eval mode, test accuracy): 98-99% at the defaults.
    """
    with seeded(seed):
        model = SmallResNet(width=width).to(device)
    _, acc = fit_digits_classifier(model, load_digits_split(seed=seed), epochs=epochs, seed=seed)
    return model.eval(), acc


# ---------------------------------------------------------------------------------------------
# Modern convolution blocks: grouped, depthwise-separable, bottleneck, ConvNeXt, and their costs
# ---------------------------------------------------------------------------------------------


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """Depthwise cross-correlation from scratch: each channel filtered by its own ``k x k`` kernel.

    x ``(N, C, H, W)``, weight ``(C, 1, k, k)`` (the layout of ``nn.Conv2d(C, C, k, groups=C)``);
    returns ``(N, C, H + 2 padding - k + 1, W + 2 padding - k + 1)``, stride 1, no bias.
    ``y[n, c] = sum_ij weight[c, 0, i, j] * xp[n, c, u + i, v + j]``: no sum over channels, so the
    cost is ``k^2 C`` multiply-adds per pixel instead of ``k^2 C^2``.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    c = x.shape[1]
    if weight.ndim != 4 or weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be ({c}, 1, k, k) for {c} channels, got shape {tuple(weight.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    k = weight.shape[2]
    ho, wo = conv_output_size(x.shape[2], k, 1, padding), conv_output_size(x.shape[3], k, 1, padding)
    xp = F.pad(x, (padding, padding, padding, padding))  # (N, C, H + 2p, W + 2p)
    out = x.new_zeros(x.shape[0], c, ho, wo)
    for i in range(k):
        for j in range(k):
            out = out + weight[:, 0, i, j].view(1, c, 1, 1) * xp[:, :, i : i + ho, j : j + wo]  # (N, C, Ho, Wo)
    return out


def grouped_conv2d_by_slices(
    x: torch.Tensor, weight: torch.Tensor, groups: int, bias: torch.Tensor | None = None, padding: int = 0
) -> torch.Tensor:
    """A grouped convolution as ``groups`` independent ordinary convolutions on channel slices.

    x ``(N, C, H, W)``, weight ``(O, C // groups, k, k)``: group ``g`` convolves input channels
    ``[g C/G, (g+1) C/G)`` with output filters ``[g O/G, (g+1) O/G)``, and the results are
    concatenated along the channels. Equal to ``F.conv2d(..., groups=groups)`` (the chapter checks it).
    """
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"x and weight must be 4-D, got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    c, o = x.shape[1], weight.shape[0]
    if c % groups or o % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={c} and out_channels={o}")
    if weight.shape[1] * groups != c:
        raise ValueError(f"weight expects {weight.shape[1] * groups} input channels (groups={groups}), x has {c}")
    ci, co = c // groups, o // groups
    outs = [
        F.conv2d(
            x[:, g * ci : (g + 1) * ci],  # (N, C/G, H, W)
            weight[g * co : (g + 1) * co],  # (O/G, C/G, k, k)
            None if bias is None else bias[g * co : (g + 1) * co],
            padding=padding,
        )
        for g in range(groups)
    ]
    return torch.cat(outs, dim=1)  # (N, O, Ho, Wo)


def grouped_conv_cost(
    in_channels: int, out_channels: int, kernel: int, out_size: int, groups: int = 1, bias: bool = False
) -> tuple[int, int]:
    """(parameters, multiply-adds) of a ``kernel x kernel`` convolution with ``groups`` groups
    producing an ``out_size x out_size`` map, for one image.

    Each of the ``out_channels`` filters sees ``in_channels / groups`` channels through
    ``kernel^2`` taps: ``params = out (in / G) k^2 (+ out)``, ``MACs = out_size^2 out (in / G) k^2``.
    """
    if min(in_channels, out_channels, kernel, out_size, groups) < 1:
        raise ValueError(
            f"need channels, kernel, out_size, groups >= 1; got {in_channels}, {out_channels}, {kernel}, "
            f"{out_size}, {groups}"
        )
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide both in_channels={in_channels} and out_channels={out_channels}")
    weights = out_channels * (in_channels // groups) * kernel * kernel
    return weights + (out_channels if bias else 0), weights * out_size * out_size


BLOCK_KINDS = ("plain", "separable", "bottleneck", "convnext")


def block_cost(kind: str, channels: int, size: int, reduction: int = 4, expansion: int = 4) -> tuple[int, int]:
    """(parameters, multiply-adds) of one block of :data:`BLOCK_KINDS` on a ``(channels, size, size)`` map.

    Counts what the formulas of the chapter count: every weight, norm scale and shift, and bias, and
    the multiply-adds of the convolutions and matrix products (not of norms, activations, additions).
    With ``C = channels`` and ``P = size^2``:

    - ``"plain"`` (:class:`PlainBlock`): two 3x3 convs, ``18 C^2 + 4 C`` params, ``18 C^2 P`` MACs;
    - ``"separable"`` (:class:`SeparableBlock`): two (depthwise 3x3, pointwise 1x1) pairs,
      ``2 C^2 + 18 C + 8 C`` params, ``(2 C^2 + 18 C) P`` MACs;
    - ``"bottleneck"`` (:class:`BottleneckBlock`, ``B = C / reduction``): 1x1 reduce, 3x3, 1x1
      expand, ``2 C B + 9 B^2 + 2 C + 4 B`` params, ``(2 C B + 9 B^2) P`` MACs;
    - ``"convnext"`` (:class:`ConvNeXtBlock`, ``E = expansion``): 7x7 depthwise with bias, LayerNorm,
      1x1 to ``E C``, GELU, 1x1 back, ``49 C + C + 2 C + 2 E C^2 + E C + C`` params,
      ``(49 C + 2 E C^2) P`` MACs.
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"kind must be one of {BLOCK_KINDS}, got {kind!r}")
    if channels < 1 or size < 1:
        raise ValueError(f"need channels, size >= 1; got {channels}, {size}")
    c = channels
    if kind == "plain":
        parts = [grouped_conv_cost(c, c, 3, size)] * 2
        norms = 2 * (2 * c)  # two BatchNorms (scale and shift)
    elif kind == "separable":
        parts = [grouped_conv_cost(c, c, 3, size, groups=c), grouped_conv_cost(c, c, 1, size)] * 2
        norms = 4 * (2 * c)
    elif kind == "bottleneck":
        if reduction < 1 or c % reduction:
            raise ValueError(f"reduction={reduction} must be >= 1 and divide channels={c}")
        b = c // reduction
        parts = [grouped_conv_cost(c, b, 1, size), grouped_conv_cost(b, b, 3, size), grouped_conv_cost(b, c, 1, size)]
        norms = 2 * c + 2 * b + 2 * b  # pre-activation: BN(C) before the reduce, BN(B) before the 3x3 and the expand
    else:
        if expansion < 1:
            raise ValueError(f"expansion must be >= 1, got {expansion}")
        e = expansion
        parts = [grouped_conv_cost(c, c, 7, size, groups=c, bias=True), grouped_conv_cost(c, e * c, 1, size, bias=True)]
        parts.append(grouped_conv_cost(e * c, c, 1, size, bias=True))
        norms = 2 * c  # one LayerNorm
    return sum(p for p, _ in parts) + norms, sum(m for _, m in parts)


def _preact_conv(in_channels: int, out_channels: int, kernel: int, groups: int = 1) -> nn.Sequential:
    """BatchNorm -> ReLU -> conv (no bias, "same" padding): chapter 3's pre-activation order."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False),
    )


class _Residual(nn.Module):
    """``x + branch(x)`` on ``(N, C, H, W)``: nothing after the addition (the identity path stays clean)."""

    branch: nn.Module
    channels: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__} expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        return x + self.branch(x)


class PlainBlock(_Residual):
    """Pre-activation basic block: ``x + conv3(relu(bn(conv3(relu(bn(x))))))``, ``C -> C``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.branch = nn.Sequential(_preact_conv(channels, channels, 3), _preact_conv(channels, channels, 3))


class SeparableBlock(_Residual):
    """Pre-activation MobileNet-style block: two depthwise-separable 3x3 convolutions, ``C -> C``.

    Each separable conv is a depthwise 3x3 (``groups = C``: filters every channel on its own) then a
    pointwise 1x1 (mixes channels), each preceded by BatchNorm and ReLU.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        c = channels
        self.branch = nn.Sequential(
            _preact_conv(c, c, 3, groups=c),
            _preact_conv(c, c, 1),
            _preact_conv(c, c, 3, groups=c),
            _preact_conv(c, c, 1),
        )


class BottleneckBlock(_Residual):
    """Pre-activation ResNet bottleneck: 1x1 reduce to ``C / reduction``, 3x3, 1x1 expand back to ``C``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or channels % reduction:
            raise ValueError(f"need channels >= 1 and reduction >= 1 dividing it; got {channels}, {reduction}")
        self.channels = channels
        b = channels // reduction
        self.branch = nn.Sequential(_preact_conv(channels, b, 1), _preact_conv(b, b, 3), _preact_conv(b, channels, 1))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt-style block: ``x + pw2(gelu(pw1(layernorm(dwconv7(x)))))``, ``C -> C``.

    The 7x7 depthwise conv mixes space, the two pointwise layers (``nn.Linear`` on channels-last
    tensors, the same map as a 1x1 conv) mix channels through an ``expansion``-times wider hidden
    layer. One LayerNorm over the channels, one GELU, nothing after the addition. (Liu et al. also
    scale the branch by a learned per-channel factor, "layer scale"; left out here.)
    """

    def __init__(self, channels: int, kernel: int = 7, expansion: int = 4) -> None:
        super().__init__()
        if channels < 1 or expansion < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"need channels, expansion >= 1 and an odd kernel; got {channels}, {expansion}, {kernel}")
        self.channels = channels
        self.dwconv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1 = nn.Linear(channels, expansion * channels)
        self.pw2 = nn.Linear(expansion * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"ConvNeXtBlock expects (N, {self.channels}, H, W), got {tuple(x.shape)}")
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C): channels last for LayerNorm and Linear
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))  # (N, H, W, C)
        return x + y.permute(0, 3, 1, 2)  # (N, C, H, W)


def make_block(kind: str, channels: int) -> nn.Module:
    """A block of :data:`BLOCK_KINDS` on ``channels`` channels (the defaults of :func:`block_cost`)."""
    blocks: dict[str, type[nn.Module]] = {
        "plain": PlainBlock,
        "separable": SeparableBlock,
        "bottleneck": BottleneckBlock,
        "convnext": ConvNeXtBlock,
    }
    if kind not in blocks:
        raise ValueError(f"kind must be one of {BLOCK_KINDS}, got {kind!r}")
    return blocks[kind](channels)


class BlockNet(nn.Module):
    """A small CNN for ``(N, 1, 8, 8)`` digits built from one kind of block.

    stem: 3x3 conv ``1 -> width``; ``depth`` blocks at 8x8; 2x2 max-pool (stride 2) to 4x4;
    ``depth`` blocks at 4x4; BatchNorm and ReLU (the blocks are pre-activation, so the last
    branch output is not yet normalised); global average pool ``(N, width)``; linear -> logits.
    The width is constant, so only the blocks differ between kinds.
    """

    def __init__(self, kind: str, width: int, depth: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if width < 1 or depth < 1 or num_classes < 2:
            raise ValueError(f"need width, depth >= 1 and num_classes >= 2; got {width}, {depth}, {num_classes}")
        self.kind = kind
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stage1 = nn.Sequential(*[make_block(kind, width) for _ in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.stage2 = nn.Sequential(*[make_block(kind, width) for _ in range(depth)])
        self.final = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 8, 8) -> (N, num_classes)``."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"BlockNet expects (N, 1, H, W), got {tuple(x.shape)}")
        h = self.stage1(self.stem(x))  # (N, width, 8, 8)
        h = self.final(self.stage2(self.pool(h)))  # (N, width, 4, 4)
        return self.head(h.mean(dim=(2, 3)))  # (N, num_classes)
