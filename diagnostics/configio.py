"""YAML configs with `--set a.b=value` overrides. Torch-free; typed models live with their users."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file that cannot be read, or an override that cannot be applied."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings in order. Values are parsed as YAML (`3`, `true`, `[a, b]`)."""
    out = _deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a mapping")
            node = child
        node[keys[-1]] = value
    return out


def validation_lines(exc: Any, prefix: str = "", skip: Iterable[str] = ()) -> str:
    """A pydantic ValidationError as one line per problem: `  data.split.seed: <message>`.

    `skip` drops location parts pydantic adds for tagged unions (e.g. the dataset source name).
    """
    skipped = set(skip)
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if str(p) not in skipped]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            message = f"unknown key {loc[-1]!r}"
        where = ".".join([prefix, *loc] if prefix else loc) or prefix or "config"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj
