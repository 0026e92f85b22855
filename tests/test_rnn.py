import pytest
import torch
from torch import nn

from dlarch_lib import rnn
from dlarch_lib.core.text import char_corpus


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


def test_char_lstm_shapes_generate_and_errors(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=16, layers=2)
    logits, (h, c) = model(torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 5, corpus.vocab_size) and h.shape == (2, 3, 16)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model.generate(corpus.encode("the"), 20, 0.7, g1)
    b = model.generate(corpus.encode("the"), 20, 0.7, g2)
    assert a.shape == (20,) and torch.equal(a, b) and int(a.max()) < corpus.vocab_size
    assert model.training  # generate restores the mode
    with pytest.raises(ValueError, match="temperature"):
        model.generate(corpus.encode("t"), 3, 0.0)
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must be >= 1"):
        rnn.CharLSTM(0)


def test_train_char_lm_learns_and_stops_on_its_step_count(corpus):
    model = rnn.CharLSTM(corpus.vocab_size, embed=8, hidden=32)
    before = rnn.eval_nats(model, corpus, context=16)
    hist = rnn.train_char_lm(
        model, corpus, steps=120, batch_size=16, context=16, lr=1e-2, eval_every=40, progress=False
    )
    after = rnn.eval_nats(model, corpus, context=16)
    assert hist["steps"] == 120 and hist["step"] == [40, 80, 120]
    assert len(hist["train_loss"]) == len(hist["val_loss"]) == 3
    assert after < 0.5 * before
    short = rnn.train_char_lm(model, corpus, steps=5, batch_size=4, context=8, lr=1e-3, eval_every=100, progress=False)
    assert short["steps"] == 5 and short["step"] == [5] and len(short["val_loss"]) == 1 and short["seconds"] >= 0
    with pytest.raises(TypeError, match="max_seconds"):  # no wall-clock budget: results must not depend on load
        rnn.train_char_lm(model, corpus, steps=1, batch_size=1, context=4, lr=1e-3, max_seconds=1.0)
    with pytest.raises(ValueError, match="lr"):
        rnn.train_char_lm(model, corpus, steps=1, batch_size=1, context=4, lr=0.0)
    with pytest.raises(ValueError, match="steps, batch_size"):
        rnn.train_char_lm(model, corpus, steps=0, batch_size=1, context=4, lr=1e-3)


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
