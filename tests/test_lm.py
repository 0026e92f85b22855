"""Tests for dlarch_lib.lm: BERT masking, the bidirectional encoder, MLM training, sampling a GPT, the topic task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlarch_lib import attention, lm, rnn
from dlarch_lib.core import text
from dlarch_lib.core.train import History


@pytest.fixture(scope="module")
def corpus():
    return text.char_corpus(max_chars=20_000)


# ---------------------------------------------------------------- mask_tokens / mlm_loss
def test_mask_tokens_80_10_10_statistics():
    V = 50
    ids = torch.randint(0, V, (200, 500), generator=torch.Generator().manual_seed(0))
    inputs, targets = lm.mask_tokens(ids, V, V, generator=torch.Generator().manual_seed(1))
    sel = targets != lm.IGNORE
    n = sel.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.005  # 100k positions: sd of the fraction ~0.0011
    masked = (inputs == V) & sel
    changed = (inputs != ids) & (inputs != V) & sel
    same = (inputs == ids) & sel
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # a "random" draw equals the original with probability 1/V: random total ~ 0.1, unchanged ~ 0.1 + 0.1/V
    assert abs(changed.sum().item() / n - 0.1 * (1 - 1 / V)) < 0.01
    assert abs(same.sum().item() / n - (0.1 + 0.1 / V)) < 0.01
    # outside the selection nothing changes, and targets hold the original tokens
    assert torch.equal(inputs[~sel], ids[~sel])
    assert torch.equal(targets[sel], ids[sel])
    assert (inputs[changed] < V).all()  # random replacements are real tokens, never [MASK]


def test_mask_tokens_deterministic_and_shapes():
    ids = torch.arange(30).reshape(3, 10) % 7
    a = lm.mask_tokens(ids, 7, 7, generator=torch.Generator().manual_seed(3))
    b = lm.mask_tokens(ids, 7, 7, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == a[1].shape == ids.shape
    inputs, targets = lm.mask_tokens(ids, 7, 7, p=1.0, p_mask=1.0, p_random=0.0)
    assert (inputs == 7).all() and torch.equal(targets, ids)


def test_mask_tokens_errors():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="int64"):
        lm.mask_tokens(ids.float(), 5, 5)
    with pytest.raises(ValueError, match="mask_id"):
        lm.mask_tokens(ids, 2, 5)
    with pytest.raises(ValueError, match="p must"):
        lm.mask_tokens(ids, 5, 5, p=0.0)
    with pytest.raises(ValueError, match="p_mask"):
        lm.mask_tokens(ids, 5, 5, p_mask=0.9, p_random=0.2)
    with pytest.raises(ValueError, match="lie in"):
        lm.mask_tokens(ids + 9, 5, 5)


def test_mlm_loss_only_on_selected_positions():
    logits = torch.randn(2, 5, 4)
    targets = torch.full((2, 5), lm.IGNORE)
    targets[0, 1], targets[1, 4] = 2, 3
    expected = (F.cross_entropy(logits[0, 1], torch.tensor(2)) + F.cross_entropy(logits[1, 4], torch.tensor(3))) / 2
    torch.testing.assert_close(lm.mlm_loss(logits, targets), expected)
    logits2 = logits.clone()
    logits2[0, 0] += 100.0  # an unselected position cannot change the loss
    torch.testing.assert_close(lm.mlm_loss(logits2, targets), expected)
    with pytest.raises(ValueError, match="no selected"):
        lm.mlm_loss(logits, torch.full((2, 5), lm.IGNORE))
    with pytest.raises(ValueError, match="logits"):
        lm.mlm_loss(logits[0], targets)


# ---------------------------------------------------------------- Encoder
def test_encoder_shapes_and_bidirectional():
    torch.manual_seed(0)
    enc = lm.Encoder(10, 16, 32, 4, 2)
    idx = torch.randint(0, 10, (3, 12))
    assert enc(idx).shape == (3, 12, 11)  # vocabulary + [MASK]
    assert enc.features(idx).shape == (3, 12, 32)
    assert enc.mask_id == 10
    idx2 = idx.clone()
    idx2[:, -1] = (idx2[:, -1] + 1) % 10  # change the last token: the *first* output must change too
    assert not torch.allclose(enc(idx)[:, 0], enc(idx2)[:, 0])
    assert enc.head.weight is enc.tok.weight


def test_encoder_equals_gpt_blocks_without_causal_mask():
    torch.manual_seed(0)
    enc = lm.Encoder(10, 16, 32, 4, 2)
    idx = torch.randint(0, 11, (2, 9))
    x = enc.tok(idx) + enc.pos.weight[:9]
    for block in enc.blocks:
        x = block(x, torch.ones(9, 9, dtype=torch.bool))  # an all-True mask is no mask
    torch.testing.assert_close(enc.features(idx), enc.ln_f(x))


def test_encoder_padding_mask_hides_padding():
    torch.manual_seed(0)
    enc = lm.Encoder(10, 16, 32, 4, 1)
    idx = torch.randint(0, 10, (2, 8))
    pad = attention.padding_mask(torch.tensor([5, 5]), 8)
    other = idx.clone()
    other[:, 5:] = (other[:, 5:] + 3) % 10  # change only the padding
    torch.testing.assert_close(enc.features(idx, pad)[:, :5], enc.features(other, pad)[:, :5])


def test_encoder_embed_windows_and_errors():
    torch.manual_seed(0)
    enc = lm.Encoder(10, 8, 16, 2, 1)
    idx = torch.randint(0, 10, (3, 16))
    e = enc.embed(idx)
    assert e.shape == (3, 16)
    with torch.no_grad():
        manual = (enc.features(idx[:, :8]).mean(1) + enc.features(idx[:, 8:]).mean(1)) / 2
    torch.testing.assert_close(e, manual)
    with pytest.raises(ValueError, match="multiple"):
        enc.embed(idx[:, :12])
    with pytest.raises(ValueError, match="exceeds"):
        enc(idx)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        enc(idx[0])
    with pytest.raises(ValueError, match=">= 1"):
        lm.Encoder(0, 8, 16, 2, 1)


def test_train_mlm_lowers_the_loss(corpus):
    torch.manual_seed(0)
    enc = lm.Encoder(corpus.vocab_size, 16, 32, 4, 1)
    before = lm.eval_mlm(enc, corpus, context=16, windows=32)
    h = lm.train_mlm(
        enc, corpus, steps=40, batch_size=16, context=16, lr=3e-3, eval_every=20, eval_windows=32, progress=False
    )
    assert isinstance(h, History)
    assert h.steps == 40 and h.eval_steps == [20, 40] and len(h.val_loss) == 2 and len(h.loss) == 40
    assert h.val_loss[-1] < before - 0.3
    assert lm.eval_mlm(enc, corpus, context=16, windows=32) == pytest.approx(h.val_loss[-1])  # fixed windows
    with pytest.raises(ValueError, match="lr"):
        lm.train_mlm(enc, corpus, steps=1, batch_size=2, context=8, lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        lm.train_mlm(enc, corpus, steps=0, batch_size=2, context=8, lr=1e-3)


def test_mlm_step_scores_the_selected_positions_only(corpus):
    torch.manual_seed(0)
    enc = lm.Encoder(corpus.vocab_size, 16, 32, 4, 1)
    x, y = lm.mlm_batch(corpus, "train", 4, 16, torch.Generator().manual_seed(0))
    logits = enc(x)  # (4, 16, V + 1)
    sel = y != lm.IGNORE
    want = F.cross_entropy(logits[sel], y[sel])
    torch.testing.assert_close(lm.mlm_step(enc, (x, y)), want)


def test_mlm_batch(corpus):
    x, y = lm.mlm_batch(corpus, "train", 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 10)
    assert x.max() <= corpus.vocab_size


# ---------------------------------------------------------------- sampling
def test_entropy_rises_with_temperature():
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    h = torch.stack([lm.entropy(rnn.sampling_probs(logits, t)) for t in (0.25, 0.5, 1.0, 2.0, 8.0)])  # (5, 16)
    assert (h.diff(dim=0) > 0).all()
    assert (h[-1] < torch.log(torch.tensor(40.0))).all()  # bounded by log V
    torch.testing.assert_close(
        lm.entropy(torch.full((3, 8), 1 / 8)), torch.full((3,), torch.log(torch.tensor(8.0)).item())
    )
    assert lm.entropy(torch.tensor([1.0, 0.0])).item() == 0.0


def test_generate_from_a_gpt_greedy_and_top_k():
    torch.manual_seed(0)
    gpt = attention.GPT(12, 8, 16, 2, 1)
    prompt = torch.randint(0, 12, (2, 3))
    out = rnn.generate(gpt, prompt, 10, temperature=0.0)
    assert out.shape == (2, 13) and torch.equal(out[:, :3], prompt)
    # greedy by hand: argmax of the last logits, fed back; the GPT sees its last 8 (its context) tokens
    idx = prompt
    with torch.no_grad():
        for _ in range(10):
            idx = torch.cat([idx, gpt(idx[:, -8:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, idx)
    a = rnn.generate(gpt, prompt, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, out[:, :8])  # top-1 sampling is greedy
    b = rnn.generate(gpt, prompt, 10, temperature=0.8, generator=torch.Generator().manual_seed(0))
    c = rnn.generate(gpt, prompt, 10, temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, c) and int(b.max()) < 12
    with pytest.raises(ValueError, match="n >= 0"):
        rnn.generate(gpt, prompt, -1)


# ---------------------------------------------------------------- topic task
def test_topic_passages_split_and_labels():
    topics = {"a": "x" * 100, "b": "y" * 50 + "z" * 50}
    tr, ytr, te, yte = lm.topic_passages(topics, ["a", "b"], 10, train_frac=0.7)
    assert len(tr) == 14 and len(te) == 6 and ytr == [0] * 7 + [1] * 7 and yte == [0] * 3 + [1] * 3
    assert all(len(t) == 10 for t in tr + te)
    assert all(t == "z" * 10 for t in te[3:])  # test passages come from the end of each topic
    tr, ytr, te, yte = lm.topic_passages(topics, ["a", "b"], 10, per_topic=2)
    assert len(tr) == len(te) == 4
    with pytest.raises(ValueError, match="unknown"):
        lm.topic_passages(topics, ["c"], 10)
    with pytest.raises(ValueError, match="too short"):
        lm.topic_passages(topics, ["a"], 90)


def test_char_counts():
    counts = lm.char_counts(["aab", "c"], ["a", "b", "c"])
    torch.testing.assert_close(counts, torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="vocabulary"):
        lm.char_counts(["d"], ["a"])
