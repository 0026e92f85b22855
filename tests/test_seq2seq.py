"""Tests for dlarch_lib.seq2seq: the reversal task, the two encoder-decoders, greedy and beam search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlarch_lib import seq2seq as s2s
from dlarch_lib.seq2seq import BOS, EOS, PAD, AttentionSeq2Seq, BottleneckSeq2Seq

MODELS = (BottleneckSeq2Seq, AttentionSeq2Seq)
A, B, C = 2, 3, 4  # tokens of the hand-made distribution (BOS = 1 and EOS = 2 are not used there)
TOY_BOS, TOY_EOS = 0, 1
# greedy takes "a" (0.5) then the best continuation (1/3): p = 0.17; "b a" has p = 0.4 * 0.9 = 0.36
TABLE = {
    (): {A: 0.5, B: 0.4, C: 0.1},
    (A,): {A: 0.34, B: 0.33, C: 0.33},
    (B,): {A: 0.9, B: 0.1},
    (C,): {TOY_EOS: 1.0},
    **{(x, y): {TOY_EOS: 1.0} for x in (A, B) for y in (A, B, C)},
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def batch(n=6, lo=1, hi=7, seed=0):
    return s2s.make_reversal_batch(n, lo, hi, torch.Generator().manual_seed(seed))


# --- tokens and batches -------------------------------------------------------------------------


def test_encode_decode_round_trip_and_errors():
    assert s2s.encode_digits("307") == [6, 3, 10]
    assert s2s.decode_tokens([BOS, 6, 3, 10, EOS, 5, PAD]) == "307"
    assert s2s.decode_tokens(torch.tensor([4, 5])) == "12"
    with pytest.raises(ValueError, match="string of digits"):
        s2s.encode_digits("12a")
    with pytest.raises(ValueError, match="string of digits"):
        s2s.encode_digits("")
    with pytest.raises(ValueError, match="unknown token"):
        s2s.decode_tokens([-1])


def test_pad_sequences_and_make_batch():
    x, lengths = s2s.pad_sequences([[5, 6, 7], [8]])
    assert torch.equal(x, torch.tensor([[5, 6, 7], [8, PAD, PAD]])) and lengths.tolist() == [3, 1]
    b = s2s.make_batch([[5, 6], [7]], [[6, 5], [7]])
    assert torch.equal(b.tgt_in, torch.tensor([[BOS, 6, 5], [BOS, 7, PAD]]))
    assert torch.equal(b.tgt_out, torch.tensor([[6, 5, EOS], [7, EOS, PAD]]))
    with pytest.raises(ValueError, match="no empty ones"):
        s2s.pad_sequences([[1], []])
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        s2s.make_batch([[5], [6]], [[5]])


def test_reversal_batch_is_the_padded_reversal_and_seeded():
    b = batch(n=50, lo=2, hi=9)
    assert int(b.src_lengths.min()) >= 2 and int(b.src_lengths.max()) <= 9
    sources = [b.src[i, :L].tolist() for i, L in enumerate(b.src_lengths.tolist())]
    ref = s2s.make_batch(sources, [s[::-1] for s in sources])  # the slow, obvious construction
    for got, want in zip(b, ref):
        assert torch.equal(got, want)
    assert all(torch.equal(x, y) for x, y in zip(batch(seed=3), batch(seed=3)))
    with pytest.raises(ValueError, match="min_len <= max_len"):
        batch(lo=5, hi=4)


# --- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODELS)
def test_forward_shapes_and_padding_invariance(cls):
    model = cls(emb=8, hidden=16).eval()
    b = batch()
    logits = model(b.src, b.src_lengths, b.tgt_in)
    assert logits.shape == (*b.tgt_in.shape, s2s.VOCAB_SIZE)
    i = int(b.src_lengths.argmin())  # the shortest example, alone and without padding
    L = int(b.src_lengths[i])
    alone = model(b.src[i : i + 1, :L], b.src_lengths[i : i + 1], b.tgt_in[i : i + 1, : L + 1])
    torch.testing.assert_close(alone[0], logits[i, : L + 1])


def test_both_models_have_the_same_parameters():
    shapes = lambda m: [(n, p.shape) for n, p in m.named_parameters()]
    assert shapes(BottleneckSeq2Seq()) == shapes(AttentionSeq2Seq())


def test_encoder_final_state_matches_the_unpadded_gru():
    model = BottleneckSeq2Seq(emb=8, hidden=16)
    b = batch()
    memory, final = model.encode(b.src, b.src_lengths)
    assert memory.shape == (*b.src.shape, 16) and final.shape == (6, 16)
    pad = ~s2s.padding_mask(b.src_lengths, b.src.shape[1])
    assert torch.all(memory[pad] == 0)
    i, L = 0, int(b.src_lengths[0])
    out, h_n = model.encoder(model.embed(b.src[i : i + 1, :L]))
    torch.testing.assert_close(final[i], torch.cat([h_n[0, 0], h_n[1, 0]]))
    torch.testing.assert_close(memory[i, :L], out[0])


def test_attention_weights_are_distributions_over_real_source_tokens():
    model = AttentionSeq2Seq(emb=8, hidden=16)
    b = batch()
    w = model.attention_map(b.src, b.src_lengths, b.tgt_in)
    assert w.shape == (6, b.tgt_in.shape[1], b.src.shape[1])
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
    pad = ~s2s.padding_mask(b.src_lengths, b.src.shape[1])  # (B, S)
    assert torch.all(w.masked_select(pad[:, None, :]) == 0)
    with pytest.raises(ValueError, match="has no attention"):
        BottleneckSeq2Seq(emb=8, hidden=16).attention_map(b.src, b.src_lengths, b.tgt_in)


def test_attention_context_matches_torch_sdpa():
    model = AttentionSeq2Seq(emb=8, hidden=16)
    b = batch()
    memory, final = model.encode(b.src, b.src_lengths)
    states = torch.randn(6, 4, 16)
    ctx, w = model.context(states, memory, b.src_lengths, final)
    keep = s2s.padding_mask(b.src_lengths, b.src.shape[1])[:, None, :]  # (B, 1, S), True = attend
    ref = F.scaled_dot_product_attention(model.context_proj(states), memory, memory, attn_mask=keep)
    torch.testing.assert_close(ctx, ref)
    assert w.shape == (6, 4, b.src.shape[1])


def test_bottleneck_context_is_the_same_vector_at_every_step():
    model = BottleneckSeq2Seq(emb=8, hidden=16)
    b = batch()
    memory, final = model.encode(b.src, b.src_lengths)
    ctx, w = model.context(torch.randn(6, 5, 16), memory, b.src_lengths, final)
    assert w is None and ctx.shape == (6, 5, 16)
    torch.testing.assert_close(ctx, model.context_proj(final)[:, None].expand(6, 5, 16))


@pytest.mark.parametrize("cls", MODELS)
def test_greedy_decode_agrees_with_teacher_forcing_and_greedy_search(cls):
    model = cls(emb=8, hidden=16).eval()
    b = batch()
    pred = model.greedy_decode(b.src, b.src_lengths, max_len=5)  # (B, <=5)
    assert pred.shape[0] == 6 and pred.shape[1] <= 5
    tgt_in = torch.cat([torch.full((6, 1), BOS), pred[:, :-1]], dim=1)
    refed = model(b.src, b.src_lengths, tgt_in).argmax(-1)  # teacher-force the model's own output
    alive = torch.cumsum(pred == EOS, 1) - (pred == EOS).long() == 0  # up to and including EOS
    assert torch.equal(refed[alive], pred[alive]) and torch.all(pred[~alive] == PAD)
    for i in range(3):
        fn = model.step_fn(b.src[i], int(b.src_lengths[i]))
        tokens, _ = s2s.greedy_search(fn, BOS, EOS, max_len=5)
        assert tokens == [t for t in pred[i].tolist() if t != PAD]


@pytest.mark.parametrize("cls", MODELS)
def test_sequence_log_prob_is_the_sum_of_step_log_probs(cls):
    model = cls(emb=8, hidden=16).eval()
    b = batch()
    with torch.no_grad():
        total = s2s.sequence_log_prob(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)  # (B,)
    i, L = 1, int(b.src_lengths[1])
    fn = model.step_fn(b.src[i], L)
    steps = sum(float(fn(b.tgt_in[i : i + 1, : t + 1])[0, b.tgt_out[i, t]]) for t in range(L + 1))
    assert math.isclose(float(total[i]), steps, rel_tol=1e-5)
    torch.testing.assert_close(fn(b.tgt_in[:1, :2]).exp().sum(), torch.tensor(1.0))


def test_sequence_loss_and_errors():
    logits = torch.randn(2, 3, 5)
    tgt = torch.tensor([[3, 4, EOS], [4, EOS, PAD]])
    keep = tgt != PAD
    torch.testing.assert_close(s2s.sequence_loss(logits, tgt), F.cross_entropy(logits[keep], tgt[keep]))
    torch.testing.assert_close(-s2s.sequence_log_prob(logits, tgt).sum() / keep.sum(), s2s.sequence_loss(logits, tgt))
    with pytest.raises(ValueError, match="expected logits"):
        s2s.sequence_loss(logits, tgt[:, :2])
    with pytest.raises(ValueError, match="expected logits"):
        s2s.sequence_log_prob(logits[0], tgt)


def test_model_input_errors():
    with pytest.raises(ValueError, match="even hidden"):
        AttentionSeq2Seq(hidden=15)
    model = AttentionSeq2Seq(emb=8, hidden=16)
    b = batch()
    with pytest.raises(ValueError, match="src_lengths must lie"):
        model.encode(b.src, b.src_lengths + 10)
    with pytest.raises(ValueError, match=r"expected src \(B, S\)"):
        model.encode(b.src[0], b.src_lengths)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        model.greedy_decode(b.src, b.src_lengths, 0)
    with pytest.raises(ValueError, match="one source sequence"):
        model.step_fn(b.src, 3)
    with pytest.raises(NotImplementedError):
        s2s.Seq2Seq(emb=8, hidden=16)(b.src, b.src_lengths, b.tgt_in)


def test_exact_match_handles_widths_and_errors():
    pred = torch.tensor([[5, EOS], [5, 6]])
    tgt = torch.tensor([[5, EOS, PAD], [5, 7, EOS]])
    assert s2s.exact_match(pred, tgt).tolist() == [True, False]
    with pytest.raises(ValueError, match="same B"):
        s2s.exact_match(pred, tgt[:1])


def test_training_learns_short_reversals_and_accuracy_by_length():
    model = AttentionSeq2Seq(emb=8, hidden=16)
    history = s2s.train_seq2seq(model, steps=60, batch_size=32, max_len=3, lr=3e-2, progress=False)
    losses = history.loss
    assert history.steps == 60 and len(losses) == 60 and sum(losses[-10:]) < 0.4 * sum(losses[:10])  # measured: 0.15
    acc = s2s.accuracy_by_length(model, [1, 2], n_per_length=50)
    assert list(acc) == [1, 2] and acc[1] >= 0.9 and acc[2] >= 0.7  # measured: 1.0 and 0.94
    with pytest.raises(ValueError, match="steps and batch_size"):
        s2s.train_seq2seq(model, steps=0)


def test_teacher_forcing_step_scores_the_true_prefix():
    model = AttentionSeq2Seq(emb=8, hidden=16)
    b = batch(6, 1, 5, seed=3)
    want = s2s.sequence_loss(model(b.src, b.src_lengths, b.tgt_in), b.tgt_out)
    torch.testing.assert_close(s2s.teacher_forcing_step(model, b), want)
    digits = b.tgt_out[:, :-1] >= s2s.DIGIT0  # the decoder reads y_{t-1} where it predicts y_t
    assert torch.equal(b.tgt_in[:, 1:][digits], b.tgt_out[:, :-1][digits])


def test_accuracy_by_length_restores_the_mode_and_is_seeded():
    model = AttentionSeq2Seq(emb=8, hidden=16).train()
    a = s2s.accuracy_by_length(model, [2, 3], n_per_length=20, seed=4)
    assert model.training and a == s2s.accuracy_by_length(model, [2, 3], n_per_length=20, seed=4)


def test_anti_diagonal_mass_on_known_maps_and_errors():
    lengths = torch.tensor([3, 2])
    perfect = torch.zeros(2, 4, 3)  # T = L_max + 1 rows (the last one reads EOS), S = 3
    for b, L in enumerate(lengths.tolist()):
        for t in range(L):
            perfect[b, t, L - 1 - t] = 1.0
    assert s2s.anti_diagonal_mass(perfect, lengths).tolist() == [1.0, 1.0]
    shifted = torch.roll(perfect, 1, dims=2)  # one position later, except row 0, which wraps round to j = 0
    assert s2s.anti_diagonal_mass(shifted[:1], lengths[:1]).item() == 0.0
    assert s2s.anti_diagonal_mass(shifted[:1], lengths[:1], band=1).item() == pytest.approx(2 / 3)
    uniform = torch.full((1, 4, 3), 1 / 3)
    assert s2s.anti_diagonal_mass(uniform, torch.tensor([3])).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="band must be"):
        s2s.anti_diagonal_mass(perfect, lengths, band=-1)
    with pytest.raises(ValueError, match="src_lengths must lie"):
        s2s.anti_diagonal_mass(perfect, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="expected weights"):
        s2s.anti_diagonal_mass(perfect[0], lengths)


# --- search -------------------------------------------------------------------------------------


def test_table_step_fn():
    fn = s2s.step_fn_from_table(TABLE, vocab_size=5)
    out = torch.cat([fn(torch.tensor([[TOY_BOS]])), fn(torch.tensor([[TOY_BOS, B]]))])
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2))
    assert math.isclose(float(out[1, A]), math.log(0.9), rel_tol=1e-6)
    with pytest.raises(ValueError, match="not a probability distribution"):
        s2s.step_fn_from_table({(): {A: 0.5}}, vocab_size=5)
    with pytest.raises(ValueError, match="outside"):
        s2s.step_fn_from_table({(): {7: 1.0}}, vocab_size=5)


def test_beam_search_beats_greedy_on_the_hand_made_distribution():
    fn = s2s.step_fn_from_table(TABLE, vocab_size=5)
    greedy, g_score = s2s.greedy_search(fn, TOY_BOS, TOY_EOS, max_len=5)
    beam, b_score = s2s.beam_search(fn, TOY_BOS, TOY_EOS, beam_size=2, max_len=5)
    assert greedy == [A, A, TOY_EOS] and math.isclose(math.exp(g_score), 0.5 * 0.34, rel_tol=1e-5)
    assert beam == [B, A, TOY_EOS] and math.isclose(math.exp(b_score), 0.4 * 0.9, rel_tol=1e-5)
    assert (beam, b_score) == s2s.exhaustive_search(fn, TOY_BOS, TOY_EOS, max_len=5)
    assert s2s.beam_search(fn, TOY_BOS, TOY_EOS, beam_size=1, max_len=5) == (greedy, g_score)
    assert s2s.beam_search(fn, TOY_BOS, TOY_EOS, beam_size=10, max_len=5)[0] == beam


def test_beam_size_one_is_greedy_on_a_model_and_wider_beams_score_no_worse_here():
    model = AttentionSeq2Seq(emb=8, hidden=16).eval()
    b = batch()
    for i in range(3):
        fn = model.step_fn(b.src[i], int(b.src_lengths[i]))
        assert s2s.beam_search(fn, BOS, EOS, beam_size=1, max_len=6) == s2s.greedy_search(fn, BOS, EOS, max_len=6)
    fn = s2s.step_fn_from_table(TABLE, vocab_size=5)
    scores = [s2s.beam_search(fn, TOY_BOS, TOY_EOS, k, 5)[1] for k in (1, 2, 3)]
    assert scores[0] < scores[1] <= scores[2] + 1e-9


def random_step_fn(vocab_size=4, seed=0):
    """A prefix-dependent random distribution (tokens 0 = BOS, 1 = EOS), the same on every call."""

    def fn(prefixes):
        rows = []
        for p in prefixes.tolist():
            g = torch.Generator().manual_seed(seed * 1000 + hash(tuple(p)) % 1000)
            rows.append(F.log_softmax(2 * torch.randn(vocab_size, generator=g, dtype=torch.float64), -1))
        return torch.stack(rows)

    return fn


@pytest.mark.parametrize("seed", range(5))
def test_a_beam_as_wide_as_the_tree_is_exact(seed):
    fn = random_step_fn(seed=seed)
    best = s2s.exhaustive_search(fn, TOY_BOS, TOY_EOS, max_len=4)
    wide = s2s.beam_search(fn, TOY_BOS, TOY_EOS, beam_size=4**4, max_len=4)
    assert wide[0] == best[0] and math.isclose(wide[1], best[1], rel_tol=1e-9)
    greedy = s2s.greedy_search(fn, TOY_BOS, TOY_EOS, max_len=4)
    if greedy[0][-1] == TOY_EOS:  # a finished greedy hypothesis can never beat the optimum
        assert greedy[1] <= best[1] + 1e-12


def test_search_returns_best_prefix_when_nothing_finishes_and_errors():
    loop = s2s.step_fn_from_table({(): {A: 1.0}, (A,): {A: 1.0}, (A, A): {A: 1.0}}, vocab_size=5)
    assert s2s.beam_search(loop, TOY_BOS, TOY_EOS, beam_size=2, max_len=3) == ([A, A, A], 0.0)
    assert s2s.greedy_search(loop, TOY_BOS, TOY_EOS, max_len=3) == ([A, A, A], 0.0)
    assert s2s.exhaustive_search(loop, TOY_BOS, TOY_EOS, max_len=3) == ([], -math.inf)
    with pytest.raises(ValueError, match="beam_size and max_len"):
        s2s.beam_search(loop, TOY_BOS, TOY_EOS, beam_size=0, max_len=3)
    with pytest.raises(ValueError, match="must return"):
        s2s.beam_search(lambda p: torch.zeros(5), TOY_BOS, TOY_EOS, beam_size=2, max_len=3)
    with pytest.raises(ValueError, match="max_len must be"):
        s2s.greedy_search(loop, TOY_BOS, TOY_EOS, max_len=0)
    with pytest.raises(ValueError, match="max_len must be"):
        s2s.exhaustive_search(loop, TOY_BOS, TOY_EOS, max_len=0)


# --- the Transformer encoder-decoder --------------------------------------------------------


def small_transformer(norm_first=True):
    return s2s.TransformerSeq2Seq(d_model=16, n_heads=2, n_layers=2, d_ff=24, norm_first=norm_first, max_len=16)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_stack_equals_torch_nn_transformer(norm_first):
    ref = torch.nn.Transformer(
        d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
        dropout=0.0, batch_first=True, norm_first=norm_first,
    )  # fmt: skip
    mine = s2s.TransformerEncoderDecoder(16, 4, 2, 32, norm_first=norm_first).load_from_torch(ref)
    src, tgt, lengths = torch.randn(3, 7, 16), torch.randn(3, 5, 16), torch.tensor([7, 3, 5])
    keep = s2s.padding_mask(lengths, 7)  # (B, S): True = real token; torch's masks say True = ignore
    want = ref(
        src, tgt, tgt_mask=~s2s.causal_mask(5), src_key_padding_mask=~keep, memory_key_padding_mask=~keep,
        tgt_is_causal=True,
    )  # fmt: skip
    got = mine(src, tgt, keep[:, None, :], s2s.causal_mask(5))
    torch.testing.assert_close(got, want)
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in ref.parameters())
    with pytest.raises(ValueError, match="norm_first differs"):
        s2s.TransformerEncoderDecoder(16, 4, 2, 32, norm_first=not norm_first).load_from_torch(ref)
    with pytest.raises(ValueError, match="layer counts differ"):
        s2s.TransformerEncoderDecoder(16, 4, 1, 32, norm_first=norm_first).load_from_torch(ref)


def test_transformer_decoder_is_causal_and_ignores_source_padding():
    model = small_transformer().eval()
    b = batch()
    logits = model(b.src, b.src_lengths, b.tgt_in)
    assert logits.shape == (*b.tgt_in.shape, s2s.VOCAB_SIZE)
    changed = b.tgt_in.clone()
    changed[:, 3:] = 5  # change the future: positions < 3 must not notice
    torch.testing.assert_close(model(b.src, b.src_lengths, changed)[:, :3], logits[:, :3])
    junk = b.src.masked_fill(~s2s.padding_mask(b.src_lengths, b.src.shape[1]), 7)  # digits in the padding
    torch.testing.assert_close(model(junk, b.src_lengths, b.tgt_in), logits)
    w = model.attention_map(b.src, b.src_lengths, b.tgt_in)  # (B, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
    with pytest.raises(ValueError, match="T <= 16"):
        model(b.src, b.src_lengths, torch.full((6, 17), BOS))
    with pytest.raises(ValueError, match="src_lengths must lie"):
        model(b.src, torch.zeros(6, dtype=torch.long), b.tgt_in)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        s2s.TransformerEncoderDecoder(16, 2, 0, 24)
    with pytest.raises(ValueError, match="d_ff must be >= 1"):
        s2s.TransformerSeq2Seq(d_model=16, n_heads=2, d_ff=0)


def test_transformer_greedy_decode_agrees_with_teacher_forcing_and_search():
    model = small_transformer().eval()
    b = batch()
    pred = model.greedy_decode(b.src, b.src_lengths, max_len=5)
    tgt_in = torch.cat([torch.full((6, 1), BOS), pred[:, :-1]], dim=1)
    refed = model(b.src, b.src_lengths, tgt_in).argmax(-1)
    alive = torch.cumsum(pred == EOS, 1) - (pred == EOS).long() == 0
    assert torch.equal(refed[alive], pred[alive]) and torch.all(pred[~alive] == PAD)
    fn = model.step_fn(b.src[0], int(b.src_lengths[0]))
    assert s2s.greedy_search(fn, BOS, EOS, max_len=5)[0] == [t for t in pred[0].tolist() if t != PAD]


def test_transformer_learns_short_reversals():
    torch.manual_seed(0)
    model = s2s.TransformerSeq2Seq(d_model=32, n_heads=2, n_layers=1, d_ff=32)
    s2s.train_seq2seq(model, steps=150, batch_size=64, max_len=3, lr=1e-2, progress=False)
    acc = s2s.accuracy_by_length(model, [1, 2, 3], n_per_length=50)
    assert min(acc.values()) >= 0.9, acc


# --- sampling: top-k and nucleus ----------------------------------------------------------------


def test_top_k_and_nucleus_keep_the_right_sets():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    k2 = s2s.truncated_probs(logits, top_k=2)
    torch.testing.assert_close(k2, torch.tensor([0, 0.625, 0, 0.375, 0]))
    p85 = s2s.truncated_probs(logits, top_p=0.85)  # 0.5 + 0.3 = 0.8 < 0.85: the 0.1 joins, 0.9 >= 0.85
    torch.testing.assert_close(p85, torch.tensor([0, 0.5, 0.1, 0.3, 0]) / 0.9)
    torch.testing.assert_close(s2s.truncated_probs(logits, top_p=0.5), torch.tensor([0.0, 1, 0, 0, 0]))
    torch.testing.assert_close(s2s.truncated_probs(logits, top_p=1.0), probs)
    both = s2s.truncated_probs(logits, top_k=2, top_p=0.7)  # top-2 renormalised: 0.625 >= 0.7? no: keep both
    torch.testing.assert_close(both, k2)
    with pytest.raises(ValueError, match="top_p must be in"):
        s2s.truncated_probs(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be in"):
        s2s.truncated_probs(logits, top_k=6)


def test_nucleus_is_the_smallest_set_with_mass_p_on_random_distributions():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(200, 9, generator=g).pow(3).softmax(-1) ** 4
    probs = probs / probs.sum(-1, keepdim=True)
    for p in (0.3, 0.6, 0.9, 0.99):
        kept = s2s.truncated_probs(probs.log(), top_p=p) > 0  # (N, V)
        mass = (probs * kept).sum(-1)
        assert torch.all(mass >= p - 1e-6)
        smallest_kept = probs.masked_fill(~kept, 2.0).amin(-1)  # dropping it must fall below p
        assert torch.all(mass - smallest_kept < p)
        largest_dropped = probs.masked_fill(kept, -1.0).amax(-1)
        assert torch.all(largest_dropped <= smallest_kept)  # the kept tokens are the most probable ones


def test_sampling_never_leaves_the_truncated_set():
    model = small_transformer().eval()
    b = batch(n=32, lo=3, hi=6)
    g = torch.Generator().manual_seed(0)
    pred = model.sample_decode(b.src, b.src_lengths, max_len=6, generator=g, top_k=2)
    tgt_in = torch.cat([torch.full((32, 1), BOS), pred[:, :-1]], dim=1)
    top2 = model(b.src, b.src_lengths, tgt_in).topk(2, dim=-1).indices  # (B, T, 2)
    alive = torch.cumsum(pred == EOS, 1) - (pred == EOS).long() == 0
    assert torch.all((top2 == pred[..., None]).any(-1)[alive])  # every emitted token is one of the 2 largest
    again = model.sample_decode(b.src, b.src_lengths, max_len=6, generator=torch.Generator().manual_seed(0), top_k=2)
    assert torch.equal(pred, again)  # seeded
    near_greedy = model.sample_decode(b.src, b.src_lengths, max_len=6, generator=g, top_k=1)
    assert torch.equal(near_greedy, model.greedy_decode(b.src, b.src_lengths, max_len=6))  # top-1 is greedy
    pure = model.sample_decode(b.src, b.src_lengths, max_len=6, generator=g)
    assert not torch.equal(pure, near_greedy)  # an untrained model's full distribution is far from one-hot
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        model.sample_decode(b.src, b.src_lengths, 0, generator=g)


# --- label smoothing ----------------------------------------------------------------------------


def test_label_smoothed_loss_equals_torch_and_its_decomposition():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(20, 7, generator=g), torch.randint(0, 7, (20,), generator=g)
    for eps in (0.0, 0.1, 0.5):
        got = s2s.label_smoothed_cross_entropy(logits, target, eps, ignore_index=PAD)
        torch.testing.assert_close(got, F.cross_entropy(logits, target, label_smoothing=eps, ignore_index=PAD))
        q = torch.full((20, 7), eps / 7).scatter_add(1, target[:, None], torch.full((20, 1), 1 - eps))  # smoothed
        q = q[target != PAD]
        torch.testing.assert_close(got, -(q * logits[target != PAD].log_softmax(-1)).sum(-1).mean())
    with pytest.raises(ValueError, match="eps must be in"):
        s2s.label_smoothed_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError, match="expected logits"):
        s2s.label_smoothed_cross_entropy(logits, target[:3], 0.1)
    with pytest.raises(ValueError, match="eps must be in"):
        s2s.label_smoothing_step(-0.1)


def test_label_smoothing_step_and_confidence():
    model = small_transformer()
    b = batch()
    torch.testing.assert_close(s2s.label_smoothing_step(0.0)(model, b), s2s.teacher_forcing_step(model, b))
    model.train()
    conf = s2s.max_probs(model, b)
    assert model.training and conf.shape == (int((b.tgt_out != PAD).sum()),)
    assert torch.all((conf > 1 / s2s.VOCAB_SIZE) & (conf < 1))
    with torch.no_grad():
        model.out.bias[EOS] = 100.0  # every position predicts EOS with certainty
    assert torch.all(s2s.max_probs(model, b) > 0.999)
