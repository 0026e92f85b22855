"""Tests for dlarch_lib.deploy: ONNX export and inspection, ONNX Runtime, TensorRT plumbing."""

from __future__ import annotations

import inspect
import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dlarch_lib import deploy, quant
from dlarch_lib.cnn import SmallResNet
from dlarch_lib.core import hardware


def _trained_bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm with non-trivial running statistics and affine parameters (eval mode)."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


@pytest.fixture(scope="module")
def model() -> SmallResNet:
    torch.manual_seed(0)
    net = SmallResNet(width=4)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.load_state_dict(_trained_bn(m.num_features).state_dict())
    return net.eval()


def _export_without_warnings(export, model, path) -> str:
    """``export(model, path, example)``, asserting that the exporter let no warning through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export(model, path, torch.rand(2, 1, 8, 8))
    assert not caught, f"{export.__name__} let warnings through: {[str(w.message)[:80] for w in caught]}"
    return out


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory) -> str:
    return _export_without_warnings(quant.export_onnx, model, tmp_path_factory.mktemp("deploy") / "net.onnx")


def test_export_check_and_summary(onnx_path):
    proto = deploy.check_onnx(onnx_path)
    summary = deploy.graph_summary(proto)
    assert summary.opset == 17
    assert summary.inputs == {"x": ("batch", 1, 8, 8)} and summary.outputs == {"logits": ("batch", 10)}
    assert summary.dynamic_batch
    assert "BatchNormalization" not in summary.ops  # folded into the convolutions (eval mode)
    assert summary.ops["Conv"] == 6 and summary.ops["Gemm"] == 1  # stem, 2 + 2 block convs, 1 projection
    assert summary.nodes == sum(summary.ops.values()) and summary.weights > 0
    assert deploy.graph_summary(onnx_path).ops == summary.ops  # a path works too


def test_static_export_has_fixed_batch(model, tmp_path):
    path = quant.export_onnx(model, tmp_path / "static.onnx", torch.rand(3, 1, 8, 8), dynamic_batch=False, opset=13)
    summary = deploy.graph_summary(path)
    assert summary.opset == 13 and summary.inputs["x"] == (3, 1, 8, 8) and not summary.dynamic_batch


def _tiny_graph(op: str = "Relu") -> onnx.ModelProto:
    """x (N, 3) -> Add(x, w) -> op -> y, with a 3-element initializer w."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    nodes = [helper.make_node("Add", ["x", "w"], ["s"]), helper.make_node(op, ["s"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_graph_summary_hand_built_and_errors(tmp_path):
    summary = deploy.graph_summary(_tiny_graph())
    assert summary.ops == {"Add": 1, "Relu": 1} and summary.nodes == 2
    assert summary.initializers == 1 and summary.weights == 3 and summary.dynamic_batch
    with pytest.raises(TypeError, match="ModelProto"):
        deploy.graph_summary(42)
    bad = tmp_path / "bad.onnx"
    onnx.save(_tiny_graph("NoSuchOperator"), str(bad))
    with pytest.raises(onnx.checker.ValidationError):
        deploy.check_onnx(bad)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_batchnorm_matches_sequential_and_torch(conv_bias):
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=conv_bias).eval(), _trained_bn(5)
    x = torch.randn(4, 3, 9, 9)
    fused = deploy.fold_batchnorm(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    reference = fuse_conv_bn_eval(conv, bn)
    torch.testing.assert_close(fused.weight, reference.weight)
    torch.testing.assert_close(fused.bias, reference.bias)


def test_fold_batchnorm_errors():
    with pytest.raises(TypeError):
        deploy.fold_batchnorm(nn.Linear(2, 2), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="channels"):
        deploy.fold_batchnorm(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="running statistics"):
        deploy.fold_batchnorm(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))


def test_digits_pipeline(model):
    raw = torch.randint(0, 17, (5, 8, 8)).float()
    probs = deploy.DigitsPipeline(model).eval()(raw)
    assert probs.shape == (5, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    torch.testing.assert_close(probs, torch.softmax(model((raw / 16).unsqueeze(1)), dim=1))
    with pytest.raises(ValueError, match="raw images"):
        deploy.DigitsPipeline(model)(raw.unsqueeze(1))
    with pytest.raises(ValueError, match="max_level"):
        deploy.DigitsPipeline(model, max_level=0)


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_graph(), str(path))
    deploy.stamp_metadata(path, 3, preprocessing="x / 16", owner="ch20")
    deploy.stamp_metadata(path, 4, owner="dlarch")  # keeps the other keys, updates one
    version, props = deploy.read_metadata(quant.ort_session(path))
    assert version == 4 and props == {"preprocessing": "x / 16", "owner": "dlarch"}
    with pytest.raises(ValueError, match="version"):
        deploy.stamp_metadata(path, -1)
    with pytest.raises(TypeError, match="strings"):
        deploy.stamp_metadata(path, 1, accuracy=0.99)


def test_sessions_levels_and_parity(model, onnx_path, tmp_path):
    levels = deploy.available_opt_levels()
    assert levels[:3] == ["disabled", "basic", "extended"] and levels[-1] == "all"
    counts = [deploy.optimized_graph(onnx_path, level, tmp_path / f"{level}.onnx").nodes for level in levels]
    # basic and extended only remove or fuse nodes; the layout level may add reorder nodes (NCHWc
    # on CPUs with AVX-512 inserts them), so "all" is compared with "disabled" only
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[-1], dict(zip(levels, counts))
    assert counts[0] == deploy.graph_summary(onnx_path).nodes  # "disabled" runs the file as it is
    batches = [torch.rand(b, 1, 8, 8) for b in (1, 5, 33)]
    for level in ("disabled", "all"):
        errors = deploy.parity(model, quant.ort_session(onnx_path, threads=1, level=level), batches)
        assert set(errors) == {1, 5, 33} and max(errors.values()) < 1e-4


def test_parity_catches_a_mismatch_and_bad_input(model, onnx_path):
    session = quant.ort_session(onnx_path, threads=1)
    other = SmallResNet(width=4).eval()  # different weights
    with pytest.raises(AssertionError, match="batch 2"):
        deploy.parity(other, session, [torch.rand(2, 1, 8, 8)])
    with pytest.raises(ValueError, match="at least one"):
        deploy.parity(model, session, [])


def test_latency_sweep(model, onnx_path):
    session = quant.ort_session(onnx_path, threads=1)
    model.train()
    rows = deploy.latency_sweep(model, session, torch.rand(8, 1, 8, 8), [1, 8], budget=20, rounds=2, progress=False)
    assert not model.training  # eager is timed in eval mode
    assert [r["batch"] for r in rows] == [1, 8]
    assert all(r["eager_ms"] > 0 and r["ort_ms"] > 0 and r["speedup"] == r["eager_ms"] / r["ort_ms"] for r in rows)
    cpu_rows = deploy.latency_sweep(
        model, session, torch.rand(8, 1, 8, 8), [1, 8], budget=20, rounds=2, progress=False, clock="cpu"
    )
    assert [r["batch"] for r in cpu_rows] == [1, 8] and all(r["eager_ms"] > 0 and r["ort_ms"] > 0 for r in cpu_rows)
    with pytest.raises(ValueError, match="pool"):
        deploy.latency_sweep(model, session, torch.rand(4, 1, 8, 8), [8])
    with pytest.raises(ValueError, match="positive"):
        deploy.latency_sweep(model, session, torch.rand(4, 1, 8, 8), [0])
    with pytest.raises(ValueError, match="rounds"):
        deploy.latency_sweep(model, session, torch.rand(4, 1, 8, 8), [1], rounds=0)
    with pytest.raises(ValueError, match="clock"):
        deploy.latency_sweep(model, session, torch.rand(4, 1, 8, 8), [1], clock="sundial")


def test_fit_latency_recovers_a_line():
    alpha, beta = deploy.fit_latency([1, 4, 16, 64], [0.5 + 0.25 * b for b in (1, 4, 16, 64)])
    assert alpha == pytest.approx(0.5) and beta == pytest.approx(0.25)
    with pytest.raises(ValueError):
        deploy.fit_latency([4, 4], [1.0, 2.0])
    with pytest.raises(ValueError):
        deploy.fit_latency([1, 2, 3], [1.0, 2.0])


def test_available_providers():
    import onnxruntime as ort

    got = deploy.available_providers()
    assert "CPUExecutionProvider" in got and set(got) <= set(ort.get_available_providers())
    assert deploy.available_providers(["NoSuchProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(TypeError, match="sequence"):
        deploy.available_providers("CPUExecutionProvider")


SEED_TRT = """
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
config.max_workspace_size = 1 << 30
engine = builder.build_engine(network, config)
"""


def test_removed_trt_apis():
    found = deploy.removed_trt_apis(SEED_TRT)
    assert set(found) == {"EXPLICIT_BATCH", "max_workspace_size", "build_engine"}
    assert "set_memory_pool_limit" in found["max_workspace_size"]
    ours = inspect.getsource(deploy.build_trt_engine) + inspect.getsource(deploy.TensorRTRunner)
    assert deploy.removed_trt_apis(ours) == {}
    assert all(api in ours for api in ("build_serialized_network", "set_memory_pool_limit", "execute_async_v3"))
    assert deploy.removed_trt_apis("builder.build_engine_cache = 1") == {}  # whole identifiers only
    with pytest.raises(TypeError):
        deploy.removed_trt_apis(None)


def test_build_trt_engine_validates_before_needing_tensorrt(onnx_path, tmp_path):
    with pytest.raises(ValueError, match="workspace"):
        deploy.build_trt_engine(onnx_path, workspace_bytes=10)
    with pytest.raises(ValueError, match="min, opt, max"):
        deploy.build_trt_engine(onnx_path, batch=(8, 4, 16))
    with pytest.raises(FileNotFoundError):
        deploy.build_trt_engine(tmp_path / "missing.onnx")


@pytest.mark.skipif(hardware.has_tensorrt(), reason="tensorrt is installed here")
def test_tensorrt_missing_gives_a_clear_error(onnx_path):
    with pytest.raises(RuntimeError, match="tensorrt"):
        deploy.build_trt_engine(onnx_path)
    with pytest.raises(RuntimeError, match="tensorrt"):
        deploy.TensorRTRunner(b"")


@pytest.mark.skipif(not (hardware.has_tensorrt() and hardware.gpu_count() >= 1), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_matches_pytorch(model, onnx_path):  # pragma: no cover - GPU only
    runner = deploy.TensorRTRunner(deploy.build_trt_engine(onnx_path, fp16=False, batch=(1, 4, 16)))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(runner(x).cpu(), model(x), atol=1e-3, rtol=1e-3)


# --- the dynamo exporter, torch.export, AOTInductor --------------------------------------------


@pytest.fixture(scope="module")
def dynamo_path(model, tmp_path_factory) -> str:
    return _export_without_warnings(deploy.export_onnx_dynamo, model, tmp_path_factory.mktemp("dynamo") / "net.onnx")


def test_export_onnx_dynamo_graph_and_parity(model, dynamo_path, onnx_path, tmp_path):
    summary = deploy.graph_summary(deploy.check_onnx(dynamo_path))
    assert summary.opset == 18 and summary.dynamic_batch
    assert summary.inputs == {"x": ("batch", 1, 8, 8)} and summary.outputs == {"logits": ("batch", 10)}
    assert "BatchNormalization" not in summary.ops and summary.ops["Conv"] == 6 and summary.ops["Gemm"] == 1
    torchscript = deploy.graph_summary(onnx_path)
    assert all(summary.ops[op] == torchscript.ops[op] for op in ("Conv", "Relu", "Add", "Gemm"))
    errors = deploy.parity(
        model, quant.ort_session(dynamo_path, threads=1), [torch.rand(b, 1, 8, 8) for b in (1, 3, 50)]
    )
    assert set(errors) == {1, 3, 50} and max(errors.values()) < 1e-4
    static = deploy.export_onnx_dynamo(model, tmp_path / "static.onnx", torch.rand(1, 1, 8, 8), dynamic_batch=False)
    assert deploy.graph_summary(static).inputs == {"x": (1, 1, 8, 8)}
    named = deploy.export_onnx_dynamo(
        model, tmp_path / "named.onnx", torch.rand(4, 1, 8, 8), opset=20, input_name="img", output_name="out"
    )
    named_summary = deploy.graph_summary(named)
    assert named_summary.opset == 20 and set(named_summary.inputs) == {"img"} and set(named_summary.outputs) == {"out"}


def test_export_onnx_dynamo_errors(model, tmp_path):
    with pytest.raises(ValueError, match="batch >= 2"):
        deploy.export_onnx_dynamo(model, tmp_path / "a.onnx", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="opset 18"):
        deploy.export_onnx_dynamo(model, tmp_path / "a.onnx", torch.rand(2, 1, 8, 8), opset=17)
    with pytest.raises(ValueError, match="differ"):
        deploy.export_onnx_dynamo(model, tmp_path / "a.onnx", torch.rand(2, 1, 8, 8), input_name="y", output_name="y")
    with pytest.raises(ValueError, match="max_batch"):
        deploy.export_onnx_dynamo(model, tmp_path / "a.onnx", torch.rand(8, 1, 8, 8), max_batch=4)
    with pytest.raises(TypeError, match="nn.Module"):
        deploy.export_onnx_dynamo(lambda x: x, tmp_path / "a.onnx", torch.rand(2, 1, 8, 8))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batched input"):
        deploy.export_program(model, torch.tensor(1.0))


def test_export_program_ops_ranges_guards_and_round_trip(model, tmp_path):
    program = deploy.export_program(model, torch.rand(2, 1, 8, 8), max_batch=100)
    ops = deploy.aten_ops(program)
    assert ops["aten.conv2d.default"] == 6 and ops["aten.batch_norm.default"] == 6  # captured, not yet folded
    assert ops["aten.linear.default"] == 1 and ops["aten.add.Tensor"] == 2
    assert list(deploy.dynamic_ranges(program).values()) == [(1, 100)]
    loaded = deploy.save_and_load_program(program, tmp_path / "net.pt2").module()
    x = torch.rand(37, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        with pytest.raises(Exception, match="Guard|guard|size"):
            loaded(torch.rand(101, 1, 8, 8))  # above max_batch
        with pytest.raises(Exception, match="Guard|guard|size"):
            loaded(torch.rand(2, 1, 9, 9))  # a fixed axis
    static = deploy.export_program(model, torch.rand(3, 1, 8, 8), dynamic_batch=False)
    assert deploy.dynamic_ranges(static) == {}
    unbounded = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    assert list(deploy.dynamic_ranges(unbounded).values())[0][1] == float("inf")
    with pytest.raises(ValueError, match=".pt2"):
        deploy.save_and_load_program(program, tmp_path / "net.zip")


def test_cxx_compiler_and_aoti_errors(monkeypatch, tmp_path, model):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(deploy.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    assert deploy.cxx_compiler() == "/usr/bin/g++"
    monkeypatch.setenv("CXX", "my-cxx")
    monkeypatch.setattr(deploy.shutil, "which", lambda name: f"/opt/{name}" if name == "my-cxx" else None)
    assert deploy.cxx_compiler() == "/opt/my-cxx"  # $CXX first
    monkeypatch.setattr(deploy.shutil, "which", lambda name: None)
    assert deploy.cxx_compiler() is None
    program = deploy.export_program(model, torch.rand(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        deploy.aoti_compile(program, tmp_path / "net.pt2")
    with pytest.raises(ValueError, match=".pt2"):
        deploy.aoti_compile(program, tmp_path / "net.so")


# --- ONNX Runtime I/O binding ------------------------------------------------------------------


def test_io_binding_matches_run_and_writes_in_place(dynamo_path):
    session = quant.ort_session(dynamo_path, threads=1)
    x = torch.rand(9, 1, 8, 8)
    out = torch.full((9, 10), float("nan"))
    address = out.data_ptr()
    run = deploy.bound_call(session, x, out)
    run()
    assert out.data_ptr() == address and not out.isnan().any()
    torch.testing.assert_close(out, quant.ort_predict(session, x), atol=0, rtol=0)
    x.copy_(torch.rand(9, 1, 8, 8))  # the binding reads the tensor's memory at each call
    run()
    torch.testing.assert_close(out, quant.ort_predict(session, x), atol=0, rtol=0)
    y = deploy.run_bound(session, torch.rand(4, 1, 8, 8, dtype=torch.float64))  # converted to float32
    assert y.shape == (4, 10) and y.dtype == torch.float32


def test_io_binding_errors(dynamo_path):
    session = quant.ort_session(dynamo_path, threads=1)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="float32"):
        deploy.bound_call(session, x.double(), torch.empty(4, 10))
    with pytest.raises(ValueError, match="contiguous"):
        deploy.bound_call(session, x, torch.empty(10, 4).t())
    with pytest.raises(ValueError, match="batch size"):
        deploy.bound_call(session, x, torch.empty(5, 10))
    two_outputs = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])],
            "two",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    import onnxruntime as ort

    two = ort.InferenceSession(two_outputs.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="one input and one output"):
        deploy.run_bound(two, torch.rand(2, 3))
    dynamic_rest = ort.InferenceSession(_tiny_graph().SerializeToString(), providers=["CPUExecutionProvider"])
    assert deploy.run_bound(dynamic_rest, torch.rand(2, 3)).shape == (2, 3)
