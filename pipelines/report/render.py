"""The HTML of `capfilt report`: charts (matplotlib, as base64 PNGs), sample cards, the shard table, the page.

Pure rendering from what pipelines/report/gather.py gathered (a `Scan`, summary.json, the counts); no I/O here.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from typing import Any

import numpy as np

from pipelines.report.gather import COUNT_LABELS, COUNT_NAMES, MAX_SHARD_ROWS, Scan, ShardRow

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

    from pipelines.run.summary import draw_scores

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
