"""`capfilt report`: one self-contained HTML page for a `capfilt run` output folder.

What it reads (the layout written by pipelines/run.py through pipelines/io.py):
  OUT/summary.json             job counts, per-shard stats, run settings (threshold, input)
  OUT/parquet/{shard}.parquet  one row per input sample (key, shard, scores, decisions, status, ...)
  OUT/_state/{shard}.json      per-shard stats (state "done" | "failed"), used when summary.json is absent
  OUT/tars/{shard}.tar         kept samples: original image bytes + kept texts
  the input shards             (`--input`, default: the input recorded in summary.json) for dropped samples' images

What it writes: a single HTML file with no external resources (CSS inline, charts and thumbnails as base64 data
URIs), so it can be mailed or opened from an object store. Memory stays bounded on big runs: the parquet files are
scanned one at a time, histograms accumulate into fixed bins, and only the `max_samples` cards shown keep their rows;
image bytes are read only for those cards, one shard at a time.
"""

from __future__ import annotations

import base64
import datetime as dt
import heapq
import html
import io
import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.io import OUT_COLUMNS

THUMB_PX = 128  # longest side of a contact-sheet thumbnail
THUMB_QUALITY = 80
HIST_BINS = 50
DEFAULT_THRESHOLD = 0.5
MAX_SHARD_ROWS = 1000  # shard table rows shown (failed shards always first)
ERROR_CARD_SHARE = 0.1  # share of the cards reserved for samples that failed (decode errors, ...)

# the per-sample columns the report needs: the run's output contract minus the metadata json
_COLUMNS = [c for c in OUT_COLUMNS if c != "json"]
_SCORES = {  # histogram name -> (column, range)
    "web_itm": ("web_itm", (0.0, 1.0)),
    "synthetic_itm": ("synthetic_itm", (0.0, 1.0)),
    "web_itc": ("web_itc", (-1.0, 1.0)),
    "synthetic_itc": ("synthetic_itc", (-1.0, 1.0)),
}
# per-shard counts, as pipelines/io.shard_stats names them; the job adds failed_shards
SHARD_COUNTS = ("in", "kept", "dropped", "decode_errors", "other_errors", "web_kept", "synthetic_kept")
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
    counts: dict[str, int] = field(default_factory=dict)  # in, kept, dropped, decode_errors, other_errors

    @property
    def kept_ratio(self) -> float:
        n = self.counts.get("in", 0)
        return self.counts.get("kept", 0) / n if n else 0.0


@dataclass
class Scan:
    """Everything the page shows, gathered in one pass over the parquet files."""

    counts: dict[str, int]  # computed from the parquet rows (+ failed shards from the state files)
    shards: dict[str, ShardRow]
    hists: dict[str, np.ndarray]  # name -> (HIST_BINS,) int64 counts
    cards: list[dict[str, Any]]  # selected rows, in display order


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
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
    hists = {name: np.zeros(HIST_BINS, dtype=np.int64) for name in _SCORES}
    shards: dict[str, ShardRow] = {}
    scored: list[tuple[float, int, dict[str, Any]]] = []  # max-heap on margin via negation, size <= max_samples
    failed: list[dict[str, Any]] = []  # first max_samples rows whose status is not "ok"
    tiebreak = 0
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[c for c in _COLUMNS if c in pq.read_schema(f).names])
        for name, (col, (lo, hi)) in _SCORES.items():
            if col not in table.column_names:
                continue
            arr = table[col]
            if str(arr.type).startswith(("list", "large_list")):
                arr = pc.list_flatten(arr)
            vals = arr.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            hists[name] += np.histogram(np.clip(vals, lo, hi), bins=HIST_BINS, range=(lo, hi))[0]
        for row in table.to_pylist():
            shard = row.get("shard") or posixpath.splitext(posixpath.basename(path))[0]
            s = shards.setdefault(shard, ShardRow(shard, counts=dict.fromkeys(SHARD_COUNTS, 0)))
            status = row.get("status") or "ok"
            s.counts["in"] += 1
            if row.get("kept"):
                s.counts["kept"] += 1
                web, kept_texts = row.get("caption"), list(row.get("kept_texts") or [])
                s.counts["web_kept"] += web is not None and web in kept_texts
                s.counts["synthetic_kept"] += any(t != web for t in kept_texts)
            elif status == "ok":
                s.counts["dropped"] += 1
            elif status == "decode_error":
                s.counts["decode_errors"] += 1
            else:
                s.counts["other_errors"] += 1
            if status != "ok":
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
        s = shards.setdefault(name, ShardRow(name, counts=dict.fromkeys(SHARD_COUNTS, 0)))
        s.state, s.error = st.get("state", "done"), st.get("error")
    counts = {k: sum(s.counts[k] for s in shards.values()) for k in SHARD_COUNTS}
    counts["failed_shards"] = sum(1 for s in shards.values() if s.state == "failed")
    return Scan(counts, shards, hists, _pick_cards(scored, failed, max_samples))


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


# ------------------------------------------------------------------------------------------------ charts


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histogram_charts(hists: dict[str, np.ndarray], threshold: float) -> list[tuple[str, str, int]]:
    """-> [(title, PNG data URI, number of scores)]: ITM web, ITM synthetic (threshold marked), ITC both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.summary import draw_scores

    charts = []
    panels = [
        ("ITM match probability: web texts", ["web_itm"], (0.0, 1.0), True),
        ("ITM match probability: synthetic captions", ["synthetic_itm"], (0.0, 1.0), True),
        ("ITC cosine similarity", ["web_itc", "synthetic_itc"], (-1.0, 1.0), False),
    ]
    for title, names, (lo, hi), mark in panels:
        fig, ax = plt.subplots(figsize=(4.8, 2.8))
        n = draw_scores(ax, hists, names, lo, hi, threshold if mark else None)
        ax.set_xlabel("score")
        ax.set_title(title, fontsize=10)
        charts.append((title, _png(fig), n))
    return charts


def shard_chart(shards: list[ShardRow]) -> str | None:
    """Stacked bars per shard (kept / dropped / failed samples); a kept-ratio line for many shards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not shards:
        return None
    if len(shards) <= 40:
        fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.28 * len(shards)))
        y = np.arange(len(shards))
        left = np.zeros(len(shards))
        for label, key, color in (
            ("kept", "kept", "#2ca02c"),
            ("dropped", "dropped", "#bbbbbb"),
            ("decode errors", "decode_errors", "#d62728"),
            ("other errors", "other_errors", "#9467bd"),
        ):
            v = np.array([s.counts.get(key, 0) for s in shards], dtype=np.float64)
            if label.startswith("other") and not v.any():
                continue
            ax.barh(y, v, left=left, color=color, label=label)
            left += v
        ax.set_yticks(y, [s.shard + (" (failed)" if s.state == "failed" else "") for s in shards], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("samples")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        fig, ax = plt.subplots(figsize=(6.4, 2.6))
        ax.bar(np.arange(len(shards)), [s.kept_ratio for s in shards], width=1.0, color="#2ca02c")
        ax.set_ylim(0, 1)
        ax.set_xlabel(f"shard (sorted by name, {len(shards)} shards)")
        ax.set_ylabel("kept / in")
    ax.set_title("kept and dropped samples per shard", fontsize=10)
    return _png(fig)


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:12px}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:8px;margin:8px 0}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.counts td{font-size:18px;font-weight:600}.charts img{margin:4px;border:1px solid #ddd;background:#fff}
.bar{display:flex;width:160px;height:10px;background:#eee}.bar span{display:block;height:10px}
.k{background:#2ca02c}.d{background:#bbb}.e{background:#d62728}.o{background:#9467bd}
.sheet{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px}
.card{background:#fff;border:1px solid #ddd;border-left:5px solid #bbb;padding:8px;display:flex;gap:8px}
.card.kept{border-left-color:#2ca02c}.card.failed{border-left-color:#d62728}
.thumb{flex:0 0 128px;height:128px;display:flex;align-items:center;justify-content:center;background:#f4f4f4}
.ph{width:120px;height:120px;display:flex;align-items:center;justify-content:center;text-align:center;
 font-size:11px;color:#a00;background:repeating-linear-gradient(45deg,#fde,#fde 6px,#fff 6px,#fff 12px);
 overflow:hidden;word-break:break-word}
.txt{font-size:12px;min-width:0;word-break:break-word}.txt ul{margin:2px 0;padding-left:16px}
.badge{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:11px;font-weight:600}
.b-kept{background:#2ca02c}.b-dropped{background:#888}.b-failed{background:#d62728}
.s{font-family:ui-monospace,monospace;font-size:11px;color:#555}.in{color:#1a7f1a;font-weight:600}
.key{font-family:ui-monospace,monospace;font-size:11px;color:#666}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _text(t: str, limit: int = 200) -> str:
    """A quoted text, cut at `limit` characters on the card (web alt-text can be kilobytes long)."""
    if len(t) <= limit:
        return f"“{_e(t)}”"
    return f'“{_e(t[:limit])}…” <span class="s">({len(t)} characters)</span>'


def _score(itm: Any, itc: Any, threshold: float) -> str:
    if itm is None:
        return '<span class="s">no score</span>'
    cls = "s in" if float(itm) >= threshold else "s"
    itc_s = "" if itc is None else f" · ITC {float(itc):.3f}"
    return f'<span class="{cls}" data-itm="{float(itm):.6f}">ITM {float(itm):.3f}{itc_s}</span>'


def _card(c: dict[str, Any], threshold: float) -> str:
    failed = (c.get("status") or "ok") != "ok"
    verdict = "failed" if failed else ("kept" if c.get("kept") else "dropped")
    if "_thumb" in c:
        uri, w, h = c["_thumb"]
        pic = f'<img src="{uri}" width="{w}" height="{h}" alt="{_e(c["key"])}">'
    else:
        pic = f'<div class="ph" title="{_e(c.get("_placeholder"))}">{_e(c.get("status"))}<br>{_e(c.get("_placeholder"))}</div>'
    lines = [
        f'<span class="badge b-{verdict}">{verdict}</span> <span class="key">{_e(c["key"])} · {_e(c.get("shard"))}</span>'
    ]
    if c.get("reason") and not c.get("kept"):
        lines.append(f"<div>reason: <b>{_e(c['reason'])}</b></div>")
    if failed and c.get("error"):
        lines.append(f'<div class="s">{_e(c["error"])}</div>')
    web = c.get("caption")
    lines.append(
        "<div>web: "
        + (
            _text(web) + " " + _score(c.get("web_itm"), c.get("web_itc"), threshold)
            if web is not None
            else "<i>none</i>"
        )
        + "</div>"
    )
    caps = c.get("synthetic_captions") or []
    itms, itcs = c.get("synthetic_itm") or [], c.get("synthetic_itc") or []
    if caps:
        items = "".join(
            f"<li>{_text(t)} {_score(itms[i] if i < len(itms) else None, itcs[i] if i < len(itcs) else None, threshold)}</li>"
            for i, t in enumerate(caps)
        )
        lines.append(f"<div>synthetic:<ul>{items}</ul></div>")
    if c.get("url"):
        lines.append(f'<div class="s">{_e(c["url"])}</div>')
    margin = c.get("_margin")
    if margin is not None and math.isfinite(margin):
        lines.append(f'<div class="s">closest score is {margin:.3f} from the threshold</div>')
    return (
        f'<div class="card {verdict}" data-key="{_e(c["key"])}" data-shard="{_e(c.get("shard"))}" data-verdict="{verdict}">'
        f'<div class="thumb">{pic}</div><div class="txt">{"".join(lines)}</div></div>'
    )


def _shard_table(shards: list[ShardRow]) -> str:
    shown = sorted(shards, key=lambda s: (s.state != "failed", s.shard))[:MAX_SHARD_ROWS]
    rows = []
    for s in shown:
        n = max(s.counts.get("in", 0), 1)
        bar = "".join(
            f'<span class="{cls}" style="width:{100 * s.counts.get(k, 0) / n:.1f}%"></span>'
            for k, cls in (("kept", "k"), ("dropped", "d"), ("decode_errors", "e"), ("other_errors", "o"))
        )
        cells = "".join(
            f'<td data-col="{k}">{s.counts.get(k, 0)}</td>'
            for k in ("in", "kept", "dropped", "decode_errors", "other_errors")
        )
        state = _e(s.state) + (f'<br><span class="s">{_e(s.error)}</span>' if s.error else "")
        rows.append(
            f'<tr data-shard="{_e(s.shard)}"><td class="l">{_e(s.shard)}</td><td class="l" data-col="state">{state}</td>{cells}'
            f'<td data-col="kept_ratio">{s.kept_ratio:.3f}</td><td><div class="bar">{bar}</div></td></tr>'
        )
    more = f'<p class="meta">{len(shards) - len(shown)} more shards not listed.</p>' if len(shards) > len(shown) else ""
    head = (
        '<tr><th class="l">shard</th><th class="l">state</th><th>in</th><th>kept</th><th>dropped</th>'
        "<th>decode errors</th><th>other errors</th><th>kept ratio</th><th></th></tr>"
    )
    return f'<table class="shards">{head}{"".join(rows)}</table>{more}'


def render_html(
    *,
    title: str,
    counts: dict[str, int],
    threshold: float,
    scan: Scan,
    summary: dict[str, Any] | None,
    warnings_: list[str],
    max_samples: int,
) -> str:
    shown_counts = [k for k in COUNT_NAMES if k in counts and (k != "other_errors" or counts[k])]
    count_table = (
        '<table class="counts"><tr>'
        + "".join(f"<th>{COUNT_LABELS[k]}</th>" for k in shown_counts)
        + "</tr><tr>"
        + "".join(f'<td data-count="{k}">{counts.get(k, 0)}</td>' for k in shown_counts)
        + "</tr></table>"
    )
    if counts.get("in"):
        count_table += (
            f'<p class="meta">kept {100 * counts.get("kept", 0) / counts["in"]:.1f}% of the input samples.</p>'
        )
    failed = (summary or {}).get("failed_shards", [])
    if failed:
        count_table += "<p><b>failed shards</b> (rerun the same `capfilt run` to retry them):</p><ul>" + "".join(
            f'<li><span class="key">{_e(f.get("path") or f.get("shard"))}</span>: {_e(f.get("error"))}</li>'
            for f in failed[:50]
        )
        count_table += (
            f"<li>... and {len(failed) - 50} more (summary.json)</li>" if len(failed) > 50 else ""
        ) + "</ul>"
    charts = "".join(
        f'<img src="{uri}" alt="{_e(t)}" title="{_e(t)} ({n} scores)">'
        for t, uri, n in histogram_charts(scan.hists, threshold)
    )
    shard_list = sorted(scan.shards.values(), key=lambda s: s.shard)
    bar = shard_chart(shard_list)
    bar_img = f'<img src="{bar}" alt="kept and dropped per shard">' if bar else ""
    settings = {
        **({"captioner": summary.get("captioner"), "filter": summary.get("filter")} if summary else {}),
        **((summary or {}).get("settings") or {}),
    }
    settings_html = ""
    if isinstance(settings, dict) and settings:
        settings_html = (
            "<details><summary>run settings</summary><table>"
            + "".join(
                f'<tr><td class="l">{_e(k)}</td><td class="l">{_e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>'
                for k, v in sorted(settings.items())
            )
            + "</table></details>"
        )
    warn = "".join(f'<div class="warn">{_e(w)}</div>' for w in warnings_)
    cards = "".join(_card(c, threshold) for c in scan.cards)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>capfilt report: {_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>capfilt report</h1>
<div class="meta">{_e(title)} · generated {now} · ITM threshold <b data-threshold="{threshold:g}">{threshold:g}</b></div>
{warn}
<h2>Counts</h2>
{count_table}
{settings_html}
<h2>Scores</h2>
<div class="charts">{charts}</div>
{_quantile_table(summary)}
<h2>Shards</h2>
<div class="charts">{bar_img}</div>
{_shard_table(shard_list)}
<h2>Samples</h2>
<p class="meta">{len(scan.cards)} cards (at most {max_samples}): samples whose closest ITM score lies nearest the
threshold first, then samples that failed. Green scores pass the threshold.</p>
<div class="sheet">{cards}</div>
</body></html>
"""


def _quantile_table(summary: dict[str, Any] | None) -> str:
    """summary.json's score quantiles (from its merged histograms), one row per score."""
    qs = (summary or {}).get("quantiles")
    if not isinstance(qs, dict) or not any(isinstance(v, dict) for v in qs.values()):
        return ""
    cols = sorted({k for v in qs.values() if isinstance(v, dict) for k in v}, key=lambda k: float(k.lstrip("p")))
    head = '<tr><th class="l">score</th>' + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    rows = "".join(
        f'<tr><td class="l">{_e(name)}</td>'
        + "".join(f"<td>{v[c]:.3f}</td>" if isinstance(v, dict) and c in v else "<td>-</td>" for c in cols)
        + "</tr>"
        for name, v in qs.items()
    )
    return f'<p class="meta">quantiles (summary.json)</p><table class="quantiles">{head}{rows}</table>'


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
        s = scan.shards.setdefault(name, ShardRow(name, counts=dict.fromkeys(SHARD_COUNTS, 0)))
        s.state, s.error = st.get("state") or s.state, st.get("error")
        for k in SHARD_COUNTS:
            if isinstance(st.get(k), int) and st[k] != s.counts[k]:
                diff.append(f"shard {name} {k} {st[k]} vs {s.counts[k]}")
                s.counts[k] = st[k]
    if diff:
        warns.append("summary.json disagrees with the parquet rows (summary vs rows): " + ", ".join(diff[:20]))
    counts.update(stated)
    return counts, warns


def write_report(
    output_dir: str,
    out: str | None = None,
    max_samples: int = 200,
    input: str | None = None,
    storage_options: dict[str, Any] | None = None,
    threshold: float | None = None,
) -> str:
    """Build the HTML report of a `capfilt run` output folder; returns the path written (default OUT/report.html)."""
    if max_samples < 0:
        raise ValueError(f"max_samples must be >= 0, got {max_samples}")
    fs, root = _fs(output_dir, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"output folder {output_dir!r} does not exist")
    summary = _read_json(fs, posixpath.join(root, "summary.json"))
    # summary.json is pipelines/summary.py's: its settings hold the run's threshold, its `input` the run's input
    if threshold is None:
        threshold = summary["settings"]["threshold"] if summary else DEFAULT_THRESHOLD
    threshold = float(threshold)
    if input is None and summary:
        input = summary["input"]
    from pipelines.io import read_states

    scan = scan_output(fs, root, threshold, max_samples, read_states(fs, root))
    counts, warns = merge_summary(scan, summary)
    attach_thumbnails(scan.cards, fs, root, input, storage_options)
    page = render_html(
        title=output_dir,
        counts=counts,
        threshold=threshold,
        scan=scan,
        summary=summary,
        warnings_=warns,
        max_samples=max_samples,
    )
    out = out or posixpath.join(output_dir.rstrip("/"), "report.html")
    ofs, opath = _fs(out, storage_options)
    parent = posixpath.dirname(opath)
    if parent and not ofs.isdir(parent):
        ofs.makedirs(parent, exist_ok=True)
    with ofs.open(opath, "wb") as f:
        f.write(page.encode("utf-8"))
    return out
