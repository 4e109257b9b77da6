"""MinHash signatures and LSH banding for near-duplicate detection, in plain numpy.

A text becomes the set of its character ``k``-shingles (characters rather than words so Chinese and Thai,
which have no spaces, work too); the fraction of equal MinHash values of two signatures estimates the
Jaccard similarity of their shingle sets. LSH splits a signature into bands: texts that agree on a whole
band become candidates, which are then checked against the threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

_WS_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form of ``text``."""
    return _WS_RE.sub(" ", text.casefold()).strip()


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads every input bit over the output (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the ``k``-character shingles of normalized ``text``."""
    codes = np.frombuffer(normalize(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if codes.size < k:
        codes = np.concatenate([codes, np.zeros(k - codes.size, dtype=np.uint64)])
    windows = np.lib.stride_tricks.sliding_window_view(codes, k)
    h = np.zeros(windows.shape[0], dtype=np.uint64)
    for i in range(k):
        h = _mix64(h ^ windows[:, i])
    return np.unique(h >> np.uint64(32))


@dataclass
class MinHasher:
    """``num_perm`` hash functions over character ``k``-shingles, fixed by ``seed``."""

    num_perm: int = 128
    seed: int = 0
    k: int = 5
    _seeds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._seeds = rng.integers(0, np.iinfo(np.uint64).max, size=self.num_perm, dtype=np.uint64, endpoint=True)

    def signature(self, text: str) -> np.ndarray:
        """``num_perm`` minimum hashes (all-max for a text without shingles).

        Permutation ``i`` is ``mix64(x ^ seed_i)``: a full-avalanche 64-bit hash. (Linear ``a·x + b mod p``
        with 32-bit ``a`` wraps the modulus only a few times and orders shingles alike across permutations,
        which biases the estimate upwards.)
        """
        x = shingle_hashes(text, self.k)
        if x.size == 0:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        return _mix64(x[:, None] ^ self._seeds[None, :]).min(axis=0)


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows == num_perm`` whose S-curve midpoint ``(1/b)^(1/r)`` sits just
    below ``threshold`` (so pairs at the threshold are very likely candidates)."""
    options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    below = [(b, r) for b, r in options if (1 / b) ** (1 / r) <= threshold]
    if not below:
        return options[-1]
    return max(below, key=lambda br: (1 / br[0]) ** (1 / br[1]))


class NearDuplicateIndex:
    """Signatures seen so far; :meth:`add` tells whether a new text is a near duplicate of one of them."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 0, k: int = 5) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.hasher = MinHasher(num_perm=num_perm, seed=seed, k=k)
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._sigs: list[np.ndarray] = []
        self._keys: list[str] = []

    def add(self, key: str, text: str) -> tuple[str, float] | None:
        """Index ``text`` under ``key`` unless it is a near duplicate: then return ``(other key, similarity)``."""
        sig = self.hasher.signature(text)
        bands = [sig[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        seen: set[int] = set()
        for band, bucket in zip(bands, self._buckets):
            for j in bucket.get(band, ()):
                if j in seen:
                    continue
                seen.add(j)
                sim = similarity(sig, self._sigs[j])
                if sim >= self.threshold:
                    return self._keys[j], sim
        idx = len(self._sigs)
        self._sigs.append(sig)
        self._keys.append(key)
        for band, bucket in zip(bands, self._buckets):
            bucket.setdefault(band, []).append(idx)
        return None
