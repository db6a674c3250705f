"""One output folder = one corpus: `_run.json` records what made it, and a rerun must match it.

The manifest holds the models (resolved path + a content digest of the weights and tokenizer files), every setting
that changes an output row, and the input spec. A rerun compares its own with the folder's: equal -> resume;
different -> refused with the differences named (or `--overwrite`: remove what the old run made, start over).
What does not change the output (actors, decode threads, retries, batch size, progress) is not compared, so a rerun
may use another cluster shape.

Model digests: blake2b of every file of the checkpoint (a folder's files, or a `.pth` with the tokenizer files next
to it), keyed by file name, never by path: a copied or moved checkpoint is the same model. Hashing reads the weights
once (~1 GB/s); a rerun reuses the recorded digest of a file whose size and mtime are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from blip.generate import SAMPLER
from pipelines.io import write_bytes_atomic

MANIFEST = "_run.json"
# Bump when the same models and settings would write other rows (a new sampler, another score); a folder made by an
# earlier output version is then refused like one made with other settings.
OUTPUT_VERSION = 2  # 2: counter-based sampling noise (blip.generate.SAMPLER), other captions for the same seed
# The RunSettings fields that change an output row. Models and input are compared separately; `dtype` is recorded as
# resolved (auto -> bfloat16 on CUDA, float32 on CPU) when the device is known before Ray starts.
OUTPUT_SETTINGS = (
    "num_captions",
    "top_p",
    "max_length",
    "min_length",
    "repetition_penalty",
    "threshold",
    "seed",
    "text_max_length",
    "dtype",
    "max_pixels",
)
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(spec: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint (our folder, a transformers folder, a `.pth`, a hub id) -> {spec, path, files, digest}.

    `previous` (this model's entry in an earlier manifest) lends the digests of files whose size and mtime match."""
    from blip.checkpoint import resolve

    path = resolve(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = [path] + [path.parent / n for n in _TOKENIZER_FILES if (path.parent / n).is_file()]
    old = (previous or {}).get("files", {})
    entries: dict[str, dict[str, Any]] = {}
    for f in files:
        name = f.relative_to(path).as_posix() if path.is_dir() else f.name
        st = f.stat()
        prev = old.get(name, {})
        same = prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns and prev.get("blake2b")
        entries[name] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "blake2b": prev["blake2b"] if same else _digest_file(f),
        }
    whole = hashlib.blake2b(digest_size=16)
    for name, e in sorted(entries.items()):
        whole.update(f"{name}\0{e['blake2b']}\0".encode())
    return {"spec": spec, "path": str(path), "digest": whole.hexdigest(), "files": entries}


def output_settings(cfg: Any) -> dict[str, Any]:
    """The settings of `cfg` (a RunSettings) that change an output row, `dtype` resolved where the device is known."""
    out = {k: getattr(cfg, k) for k in OUTPUT_SETTINGS}
    if out["dtype"] == "auto":
        device = cfg.device
        if device == "auto" and cfg.address is None:  # Ray starts here: the device is this machine's
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            out["dtype"] = "bfloat16"
        elif device == "cpu":
            out["dtype"] = "float32"
    return out


def build_manifest(cfg: Any, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        capfilt_version = version("capfilt")
    except PackageNotFoundError:
        capfilt_version = "unknown"
    models = (previous or {}).get("models", {})
    return {
        "output_version": OUTPUT_VERSION,
        "capfilt_version": capfilt_version,
        "input": cfg.input.rstrip("/"),
        "models": {
            "captioner": model_fingerprint(cfg.captioner, models.get("captioner")),
            "filter": model_fingerprint(cfg.filter, models.get("filter")),
        },
        "settings": {**output_settings(cfg), "sampler": SAMPLER},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
    }


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes `new` another corpus than `old`, one readable item each (empty: the same run)."""
    diffs = []
    if old.get("output_version") != new["output_version"]:
        diffs.append(
            f"output version {old.get('output_version')} -> {new['output_version']} "
            f"(capfilt {old.get('capfilt_version')} -> {new['capfilt_version']} writes other rows)"
        )
    if old.get("input") != new["input"]:
        diffs.append(f"input {old.get('input')} -> {new['input']}")
    for role in ("captioner", "filter"):
        a, b = old.get("models", {}).get(role, {}), new["models"][role]
        if a.get("digest") != b["digest"]:
            diffs.append(f"{role} {a.get('spec')} ({str(a.get('digest'))[:12]}) -> {b['spec']} ({b['digest'][:12]})")
    a, b = old.get("settings", {}), new["settings"]
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{k} {a.get(k)} -> {b.get(k)}")
    return diffs


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Any] | None:
    path = posixpath.join(root, MANIFEST)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); remove the output folder or rerun with --overwrite"
        ) from None


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any]) -> None:
    write_bytes_atomic(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())


# what `capfilt run` writes into its output folder (and `--overwrite` removes); the lease is handled by its owner
RUN_OUTPUTS = ("parquet", "tars", "_state", "summary.json", "summary.png", MANIFEST)


def has_run_outputs(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether the folder holds a run's outputs (state records or rows), with or without a manifest."""
    for sub in ("_state", "parquet"):
        d = posixpath.join(root, sub)
        if fs.isdir(d) and any(not posixpath.basename(p).startswith(".") for p in fs.ls(d, detail=False)):
            return True
    return False


def remove_outputs(fs: fsspec.AbstractFileSystem, root: str, names: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """`--overwrite`: remove what a run made (data folders first, the manifest last)."""
    for name in names:
        p = posixpath.join(root, name)
        if fs.exists(p):
            fs.rm(p, recursive=True)
    fs.invalidate_cache(root)


def remove_shard_outputs(fs: fsspec.AbstractFileSystem, root: str, shard: str) -> None:
    """`--prune`: one shard's outputs, its state record first (the shard is then no longer done)."""
    for sub, ext in (("_state", "json"), ("parquet", "parquet"), ("tars", "tar")):
        p = posixpath.join(root, sub, f"{shard}.{ext}")
        if fs.exists(p):
            fs.rm(p)


def output_shards(fs: fsspec.AbstractFileSystem, root: str) -> set[str]:
    """Shard names that have any output in the folder (a state record, a parquet or a tar)."""
    names: set[str] = set()
    for sub, ext in (("_state", ".json"), ("parquet", ".parquet"), ("tars", ".tar")):
        d = posixpath.join(root, sub)
        if fs.isdir(d):
            for p in fs.ls(d, detail=False):
                b = posixpath.basename(p)
                if b.endswith(ext) and not b.startswith("."):
                    names.add(b[: -len(ext)])
    return names


def open_output(
    fs: fsspec.AbstractFileSystem,
    root: str,
    url: str,
    new: dict[str, Any],
    *,
    overwrite: bool,
    diff: Callable[[dict[str, Any], dict[str, Any]], list[str]] = differences,
    made_by: str = "run",
    echo: Callable[[str], None] = print,
) -> None:
    """Compare a job's manifest with the folder's: the same corpus resumes; another is refused (one error naming the
    differences), or with `overwrite` removed first. A new folder gets its manifest before any shard is written.
    `diff(old, new)` lists what differs; `made_by` names the kind of job in the messages ("run", "selection")."""
    old = read_manifest(fs, root)
    if old is None and has_run_outputs(fs, root) and not overwrite:
        raise ValueError(
            f"{url} holds outputs without a manifest ({MANIFEST}: an earlier capfilt), so they cannot be checked "
            f"against this {made_by}; use another output folder, or --overwrite to remove them and start over"
        )
    diffs = diff(old, new) if old is not None else []
    if diffs and not overwrite:
        raise ValueError(
            f"{url} was made by another {made_by} ({'; '.join(diffs)}); a rerun must use the same models, settings "
            "and input: use another output folder, or --overwrite to remove what it made and start over"
        )
    if overwrite and (old is not None or has_run_outputs(fs, root)):
        remove_outputs(fs, root)
        echo(f"  --overwrite: removed the earlier outputs from {url}")
        old = None
    if old is None or new["models"] != old["models"]:  # new, or digests reused: keep the file stamps current
        write_manifest(fs, root, new if old is None else {**old, "models": new["models"]})
