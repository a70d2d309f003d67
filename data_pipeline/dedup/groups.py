"""Duplicate grouping shared by the dedup stages: union-find, the representative order, chain-free groups, giants.

Connected components of a "within threshold" graph chain unrelated images together (a~b and b~c put a and c in one
group however far apart they are), so the near-duplicate and copy-detection stages do not delete components. They
group by deterministic greedy representative assignment in the documented quality order (largest width*height, then
first listed: sources in config order, then path/member order, i.e. smallest row_id):

1. Walking the images best first, an image becomes a *representative* (kept) unless an earlier representative is
   within the threshold of it. This is the lexicographically-first maximal independent set of the graph in that
   order, so the best image of every component is always kept, as before.
2. Every other image is removed in favour of its *closest* adjacent representative (ties: the better one).

Every removed image is therefore within the threshold of the image it is removed in favour of; no image is removed
through a chain. A component whose images are all within the threshold of each other (the common case for real
copies) still keeps exactly one member.

Components larger than a share of the pool (`giant_limit`) come from chaining or from degenerate content rather than
from copies of one picture; `split_giants` tightens their internal edges level by level until each piece is under
the limit (`split`), or drops their edges so that nothing in them is removed (`flag`). Both are reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

GIANT_ACTIONS = ("split", "flag")
LARGEST_REPORTED = 20


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


def quality_rank(pixels: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """Position of each node in the documented order: largest width*height first, then first listed.

    Ties go to the listing position (the ingest row_id: sources in config order, then path/member order), not to the
    id: ids hash the source spec, so the same crawl mounted at another path would keep other members of a tie and
    curate a different set. A user can also list a trusted source first to have it win ties.

    Args:
        pixels: int64 [n] width*height per node.
        listed: int64 [n] listing position per node (distinct).

    Returns:
        int64 [n], a permutation of 0..n-1 (0 = best).
    """
    n = pixels.shape[0]
    order = np.lexsort((np.asarray(listed, dtype=np.int64), -pixels.astype(np.int64)))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n, dtype=np.int64)
    return rank


def pick_representatives(labels: np.ndarray, pixels: np.ndarray, listed: np.ndarray) -> np.ndarray:
    """The documented rule for equivalence classes (exact dedup): in each group keep the best node of `quality_rank`.

    Args:
        labels: int64 [n] group label per node.
        pixels: int64 [n] width*height per node.
        listed: int64 [n] listing position per node (row_id).

    Returns:
        int64 [n]: index of the kept member of each node's group.
    """
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((quality_rank(pixels, listed), labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    out = np.empty(n, dtype=np.int64)
    out[order] = order[first][np.cumsum(first) - 1]
    return out


def greedy_representatives(n: int, i: np.ndarray, j: np.ndarray, closeness: np.ndarray,
                           rank: np.ndarray) -> np.ndarray:
    """Chain-free groups: greedy representatives in `rank` order, each other node joins its closest adjacent one.

    Computed in parallel rounds that give the sequential result: an undecided node whose rank beats every undecided
    neighbour is a representative (its better neighbours are all non-representatives), and its undecided neighbours
    are then decided as members.

    Args:
        n: number of nodes.
        i, j: int64 [E] edges (pairs within the threshold), any order, no self-loops.
        closeness: [E] larger = closer (e.g. cosine, or minus the Hamming distance).
        rank: int64 [n] quality order (0 = best), e.g. from `quality_rank`.

    Returns:
        int64 [n]: the representative of each node (itself for representatives and isolated nodes); every node is
        adjacent to its representative.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    rep = np.arange(n, dtype=np.int64)
    if i.size == 0:
        return rep
    # Isolated nodes keep themselves; the rounds run on the nodes that have edges (local indices), so their cost
    # does not grow with the pool.
    nodes, local = np.unique(np.concatenate([i, j]), return_inverse=True)
    li0, lj0 = local[: i.size], local[i.size :]
    rank_l = np.asarray(rank, dtype=np.int64)[nodes]
    m = nodes.size
    undecided, is_rep = np.ones(m, dtype=bool), np.zeros(m, dtype=bool)
    li, lj = li0, lj0
    big = np.iinfo(np.int64).max
    while undecided.any():
        live = undecided[li] & undecided[lj]
        li, lj = li[live], lj[live]  # compacted: late rounds only touch the few edges still undecided
        best = np.full(m, big, dtype=np.int64)  # best rank among undecided neighbours
        np.minimum.at(best, li, rank_l[lj])
        np.minimum.at(best, lj, rank_l[li])
        new = undecided & (rank_l < best)
        is_rep |= new
        undecided &= ~new
        undecided[li[new[lj]]] = False
        undecided[lj[new[li]]] = False
    # Member -> adjacent representative candidates, both edge directions; pick max closeness, then the better rank.
    u = np.concatenate([li0, lj0])
    r = np.concatenate([lj0, li0])
    c = np.concatenate([closeness, closeness])
    cand = ~is_rep[u] & is_rep[r]
    u, r, c = u[cand], r[cand], c[cand]
    order = np.lexsort((rank_l[r], -c, u))
    u, r = u[order], r[order]
    first = np.ones(u.size, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    rep[nodes[u[first]]] = nodes[r[first]]
    assert first.sum() == (~is_rep).sum()  # every non-representative has an adjacent representative
    return rep


def giant_limit(pool_size: int, fraction: float, min_size: int) -> int:
    """Largest component size that is not giant: `fraction` of the pool, but never below `min_size`."""
    return max(int(min_size), math.ceil(fraction * pool_size))


@dataclass
class GiantReport:
    """What `split_giants` did: the limit, the giant components (row of their smallest node, size, largest piece
    left), and how many edges it dropped."""

    limit: int
    action: str
    components: list[dict] = field(default_factory=list)
    dropped_edges: int = 0

    def as_dict(self) -> dict:
        return {"limit": self.limit, "action": self.action, "count": len(self.components),
                "dropped_edges": self.dropped_edges, "largest": self.components[:LARGEST_REPORTED]}


def split_giants(n: int, i: np.ndarray, j: np.ndarray, level: np.ndarray, limit: int, action: str,
                 floor_level: int = 0) -> tuple[np.ndarray, GiantReport]:
    """Edges to keep after handling components with more than `limit` nodes.

    `split`: inside each oversize component, drop the edges at its loosest level, recompute the components, repeat
    until every piece fits or only edges at `floor_level` (as close as the measure allows: identical hashes, cosine
    ~1) are left. `flag`: drop every edge inside oversize components, so none of their members is removed.

    Args:
        level: int [E] looseness of each edge (e.g. the Hamming distance, or 1 - cosine in hundredths).

    Returns:
        (bool [E] edges kept, GiantReport).
    """
    if action not in GIANT_ACTIONS:
        raise ValueError(f"giant action must be one of {list(GIANT_ACTIONS)}, got {action!r}")
    report = GiantReport(limit=int(limit), action=action)
    keep = np.ones(i.size, dtype=bool)
    labels = connected_labels(n, i, j)
    sizes = np.bincount(labels, minlength=n)
    giants = np.flatnonzero(sizes > limit)
    if giants.size == 0:
        return keep, report
    in_giant = np.isin(labels[i], giants)
    if action == "flag":
        keep &= ~in_giant
    else:
        while True:
            lab = connected_labels(n, i[keep], j[keep])
            big = keep & (np.bincount(lab, minlength=n)[lab[i]] > limit) & (level > floor_level)
            if not big.any():
                break
            loosest = np.full(n, floor_level, dtype=np.int64)
            np.maximum.at(loosest, lab[i[big]], level[big].astype(np.int64))
            keep &= ~(big & (level == loosest[lab[i]]))
    report.dropped_edges = int((~keep).sum())
    piece = connected_labels(n, i[keep], j[keep])
    piece_sizes = np.bincount(piece, minlength=n)
    for g in giants[np.lexsort((giants, -sizes[giants]))]:
        members = labels == g
        report.components.append({"row": int(g), "size": int(sizes[g]),
                                   "largest_piece": int(piece_sizes[piece[members]].max())})
    return keep, report


def component_summary(labels: np.ndarray) -> dict:
    """Component-size histogram {size: count} (singletons included), the largest sizes and counts."""
    comp_sizes = np.bincount(labels) if labels.size else np.zeros(0, np.int64)
    comp_sizes = np.sort(comp_sizes[comp_sizes > 0])[::-1]
    sizes, counts = np.unique(comp_sizes, return_counts=True)
    return {
        "histogram": {str(int(s)): int(c) for s, c in zip(sizes, counts)},
        "largest": comp_sizes[:LARGEST_REPORTED].tolist(),
        "components": int((comp_sizes > 1).sum()),
        "singletons": int((comp_sizes == 1).sum()),
    }


@dataclass
class Grouping:
    """Result of `group_pairs`: representative per node, edges kept, and the summary written to components.json."""

    rep: np.ndarray
    kept_edges: np.ndarray
    summary: dict


def group_pairs(n: int, i: np.ndarray, j: np.ndarray, closeness: np.ndarray, level: np.ndarray, rank: np.ndarray,
                limit: int, action: str, floor_level: int = 0) -> Grouping:
    """The whole grouping of a dedup stage: giant handling, then greedy representatives on the remaining edges.

    Returns:
        Grouping with rep (int64 [n]), kept_edges (bool [E]) and summary: the threshold graph's components
        (histogram, largest: watch for chaining), the giant report and the size histogram of the final groups.
    """
    keep, giants = split_giants(n, i, j, level, limit, action, floor_level)
    rep = greedy_representatives(n, i[keep], j[keep], closeness[keep], rank)
    summary = component_summary(connected_labels(n, i, j))
    groups = component_summary(rep)
    summary["giant"] = giants.as_dict()
    summary["groups"] = {"histogram": groups["histogram"], "largest": groups["largest"]}
    return Grouping(rep=rep, kept_edges=keep, summary=summary)
