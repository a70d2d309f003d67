"""dinov2.io.yaml_config: the one typed-YAML loader behind the training, curation and cluster configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from data_pipeline.core.config import load_config as load_curate_config
from dinov2.config import load_config as load_train_config
from dinov2.io.yaml_config import ConfigError, load_typed_config
from dinov2.run.slurm import load_cluster_config


@dataclass
class Inner:
    size: int = 3
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.size}")


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, ValueError)
    return message


def test_layers_merge_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("name: a\ninner: {size: 5}\n")
    second.write_text("inner: {names: [p, q]}\n")
    cfg = load_typed_config(Outer, [first, second], ["inner.size=7"], values={"name": "v"})
    assert cfg == Outer(name="v", inner=Inner(size=7, names=["p", "q"]))
    assert load_typed_config(Outer, [first], ["name=o"], values={"name": "v"}).name == "o"  # overrides come last


@pytest.mark.parametrize(("text", "expected"), [
    ("- a\n- b\n", "expected a mapping of config keys, got a list"),
    ("3\n", "expected a mapping of config keys"),
    ("inner: [1, 2\n", "malformed YAML at line 2"),
    ("inner: 4\n", "'inner'"),
    ("inner: {sise: 4}\n", "unknown config key 'inner.sise'"),
    ("inner: {size: many}\n", "'inner.size'"),
    ("inner: {size: 0}\n", "inner.size must be >= 1"),
])
def test_file_errors_are_one_line_naming_the_key_or_file(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_typed_config(Outer, [path])
    assert expected in _one_line(error)


@pytest.mark.parametrize(("override", "expected"), [
    ("inner", "not of the form key=value"),
    ("inner.names=[a,", "malformed YAML"),
    ("inner=3", "'inner'"),
    ("nme=y", "unknown config key 'nme'"),
])
def test_override_errors_are_one_line(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_typed_config(Outer, [], [override])
    assert expected in _one_line(error)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_typed_config(Outer, [tmp_path / "nope.yaml"])
    (tmp_path / "empty.yaml").write_text("")
    assert load_typed_config(Outer, [tmp_path / "empty.yaml"]) == Outer()


@pytest.mark.parametrize("load", [load_train_config, load_curate_config, lambda path, _: load_cluster_config([path])])
def test_every_config_of_the_project_refuses_a_non_mapping_file_in_one_line(tmp_path: Path, load) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as error:
        load(path, [])
    assert str(path) in _one_line(error)
