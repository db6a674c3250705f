"""`capfilt ingest`: download a URL list with img2dataset into webdataset shards that `capfilt run` reads.

img2dataset does the work (threads per process, per-shard `NNNNN.tar` + `NNNNN.parquet` + `NNNNN_stats.json`).
Here we only validate the input, choose settings that suit capfilt, run it, and summarise its stats files.

img2dataset forks worker processes and installs a SIGINT handler, which only works from a main thread of a
main module. So `ingest()` runs it in a child interpreter (`python -m pipelines.ingest CONFIG_JSON`), which makes
it safe to call from the CLI, from tests and from inside a Ray task alike.

Defaults keep the downloaded bytes: capfilt decodes and resizes images itself, and re-encoding would lose quality
and EXIF. JPEGs are stored byte for byte; other formats (PNG, WebP, ...) are converted to JPEG (quality 95)
because the shards name every image `KEY.jpg`; bytes that are not an image at all fail as `failed_to_resize`.
Every input row appears in the shard's parquet sidecar with its status, successful or not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from capfilt.decode import DEFAULT_MAX_PIXELS

# file extension -> img2dataset input_format
INPUT_FORMATS = {
    ext + gz: fmt + gz
    for ext, fmt in {
        ".parquet": "parquet",
        ".csv": "csv",
        ".tsv": "tsv",
        ".txt": "txt",
        ".jsonl": "jsonl",
        ".json": "json",
    }.items()
    for gz in ("", ".gz")
    if not (fmt == "parquet" and gz)
}
# columns img2dataset writes itself; an input column with one of these names cannot be carried through
RESERVED_COLUMNS = frozenset(
    "key caption url width height original_width original_height status error_message exif md5 sha256 sha512".split()
)
RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")
# capfilt's decoder refuses images above its pixel cap as decompression bombs: do not spend disk on them here either
MAX_IMAGE_AREA = DEFAULT_MAX_PIXELS


class IngestError(ValueError):
    """A problem with the URL list or the options, worded for the user."""


@dataclass
class UrlList:
    """What `inspect_url_list` found out about the input."""

    path: str
    files: list[str]
    input_format: str
    columns: list[str]
    rows: int
    extra_columns: list[str]  # carried into each sample's .json and the parquet sidecar


@dataclass
class IngestResult:
    """Totals over every `NNNNN_stats.json` of an output folder."""

    output: str
    shards: list[str] = field(default_factory=list)  # tar paths
    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    errors: Counter = field(default_factory=Counter)  # error message -> count (img2dataset's capped counter)
    input_rows: int | None = None
    seconds: float | None = None

    @property
    def failed(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    def summary(self, top: int = 8) -> str:
        """A one-screen human summary."""
        pct = f" ({100 * self.successes / self.count:.1f}%)" if self.count else ""
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        lines = [f"ingest -> {self.output}{took}", f"  shards     {len(self.shards):>8}"]
        if self.input_rows is not None:
            lines.append(f"  input rows {self.input_rows:>8}")
        lines += [
            f"  processed  {self.count:>8}",
            f"  success    {self.successes:>8}{pct}",
            f"  failed     {self.failed:>8}  (download {self.failed_to_download}, decode/resize {self.failed_to_resize})",
        ]
        if self.input_rows is not None and self.count != self.input_rows:
            lines.append(f"  WARNING: {self.input_rows - self.count} input rows have no result; rerun to resume")
        if self.errors:
            lines.append("  top errors:")
            for msg, n in self.errors.most_common(top):
                msg = " ".join(str(msg).split())
                lines.append(f"    {n:>6}  {msg[:100]}")
        return "\n".join(lines)


def _format_of(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(INPUT_FORMATS, key=len, reverse=True):  # ".csv.gz" before ".gz"-less ".csv"
        if name.endswith(ext):
            return INPUT_FORMATS[ext]
    return None


def _read_table(fs: fsspec.AbstractFileSystem, path: str, fmt: str, columns: list[str] | None = None) -> Any:
    """Read a URL file the way img2dataset's reader does (pyarrow), optionally only some columns."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=compression) as f:
        if base == "txt":
            return pcsv.read_csv(f, read_options=pcsv.ReadOptions(column_names=["url"]))
        if base in ("csv", "tsv"):
            parse = pcsv.ParseOptions(delimiter="\t" if base == "tsv" else ",")
            return pcsv.read_csv(f, parse_options=parse, convert_options=pcsv.ConvertOptions(include_columns=columns))
        if base == "jsonl":
            return pjson.read_json(f)
        return pa.Table.from_pandas(pd.read_json(f))


def inspect_url_list(
    url_list: str, url_col: str = "url", caption_col: str | None = "caption", storage_options: dict | None = None
) -> UrlList:
    """Check the URL list exists, has the named columns and at least one URL; raise `IngestError` otherwise."""
    import pyarrow.lib
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(url_list, **(storage_options or {}))
    if not fs.exists(path):
        raise IngestError(f"URL list not found: {url_list}")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if _format_of(p))
        formats = {_format_of(p) for p in files}
        if not files:
            raise IngestError(f"no URL files ({', '.join(INPUT_FORMATS)}) in folder {url_list}")
        if len(formats) > 1:
            raise IngestError(f"folder {url_list} mixes URL file formats {sorted(formats)}; keep one per folder")
        fmt = formats.pop()
        # img2dataset globs only the top level of a folder
        if any(p.rsplit("/", 1)[0] != path.rstrip("/") for p in files):
            raise IngestError(f"URL files must sit directly in {url_list}, not in subfolders")
    else:
        fmt = _format_of(path)
        if fmt is None:
            raise IngestError(f"cannot tell the format of {url_list}: use one of {', '.join(INPUT_FORMATS)}")
        files = [path]

    rows, columns = 0, None
    for p in files:
        try:
            if fmt == "parquet":  # the footer says it all: no need to load a list of millions of rows
                with fs.open(p, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                    names, n = meta.schema.to_arrow_schema().names, meta.num_rows
            else:
                table = _read_table(fs, p, fmt)
                names, n = table.column_names, table.num_rows
        except (pyarrow.lib.ArrowInvalid, ValueError, UnicodeDecodeError) as e:
            raise IngestError(f"cannot read {p} as {fmt}: {e}") from e
        if columns is None:
            columns = names
        elif names != columns:
            raise IngestError(f"{p} has columns {names}, unlike {files[0]} ({columns})")
        rows += n
    assert columns is not None
    if fmt.startswith("txt"):
        url_col, caption_col = "url", None  # a .txt list is one URL per line, no captions
    if url_col not in columns:
        raise IngestError(f"URL column {url_col!r} not in {url_list} (columns: {', '.join(columns)}); use --url-col")
    if caption_col is not None and caption_col not in columns:
        raise IngestError(
            f"caption column {caption_col!r} not in {url_list} (columns: {', '.join(columns)}); "
            "use --caption-col NAME, or --caption-col '' for none"
        )
    if rows == 0:
        raise IngestError(f"URL list {url_list} is empty")
    # pandas' saved index ("__index_level_0__") is not data
    extra = [
        c
        for c in columns
        if c not in (url_col, caption_col) and c not in RESERVED_COLUMNS and not c.startswith("__index_level_")
    ]
    return UrlList(url_list, files, fmt, columns, rows, extra)


def read_stats(output: str, storage_options: dict | None = None) -> IngestResult:
    """Add up img2dataset's `NNNNN_stats.json` files in `output`."""
    fs, path = fsspec.core.url_to_fs(output, **(storage_options or {}))
    result = IngestResult(output=output)
    if not fs.exists(path):
        return result
    for stats_file in sorted(fs.glob(path.rstrip("/") + "/*_stats.json")):
        with fs.open(stats_file, "r") as f:
            s = json.load(f)
        result.count += s["count"]
        result.successes += s["successes"]
        result.failed_to_download += s["failed_to_download"]
        result.failed_to_resize += s["failed_to_resize"]
        result.errors.update({k: v for k, v in s.get("status_dict", {}).items() if k != "success"})
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    result.shards = [prefix + p for p in sorted(fs.glob(path.rstrip("/") + "/*.tar"))]
    return result


def ingest(
    url_list: str,
    output: str,
    url_col: str = "url",
    caption_col: str | None = "caption",
    image_size: int | None = None,
    resize_mode: str = "keep_ratio",
    processes: int = 1,
    threads: int = 64,
    shard_size: int = 10_000,
    timeout: int = 10,
    retries: int = 0,
    overwrite: bool = False,
    storage_options: dict | None = None,
    verbose: bool = False,
) -> IngestResult:
    """Download `url_list` into webdataset shards in `output` and return the totals of its stats files.

    image_size None keeps the original bytes; an int resizes with `resize_mode` (smaller side to image_size for
    "keep_ratio"), only ever down. A rerun resumes: shards that already have a stats file are skipped, unless
    `overwrite`. Raises `IngestError` for a bad list or option, RuntimeError if img2dataset itself fails.
    """
    if image_size is not None and image_size <= 0:
        raise IngestError(f"--image-size must be positive, got {image_size}")
    if resize_mode not in RESIZE_MODES:
        raise IngestError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if processes < 1 or threads < 1 or shard_size < 1:
        raise IngestError("--processes, --threads and --shard-size must be at least 1")
    caption_col = caption_col or None
    info = inspect_url_list(url_list, url_col, caption_col, storage_options)
    if info.input_format.startswith("txt"):
        url_col, caption_col = "url", None
    keep = image_size is None
    config: dict[str, Any] = dict(
        url_list=url_list,
        output_folder=output,
        input_format=info.input_format,
        url_col=url_col,
        caption_col=caption_col,
        save_additional_columns=info.extra_columns or None,
        output_format="webdataset",
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=shard_size,
        # shard names: enough digits for every shard of this list
        oom_shard_count=max(5, math.ceil(math.log10(max(2, math.ceil(info.rows / shard_size) + 1)))),
        timeout=timeout,
        retries=retries,
        image_size=image_size or 256,  # unused when resize_mode is "no"
        resize_mode="no" if keep else resize_mode,
        resize_only_if_bigger=True,
        skip_reencode=keep,  # JPEG in -> the same bytes out
        encode_format="jpg",
        encode_quality=95,
        max_image_area=MAX_IMAGE_AREA,
        incremental_mode="overwrite" if overwrite else "incremental",
        enable_wandb=False,
    )
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations otherwise asks PyPI for a newer version
    root = str(Path(__file__).resolve().parents[1])  # so `-m pipelines.ingest` resolves without an install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if storage_options:
        config["storage_options"] = storage_options
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.ingest", json.dumps(config)],
        env=env,
        stdout=None if verbose else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"img2dataset failed (exit {proc.returncode}):\n{tail}")
    fs, out_path = fsspec.core.url_to_fs(output, **(storage_options or {}))
    tmp = out_path.rstrip("/") + "/_tmp"
    if fs.exists(tmp):  # img2dataset leaves its sharded URL list behind on object stores
        fs.rm(tmp, recursive=True)
    result = read_stats(output, storage_options)
    result.input_rows = info.rows
    result.seconds = time.perf_counter() - start
    return result


def _run_img2dataset(config: dict[str, Any]) -> None:
    """The child process: img2dataset's `download` with our settings (see `ingest`)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # imghdr, albumentations
    logging.getLogger("albumentations").setLevel(logging.ERROR)
    storage_options = config.pop("storage_options", None)
    if storage_options:
        # img2dataset opens paths with fsspec.core.url_to_fs(path) and no options: make them the protocol's default
        for path in (config["url_list"], config["output_folder"]):
            protocol = fsspec.core.split_protocol(path)[0]
            if protocol not in (None, "file", "local"):
                fsspec.config.conf.setdefault(protocol, {}).update(storage_options)
    from img2dataset import download

    download(**config)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m pipelines.ingest CONFIG_JSON  (internal; use `capfilt ingest`)")
    _run_img2dataset(json.loads(sys.argv[1]))
