"""Union-find, the representative rule, chain-free grouping, giant components, Faiss Hamming search vs brute force."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline.core import artifacts
from data_pipeline.core.config import HashConfig, load_config
from data_pipeline.core.stage import StageContext, run_stage
from data_pipeline.dedup.groups import (
    connected_labels,
    giant_limit,
    greedy_representatives,
    group_pairs,
    pick_representatives,
    split_giants,
)
from data_pipeline.dedup.near_dedup import STAGE as NEAR_STAGE
from data_pipeline.dedup.near_dedup import near_pairs
from data_pipeline.dedup.phash import FLAG_HASHED


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


def test_representative_rule_largest_then_first_listed():
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([100, 400, 400, 10, 10, 1])
    listed = np.array([5, 4, 3, 0, 2, 1])
    assert pick_representatives(labels, pixels, listed).tolist() == [2, 2, 2, 3, 3, 5]


# ------------------------------------------------------------------------------- chain-free grouping


def _sequential_greedy(n: int, edges: dict[tuple[int, int], float], rank: np.ndarray) -> list[int]:
    """Reference: walk nodes best first; a node is kept unless a kept node is adjacent; others join the closest
    adjacent kept node (ties: the better one)."""
    adj: dict[int, dict[int, float]] = {k: {} for k in range(n)}
    for (a, b), c in edges.items():
        adj[a][b] = adj[b][a] = c
    kept: set[int] = set()
    for v in np.argsort(rank):
        if not any(u in kept for u in adj[int(v)]):
            kept.add(int(v))
    return [v if v in kept else max((u for u in adj[v] if u in kept), key=lambda u: (adj[v][u], -rank[u]))
            for v in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_representatives_match_the_sequential_rule(seed):
    rng = np.random.default_rng(seed)
    n = 120
    pairs = {tuple(sorted(p)) for p in rng.integers(0, n, (260, 2)).tolist() if p[0] != p[1]}
    edges = {p: float(rng.integers(0, 5)) for p in sorted(pairs)}  # few distinct closeness values: ties happen
    i, j = (np.array([p[k] for p in edges], dtype=np.int64) for k in (0, 1))
    rank = rng.permutation(n)
    rep = greedy_representatives(n, i, j, np.array(list(edges.values())), rank)
    assert rep.tolist() == _sequential_greedy(n, edges, rank)
    adjacent = set(edges) | {(b, a) for a, b in edges}
    for v, r in enumerate(rep.tolist()):
        assert r == v or ((v, r) in adjacent and rep[r] == r)  # removed only in favour of an adjacent kept node


def test_chain_never_removes_c_in_favour_of_a():
    # a~b and b~c within the threshold, a~c beyond it; a is the best image.
    rep = greedy_representatives(3, np.array([0, 1]), np.array([1, 2]), np.array([-3, -3]), np.array([0, 1, 2]))
    assert rep.tolist() == [0, 0, 2]
    # Union-find components would have merged all three under a.
    assert connected_labels(3, np.array([0, 1]), np.array([1, 2])).tolist() == [0, 0, 0]


def test_giant_limit_is_relative_to_the_pool():
    assert giant_limit(3000, 0.01, 32) == 32 and giant_limit(100_000, 0.01, 32) == 1000
    assert giant_limit(10, 0.5, 2) == 5


def _star_with_chain() -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Nodes 0..9 one component: a tight pair 0-1 (level 1), a tight triple 2-3-4 (level 1), all joined by a hub
    5 through loose edges (level 6), and a loose chain 5-6-7-8-9 (level 5)."""
    e = [(0, 1, 1), (2, 3, 1), (3, 4, 1), (2, 4, 1), (5, 0, 6), (5, 2, 6), (5, 6, 5), (6, 7, 5), (7, 8, 5), (8, 9, 5)]
    i, j, lv = (np.array([x[k] for x in e], dtype=np.int64) for k in range(3))
    return 10, i, j, lv


def test_split_giants_tightens_only_oversize_components():
    n, i, j, lv = _star_with_chain()
    keep, rep = split_giants(n, i, j, lv, limit=4, action="split")
    # Level 6 goes first (pieces {0,1}, {2,3,4}, {5..9} of 5 > 4), then level 5 in the remaining oversize piece.
    assert keep.tolist() == [True] * 4 + [False] * 6
    assert rep.components == [{"row": 0, "size": 10, "largest_piece": 3}]
    assert rep.dropped_edges == 6
    keep, _ = split_giants(n, i, j, lv, limit=10, action="split")
    assert keep.all()  # not giant: untouched


def test_split_giants_keeps_floor_level_edges_and_flag_drops_all():
    n = 40
    i, j = np.zeros(n - 1, dtype=np.int64), np.arange(1, n, dtype=np.int64)  # 39 identical copies of node 0
    keep, rep = split_giants(n, i, j, np.zeros(n - 1, dtype=np.int64), limit=10, action="split")
    assert keep.all() and rep.components[0]["largest_piece"] == 40  # identical hashes are never split
    keep, rep = split_giants(n, i, j, np.zeros(n - 1, dtype=np.int64), limit=10, action="flag")
    assert not keep.any() and rep.as_dict()["count"] == 1 and rep.dropped_edges == n - 1


def test_group_pairs_summary():
    n, i, j, lv = _star_with_chain()
    g = group_pairs(n, i, j, -lv, lv, np.arange(n), limit=4, action="split")
    assert g.summary["largest"] == [10] and g.summary["giant"]["count"] == 1
    assert g.rep.tolist() == [0, 0, 2, 2, 2, 5, 6, 7, 8, 9]
    assert g.summary["groups"]["histogram"] == {"1": 5, "2": 1, "3": 1}


@pytest.mark.parametrize("key,value", [("giant_fraction", 0.0), ("giant_fraction", 1.5), ("giant_min_size", 1),
                                       ("giant_action", "delete")])
def test_giant_config_is_validated(key, value):
    for section in ("hash", "copy_dedup"):
        with pytest.raises(ValueError, match=f"{section}.{key}"):
            load_config(None, [f"{section}.{key}={value}"])


def _near_upstream(out: Path, hashes: list[int], pixels: list[int]) -> None:
    """A committed exact_dedup manifest (all rows ok and kept) and phash outputs for the given hashes."""
    n = len(hashes)
    manifest = pa.table({
        "id": [f"id-{k}" for k in range(n)], "path": [f"/x/{k}.png" for k in range(n)],
        "width": pa.array(pixels, pa.int64()), "height": pa.array([1] * n, pa.int64()),
        "status": ["ok"] * n, "dup_group": pa.array(range(n), pa.int64()), "dup_of": [""] * n,
        "dup_kind": [""] * n, "keep": [True] * n,
    })
    artifacts.write_parquet_atomic(out / "exact_dedup" / "manifest.parquet", manifest)
    artifacts.commit_stage(out / "exact_dedup", "fp-exact", ["manifest.parquet"], {})
    artifacts.write_npy_atomic(out / "phash" / "phash.npy", np.array(hashes, dtype=np.uint64))
    artifacts.write_npy_atomic(out / "phash" / "phash_flags.npy", np.full(n, FLAG_HASHED, dtype=np.uint8))
    artifacts.commit_stage(out / "phash", "fp-phash", ["phash.npy", "phash_flags.npy"], {})


def _bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


def test_near_dedup_stage_chain_and_giant(tmp_path):
    base = 0x0F0F_0F0F_0F0F_0F0F
    # a (largest) ~ b at 3 bits, b ~ c at 3 other bits, a ~ c at 6 > threshold 4; d is an exact copy of b's hash.
    a, b, c = base, base ^ _bits(0, 1, 2), base ^ _bits(0, 1, 2, 8, 9, 10)
    far = [base ^ _bits(*range(20 + 4 * k, 24 + 4 * k), 60 - k) for k in range(8)]  # >= 5 bits from everything
    _near_upstream(tmp_path, [a, b, c, b, *far], [300, 200, 100, 50] + [10] * 8)
    cfg = load_config(None, ["hash.threshold=4", "hash.threads=1"])
    res = run_stage(NEAR_STAGE, StageContext(cfg, tmp_path))
    rows = artifacts.read_table(tmp_path / "near_dedup" / "manifest.parquet").to_pylist()
    assert [r["keep"] for r in rows[:4]] == [True, False, True, False]
    # d is 3 bits from both kept images a and c: the tie goes to the better one, a.
    assert rows[1]["dup_of"] == "id-0" and rows[3]["dup_of"] == "id-0"
    assert rows[2]["dup_kind"] == "" and all(r["keep"] for r in rows[4:])
    comps = json.loads((tmp_path / "near_dedup" / "components.json").read_text())
    assert comps["largest"][0] == 4 and comps["giant"]["count"] == 0 and res.counts["removed"] == {"near": 2}
    # A pool-relative giant limit of 2 (fraction 0.1 of 12): the 4-image component is split by dropping its 3-bit
    # edges; only b~d (identical hashes) is left, so d is removed in favour of b and nothing else.
    cfg = load_config(None, ["hash.threshold=4", "hash.threads=1", "hash.giant_fraction=0.1", "hash.giant_min_size=2"])
    res = run_stage(NEAR_STAGE, StageContext(cfg, tmp_path))
    comps = json.loads((tmp_path / "near_dedup" / "components.json").read_text())
    assert comps["giant"]["limit"] == 2 and comps["giant"]["largest"] == [{"row": 0, "size": 4, "largest_piece": 2}]
    assert res.counts["giant_components"] == 1 and res.counts["removed"] == {"near": 1}
    rows = artifacts.read_table(tmp_path / "near_dedup" / "manifest.parquet").to_pylist()
    assert [r["keep"] for r in rows[:4]] == [True, True, True, False] and rows[3]["dup_of"] == "id-1"


def test_a_revised_rule_redoes_the_stage(tmp_path):
    # An output written under an earlier rule revision is redone, not skipped; the same revision is skipped.
    hashes = [0x0F0F_0F0F_0F0F_0F0F ^ (1 << k) for k in range(3)]
    _near_upstream(tmp_path, hashes, [100, 100, 100])
    cfg = load_config(None, ["hash.threshold=4", "hash.threads=1"])
    ctx = StageContext(cfg, tmp_path)
    assert not run_stage(NEAR_STAGE, ctx).skipped
    first = json.loads((tmp_path / "near_dedup" / "_SUCCESS.json").read_text())["fingerprint"]
    assert run_stage(NEAR_STAGE, ctx).skipped
    revised = dataclasses.replace(NEAR_STAGE, rules=NEAR_STAGE.rules + 1)
    assert not run_stage(revised, ctx).skipped
    assert json.loads((tmp_path / "near_dedup" / "_SUCCESS.json").read_text())["fingerprint"] != first
    assert run_stage(revised, ctx).skipped
