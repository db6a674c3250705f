"""Shard I/O for `capfilt run`: find img2dataset shards, read them as raw bytes, write per-shard outputs atomically.

Nothing here starts Ray: every function works on one shard, so it is tested on its own and runs under any executor.

Reading yields pyarrow tables with a fixed schema (`READ_SCHEMA`) so blocks from different shards always concatenate,
followed by one end-of-shard marker row (`kind="eos"`, `idx` = number of samples, `note` = why reading stopped early,
if it did). The marker travels through the pipeline to the writer, which commits a shard once it has seen the marker
and every sample index below it.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# webdataset's rule: the key is everything before the first dot of the file's basename (directories included)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_GLOB_CHARS = re.compile(r"[*?\[]")

READ_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),  # "sample" | "eos"
        ("shard", pa.string()),
        ("idx", pa.int64()),  # position in the shard; for "eos": the shard's sample count
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),  # web text (img2dataset .txt / caption column); null when missing
        ("image", pa.binary()),  # original encoded bytes; null when missing
        ("image_ext", pa.string()),
        ("json", pa.string()),  # img2dataset metadata (and the synthetic ground truth), as JSON text
        ("note", pa.string()),  # read problem: for samples a caption/metadata note, for "eos" why the shard ended early
    ]
)


# ------------------------------------------------------------------------------------------------ finding shards


@dataclass(frozen=True)
class Shard:
    path: str  # full URL or local path, as fsspec opens it
    name: str  # deterministic output stem, derived from the input file name
    format: str  # "tar" | "parquet"


def _fs_and_path(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give back a full URL for a protocol-stripped path (local paths stay plain)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_shards(input: str, storage_options: dict[str, Any] | None = None) -> list[Shard]:
    """`--input` (a folder, a glob, or one file; local or any fsspec URL) -> sorted shards.

    A folder means its `*.tar` files (img2dataset webdataset output; the sidecar `.parquet` files are metadata), or
    its `*.parquet` files when it has no tars (img2dataset parquet output). Raises FileNotFoundError when nothing
    matches, so the CLI can say so before Ray starts.
    """
    fs, path = _fs_and_path(input, storage_options)
    if _GLOB_CHARS.search(path):
        paths = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    elif fs.isdir(path):
        files = sorted(fs.ls(path, detail=False))
        paths = [p for p in files if p.endswith(".tar")] or [p for p in files if p.endswith(".parquet")]
    elif fs.isfile(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"input {input!r} does not exist")
    tars = {posixpath.splitext(p)[0] for p in paths if p.endswith(".tar")}
    # a glob like dir/* also matches img2dataset's sidecars (NNNNN.parquet next to NNNNN.tar): drop those
    paths = [
        p for p in paths if p.endswith(".tar") or (p.endswith(".parquet") and posixpath.splitext(p)[0] not in tars)
    ]
    if not paths:
        raise FileNotFoundError(f"no .tar or .parquet shards found at {input!r}")
    return [Shard(_unstrip(fs, p), n, "tar" if p.endswith(".tar") else "parquet") for p, n in zip(paths, _names(paths))]


def _names(paths: list[str]) -> list[str]:
    """Output stems: the file stem, or the path below the common folder when stems collide (a glob over folders)."""
    stems = [posixpath.splitext(posixpath.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    return [posixpath.splitext(posixpath.relpath(p, common))[0].replace("/", "__") for p in paths]


# ------------------------------------------------------------------------------------------------ reading shards


def _sample_row(shard: str, idx: int, key: str, files: dict[str, bytes]) -> dict[str, Any]:
    image_ext = next((e for e in IMAGE_EXTS if e in files), None)
    caption, note = None, None
    if "txt" in files:
        try:
            caption = files["txt"].decode("utf-8")
        except UnicodeDecodeError:
            caption = files["txt"].decode("utf-8", errors="replace")
            note = "caption is not UTF-8; undecodable bytes replaced"
    meta_text = None
    url = None
    if "json" in files:
        meta_text = files["json"].decode("utf-8", errors="replace")
        try:
            meta = json.loads(meta_text)
            url = meta.get("url") if isinstance(meta, dict) else None
        except ValueError:
            note = (note + "; " if note else "") + "metadata .json is not valid JSON"
    return {
        "kind": "sample",
        "shard": shard,
        "idx": idx,
        "key": key,
        "url": None if url is None else str(url),
        "caption": caption,
        "image": files.get(image_ext) if image_ext else None,
        "image_ext": image_ext,
        "json": meta_text,
        "note": note,
    }


def _eos_row(shard: str, n: int, error: str | None) -> dict[str, Any]:
    return {"kind": "eos", "shard": shard, "idx": n, "note": error}


def _iter_tar_samples(f: Any, size: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by webdataset key; streaming (`r|`), so S3 is read once, front to back.

    A tar cut exactly at a member boundary reads like a complete one to `tarfile`; an uncompressed tar of known `size`
    must still hold its end-of-archive marker (two zero blocks) after the last member, or it is reported truncated.
    """
    key, files = None, {}
    with tarfile.open(fileobj=f, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            m = _KEY_EXT.match(member.name)
            if m is None or posixpath.basename(member.name).startswith((".", "__")):
                continue  # no extension, hidden or webdataset-reserved file: not part of a sample
            k, ext = m.group(1), m.group(2).lower()
            data = tf.extractfile(member).read()  # raises tarfile.ReadError when the tar is cut inside this member
            if k != key and key is not None:
                yield key, files
                files = {}
            key = k
            files[ext] = data
        plain = getattr(tf.fileobj, "comptype", "tar") == "tar"
        if plain and size is not None and tf.offset + 2 * tarfile.BLOCKSIZE > size:
            # the last group may be missing members that were cut off: it is not yielded
            raise tarfile.ReadError(f"truncated tar: no end-of-archive marker after byte {tf.offset} of {size}")
    if key is not None:
        yield key, files


def read_shard(
    shard: Shard, storage_options: dict[str, Any] | None = None, rows_per_block: int = 64
) -> Iterator[pa.Table]:
    """One shard -> tables of `READ_SCHEMA` rows, then the end-of-shard marker. Never raises for bad data.

    A tar that is cut short or not a tar still gives every sample read before the damage, and the marker carries the
    reason, so the job reports the shard as failed while every other shard completes.
    """
    rows: list[dict[str, Any]] = []
    n, error = 0, None
    try:
        fs, path = _fs_and_path(shard.path, storage_options)
        with fs.open(path, "rb") as f:
            samples = _iter_tar_samples(f, fs.size(path)) if shard.format == "tar" else _iter_parquet_samples(f)
            for key, files in samples:
                rows.append(_sample_row(shard.name, n, key, files))
                n += 1
                if len(rows) >= rows_per_block:
                    yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)
                    rows = []
    except Exception as e:  # noqa: BLE001 - any reader failure is this shard's failure, reported in the summary
        error = f"{type(e).__name__}: {e} (after {n} samples)"
    rows.append(_eos_row(shard.name, n, error))
    yield pa.Table.from_pylist(rows, schema=READ_SCHEMA)


_PARQUET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "bytes")


def _iter_parquet_samples(f: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """img2dataset parquet output (`key`, `url`, `caption`, `jpg`, status/width/height/...) -> tar-like samples."""
    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    image_col = next((c for c in _PARQUET_IMAGE_COLUMNS if c in names), None)
    if image_col is None:
        raise ValueError(f"no image column ({'/'.join(_PARQUET_IMAGE_COLUMNS)}) among {names}; an img2dataset sidecar?")
    ext = image_col if image_col in IMAGE_EXTS else "jpg"
    i = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            key = row.get("key")
            if key is None:
                key = f"row{i:09d}"  # position in the file, unique across batches
            i += 1
            files: dict[str, bytes] = {}
            if row.get(image_col) is not None:
                files[ext] = row[image_col]
            if row.get("caption") is not None:
                files["txt"] = str(row["caption"]).encode("utf-8")
            meta = {k: v for k, v in row.items() if k != image_col and _jsonable(v)}
            files["json"] = json.dumps(meta).encode("utf-8")
            yield str(key), files


def _jsonable(v: Any) -> bool:
    """Metadata worth carrying into the sample's json: scalars and nested lists/dicts of them (e.g. ground truth)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x) for k, x in v.items())
    if isinstance(v, list | tuple):
        return all(_jsonable(x) for x in v)
    return v is None or isinstance(v, str | int | float | bool)


# ------------------------------------------------------------------------------------------------ writing outputs


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def tmp_path(path: str) -> str:
    """Temporary name next to `path`; the leading dot hides it from pyarrow's dataset discovery."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")


class AtomicFile:
    """Write to a temporary name, then rename on commit (local); on object stores the object appears on close."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path
        self.local = _is_local(fs)
        self.write_path = tmp_path(path) if self.local else path
        if self.local:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.f = fs.open(self.write_path, "wb")

    def commit(self) -> None:
        self.f.close()
        if self.local:
            os.replace(self.write_path, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
            if self.local:
                os.remove(self.write_path)
        except OSError:
            pass


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    af = AtomicFile(fs, path)
    af.f.write(data)
    af.commit()


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: same rows -> same bytes
    tf.addfile(info, io.BytesIO(data))


# Per-sample parquet columns (the output contract; see docs/_readme_run.md)
OUT_COLUMNS = [
    "key",
    "url",
    "shard",
    "idx",
    "caption",
    "synthetic_captions",
    "web_itm",
    "web_itc",
    "synthetic_itm",
    "synthetic_itc",
    "kept_texts",
    "kept",
    "reason",
    "status",
    "error",
    "json",
]
OUT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("shard", pa.string()),
        ("idx", pa.int64()),
        ("caption", pa.string()),
        ("synthetic_captions", pa.list_(pa.string())),
        ("web_itm", pa.float32()),
        ("web_itc", pa.float32()),
        ("synthetic_itm", pa.list_(pa.float32())),
        ("synthetic_itc", pa.list_(pa.float32())),
        ("kept_texts", pa.list_(pa.string())),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("json", pa.string()),
    ]
)

HIST_BINS = 200  # summary histograms: ITM over [0, 1], ITC over [-1, 1]
HIST_RANGES = {"web_itm": (0.0, 1.0), "synthetic_itm": (0.0, 1.0), "web_itc": (-1.0, 1.0), "synthetic_itc": (-1.0, 1.0)}


@dataclass
class ShardWriter:
    """Collects one shard's result rows (in any order, duplicates from retries dropped) and commits it atomically.

    Kept samples stream into the shard's tar as they arrive (so image bytes are never held for a whole shard);
    the parquet rows (small) are held and written sorted by sample index at commit. The state file written last is
    the commit point: a shard is done iff `_state/{shard}.json` says so.
    """

    fs: fsspec.AbstractFileSystem
    root: str  # output folder, protocol stripped
    shard: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    expected: int | None = None
    read_error: str | None = None
    duplicates: int = 0
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.tar_file = AtomicFile(self.fs, posixpath.join(self.root, "tars", f"{self.shard}.tar"))
        self.tar = tarfile.open(fileobj=self.tar_file.f, mode="w|", format=tarfile.USTAR_FORMAT)

    def add(self, row: dict[str, Any]) -> None:
        if row["kind"] == "eos":
            self.expected, self.read_error = int(row["idx"]), row.get("note")
            return
        if row["idx"] in self.seen:  # a retried block: the same rows again (deterministic), keep the first
            self.duplicates += 1
            return
        self.seen.add(row["idx"])
        if row["kept"]:
            key = row["key"]
            _tar_add(self.tar, f"{key}.{row.get('image_ext') or 'jpg'}", row["image"])
            _tar_add(self.tar, f"{key}.txt", "\n".join(row["kept_texts"]).encode("utf-8"))
            meta = {
                "key": key,
                "url": row.get("url"),
                "texts": list(row["kept_texts"]),  # what `capfilt pretrain` samples from
                "caption": row.get("caption"),
                "synthetic_captions": list(row["synthetic_captions"] or []),
                "web_itm": row.get("web_itm"),
                "synthetic_itm": list(row["synthetic_itm"] or []),
                "source_shard": self.shard,
            }
            _tar_add(self.tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
        self.rows.append({c: row.get(c) for c in OUT_COLUMNS})

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.seen) >= self.expected

    def commit(self) -> dict[str, Any]:
        """Write parquet, close the tar, then the state file. Returns the shard's stats."""
        self.rows.sort(key=lambda r: r["idx"])
        table = pa.Table.from_pylist(self.rows, schema=OUT_SCHEMA)
        pq_file = AtomicFile(self.fs, posixpath.join(self.root, "parquet", f"{self.shard}.parquet"))
        pq.write_table(table, pq_file.f)
        self.tar.close()
        pq_file.commit()
        self.tar_file.commit()
        stats = shard_stats(self.rows, self.shard, self.read_error)
        stats["duplicates_dropped"] = self.duplicates
        stats["seconds"] = round(time.time() - self.started, 3)
        write_bytes_atomic(self.fs, state_path(self.root, self.shard), json.dumps(stats).encode("utf-8"))
        return stats

    def abort(self) -> None:
        try:
            self.tar.close()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.tar_file.abort()


def state_path(root: str, shard: str) -> str:
    return posixpath.join(root, "_state", f"{shard}.json")


def shard_stats(rows: list[dict[str, Any]], shard: str, read_error: str | None) -> dict[str, Any]:
    """Counts and mergeable score histograms for one shard."""
    status = [r["status"] for r in rows]
    kept = [bool(r["kept"]) for r in rows]
    ok = [s == "ok" for s in status]
    hists: dict[str, list[int]] = {}
    for col, (lo, hi) in HIST_RANGES.items():
        vals: list[float] = []
        for r in rows:
            v = r.get(col)
            if v is None:
                continue
            vals.extend(v if isinstance(v, list | tuple | np.ndarray) else [v])
        hists[col] = np.histogram(np.clip(np.asarray(vals, dtype=np.float64), lo, hi), bins=HIST_BINS, range=(lo, hi))[
            0
        ].tolist()
    kept_texts = [(r.get("caption"), list(r["kept_texts"] or [])) for r in rows if r["kept"]]
    web_kept = sum(1 for web, texts in kept_texts if web is not None and web in texts)
    synthetic_kept = sum(1 for web, texts in kept_texts if any(t != web for t in texts))
    return {
        "shard": shard,
        "state": "failed" if read_error else "done",
        "error": read_error,
        "in": len(rows),
        "ok": sum(ok),
        "kept": sum(kept),
        "dropped": sum(1 for o, k in zip(ok, kept) if o and not k),
        "decode_errors": sum(1 for s in status if s == "decode_error"),
        "other_errors": sum(1 for s in status if s not in ("ok", "decode_error")),
        "web_kept": web_kept,
        "synthetic_kept": synthetic_kept,
        "histograms": hists,
    }


def read_states(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """Every committed shard's stats, by shard name."""
    out: dict[str, dict[str, Any]] = {}
    state_dir = posixpath.join(root, "_state")
    if not fs.isdir(state_dir):
        return out
    for p in fs.ls(state_dir, detail=False):
        base = posixpath.basename(p)
        if base.endswith(".json") and not base.startswith("."):
            with fs.open(p, "rb") as f:
                s = json.load(f)
            out[s["shard"]] = s
    return out


def clean_tmp(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Remove temporaries left by a killed run (local output only; object stores never show partial objects)."""
    if not _is_local(fs):
        return
    for sub in ("parquet", "tars", "_state"):
        d = posixpath.join(root, sub)
        if fs.isdir(d):
            for p in fs.ls(d, detail=False):
                if posixpath.basename(p).startswith(".") and p.endswith(".tmp"):
                    fs.rm(p)
