"""``make demo``: the whole system on an embedded crawl of real photographs, on a laptop-class CPU.

1. builds a crawl of ~1,750 images from the photographs inside scikit-image / scikit-learn (views, near-copies,
   distractors, planted copies of an evaluation set; ground truth in ``demo_out/data/truth.json``);
2. bootstraps a small self-supervised ViT on the raw crawl (``python -m dinov2.train``): the retrieval embedder,
   as the paper's pipeline used a self-supervised ViT (copy detection uses an SSCD-contract stand-in,
   ``demo/copy_descriptor.py``, since SSCD weights do not ship offline);
3. curates the crawl with every stage (``python -m data_pipeline.curate``): hash dedup, copy-detection dedup,
   decontamination of the held-out evaluation folder, k-means, sample- and cluster-based retrieval, shards, report;
4. trains on the curated shards (``python -m dinov2.train``) starting from the bootstrap model;
5. prints the funnel, dedup precision/recall per level against the ground truth (for the pipeline's chain-free
   grouping and, recomputed from the same artifacts, the former connected-components rule; ``demo/dedup_eval.py``)
   and kNN top-1 before/after training.

Every step is resumable: re-running reuses the crawl, finished training runs and finished curation stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from data_pipeline.core.config import load_config
from demo.copy_descriptor import build_copy_descriptor
from demo.crawl import build_crawl
from demo.dedup_eval import compare

OUT = Path("demo_out").resolve()
DATA = OUT / "data"
REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "configs" / "train" / "demo_cpu.yaml"
CURATE_CONFIG = REPO / "configs" / "curate" / "demo.yaml"
BOOTSTRAP_ITERS, CURATED_ITERS = 120, 120


def run(step: str, cmd: list[str]) -> None:
    """Run one of the project's CLIs with its output streamed; stop the demo if it fails."""
    print(f"\n[demo] {step}\n[demo] $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"[demo] step failed: {step}")


def train(output_dir: Path, dataset: str, iters: int, extra: list[str]) -> Path:
    """``python -m dinov2.train`` with the demo config; returns the teacher backbone export of the last iteration."""
    run(f"training {output_dir.name} ({iters} iterations)", [
        sys.executable, "-m", "dinov2.train", "--config-file", str(TRAIN_CONFIG), "--output-dir", str(output_dir),
        f"train.dataset_path={dataset}", f"train.max_iter={iters}", f"evaluation.eval_period_iterations={iters}",
        *extra,
    ])
    return output_dir / "eval" / f"training_{iters - 1}" / "teacher_backbone_hub.pth"


def knn_table(weights: dict[str, Path | None]) -> dict[str, float]:
    """kNN top-1 (k = 20) on the held-out evaluation folder, per model (None = the demo ViT at random init)."""
    import torch

    from dinov2.config import load_config
    from dinov2.eval.knn import evaluate_knn
    from dinov2.train.train import build_student_teacher
    from dinov2.weights import load_backbone

    out = {}
    for name, path in weights.items():
        if path is None:
            torch.manual_seed(0)
            model = build_student_teacher(load_config(str(TRAIN_CONFIG), [])).teacher["backbone"]
        else:
            model = load_backbone(path)
        out[name] = evaluate_knn(model, DATA / "knn_train", DATA / "eval", image_size=64, ks=(20,))["top1"]["20"]
    return out


def main() -> int:
    start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    print(f"[demo] building the crawl in {DATA}", flush=True)
    records = build_crawl(DATA)
    kinds = Counter(r.transform for r in records)
    print(f"[demo] {len(records)} crawl images: {dict(kinds)}; families {dict(Counter(r.family for r in records))}")

    bootstrap = train(OUT / "bootstrap", str(DATA / "crawl"), BOOTSTRAP_ITERS, [])

    copy_model = build_copy_descriptor(OUT / "models" / "copy_descriptor.torchscript.pt")
    curated = OUT / "curated"
    seeds = DATA / "seeds"
    run("curating the crawl with every stage", [
        sys.executable, "-m", "data_pipeline.curate", "--config", str(CURATE_CONFIG), "--output-dir", str(curated),
        f"ingest.sources=[{DATA / 'crawl'}]", f"embed.copy_model={copy_model}", f"embed.ssl_model={bootstrap}",
        f"decontaminate.eval_sets=[eval={DATA / 'eval'}]",
        f"retrieve.seed_sets=[{{name: sample_set, sources: [{seeds / 'sample_set'}], mode: sample, n_neighbors: 8}},"
        f"{{name: cluster_set, sources: [{seeds / 'cluster_set'}], mode: cluster, per_cluster: 80}},"
        f"{{name: seeds_as_is, sources: [{seeds}], mode: as_is}}]",
    ])

    index_bytes = (curated / "shards" / "index.json").read_bytes()
    index = json.loads(index_bytes)
    # One training run per shard set: changed curation settings give new shards and a fresh run, not a stale resume.
    run_dir = OUT / f"curated_train_{hashlib.sha256(index_bytes).hexdigest()[:8]}"
    final = train(run_dir, str(curated / "shards" / index["pattern"]), CURATED_ITERS,
                  [f"train.init_from={bootstrap}", "train.init_heads=fresh", "train.head_warmup_iters=10"])

    print("\n[demo] kNN evaluation (k = 20) on the held-out folder", flush=True)
    knn = knn_table({"random init": None, "bootstrap (raw crawl)": bootstrap, "+ curated shards": final})

    def count(stage: str) -> int:
        return json.loads((curated / stage / "stats.json").read_text())["outputs"]

    decon = pq.read_table(curated / "decontaminate" / "manifest.parquet").to_pylist()
    planted = {r.file for r in records if r.transform == "eval_copy"}
    flagged = {Path(row["path"]).name for row in decon if row["contaminated_by"]}
    selected = pq.read_table(curated / "retrieve" / "selected.parquet").num_rows

    print("\n[demo] results")
    print(f"  {'crawl':<28} {len(records):>6}")
    for label, stage in (("decoded", "decode"), ("after exact dedup", "exact_dedup"),
                         ("after pHash near dedup", "near_dedup"), ("after copy-detection dedup", "copy_dedup"),
                         ("after decontamination", "decontaminate")):
        print(f"  {label:<28} {count(stage):>6}")
    print(f"  {'retrieved (selected)':<28} {selected:>6}")
    print(f"  {'in shards':<28} {index['nsamples']:>6}"
          f"  ({len(index['shardlist'])} tars)")
    copy_cfg = load_config(CURATE_CONFIG, []).copy_dedup
    print(f"\n  {'dedup vs ground truth':<22} {'former rule (components)':>28}   {'chain-free groups':>28}")
    print(f"  {'':<22} {'removed':>9} {'precision':>9} {'recall':>8}   {'removed':>9} {'precision':>9} {'recall':>8}")
    for label, before, after in compare(records, curated, copy_cfg.k, copy_cfg.threshold):
        cells = "   ".join(f"{n:>9} {p:>9.1%} {r:>8.1%}" for p, r, n in (before, after))
        print(f"  {label:<22} {cells}")
    print(f"  decontamination: {len(planted & flagged)}/{len(planted)} planted evaluation copies removed, "
          f"{len(flagged - planted)} other crawl images in the components they touched")
    print(f"\n  {'kNN top-1 (k=20)':<28} {'':>6}")
    for name, value in knn.items():
        print(f"  {name:<28} {value:>5.1f}%")
    print(f"\n  report: {curated / 'report' / 'report.html'}")
    print(f"  shards: {curated / 'shards'}; trained teacher: {final}")
    print(f"  outputs in {OUT}  ({(time.perf_counter() - start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
