"""Imported by the curation forkserver when it starts (``multiprocessing``'s preload list, the only hook Python
gives into that process): if its parent is the CLI process that armed it, the kernel kills it when that process
dies (see :mod:`data_pipeline.core.lifeline`). Importing it anywhere else does nothing."""

from __future__ import annotations

import os

from data_pipeline.core.lifeline import OWNER_ENV, die_with_parent


def arm() -> None:
    """Follow the owner's death when this process is the owner's direct child."""
    owner = os.environ.get(OWNER_ENV, "")
    if owner.isdigit() and os.getppid() == int(owner):
        die_with_parent(int(owner))


arm()
