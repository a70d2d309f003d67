"""Training state to disk and back: everything needed to continue at the next iteration exactly.

Weights, centers, optimizer, grad scaler, RNG streams and the loader position; one file for a lone process, a
sharded DCP checkpoint under any process group (readable at another world size). Takes plain values (output
directory, checkpoints to keep), not the config.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from dinov2.distributed import parallel
from dinov2.distributed.env import DistEnv, all_reduce_min, barrier
from dinov2.models.student_teacher import StudentTeacher
from dinov2.train.checkpoint import (
    STATE_FILE,
    capture_rng_state,
    is_sharded_checkpoint,
    list_valid_checkpoints,
    load_extras,
    load_sharded_checkpoint,
    quarantine_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from dinov2.weights.arch import spec_of_module

logger = logging.getLogger("dinov2")


def save_training_state(model, optimizer, scaler, iteration: int, images_skipped: dict, output_dir: str | Path,
                        max_to_keep: int, env: DistEnv) -> None:
    """Everything needed to continue at ``iteration + 1`` exactly: weights, centers, optimizer, scaler, RNG, data.

    With a process group (any strategy) every rank writes a sharded DCP checkpoint; a lone process writes one file.
    Both record the backbone architecture (``backbone_spec``), which every weights loader rebuilds the model from.

    Args:
        output_dir: the run's directory (``train.output_dir``); checkpoints go to its ``checkpoints/``.
        max_to_keep: periodic checkpoints retained (``train.max_to_keep``).
    """
    # a distillation checkpoint holds several students (keys <name>__backbone): each student's export records its own
    record = {"backbone_spec": spec_of_module(model.teacher["backbone"]).to_record()} if "backbone" in model.teacher \
        else {}
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        extras = {
            "iteration": iteration,
            "world_size": env.world_size,
            "rng": capture_rng_state(),
            "loader": {"next_batch": iteration + 1},  # the global batch index: valid at any world size
            "images_skipped": images_skipped,
            "scaler": scaler.state_dict() if scaler is not None else {},
            **record,
        }
        save_sharded_checkpoint(output_dir, iteration, {"model": model_state, "optimizer": optimizer_state},
                                extras, env.rank, max_to_keep)
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "rng": capture_rng_state(),
        "loader": {"next_batch": iteration + 1},
        "images_skipped": images_skipped,
        **record,
    }
    save_checkpoint(output_dir, iteration, state, max_to_keep)


def restore_training_state(path: Path, model: StudentTeacher, optimizer: torch.optim.Optimizer,
                           scaler: torch.amp.GradScaler | None, env: DistEnv) -> dict:
    """Loads a checkpoint of either layout into ``model`` (plain, DDP-wrapped or FSDP-sharded) at any world size.

    Returns:
        ``iteration``, ``images_skipped`` and ``rng``: this rank's saved RNG state, or None when the checkpoint was
        written at another world size (the caller reseeds).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if is_sharded_checkpoint(path):
        model_state, optimizer_state = get_state_dict(model, optimizer)  # templates: this run's sharding
        state = {"model": model_state, "optimizer": optimizer_state}
        load_sharded_checkpoint(path, state)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        extras, _ = load_extras(path, env.rank, env.world_size)
    else:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        logger.info("resuming from %s (iteration %d)", path, state["iteration"])
        if parallel.is_sharded(model):
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=named_optimizer_state(model, optimizer, state["optimizer"]),
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        # One process wrote this file: its RNG state continues only a run of one process.
        extras = {**state, "rng": state.get("rng") if env.world_size == 1 else None}
    if scaler is not None and extras.get("scaler"):
        scaler.load_state_dict(extras["scaler"])
    return extras


def restore_newest_loadable(output_dir: Path, model: StudentTeacher, optimizer: torch.optim.Optimizer,
                            scaler: torch.amp.GradScaler | None, env: DistEnv) -> dict | None:
    """:func:`restore_training_state` from the newest committed checkpoint that loads, newest first.

    A checkpoint that fails (a file truncated or corrupted after its commit) is renamed ``iter_<n>.corrupt`` by
    rank 0, never deleted, with a warning; all ranks agree on each attempt, so they resume from the same one.

    Returns:
        The extras of the restored checkpoint, or None when there is no committed checkpoint.

    Raises:
        ValueError: when committed checkpoints exist but none loads (nothing is silently restarted from scratch).
    """
    candidates = list(reversed(list_valid_checkpoints(output_dir)))
    failures = []
    for _, path in candidates:
        reason = ""
        try:
            if not is_sharded_checkpoint(path):
                verify_checkpoint(path)
            extras = restore_training_state(path, model, optimizer, scaler, env)
        except (RuntimeError, ValueError, OSError, EOFError, KeyError, pickle.UnpicklingError) as error:
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        if all_reduce_min(not reason, env) >= 1:
            if failures:
                logger.warning("resumed from %s, the newest loadable checkpoint", path)
            return extras
        failures.append(path.name)
        logger.warning("checkpoint %s cannot be loaded (%s); trying the previous one", path, reason or "other rank")
        barrier(env)  # every rank is done reading it before it moves
        if env.is_main:
            moved = quarantine_checkpoint(path)
            logger.warning("kept the unloadable checkpoint as %s", moved)
        barrier(env)
    if failures:
        raise ValueError(f"no checkpoint in {output_dir} loads ({', '.join(failures)} failed, kept as *.corrupt); "
                         "move them away and rerun to start afresh")
    return None


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, plain: dict) -> dict:
    """``optimizer.state_dict()`` (parameters numbered by position) re-keyed by parameter name, the form
    ``set_optimizer_state_dict`` takes. Valid because every strategy builds the same groups in the same order."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[index]: value for index, value in plain["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in plain["param_groups"]],
    }
