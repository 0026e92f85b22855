"""Byte-level BPE: training picks the most frequent pair, encoding replays the merges, decoding inverts."""

from collections import Counter

import pytest

from dlarch_lib import bpe

TEXT = "low lower lowest newer newest wider widest " * 20 + "the theory of the thermal theme"


def _naive_train(text: str, num_merges: int) -> list[tuple[int, int]]:
    """The definition, slowly: recount every pair over every pre-token before each merge."""
    words = [list(w.encode()) for w in bpe.pretokenize(text)]
    merges = []
    for step in range(num_merges):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], (-kv[0][0], -kv[0][1])))
        if best[1] < 2:
            break
        merges.append(best[0])
        words = [bpe._merge(w, best[0], 256 + step) for w in words]
    return merges


def test_incremental_training_equals_the_definition():
    assert bpe.train_bpe(TEXT, 40).merges == _naive_train(TEXT, 40)


def test_first_merge_is_the_most_frequent_pair():
    tok = bpe.train_bpe("aaab aaab aaab xy", 1)
    # "aa" occurs twice in each "aaab" (overlapping), more than any other pair
    assert tok.vocab[256] == b"aa"


def test_round_trip_on_unseen_characters():
    tok = bpe.train_bpe(TEXT, 60)
    for s in ["naïve café — 数据 🙂", "lowest\n\n\t  widest", "", "x"]:
        assert tok.decode(tok.encode(s)) == s


def test_merges_shorten_and_never_cross_pre_tokens():
    tok = bpe.train_bpe(TEXT, 60)
    assert len(tok.encode(TEXT)) < len(TEXT.encode()) / 2
    assert not any(b" " in t[1:] and t.strip() for t in tok.vocab[256:])  # a space only leads a token
    crossing = bpe.train_bpe(TEXT, 60, split=str.splitlines)
    assert any(b" " in t[1:] and t[:1] != b" " for t in crossing.vocab[256:])


def test_encode_applies_merges_in_learned_order():
    # merges: (a, b) -> 256, then (b, c) -> 257. "abc" must become [256, c], not [a, 257].
    tok = bpe.BPE([(97, 98), (98, 99)])
    assert tok.encode_word("abc") == [256, 99]
    tok2 = bpe.BPE([(98, 99), (97, 98)])
    assert tok2.encode_word("abc") == [97, 256]


def test_pretokenize_covers_the_text():
    s = "def f(x_1):\n    return x_1 + 2.5  # ok"
    pieces = bpe.pretokenize(s)
    assert "".join(pieces) == s
    assert " return" in pieces and "_" in pieces


def test_bytes_to_unicode_is_a_bijection_on_printable_characters():
    table = bpe.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_bad_input_raises():
    with pytest.raises(ValueError, match="does not exist yet"):
        bpe.BPE([(97, 300)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.BPE([]).decode([256])
    with pytest.raises(ValueError, match="num_merges"):
        bpe.train_bpe("abc", -1)
    with pytest.raises(ValueError, match="empty"):
        bpe.train_bpe("", 3)
