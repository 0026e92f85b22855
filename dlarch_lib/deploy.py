"""Chapter 20: deployment -- inspect ONNX graphs, run and compare engines, build TensorRT engines.

ONNX export and ONNX Runtime sessions come from chapter 13 (:func:`dlarch_lib.quant.export_onnx`,
:func:`~dlarch_lib.quant.ort_session`, :func:`~dlarch_lib.quant.ort_predict`,
:func:`~dlarch_lib.quant.ort_inference_call`); this chapter builds on them:

- :func:`export_onnx_dynamo` exports with the dynamo exporter (``torch.onnx.export(dynamo=True)``,
  a dynamic batch declared with ``torch.export.Dim``); :func:`export_program` gives the
  ``torch.export`` program underneath, :func:`aten_ops` and :func:`dynamic_ranges` read it,
  :func:`save_and_load_program` round-trips it through a ``.pt2`` archive, and :func:`aoti_compile`
  compiles it with AOTInductor where :func:`cxx_compiler` finds a C++ compiler.
- :func:`check_onnx` loads and validates an ONNX file; :func:`graph_summary` counts its operators
  and reads its input/output signature.
- :func:`fold_batchnorm` is the Conv--BatchNorm folding the exporter applies in eval mode.
- :class:`DigitsPipeline` puts pre-processing (raw grey levels -> [0, 1]) and post-processing
  (softmax) into the exported graph; :func:`stamp_metadata` / :func:`read_metadata` version it.
- :func:`available_opt_levels` lists ONNX Runtime's graph optimisation levels;
  :func:`optimized_graph` saves and summarises the graph ORT runs at each level;
  :func:`parity` checks ONNX Runtime against PyTorch at several batch sizes.
- :func:`latency_sweep` times PyTorch eager against ONNX Runtime over batch sizes (taking turns
  through :func:`dlarch_lib.core.measure.interleaved_timings_ms`) and :func:`fit_latency` fits the
  overhead-plus-throughput model ``t(B) = alpha + beta B``.
- :func:`available_providers` lists ORT execution providers present here, in preference order.
- :func:`bound_call` and :func:`run_bound` run a session through I/O binding on torch tensors
  (CPU or CUDA), reading and writing them in place.
- :func:`build_trt_engine` and :class:`TensorRTRunner` use the TensorRT 10 API
  (``build_serialized_network``, memory-pool limits, optimisation profiles, named I/O tensors,
  ``execute_async_v3``); :func:`removed_trt_apis` finds calls removed in TensorRT 10 in source code.

``onnx``, ``onnxruntime`` and ``tensorrt`` are imported inside the functions that need them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text bars, as in dlarch_lib.core.train

from dlarch_lib.core import hardware, measure
from dlarch_lib.core.train import model_device
from dlarch_lib.quant import OPT_LEVELS, ort_inference_call, ort_predict, ort_session

# --- export and inspection -----------------------------------------------------------------


def check_onnx(path: str | os.PathLike) -> Any:
    """Load the ONNX file at ``path``, run ``onnx.checker.check_model`` with shape inference, return the model.

    The checker validates the graph against the ONNX specification of its opset (operators,
    attributes, types, topological order); ``full_check`` also runs strict shape inference.
    Raises ``onnx.checker.ValidationError`` on an invalid model.
    """
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def _dims(value_info: Any) -> tuple[int | str, ...]:
    """Shape of an ONNX ``ValueInfoProto``: ints for fixed axes, names for symbolic ones."""
    return tuple(d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim)


@dataclass
class GraphSummary:
    """What an ONNX graph contains: opset, operator counts, I/O signature and weights."""

    opset: int
    ops: collections.Counter = field(default_factory=collections.Counter)
    inputs: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    outputs: dict[str, tuple[int | str, ...]] = field(default_factory=dict)
    initializers: int = 0
    weights: int = 0

    @property
    def nodes(self) -> int:
        """Number of nodes (operator instances) in the graph."""
        return sum(self.ops.values())

    @property
    def dynamic_batch(self) -> bool:
        """True when axis 0 of every input and output is symbolic (a named dimension)."""
        shapes = [*self.inputs.values(), *self.outputs.values()]
        return bool(shapes) and all(len(s) > 0 and isinstance(s[0], str) for s in shapes)


def graph_summary(model: Any) -> GraphSummary:
    """Summarise an ONNX model (a ``ModelProto`` or a path to one).

    Operators from other domains than the default ``ai.onnx`` (ONNX Runtime's fused
    ``com.microsoft`` ops, for instance) are counted as ``"domain:OpType"``.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"graph_summary needs an onnx.ModelProto or a path, got {type(model).__name__}")
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    ops = collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in graph.node
    )
    return GraphSummary(
        opset=opset,
        ops=ops,
        inputs={i.name: _dims(i) for i in graph.input if i.name not in weights},
        outputs={o.name: _dims(o) for o in graph.output},
        initializers=len(graph.initializer),
        weights=int(sum(np.prod(init.dims) for init in graph.initializer)),
    )


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A single ``nn.Conv2d`` equal to ``bn(conv(x))`` with ``bn`` in eval mode (running statistics).

    ``w' = w * g`` per output channel and ``b' = beta + (b - mu) * g`` with
    ``g = gamma / sqrt(var + eps)`` (``b = 0`` for a convolution without bias). Same result as
    ``torch.nn.utils.fusion.fuse_conv_bn_eval``; the inputs are not modified.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"need (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, {type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} channels, the convolution {conv.out_channels}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], conv.padding[1])
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (kh, kw),
        (sh, sw),
        padding,
        (dh, dw),
        conv.groups,
        bias=False,  # the folded bias is set below
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        gain = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        )
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.weight.copy_(conv.weight * gain.view(-1, 1, 1, 1))  # (O, C/g, kh, kw)
        fused.bias = nn.Parameter(shift + (bias - bn.running_mean) * gain)  # (O,)
    return fused.eval()


class DigitsPipeline(nn.Module):
    """Model plus pre- and post-processing, so the deployed graph takes what the application has.

    Input: raw digit images ``(N, 8, 8)``, grey levels 0..16 as float (``load_digits().images``).
    Pre-processing: divide by 16 and add the channel axis -> ``(N, 1, 8, 8)`` in [0, 1], as in
    :func:`dlarch_lib.core.data.digits_arrays`. Post-processing: softmax -> probabilities ``(N, classes)``.
    """

    def __init__(self, model: nn.Module, max_level: float = 16.0) -> None:
        super().__init__()
        if max_level <= 0:
            raise ValueError(f"max_level must be positive, got {max_level}")
        self.model, self.max_level = model, float(max_level)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` raw grey levels -> ``(N, classes)`` probabilities."""
        if raw.ndim != 3:
            raise ValueError(f"DigitsPipeline expects raw images (N, H, W), got {tuple(raw.shape)}")
        x = (raw / self.max_level).unsqueeze(1)  # (N, 1, H, W) in [0, 1]
        return F.softmax(self.model(x), dim=-1)


def stamp_metadata(path: str | os.PathLike, version: int, **props: str) -> str:
    """Write ``model_version`` and string metadata ``props`` into the ONNX file at ``path``; returns it.

    ONNX Runtime reads them back without running the model (:func:`read_metadata`): the
    file carries its own version, pre-processing contract and provenance.
    """
    import onnx

    if not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")
    bad = [k for k, v in props.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata values must be strings, not for {bad}")
    model = onnx.load(str(path))
    model.model_version = version
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **props})
    onnx.save(model, str(path))
    return str(path)


def read_metadata(session: Any) -> tuple[int, dict[str, str]]:
    """``(model_version, custom metadata)`` of an ``onnxruntime.InferenceSession``."""
    meta = session.get_modelmeta()
    return int(meta.version), dict(meta.custom_metadata_map)


# --- the dynamo exporter, torch.export and AOTInductor ----------------------------------------

_QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",)  # "torchvision is not installed" notices
_KNOWN_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # a FutureWarning from inside torch.export (torch 2.11-2.13)
    r"The given buffer is not writable",  # torch.export.load reading weights from the archive (torch 2.11)
)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporter's known notices (listed above), and nothing else."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for pattern in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _batch_shapes(example: torch.Tensor, dynamic_batch: bool, max_batch: int) -> tuple[dict[int, Any]] | None:
    """``dynamic_shapes`` for a one-input model: axis 0 is ``Dim("batch", 1..max_batch)`` or fixed."""
    if not isinstance(example, torch.Tensor) or example.ndim < 1:
        raise ValueError("example must be a batched input tensor (B, ...)")
    if not dynamic_batch:
        return None
    if len(example) < 2:
        raise ValueError(
            f"a dynamic batch needs an example with batch >= 2, got {len(example)}: "
            "torch.export specialises sizes 0 and 1 to constants"
        )
    if max_batch < len(example):
        raise ValueError(f"max_batch ({max_batch}) is smaller than the example's batch ({len(example)})")
    return ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def export_program(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True, max_batch: int = 4096
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (put in eval mode) on one input ``example`` ``(B, ...)``.

    The result is an ``ExportedProgram``: an FX graph of ATen operators with the weights as
    inputs, no Python left. ``dynamic_batch`` declares axis 0 as ``Dim("batch", min=1, max=max_batch)``;
    torch.export specialises sizes 0 and 1, so the example needs ``B >= 2``. Every other axis
    is fixed to the example's size, and the program checks these guards at every call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    shapes = _batch_shapes(example, dynamic_batch, max_batch)
    model.eval()
    with _quiet_export():
        return torch.export.export(model, (example,), dynamic_shapes=shapes)


def aten_ops(program: torch.export.ExportedProgram) -> collections.Counter:
    """Count the operators an ``ExportedProgram`` calls, by name (``"aten.conv2d.default"``: 6, ...)."""
    return collections.Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


def dynamic_ranges(program: torch.export.ExportedProgram) -> dict[str, tuple[int, int | float]]:
    """The symbolic sizes of ``program`` and the range it accepts for each: ``{"s77": (1, 4096)}``.

    These are the guards on the dynamic axes (``ExportedProgram.range_constraints``); an
    unbounded upper end is ``math.inf``.
    """
    ranges: dict[str, tuple[int, int | float]] = {}
    for symbol, bounds in program.range_constraints.items():
        upper = bounds.upper
        ranges[str(symbol)] = (int(bounds.lower), int(upper) if upper.is_Integer else math.inf)
    return ranges


def save_and_load_program(
    program: torch.export.ExportedProgram, path: str | os.PathLike
) -> torch.export.ExportedProgram:
    """``torch.export.save`` ``program`` to ``path`` (a ``.pt2`` zip archive) and load it back."""
    if Path(path).suffix != ".pt2":
        raise ValueError(f"an exported program is saved as a .pt2 archive, got {path}")
    with _quiet_export():
        torch.export.save(program, str(path))
        return torch.export.load(str(path))


def export_onnx_dynamo(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    max_batch: int = 4096,
    input_name: str = "x",
    output_name: str = "logits",
) -> str:
    """Export ``model`` (eval mode) to ONNX at ``path`` with the dynamo exporter; returns ``path``.

    ``torch.onnx.export(..., dynamo=True)`` captures the model with ``torch.export`` (as
    :func:`export_program` does, same ``Dim("batch")`` for a dynamic batch, so ``B >= 2``),
    translates the ATen graph to ONNX with ``onnxscript``, and optimises it (constant folding,
    which folds eval-mode BatchNorm into the convolutions). The dynamic axis is named ``batch``
    in the file. Needs the ``onnxscript`` package (``dl.require("onnx")``); its oldest
    supported opset is 18.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ValueError(f"the dynamo exporter writes opset 18..23, got {opset!r}")
    if input_name == output_name:
        raise ValueError(f"input and output names must differ, both are {input_name!r}")
    shapes = _batch_shapes(example, dynamic_batch, max_batch)
    model.eval()
    with _quiet_export():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=shapes,
        )
    if program is None:  # pragma: no cover - only the TorchScript exporter returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(path))
    return str(path)


CXX_COMPILERS = ("c++", "g++", "clang++")
"""The C++ compilers AOTInductor can use, in the order :func:`cxx_compiler` looks for them (after ``$CXX``)."""


def cxx_compiler() -> str | None:
    """Path of a C++ compiler on ``PATH`` (``$CXX`` first, then :data:`CXX_COMPILERS`), or ``None``.

    AOTInductor writes C++ (and, for a GPU, Triton kernels) and compiles it into a shared
    library, so it needs one; Colab and most Linux machines have ``g++``, Windows usually not.
    """
    for name in (os.environ.get("CXX"), *CXX_COMPILERS):
        if name and (found := shutil.which(name)):
            return found
    return None


def aoti_compile(program: torch.export.ExportedProgram, path: str | os.PathLike) -> str:
    """Compile ``program`` ahead of time with AOTInductor into the package ``path`` (``.pt2``); returns it.

    The package holds a shared library with the whole model (kernels plus a C++ wrapper that
    calls them in order) and the weights; ``torch._inductor.aoti_load_package(path)`` runs it
    from Python, and a C++ program can run it through ``AOTIModelPackageLoader`` with no Python.
    Compiling takes tens of seconds on a CPU. Raises ``RuntimeError`` without a C++ compiler.
    """
    if Path(path).suffix != ".pt2":
        raise ValueError(f"an AOTInductor package is a .pt2 archive, got {path}")
    if cxx_compiler() is None:
        raise RuntimeError("AOTInductor needs a C++ compiler (g++ or clang++) on PATH, and none was found")
    with _quiet_export():
        return str(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


# --- ONNX Runtime I/O binding -----------------------------------------------------------------


def _one_io(session: Any) -> tuple[Any, Any]:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"I/O binding here handles one input and one output, got {len(inputs)} and {len(outputs)}")
    return inputs[0], outputs[0]


def _bind(binding: Any, name: str, t: torch.Tensor, output: bool) -> None:
    """Point ``binding``'s input or output ``name`` at the memory of the float32 tensor ``t`` (no copy)."""
    kind = "cuda" if t.is_cuda else "cpu"
    bind = binding.bind_output if output else binding.bind_input
    bind(name, kind, t.device.index or 0, np.float32, list(t.shape), t.data_ptr())


def bound_call(session: Any, x: torch.Tensor, out: torch.Tensor) -> Any:
    """A callable that runs ``session`` reading ``x`` ``(B, ...)`` and writing ``out`` in place, via I/O binding.

    ``session.run(None, {name: array})`` takes NumPy arrays in host memory: on a GPU provider it
    copies the input to the device and the output back on every call, and allocates the
    output each time. I/O binding hands ONNX Runtime the addresses of existing buffers
    instead, here torch tensors, on the CPU or on the GPU the provider uses, so a CUDA tensor
    from the previous stage is read where it is and the result lands in ``out`` without a
    copy. ``x`` and ``out`` must be contiguous float32 tensors on the same device, and stay
    alive while the callable is used. The binding is made once; each call only runs.
    """
    name_in, name_out = (v.name for v in _one_io(session))
    for label, t in (("x", x), ("out", out)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{label} must be a contiguous float32 tensor, got {t.dtype}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{label} must be on the CPU or a CUDA GPU, got {t.device}")
    if x.device != out.device:
        raise ValueError(f"x and out must be on one device, got {x.device} and {out.device}")
    if x.ndim < 1 or out.ndim < 1 or len(x) != len(out):
        raise ValueError(f"x {tuple(x.shape)} and out {tuple(out.shape)} must have the same batch size")
    binding = session.io_binding()
    _bind(binding, name_in, x, output=False)
    _bind(binding, name_out, out, output=True)

    def run() -> None:
        binding.synchronize_inputs()  # a GPU input written on another stream is complete
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # ... and so is the output when run() returns

    return run


def run_bound(session: Any, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``session`` once on ``x`` through I/O binding (:func:`bound_call`); returns ``out``.

    Without ``out`` a float32 output of shape ``(B, *rest)`` is allocated on ``x``'s device,
    ``rest`` read from the session's output signature (which must be fixed after axis 0).
    """
    x = x.detach().float().contiguous()
    if out is None:
        rest = _one_io(session)[1].shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(f"the output shape {rest} is not fixed after the batch axis: pass out")
        out = torch.empty((len(x), *rest), dtype=torch.float32, device=x.device)
    bound_call(session, x, out)()
    return out


# --- ONNX Runtime ---------------------------------------------------------------------------


def available_opt_levels() -> list[str]:
    """The names in :data:`OPT_LEVELS` that the installed ONNX Runtime knows (``layout`` is recent)."""
    import onnxruntime as ort

    return [name for name, member in OPT_LEVELS.items() if hasattr(ort.GraphOptimizationLevel, member)]


def optimized_graph(path: str | os.PathLike, level: str, out: str | os.PathLike, threads: int = 1) -> GraphSummary:
    """Summary of the graph ONNX Runtime runs for ``path`` at optimisation ``level`` (saved to ``out``)."""
    ort_session(path, threads=threads, level=level, optimized_path=out)
    return graph_summary(out)


def parity(
    model: nn.Module, session: Any, inputs: Iterable[torch.Tensor], atol: float = 1e-5, rtol: float = 1e-4
) -> dict[int, float]:
    """Check ONNX Runtime against PyTorch on each batch; return ``{batch size: max |error|}``.

    Every batch must satisfy ``torch.testing.assert_close(ort, torch, atol, rtol)``, i.e.
    ``|y_ort - y_torch| <= atol + rtol |y_torch|`` elementwise, else ``AssertionError``.
    Different batch sizes exercise the dynamic batch axis. The model runs on its own device
    (eval mode, no gradients); the comparison is made on the CPU.
    """
    errors: dict[int, float] = {}
    model.eval()
    device = model_device(model)
    for x in inputs:
        with torch.no_grad():
            expected = model(x.to(device)).cpu()
        got = ort_predict(session, x)
        try:
            torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
        except AssertionError as error:
            raise AssertionError(f"batch {len(x)}: {error}") from None
        errors[len(x)] = max(errors.get(len(x), 0.0), (got - expected).abs().max().item())
    if not errors:
        raise ValueError("parity needs at least one input batch")
    return errors


def latency_sweep(
    model: nn.Module,
    session: Any,
    pool: torch.Tensor,
    batch_sizes: Sequence[int],
    budget: int = 2000,
    rounds: int = 3,
    progress: bool = True,
    clock: str = "wall",
) -> list[dict[str, float]]:
    """Median latency of PyTorch eager and ONNX Runtime on batches of ``pool`` ``(N, ...)``.

    Returns one row per batch size: ``batch``, ``eager_ms``, ``ort_ms``, ``speedup``
    (eager / ORT). The two engines take turns (:func:`dlarch_lib.core.measure.interleaved_timings_ms`,
    after two warm-up calls each) for ``rounds`` rounds, so that a burst of load on a shared
    machine hits both; each turn times ``max(4, budget // (rounds (B + 9)))`` calls, so small
    batches get many calls and large ones few. Each engine's latency is the median over its
    rounds of the median call of the round. The model runs on its own device (eval mode, no
    gradients: :func:`~dlarch_lib.core.measure.inference_call`), the session on its own
    provider. ``clock`` is ``"wall"`` or, where one CPU thread does the work, ``"cpu"``
    (:func:`~dlarch_lib.core.measure.steady_clock`).
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes!r}")
    if max(batch_sizes) > len(pool):
        raise ValueError(f"the pool has {len(pool)} inputs, fewer than the largest batch {max(batch_sizes)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if clock not in measure.CLOCKS:
        raise ValueError(f"clock must be one of {sorted(measure.CLOCKS)}, got {clock!r}")
    device = model_device(model)
    rows = []
    for b in tqdm(batch_sizes, desc="latency sweep", disable=not progress):
        x, repeats = pool[:b].contiguous(), max(4, budget // (rounds * (b + 9)))
        calls = {"eager": measure.inference_call(model, x.to(device)), "ort": ort_inference_call(session, x)}
        times = measure.interleaved_timings_ms(calls, rounds, 2, repeats=repeats, device=device, clock=clock)
        e, o = (float(np.median(np.median(np.reshape(times[k], (rounds, repeats)), axis=1))) for k in calls)
        rows.append({"batch": b, "eager_ms": e, "ort_ms": o, "speedup": e / o})
    return rows


def fit_latency(batch: Sequence[float], ms: Sequence[float]) -> tuple[float, float]:
    """Fit ``t(B) = alpha + beta B`` to measured times; returns ``(alpha, beta)`` in ms and ms per input.

    ``alpha`` is the fixed cost of one call (dispatch, per-operator overhead), ``beta`` the
    cost of one more input (arithmetic and memory traffic). Least squares on *relative*
    residuals (weights ``1 / t``), so the small batches, which pin ``alpha``, count as much as
    the large ones, which pin ``beta``.
    """
    b, t = np.asarray(batch, dtype=float), np.asarray(ms, dtype=float)
    if b.shape != t.shape or b.ndim != 1 or len(b) < 2 or len(np.unique(b)) < 2:
        raise ValueError("need two equal-length 1-D sequences with at least two distinct batch sizes")
    if (t <= 0).any():
        raise ValueError("times must be positive")
    beta, alpha = np.polyfit(b, t, 1, w=1.0 / t)
    return float(alpha), float(beta)


def available_providers(
    wanted: Sequence[str] = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
) -> list[str]:
    """The execution providers of ``wanted`` that this ``onnxruntime`` build offers, in ``wanted``'s order.

    The CPU build (``pip install onnxruntime``) has only the CPU provider;
    ``onnxruntime-gpu`` adds CUDA and TensorRT (which also need the CUDA and TensorRT libraries).
    """
    import onnxruntime as ort

    if isinstance(wanted, str):
        raise TypeError("wanted must be a sequence of provider names, not one string")
    present = set(ort.get_available_providers())
    return [p for p in wanted if p in present]


# --- TensorRT ---------------------------------------------------------------------------------

REMOVED_TRT_APIS: dict[str, str] = {
    "max_workspace_size": "config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)",
    "build_engine": "builder.build_serialized_network(network, config) -> serialized plan",
    "build_cuda_engine": "builder.build_serialized_network(network, config) -> serialized plan",
    "EXPLICIT_BATCH": "builder.create_network(0): networks are always explicit-batch",
    "max_batch_size": "an optimisation profile (profile.set_shape) for the batch axis",
    "execute_async_v2": "context.set_tensor_address(name, ptr) + context.execute_async_v3(stream)",
    "get_binding_shape": "engine.get_tensor_shape(name) / context.get_tensor_shape(name)",
    "set_binding_shape": "context.set_input_shape(name, shape)",
    "binding_is_input": "engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT",
    "num_bindings": "engine.num_io_tensors and engine.get_tensor_name(i)",
}
"""TensorRT 8 names that TensorRT 10 removed (``EXPLICIT_BATCH``: deprecated, ignored) -> what replaces them."""


def removed_trt_apis(source: str) -> dict[str, str]:
    """The names of :data:`REMOVED_TRT_APIS` used in ``source`` (Python code), with their replacements.

    Matches whole identifiers only (``build_engine`` does not match ``build_engine_cache``).
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a string of code, got {type(source).__name__}")
    return {name: fix for name, fix in REMOVED_TRT_APIS.items() if re.search(rf"\b{name}\b", source)}


def build_trt_engine(
    onnx_path: str | os.PathLike,
    *,
    fp16: bool = True,
    int8: bool = False,
    workspace_bytes: int = 1 << 30,
    batch: tuple[int, int, int] = (1, 64, 256),
) -> bytes:
    """Build a serialized TensorRT engine (a "plan") for an ONNX file with a dynamic batch axis.

    TensorRT 10 API: ``create_network(0)`` (explicit batch is the only mode), the ONNX parser's
    errors checked, ``set_memory_pool_limit(WORKSPACE, workspace_bytes)``, the ``FP16`` /
    ``INT8`` builder flags, an optimisation profile with ``batch = (min, opt, max)`` for axis 0
    of the input, and ``build_serialized_network``. ``int8`` only pays off on a model with
    Q/DQ nodes (explicit quantization); TensorRT 10 deprecates calibrators and TensorRT 11
    removes the precision flags (export a float16 model and pass ``fp16=False`` there).
    """
    if not isinstance(workspace_bytes, int) or workspace_bytes < 1 << 20:
        raise ValueError(f"workspace_bytes must be an int >= 1 MiB, got {workspace_bytes!r}")
    if len(batch) != 3 or not 1 <= batch[0] <= batch[1] <= batch[2]:
        raise ValueError(f"batch must be (min, opt, max) with 1 <= min <= opt <= max, got {batch!r}")
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    if not hardware.has_tensorrt():
        raise RuntimeError(hardware.explain_missing("requires-tensorrt"))
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for wanted, flag in ((fp16, "FP16"), (int8, "INT8")):
        if wanted:
            if not hasattr(trt.BuilderFlag, flag):
                raise RuntimeError(
                    f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (removed in 11): "
                    "export the model in the precision you want and build with the flag off"
                )
            config.set_flag(getattr(trt.BuilderFlag, flag))
    tensor = network.get_input(0)
    profile = builder.create_optimization_profile()
    sample = tuple(tensor.shape)[1:]  # fixed axes after the batch
    profile.set_shape(tensor.name, (batch[0], *sample), (batch[1], *sample), (batch[2], *sample))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    return bytes(plan)


class TensorRTRunner:
    """Run a serialized TensorRT engine on torch CUDA tensors (TensorRT 10 named-tensor API).

    One input and one output; the input shape is set per call (``set_input_shape``), buffers
    are torch tensors on the GPU (``set_tensor_address``), and ``execute_async_v3`` runs on
    torch's current CUDA stream. ``runner(x)`` returns the output on the GPU as float32.
    """

    def __init__(self, plan: bytes) -> None:
        if not hardware.has_tensorrt() or hardware.gpu_count() < 1:
            raise RuntimeError(hardware.explain_missing("requires-tensorrt"))
        import tensorrt as trt

        self._trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"TensorRTRunner handles one input and one output, got {inputs} and {outputs}")
        self.input, self.output = inputs[0], outputs[0]

    def _dtype(self, name: str) -> torch.dtype:
        return torch.from_numpy(np.empty(0, dtype=self._trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ...)`` -> the engine's output ``(B, ...)`` on the GPU, float32."""
        x = x.to("cuda", self._dtype(self.input)).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise ValueError(f"input shape {tuple(x.shape)} is outside the engine's optimisation profile")
        y = torch.empty(
            tuple(self.context.get_tensor_shape(self.output)), device="cuda", dtype=self._dtype(self.output)
        )
        self.context.set_tensor_address(self.input, x.data_ptr())
        self.context.set_tensor_address(self.output, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return y.float()
