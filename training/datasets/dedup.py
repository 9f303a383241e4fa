"""Near-duplicate samples in sub-quadratic time: MinHash signatures of word shingles, bucketed by
LSH banding, so that a sample is compared only with the earlier samples that share a band with
it, not with every earlier sample (which made the build quadratic in the project's history).

Two texts are near duplicates when the Jaccard similarity of their sets of word 3-grams
(lowercased, punctuation dropped) is at least the threshold, estimated from ``PERMUTATIONS``
MinHash values (standard error about 0.035 at 0.8). Banding: ``BANDS`` bands of ``ROWS``
values; two texts are compared when they agree on a whole band, which a pair at Jaccard J does
with probability 1 - (1 - J**8)**16: 0.9999 at 0.9, 0.994 at 0.85, 0.95 at 0.8 (where the
estimate itself is a coin toss), 0.06 at 0.5, 0.004 at 0.35 (samples from one template), so
unrelated samples are rarely even looked at. On the demo data it drops exactly what comparing
every pair of signatures drops.

Equal texts after normalising (case, punctuation) have equal signatures and are found without
banding. The worst case stays quadratic (thousands of samples all about 0.8 alike share their
buckets); the exact-duplicate step before this one takes out the commonest such floods.

Deterministic: the hash functions come from fixed seeds (``hashlib``, not Python's salted
``hash``), so the same samples give the same snapshot in every process.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

SHINGLE_WORDS = 3
ROWS = 8
BANDS = 16
PERMUTATIONS = ROWS * BANDS
# Shingles hashed in one numpy pass (x PERMUTATIONS x 8 bytes: about 50 MB).
_CHUNK_SHINGLES = 50_000
# Candidate pairs checked in one numpy pass (x 2 x PERMUTATIONS x 4 bytes: about 100 MB).
_CHUNK_PAIRS = 100_000

_WORD = re.compile(r"\w+")


def _seeds(label: str, count: int) -> np.ndarray:
    """``count`` odd 64-bit numbers derived from ``label`` (odd: a multiplier mod 2**64 must be)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{label}:{i}".encode(), digest_size=8).digest(), "big")
            | 1
            for i in range(count)
        ],
        dtype=np.uint64,
    )


# Multiply-shift hash functions, one per permutation: (a * x + b) mod 2**64, top 32 bits.
_A = _seeds("minhash-a", PERMUTATIONS)
_B = _seeds("minhash-b", PERMUTATIONS)
# Combine a shingle's word hashes, and a band's rows, into one 64-bit key.
_WORDS_MIX = _seeds("shingle", SHINGLE_WORDS)
_BAND_MIX = _seeds("band", ROWS)
_ROW_MIX = _seeds("row", PERMUTATIONS)


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")


def _shingles(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The hashes of every text's word 3-grams (the whole text when it has fewer words), all
    texts one after another, and how many each text has. One numpy pass over the history's
    words: the per-text work in Python is only splitting the words."""
    vocabulary: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        ids += [vocabulary.setdefault(word, len(vocabulary)) for word in words]
        lengths[row] = len(words)
    table = np.array([_word_hash(word) for word in vocabulary], dtype=np.uint64)
    words = table[np.array(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.uint64)
    widths = np.minimum(lengths, SHINGLE_WORDS)
    counts = np.where(lengths > 0, lengths - widths + 1, 0)
    total = int(counts.sum())
    word_starts = np.cumsum(lengths) - lengths
    shingle_starts = np.cumsum(counts) - counts
    offsets = np.arange(total, dtype=np.int64) - np.repeat(shingle_starts, counts)
    first = np.repeat(word_starts, counts) + offsets
    width = np.repeat(widths, counts)
    hashes = np.zeros(total, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(SHINGLE_WORDS):
            at = np.minimum(first + k, max(len(words) - 1, 0))
            hashes += np.where(width > k, words[at] if len(words) else 0, 0) * _WORDS_MIX[k]
    return hashes, counts


def signatures(texts: Sequence[str], check: Callable[[], None] = lambda: None) -> np.ndarray:
    """One row of ``PERMUTATIONS`` MinHash values per text (uint32); a text without words gets
    a row of ``0xFFFFFFFF``. ``check`` is called between chunks (it may raise to stop)."""
    out = np.full((len(texts), PERMUTATIONS), np.iinfo(np.uint32).max, dtype=np.uint32)
    hashes, counts = _shingles(texts)
    check()
    ends = np.cumsum(counts)
    begin = 0
    while begin < len(texts):
        # Whole texts, about ``_CHUNK_SHINGLES`` shingles at a time.
        stop = int(np.searchsorted(ends, ends[begin] - counts[begin] + _CHUNK_SHINGLES, "right"))
        stop = max(stop, begin + 1)
        rows = np.arange(begin, stop)[counts[begin:stop] > 0]
        if len(rows):
            base = ends[begin] - counts[begin]
            chunk = hashes[base : ends[stop - 1]]
            # One row per permutation: the minimum runs along contiguous memory.
            permuted = np.multiply(_A[:, None], chunk[None, :])  # mod 2**64
            permuted += _B[:, None]
            permuted >>= np.uint64(32)
            firsts = ends[rows] - counts[rows] - base
            out[rows] = np.minimum.reduceat(permuted, firsts, axis=1).T
        begin = stop
        check()
    return out


def _pairs_sharing_a_band(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(earlier, later)`` rows whose key is equal in at least one band, each pair once."""
    count = len(keys)
    codes = []
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")  # stable: earlier rows first
        ordered = keys[order, band]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, count])
        if sizes.max() == 1:
            continue
        # Each row is paired with every row before it in its bucket.
        position = np.arange(count) - np.repeat(starts, sizes)
        later = np.repeat(np.arange(count), position)
        earlier = np.repeat(np.arange(count) - position, position) + (
            np.arange(len(later)) - np.repeat(np.cumsum(position) - position, position)
        )
        codes.append(order[earlier] * count + order[later])
    if not codes:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    unique = np.unique(np.concatenate(codes))
    return unique // count, unique % count


def near_duplicates(
    texts: Sequence[str], threshold: float, check: Callable[[], None] = lambda: None
) -> list[bool]:
    """For each text, whether an earlier text is at least ``threshold`` similar (estimated
    Jaccard of word 3-grams). A text is compared only with the earlier ones that share an LSH
    band with it. Texts with equal signatures are one text here: the first stands for the
    later ones (each of which is a duplicate of it), as it matches exactly what they match.
    ``check`` is called now and then (it may raise to stop the build)."""
    flags = np.zeros(len(texts), dtype=bool)
    if len(texts) < 2:
        return flags.tolist()
    sigs = signatures(texts, check)
    with_words = np.flatnonzero((sigs != np.iinfo(np.uint32).max).any(axis=1))
    # Equal signatures: sorted by a 64-bit digest of the row, then compared in full.
    with np.errstate(over="ignore"):
        digest = (sigs[with_words].astype(np.uint64) * _ROW_MIX).sum(axis=1, dtype=np.uint64)
    order = np.argsort(digest, kind="stable")
    ordered = with_words[order]
    same = np.r_[False, digest[order][1:] == digest[order][:-1]]
    same[1:] &= (sigs[ordered[1:]] == sigs[ordered[:-1]]).all(axis=1)
    # A run of equal rows starts at its earliest; the rest are duplicates of it.
    flags[ordered[same]] = True
    standing = np.sort(ordered[~same])
    with np.errstate(over="ignore"):
        keys = (
            sigs[standing].reshape(len(standing), BANDS, ROWS).astype(np.uint64) * _BAND_MIX
        ).sum(axis=2, dtype=np.uint64)
    check()
    earlier_all, later_all = _pairs_sharing_a_band(keys)
    needed = math.ceil(threshold * PERMUTATIONS - 1e-9)
    for start in range(0, len(later_all), _CHUNK_PAIRS):
        earlier = standing[earlier_all[start : start + _CHUNK_PAIRS]]
        later = standing[later_all[start : start + _CHUNK_PAIRS]]
        agree = (sigs[earlier] == sigs[later]).sum(axis=1)
        flags[later[agree >= needed]] = True
        check()
    return flags.tolist()
