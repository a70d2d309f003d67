"""Command-line plumbing shared by the tools (``python -m dinov2.eval.{knn,linear,extract,visualize}`` and
``python -m dinov2.weights.export``): their common argument groups, and the wrapper that runs a tool and turns bad
input into one ``error:`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from dinov2.io.errors import describe_error

WEIGHTS_HELP = "checkpoint or weights file (any supported layout)"
# What a user can get wrong: bad values and files that are missing, unreadable or malformed. Anything else is a bug,
# and its traceback is worth seeing.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def tool_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the tool's module docstring."""
    return argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])


def add_model_arguments(parser: argparse.ArgumentParser, device: bool = True, weights_help: str = WEIGHTS_HELP) -> None:
    """``--weights`` (required), ``--num-heads`` and, with ``device``, ``--device``."""
    group = parser.add_argument_group("model")
    group.add_argument("--weights", required=True, help=weights_help)
    group.add_argument("--num-heads", type=int, default=None,
                       help="attention heads, for weights without an architecture record of a non-official width")
    if device:
        group.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_image_arguments(parser: argparse.ArgumentParser, image_size: int = 224,
                        batch_flag: str = "--batch-size") -> None:
    """``--image-size``, the images-per-forward-pass flag (``batch_flag``, default 64) and ``--num-workers``."""
    group = parser.add_argument_group("images")
    group.add_argument("--image-size", type=int, default=image_size, help="resize the short side, centre crop")
    group.add_argument(batch_flag, type=int, default=64, help="images per forward pass")
    group.add_argument("--num-workers", type=int, default=0, help="image loader processes (0: load in this process)")


def run_cli(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
            argv: list[str] | None = None, log_format: str = "%(asctime)s %(message)s") -> int:
    """Parses ``argv``, logs INFO to stderr and calls ``run(args)``.

    Returns:
        0 when ``run`` returns; 2, with ``error: <first line of the message>`` on stderr, when it raises one of
        :data:`USER_ERRORS`.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        run(args)
    except USER_ERRORS as error:
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return 2
    return 0
