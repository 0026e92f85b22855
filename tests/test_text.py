import math

import pytest
import torch

from dlarch_lib.core.text import bigram_nats, char_corpus, entropy_nats, python_reference_text, unigram_nats


def test_reference_text_is_large_and_offline():
    text = python_reference_text()
    assert len(text) > 300_000 and "lambda" in text


def test_corpus_roundtrip_split_and_batches():
    corpus = char_corpus("abcabcabcabd" * 10, val_frac=0.25)
    assert corpus.vocab == ["a", "b", "c", "d"]
    assert len(corpus.train) == 90 and len(corpus.val) == 30
    assert corpus.decode(corpus.encode("cab")) == "cab"
    x, y = corpus.batch("train", 3, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 5)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_corpus_errors():
    corpus = char_corpus("abcabcabcabc")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        corpus.encode("z")
    with pytest.raises(ValueError, match="split must be"):
        corpus.batch("test", 1, 2)
    with pytest.raises(ValueError, match="longer than"):
        corpus.batch("val", 1, 50)
    with pytest.raises(ValueError, match="val_frac"):
        char_corpus("abcdefghijkl", val_frac=1.0)


def test_baselines_order_and_uniform_case():
    corpus = char_corpus(max_chars=50_000)
    assert bigram_nats(corpus) < unigram_nats(corpus) < math.log(corpus.vocab_size)
    assert entropy_nats("abab") == pytest.approx(math.log(2))
