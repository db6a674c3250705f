"""`capfilt run`: CapFilt over img2dataset shards as one Ray Data streaming job, exactly-once at shard granularity.

    shards (done ones skipped) -> read + decode (CPU tasks, one streaming task per shard)
        -> CapFiltStage (a fixed pool of actors: one per GPU, or CPU actors) -> driver: per-shard writers

Why this shape: the GPU actors must stay a fixed pool fed in full batches, so the samples of all shards stream
through one Ray Data pipeline (Ray Data does the batching, backpressure, actor restarts and task retries). Output
must be per input shard with deterministic names, and resumable: each read task ends its shard with a marker row
(`kind="eos"`, the sample count); the driver routes result rows to one `ShardWriter` per open shard, drops the
duplicates a retry can produce (by sample index), and commits a shard once its marker and every index below it
arrived: parquet and tar renamed into place, then `_state/{shard}.json` written last as the commit point.
A rerun skips the shards whose state says done and recomputes (overwrites) the rest; captions are seeded per
sample key, so recomputed rows equal the lost ones.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import yaml

from pipelines.io import (
    HIST_BINS,
    HIST_RANGES,
    OUT_SCHEMA,
    Shard,
    ShardWriter,
    clean_tmp,
    list_shards,
    read_shard,
    read_states,
    write_bytes_atomic,
)

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "capfilt.yaml"
CRASH_ONCE_ENV = "CAPFILT_TEST_CRASH_ONCE"  # test hook: path of a marker file; the first actor batch exits the process

# What the CapFilt actors send back to the driver: the output row, plus the image bytes of kept samples.
RESULT_SCHEMA = OUT_SCHEMA.append(pa.field("kind", pa.string()))
RESULT_SCHEMA = RESULT_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field("image_ext", pa.string()))
RESULT_SCHEMA = RESULT_SCHEMA.append(pa.field("note", pa.string()))


# ------------------------------------------------------------------------------------------------ configuration


@dataclass
class RunConfig:
    input: str = ""
    output: str = ""
    captioner: str = "Salesforce/blip-image-captioning-large"
    filter: str = "Salesforce/blip-itm-large-coco"
    num_captions: int = 1
    top_p: float = 0.9
    max_length: int = 20
    min_length: int = 5
    repetition_penalty: float = 1.1
    threshold: float = 0.5
    seed: int = 0
    batch_size: int = 32  # images per CapFilt actor call
    actors: int | None = None  # None: one per GPU in the cluster, or one CPU actor when there is none
    actor_cpus: float = 1.0  # CPUs per CPU actor (also torch threads); GPU actors take 1 GPU + 1 CPU
    actor_restarts: int = 3  # an actor that dies mid-batch is restarted and the batch retried, this many times
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    max_pixels: int = 89_478_485  # decompression-bomb cap (PIL's default)
    read_block_rows: int = 64  # samples per block out of a read task (decoded together)
    address: str | None = None  # Ray cluster address ("auto"); None: start Ray in this process
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for input and output (s3 endpoint)
    progress: bool = True  # Ray Data progress bars + one line per committed shard
    test_crash_once: str | None = None  # test hook (also env CAPFILT_TEST_CRASH_ONCE)

    def validate(self) -> None:
        checks = [
            (self.num_captions >= 0, f"num_captions must be >= 0, got {self.num_captions}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.actors is None or self.actors >= 1, f"actors must be >= 1, got {self.actors}"),
            (self.actor_cpus > 0, f"actor_cpus must be > 0, got {self.actor_cpus}"),
            (self.actor_restarts >= 1, f"actor_restarts must be >= 1, got {self.actor_restarts}"),
            (
                0 <= self.min_length < self.max_length,
                f"need 0 <= min_length < max_length, got {self.min_length}, {self.max_length}",
            ),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}"),
            (self.read_block_rows >= 1, f"read_block_rows must be >= 1, got {self.read_block_rows}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}"),
            (isinstance(self.storage_options, dict), "storage_options must be a mapping"),
            (bool(self.input), "no --input given"),
            (bool(self.output), "no --output given"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> RunConfig:
    """YAML preset (default configs/capfilt.yaml) + overrides (CLI flags; None means "not given") -> RunConfig."""
    data: dict[str, Any] = {}
    p = Path(path) if path is not None else DEFAULT_CONFIG
    if path is not None or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{p}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if os.environ.get(CRASH_ONCE_ENV) and not data.get("test_crash_once"):
        data["test_crash_once"] = os.environ[CRASH_ONCE_ENV]
    try:
        cfg = RunConfig(**data)
    except TypeError as e:
        raise ValueError(f"bad configuration: {e}") from None
    cfg.validate()
    return cfg


def model_config(spec: str, role: str) -> Any:
    """Resolve a checkpoint (path or hub id) and read its BlipConfig without loading weights where possible."""
    from blip.config import BlipConfig
    from blip.convert import config_from_hf
    from blip.load import FORMAT_TAG, _resolve, read_checkpoint

    try:
        path = _resolve(spec)
        cfg_file = path / "config.json" if path.is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            d = json.loads(cfg_file.read_text())
            if d.get("format") == FORMAT_TAG or ("vision" in d and "family" in d):
                cfg = BlipConfig.from_dict(d)
            else:
                cfg = config_from_hf(d, None)
        else:
            cfg = read_checkpoint(path)[0]  # a bare .pth: sizes come from the weights' shapes
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{role} {spec!r}: {e}") from None
    allowed = {"captioner": ("caption", "pretrain"), "filter": ("retrieval", "pretrain")}[role]
    if cfg.family not in allowed:
        raise ValueError(f"{role} {spec!r} is a {cfg.family!r} checkpoint; a {role} must be one of {allowed}")
    return cfg


# ------------------------------------------------------------------------------------------------ Ray Data stages


def _read_decode_shards(
    batch: dict[str, np.ndarray], storage_options: dict[str, Any], rows_per_block: int, image_size: int, max_pixels: int
) -> Iterator[pa.Table]:
    """Ray Data task UDF, one shard per task: read the shard block by block and decode each block as it comes
    (bounded memory), ending with the shard's marker. One UDF rather than two map_batches, so Ray Data never
    bundles several shards into one task (a later batch_size would make it wait for that many rows)."""
    from capfilt.decode import DecodeStage

    stage = DecodeStage(image_size=image_size, max_pixels=max_pixels, image_column="image", fallback_columns=())
    stage.setup()
    for path, name, fmt in zip(batch["path"], batch["name"], batch["format"]):
        for table in read_shard(Shard(str(path), str(name), str(fmt)), storage_options, rows_per_block):
            yield _decode(stage, table)


def _decode(stage: Any, table: pa.Table) -> pa.Table:
    """DecodeStage over a block of READ_SCHEMA rows: adds `pixels` (B, S, S, 3) uint8, `status`, `error`, as a
    typed Arrow table (from a dict of numpy arrays Ray Data would turn an all-None string column into NaNs).
    Markers get a decode_error too; the actor passes them through untouched."""
    from ray.data.extensions import ArrowTensorArray

    out = stage({name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names})
    cols = {name: table.column(name) for name in table.column_names}
    cols["status"] = pa.array([str(v) for v in out["status"]], type=pa.string())
    cols["error"] = pa.array([_str(v) or None for v in out["error"]], type=pa.string())
    cols["pixels"] = ArrowTensorArray.from_numpy(out["pixels"])  # (B, S, S, 3) uint8
    return pa.table(cols)


def _value(v: Any) -> Any:
    """A numpy scalar / NaN-for-missing from a batch -> a plain Python value or None."""
    if v is None or (isinstance(v, float | np.floating) and np.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


class CapFiltActor:
    """Ray Data actor UDF around CapFiltStage: models loaded once per actor; returns `RESULT_SCHEMA` tables."""

    def __init__(self, stage_kwargs: dict[str, Any], threads: int | None, crash_once: str | None) -> None:
        import torch

        from capfilt.stages import CapFiltStage

        if threads:
            torch.set_num_threads(threads)
        self.crash_once = crash_once
        self.stage = CapFiltStage(**stage_kwargs)
        self.stage.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.crash_once and not os.path.exists(self.crash_once):
            Path(self.crash_once).write_text(f"crashed pid {os.getpid()}\n")
            os._exit(1)  # the test's actor death mid-batch: Ray restarts the actor and retries this batch
        kinds = [str(k) for k in batch["kind"]]
        sample = np.array([k == "sample" for k in kinds])
        n = len(kinds)
        result: dict[str, list[Any]] = {}
        if sample.any():
            result = self.stage({k: v[sample] for k, v in batch.items()})
        rows = []
        j = 0
        for i in range(n):
            base = {"kind": kinds[i], "shard": str(batch["shard"][i]), "idx": int(batch["idx"][i])}
            note = _str(batch["note"][i])
            if not sample[i]:
                rows.append({**base, "note": note})
                continue
            r = {c: result[c][j] for c in result}
            j += 1
            err = _str(r.get("error")) or None
            kept = bool(r["kept"])
            rows.append(
                {
                    **base,
                    "key": _str(r["key"]),
                    "url": _str(r["url"]),
                    "caption": _str(r["caption"]),
                    "synthetic_captions": list(r["synthetic_captions"]),
                    "web_itm": r["web_itm"],
                    "web_itc": r["web_itc"],
                    "synthetic_itm": list(r["synthetic_itm"]),
                    "synthetic_itc": list(r["synthetic_itc"]),
                    "kept_texts": list(r["kept_texts"]),
                    "kept": kept,
                    "reason": r["reason"],
                    "status": str(r["status"]),
                    # a decode error wins; else a read note (non-UTF-8 caption, bad .json) stays visible
                    "error": err or note,
                    "json": _str(r["json"]),
                    "image": _as_bytes(r["image"]) if kept else None,  # only kept images travel to the writer
                    "image_ext": _str(r["image_ext"]),
                    "note": None,
                }
            )
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _str(v: Any) -> str | None:
    """numpy batches turn missing strings into None or NaN: both become None."""
    v = _value(v)
    return None if v is None else str(v)


def _as_bytes(v: Any) -> bytes | None:
    v = _value(v)
    if v is None:
        return None
    return v.tobytes() if isinstance(v, np.ndarray) else bytes(v)


# ------------------------------------------------------------------------------------------------ the job


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run_capfilt(cfg: RunConfig, echo: Any = None) -> dict[str, Any]:
    """Run (or resume) the job. Returns the summary dict; `summary["failed_shards"]` non-empty means exit non-zero.

    Everything that can be checked without Ray is checked first: input shards, output folder, both models.
    """
    import ray

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.validate()
    so = cfg.storage_options
    shards = list_shards(cfg.input, so)
    cap_cfg = model_config(cfg.captioner, "captioner")
    filt_cfg = model_config(cfg.filter, "filter")
    image_size = max(cap_cfg.vision.image_size, filt_cfg.vision.image_size)
    out_fs, root = fsspec.core.url_to_fs(cfg.output, **so)
    root = root.rstrip("/")
    for sub in ("parquet", "tars", "_state"):
        out_fs.makedirs(posixpath.join(root, sub), exist_ok=True)
    clean_tmp(out_fs, root)
    states = read_states(out_fs, root)
    todo = [s for s in shards if states.get(s.name, {}).get("state") != "done"]
    skipped = len(shards) - len(todo)
    echo(f"capfilt run: {len(shards)} shards ({skipped} already done, {len(todo)} to do) -> {cfg.output}")

    t0 = time.time()
    n_rows = 0
    if todo:
        started_ray = False
        if not ray.is_initialized():
            ray.init(address=cfg.address, log_to_driver=cfg.progress, include_dashboard=False)
            started_ray = True
        try:
            n_rows = _execute(cfg, todo, image_size, out_fs, root, echo)
        finally:
            if started_ray:
                ray.shutdown()
    elapsed = time.time() - t0
    summary = build_summary(cfg, shards, read_states(out_fs, root), out_fs, root, skipped, elapsed, n_rows)
    echo(format_summary(summary))
    return summary


def _execute(cfg: RunConfig, todo: list[Shard], image_size: int, out_fs: Any, root: str, echo: Any) -> int:
    """The Ray Data pipeline; the driver commits shards as they complete. Returns the number of rows written."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    # Rows reach the driver in input order, so shards complete (and commit) one after another while the job runs:
    # a killed job loses at most the shards in flight, and few writers are open at once. Ray Data keeps working
    # ahead within its backpressure budget, so a slow block delays output, not the actors.
    ctx.execution_options.preserve_order = True
    gpus = _cluster_gpus() if cfg.device in ("auto", "cuda") else 0
    n_actors = cfg.actors or max(gpus, 1)
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    actor_res: dict[str, Any] = (
        {"num_gpus": 1, "num_cpus": 1} if device.startswith("cuda") else {"num_cpus": cfg.actor_cpus}
    )
    stage_kwargs = {
        "captioner": cfg.captioner,
        "filter": cfg.filter,
        "num_captions": cfg.num_captions,
        "top_p": cfg.top_p,
        "max_length": cfg.max_length,
        "min_length": cfg.min_length,
        "repetition_penalty": cfg.repetition_penalty,
        "threshold": cfg.threshold,
        "device": device,
        "dtype": cfg.dtype,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    threads = None if device.startswith("cuda") else max(1, int(cfg.actor_cpus))
    items = [{"path": s.path, "name": s.name, "format": s.format} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_decode_shards,
        fn_kwargs={
            "storage_options": cfg.storage_options,
            "rows_per_block": cfg.read_block_rows,
            "image_size": image_size,
            "max_pixels": cfg.max_pixels,
        },
        batch_size=1,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        CapFiltActor,
        fn_constructor_kwargs={"stage_kwargs": stage_kwargs, "threads": threads, "crash_once": cfg.test_crash_once},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        concurrency=n_actors,
        # bounded: an actor that dies on every batch (a poison sample, OOM) must end the job, not loop forever.
        # (Distinct remote args also keep Ray Data from fusing the CPU read/decode tasks into the model actors.)
        max_restarts=cfg.actor_restarts,
        max_task_retries=cfg.actor_restarts,
        **actor_res,
    )
    writers: dict[str, ShardWriter] = {}
    n_rows = 0
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in table.to_pylist():
                name = row["shard"]
                w = writers.get(name)
                if w is None:
                    w = writers[name] = ShardWriter(out_fs, root, name)
                w.add(row)
                if w.complete:
                    stats = w.commit()
                    del writers[name]
                    n_rows += stats["in"]
                    if cfg.progress:
                        state = "FAILED: " + str(stats["error"]) if stats["error"] else "done"
                        echo(
                            f"  shard {name}: {stats['in']} in, {stats['kept']} kept, {stats['decode_errors']} decode errors ({state})"
                        )
    finally:
        for w in writers.values():
            w.abort()
    for name, w in writers.items():  # the stream ended but a shard is short of rows: never commit it as done
        msg = f"incomplete: {len(w.seen)} of {w.expected} rows arrived"
        write_bytes_atomic(
            out_fs,
            posixpath.join(root, "_state", f"{name}.json"),
            json.dumps({"shard": name, "state": "failed", "error": msg, "in": 0}).encode(),
        )
    return n_rows


# ------------------------------------------------------------------------------------------------ summary


def _quantiles(
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
        i = int(np.searchsorted(cdf, q))
        i = min(i, len(h) - 1)
        prev = cdf[i - 1] if i else 0.0
        frac = (q - prev) / (cdf[i] - prev) if cdf[i] > prev else 0.5
        out[f"p{round(q * 100)}"] = round(lo + (i + frac) * width, 4)
    return out


def build_summary(
    cfg: RunConfig,
    shards: list[Shard],
    states: dict[str, dict[str, Any]],
    fs: Any,
    root: str,
    skipped: int,
    elapsed: float,
    n_rows: int,
) -> dict[str, Any]:
    """Counts over every shard of this input (this run's and earlier runs'), merged histograms, quantiles; writes
    summary.json and summary.png into the output folder."""
    per_shard = []
    totals = {
        "in": 0,
        "ok": 0,
        "kept": 0,
        "dropped": 0,
        "decode_errors": 0,
        "other_errors": 0,
        "web_kept": 0,
        "synthetic_kept": 0,
    }
    hists = {k: np.zeros(HIST_BINS, dtype=np.int64) for k in HIST_RANGES}
    failed = []
    for s in shards:
        st = states.get(s.name)
        if st is None:
            st = {"shard": s.name, "state": "failed", "error": "not processed (no output state)", "in": 0}
        if st.get("state") != "done":
            failed.append({"shard": s.name, "path": s.path, "error": st.get("error")})
        row = {"shard": s.name, "state": st.get("state"), "error": st.get("error")}
        for k in totals:
            row[k] = int(st.get(k, 0))
            totals[k] += row[k]
        per_shard.append(row)
        for k, v in (st.get("histograms") or {}).items():
            if k in hists:
                hists[k] += np.asarray(v, dtype=np.int64)
    summary = {
        "input": cfg.input,
        "output": cfg.output,
        "captioner": cfg.captioner,
        "filter": cfg.filter,
        "settings": {
            k: v for k, v in asdict(cfg).items() if k not in ("input", "output", "storage_options", "test_crash_once")
        },
        "shards": len(shards),
        "shards_skipped": skipped,
        "shards_done": len(shards) - len(failed),
        "failed_shards": failed,
        "counts": totals,
        "kept_fraction": round(totals["kept"] / totals["ok"], 4) if totals["ok"] else None,
        "quantiles": {k: _quantiles(h.tolist(), *HIST_RANGES[k]) for k, h in hists.items()},
        "histograms": {k: {"range": list(HIST_RANGES[k]), "counts": h.tolist()} for k, h in hists.items()},
        "per_shard": per_shard,
        "seconds": round(elapsed, 2),
        "rows_this_run": n_rows,
        "rows_per_second": round(n_rows / elapsed, 2) if elapsed > 0 and n_rows else None,
    }
    write_bytes_atomic(fs, posixpath.join(root, "summary.json"), json.dumps(summary, indent=2).encode("utf-8"))
    write_bytes_atomic(fs, posixpath.join(root, "summary.png"), _plot(hists, cfg.threshold))
    return summary


def _plot(hists: dict[str, np.ndarray], threshold: float) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("itm", "itc")):
        for who in ("web", "synthetic"):
            key = f"{who}_{metric}"
            lo, hi = HIST_RANGES[key]
            edges = np.linspace(lo, hi, HIST_BINS + 1)
            ax.stairs(
                hists[key],
                edges,
                label=f"{who} ({int(hists[key].sum())})",
                fill=who == "web",
                alpha=0.5 if who == "web" else 1.0,
            )
        if metric == "itm":
            ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
        ax.set_xlabel("ITM match probability" if metric == "itm" else "ITC cosine similarity")
        ax.set_ylabel("texts")
        ax.legend(fontsize=8)
    fig.suptitle("capfilt run: filter scores of web text and synthetic captions")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def format_summary(s: dict[str, Any]) -> str:
    c = s["counts"]
    lines = [
        f"capfilt run -> {s['output']}  ({s['seconds']} s, {s['rows_this_run']} rows this run"
        + (f", {s['rows_per_second']} rows/s)" if s["rows_per_second"] else ")"),
        f"  shards   {s['shards']} total: {s['shards_done']} done ({s['shards_skipped']} skipped as already done), {len(s['failed_shards'])} failed",
        f"  samples  {c['in']} in: {c['kept']} kept, {c['dropped']} dropped, {c['decode_errors']} decode errors, {c['other_errors']} other",
        f"  kept by  web text {c['web_kept']}, synthetic caption {c['synthetic_kept']}"
        + (f"  (kept fraction of decoded: {s['kept_fraction']})" if s["kept_fraction"] is not None else ""),
    ]
    for k in ("web_itm", "synthetic_itm"):
        q = s["quantiles"].get(k)
        if q:
            lines.append(f"  {k:<14} " + "  ".join(f"{n} {v:.3f}" for n, v in q.items()))
    for f in s["failed_shards"][:10]:
        lines.append(f"  FAILED {f['shard']}: {f['error']}")
    if len(s["failed_shards"]) > 10:
        lines.append(f"  ... and {len(s['failed_shards']) - 10} more failed shards (summary.json)")
    lines.append(
        f"  parquet: pd.read_parquet('{s['output'].rstrip('/')}/parquet')   kept tars: {s['output'].rstrip('/')}/tars/   summary.json, summary.png"
    )
    return "\n".join(lines)
