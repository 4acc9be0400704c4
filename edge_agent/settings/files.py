"""Settings from files: the main TOML file, its conf.d drop-ins and the environment, merged into
one `Settings` snapshot; every problem named with the file (or variable) and key that caused it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

from edge_agent.errors import ConfigError
from edge_agent.settings.base import redact
from edge_agent.settings.catalog import is_catalog_name
from edge_agent.settings.model import CROSS_TABLE_MARK, ENV_PREFIX, PATH_KEYS, Settings
from edge_agent.settings.sources import source_kind

CONFIG_ENV = "EDGE_AGENT_CONFIG"
DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")


def config_path(explicit: str | Path | None) -> tuple[Path, bool]:
    """The file to read and whether it was asked for (a missing asked-for file is an error)."""
    if explicit:
        return Path(explicit), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    return DEFAULT_CONFIG, False


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    _resolve_paths(data, path.parent)
    return data


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def resolved(text: str) -> str:
        value = Path(text).expanduser()
        return str(value if value.is_absolute() else base / value)

    for keys in PATH_KEYS:
        table = data
        for key in keys[:-1]:
            table = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict) and isinstance(table.get(keys[-1]), str):
            if keys == ("model", "path") and is_catalog_name(table["path"]):
                continue  # a catalog name, resolved under state_dir by catalog.resolve_model_path
            table[keys[-1]] = resolved(table[keys[-1]])
    cameras = data.get("cameras")  # a table of free names: only file sources are paths
    for camera in cameras.values() if isinstance(cameras, dict) else ():
        source = camera.get("source") if isinstance(camera, dict) else None
        if isinstance(source, str) and source and source_kind(source) == "file":
            camera["source"] = resolved(source)


@dataclass(frozen=True)
class ConfigSources:
    """Where a snapshot came from: the files read, in order, and which one set each key."""

    main: Path | None
    files: tuple[Path, ...] = ()
    origins: dict[str, str] = field(default_factory=dict)  # dotted key -> file or env var

    def origin(self, key: str) -> str:
        env_name = ENV_PREFIX + key.replace(".", "__").upper()
        if env_name in os.environ:
            return f"environment {env_name}"
        return self.origins.get(key, "default")


def dropin_files(main: Path) -> list[Path]:
    """`conf.d/*.toml` beside the main file, in name order; dot-files and other names ignored."""
    folder = main.parent / "conf.d"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix == ".toml" and not p.name.startswith(".") and p.is_file())


def _merge(into: dict[str, Any], layer: dict[str, Any], source: str, origins: dict[str, str],
           prefix: str = "") -> None:
    """Deep merge: tables merge key by key, anything else is replaced by the later file."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            if not isinstance(into.get(key), dict):
                into[key] = {}
            _merge(into[key], value, source, origins, dotted + ".")
        else:
            into[key] = value
            origins[dotted] = source


def load_settings(explicit: str | Path | None = None) -> tuple[Settings, ConfigSources]:
    """Build the settings snapshot: main file, then its conf.d/*.toml, then the environment."""
    path, asked = config_path(explicit)
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    files: list[Path] = []
    if path.exists() or asked:
        files = [path, *dropin_files(path)]
    problems: list[str] = []
    for file in files:
        try:
            _merge(data, read_toml(file), str(file), origins)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    sources = ConfigSources(path if files else None, tuple(files), origins)
    try:
        return Settings(**data), sources
    except ValidationError as exc:
        raise ConfigError([line for err in exc.errors() for line in _describe(err, sources)]) from exc


def _describe(err: Any, sources: ConfigSources) -> list[str]:
    key = ".".join(str(part) for part in err["loc"])
    where = sources.origin(key)
    if where == "default":  # e.g. a required key nobody set
        where = str(sources.main or "defaults")
    if CROSS_TABLE_MARK in err["msg"]:
        return [f"{where}: {line}" for line in err["msg"].split(CROSS_TABLE_MARK, 1)[1].splitlines()]
    reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    shown = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err['input']!r:.80})"
    return [f"{where}: {key}: {reason}{shown}"]


def explain_settings(settings: Settings, sources: ConfigSources) -> list[tuple[str, Any, str]]:
    """(dotted key, effective value, where it was set) for every leaf setting."""
    rows: list[tuple[str, Any, str]] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            key = prefix.rstrip(".")
            rows.append((key, node, sources.origin(key)))

    walk(describe_settings(settings), "")
    return rows


def describe_settings(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data for `check-config`, camera URL passwords masked
    (the broker password is never held: only its file's path)."""
    data = settings.model_dump(mode="json")
    data["mqtt"]["client_id"] = settings.client_id
    for camera in data["cameras"].values():
        camera["source"] = redact(camera["source"])
    return data
