"""User paths -> absolute local paths, at the config/CLI boundary, before anything reaches a Ray worker.

Ray workers (Ray Train ranks, Ray Data tasks, actors) do not run in the user's working directory, so a relative path
from a YAML preset or a flag must be made absolute in the process that read it. URLs (`s3://...`, `gs://...`) and
Hugging Face hub ids (`Salesforce/blip-itm-base-coco`) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

# suffixes that make a string a checkpoint file, never a hub id (as blip.load decides)
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".json", ".txt", ".yaml", ".yml")


def is_url(s: str) -> bool:
    return "://" in s


def looks_like_hub_id(s: str) -> bool:
    """`owner/name` that is not a local path: exactly one "/", no leading `.`, `/` or `~`, no file suffix, and
    nothing at that path here (a local folder of that name wins, as in blip.load)."""
    return (
        s.count("/") == 1
        and not s.startswith((".", "/", "~"))
        and not s.endswith(_FILE_SUFFIXES)
        and not os.path.exists(s)
    )


def resolve_path(p: str | os.PathLike[str] | None, hub: bool = False) -> str | None:
    """One path -> absolute (`~` expanded); None/"" and URLs unchanged; with `hub`, hub ids unchanged too.
    Glob characters are kept (an absolute glob is still a glob)."""
    if p is None:
        return None
    s = str(p).strip()
    if not s or is_url(s) or (hub and looks_like_hub_id(s)):
        return s
    return os.path.abspath(os.path.expanduser(s))


def resolve_paths(value: str | None) -> str | None:
    """A comma-separated list of paths / globs / URLs (the `--data` form), each part resolved."""
    if value is None or not str(value).strip():
        return value
    return ",".join(resolve_path(part) for part in str(value).split(",") if part.strip())


def resolve_preset(name: str, config_dir: Path) -> str:
    """A preset YAML: an existing file (relative to the working directory) -> absolute, else `config_dir / name`."""
    p = Path(name).expanduser()
    return str(p.resolve() if p.is_file() else (config_dir / name))
