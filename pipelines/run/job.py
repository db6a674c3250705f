"""`capfilt run`: CapFilt over img2dataset shards on Ray; workers write their shards, the driver only schedules.

    driver: list shards, check both models, skip done shards  --(one shard descriptor per call)-->
    a pool of CapFilt actors (scheduler.py: fixed or elastic; one per GPU, or CPU actors), each: read + decode -> model ->
        parquet + tar of the shard -> `_state/{shard}.json` last (the commit point)  --(one small record)--> driver

The unit of work is one input shard (as img2dataset's distributor): the driver hands shard descriptors to the
actors, at most `shards_per_actor` in flight each (two on a GPU: the next shard's read and decode hide behind the
current one's model work), and gets back one record per shard (counts + score histograms, a few kB). No sample ever passes
through the driver or the object store, so the driver costs the same per shard whatever the shard size and however
many GPUs there are.

Faults: an actor that dies (crash, OOM kill, its node lost) is replaced and each shard it held goes back to the
queue for any actor; a shard whose processing raises is retried too; after `retries` more attempts it is reported
failed. Output names are per input shard and deterministic, captions are seeded per sample key, so a retried shard
rewrites identical bytes; a shard is done iff its state file says so, and a rerun skips done shards.
"""

from __future__ import annotations

import posixpath
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import fsspec

from pipelines.io import Shard, check_store, clean_tmp, iter_states, list_shards
from pipelines.run.config import RunSettings, model_config
from pipelines.run.lease import Lease
from pipelines.run.manifest import build_manifest, open_output, output_shards, read_manifest, remove_shard_outputs
from pipelines.run.scheduler import schedule
from pipelines.run.summary import SummaryBuilder, format_summary, write_summary
from pipelines.run.worker import ShardProcessor

# ------------------------------------------------------------------------------------------------ the job


class JobInterrupted(Exception):
    """SIGINT / SIGTERM during a run: the actors are stopped and the lease released; the CLI exits 130."""


def run_capfilt(cfg: RunSettings, echo: Any = None, processor_cls: type = ShardProcessor) -> dict[str, Any]:
    """Run (or resume) the job. Returns the summary dict; `summary["failed_shards"]` non-empty means exit non-zero.

    Everything that can be checked without Ray is checked first: both stores, input shards, both models (with their
    tokenizers), the output's lease and manifest. `processor_cls` is the per-actor worker (a ShardProcessor subclass
    in fault tests). Raises JobInterrupted on SIGINT/SIGTERM (after stopping the actors and releasing the lease).
    """
    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    so = cfg.storage_options
    check_store(cfg.input, so, "input")
    check_store(cfg.output, so, "output")
    shards = list_shards(cfg.input, so)
    cap_cfg = model_config(cfg.captioner, "captioner")
    filt_cfg = model_config(cfg.filter, "filter")
    image_size = max(cap_cfg.vision.image_size, filt_cfg.vision.image_size)
    out_fs, root = fsspec.core.url_to_fs(cfg.output, **so)
    root = root.rstrip("/")
    lease = Lease(out_fs, root, timeout=cfg.lease_timeout).acquire()
    try:
        if lease.took_over:
            echo(f"  took over the output's stale lease ({lease.describe(lease.took_over)})")
        return _run_locked(cfg, shards, image_size, out_fs, root, lease, echo, processor_cls)
    finally:
        lease.release()


def _run_locked(
    cfg: RunSettings,
    shards: list[Shard],
    image_size: int,
    out_fs: Any,
    root: str,
    lease: Lease,
    echo: Any,
    processor_cls: type,
) -> dict[str, Any]:
    import ray

    manifest = build_manifest(cfg, read_manifest(out_fs, root))
    open_output(out_fs, root, cfg.output, manifest, overwrite=cfg.overwrite, echo=echo)
    for sub in ("parquet", "tars", "_state"):
        out_fs.makedirs(posixpath.join(root, sub), exist_ok=True)
    clean_tmp(out_fs, root, before=lease.started)  # before any worker writes: only what a dead job left
    # the summary is built as records come (histograms merged, records dropped): driver memory ~ shards, not samples
    builder, by_name = SummaryBuilder(), {s.name: s for s in shards}
    orphans = sorted(output_shards(out_fs, root) - set(by_name))
    if orphans and cfg.prune:
        for name in orphans:
            remove_shard_outputs(out_fs, root, name)
        echo(f"  --prune: removed the outputs of {len(orphans)} shard(s) no longer in the input: {_names(orphans)}")
        orphans = []
    changed = []
    for st in iter_states(out_fs, root):
        name = st["shard"]
        if name in by_name and st.get("state") == "done":
            if st.get("input") == by_name[name].fingerprint:
                builder.add(name, by_name[name].path, st)
            else:  # the input file was replaced since this shard was done: recompute it
                changed.append(name)
        elif name in orphans:
            builder.add(name, None, st, orphan=True)
    for name in orphans:
        if name not in builder.names:  # outputs without a state record (a shard that never committed)
            builder.add(name, None, {"state": "failed", "error": "no state record"}, orphan=True)
    todo = [s for s in shards if s.name not in builder.names]
    skipped = len(shards) - len(todo)
    note = f"; {len(changed)} changed since done, recomputed: {_names(changed)}" if changed else ""
    echo(f"capfilt run: {len(shards)} shards ({skipped} already done, {len(todo)} to do{note}) -> {cfg.output}")
    if orphans:
        echo(
            f"  warning: {len(orphans)} shard(s) in the output are no longer in the input: {_names(orphans)}; their "
            "rows stay in the output and the summary (rerun with --prune to remove them)"
        )

    t0, n_rows, interrupted = time.time(), 0, False
    driver: dict[str, Any] = {"records": 0, "record_bytes": 0, "heartbeats": 0, "cpu_seconds": 0.0}
    driver.update(retries=0, workers_lost=0)
    if todo:
        started_ray, sched = False, None
        try:
            with interrupts():
                if not ray.is_initialized():
                    ray.init(address=cfg.address, log_to_driver=cfg.progress, include_dashboard=False)
                    started_ray = True
                sched = schedule(cfg, todo, image_size, out_fs, root, echo, processor_cls, driver, lambda: lease.lost)
                for rec in sched:
                    builder.add(rec["shard"], by_name[rec["shard"]].path, rec, this_run=True)
                    n_rows += int(rec.get("in", 0))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if sched is not None:
                sched.close()  # its own finally stops the actors
            if started_ray:
                ray.shutdown()
    elapsed = time.time() - t0
    for s in todo:
        if s.name not in builder.names:  # only when the job stopped early
            builder.add(s.name, s.path, None)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("input", "output", "storage_options")}
    head = {"input": cfg.input, "output": cfg.output, "captioner": cfg.captioner, "filter": cfg.filter}
    summary = builder.build(
        {**head, "settings": settings},
        skipped=skipped,
        changed=changed,
        interrupted=interrupted,
        elapsed=elapsed,
        n_rows=n_rows,
        driver=driver,
    )
    write_summary(out_fs, root, summary, cfg.threshold)
    if interrupted:  # counted on disk: a shard may have committed after the driver stopped listening
        done = sum(
            1
            for st in iter_states(out_fs, root)
            if st["shard"] in by_name
            and st.get("state") == "done"
            and st.get("input") == by_name[st["shard"]].fingerprint
        )
        echo(f"interrupted: {done}/{len(shards)} shards done; rerun the same command to resume")
        raise JobInterrupted(f"{done}/{len(shards)} shards done")
    echo(format_summary(summary))
    return summary


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@contextmanager
def interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) ends the job like Ctrl-C: as a KeyboardInterrupt in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
