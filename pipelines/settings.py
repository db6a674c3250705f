"""Settings and paths, the same way for every command.

`Settings`: the base of every command's settings dataclass (RunSettings, SelectSettings, TrainSettings,
WarmupSettings, BootstrapSettings). `Cls.load(preset, **overrides)`: a YAML preset + flag overrides (None = not
given), unknown keys refused, numbers coerced; constructing the dataclass (by load or in code) then runs its
`resolve_paths()` and `validate()`, once. Paths are made absolute here, at the config/CLI boundary, in the process
that read them: Ray workers (Ray Train ranks, Ray Data tasks, the CapFilt actors) do not run in the user's working
directory. URLs (`s3://...`, `gs://...`) and Hugging Face hub ids (`Salesforce/blip-itm-base-coco`) are left alone.
"""

from __future__ import annotations

import dataclasses
import os
import types as types_mod
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from blip.hub import looks_like_hub_id

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
T = TypeVar("T")
S = TypeVar("S", bound="Settings")


@dataclasses.dataclass
class Settings:
    """A command's settings: the dataclass's fields are its YAML keys and flags. Construction (by `load` or in code)
    makes paths absolute and validates, once, in the process that built it: a worker gets the object, not its
    fields again."""

    # the preset `load()` reads when given none (a name in configs/); None: the fields' defaults
    PRESET: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.resolve_paths()
        self.validate()

    @classmethod
    def load(cls: type[S], preset: str | os.PathLike[str] | None = None, **overrides: Any) -> S:
        """The preset YAML (a path or a name in configs/; None: the class's PRESET) + overrides (None values: not
        given; `MAP.KEY` sets one key of a map setting); unknown keys are an error, so typos do not pass silently."""
        return load_settings(cls, preset if preset is not None else cls.PRESET, overrides)

    def resolve_paths(self) -> None:
        """Relative local paths -> absolute (subclasses name their path fields); URLs and hub ids stay."""

    def validate(self) -> None:
        """Raise ValueError naming the bad setting (subclasses add their checks)."""


def is_url(s: str) -> bool:
    return "://" in s


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


def resolve_preset(name: str) -> str:
    """A preset YAML: an existing file (relative to the working directory) or a name in configs/ -> absolute."""
    try:
        return str(config_path(name).resolve())
    except FileNotFoundError:
        return str(CONFIG_DIR / name)  # reported when it is read


def config_path(name: str | os.PathLike[str]) -> Path:
    """A YAML preset as given (a path), or else a name in configs/ (`capfilt.yaml`, `capfilt_tiny`)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / str(name), CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file {name} does not exist (neither a path nor a name in {CONFIG_DIR})")


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = config_path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:  # a typo in a config is the user's to fix: one line, not a traceback
        raise ValueError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_settings(cls: type[T], path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` from a YAML preset (a path or a name in configs/; None: defaults) + overrides (see Settings.load)."""
    data = read_yaml(path) if path is not None else {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        head, _, sub = k.partition(".")
        if sub:  # "pretrain.epochs": one key of a map setting, the rest of the map as configured
            if not isinstance(data.get(head, {}), dict):
                raise ValueError(f"{k}: {head!r} is not a map of settings")
            data[head] = {**data.get(head, {}), sub: v}
        else:
            data[k] = v
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    data = {k: _coerce(k, v, hints.get(k)) for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:
        raise ValueError(f"bad configuration: {e}") from None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A number setting given as YAML text -> the number: YAML 1.1 reads `5e-4` (no dot) as a string, which would
    reach the optimizer as one. A value that is no number at all (a bool included) is an error here, before anything
    starts."""
    types = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types_mod.UnionType) else {hint}
    if value is None or not types & {int, float}:
        return value
    if isinstance(value, bool) and bool not in types:  # YAML `yes`/`true` is an int in Python: refuse it by name
        kind = "a number" if float in types else "an integer"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")
    if float in types and isinstance(value, (int, float)):
        return float(value) if int not in types else value
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        if str in types and isinstance(value, str):  # a word the setting allows besides numbers (batch_size: auto)
            return value
        kind = "a number" if float in types else "an integer"
        raise ValueError(f"{name}: expected {kind}, got {value!r}") from None
    if float in types:
        return number
    if not number.is_integer():
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(number)


def parse_set(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (VALUE read as YAML: numbers, lists, `{a: 1}` maps) -> overrides; a dash in KEY reads
    as an underscore; `MAP.KEY=VALUE` sets one key of a map setting (load_settings merges it)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def overrides(set_items: tuple[str, ...] | list[str], **flags: Any) -> dict[str, Any]:
    """`--set` items + the command's own flags; a flag not given (None) leaves a `--set` of the same key in force."""
    return {**parse_set(set_items), **{k: v for k, v in flags.items() if v is not None}}
