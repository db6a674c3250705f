"""The job summary of `capfilt run`: counts and merged score histograms from the per-shard state records.

Built on the driver from one small record per shard (never from sample rows), incrementally: memory is a few hundred
bytes per shard plus the merged histograms. Written as `summary.json` + `summary.png`, and printed as one screen.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np

from capfilt.schema import COUNT_KEYS, HIST_BINS, HIST_RANGES
from pipelines.io import write_bytes_atomic


class SummaryBuilder:
    """Add every shard's state record (or None when it has none); `build()` gives the summary dict."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(COUNT_KEYS, 0)
        self.hists = {k: np.zeros(HIST_BINS, dtype=np.int64) for k in HIST_RANGES}
        self.per_shard: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.names: set[str] = set()
        self.orphans: list[str] = []
        self.nodes: dict[str, dict[str, float]] = {}  # this run's shards by the node that committed them

    def add(
        self, name: str, path: str | None, state: dict[str, Any] | None, orphan: bool = False, this_run: bool = False
    ) -> None:
        """One shard's state record (histograms merged here; the record itself is not kept). An `orphan` is a shard
        whose input is gone but whose rows are still in the output: counted (the summary describes the folder's
        parquet), listed apart, never failed."""
        self.names.add(name)
        if state is None:
            state = {"state": "failed", "error": "not processed (no output state)"}
        if orphan:
            self.orphans.append(name)
        elif state.get("state") != "done":
            self.failed.append({"shard": name, "path": path, "error": state.get("error")})
        row = {"shard": name, "state": state.get("state"), "error": state.get("error")}
        for k in ("input", "node", "actor", "batch_size", "seconds", "attempt"):
            if state.get(k) is not None:
                row[k] = state[k]
        if orphan:
            row["input"] = None  # the input shard no longer exists
        if this_run and state.get("node") and state.get("state") == "done":
            n = self.nodes.setdefault(state["node"], {"shards": 0, "samples": 0, "first": 1e300, "last": 0.0})
            finished, seconds = float(state.get("finished", 0.0)), float(state.get("seconds", 0.0))
            n["shards"] += 1
            n["samples"] += int(state.get("in", 0))
            n["first"], n["last"] = min(n["first"], finished - seconds), max(n["last"], finished)
        for k in COUNT_KEYS:
            row[k] = int(state.get(k, 0))
            self.totals[k] += row[k]
        self.per_shard.append(row)
        for k, v in (state.get("histograms") or {}).items():
            if k in self.hists:
                self.hists[k] += np.asarray(v, dtype=np.int64)

    def build(
        self,
        head: dict[str, Any],
        *,
        skipped: int,
        changed: list[str],
        interrupted: bool,
        elapsed: float,
        n_rows: int,
        driver: dict[str, Any],
    ) -> dict[str, Any]:
        """summary.json: `head` (what ran: input, output, models, settings), this job's shard bookkeeping, the totals
        and histograms of every shard, then this job's own timing (`n_rows` samples in `elapsed` s)."""
        t = self.totals
        return {
            **head,
            "shards_skipped": skipped,
            "shards_changed": changed,
            "interrupted": interrupted,
            "shards": len(self.per_shard),
            "shards_done": len(self.per_shard) - len(self.failed),
            "failed_shards": sorted(self.failed, key=lambda f: f["shard"]),
            "orphaned_shards": sorted(self.orphans),
            "counts": dict(t),
            "kept_fraction": round(t["kept"] / t["ok"], 4) if t["ok"] else None,
            "quantiles": {k: quantiles(h.tolist(), *HIST_RANGES[k]) for k, h in self.hists.items()},
            "histograms": {k: {"range": list(HIST_RANGES[k]), "counts": h.tolist()} for k, h in self.hists.items()},
            "per_shard": sorted(self.per_shard, key=lambda r: r["shard"]),
            "per_node": self.per_node(),
            "seconds": round(elapsed, 2),
            "rows_this_run": n_rows,
            "rows_per_second": round(n_rows / elapsed, 2) if elapsed > 0 and n_rows else None,
            "driver": driver,
        }

    def per_node(self) -> list[dict[str, Any]]:
        """This run's shards per node: a slow node or a straggler shows (samples/s over the node's busy span, first
        shard start to last commit)."""
        rows = []
        for node, n in sorted(self.nodes.items()):
            span = n["last"] - n["first"]
            rate = round(n["samples"] / span, 2) if span > 0 else None
            rows.append(
                {"node": node, "shards": int(n["shards"]), "samples": int(n["samples"]), "samples_per_second": rate}
            )
        return rows


def quantiles(
    hist: list[int], lo: float, hi: float, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
) -> dict[str, float] | None:
    """Quantiles from a merged fixed-bin histogram (resolution: one bin, (hi - lo) / HIST_BINS)."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total == 0:
        return None
    cdf = np.cumsum(h) / total
    width = (hi - lo) / len(h)
    out = {}
    for q in qs:
        i = min(int(np.searchsorted(cdf, q)), len(h) - 1)
        prev = cdf[i - 1] if i else 0.0
        frac = (q - prev) / (cdf[i] - prev) if cdf[i] > prev else 0.5
        out[f"p{round(q * 100)}"] = round(lo + (i + frac) * width, 4)
    return out


def write_summary(fs: Any, root: str, summary: dict[str, Any], threshold: float) -> None:
    write_bytes_atomic(fs, posixpath.join(root, "summary.json"), json.dumps(summary, indent=2).encode("utf-8"))
    hists = {k: np.asarray(v["counts"]) for k, v in summary["histograms"].items()}
    write_bytes_atomic(fs, posixpath.join(root, "summary.png"), plot_histograms(hists, threshold))


COLORS = {"web": "#1f77b4", "synthetic": "#ff7f0e"}


def draw_scores(ax: Any, hists: dict[str, np.ndarray], names: list[str], lo: float, hi: float, threshold=None) -> int:
    """Score histograms (`web_*` / `synthetic_*` counts over [lo, hi]) on one matplotlib axis, the threshold marked;
    shared by summary.png and the HTML report. Returns the number of scores drawn."""
    n = 0
    for name in names:
        counts = np.asarray(hists[name])
        who = "web" if name.startswith("web") else "synthetic"
        edges = np.linspace(lo, hi, len(counts) + 1)
        ax.stairs(counts, edges, fill=True, alpha=0.55, color=COLORS[who], label=f"{who} (n={int(counts.sum())})")
        n += int(counts.sum())
    if threshold is not None:
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1.5, label=f"threshold {threshold:g}")
    ax.set_xlim(lo, hi)
    ax.set_ylabel("texts")
    ax.legend(fontsize=8, loc="best")
    return n


def plot_histograms(hists: dict[str, np.ndarray], threshold: float) -> bytes:
    """ITM and ITC score histograms of web texts and synthetic captions, the threshold marked -> PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("itm", "itc")):
        lo, hi = HIST_RANGES[f"web_{metric}"]
        draw_scores(ax, hists, [f"web_{metric}", f"synthetic_{metric}"], lo, hi, threshold if metric == "itm" else None)
        ax.set_xlabel("ITM match probability" if metric == "itm" else "ITC cosine similarity")
    fig.suptitle("capfilt run: filter scores of web text and synthetic captions")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def format_summary(s: dict[str, Any]) -> str:
    """The one screen printed at the end of a run."""
    c = s["counts"]
    rate = f", {s['rows_per_second']} rows/s" if s.get("rows_per_second") else ""
    lines = [
        f"capfilt run -> {s['output']}  ({s['seconds']} s, {s['rows_this_run']} rows this run{rate})",
        f"  shards   {s['shards']} total: {s['shards_done']} done ({s['shards_skipped']} skipped as already done), "
        f"{len(s['failed_shards'])} failed",
        f"  samples  {c['in']} in: {c['kept']} kept, {c['dropped']} dropped, {c['decode_errors']} decode errors, "
        f"{c['other_errors']} other" + (f" ({c['duplicate_keys']} repeated keys)" if c.get("duplicate_keys") else ""),
        f"  kept by  web text {c['web_kept']}, synthetic caption {c['synthetic_kept']}"
        + (f"  (kept fraction of decoded: {s['kept_fraction']})" if s["kept_fraction"] is not None else ""),
    ]
    for k in ("web_itm", "synthetic_itm"):
        q = s["quantiles"].get(k)
        if q:
            lines.append(f"  {k:<14} " + "  ".join(f"{n} {v:.3f}" for n, v in q.items()))
    d = s.get("driver")
    if d and d.get("records"):
        lines.append(
            f"  driver   {d['records']} shard records ({d['record_bytes'] // max(1, d['records'])} B each), "
            f"{d['cpu_seconds']} CPU s, {d['retries']} retries, {d['workers_lost']} workers lost"
        )
    for n in s.get("per_node") or []:
        lines.append(
            f"  node     {_short_id(n['node'])}: {n['shards']} shards, {n['samples']} samples, {n['samples_per_second']} samples/s"
        )
    if s.get("orphaned_shards"):
        lines.append(f"  no input {len(s['orphaned_shards'])} shards in the output (--prune removes them)")
    for f in s["failed_shards"][:10]:
        lines.append(f"  FAILED {f['shard']}: {f['error']}")
    if len(s["failed_shards"]) > 10:
        lines.append(f"  ... and {len(s['failed_shards']) - 10} more failed shards (summary.json)")
    out = s["output"].rstrip("/")
    lines.append(f"  parquet: pd.read_parquet('{out}/parquet')   kept tars: {out}/tars/   summary.json, summary.png")
    return "\n".join(lines)


def _short_id(node: str) -> str:
    """Ray node ids are 56 hex digits; both ends, because ids of nodes from one provider can share a long prefix."""
    return node if len(node) <= 16 else f"{node[:8]}..{node[-6:]}"
