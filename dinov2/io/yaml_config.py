"""Typed configs from YAML: dataclass defaults, YAML files, then settings given as values or dotted ``key=value``
overrides, merged in that order into one validated dataclass instance; every error is one line naming the key or file.

All of the project's YAML goes through here: the training config (:mod:`dinov2.config`), the curation config
(``data_pipeline.core.config``) and the SLURM cluster settings (:mod:`dinov2.run.slurm`). OmegaConf does the typed
merge: it refuses unknown keys and values that do not convert to the declared type. The dataclasses then validate
themselves in ``__post_init__`` by raising ``ValueError`` (or :class:`ConfigError`) with a message naming the key.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.io.files import read_regular

T = TypeVar("T")
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # far above any real config; a bound on what a mistaken path can make us read


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line and names the offending key or file."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (libraries append context lines that a CLI should not print)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def _one_line(error: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    line = first_line(error)
    if "not in" in line or "Missing key" in line or "Key '" in line:
        return ConfigError(f"unknown config key '{key}' (from {source})")
    return ConfigError(f"bad value for config key '{key}' (from {source}): {line}")


def read_yaml_mapping(path: str | Path) -> DictConfig:
    """A YAML file of config keys, read with OmegaConf's YAML rules (``1e-3`` is a float).

    Raises:
        ConfigError: the file is missing, not a regular file (a FIFO would block the read), larger than
            :data:`MAX_CONFIG_BYTES`, not UTF-8, malformed YAML, or something other than a mapping (an empty file is
            an empty mapping).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as error:  # unreadable, or refused (too large, not a regular file)
        raise ConfigError(f"config file {path} cannot be read: {first_line(error)}") from None
    try:
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: malformed YAML{where}: {error.problem or first_line(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {first_line(error)}") from None
    except OSError as error:  # OmegaConf refuses a scalar document this way
        raise ConfigError(f"{path}: expected a mapping of config keys ({first_line(error)})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, got a list")  # OmegaConf loads only these two
    return loaded


def _value_for_section(merged: DictConfig, layer: DictConfig, prefix: str = "") -> str | None:
    """The dotted key where ``layer`` gives a plain value in place of a section of keys, if any (OmegaConf's merge
    error for that case does not name the key)."""
    for key in layer:
        path = f"{prefix}{key}"
        section = OmegaConf.select(merged, path)
        if isinstance(section, DictConfig):
            value = layer[key]
            if not isinstance(value, DictConfig):
                return path
            if found := _value_for_section(merged, value, path + "."):
                return found
    return None


def _merge(merged: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as error:
        if not getattr(error, "full_key", None) and (key := _value_for_section(merged, layer)):
            raise ConfigError(f"bad value for config key '{key}' (from {source}): expected a mapping of keys, "
                              f"got {OmegaConf.select(layer, key)!r}") from None
        raise _one_line(error, source) from None


def load_typed_config(schema: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
                      values: Mapping[str, Any] | None = None) -> T:
    """Merges ``schema``'s defaults, the YAML ``files`` in order, ``values`` and the dotted ``overrides`` into a
    validated ``schema`` instance (later layers win).

    Args:
        schema: a dataclass whose fields (and nested dataclasses) declare every key, its type and its default.
        files: YAML mappings, merged in order.
        overrides: ``key=value`` strings (``optim.base_lr=0.001``); values are parsed as YAML.
        values: already-typed settings (e.g. from command-line flags), merged after the files and before
            ``overrides``; nested mappings merge key by key.

    Raises:
        ConfigError: one line naming the key (unknown key, wrong type, invalid value) or the file.
    """
    merged = OmegaConf.structured(schema)
    for path in files:
        merged = _merge(merged, read_yaml_mapping(path), str(path))
    if values:
        try:
            layer = OmegaConf.create(dict(values))
        except OmegaConfBaseException as error:
            raise _one_line(error, "given values") from None
        merged = _merge(merged, layer, "given values")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        source = f"command line {item!r}"
        try:
            layer = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as error:
            raise _one_line(error, source) from None
        except yaml.YAMLError as error:  # the value part is parsed as YAML
            raise ConfigError(f"override {item!r}: the value is malformed YAML ({first_line(error)})") from None
        merged = _merge(merged, layer, source)
    try:
        return OmegaConf.to_object(merged)  # builds the dataclasses, so their __post_init__ checks run here
    except OmegaConfBaseException as error:
        raise _one_line(error, "merged config") from None
    except ValueError as error:
        raise ConfigError(first_line(error)) from None
