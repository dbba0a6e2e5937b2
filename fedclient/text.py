"""Text on the device: turn messages into fixed-size feature vectors without a vocabulary.

A federated text model cannot ship a vocabulary built from everyone's data, so
each device hashes its own tokens (the "hashing trick", Weinberger et al. 2009):
lower-cased word unigrams and bigrams, each hashed with CRC-32 (stable across
processes and machines, unlike Python's ``hash``) into one of ``dims`` buckets
with a hashed sign, then ``log1p`` of the counts and an L2-normalised row.

    x = fedclient.text.hash_features(["Free entry in 2 a wkly comp", "Ok lar..."], dims=4096)
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterable

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = ["hash_features", "tokens"]

_TOKEN = re.compile(r"[a-z0-9£$€']+|[!?]")


def tokens(text: str) -> list[str]:
    """Lower-cased word tokens, plus ``!`` and ``?`` (they carry signal in short texts)."""
    return _TOKEN.findall(text.lower())


def hash_features(texts: Iterable[str], dims: int = 4096) -> np.ndarray:
    """A (n, dims) float32 matrix of signed, hashed unigram and bigram counts."""
    if dims < 2:
        raise InvalidInput("dims must be at least 2")
    rows = list(texts)
    out = np.zeros((len(rows), dims), dtype=np.float32)
    for i, text in enumerate(rows):
        if not isinstance(text, str):
            raise InvalidInput(f"text {i} is {type(text).__name__}, not a string")
        words = tokens(text)
        for gram in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
            h = zlib.crc32(gram.encode())
            out[i, h % dims] += 1.0 if (h >> 31) & 1 else -1.0
    out = np.sign(out) * np.log1p(np.abs(out))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out
