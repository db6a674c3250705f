"""Shard I/O for `capfilt run`: find img2dataset shards, read them as raw bytes, write per-shard outputs atomically.

Nothing here starts Ray: every function works on one shard, so it is tested on its own and runs under any executor
(pipelines/run/worker.py calls it inside the CapFilt actors).

`ShardReader` yields one dict per sample (`READ_FIELDS`) and, once exhausted, says whether the shard was read to its
end (`error` is None) or why it stopped early; the samples read before the damage are still yielded.
`ShardWriter` streams a shard's kept samples into its tar and holds its (small) parquet rows; `commit()` writes the
parquet, then `_state/{shard}.json` last: a shard is done iff its state file says so.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.schema import OUT_COLUMNS, OUT_SCHEMA, shard_stats

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
# webdataset's rule: the key is everything before the first dot of the file's basename (directories included)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_GLOB_CHARS = re.compile(r"[*?\[]")

READ_FIELDS = (
    "shard",
    "idx",  # position in the shard
    "key",
    "url",
    "caption",  # web text (img2dataset .txt / caption column); None when missing
    "image",  # original encoded bytes; None when missing
    "image_ext",
    "json",  # img2dataset metadata (and the synthetic ground truth), as JSON text
    "note",  # a read problem with this sample's text or metadata (non-UTF-8 caption, bad .json)
    "duplicate_of",  # idx of the earlier sample with this key in the shard (the row becomes a `duplicate_key` row)
)


# ------------------------------------------------------------------------------------------------ finding shards


# a tar shard, plain or compressed (webdataset reads them all; tarfile's stream mode decompresses gz, bz2 and xz);
# anything else named like a tar is still listed, and its shard fails with the reason instead of vanishing
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz")
_TARLIKE = re.compile(r"\.(tar(\.(gz|bz2|xz|zst|zstd|lz4|lzma|br))?|tgz|tbz2?|txz)$")


@dataclass(frozen=True)
class Shard:
    path: str  # full URL or local path, as fsspec opens it
    name: str  # deterministic output stem, derived from the input file name
    format: str  # "tar" | "parquet"
    fingerprint: str | None = None  # the input file's identity when listed: size + ETag / generation / mtime


def shard_suffix(path: str) -> str:
    """The shard suffix of a file name (`.tar`, `.tar.gz`, `.tgz`, `.parquet`, ...); "" when it is no shard."""
    m = _TARLIKE.search(path)
    if m:
        return m.group(0)
    return ".parquet" if path.endswith(".parquet") else ""


def fingerprint(info: dict[str, Any]) -> str:
    """An input file's identity from its listing entry, no read needed: the size plus the store's version marker
    (S3 ETag, GCS generation, Azure etag; local files: mtime in ns)."""
    parts = [f"size={info.get('size')}"]
    for k in ("ETag", "etag", "generation", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(k) is not None:
            v = info[k]
            if k == "mtime" and isinstance(v, float):
                v = int(v * 1e9)
            parts.append(f"{k.lower()}={str(v).strip(chr(34))}")
            break
    return ",".join(parts)


def fs_and_path(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """A local path or URL (s3://, gs://, ...) -> its filesystem and the protocol-stripped path."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Give back a full URL for a protocol-stripped path (local paths stay plain)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_shards(
    input: str,
    storage_options: dict[str, Any] | None = None,
    formats: tuple[str, ...] = ("tar", "parquet"),
    recursive: bool = False,
) -> list[Shard]:
    """`--input` (a folder, a glob, or one file; local or any fsspec URL) -> sorted shards, each with the fingerprint
    of its file. The one shard lister: `capfilt run`, training data (`formats=("tar",), recursive=True`) and the report
    use it.

    A folder (or glob) means its tar shards (`.tar`, and compressed: `.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`), or
    its `.parquet` files when it has no tars (with tars they are img2dataset's metadata sidecars); with `recursive`,
    those of every sub-folder too. Nothing that looks like a shard is dropped: a file named like a tar
    that cannot be read fails as a shard, with the reason. Raises FileNotFoundError when nothing matches, so the CLI
    can say so before Ray starts.
    """
    fs, path = fs_and_path(input, storage_options)
    if _GLOB_CHARS.search(path):
        infos = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
    elif fs.isdir(path):
        listing = fs.find(path, detail=True) if recursive else {i["name"]: i for i in fs.ls(path, detail=True)}
        infos = {
            p: i
            for p, i in listing.items()
            if i.get("type") != "directory" and not posixpath.basename(p).startswith(".")
        }
    elif fs.isfile(path):
        infos = {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"input {input!r} does not exist")
    infos = {p.rstrip("/"): i for p, i in infos.items()}
    paths = sorted(p for p in infos if shard_suffix(p))
    # with tars, the .parquet files are img2dataset's sidecars (NNNNN.parquet next to NNNNN.tar: metadata, no images)
    if any(shard_suffix(p) != ".parquet" for p in paths):
        paths = [p for p in paths if shard_suffix(p) != ".parquet"]
    paths = [p for p in paths if ("parquet" if shard_suffix(p) == ".parquet" else "tar") in formats]
    if not paths:
        kinds = " or ".join(".tar (.tar.gz, .tgz, ...)" if f == "tar" else "." + f for f in formats)
        raise FileNotFoundError(f"no {kinds} shards found at {input!r}")
    return [
        Shard(_unstrip(fs, p), n, "parquet" if p.endswith(".parquet") else "tar", fingerprint(infos[p]))
        for p, n in zip(paths, _names(paths))
    ]


def _names(paths: list[str]) -> list[str]:
    """Output stems: the file name without its shard suffix, or the path below the common folder when stems collide
    (a glob over folders); a name still taken (`00001.tar` next to `00001.tar.gz`) keeps its suffix as `_tar_gz`."""
    stems = [posixpath.basename(p)[: -len(shard_suffix(p))] for p in paths]
    if len(set(stems)) != len(stems):
        common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
        stems = [posixpath.relpath(p, common)[: -len(shard_suffix(p))].replace("/", "__") for p in paths]
    if len(set(stems)) != len(stems):
        seen = {s: stems.count(s) for s in stems}
        stems = [
            s + shard_suffix(p).replace(".", "_") if seen[s] > 1 and shard_suffix(p) != ".tar" else s
            for s, p in zip(stems, paths)
        ]
    return stems


# ------------------------------------------------------------------------------------------------ reading shards


def _sample_row(
    shard: str, idx: int, key: str, files: dict[str, bytes], duplicate_of: int | None = None
) -> dict[str, Any]:
    """A sample's tar members (by extension) -> a READ_FIELDS row; problems with its text become a `note`."""
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
        "shard": shard,
        "idx": idx,
        "key": key,
        "url": None if url is None else str(url),
        "caption": caption,
        "image": files.get(image_ext) if image_ext else None,
        "image_ext": image_ext,
        "json": meta_text,
        "note": note,
        "duplicate_of": duplicate_of,
    }


def member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lowercased extension) of a tar member by webdataset's rule: the key is the path up to the first
    dot of the file name (folders with dots included); None for what belongs to no sample (folders, hidden and
    webdataset-reserved files, names without an extension)."""
    if not member.isfile():
        return None
    m = _KEY_EXT.match(member.name)
    if m is None or posixpath.basename(member.name).startswith((".", "__")):
        return None
    return m.group(1), m.group(2).lower()


def count_samples(path: str, storage_options: dict[str, Any] | None = None) -> int:
    """Samples in one shard without reading images: tar headers (seeking past the data where the file allows it)
    or the parquet footer. An unreadable shard counts what was read before the damage."""
    fs, p = fs_and_path(path, storage_options)
    if p.endswith(".parquet"):
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    n, last = 0, None
    try:
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r:*" if f.seekable() else "r|*") as tf:
            for member in tf:
                ke = member_key(member)
                if ke is not None and ke[0] != last:
                    n, last = n + 1, ke[0]
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def iter_tar_samples(f: Any, size: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The one tar sample iterator (run, training data, report): (key, {ext: bytes}) per sample, consecutive members
    grouped by `member_key`; streaming (`r|`), so S3 is read once, front to back.

    A member whose extension the current sample already has (`c.jpg c.jpg c.txt`) starts a new sample with the same
    key (webdataset raises "duplicate file name" there): nothing is dropped, the reader marks the repeat.

    A tar cut exactly at a member boundary reads like a complete one to `tarfile`; an uncompressed tar of known `size`
    must still hold its end-of-archive marker (two zero blocks) after the last member, or it is reported truncated.
    """
    key, files = None, {}
    with tarfile.open(fileobj=f, mode="r|*") as tf:
        for member in tf:
            ke = member_key(member)
            if ke is None:
                continue
            k, ext = ke
            data = tf.extractfile(member).read()  # raises tarfile.ReadError when the tar is cut inside this member
            if key is not None and (k != key or ext in files):
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


class ShardReader:
    """One shard -> its samples as READ_FIELDS dicts, in order. Never raises for bad data.

    A tar that is cut short or not a tar still gives every sample read before the damage; afterwards `error` holds
    the reason (None when the shard was read to its end), so the job reports the shard as failed with its readable
    samples written, while every other shard completes.
    """

    def __init__(self, shard: Shard, storage_options: dict[str, Any] | None = None) -> None:
        self.shard, self.storage_options = shard, storage_options
        self.count = 0
        self.error: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        first: dict[str, int] = {}  # key -> idx of its first sample: a repeat is marked, never merged or dropped
        try:
            fs, path = fs_and_path(self.shard.path, self.storage_options)
            tar = self.shard.format == "tar"
            if tar and not path.endswith(TAR_SUFFIXES):
                raise ValueError(f"cannot read a {shard_suffix(path)} shard (readable: {', '.join(TAR_SUFFIXES)})")
            with fs.open(path, "rb") as f:
                samples = iter_tar_samples(f, fs.size(path)) if tar else _iter_parquet_samples(f)
                for key, files in samples:
                    yield _sample_row(self.shard.name, self.count, key, files, first.get(key))
                    first.setdefault(key, self.count)
                    self.count += 1
        except Exception as e:  # noqa: BLE001 - any reader failure is this shard's failure, reported in the summary
            self.error = f"{type(e).__name__}: {e} (after {self.count} samples)"


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


def tmp_path(path: str, attempt: int = 0) -> str:
    """The temporary name of `path` for one attempt at it: two attempts at a shard never share one, a retry removes
    its predecessors' by name, and `clean_tmp` what a killed run left. The leading dot hides it from pyarrow."""
    return posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.a{attempt}.tmp")


class AtomicFile:
    """A file that appears under its name only on `commit()`, complete.

    Local: written to a temporary name, renamed on commit. Object stores (S3, GCS): written to the final key, which
    the store shows only once the upload completes on close; `abort()` discards the upload (a multipart upload that
    a SIGKILL left behind is removed by `clean_tmp` on the rerun).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, attempt: int = 0) -> None:
        self.fs, self.path = fs, path
        self.local = _is_local(fs)
        self.write_path = tmp_path(path, attempt) if self.local else path
        if self.local:
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            for earlier in range(attempt):  # what a dead worker's attempt left
                if os.path.exists(tmp_path(path, earlier)):
                    os.remove(tmp_path(path, earlier))
        self.f = fs.open(self.write_path, "wb")

    def commit(self) -> None:
        self.f.close()
        if self.local:
            os.replace(self.write_path, self.path)

    def abort(self) -> None:
        try:
            if self.local:
                self.f.close()
                os.remove(self.write_path)
            elif hasattr(self.f, "discard"):  # fsspec buffered files: drop the buffer / abort the multipart upload
                self.f.discard()
        except Exception:  # noqa: BLE001 - best effort on the way out; the rerun cleans up
            pass


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, attempt: int = 0) -> None:
    af = AtomicFile(fs, path, attempt)
    try:
        af.f.write(data)
    except BaseException:
        af.abort()
        raise
    af.commit()


class ShardWriter:
    """One shard's outputs, written by the worker that computes them, rows in sample order.

    Kept samples stream into `tars/{shard}.tar` as they come (webdataset's TarWriter, fixed mtime: the same rows give
    the same bytes), so image bytes are never held for a whole shard; the parquet rows (small) are held and written
    at commit. `commit()` writes the parquet, then the state file `_state/{shard}.json` last: the commit point.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        shard: str,
        attempt: int = 0,
        record: dict[str, Any] | None = None,
    ) -> None:
        import webdataset as wds

        self.fs, self.root, self.shard, self.attempt = fs, root, shard, attempt
        self.record = record or {}  # written into the state file as is: the input's fingerprint, who computed it
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        self.tar_file = AtomicFile(fs, posixpath.join(root, "tars", f"{shard}.tar"), attempt)
        self.sink = _Sink(self.tar_file.f)
        self.tar = wds.TarWriter(self.sink, encoder=False, mtime=0.0, mode=0o644, user="", group="")

    def add(self, row: dict[str, Any]) -> None:
        """An output row (capfilt.schema.OUT_COLUMNS + `image`/`image_ext` bytes for kept samples)."""
        if row["kept"]:
            key = row["key"]
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
            self.tar.write(
                {
                    "__key__": key,
                    row.get("image_ext") or "jpg": row["image"],
                    "txt": "\n".join(row["kept_texts"]).encode("utf-8"),
                    "json": json.dumps(meta).encode("utf-8"),
                }
            )
        self.rows.append({c: row.get(c) for c in OUT_COLUMNS})

    def commit(self, read_error: str | None = None) -> dict[str, Any]:
        """Close the tar, write the parquet, then the state file. Returns the shard's stats (its state record)."""
        self.tar.close()
        self.tar_file.commit()
        pq_path = posixpath.join(self.root, "parquet", f"{self.shard}.parquet")
        write_parquet_atomic(self.fs, pq_path, self.rows, self.attempt)
        stats = {"shard": self.shard, "state": "failed" if read_error else "done", "error": read_error}
        stats.update(shard_stats(self.rows))
        stats["seconds"] = round(time.time() - self.started, 3)
        stats["finished"] = round(time.time(), 3)
        stats["attempt"] = self.attempt
        stats.update(self.record)
        state = json.dumps(stats).encode("utf-8")
        write_bytes_atomic(self.fs, state_path(self.root, self.shard), state, self.attempt)
        return stats

    def abort(self) -> None:
        self.sink.dead = True  # the tar stream's own close (or its __del__) must not write into a dropped file
        self.tar_file.abort()


class _Sink:
    """The file a TarWriter writes to, cut off on abort."""

    def __init__(self, f: Any) -> None:
        self.f, self.dead = f, False

    def write(self, data: bytes) -> int:
        return len(data) if self.dead else self.f.write(data)


def write_parquet_atomic(
    fs: fsspec.AbstractFileSystem, path: str, rows: list[dict[str, Any]], attempt: int = 0
) -> None:
    af = AtomicFile(fs, path, attempt)
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=OUT_SCHEMA), af.f)
    except BaseException:
        af.abort()
        raise
    af.commit()


def write_failed_state(
    fs: fsspec.AbstractFileSystem, root: str, shard: str, error: str, input_fingerprint: str | None = None
) -> dict[str, Any]:
    """A shard that could not be processed at all: its state says failed (and why), so a rerun retries it."""
    record = {"shard": shard, "state": "failed", "error": error, "in": 0, "input": input_fingerprint}
    write_bytes_atomic(fs, state_path(root, shard), json.dumps(record).encode("utf-8"))
    return record


def state_path(root: str, shard: str) -> str:
    return posixpath.join(root, "_state", f"{shard}.json")


def iter_states(fs: fsspec.AbstractFileSystem, root: str, chunk: int = 256) -> Iterator[dict[str, Any]]:
    """Every shard's state record under `root/_state`, fetched `chunk` at a time (concurrently on object stores)."""
    state_dir = posixpath.join(root, "_state")
    if not fs.isdir(state_dir):
        return
    paths = [
        p
        for p in fs.ls(state_dir, detail=False)
        if posixpath.basename(p).endswith(".json") and not posixpath.basename(p).startswith(".")
    ]
    for i in range(0, len(paths), chunk):
        part = paths[i : i + chunk]
        got = fs.cat(part)
        for p in part:
            yield json.loads(got[p])


def read_states(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """Every shard's state record, by shard name."""
    return {s["shard"]: s for s in iter_states(fs, root)}


def clean_tmp(fs: fsspec.AbstractFileSystem, root: str, before: float | None = None) -> int:
    """Remove what a killed run left: local temporaries, or the incomplete multipart uploads under `root` on S3
    (never visible as objects, but billed), only those older than `before` (a time.time(); the moment this job took
    the output's lease: never a live job's). Call it before any worker writes; returns how many were removed."""
    removed = 0
    if _is_local(fs):
        for sub in ("parquet", "tars", "_state", ""):
            d = posixpath.join(root, sub) if sub else root
            if fs.isdir(d):
                for p in fs.ls(d, detail=False):
                    if posixpath.basename(p).startswith(".") and p.endswith(".tmp"):
                        try:
                            if before is None or os.path.getmtime(p) < before:
                                fs.rm(p)
                                removed += 1
                        except FileNotFoundError:  # its writer renamed or removed it meanwhile
                            pass
        return removed
    if hasattr(fs, "list_multipart_uploads"):  # s3fs
        bucket, _, prefix = root.partition("/")
        for up in fs.list_multipart_uploads(bucket):
            started = up.get("Initiated")
            if before is not None and started is not None and started.timestamp() >= before:
                continue
            if up["Key"].startswith(prefix.rstrip("/") + "/"):
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                removed += 1
    return removed


# ------------------------------------------------------------------------------------------------ reaching a store


class StorageError(OSError):
    """A store that cannot be reached or used (connection, credentials, permissions): one `error:` line."""


def check_store(url: str, storage_options: dict[str, Any] | None, role: str, timeout: float = 8.0) -> None:
    """One cheap call on the store behind `url` (does the path exist?), bounded: few retries, short connection
    timeouts, and a deadline for stores without such options. Raises StorageError naming the URL and the cause, so an
    unreachable endpoint or bad credentials are reported in seconds, before Ray starts, not after the client's retries
    (botocore's and s3fs's together: ~30 s and a 150-line traceback)."""
    import threading

    so = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a"):
        config = dict(so.get("config_kwargs") or {})
        config.setdefault("connect_timeout", 3)
        config.setdefault("read_timeout", 5)
        config["retries"] = {"max_attempts": 2, "mode": "standard"}
        so.update(config_kwargs=config)
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **so)
            if protocol in ("s3", "s3a"):
                fs.retries = 1  # s3fs's own retries (5, with back-off) on top of botocore's
            fs.exists(path)
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - reported below, whatever the client raised
            result.append(e)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if not result:
        raise StorageError(f"{role} {url}: no answer from the store within {timeout:.0f} s")
    e = result[0]
    if e is not None:
        text = " ".join(str(e).split()) or type(e).__name__
        raise StorageError(f"{role} {url}: cannot reach the store ({type(e).__name__}: {text[:300]})") from None
