"""CLI `python -m data_pipeline.curate`: load the config, run the listed stages in order, skip finished ones."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.cluster import cluster, retrieve
from data_pipeline.core import artifacts
from data_pipeline.core.config import CurateConfig, check_paths, config_to_yaml, describe_keys, load_config
from data_pipeline.core.executors import SliceFailure
from data_pipeline.core.stage import Stage, StageContext, StageResult, run_stage
from data_pipeline.dedup import copy_dedup, decontaminate, exact, near_dedup, phash
from data_pipeline.embed import embed
from data_pipeline.ingest import decode, ingest
from data_pipeline.output import report, shards
from dinov2.io.errors import describe_os_error
from dinov2.io.lock import DirectoryLock, DirectoryLockedError

# The pipeline is this list, in data-flow order: each stage reads the artifacts of stages to its left.
STAGES: list[Stage] = [
    ingest.STAGE, decode.STAGE, exact.STAGE, phash.STAGE, near_dedup.STAGE,  # hash-level dedup (no models)
    embed.COPY_STAGE, copy_dedup.STAGE, decontaminate.STAGE,  # copy-detection dedup, evaluation decontamination
    embed.SSL_STAGE, cluster.STAGE, retrieve.STAGE,  # self-supervised retrieval
    shards.STAGE, report.STAGE,  # outputs
]
STAGE_NAMES = [s.name for s in STAGES]


def select_stages(names: list[str]) -> list[Stage]:
    """Stages to run, in pipeline order; all when `names` is empty. ValueError on an unknown name."""
    unknown = [n for n in names if n not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {','.join(STAGE_NAMES)}")
    return [s for s in STAGES if not names or s.name in names]


def format_summary(results: list[StageResult]) -> str:
    """Fixed-width table: stage, status, inputs, outputs, rejects, seconds."""
    lines = [f"{'stage':<14} {'status':<8} {'inputs':>8} {'outputs':>8} {'rejects':>8} {'seconds':>8}"]
    for r in results:
        status = "FAILED" if r.failed_shards else ("skipped" if r.skipped else "done")
        rej = sum(r.counts.get("rejects", {}).values())
        lines.append(
            f"{r.name:<14} {status:<8} {r.counts.get('inputs', 0):>8} {r.counts.get('outputs', 0):>8} "
            f"{rej:>8} {r.seconds:>8.2f}"
        )
    return "\n".join(lines)


def curate(cfg: CurateConfig, output_dir: str | Path, stages: list[str] | None = None) -> list[StageResult]:
    """Run the selected stages (default: cfg.stages, else all) into `output_dir`.

    Returns:
        One StageResult per stage run or skipped; stops at the first stage with failed shards.
    """
    selected = select_stages(list(stages or cfg.stages))
    # Every path the run will read is checked before anything runs: a missing eval set or model must not cost
    # the hours of the stages before it.
    check_paths(cfg, [s.name for s in selected])
    out = Path(output_dir)
    with DirectoryLock(out, "curation run"):  # a second run on the same folder refuses, naming this one
        text = config_to_yaml(cfg)
        cfg_path = out / "config.yaml"
        if not cfg_path.is_file() or cfg_path.read_text() != text:
            artifacts.write_bytes_atomic(cfg_path, text.encode())
        ctx = StageContext(cfg, out)
        results = []
        for stage in selected:
            result = run_stage(stage, ctx)
            results.append(result)
            if result.failed_shards:
                break
    return results


def build_parser() -> argparse.ArgumentParser:
    """Argument parser; `--help` lists stages and every config key with its default."""
    epilog = "stages (in order): " + ", ".join(STAGE_NAMES) + "\n\nconfig keys (key=value):\n  "
    epilog += "\n  ".join(describe_keys())
    p = argparse.ArgumentParser(
        prog="python -m data_pipeline.curate",
        description="Curate images LVD-style: ingest, safe decode, exact and perceptual-hash dedup, copy-detection "
        "dedup, evaluation-set decontamination, self-supervised embeddings, k-means, retrieval, WebDataset shards "
        "and an HTML report.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML with differences from the defaults (configs/curate/*.yaml)")
    p.add_argument("--output-dir", required=True, help="output root; one sub-folder per stage")
    p.add_argument("--stages", default="", help="comma-separated subset of stages to run")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. hash.threshold=6")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry. Exit codes: 0 ok, 1 shards or global-stage slices failed after retries, 2 config/usage error (one
    line, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        names = [s for s in args.stages.split(",") if s]
        select_stages(names)
        results = curate(cfg, args.output_dir, names)
    except (ValueError, DirectoryLockedError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output folder is a file, read-only or full
        print(f"error: {describe_os_error(exc, args.output_dir)}", file=sys.stderr)
        return 1
    except SliceFailure as exc:  # array tasks of a global stage kept failing; the finished slices are kept
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(results))
    failed = [(r.name, r.failed_shards) for r in results if r.failed_shards]
    if failed:
        print(f"failed shards after retries: {failed}; re-run to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
