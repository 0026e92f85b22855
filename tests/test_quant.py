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
