"""One settings loader for every command: a dataclass, a YAML preset, flag overrides, unknown keys refused, and
every local path made absolute here, at the boundary, before anything reaches a Ray worker (whose working
directory is not the user's)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")


def config_path(name: str | os.PathLike[str]) -> Path:
    """A YAML path as given, or else a name in configs/ (`capfilt.yaml`, `capfilt_tiny`)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file {name} does not exist (neither a path nor a name in {CONFIG_DIR})")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = config_path(path)
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def is_url(p: str) -> bool:
    return "://" in p


def absolute(p: str | None) -> str | None:
    """A local path -> absolute; URLs (s3://, gs://, file://) unchanged."""
    if p is None or p == "" or is_url(str(p)):
        return p
    return os.path.abspath(os.path.expanduser(str(p)))


def absolute_if_local(spec: str | None) -> str | None:
    """A checkpoint spec: an existing local path -> absolute; a hub id or a URL unchanged."""
    if spec is None or is_url(str(spec)) or not Path(spec).expanduser().exists():
        return spec
    return os.path.abspath(os.path.expanduser(str(spec)))


def load_settings(
    cls: type[T],
    path: str | os.PathLike[str] | None,
    overrides: dict[str, Any] | None = None,
    paths: tuple[str, ...] = (),
    specs: tuple[str, ...] = (),
) -> T:
    """`cls` from a YAML preset + overrides (None = not given). `paths` fields become absolute local paths,
    `specs` fields (checkpoints: path or hub id) absolute when they exist locally. Calls `validate()` if defined."""
    data = read_yaml(path) if path is not None else {}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for k in paths:
        if isinstance(data.get(k), str):
            data[k] = absolute(data[k])
    for k in specs:
        if isinstance(data.get(k), str):
            data[k] = absolute_if_local(data[k])
    try:
        obj = cls(**data)
    except TypeError as e:
        raise ValueError(f"bad configuration: {e}") from None
    if hasattr(obj, "validate"):
        obj.validate()
    return obj
