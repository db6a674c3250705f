"""`capfilt report`: one self-contained HTML page for a `capfilt run` output folder.

What it reads (the layout written by pipelines/run/job.py through pipelines/io.py):
  OUT/summary.json             job counts, per-shard stats, run settings (threshold, input)
  OUT/parquet/{shard}.parquet  one row per input sample (key, shard, scores, decisions, status, ...)
  OUT/_state/{shard}.json      per-shard stats (state "done" | "failed"), used when summary.json is absent
  OUT/tars/{shard}.tar         kept samples: original image bytes + kept texts
  the input shards             (`--input`, default: the input recorded in summary.json) for dropped samples' images

What it writes: a single HTML file with no external resources (CSS inline, charts and thumbnails as base64 data
URIs), so it can be mailed or opened from an object store. Memory stays bounded on big runs: the parquet files are
scanned one at a time, histograms accumulate into fixed bins, and only the `max_samples` cards shown keep their rows;
image bytes are read only for those cards, one shard at a time.

This module gathers (scan the parquet rows, pick the cards, fetch their thumbnails, reconcile with summary.json);
pipelines/report/render.py renders.
"""

from __future__ import annotations

import base64
import heapq
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from capfilt.schema import COUNT_KEYS, HIST_BINS, HIST_RANGES, OUT_COLUMNS, count_rows, score_histograms

THUMB_PX = 128  # longest side of a contact-sheet thumbnail
THUMB_QUALITY = 80
CHART_BINS = 50  # the page's histogram bars: HIST_BINS // CHART_BINS of the summary's bins each
DEFAULT_THRESHOLD = 0.5
MAX_SHARD_ROWS = 1000  # shard table rows shown (failed shards always first)
ERROR_CARD_SHARE = 0.1  # share of the cards reserved for samples that failed (decode errors, ...)

# the per-sample columns the report needs: the run's output contract minus the metadata json
_COLUMNS = [c for c in OUT_COLUMNS if c != "json"]
COUNT_NAMES = ("in", "kept", "dropped", "decode_errors", "other_errors", "failed_shards", "web_kept", "synthetic_kept")
COUNT_LABELS = {
    "in": "in",
    "kept": "kept",
    "dropped": "dropped",
    "decode_errors": "decode errors",
    "other_errors": "other errors",
    "failed_shards": "failed shards",
    "web_kept": "kept with web text",
    "synthetic_kept": "kept with a synthetic caption",
}


# ------------------------------------------------------------------------------------------------ reading the output


@dataclass
class ShardRow:
    shard: str
    state: str = "done"  # "done" | "failed"
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # capfilt.schema.COUNT_KEYS

    @property
    def kept_ratio(self) -> float:
        n = self.counts.get("in", 0)
        return self.counts.get("kept", 0) / n if n else 0.0


@dataclass
class Scan:
    """Everything the page shows, gathered in one pass over the parquet files."""

    counts: dict[str, int]  # computed from the parquet rows (+ failed shards from the state files)
    shards: dict[str, ShardRow]
    hists: dict[str, np.ndarray]  # score column -> (CHART_BINS,) int64 counts
    cards: list[dict[str, Any]]  # selected rows, in display order


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    if not fs.isfile(path):
        return None
    with fs.open(path, "rb") as f:
        return json.load(f)


def _margin(row: dict[str, Any], threshold: float) -> float:
    """Distance of the sample's closest score to the threshold: the smaller, the more borderline the decision."""
    scores = [row["web_itm"]] if row.get("web_itm") is not None else []
    scores += [s for s in (row.get("synthetic_itm") or []) if s is not None]
    return min((abs(float(s) - threshold) for s in scores), default=math.inf)


def scan_output(
    fs: fsspec.AbstractFileSystem, root: str, threshold: float, max_samples: int, states: dict[str, dict[str, Any]]
) -> Scan:
    pq_dir = posixpath.join(root, "parquet")
    files = sorted(p for p in (fs.ls(pq_dir, detail=False) if fs.isdir(pq_dir) else []) if _is_data_file(p))
    if not files:
        raise FileNotFoundError(f"no per-sample parquet files under {pq_dir!r}; is this a `capfilt run` output folder?")
    hists = {col: np.zeros(HIST_BINS, dtype=np.int64) for col in HIST_RANGES}
    shards: dict[str, ShardRow] = {}
    scored: list[tuple[float, int, dict[str, Any]]] = []  # max-heap on margin via negation, size <= max_samples
    failed: list[dict[str, Any]] = []  # first max_samples rows whose status is not "ok"
    tiebreak = 0
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[c for c in _COLUMNS if c in pq.read_schema(f).names])
        rows = table.to_pylist()
        # the numbers of the shards' state records, recounted from the rows by the same functions
        for col, h in score_histograms(rows).items():
            hists[col] += h
        stem = posixpath.splitext(posixpath.basename(path))[0]
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_shard.setdefault(row.get("shard") or stem, []).append(row)
        for shard, group in by_shard.items():
            s = shards.setdefault(shard, ShardRow(shard, counts=dict.fromkeys(COUNT_KEYS, 0)))
            for k, v in count_rows(group).items():
                s.counts[k] += v
        for row in rows:
            if row.get("status") != "ok":
                if len(failed) < max_samples:
                    failed.append(row)
                continue
            m = _margin(row, threshold)
            row["_margin"] = m
            tiebreak += 1
            item = (-m, -tiebreak, row)  # on equal margins keep the earlier row (deterministic)
            if len(scored) < max_samples:
                heapq.heappush(scored, item)
            elif item > scored[0]:
                heapq.heapreplace(scored, item)
    for name, st in states.items():  # shards with a state file: their verdict, and shards that produced no rows
        s = shards.setdefault(name, ShardRow(name, counts=dict.fromkeys(COUNT_KEYS, 0)))
        s.state, s.error = st.get("state", "done"), st.get("error")
    counts = {k: sum(s.counts[k] for s in shards.values()) for k in COUNT_KEYS}
    counts["failed_shards"] = sum(1 for s in shards.values() if s.state == "failed")
    charts = {col: h.reshape(CHART_BINS, -1).sum(axis=1) for col, h in hists.items()}  # adjacent bins merged
    return Scan(counts, shards, charts, _pick_cards(scored, failed, max_samples))


def _is_data_file(path: str) -> bool:
    base = posixpath.basename(path)
    return base.endswith(".parquet") and not base.startswith((".", "_"))


def _pick_cards(
    scored: list[tuple[float, int, dict[str, Any]]], failed: list[dict[str, Any]], max_samples: int
) -> list[dict[str, Any]]:
    """Borderline samples first (smallest margin), then a reserved share for failed samples (shown as placeholders),
    so decode errors stay visible on a page capped at `max_samples` cards."""
    by_margin = [r for _, _, r in sorted(scored, key=lambda t: (-t[0], -t[1]))]
    n_failed = min(len(failed), max(1, int(max_samples * ERROR_CARD_SHARE))) if failed and max_samples else 0
    n_scored = min(len(by_margin), max_samples - n_failed)
    n_failed = min(len(failed), max_samples - n_scored)  # fill up with failed rows when few samples were scored
    return by_margin[:n_scored] + failed[:n_failed]


# ------------------------------------------------------------------------------------------------ images


def thumbnail(data: bytes, px: int = THUMB_PX) -> tuple[str, int, int]:
    """Image bytes -> (JPEG data URI, width, height), the longest side `px`; raises DecodeError on a bad image.
    Decoded by capfilt.decode (a big JPEG decodes at 1/2..1/8 scale), so the report sees CapFilt's pixels."""
    from PIL import Image

    from capfilt.decode import load_rgb

    img, _, _ = load_rgb(data, draft_size=px)
    img.thumbnail((px, px), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.size[0], img.size[1]


def _images_from_tar(fs: fsspec.AbstractFileSystem, path: str, keys: set[str]) -> dict[str, bytes]:
    """Image bytes of `keys` from a webdataset tar (the reader `capfilt run` uses: same key rule, streaming)."""
    from pipelines.io import IMAGE_EXTS, iter_tar_samples

    out: dict[str, bytes] = {}
    if not keys or not fs.isfile(path):
        return out
    with fs.open(path, "rb") as f:
        for key, files in iter_tar_samples(f):
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if key in keys and ext is not None and key not in out:
                out[key] = files[ext]
                if len(out) == len(keys):
                    break
    return out


def _images_from_input(
    input: str, shard: str, keys: set[str], storage_options: dict[str, Any] | None, shard_index: dict[str, Any]
) -> tuple[dict[str, bytes], str | None]:
    """Image bytes of `keys` from the input shard the run named `shard` (img2dataset tar or parquet)."""
    from pipelines.io import ShardReader

    src = shard_index.get(shard)
    if src is None:
        return {}, f"input shard {shard!r} not found under {input!r}"
    out: dict[str, bytes] = {}
    for row in ShardReader(src, storage_options):
        if row["key"] in keys and row["image"] is not None:
            out[row["key"]] = row["image"]
            if len(out) == len(keys):
                break
    return out, None if len(out) == len(keys) else f"not found in input shard {src.path!r}"


def attach_thumbnails(
    cards: list[dict[str, Any]],
    fs: fsspec.AbstractFileSystem,
    root: str,
    input: str | None,
    storage_options: dict[str, Any] | None,
) -> None:
    """Sets `_thumb` (data URI, w, h) or `_placeholder` (why there is no picture) on every card."""
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for c in cards:
        by_shard.setdefault(c.get("shard") or "", []).append(c)
    shard_index: dict[str, Any] | None = None
    input_error = None
    for shard, group in sorted(by_shard.items()):
        found = _images_from_tar(
            fs, posixpath.join(root, "tars", f"{shard}.tar"), {c["key"] for c in group if c["kept"]}
        )
        missing = {c["key"] for c in group if c["key"] not in found}
        note = None
        if missing and input:
            if shard_index is None:
                from pipelines.io import list_shards

                try:
                    shard_index = {s.name: s for s in list_shards(input, storage_options)}
                except (FileNotFoundError, OSError, ValueError) as e:
                    shard_index, input_error = {}, f"cannot list input {input!r}: {e}"
            more, note = _images_from_input(input, shard, missing, storage_options, shard_index)
            found.update(more)
            note = input_error or note
        for c in group:
            data = found.get(c["key"])
            if data is None:
                c["_placeholder"] = (
                    c.get("error") or "no image"
                    if c.get("status") != "ok"
                    else (note or "image not in the output; pass --input to read it from the input shards")
                )
                continue
            try:
                c["_thumb"] = thumbnail(data)
            except Exception as e:  # noqa: BLE001 - a card shows why, the page still renders
                c["_placeholder"] = c.get("error") or f"cannot decode: {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------ entry point


def merge_summary(scan: Scan, summary: dict[str, Any] | None) -> tuple[dict[str, int], list[str]]:
    """The numbers to show: summary.json's (the job's own account), checked against the parquet rows.

    Shards in summary.json that left no rows (never processed) join the shard table as failed. Returns the counts
    and a warning for every number on which summary.json and the rows disagree (e.g. a run still going on).
    """
    counts = dict(scan.counts)
    if summary is None:
        return counts, ["summary.json is missing (the run did not finish?): counts are computed from the parquet rows."]
    warns = []
    stated = {k: int(v) for k, v in (summary.get("counts") or {}).items() if k in COUNT_NAMES and isinstance(v, int)}
    if isinstance(summary.get("failed_shards"), list):
        stated["failed_shards"] = len(summary["failed_shards"])
    diff = [f"{k} {v} vs {counts.get(k)}" for k, v in stated.items() if counts.get(k) != v]
    for st in summary.get("per_shard") or []:
        name = st.get("shard")
        s = scan.shards.setdefault(name, ShardRow(name, counts=dict.fromkeys(COUNT_KEYS, 0)))
        s.state, s.error = st.get("state") or s.state, st.get("error")
        for k in COUNT_KEYS:
            if isinstance(st.get(k), int) and st[k] != s.counts[k]:
                diff.append(f"shard {name} {k} {st[k]} vs {s.counts[k]}")
                s.counts[k] = st[k]
    if diff:
        warns.append("summary.json disagrees with the parquet rows (summary vs rows): " + ", ".join(diff[:20]))
    counts.update(stated)
    return counts, warns
