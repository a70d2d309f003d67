"""Lazily applied EMA center of teacher logits ("centering"), shared by the DINO and iBOT losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class LazyEMACenter(nn.Module):
    """Base class holding ``center`` and a pending batch-center update, applied at the next teacher call.

    Update rule (official semantics, DINO v1 and v2)::

        c ← m · c + (1 − m) · S / N

    where S is the batch-center sum over all ranks and N the number of summed items over all ranks (rows for DINO,
    one token-mean per image group for iBOT). ``start_center_update`` stores (S_local, N_local), all-reduces it
    asynchronously when a process group exists, and the update is applied by ``apply_center_update`` at the next
    teacher call, so the loss at step t uses the center built from teacher outputs up to step t − 1.

    Differences from the official code, all identical in normal use:

    - N is all-reduced together with S (one collective on K + 1 floats) rather than assumed to be N_local · W, so
      ranks with unequal or empty batches are averaged correctly.
    - Starting an update while one is pending first applies the pending one (the official silently drops it).

    Checkpointing: buffers ``center`` (center_shape) and ``pending_center_update`` (K + 1: the pending sum S, then
    N; N = 0 means nothing pending) are both in ``state_dict``, so a checkpoint taken between ``update_center`` and
    the next teacher call resumes exactly. ``state_dict`` waits for an in-flight all-reduce first, and
    ``load_state_dict`` waits for and discards it.
    """

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if center_shape[-1] < 1:
            raise ValueError(f"the number of prototypes must be >= 1, got {center_shape[-1]}")
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(center_shape))
        self.register_buffer("pending_center_update", torch.zeros(center_shape[-1] + 1))
        self._reduce_handle: dist.Work | None = None

    def _wait_for_reduce(self) -> None:
        if self._reduce_handle is not None:
            self._reduce_handle.wait()
            self._reduce_handle = None

    @torch.no_grad()
    def start_center_update(self, batch_sum: torch.Tensor, count: int) -> None:
        """Store a pending update from this rank's batch-center sum (K,) over ``count`` items; all-reduce it async."""
        self.apply_center_update()
        pending = self.pending_center_update
        pending[:-1].copy_(batch_sum.reshape(-1))
        pending[-1] = float(count)
        if dist.is_available() and dist.is_initialized():
            self._reduce_handle = dist.all_reduce(pending, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply the pending update, if any, to ``center``. Branch-free, so no device-to-host sync."""
        self._wait_for_reduce()
        pending = self.pending_center_update
        count = pending[-1]
        batch_center = (pending[:-1] / count.clamp(min=1.0)).reshape(self.center.shape)
        m = self.center_momentum
        updated = self.center * m + batch_center * (1.0 - m)
        self.center.copy_(torch.where(count > 0, updated, self.center))
        pending.zero_()

    @torch.no_grad()
    def softmax_centered(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t − c) / τ) over the last dim after applying any pending update; same shape as t, fp32."""
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        self.apply_center_update()
        # center viewed as (K,) so the output keeps the input's shape whatever the center's leading dims
        # the division in place: at K = 65536 each (rows, K) temporary is a large fresh allocation (same values)
        centered = (teacher_logits.float() - self.center.reshape(-1)).div_(teacher_temp)
        return torch.softmax(centered, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._wait_for_reduce()  # the pending buffer is being written by the all-reduce
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._wait_for_reduce()  # an in-flight reduce would overwrite the loaded pending update
        super()._load_from_state_dict(*args, **kwargs)
