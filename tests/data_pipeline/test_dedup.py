"""Union-find groups, the representative rule, and Faiss Hamming search against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.core.config import HashConfig
from data_pipeline.dedup.groups import connected_labels, pick_representatives
from data_pipeline.dedup.near_dedup import near_pairs


def _brute_pairs(h: np.ndarray, t: int) -> set[tuple[int, int]]:
    x = np.bitwise_xor(h[:, None], h[None, :])
    d = np.unpackbits(x.view(np.uint8).reshape(len(h), len(h), 8), axis=2).sum(axis=2)
    i, j = np.nonzero(np.triu(d <= t, k=1))
    return set(zip(i.tolist(), j.tolist()))


def _planted_hashes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    for k in range(0, n // 2, 3):  # plant neighbours at 0..7 flipped bits
        bits = rng.choice(64, size=k % 8, replace=False)
        h[n // 2 + k] = h[k] ^ np.uint64(sum(1 << int(b) for b in bits))
    return h


@pytest.mark.parametrize("index", ["flat", "multihash"])
@pytest.mark.parametrize("threshold", [0, 3, 4, 6])
def test_near_pairs_exact_vs_brute_force(index, threshold):
    h = _planted_hashes(600, seed=threshold)
    i, j, d = near_pairs(h, HashConfig(threshold=threshold, index=index, threads=1))
    assert set(zip(i.tolist(), j.tolist())) == _brute_pairs(h, threshold)
    assert (d <= threshold).all() and (i < j).all()
    assert len(i) > 0


def test_connected_labels_vs_bfs():
    rng = np.random.default_rng(0)
    n = 300
    i, j = rng.integers(0, n, 200), rng.integers(0, n, 200)
    labels = connected_labels(n, i, j)
    adj = {k: set() for k in range(n)}
    for a, b in zip(i.tolist(), j.tolist()):
        adj[a].add(b)
        adj[b].add(a)
    for start in range(n):
        seen, todo = {start}, [start]
        while todo:
            for nb in adj[todo.pop()]:
                if nb not in seen:
                    seen.add(nb)
                    todo.append(nb)
        assert labels[start] == min(seen)  # root = smallest member: deterministic


def test_representative_rule_largest_then_smallest_id():
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([100, 400, 400, 10, 10, 1])
    ids = np.array(["c", "b", "a", "z", "y", "q"])
    assert pick_representatives(labels, pixels, ids).tolist() == [2, 2, 2, 4, 4, 5]
