"""Vowpal Wabbit feature hashing, as Azure ML Studio (classic)'s Feature Hashing module does it.

Whitespace tokens exactly as typed; MurmurHash3 x86 32-bit with seed 0; a token made only of
ASCII digits hashes to its integer value; an n-gram's index folds the token hashes with VW's
quadratic constant; the bucket is the index's low `bits` bits; no constant feature.
`This is a good day` with 3 bits and 2-grams gives 1 1 2 2 0 2 0 1 (tests/test_emulator.py
checks it).
"""

from __future__ import annotations

import mmh3

#: VW's multiplier for combining feature indices (`quadratic_constant` in VW's source).
QUADRATIC_CONSTANT = 27942141
MAX_BITS = 31
MAX_NGRAMS = 10


def token_hash(token: str) -> int:
    if token.isascii() and token.isdigit():
        return int(token)
    return int(mmh3.hash(token, 0, signed=False))


def feature_counts(text: str, *, bits: int, ngrams: int) -> list[int]:
    """Counts per bucket (2**bits of them) of every 1..ngrams-gram of the text's tokens."""
    mask = (1 << bits) - 1
    counts = [0] * (1 << bits)
    hashes = [token_hash(t) for t in text.split()]
    for start in range(len(hashes)):
        index = 0
        for n in range(min(ngrams, len(hashes) - start)):
            # Masking each step keeps the numbers small; the low bits are unchanged by it.
            index = ((index * QUADRATIC_CONSTANT) + hashes[start + n]) & 0xFFFFFFFFFFFFFFFF
            counts[index & mask] += 1
    return counts


def feature_names(column: str, *, bits: int) -> list[str]:
    return [f"{column} - Hashing feature {i}" for i in range(1, (1 << bits) + 1)]
