"""dinov2.io.cli: the tools share their argument groups and turn bad input into one error line, exit status 2."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dinov2.eval import extract, knn, linear, visualize
from dinov2.io.cli import add_model_arguments, run_cli, tool_parser
from dinov2.weights import export

TOOLS = {
    "extract": (extract.main, ["--data", "d", "--output-dir", "o"]),
    "knn": (knn.main, ["--train-dataset", "t", "--val-dataset", "v"]),
    "linear": (linear.main, ["--train-dataset", "t", "--output-dir", "o"]),
    "visualize": (visualize.main, ["--images", "a.jpg", "--output-dir", "o"]),
    "export": (export.main, ["--format", "hub", "--out", "o.pth"]),
}


@pytest.mark.parametrize("name", TOOLS)
def test_missing_weights_file_is_one_error_line(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main, args = TOOLS[name]
    assert main(["--weights", str(tmp_path / "missing.pth"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "missing.pth" in err


def _parser() -> argparse.ArgumentParser:
    parser = tool_parser("tool", "First paragraph.\n\nDetails.")
    add_model_arguments(parser)
    return parser


def test_run_cli_exit_codes(capsys: pytest.CaptureFixture) -> None:
    assert run_cli(_parser(), lambda args: None, ["--weights", "w"]) == 0

    def bad(args: argparse.Namespace) -> None:
        raise ValueError("--threshold must be in (0, 1]\nand a second line nobody needs")

    assert run_cli(_parser(), bad, ["--weights", "w"]) == 2
    assert capsys.readouterr().err == "error: --threshold must be in (0, 1]\n"

    def bug(args: argparse.Namespace) -> None:
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):  # programming errors keep their traceback
        run_cli(_parser(), bug, ["--weights", "w"])
    assert _parser().description == "First paragraph."
