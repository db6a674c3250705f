"""The output contract of `capfilt run` and `capfilt select`, declared once: one parquet row per input sample.

    SampleResult    what CapFiltStage computes for one sample (its fields are the stage's columns, RESULT_COLUMNS)
    OUT_SCHEMA      the parquet's columns in order with their types: the input sample's, SampleResult's, the status
    shard_stats     a shard's counts (COUNT_KEYS) and fixed-bin score histograms (HIST_BINS over HIST_RANGES): the
                    state record's numbers, merged by pipelines/run/summary.py and recounted from the parquet by the report

Rows travel as dicts from the stage to the writer (pipelines/io.ShardWriter), which builds the table once per shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa


def _column(arrow_type: pa.DataType, default: Any = None) -> Any:
    """A SampleResult field and its parquet type. The defaults (empty lists, None, not kept) are the result of a
    sample the stage could not score."""
    if pa.types.is_list(arrow_type):
        return field(default_factory=list, metadata={"arrow": arrow_type})
    return field(default=default, metadata={"arrow": arrow_type})


@dataclass
class SampleResult:
    """CapFiltStage's result for one sample."""

    synthetic_captions: list[str] = _column(pa.list_(pa.string()))
    web_itm: float | None = _column(pa.float32())  # None: no web text
    web_itc: float | None = _column(pa.float32())
    synthetic_itm: list[float] = _column(pa.list_(pa.float32()))
    synthetic_itc: list[float] = _column(pa.list_(pa.float32()))
    kept_texts: list[str] = _column(pa.list_(pa.string()))  # web text first when kept, then kept synthetic captions
    kept: bool = _column(pa.bool_(), False)
    reason: str | None = _column(pa.string())  # None when kept; else "below_threshold" | "no_text" | the row's status


RESULT_COLUMNS = tuple(f.name for f in fields(SampleResult))

OUT_SCHEMA = pa.schema(
    [
        # the input sample, as pipelines/io.ShardReader reads it
        ("key", pa.string()),
        ("url", pa.string()),
        ("shard", pa.string()),
        ("idx", pa.int64()),  # position in the input shard
        ("caption", pa.string()),  # the web text; None when missing
        *((f.name, f.metadata["arrow"]) for f in fields(SampleResult)),
        ("status", pa.string()),  # "ok" | "decode_error" | "duplicate_key"
        ("error", pa.string()),  # the decode error, else a read note (non-UTF-8 caption, bad .json)
        ("json", pa.string()),  # the input's metadata (img2dataset's .json), as read
    ]
)
OUT_COLUMNS = OUT_SCHEMA.names

# ------------------------------------------------------------------------------------------------ per-shard stats

COUNT_KEYS = (
    "in",
    "ok",
    "kept",
    "dropped",
    "decode_errors",
    "other_errors",
    "duplicate_keys",  # also counted in other_errors
    "web_kept",
    "synthetic_kept",
)
# Fixed bins make the shards' histograms mergeable (and a state record's size independent of the shard's samples)
HIST_BINS = 200
HIST_RANGES = {"web_itm": (0.0, 1.0), "synthetic_itm": (0.0, 1.0), "web_itc": (-1.0, 1.0), "synthetic_itc": (-1.0, 1.0)}


def count_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """COUNT_KEYS over output rows (OUT_COLUMNS dicts)."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for r in rows:
        status, kept = r.get("status"), bool(r.get("kept"))
        counts["in"] += 1
        counts["ok"] += status == "ok"
        counts["kept"] += kept
        counts["dropped"] += status == "ok" and not kept
        counts["decode_errors"] += status == "decode_error"
        counts["other_errors"] += status not in ("ok", "decode_error")
        counts["duplicate_keys"] += status == "duplicate_key"
        if kept:
            web, texts = r.get("caption"), list(r.get("kept_texts") or [])
            counts["web_kept"] += web is not None and web in texts
            counts["synthetic_kept"] += any(t != web for t in texts)
    return counts


def score_histograms(rows: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """HIST_BINS-bin histograms (int64 counts) of every score in HIST_RANGES' columns; out-of-range scores are clipped
    into the end bins."""
    vals: dict[str, list[float]] = {col: [] for col in HIST_RANGES}
    for r in rows:
        for col, v in vals.items():
            x = r.get(col)
            if x is not None:
                v.extend(x if isinstance(x, list | tuple | np.ndarray) else [x])
    hists = {}
    for col, (lo, hi) in HIST_RANGES.items():
        x = np.clip(np.asarray(vals[col], dtype=np.float64), lo, hi)
        hists[col] = np.histogram(x, bins=HIST_BINS, range=(lo, hi))[0]
    return hists


def shard_stats(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """A shard's counts and score histograms (as lists: its JSON state record's numbers)."""
    return {**count_rows(rows), "histograms": {col: h.tolist() for col, h in score_histograms(rows).items()}}
