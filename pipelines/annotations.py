"""`capfilt ingest --annotations FILE --image-root DIR OUT`: BLIP's annotation files as img2dataset-layout shards.

The files BLIP users already have (the original repo's `data/*_dataset.py` download them) come in three layouts,
told apart by their records:

- "train" (`coco_karpathy_train.json`, `flickr30k_train.json`): one record per caption,
  `{"image": "val2014/COCO_val2014_000000522418.jpg", "caption": "...", "image_id": "coco_522418"}`. The original
  dataset iterates the caption records (an epoch is one pass over the captions, each image ~5 times), so each record
  is one sample here too, its `image_id` kept in the sample's json.
- "eval" (`coco_karpathy_{val,test}.json`, `flickr30k_{val,test}.json`): one record per image with its caption list,
  `{"image": ..., "caption": ["...", ...]}`: one sample per image with every caption (retrieval ranks them all).
- "images" (`nocaps_{val,test}.json`): `{"image": ..., "img_id": 0}`, images only; captioning eval scores them against
  a COCO-format ground-truth file (`capfilt eval --ground-truth`).

Every command reads the result the same way as downloaded web shards (`KEY.jpg`, `KEY.txt` = the first caption,
`KEY.json` with `texts` = all captions + the record's own fields; `NNNNN.parquet` with one row per record, failures
included; `NNNNN_stats.json`), so there is one input format downstream. Images are read by a thread pool one shard
at a time (memory: one shard's window of images), JPEG bytes are kept as stored, other formats converted to JPEG
(quality 95) as `capfilt ingest` does for URL lists. A missing or unreadable image is a status row, never a crash.
A shard is done when its stats file exists (written last); a rerun skips done shards, and refuses to mix in shards
made from another annotation file or shard size.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from pipelines.ingest import IngestError, IngestResult, read_stats

LAYOUTS = {
    "train": "one sample per caption record (image, caption, image_id), as the original train datasets iterate",
    "eval": "one sample per image with all its captions (image, caption list): val/test for retrieval and captions",
    "images": "images only (image, img_id), as NoCaps: captioning eval needs --ground-truth",
}
JPEG_QUALITY = 95  # as pipelines.ingest converts non-JPEG downloads
# fields we write ourselves; a record field of the same name is not carried into the sample's json
OWN_FIELDS = frozenset({"key", "caption", "texts", "image", "status", "error_message", "width", "height"})


@dataclass
class Annotations:
    path: str
    records: list[dict[str, Any]]
    layout: str  # a key of LAYOUTS
    images: int  # distinct image paths
    captions: int
    size: int  # bytes of the file: part of the fingerprint a resumed output must match


def _layout_of(rec: Any) -> str:
    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
        raise ValueError('not an object with an "image" path')
    cap = rec.get("caption")
    if isinstance(cap, str):
        return "train"
    if isinstance(cap, list):
        if not cap or not all(isinstance(c, str) for c in cap):
            raise ValueError('"caption" is a list but not a non-empty list of strings')
        return "eval"
    if cap is None and "img_id" in rec:
        return "images"
    raise ValueError('no "caption" (string or list of strings) and no "img_id"')


def detect_layout(records: Any, name: str = "annotations") -> str:
    """The layout of a list of annotation records (every record must agree); IngestError names the first bad one."""
    if not isinstance(records, list) or not records:
        raise IngestError(f"{name}: expected a non-empty JSON list of records (BLIP's annotation files)")
    layout = None
    for i, rec in enumerate(records):
        try:
            this = _layout_of(rec)
        except ValueError as e:
            raise IngestError(f"{name}: record {i} {e}: {json.dumps(rec)[:200]}") from None
        if layout is None:
            layout = this
        elif this != layout:
            raise IngestError(f"{name}: record 0 is a {layout!r} record but record {i} is a {this!r} one")
    assert layout is not None
    return layout


def read_annotations(path: str, storage_options: dict | None = None) -> Annotations:
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not fs.exists(p):
        raise IngestError(f"annotation file not found: {path}")
    with fs.open(p, "rb") as f:
        try:
            records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IngestError(f"{path} is not JSON: {e}") from None
    name = p.rsplit("/", 1)[-1]
    layout = detect_layout(records, name)
    captions = sum(1 if layout == "train" else len(r.get("caption") or []) for r in records)
    images = len({r["image"] for r in records})
    return Annotations(path, records, layout, images, captions, fs.size(p))


def _texts(rec: dict[str, Any], layout: str) -> list[str]:
    if layout == "train":
        return [rec["caption"]]
    if layout == "eval":
        return list(rec["caption"])
    return []


def _read_image(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes | None, int, int, str, str | None]:
    """(JPEG bytes, width, height, status, error). Status as img2dataset's: "success", "failed_to_download" (the
    file cannot be read) or "failed_to_resize" (not an image capfilt can decode)."""
    from capfilt.decode import DecodeError, load_rgb

    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except Exception as e:  # noqa: BLE001 - missing, permission, network: a status row, not a crash
        return None, 0, 0, "failed_to_download", f"{type(e).__name__}: {e}"
    jpeg = raw[:3] == b"\xff\xd8\xff"
    try:
        # a JPEG is only checked (decoded at 1/8 scale: corrupt data fails here, not in training) and kept byte for
        # byte; anything else is decoded fully and stored as JPEG, since the shards name every image KEY.jpg
        img, w, h = load_rgb(raw, draft_size=32 if jpeg else None)
    except DecodeError as e:
        return None, 0, 0, "failed_to_resize", str(e)
    if jpeg:
        return raw, w, h, "success", None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), w, h, "success", None


def _ordered_window(items: list[Any], fn: Callable[[Any], Any], pool: ThreadPoolExecutor, window: int) -> Iterator:
    """pool.map in order, but with at most `window` results in flight (pool.map would read the whole shard ahead)."""
    pending: deque[Future] = deque()
    it = iter(items)
    for x in it:
        pending.append(pool.submit(fn, x))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))


def _shard_names(n_records: int, shard_size: int) -> tuple[int, int, int]:
    """(shards, digits of a shard name, digits of a key's in-shard index): img2dataset's naming."""
    shards = max(1, math.ceil(n_records / shard_size))
    oom_shard = max(5, math.ceil(math.log10(shards + 1)))  # as pipelines.ingest passes oom_shard_count
    oom_sample = math.ceil(math.log10(shard_size)) if shard_size > 1 else 0
    return shards, oom_shard, oom_sample


def _fingerprint(ann: Annotations, shard_size: int) -> dict[str, Any]:
    # the image root may move between runs (same images, another mount): not part of it
    return {
        "annotations": ann.path.rstrip("/").rsplit("/", 1)[-1],
        "bytes": ann.size,
        "records": len(ann.records),
        "layout": ann.layout,
        "shard_size": shard_size,
    }


def ingest_annotations(
    annotations: str,
    image_root: str,
    output: str,
    shard_size: int = 10_000,
    threads: int = 16,
    overwrite: bool = False,
    storage_options: dict | None = None,
    echo: Callable[[str], None] = print,
) -> IngestResult:
    """Write `annotations` (records whose `image` is relative to `image_root`) as webdataset shards into `output`.

    Returns the totals of the stats files (as `capfilt ingest` of a URL list). Raises IngestError for a bad file or
    an output made from other annotations or another shard size (unless `overwrite`).
    """
    if shard_size < 1 or threads < 1:
        raise IngestError("--shard-size and --threads must be at least 1")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    t0 = time.perf_counter()
    ann = read_annotations(annotations, storage_options)
    so = storage_options or {}
    img_fs, img_root = fsspec.core.url_to_fs(image_root, **so)
    if not img_fs.isdir(img_root):
        raise IngestError(f"--image-root {image_root} is not a folder")
    echo(
        f"{annotations}: {len(ann.records)} records, layout {ann.layout!r} ({LAYOUTS[ann.layout]}); "
        f"{ann.images} images, {ann.captions} captions"
    )
    out_fs, out = fsspec.core.url_to_fs(output, **so)
    out = out.rstrip("/")
    if overwrite and out_fs.exists(out):
        for pattern in ("*.tar", "*.parquet", "*_stats.json", "*.tmp"):
            for p in out_fs.glob(f"{out}/{pattern}"):
                out_fs.rm(p)
    out_fs.makedirs(out, exist_ok=True)
    fp = _fingerprint(ann, shard_size)
    shards, oom_shard, oom_sample = _shard_names(len(ann.records), shard_size)
    done: set[int] = set()
    for stats_file in out_fs.glob(f"{out}/*_stats.json"):
        with out_fs.open(stats_file, "r") as f:
            theirs = json.load(f).get("source")
        if theirs != fp:
            raise IngestError(
                f"{output} holds shards made from other input ({stats_file.rsplit('/', 1)[-1]}: {theirs} vs now "
                f"{fp}); use another OUT or --overwrite"
            )
        done.add(int(stats_file.rsplit("/", 1)[-1].split("_")[0]))
    if done:
        echo(f"resuming: {len(done)} of {shards} shards already done")

    def read(path: str) -> tuple[bytes | None, int, int, str, str | None]:
        return _read_image(img_fs, f"{img_root.rstrip('/')}/{path.lstrip('/')}")

    window = 4 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="ingest-read") as pool:
        for shard in range(shards):
            if shard in done:
                continue
            start = time.time()
            recs = ann.records[shard * shard_size : (shard + 1) * shard_size]
            # consecutive records of one image (a train file's ~5 captions) share one read
            reads: list[Any] = []
            for i, rec in enumerate(recs):
                if i and rec["image"] == recs[i - 1]["image"]:
                    reads.append(None)
                else:
                    reads.append(rec["image"])
            name = f"{shard:0{oom_shard}d}"
            tar_tmp, pq_tmp = f"{out}/{name}.tar.tmp", f"{out}/{name}.parquet.tmp"
            rows: list[dict[str, Any]] = []
            status: Counter = Counter()
            last: tuple[bytes | None, int, int, str, str | None] | None = None
            with out_fs.open(tar_tmp, "wb") as tar_f:
                tar = wds.TarWriter(tar_f, mtime=0.0)  # fixed mtime: a rerun writes the same bytes
                results = _ordered_window([r for r in reads if r is not None], read, pool, window)
                for i, (rec, r) in enumerate(zip(recs, reads)):
                    if r is not None or last is None:
                        last = next(results)
                    data, w, h, st, err = last
                    key = f"{shard * 10**oom_sample + i:0{oom_shard + oom_sample}d}"  # img2dataset's compute_key
                    texts = _texts(rec, ann.layout)
                    extra = {k: v for k, v in rec.items() if k not in OWN_FIELDS}
                    meta = {"key": key, "caption": texts[0] if texts else None, "texts": texts, "image": rec["image"]}
                    meta |= extra | {"status": st, "error_message": err, "width": w or None, "height": h or None}
                    status[st if st == "success" else (err or st)] += 1
                    rows.append({**meta, "_status": st})
                    if data is not None:
                        sample = {"__key__": key, "jpg": data, "json": json.dumps(meta).encode("utf-8")}
                        if texts:
                            sample["txt"] = texts[0].encode("utf-8")
                        tar.write(sample)
                tar.close()
            table = _sidecar(rows, pa)
            with out_fs.open(pq_tmp, "wb") as f:
                pq.write_table(table, f)
            out_fs.mv(tar_tmp, f"{out}/{name}.tar")
            out_fs.mv(pq_tmp, f"{out}/{name}.parquet")
            counts = Counter(r["_status"] for r in rows)
            end = time.time()
            stats = {
                "count": len(rows),
                "successes": counts["success"],
                "failed_to_download": counts["failed_to_download"],
                "failed_to_resize": counts["failed_to_resize"],
                "duration": end - start,
                "start_time": start,
                "end_time": end,
                "status_dict": dict(status),
                "source": fp,
            }
            with out_fs.open(f"{out}/{name}_stats.json", "w") as f:  # last: the shard's commit point
                json.dump(stats, f, indent=4)
    result = read_stats(output, storage_options)
    result.input_rows = len(ann.records)
    result.seconds = time.perf_counter() - t0
    return result


def _sidecar(rows: list[dict[str, Any]], pa: Any) -> Any:
    """The shard's parquet: one row per record (img2dataset's key/caption/status/error_message + the record's own
    fields). A record field whose values pyarrow cannot type as one column is stored as JSON text."""
    cols: dict[str, list[Any]] = {}
    names = list(dict.fromkeys(k for r in rows for k in r if k != "_status"))
    for k in names:
        cols[k] = [r.get(k) for r in rows]
    arrays = {}
    for k, v in cols.items():
        try:
            arrays[k] = pa.array(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            arrays[k] = pa.array([None if x is None else json.dumps(x) for x in v], pa.string())
    return pa.table(arrays)
