"""Chapter 13: quantization -- affine int8 by hand, the straight-through estimator, QAT, and int8 in ONNX Runtime.

- :func:`qrange`, :func:`qparams` and :func:`minmax` give the integer range and the
  ``(scale, zero_point)`` of affine quantization, symmetric or asymmetric, per tensor or per channel.
- :func:`quantize`, :func:`dequantize` and :func:`fake_quantize` apply ``q = clamp(round(x / s) + z)``
  and ``x_hat = s (q - z)``; :func:`fake_quantize` passes gradients with the (clipped)
  straight-through estimator :func:`round_ste`, exactly like ``torch.fake_quantize_per_*_affine``.
- :func:`int8_linear` is the integer-only matrix product of a quantized linear layer.
- :class:`QuantizedLinear` is the corrected version of the seed's sketch: fp32 master weights
  initialised like ``nn.Linear``, fake-quantized weights (per channel) and inputs (running range)
  in the forward pass, gradients through the STE -- quantization-aware training (QAT).
  :func:`to_quantized` swaps every ``nn.Linear`` of a trained model for one, and
  :func:`calibrate` sets their input ranges from a calibration batch (post-training quantization).
- ONNX and ONNX Runtime, first met here and used again in chapter 20 (:mod:`dlarch_lib.deploy`):
  :func:`export_onnx` writes a model to an ONNX file, :func:`ort_session` opens one with ONNX
  Runtime, :func:`ort_predict` runs it on a batch, and :func:`ort_inference_call` is the callable
  to time with :func:`dlarch_lib.core.measure.timings_ms` (the input converted once, outside it).
- :func:`ort_quantize_dynamic` and :func:`ort_quantize_static` run post-training
  quantization with ONNX Runtime's own tools.
- PyTorch's own static path (torchao's PT2E): :func:`pt2e_quantizer` annotates linear and conv
  layers with the scheme of :class:`QuantizedLinear`, :func:`pt2e_quantize` exports, calibrates and
  converts, and :func:`pt2e_qparams` reads back the activation scales and zero points;
  :func:`linear_input_ranges` and :func:`set_input_ranges` calibrate the hand-written model from the
  float model's ranges, as PT2E's observers do.
- Calibration: :func:`clip_error` is the error of a clipping threshold and :func:`clip_threshold`
  chooses one (min/max, percentile, MSE-optimal).
- Floating-point formats: :func:`unit_roundoff` is ``u = 2^-p`` of fp16, bf16, fp8.
- Activation outliers: :func:`outlier_columns`, :func:`vectorwise_int8_matmul` and
  :func:`llm_int8_linear` (LLM.int8's mixed decomposition), :class:`LLMInt8Linear` and
  :func:`swap_linear` to put it in a model.

``onnx``, ``onnxruntime`` and ``torchao`` are imported inside the functions that need them.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib.core.train import model_device

# --- affine quantization -------------------------------------------------------------------


def qrange(bits: int = 8, symmetric: bool = False) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit code.

    Asymmetric codes are unsigned, ``[0, 2^b - 1]`` (uint8: 0..255). Symmetric codes are signed
    and *restricted* to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (int8: -127..127), so that the zero
    point is 0 and the range is symmetric about it.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in 2..16, got {bits!r}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams(
    x_min: torch.Tensor | float, x_max: torch.Tensor | float, bits: int = 8, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` that map the real range ``[x_min, x_max]`` onto :func:`qrange`.

    The range is first widened to contain 0, so that real 0 (padding, ReLU output) is exactly
    representable. Asymmetric: ``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)``.
    Symmetric: ``s = max(|min|, |max|) / qmax``, ``z = 0``. Scalars give a per-tensor pair;
    ``(C,)`` tensors give per-channel ``(C,)`` scales (float32) and zero points (int64).
    """
    lo = torch.as_tensor(x_min, dtype=torch.float32)
    hi = torch.as_tensor(x_max, dtype=torch.float32)
    if lo.shape != hi.shape:
        raise ValueError(f"x_min and x_max must have the same shape, got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if bool((lo > hi).any()):
        raise ValueError("x_min must be <= x_max everywhere")
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)  # the range must contain 0
    tiny = torch.finfo(torch.float32).eps
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=tiny)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=tiny)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
    return scale, zero_point


def minmax(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed range of ``x``: scalars (per tensor) or ``(C,)`` tensors over all dims but ``axis``."""
    if axis is None:
        return x.detach().min(), x.detach().max()
    _check_axis(x, axis)
    flat = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, rest)
    return flat.min(dim=1).values, flat.max(dim=1).values


def _check_axis(x: torch.Tensor, axis: int) -> None:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")


def _broadcast(x: torch.Tensor, t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``t`` ``(C,)`` so it broadcasts along ``axis`` of ``x``."""
    if axis is None:
        if t.numel() != 1:
            raise ValueError(f"per-tensor quantization needs a scalar scale and zero point, got shape {tuple(t.shape)}")
        return t.reshape(())
    _check_axis(x, axis)
    if t.shape != (x.shape[axis],):
        raise ValueError(
            f"per-channel scale and zero point must have shape ({x.shape[axis]},) for axis {axis}, got {tuple(t.shape)}"
        )
    shape = [1] * x.ndim
    shape[axis] = -1
    return t.reshape(shape)


class _RoundSTE(torch.autograd.Function):
    """``round`` in the forward pass, the identity in the backward pass."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round to nearest (ties to even) with the straight-through estimator: d round(v) / dv := 1."""
    return _RoundSTE.apply(v)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int = 8,
    symmetric: bool = False,
    axis: int | None = None,
) -> torch.Tensor:
    """Integer codes ``q = clamp(round(x / s) + z, qmin, qmax)`` as int32 (same shape as ``x``)."""
    qmin, qmax = qrange(bits, symmetric)
    s, z = _broadcast(x, scale, axis), _broadcast(x, zero_point, axis)
    return torch.clamp(torch.round(x / s) + z, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Real values ``x_hat = s (q - z)`` (float32, same shape as ``q``)."""
    s, z = _broadcast(q, scale, axis), _broadcast(q, zero_point, axis)
    return s * (q.to(torch.float32) - z)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int = 8,
    symmetric: bool = False,
    axis: int | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, differentiable with the clipped straight-through estimator.

    The gradient with respect to ``x`` is 1 where ``round(x / s) + z`` lies in ``[qmin, qmax]`` and 0
    where it is clipped -- the same as ``torch.fake_quantize_per_tensor_affine`` and
    ``torch.fake_quantize_per_channel_affine``. ``scale`` and ``zero_point`` get no gradient.
    """
    qmin, qmax = qrange(bits, symmetric)
    s, z = _broadcast(x, scale, axis).detach(), _broadcast(x, zero_point, axis).to(x.dtype)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)  # clamp: zero gradient outside the range
    return (q - z) * s


def int8_linear(
    qx: torch.Tensor,
    sx: torch.Tensor,
    zx: torch.Tensor,
    qw: torch.Tensor,
    sw: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer-only linear layer: uint8 input codes, symmetric per-channel int8 weight codes.

    qx ``(N, in)`` with scalar ``sx, zx``; qw ``(out, in)`` with ``(out,)`` scales ``sw`` (zero point 0).
    ``y = sx sw (qx qw^T - zx sum_k qw) + b``: one int32 matrix product, one precomputable row sum
    of the weights, one float rescale per output channel. Returns float32 ``(N, out)``.
    """
    if qx.ndim != 2 or qw.ndim != 2 or qx.shape[1] != qw.shape[1]:
        raise ValueError(
            f"need qx (N, in) and qw (out, in) with matching in, got {tuple(qx.shape)} and {tuple(qw.shape)}"
        )
    acc = qx.to(torch.int64) @ qw.to(torch.int64).T  # (N, out), exact integer accumulation
    acc = acc - zx.to(torch.int64) * qw.to(torch.int64).sum(dim=1)  # zero-point correction, (out,)
    y = (sx * sw).to(torch.float32) * acc.to(torch.float32)  # (N, out)
    return y if bias is None else y + bias


# --- quantization-aware training -----------------------------------------------------------


class QuantizedLinear(nn.Linear):
    """A linear layer trained with fake quantization (the corrected seed ``QuantizedLinear``).

    It *is* an ``nn.Linear`` -- fp32 master weights and bias initialised exactly like one
    (Kaiming-uniform weight, bias uniform in ``+-1/sqrt(in_features)``), not from ``randn``.
    The forward pass fake-quantizes the weight symmetrically (per output channel, or per tensor
    with ``per_channel=False``) and the input asymmetrically per tensor over a running (EMA)
    min/max range, then calls ``F.linear``; gradients reach the master weights through the
    straight-through estimator. Input ``(N, in)``, output ``(N, out)``. ``act_bits=None``
    leaves the input in float.
    """

    act_min: torch.Tensor  # buffers: the observed input range and whether a batch set it
    act_max: torch.Tensor
    observed: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        act_bits: int | None = 8,
        per_channel: bool = True,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        qrange(bits)  # validates
        if act_bits is not None:
            qrange(act_bits)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.bits, self.act_bits, self.per_channel, self.momentum = bits, act_bits, per_channel, momentum
        self.register_buffer("act_min", torch.tensor(0.0))
        self.register_buffer("act_max", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))

    @classmethod
    def from_float(
        cls, linear: nn.Linear, bits: int = 8, act_bits: int | None = 8, per_channel: bool = True
    ) -> QuantizedLinear:
        """A :class:`QuantizedLinear` holding a copy of a trained ``linear``'s weights (start of QAT),
        on the same device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, act_bits, per_channel)
        layer.load_state_dict(linear.state_dict(), strict=False)  # weight and bias; observers start empty
        return layer.to(linear.weight.device)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric ``(scale, zero_point)`` of the current weight: ``(out,)`` each, or scalars per tensor."""
        return qparams(*minmax(self.weight, axis=0 if self.per_channel else None), bits=self.bits, symmetric=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in) -> (N, out)`` with fake-quantized weight and input."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects (..., {self.in_features}), got {tuple(x.shape)}")
        if self.act_bits is not None:
            if self.training:  # track the input range with an exponential moving average
                lo, hi = x.detach().min(), x.detach().max()
                m = 1.0 if not bool(self.observed) else self.momentum
                self.act_min.lerp_(lo, m)
                self.act_max.lerp_(hi, m)
                self.observed.fill_(True)
            elif not bool(self.observed):
                raise ValueError(
                    "QuantizedLinear has seen no training batch: its input range is unknown (run calibrate)"
                )
            x = fake_quantize(x, *qparams(self.act_min, self.act_max, self.act_bits), bits=self.act_bits)
        axis = 0 if self.per_channel else None
        w = fake_quantize(self.weight, *self.weight_qparams(), bits=self.bits, symmetric=True, axis=axis)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, act_bits={self.act_bits}, per_channel={self.per_channel}"


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 flags of int8 dot products that accumulate in 32 bits


def cpu_has_vnni(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has VNNI (int8 dot products with 32-bit accumulation), from ``/proc/cpuinfo``.

    ``cpuinfo`` is the text of that file (read from the machine when ``None``). Returns ``None`` when
    the flags cannot be read (no such file, or no ``flags`` line: not Linux on x86), else whether any
    of :data:`VNNI_FLAGS` is listed. Without VNNI, x86 int8 kernels use ``vpmaddubsw``, whose
    16-bit pair sums saturate for 8-bit weights.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()
    }
    if not flags:
        return None
    return any(flag in flags for flag in VNNI_FLAGS)


def to_quantized(model: nn.Module, bits: int = 8, act_bits: int | None = 8, per_channel: bool = True) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.Linear`` replaced by a :class:`QuantizedLinear`.

    The copies keep the trained weights (:meth:`QuantizedLinear.from_float`) and their device; their
    input ranges are unknown until :func:`calibrate` (post-training quantization) or a training step
    (QAT) sets them. ``model`` itself is left unchanged. The copy is a new model: move it once with
    ``.to(RUN.device)`` before training it.
    """
    qrange(bits)
    if act_bits is not None:
        qrange(act_bits)
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and not isinstance(child, QuantizedLinear):
                setattr(parent, name, QuantizedLinear.from_float(child, bits, act_bits, per_channel))
            else:
                swap(child)

    swap(model)
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("to_quantized found no nn.Linear in the model")
    return model


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every :class:`QuantizedLinear` input range to the min/max it sees on the batch ``x``.

    One forward pass in training mode with a fresh observer (the first batch sets the range
    exactly), without gradients, on the model's device; the model is returned in evaluation mode.
    This is min/max calibration, as in ONNX Runtime's ``CalibrationMethod.MinMax``.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("calibrate needs a model with QuantizedLinear layers (see to_quantized)")
    for layer in layers:
        layer.observed.fill_(False)
    model.train()
    model(x.to(model_device(model)))
    return model.eval()


# --- ONNX and ONNX Runtime -----------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_name: str = "x",
    output_name: str = "logits",
) -> str:
    """Export ``model`` (put in eval mode) to ONNX at ``path``; returns ``path`` as a string.

    Uses the TorchScript exporter (``dynamo=False``): it traces one forward pass on ``example``
    ``(B, ...)`` and, in eval mode, folds BatchNorm into the preceding convolution (constant
    folding). ``dynamic_batch`` names axis 0 of the input and output ``"batch"`` (a symbolic
    dimension) instead of fixing it to ``B``. Two known warnings are silenced, nothing else:
    the tracer's ``TracerWarning`` about shape checks in ``forward`` (they test fixed
    dimensions only) and the ``DeprecationWarning`` that the TorchScript exporter is legacy.
    ``model`` and ``example`` must be on the same device; the file does not record it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.ndim < 1:
        raise ValueError("example must be a batched input tensor (B, ...)")
    if not isinstance(opset, int) or not 7 <= opset <= 23:
        raise ValueError(f"opset must be an int in 7..23, got {opset!r}")
    if input_name == output_name:
        raise ValueError(f"input and output names must differ, both are {input_name!r}")
    model.eval()
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes=axes,
        )
    return str(path)


OPT_LEVELS: dict[str, str] = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}
"""ONNX Runtime graph optimisation levels, weakest first: name -> ``GraphOptimizationLevel`` member."""


def ort_session(
    path: str | os.PathLike,
    threads: int | None = None,
    level: str = "all",
    optimized_path: str | os.PathLike | None = None,
    providers: Sequence[Any] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for the ONNX file ``path``.

    ``threads`` intra-op threads (default: torch's thread count); ``level`` one of
    :data:`OPT_LEVELS`; ``optimized_path`` saves the graph after optimisation (what ORT
    really runs); ``providers`` execution providers in preference order (default: the CPU).
    """
    import onnxruntime as ort

    if level not in OPT_LEVELS:
        raise ValueError(f"level must be one of {list(OPT_LEVELS)}, got {level!r}")
    if not hasattr(ort.GraphOptimizationLevel, OPT_LEVELS[level]):
        raise ValueError(f"this onnxruntime {ort.__version__} has no optimisation level {level!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
    options.log_severity_level = 3  # errors only
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def ort_inference_call(session: Any, x: torch.Tensor) -> Callable[[], list[np.ndarray]]:
    """A callable running ``session`` on the batch ``x`` ``(B, ...)``: what :func:`timings_ms` times.

    ``x`` is converted to a float32 NumPy array (on the CPU) once, here, so the conversion stays
    out of the timed calls: ``min(timings_ms(ort_inference_call(session, x)))``. The callable
    returns ONNX Runtime's list of outputs.
    """
    feed = {session.get_inputs()[0].name: x.detach().cpu().numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def ort_predict(session: Any, x: torch.Tensor) -> torch.Tensor:
    """First output of ``session`` on the batch ``x``, as a CPU float tensor."""
    return torch.from_numpy(ort_inference_call(session, x)()[0])


# --- post-training quantization with ONNX Runtime -----------------------------------------


def _preprocessed(src: str | os.PathLike, workdir: str) -> str:
    """``src`` after ONNX Runtime's recommended pre-processing (shape inference, graph optimisation)."""
    from onnxruntime.quantization import quant_pre_process

    out = str(Path(workdir) / "preprocessed.onnx")
    quant_pre_process(str(src), out)
    return out


def ort_quantize_dynamic(src: str | os.PathLike, dst: str | os.PathLike, reduce_range: bool = True) -> str:
    """Dynamic PTQ of the ONNX model ``src`` into ``dst``; returns ``dst``.

    Weights become int8 (symmetric, per output channel) now; each activation's range is
    measured on every batch at run time (``DynamicQuantizeLinear``, uint8), so no calibration
    data is needed, at the price of a min/max pass per layer per call. ``reduce_range`` keeps
    the weights to 7 bits, which avoids the int16 overflow of uint8 x int8 kernels on x86 CPUs
    without VNNI (see the chapter); the file is int8 either way.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(
            _preprocessed(src, tmp), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range
        )
    return str(dst)


def calibration_reader(x: torch.Tensor, batch_size: int = 64, input_name: str = "x") -> Any:
    """An ``onnxruntime.quantization.CalibrationDataReader`` that yields ``x`` ``(N, ...)`` in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration data must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[torch.Tensor] = iter(x.split(batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch.numpy().astype(np.float32)}

        def rewind(self) -> None:
            self._batches = iter(x.split(batch_size))

    return _Reader()


def ort_quantize_static(
    src: str | os.PathLike, dst: str | os.PathLike, calib_x: torch.Tensor, reduce_range: bool = True
) -> str:
    """Static PTQ of ``src`` into ``dst``: int8 weights (per channel), uint8 activations; returns ``dst``.

    Every activation's range is fixed once, from min/max over the calibration batch ``calib_x``
    ``(N, ...)``. QDQ format: QuantizeLinear/DequantizeLinear pairs around each Gemm, which
    ONNX Runtime fuses into int8 kernels when it loads the model. ``reduce_range``: 7-bit
    weights, as in :func:`ort_quantize_dynamic`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = calibration_reader(calib_x)  # validates calib_x before any work
    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(
            _preprocessed(src, tmp),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return str(dst)


# --- calibration: choosing the clipping range ----------------------------------------------

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
"""Ways to choose the symmetric clipping threshold ``c`` of a calibration set (:func:`clip_threshold`)."""


def clip_error(x: torch.Tensor, c: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """Mean squared error of symmetric ``bits``-bit fake quantization of ``x`` clipped to ``[-c, c]``.

    ``s = c / qmax`` with ``qmax = 2^(b-1) - 1``: rounding error for ``|x| <= c``, clipping error beyond.
    ``c`` may be a ``(K,)`` tensor of thresholds; the result then has shape ``(K,)`` (a scalar otherwise).
    """
    c_t = torch.as_tensor(c, dtype=torch.float32, device=x.device)
    if bool((c_t <= 0).any()):
        raise ValueError("the clipping threshold c must be > 0")
    qmin, qmax = qrange(bits, symmetric=True)
    flat = x.detach().reshape(1, -1).float()  # (1, N)
    s = (c_t.reshape(-1, 1) / qmax).float()  # (K, 1)
    x_hat = s * torch.clamp(torch.round(flat / s), qmin, qmax)  # (K, N)
    err = (x_hat - flat).pow(2).mean(dim=1)  # (K,)
    return err.reshape(c_t.shape)


def clip_threshold(
    x: torch.Tensor, method: str = "minmax", bits: int = 8, percentile: float = 99.99, grid: int = 200
) -> torch.Tensor:
    """Symmetric clipping threshold ``c`` (a scalar tensor) chosen from the calibration data ``x``.

    - ``"minmax"``: ``c = max |x|``, nothing clips.
    - ``"percentile"``: ``c`` = the ``percentile``-th percentile of ``|x|``; the rarest values clip.
    - ``"mse"``: the ``c`` among ``grid`` evenly spaced fractions ``k / grid`` of ``max |x|``
      (``k = 1..grid``, so ``max |x|`` itself is a candidate) that minimises :func:`clip_error`.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError("calibration data must be non-empty and finite")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    a = x.detach().abs().flatten().float()
    top = a.max()
    if not bool(top > 0):
        raise ValueError("calibration data is all zeros: there is no range to clip")
    if method == "minmax":
        return top
    if method == "percentile":
        return torch.quantile(a.double(), percentile / 100.0).float().clamp(min=torch.finfo(torch.float32).tiny)
    candidates = top * torch.arange(1, grid + 1, device=a.device, dtype=torch.float32) / grid  # (grid,)
    return candidates[clip_error(a, candidates, bits).argmin()]


# --- floating-point formats: fp16, bf16, fp8 ---------------------------------------------


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error ``u = 2^-p`` of rounding a real number to ``dtype`` (to nearest).

    ``p`` counts the significand bits including the implicit leading 1: fp16 has 11 (``u = 2^-11``),
    bf16 8 (``2^-8``), fp32 24 (``2^-24``), fp8 e4m3 4 (``2^-4``). ``u`` is half of ``finfo(dtype).eps``.
    It bounds ``|fl(x) - x| <= u |x|`` for ``|x|`` in the normal range (above ``finfo.tiny``, below ``finfo.max``).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"unit_roundoff needs a floating-point dtype, got {dtype}")
    return torch.finfo(dtype).eps / 2


# --- activation outliers: LLM.int8's mixed-precision decomposition -------------------------


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the feature columns of ``x`` ``(N, K)`` that hold any ``|value| >= threshold`` (int64, sorted)."""
    if x.ndim != 2:
        raise ValueError(f"outlier_columns needs x of shape (N, K), got {tuple(x.shape)}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return torch.nonzero(x.detach().abs().amax(dim=0) >= threshold).flatten()


def vectorwise_int8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with symmetric int8 codes: one scale per row of ``x`` ``(N, K)`` and per row of ``w`` ``(M, K)``.

    ``y_nm = s_n t_m sum_k q_nk r_mk`` with ``s_n = max_k |x_nk| / 127`` and ``t_m = max_k |w_mk| / 127``:
    one integer product and an outer product of scales (LLM.int8's vector-wise quantization). Returns ``(N, M)``.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x (N, K) and w (M, K) with matching K, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], w.shape[0])
    sx, zx = qparams(-x.detach().abs().amax(dim=1), x.detach().abs().amax(dim=1), symmetric=True)  # (N,)
    sw, zw = qparams(-w.detach().abs().amax(dim=1), w.detach().abs().amax(dim=1), symmetric=True)  # (M,)
    qx = quantize(x, sx, zx, symmetric=True, axis=0).to(torch.float64)  # (N, K) codes, exact in float64
    qw = quantize(w, sw, zw, symmetric=True, axis=0).to(torch.float64)  # (M, K)
    acc = qx @ qw.T  # (N, M): integer sums (|sum| < 2^53, exact)
    return (sx[:, None].double() * sw[None, :].double() * acc).to(x.dtype)


def llm_int8_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0
) -> torch.Tensor:
    """LLM.int8's mixed decomposition of ``F.linear(x, weight, bias)``: ``(N, K) -> (N, M)``.

    The feature columns of ``x`` with an entry of magnitude ``>= threshold`` (:func:`outlier_columns`)
    and the matching columns of ``weight`` ``(M, K)`` are multiplied in floating point; all other
    columns go through :func:`vectorwise_int8_matmul`. ``threshold=0`` keeps everything in float
    (exactly ``F.linear``); ``threshold=inf`` is plain vector-wise int8.
    """
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need x (N, K) and weight (M, K) with matching K, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    outliers = outlier_columns(x, threshold)  # (O,)
    regular = torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
    regular[outliers] = False
    y = x[:, outliers] @ weight[:, outliers].T  # (N, M): the outlier part, in float
    y = y + vectorwise_int8_matmul(x[:, regular], weight[:, regular])  # (N, M): the rest, in int8
    return y if bias is None else y + bias


class LLMInt8Linear(nn.Module):
    """An ``nn.Linear`` whose forward pass is :func:`llm_int8_linear` (inference only). ``(..., K) -> (..., M)``."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LLMInt8Linear wraps an nn.Linear, got {type(linear).__name__}")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.linear, self.threshold = linear, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten the leading dimensions, decompose, restore them."""
        lead = x.shape[:-1]
        y = llm_int8_linear(x.reshape(-1, x.shape[-1]), self.linear.weight, self.linear.bias, self.threshold)
        return y.reshape(*lead, y.shape[-1])


def swap_linear(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.Linear`` replaced by ``make(linear)``; ``model`` is unchanged."""
    model = copy.deepcopy(model)

    def swap(parent: nn.Module) -> int:
        count = 0
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
                count += 1
            else:
                count += swap(child)
        return count

    if swap(model) == 0:
        raise ValueError("swap_linear found no nn.Linear in the model")
    return model


# --- PyTorch's own path: PT2E static quantization (torchao) ---------------------------------


def pt2e_quantizer() -> Any:
    """A torchao PT2E ``Quantizer`` with the scheme of :class:`QuantizedLinear`, for every linear and 2-d convolution.

    Inputs: uint8 ``[0, 255]``, per tensor, asymmetric, :class:`MinMaxObserver` ranges. Weights: int8
    ``[-127, 127]``, per output channel, symmetric, ``PerChannelMinMaxObserver``. Bias and outputs stay in
    float. It annotates the graph nodes ``aten.linear`` and ``aten.conv2d`` directly, which works the same
    in every torch version (the x86 quantizer's pattern matcher finds no linear under torch 2.11).
    """
    from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    act = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=MinMaxObserver,
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        is_dynamic=False,
        observer_or_fake_quant_ctr=PerChannelMinMaxObserver,
    )
    targets = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)

    class _Int8Quantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in targets:
                    x, w = node.args[0], node.args[1]
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={x: act, w: weight}, _annotated=True
                    )
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            return None

    return _Int8Quantizer()


def pt2e_quantize(model: nn.Module, calib_x: torch.Tensor, example: torch.Tensor | None = None) -> nn.Module:
    """PyTorch's static int8 path: export, insert observers, calibrate on ``calib_x``, convert.

    ``torch.export.export`` captures ``model`` (eval mode) as a graph with a dynamic batch dimension
    (``example`` ``(B, ...)``, default the first two calibration samples); ``prepare_pt2e`` inserts the
    observers of :func:`pt2e_quantizer`; one pass over ``calib_x`` ``(N, ...)`` records the ranges;
    ``convert_pt2e`` replaces each observer by a quantize/dequantize pair with the fixed scale and zero
    point. The result is a ``GraphModule`` in the reference representation (Q/DQ around float ops),
    which a backend compiler (``torch.compile``, ExecuTorch) lowers to int8 kernels. ``model`` is unchanged.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if calib_x.ndim < 2 or len(calib_x) < 2:
        raise ValueError(f"calibration data must be a batch (N >= 2, ...), got shape {tuple(calib_x.shape)}")
    device = model_device(model)
    model = copy.deepcopy(model).eval()
    example = (calib_x[:2] if example is None else example).to(device)
    batch = torch.export.Dim("batch")
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, pt2e_quantizer())
    with torch.no_grad():
        prepared(calib_x.to(device))
    return convert_pt2e(prepared)


def pt2e_qparams(graph: nn.Module) -> list[tuple[float, int]]:
    """``(scale, zero_point)`` of every per-tensor quantize node of a :func:`pt2e_quantize` result, in graph order."""
    if not isinstance(graph, torch.fx.GraphModule):
        raise TypeError(f"pt2e_qparams needs a converted torch.fx.GraphModule, got {type(graph).__name__}")
    target = torch.ops.quantized_decomposed.quantize_per_tensor.default
    return [
        (float(n.args[1]), int(n.args[2])) for n in graph.graph.nodes if n.op == "call_function" and n.target == target
    ]


@torch.no_grad()
def linear_input_ranges(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(min, max)`` of the input of every ``nn.Linear`` of ``model`` on the batch ``x``, in module order.

    One forward pass of the model as it is (a float model: the ranges of the float activations, which
    is what PT2E's observers record). Feed them to :func:`set_input_ranges` of a :func:`to_quantized`
    copy. :func:`calibrate` differs: it observes each layer's input *after* the earlier layers were
    fake-quantized.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("linear_input_ranges found no nn.Linear in the model")
    ranges: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: ranges.append(minmax(args[0]))) for m in layers]
    try:
        was_training = model.training
        model.eval()
        model(x.to(model_device(model)))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return ranges


def set_input_ranges(model: nn.Module, ranges: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Set the input range of every :class:`QuantizedLinear` of ``model`` (module order) and return it in eval mode."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if len(layers) != len(ranges) or not layers:
        raise ValueError(f"got {len(ranges)} ranges for {len(layers)} QuantizedLinear layers")
    with torch.no_grad():
        for layer, (lo, hi) in zip(layers, ranges):
            layer.act_min.fill_(float(lo))
            layer.act_max.fill_(float(hi))
            layer.observed.fill_(True)
    return model.eval()
