"""Byte-level byte-pair encoding (BPE), the tokenizer of GPT-2 and its successors (chapter 26).

Training (Sennrich et al. 2016) starts from the 256 byte values and repeatedly merges the most
frequent adjacent pair of symbols into a new symbol. Text is first cut into *pre-tokens* (a word
with its leading space, a run of punctuation, a run of white space), and merges never cross a
pre-token boundary. Encoding applies the learned merges in the order they were learned; decoding
concatenates the tokens' bytes. Because every byte is a base symbol, any string encodes, and
``decode(encode(s)) == s`` for every ``s``.

``train_bpe`` keeps pair counts up to date incrementally: a merge only touches the pre-tokens that
contain the merged pair, which keeps training on a few hundred thousand characters to seconds.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

# letters, digits, underscores or other symbols, each run with an optional leading space | white space
# (the last space before a word goes with the word, as in GPT-2's pattern)
PRETOKEN = re.compile(r" ?[^\W\d_]+| ?\d+| ?_+| ?[^\s\w]+|\s+(?!\S)|\s+")

Pair = tuple[int, int]


def pretokenize(text: str) -> list[str]:
    """Cut ``text`` into pre-tokens; their concatenation is ``text`` again."""
    pieces = PRETOKEN.findall(text)
    if "".join(pieces) != text:  # the pattern covers every character; a failure here is a bug
        raise RuntimeError("pre-tokenization lost characters")
    return pieces


@dataclass
class BPE:
    """A trained byte-level BPE: ``merges[i]`` made token ``256 + i`` from two earlier tokens."""

    merges: list[Pair]
    vocab: list[bytes] = field(init=False)  # token id -> its bytes
    _rank: dict[Pair, int] = field(init=False, repr=False)
    _cache: dict[str, list[int]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.vocab = [bytes([b]) for b in range(256)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} = {(a, b)} uses a token that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._rank = {pair: i for i, pair in enumerate(self.merges)}

    @property
    def vocab_size(self) -> int:
        """256 bytes plus one token per merge."""
        return len(self.vocab)

    def encode_word(self, word: str) -> list[int]:
        """One pre-token -> token ids: apply the lowest-ranked (earliest learned) merge until none applies."""
        if word in self._cache:
            return self._cache[word]
        ids = list(word.encode("utf-8"))
        while len(ids) > 1:
            ranks = [self._rank.get(pair, len(self.merges)) for pair in zip(ids, ids[1:])]
            best = min(ranks)
            if best == len(self.merges):
                break
            ids = _merge(ids, self.merges[best], 256 + best)
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> token ids ``(n_tokens,)``."""
        return [i for word in pretokenize(text) for i in self.encode_word(word)]

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. The bytes are joined first: a character's bytes may span tokens."""
        bad = [i for i in ids if not 0 <= i < len(self.vocab)]
        if bad:
            raise ValueError(f"token ids outside the vocabulary of {len(self.vocab)}: {bad[:5]}")
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


def _merge(ids: list[int], pair: Pair, new: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` (left to right, not overlapping) by ``new``."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _pairs(ids: list[int]) -> Counter[Pair]:
    """Adjacent pairs of one word, with multiplicity."""
    return Counter(zip(ids, ids[1:]))


def train_bpe(text: str, num_merges: int, *, split: Callable[[str], list[str]] = pretokenize) -> BPE:
    """Learn ``num_merges`` merges from ``text``: each time, merge the most frequent adjacent pair.

    Ties go to the smallest pair ``(a, b)``, so training is deterministic. Pairs are counted
    inside the pieces that ``split`` cuts the text into (by default the pre-tokens; for example
    ``split=str.splitlines`` lets merges cross word boundaries). Training stops early when no pair
    occurs twice.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    counts = Counter(split(text))
    words = [list(w.encode("utf-8")) for w in counts]  # unique pre-tokens as byte ids
    freq = list(counts.values())
    pair_count: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)  # pair -> indices of words that hold it
    for k, ids in enumerate(words):
        for pair, n in _pairs(ids).items():
            pair_count[pair] += n * freq[k]
            where[pair].add(k)
    merges: list[Pair] = []
    for step in range(num_merges):
        if not pair_count:
            break
        best = max(pair_count.items(), key=lambda kv: (kv[1], (-kv[0][0], -kv[0][1])))
        if best[1] < 2:
            break
        pair, new = best[0], 256 + step
        merges.append(pair)
        for k in list(where[pair]):
            old = words[k]
            for p, n in _pairs(old).items():  # remove the word's old pairs ...
                pair_count[p] -= n * freq[k]
                if pair_count[p] <= 0:
                    del pair_count[p]
                where[p].discard(k)
            words[k] = _merge(old, pair, new)
            for p, n in _pairs(words[k]).items():  # ... and add its new ones
                pair_count[p] += n * freq[k]
                where[p].add(k)
        where.pop(pair, None)
    return BPE(merges)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (for tokenizers that work on strings)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
