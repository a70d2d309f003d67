"""Union-find over edge lists and the representative rule shared by the exact and near-duplicate stages."""

from __future__ import annotations

import numpy as np


def connected_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of an undirected graph by vectorised union-find (hook to the smaller root + jumping).

    Args:
        n: number of nodes.
        i, j: int64 [E] edge endpoints.

    Returns:
        int64 [n]: each node's component root, the smallest node index in its component (deterministic).
    """
    parent = np.arange(n, dtype=np.int64)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    while i.size:
        ri, rj = parent[i], parent[j]
        lo, hi = np.minimum(ri, rj), np.maximum(ri, rj)
        diff = lo != hi
        if not diff.any():
            break
        np.minimum.at(parent, hi[diff], lo[diff])
        while True:  # path compression: every node points straight at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def pick_representatives(labels: np.ndarray, pixels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The documented rule: in each group keep the largest resolution (width*height), then the smallest id.

    Args:
        labels: int64 [n] group label per node.
        pixels: int64 [n] width*height per node.
        ids: str [n] stable item ids.

    Returns:
        int64 [n]: index of the kept member of each node's group.
    """
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    id_rank = np.argsort(np.argsort(ids, kind="stable"), kind="stable")
    order = np.lexsort((id_rank, -pixels.astype(np.int64), labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    out = np.empty(n, dtype=np.int64)
    out[order] = order[first][np.cumsum(first) - 1]
    return out
