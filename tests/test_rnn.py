import pytest
import torch
from torch import nn

from dlarch_lib import rnn
from dlarch_lib.core.text import char_corpus
from dlarch_lib.core.train import History


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_lstm_cell_matches_torch_and_shapes():
    ref = nn.LSTMCell(5, 7)
    cell = rnn.LSTMCell.from_torch(ref)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    h1, c1 = cell(x, (h, c))
    h2, c2 = ref(x, (h, c))
    assert h1.shape == c1.shape == (3, 7)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(cell(x)[0], ref(x)[0])  # zero initial state


def test_lstm_cell_gates_are_in_torch_order_and_concat_form_agrees():
    cell = rnn.LSTMCell(4, 3)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    i, f, g, o = cell.gates(x, h)
    assert all(t.shape == (2, 3) for t in (i, f, g, o))
    W = torch.cat([cell.weight_hh, cell.weight_ih], dim=1)  # acts on [h, x]
    z = torch.cat([h, x], dim=1) @ W.T + cell.bias_ih + cell.bias_hh
    torch.testing.assert_close(f, torch.sigmoid(z[:, 3:6]))
    torch.testing.assert_close(g, torch.tanh(z[:, 6:9]))


def test_cell_state_jacobian_is_the_forget_gate():
    cell = rnn.LSTMCell(4, 3).double()
    x, h, c = torch.randn(1, 4).double(), torch.randn(1, 3).double(), torch.randn(1, 3).double()
    jac = torch.autograd.functional.jacobian(lambda c0: cell(x, (h, c0))[1], c)[0, :, 0, :]
    torch.testing.assert_close(jac, torch.diag(cell.gates(x, h)[1][0]))


@pytest.mark.parametrize("layers,batch_first", [(1, True), (2, True), (2, False)])
def test_lstm_matches_torch_both_ways(layers, batch_first):
    ref = nn.LSTM(5, 6, layers, batch_first=batch_first)
    ours = rnn.LSTM.from_torch(ref)
    x = torch.randn(2, 9, 5) if batch_first else torch.randn(9, 2, 5)
    state = (torch.randn(layers, 2, 6), torch.randn(layers, 2, 6))
    out1, (h1, c1) = ours(x, state)
    out2, (h2, c2) = ref(x, state)
    assert out1.shape == out2.shape and h1.shape == (layers, 2, 6)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)
    back = ours.to_torch()
    torch.testing.assert_close(back(x, state)[0], out2)


def test_lstm_errors():
    with pytest.raises(ValueError, match="input_size and hidden_size"):
        rnn.LSTMCell(0, 3)
    with pytest.raises(ValueError, match="LSTMCell expects x"):
        rnn.LSTMCell(4, 3)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="state"):
        rnn.LSTMCell(4, 3)(torch.randn(2, 4), (torch.zeros(2, 2), torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="num_layers"):
        rnn.LSTM(4, 3, num_layers=0)
    with pytest.raises(ValueError, match="3-D input"):
        rnn.LSTM(4, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="state"):
        rnn.LSTM(4, 3)(torch.randn(2, 5, 4), (torch.zeros(2, 2, 3), torch.zeros(2, 2, 3)))
    with pytest.raises(ValueError, match="unidirectional"):
        rnn.LSTM.from_torch(nn.LSTM(4, 3, bidirectional=True))
    with pytest.raises(ValueError, match="biases"):
        rnn.LSTMCell.from_torch(nn.LSTMCell(4, 3, bias=False))


def test_set_forget_bias():
    lstm = rnn.set_forget_bias(nn.LSTM(3, 4, 2, batch_first=True), 2.0)
    for k in range(2):
        b = getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
        torch.testing.assert_close(b[4:8], torch.full((4,), 2.0))
    ours = rnn.set_forget_bias(rnn.LSTM(3, 4), -1.0)
    assert torch.all(ours.cells[0].bias_ih[4:8] == -1.0) and torch.all(ours.cells[0].bias_hh[4:8] == 0.0)
    with pytest.raises(ValueError, match="bias_ih"):
        rnn.set_forget_bias(nn.LSTM(3, 4, bias=False), 1.0)


def test_input_gradient_norms_vanish_in_rnn_not_in_gated_lstm():
    steps = 60
    plain = rnn.input_gradient_norms(nn.RNN(8, 32, batch_first=True).double(), steps, batch=8)
    gated = rnn.input_gradient_norms(
        rnn.set_forget_bias(nn.LSTM(8, 32, batch_first=True), 3.0).double(), steps, batch=8
    )
    assert plain.shape == gated.shape == (steps,)
    assert plain[50] < 1e-6 * plain[0]
    assert gated[50] > 1e3 * plain[50]
    with pytest.raises(ValueError, match="batch_first"):
        rnn.input_gradient_norms(nn.RNN(8, 32), steps)
    with pytest.raises(ValueError, match="steps and batch"):
        rnn.input_gradient_norms(nn.RNN(8, 32, batch_first=True), 0)


@pytest.fixture(scope="module")
def corpus():
    return char_corpus("the cat sat on the mat. " * 60)


def test_char_lstm_shapes_and_errors(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16, layers=2)
    logits, (h, c) = model(torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 5, corpus.vocab_size) and h.shape == (2, 3, 16)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must be >= 1"):
        rnn.CharLSTM(0)


class _Stateless(nn.Module):
    """A CharLSTM that forgets its state: generate must re-read the whole sequence every step."""

    def __init__(self, lstm: rnn.CharLSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lstm(idx)[0]


def test_generate_is_reproducible_and_restores_the_mode(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16, layers=2)
    prompt = corpus.encode("the")[None]  # (1, 3)
    a = rnn.generate(model, prompt, 20, temperature=0.7, generator=torch.Generator().manual_seed(1))
    b = rnn.generate(model, prompt, 20, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 23) and torch.equal(a, b) and int(a.max()) < corpus.vocab_size
    assert torch.equal(a[:, :3], prompt)
    assert model.training  # generate restores the mode
    assert rnn.generate(model, prompt, 0).shape == (1, 3)
    with pytest.raises(ValueError, match="temperature"):
        rnn.generate(model, prompt, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt"):
        rnn.generate(model, corpus.encode("t"), 3)  # (T0,) instead of (B, T0)
    with pytest.raises(ValueError, match="prompt"):
        rnn.generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def test_generate_carries_the_state_or_rereads_the_sequence(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16)
    prompt = torch.stack([corpus.encode("the "), corpus.encode("mat.")])  # (2, 4)
    with_state = rnn.generate(model, prompt, 12, temperature=0.0)  # greedy: one LSTM step per token
    rereading = rnn.generate(_Stateless(model), prompt, 12, temperature=0.0)  # the whole prefix every step
    assert torch.equal(with_state, rereading)
    idx = prompt  # greedy by hand
    with torch.no_grad():
        for _ in range(12):
            idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(with_state, idx)
    sampled = [
        rnn.generate(m, prompt, 12, generator=torch.Generator().manual_seed(3)) for m in (model, _Stateless(model))
    ]
    assert torch.equal(*sampled)  # the same draws either way


def test_top_k_never_samples_outside_the_k_largest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=g)
    top = logits.topk(5, dim=-1).indices  # (64, 5)
    p = rnn.sampling_probs(logits, 2.0, top_k=5)  # high T spreads the mass
    draws = torch.multinomial(p, 20, replacement=True, generator=g)  # (64, 20)
    assert (draws[..., None] == top[:, None, :]).any(-1).all()
    assert ((p > 0).sum(-1) == 5).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(64))


def test_top_k_renormalises_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    expected = torch.tensor([[*torch.softmax(torch.tensor([2.0, 1.0]), 0).tolist(), 0.0, 0.0]])
    torch.testing.assert_close(rnn.sampling_probs(logits, 1.0, top_k=2), expected)
    torch.testing.assert_close(rnn.sampling_probs(logits, 1.0), torch.softmax(logits, -1))  # no top-k: plain softmax
    torch.testing.assert_close(rnn.sampling_probs(logits, 2.0), torch.softmax(logits / 2, -1))


def test_temperature_to_zero_is_greedy():
    logits = torch.randn(32, 20, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    assert torch.equal(rnn.sampling_probs(logits, 0.0), torch.nn.functional.one_hot(greedy, 20).float())
    gaps = [(rnn.sampling_probs(logits, t).max(-1).values).mean().item() for t in (1.0, 0.3, 0.1, 0.01)]
    assert gaps == sorted(gaps) and gaps[-1] > 0.99  # the argmax's mass rises to 1


def test_sampling_errors():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        rnn.sampling_probs(logits, -1.0)
    with pytest.raises(ValueError, match="top_k"):
        rnn.sampling_probs(logits, 1.0, top_k=6)
    with pytest.raises(ValueError, match="top_k"):
        rnn.sampling_probs(logits, 1.0, top_k=0)


def test_lm_step_is_the_next_character_cross_entropy(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16)
    x, y = corpus.batch("train", 4, 10, torch.Generator().manual_seed(0))
    logits = model(x)[0]  # (4, 10, V)
    want = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(rnn.lm_step(model, (x, y)), want)
    assert torch.equal(y[:, :-1], x[:, 1:])  # the targets are the inputs one character later


def test_train_char_lm_learns_and_stops_on_its_step_count(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=32)
    before = rnn.eval_nats(model, corpus, context=16)
    hist = rnn.train_char_lm(
        model, corpus, steps=120, batch_size=16, context=16, lr=1e-2, eval_every=40, progress=False
    )
    after = rnn.eval_nats(model, corpus, context=16)
    assert isinstance(hist, History)
    assert hist.steps == 120 and len(hist.loss) == 120 and hist.eval_steps == [40, 80, 120]
    assert len(hist.val_loss) == 3 and hist.val_loss[-1] < hist.val_loss[0]
    assert after < 0.5 * before
    short = rnn.train_char_lm(model, corpus, steps=5, batch_size=4, context=8, lr=1e-3, eval_every=100, progress=False)
    assert short.steps == 5 and short.val_loss == [] and short.seconds >= 0
    with pytest.raises(TypeError, match="max_seconds"):  # no wall-clock budget: results must not depend on load
        rnn.train_char_lm(model, corpus, steps=1, batch_size=1, context=4, lr=1e-3, max_seconds=1.0)
    with pytest.raises(ValueError, match="lr"):
        rnn.train_char_lm(model, corpus, steps=1, batch_size=1, context=4, lr=0.0)
    with pytest.raises(ValueError, match="steps and eval_every"):
        rnn.train_char_lm(model, corpus, steps=0, batch_size=1, context=4, lr=1e-3)
    with pytest.raises(ValueError, match="batch_size and context"):
        rnn.train_char_lm(model, corpus, steps=1, batch_size=1, context=0, lr=1e-3)


def test_train_char_lm_is_reproducible_from_its_seed(corpus):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16)
        runs.append(rnn.train_char_lm(model, corpus, steps=6, batch_size=4, context=8, lr=1e-2, progress=False).loss)
    assert runs[0] == runs[1]


def test_eval_nats_is_deterministic_and_checks_input(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16)
    a = rnn.eval_nats(model, corpus, context=16, batch_size=3)
    b = rnn.eval_nats(model, corpus, context=16, batch_size=64)
    assert abs(a - b) < 1e-5 and a > 0
    assert rnn.eval_nats(model, corpus, split="train", context=16, max_windows=2) > 0
    with pytest.raises(ValueError, match="split must be"):
        rnn.eval_nats(model, corpus, split="test")
    with pytest.raises(ValueError, match="longer than"):
        rnn.eval_nats(model, corpus, context=10_000)


def test_adding_problem_targets_markers_and_baseline():
    g = torch.Generator().manual_seed(0)
    x, y = rnn.adding_problem(4000, 20, g)
    assert x.shape == (4000, 20, 2) and y.shape == (4000,)
    markers = x[..., 1]
    assert torch.all(markers.sum(dim=1) == 2)
    assert torch.all(markers[:, :10].sum(dim=1) == 1) and torch.all(markers[:, 10:].sum(dim=1) == 1)
    torch.testing.assert_close(y, (x[..., 0] * markers).sum(dim=1))
    # predicting 1 (the mean of the sum of two uniforms) costs the variance 2/12 = 1/6
    assert abs(((y - 1.0) ** 2).mean().item() - 1 / 6) < 0.01
    again = rnn.adding_problem(4000, 20, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    with pytest.raises(ValueError, match="steps >= 2"):
        rnn.adding_problem(4, 1, g)


def test_sequence_regressor_and_mse_step():
    for kind in ("rnn", "lstm", "gru"):
        model = rnn.SequenceRegressor(kind, 2, 8)
        x, y = rnn.adding_problem(5, 7, torch.Generator().manual_seed(1))
        assert model(x).shape == (5,)
        torch.testing.assert_close(rnn.mse_step(model, (x, y)), ((model(x) - y) ** 2).mean())
    assert isinstance(rnn.SequenceRegressor("rnn", 2, 8).rnn, nn.RNN)
    with pytest.raises(ValueError, match="kind must be"):
        rnn.SequenceRegressor("transformer", 2, 8)
    with pytest.raises(ValueError, match="expects x"):
        rnn.SequenceRegressor("lstm", 2, 8)(torch.randn(5, 7, 3))
    with pytest.raises(ValueError, match="does not match"):
        rnn.mse_step(rnn.SequenceRegressor("lstm", 2, 8), (torch.randn(5, 7, 2), torch.randn(5, 1)))


def test_gru_cell_matches_torch_and_checks_input():
    ref = nn.GRUCell(5, 7)
    cell = rnn.GRUCell.from_torch(ref)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    torch.testing.assert_close(cell(x, h), ref(x, h))
    torch.testing.assert_close(cell(x), ref(x))  # zero initial state
    r, z, n = cell.gates(x, h)
    torch.testing.assert_close(cell(x, h), (1 - z) * n + z * h)
    lstm_params = sum(p.numel() for p in nn.LSTMCell(5, 7).parameters())
    assert 4 * sum(p.numel() for p in cell.parameters()) == 3 * lstm_params
    with pytest.raises(ValueError, match="input_size and hidden_size"):
        rnn.GRUCell(3, 0)
    with pytest.raises(ValueError, match="GRUCell expects x"):
        cell(torch.randn(3, 4), h)
    with pytest.raises(ValueError, match="h must be"):
        cell(x, torch.randn(3, 6))
    with pytest.raises(ValueError, match="biases"):
        rnn.GRUCell.from_torch(nn.GRUCell(5, 7, bias=False))


@pytest.mark.parametrize("layers", [1, 2])
def test_bilstm_matches_torch(layers):
    ref = nn.LSTM(4, 6, num_layers=layers, bidirectional=True, batch_first=True)
    ours = rnn.BiLSTM.from_torch(ref)
    x = torch.randn(3, 9, 4)
    out, (h_n, c_n) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert out.shape == (3, 9, 12) and h_n.shape == (2 * layers, 3, 6)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h_n, h_ref)
    torch.testing.assert_close(c_n, c_ref)
    torch.testing.assert_close(out[:, -1, :6], h_n[-2])  # forward direction ends at the last step
    torch.testing.assert_close(out[:, 0, 6:], h_n[-1])  # backward direction ends at the first step


def test_bilstm_errors():
    with pytest.raises(ValueError, match="must be >= 1"):
        rnn.BiLSTM(4, 6, num_layers=0)
    with pytest.raises(ValueError, match="BiLSTM expects x"):
        rnn.BiLSTM(4, 6)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="bidirectional"):
        rnn.BiLSTM.from_torch(nn.LSTM(4, 6, batch_first=True))


def test_tbptt_cuts_the_gradient_at_the_truncation():
    model = nn.RNN(2, 8, batch_first=True).double()
    T, k = 12, 4
    x = torch.randn(3, T, 2, dtype=torch.float64, requires_grad=True)

    def last_step(out, start):  # score only the last output
        return out[:, -1].sum() if start + out.shape[1] == T else None

    total, state = rnn.tbptt(model, x, T, last_step)  # k = T: full backpropagation through time
    full = x.grad.clone()
    assert full[:, 0].abs().sum() > 0 and not state.requires_grad
    torch.testing.assert_close(total, model(x.detach())[0][:, -1].sum().item())
    x.grad = None
    rnn.tbptt(model, x, k, last_step)
    assert torch.all(x.grad[:, : T - k] == 0)  # exactly zero before the last chunk
    torch.testing.assert_close(x.grad[:, T - k :], full[:, T - k :])  # the last chunk is untouched
    with pytest.raises(ValueError, match="truncation length"):
        rnn.tbptt(model, x, 0, last_step)
    with pytest.raises(ValueError, match="tbptt expects"):
        rnn.tbptt(model, x[0], k, last_step)


def test_tbptt_accumulates_the_same_gradient_as_per_chunk_backward():
    model = nn.LSTM(2, 5, batch_first=True)
    x = torch.randn(2, 10, 2)
    model.zero_grad()
    rnn.tbptt(model, x, 5, lambda out, s: out.pow(2).mean())
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out1, (h, c) = model(x[:, :5])
    out2, _ = model(x[:, 5:], (h.detach(), c.detach()))
    (out1.pow(2).mean() + out2.pow(2).mean()).backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    assert isinstance(rnn.detach_state((h, c)), tuple)


def test_saved_tensor_meter_scales_with_the_truncation_length():
    model = rnn.LSTM(2, 16)
    x = torch.randn(4, 24, 2)
    peaks = {}
    for k in (24, 12, 6):
        with rnn.SavedTensorMeter(exclude=[*model.parameters(), x]) as meter:
            rnn.tbptt(model, x, k, lambda out, s: out.pow(2).mean())
        peaks[k] = meter.peak
        assert meter.current == 0  # everything saved was released by backward
    assert peaks[24] > 0
    for k in (12, 6):
        assert abs(peaks[k] / peaks[24] - k / 24) < 0.05 * k / 24
