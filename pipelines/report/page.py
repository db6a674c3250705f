"""`capfilt report`: gather (gather.py) then render (render.py) one self-contained HTML page, and write it."""

from __future__ import annotations

import posixpath
from typing import Any

from pipelines.io import fs_and_path, read_states
from pipelines.report.gather import DEFAULT_THRESHOLD, attach_thumbnails, merge_summary, read_json, scan_output
from pipelines.report.render import render_html


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
    fs, root = fs_and_path(output_dir, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"output folder {output_dir!r} does not exist")
    summary = read_json(fs, posixpath.join(root, "summary.json"))
    # summary.json is pipelines/run/summary.py's: its settings hold the run's threshold, its `input` the run's input
    if threshold is None:
        threshold = summary["settings"]["threshold"] if summary else DEFAULT_THRESHOLD
    threshold = float(threshold)
    if input is None and summary:
        input = summary["input"]
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
    ofs, opath = fs_and_path(out, storage_options)
    parent = posixpath.dirname(opath)
    if parent and not ofs.isdir(parent):
        ofs.makedirs(parent, exist_ok=True)
    with ofs.open(opath, "wb") as f:
        f.write(page.encode("utf-8"))
    return out
