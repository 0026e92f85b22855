import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlarch_lib import quant
from dlarch_lib.core import measure
from dlarch_lib.quant import (
    QuantizedLinear,
    calibrate,
    dequantize,
    fake_quantize,
    int8_linear,
    minmax,
    qparams,
    qrange,
    quantize,
    round_ste,
    to_quantized,
)


def test_qrange_known_values_and_bad_bits():
    assert qrange(8) == (0, 255) and qrange(8, symmetric=True) == (-127, 127)
    assert qrange(4) == (0, 15) and qrange(2, symmetric=True) == (-1, 1)
    for bad in (1, 17, 8.0, "8"):
        with pytest.raises(ValueError, match="bits must be an int"):
            qrange(bad)


def test_qparams_hand_computed_and_zero_exact():
    scale, zp = qparams(-1.0, 3.0, bits=8)  # asymmetric: s = 4/255, z = 0 - round(-1 / s) = 64
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == 64
    scale, zp = qparams(-2.0, 1.0, bits=8, symmetric=True)  # s = 2/127, z = 0
    assert scale.item() == pytest.approx(2 / 127) and zp.item() == 0
    scale, zp = qparams(0.5, 2.0)  # the range is widened to contain 0
    assert zp.item() == 0 and scale.item() == pytest.approx(2 / 255)
    for lo, hi, sym in [(-1.3, 0.7, False), (-0.01, 5.0, False), (-3.0, 2.0, True), (0.2, 0.9, False)]:
        s, z = qparams(lo, hi, symmetric=sym)
        zero = torch.zeros(3)
        assert torch.equal(dequantize(quantize(zero, s, z, symmetric=sym), s, z), zero)  # exactly 0.0


def test_qparams_errors_and_per_channel_shapes():
    with pytest.raises(ValueError, match="x_min must be <= x_max"):
        qparams(1.0, -1.0)
    with pytest.raises(ValueError, match="same shape"):
        qparams(torch.zeros(3), torch.ones(4))
    s, z = qparams(-torch.rand(5), torch.rand(5), bits=4)
    assert s.shape == z.shape == (5,) and z.dtype == torch.int64 and (z >= 0).all() and (z <= 15).all()
    s, z = qparams(0.0, 0.0)  # a constant-zero tensor: a tiny positive scale, no division by zero
    assert s.item() > 0 and z.item() == 0


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(1000) * 3 + (0 if symmetric else 1)
    s, z = qparams(*minmax(x), bits=bits, symmetric=symmetric)
    err = (dequantize(quantize(x, s, z, bits, symmetric), s, z) - x).abs()
    assert err.max() <= s / 2 * (1 + 1e-5)
    q = quantize(x, s, z, bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    assert q.dtype == torch.int32 and q.min() >= qmin and q.max() <= qmax


def test_uniform_noise_model():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    s, z = qparams(-8.0, 8.0, bits=8)  # the range covers the data: no clipping
    mse = (fake_quantize(x, s, z) - x).pow(2).mean()
    assert mse.item() == pytest.approx(s.item() ** 2 / 12, rel=0.03)


def test_per_channel_beats_per_tensor_on_skewed_channels():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]  # channel scales differ 100x
    s_t, z_t = qparams(*minmax(w), bits=4, symmetric=True)
    s_c, z_c = qparams(*minmax(w, axis=0), bits=4, symmetric=True)
    err_t = (fake_quantize(w, s_t, z_t, 4, True) - w).pow(2).mean()
    err_c = (fake_quantize(w, s_c, z_c, 4, True, axis=0) - w).pow(2).mean()
    assert err_c < 0.5 * err_t


def test_fake_quantize_matches_torch_reference_values_and_gradients():
    torch.manual_seed(0)
    x = (torch.randn(64, 32) * 2).requires_grad_()
    s, z = qparams(-3.0, 2.0, bits=8)  # some values clip
    ours = fake_quantize(x, s, z)
    ref = torch.fake_quantize_per_tensor_affine(x, s.item(), int(z), 0, 255)
    torch.testing.assert_close(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g_ours, g_ref)
    # per channel along axis 1, symmetric
    s_c, z_c = qparams(*minmax(x, axis=1), bits=4, symmetric=True)
    ours_c = fake_quantize(x, s_c, z_c, 4, True, axis=1)
    ref_c = torch.fake_quantize_per_channel_affine(x, s_c, z_c.int(), 1, -7, 7)
    torch.testing.assert_close(ours_c, ref_c)


def test_ste_gradient_is_identity_inside_the_range_zero_outside():
    v = torch.tensor([0.2, 1.7, -2.4], requires_grad=True)
    (g,) = torch.autograd.grad(round_ste(v).mul(torch.tensor([1.0, 2.0, 3.0])).sum(), v)
    assert torch.equal(round_ste(v.detach()), torch.round(v.detach())) and torch.equal(g, torch.tensor([1.0, 2.0, 3.0]))
    s, z = qparams(-1.0, 1.0, bits=8)
    x = torch.tensor([-0.5, 0.0, 0.9, 1.5, -3.0], requires_grad=True)
    (g,) = torch.autograd.grad(fake_quantize(x, s, z).sum(), x)
    assert torch.equal(g, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    (g_plain,) = torch.autograd.grad(torch.round(x).sum(), x)  # the seed's problem: no gradient at all
    assert torch.equal(g_plain, torch.zeros(5))


def test_bad_axis_and_shapes_raise():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        minmax(x, axis=2)
    s, z = qparams(*minmax(x, axis=1))
    with pytest.raises(ValueError, match="must have shape \\(4,\\)"):
        quantize(x, s, z, axis=0)
    with pytest.raises(ValueError, match="needs a scalar scale"):
        quantize(x, s, z)
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        fake_quantize(x, s, z, axis=5)


def test_int8_linear_equals_float_product_of_dequantized_codes():
    torch.manual_seed(0)
    x, w, b = torch.rand(8, 20) * 4 - 1, torch.randn(6, 20), torch.randn(6)
    sx, zx = qparams(*minmax(x), bits=8)
    sw, zw = qparams(*minmax(w, axis=0), bits=8, symmetric=True)
    qx, qw = quantize(x, sx, zx), quantize(w, sw, zw, symmetric=True, axis=0)
    y = int8_linear(qx, sx, zx, qw, sw, b)
    ref = F.linear(dequantize(qx, sx, zx), dequantize(qw, sw, zw, axis=0), b)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=0.1, rtol=0.05)  # and close to fp32
    with pytest.raises(ValueError, match="matching in"):
        int8_linear(qx, sx, zx, qw[:, :5], sw)


def test_quantized_linear_init_like_nn_linear_and_close_to_fp32_at_8_bits():
    torch.manual_seed(0)
    ref = nn.Linear(64, 32)
    torch.manual_seed(0)
    layer = QuantizedLinear(64, 32)
    torch.testing.assert_close(layer.weight, ref.weight)
    torch.testing.assert_close(layer.bias, ref.bias)  # uniform(+-1/8), not randn
    assert layer.bias.abs().max() <= 1 / 8
    x = torch.rand(100, 64)
    layer.train()
    y = layer(x)  # the first training batch sets the input range
    assert y.shape == (100, 32) and bool(layer.observed)
    assert (y - ref(x)).abs().max() < 0.02 * ref(x).abs().max()
    layer.eval()
    assert (layer(x) - ref(x)).abs().max() < 0.02 * ref(x).abs().max()


def test_quantized_linear_gradient_reaches_weights_and_trains():
    torch.manual_seed(0)
    layer = QuantizedLinear(8, 3, bits=4, act_bits=4)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loss = F.cross_entropy(layer(x), y)
    loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        opt.step()
    assert F.cross_entropy(layer(x), y) < loss


def test_quantized_linear_errors_and_per_tensor_option():
    with pytest.raises(ValueError, match="bits must be an int"):
        QuantizedLinear(4, 2, bits=1)
    with pytest.raises(ValueError, match="bits must be an int"):
        QuantizedLinear(4, 2, act_bits=32)
    with pytest.raises(ValueError, match="momentum"):
        QuantizedLinear(4, 2, momentum=0.0)
    layer = QuantizedLinear(4, 2)
    with pytest.raises(ValueError, match="expects \\(..., 4\\)"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="no training batch"):
        layer.eval()(torch.randn(3, 4))
    with pytest.raises(TypeError, match="needs an nn.Linear"):
        QuantizedLinear.from_float(nn.Conv2d(1, 1, 1))
    s, _ = QuantizedLinear(4, 2, per_channel=False).weight_qparams()
    assert s.ndim == 0 and QuantizedLinear(4, 2).weight_qparams()[0].shape == (2,)


def test_to_quantized_and_calibrate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 4)))
    qmodel = to_quantized(model, bits=8, act_bits=8)
    assert [type(m) for m in model.modules()].count(nn.Linear) == 2  # the original is untouched
    assert sum(isinstance(m, QuantizedLinear) for m in qmodel.modules()) == 2
    x = torch.rand(50, 1, 4, 4)
    calibrate(qmodel, x)
    assert not qmodel.training
    assert qmodel[1].act_min.item() == pytest.approx(x.min().item())
    assert qmodel[1].act_max.item() == pytest.approx(x.max().item())
    out, ref = qmodel(x), model(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    with pytest.raises(ValueError, match="no nn.Linear"):
        to_quantized(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="needs a model with QuantizedLinear"):
        calibrate(model, x)


def test_onnx_runtime_int8_close_to_fp32(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.rand(200, 1, 8, 8)
    fp32 = quant.export_onnx(model, tmp_path / "fp32.onnx", x[:1])
    dyn = quant.ort_quantize_dynamic(fp32, tmp_path / "dyn.onnx")
    static = quant.ort_quantize_static(fp32, tmp_path / "static.onnx", x)  # calibrated on x: no clipping
    ref = model(x).detach()
    torch.testing.assert_close(quant.ort_predict(quant.ort_session(fp32), x), ref, atol=1e-5, rtol=1e-4)
    for path in (dyn, static):
        assert os.path.getsize(path) < 0.4 * os.path.getsize(fp32)  # int8 weights: about 4x smaller
        out = quant.ort_predict(quant.ort_session(path, threads=1), x)
        assert out.shape == (200, 10)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()
        assert (out.argmax(1) == ref.argmax(1)).float().mean() > 0.95
    call = quant.ort_inference_call(quant.ort_session(static), x[:4])
    assert call()[0].shape == (4, 10) and min(measure.timings_ms(call, repeats=3, warmup=1)) > 0
    with pytest.raises(ValueError, match="non-empty batch"):
        quant.calibration_reader(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="batch_size"):
        quant.calibration_reader(x, batch_size=0)
    reader = quant.calibration_reader(x, batch_size=64)
    batches = [reader.get_next() for _ in range(5)]
    assert [b["x"].shape[0] for b in batches[:4]] == [64, 64, 64, 8] and batches[4] is None


def test_export_onnx_errors(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(TypeError, match="nn.Module"):
        quant.export_onnx(lambda x: x, tmp_path / "a.onnx", torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="opset"):
        quant.export_onnx(model, tmp_path / "a.onnx", torch.rand(1, 1, 8, 8), opset=3)
    with pytest.raises(ValueError, match="differ"):
        quant.export_onnx(model, tmp_path / "a.onnx", torch.rand(1, 1, 8, 8), input_name="y", output_name="y")
    with pytest.raises(ValueError, match="batched"):
        quant.export_onnx(model, tmp_path / "a.onnx", torch.tensor(1.0))


def test_session_predict_and_inference_call(tmp_path):
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    x = torch.rand(6, 1, 8, 8)
    path = quant.export_onnx(model, tmp_path / "m.onnx", x[:1])
    assert not model.training  # exported in eval mode
    session = quant.ort_session(path, threads=1)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(quant.ort_predict(session, x), expected, atol=1e-5, rtol=1e-4)
    call = quant.ort_inference_call(session, x)
    x.zero_()  # the input was converted when the callable was made, not at each call
    torch.testing.assert_close(torch.from_numpy(call()[0]), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="level"):
        quant.ort_session(path, level="max")
    with pytest.raises(ValueError, match="threads"):
        quant.ort_session(path, threads=0)


def test_cpu_has_vnni_reads_the_flags_line():
    assert quant.cpu_has_vnni("processor : 0\nflags\t\t: fpu sse avx2 avx512bw avx512_vnni\n") is True
    assert quant.cpu_has_vnni("flags : fpu avx2 avx_vnni\n") is True
    assert quant.cpu_has_vnni("flags : fpu sse avx2 avx512bw\nbugs : avx512_vnni\n") is False  # only the flags line
    assert quant.cpu_has_vnni("Features : fp asimd\n") is None  # no flags line (e.g. ARM)
    assert quant.cpu_has_vnni() in (True, False, None)


# --- calibration methods, float formats, LLM.int8, PT2E -------------------------------------


def _heavy_tailed(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) / torch.randn(n, 3, generator=g).pow(2).mean(1).sqrt()  # Student-t, 3 dof


def test_clip_error_matches_fake_quantize_and_vectorises():
    x = _heavy_tailed()
    c = torch.tensor([1.0, 5.0, x.abs().max().item()])
    errs = quant.clip_error(x, c, bits=4)
    assert errs.shape == (3,)
    for ci, e in zip(c, errs):
        s, z = qparams(-ci, ci, bits=4, symmetric=True)
        ref = (fake_quantize(x, s, z, 4, symmetric=True) - x).pow(2).mean()
        torch.testing.assert_close(e, ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="threshold c must be > 0"):
        quant.clip_error(x, 0.0)


def test_clip_threshold_methods_and_errors():
    x = _heavy_tailed()
    top = x.abs().max()
    assert quant.clip_threshold(x, "minmax") == top
    p = quant.clip_threshold(x, "percentile", percentile=99.0)
    assert abs(p.item() - torch.quantile(x.abs(), 0.99).item()) < 1e-4
    for bits in (4, 8):
        c = quant.clip_threshold(x, "mse", bits=bits, grid=100)
        e = quant.clip_error(x, c, bits)
        grid = top * torch.arange(1, 101) / 100
        assert e <= quant.clip_error(x, grid, bits).min() + 1e-9  # the grid's best
        assert e < quant.clip_error(x, top, bits) and e < quant.clip_error(x, p, bits)  # heavy tails: clipping pays
    with pytest.raises(ValueError, match="method must be one of"):
        quant.clip_threshold(x, "kl")
    with pytest.raises(ValueError, match="all zeros"):
        quant.clip_threshold(torch.zeros(5))
    with pytest.raises(ValueError, match="non-empty and finite"):
        quant.clip_threshold(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="percentile"):
        quant.clip_threshold(x, "percentile", percentile=0.0)


def test_unit_roundoff_bounds_casts():
    assert quant.unit_roundoff(torch.float16) == 2**-11 and quant.unit_roundoff(torch.bfloat16) == 2**-8
    assert quant.unit_roundoff(torch.float32) == 2**-24
    x = torch.logspace(-3, 4, 10_001)
    for dtype in (torch.float16, torch.bfloat16):
        rel = ((x.to(dtype).float() - x) / x).abs().max().item()
        assert quant.unit_roundoff(dtype) / 2 < rel <= quant.unit_roundoff(dtype)  # the bound is attained, not loose
    with pytest.raises(ValueError, match="floating-point dtype"):
        quant.unit_roundoff(torch.int8)


def test_vectorwise_int8_matmul_close_and_exact_on_codes():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    y = quant.vectorwise_int8_matmul(x, w)
    assert y.shape == (16, 8)
    assert (y - x @ w.T).abs().max() < 0.05 * (x @ w.T).abs().max()
    qx = torch.randint(-127, 128, (4, 32), generator=g).float()  # already on the int8 grid, scale 1
    qx[:, 0] = 127.0
    qw = torch.randint(-127, 128, (3, 32), generator=g).float()
    qw[:, 0] = -127.0
    torch.testing.assert_close(quant.vectorwise_int8_matmul(qx, qw), qx @ qw.T)  # grid values: exact
    with pytest.raises(ValueError, match="matching K"):
        quant.vectorwise_int8_matmul(x, torch.randn(8, 63))


def test_llm_int8_decomposition():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(32, 64, generator=g), torch.randn(10, 64, generator=g) * 0.1, torch.randn(10, generator=g)
    x[:, [3, 40]] *= 100.0  # two outlier features
    assert quant.outlier_columns(x, 6.0).tolist() == [3, 40]
    torch.testing.assert_close(quant.llm_int8_linear(x, w, b, threshold=0.0), F.linear(x, w, b))  # all in float
    ref = F.linear(x, w, b)
    err_mixed = (quant.llm_int8_linear(x, w, b, threshold=6.0) - ref).abs().max()
    err_int8 = (quant.llm_int8_linear(x, w, b, threshold=float("inf")) - ref).abs().max()
    assert err_mixed < 0.1 * err_int8  # the outliers ruin plain int8, not the decomposition
    only = torch.zeros_like(x)
    only[:, [3, 40]] = x[:, [3, 40]]  # nothing but outliers: the int8 part sees zeros, the result is exact
    torch.testing.assert_close(quant.llm_int8_linear(only, w, None), only @ w.T)
    layer = quant.LLMInt8Linear(nn.Linear(64, 10))
    assert layer(torch.randn(2, 5, 64)).shape == (2, 5, 10)
    with pytest.raises(ValueError, match="matching K"):
        quant.llm_int8_linear(x, w[:, :10])
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        quant.outlier_columns(x, -1.0)
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        quant.LLMInt8Linear(nn.ReLU())  # type: ignore[arg-type]


def test_swap_linear_copies_and_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 2)))
    swapped = quant.swap_linear(model, lambda lin: quant.LLMInt8Linear(lin, 0.0))
    assert sum(isinstance(m, quant.LLMInt8Linear) for m in swapped.modules()) == 2
    assert isinstance(model[0], nn.Linear) and type(model[0]) is nn.Linear  # the original is unchanged
    x = torch.randn(3, 4)
    torch.testing.assert_close(swapped(x), model(x))  # threshold 0: all in float
    with pytest.raises(ValueError, match="found no nn.Linear"):
        quant.swap_linear(nn.ReLU(), lambda lin: lin)


def test_pt2e_matches_the_hand_written_quantizer():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(64, 1, 4, 4)
    graph = quant.pt2e_quantize(model, x)
    qp = quant.pt2e_qparams(graph)
    assert len(qp) == 2  # one per linear input
    ranges = quant.linear_input_ranges(model, x)
    assert len(ranges) == 2
    torch.testing.assert_close(ranges[1][1], torch.relu(model[1](model[0](x))).max())  # the second layer's input max
    hand = quant.set_input_ranges(to_quantized(model), ranges)
    for layer, (lo, hi), (s, z) in zip([m for m in hand.modules() if isinstance(m, QuantizedLinear)], ranges, qp):
        assert (layer.act_min.item(), layer.act_max.item()) == (lo.item(), hi.item()) and bool(layer.observed)
        s_ref, z_ref = qparams(lo, hi)
        assert s == pytest.approx(s_ref.item(), rel=1e-6) and z == z_ref.item()
    with torch.no_grad():
        torch.testing.assert_close(graph(x[:7]), hand(x[:7]), atol=1e-5, rtol=1e-5)  # dynamic batch
    with pytest.raises(ValueError, match="calibration data must be a batch"):
        quant.pt2e_quantize(model, x[:1])
    with pytest.raises(TypeError, match="GraphModule"):
        quant.pt2e_qparams(model)


def test_input_ranges_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="found no nn.Linear"):
        quant.linear_input_ranges(nn.ReLU(), torch.randn(2, 3))
    with pytest.raises(ValueError, match="got 2 ranges for 1 QuantizedLinear"):
        quant.set_input_ranges(to_quantized(model), [(torch.tensor(0.0), torch.tensor(1.0))] * 2)
    assert model.training  # linear_input_ranges restores the mode
    quant.linear_input_ranges(model, torch.randn(2, 3))
    assert model.training
