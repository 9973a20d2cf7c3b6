"""Join images into clusters: copies of one film and films of one patient belong together.

Links, as in the developer set's README: a candidate pair whose 64-bit dHashes differ in at most
6 bits, confirmed when their 4096-bit dHashes differ in at most 16 % of the bits (the 64-bit
rule alone chains most chest X-rays into one cluster); identical pixels; the same patient id.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from cxrbatch.databuild.hashing import POPCOUNT, hamming

CANDIDATE_BITS = 6
CONFIRM_SHARE = 0.16


class UnionFind:
    """Disjoint sets over 0..n-1; every root is the smallest index of its set (stable names)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        """The root of i's set."""
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        """Join the sets of a and b."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[int]:
        """The root of every element."""
        return [self.find(i) for i in range(len(self.parent))]


def near_duplicate_pairs(h64: np.ndarray, h4096: np.ndarray) -> list[tuple[int, int]]:
    """Index pairs (i < j) of near-duplicate images, from their 64-bit and packed 4096-bit dHashes."""
    h64 = np.asarray(h64, dtype=np.uint64)
    limit = int(CONFIRM_SHARE * h4096.shape[1] * 8)
    pairs = []
    for i in range(len(h64) - 1):
        xor = np.bitwise_xor(h64[i + 1 :], h64[i]).view(np.uint8).reshape(-1, 8)
        close = np.flatnonzero(POPCOUNT[xor].sum(axis=1) <= CANDIDATE_BITS) + i + 1
        if close.size:
            confirmed = close[hamming(h4096[close], h4096[i]) <= limit]
            pairs += [(i, int(j)) for j in confirmed]
    return pairs


def link_groups(groups: Iterable[list[str]], uf: UnionFind) -> None:
    """Join elements through any of their keys (an element may have several patient ids)."""
    first: dict[str, int] = {}
    for i, keys in enumerate(groups):
        for key in keys:
            if key:
                uf.union(first.setdefault(key, i), i)
