"""`capfilt select RUN NEW`: re-decide what a finished `capfilt run` keeps, from its stored scores, without a model.

Every text's ITM score is in RUN's parquet, so another threshold (or `keep` / `max_synthetic`) needs no GPU: per shard,
the rows are re-decided with `capfilt.stages.select_texts` (the rule CapFiltStage applies) and the kept samples'
original image bytes are copied from the input shards (RUN's `_run.json` names them; `input` overrides, e.g. when the
shards moved). NEW is a folder of the same layout as a run's (parquet, tars, `_state`, summary), so `capfilt report`,
`capfilt pretrain` and pandas read it as they read RUN.

    driver: RUN's manifest and states, the input listing, NEW's lease and manifest, skip done shards
        --(one small task per shard)--> Ray tasks (or this process): RUN's parquet rows -> new decisions ->
        ShardWriter (kept samples' bytes from the input shard) -> `_state/{shard}.json` last --> one record back

The same guarantees as `capfilt run`: per-shard outputs written under temporary names and committed atomically, the
state file last; a rerun skips shards whose state is done (and whose RUN shard is unchanged) and rewrites the others;
NEW's `_run.json` records that it is a selection of RUN (RUN's identity + the selection settings), so a rerun with
other settings is refused unless `overwrite`. A RUN shard that failed stays failed here, its rows carried.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq

from capfilt.stages import KEEP_CHOICES, _web_text, select_texts
from pipelines.io import (
    Shard,
    ShardReader,
    ShardWriter,
    check_store,
    clean_tmp,
    list_shards,
    read_states,
    write_failed_state,
)
from pipelines.run.lease import Lease
from pipelines.run.manifest import differences, open_output, output_shards, read_manifest
from pipelines.run.summary import SummaryBuilder, format_summary, write_summary
from pipelines.settings import Settings, resolve_path


@dataclass
class SelectSettings(Settings):
    """`capfilt select` settings: which run, the new selection (`threshold`, `keep`, `max_synthetic`), and how."""

    run: str  # the `capfilt run` output folder whose scores are re-decided
    output: str  # NEW: the selection's own output folder
    threshold: float | None = None  # None: the run's
    keep: str = "both"  # which texts may be kept: both | web | synthetic
    max_synthetic: int | None = None  # at most this many synthetic captions kept per sample (the best-scored)
    input: str | None = None  # where the input shards are now; None: the input recorded in RUN's _run.json
    address: str | None = None  # Ray cluster address; None: Ray in this process
    tasks: int | None = None  # shards in flight at once; None: two per CPU of the cluster
    in_process: bool = False  # no Ray: shards one after another in this process (small outputs)
    retries: int = 2  # a shard whose task raised or whose worker died is retried this many times
    storage_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True  # a line per failed shard
    overwrite: bool = False  # NEW holds another selection (or a run): remove it and start over
    lease_timeout: float = 120.0

    def resolve_paths(self) -> None:
        self.run, self.output, self.input = resolve_path(self.run), resolve_path(self.output), resolve_path(self.input)

    def validate(self) -> None:
        checks = [
            (
                self.threshold is None or 0.0 <= self.threshold <= 1.0,
                f"threshold must be in [0, 1], got {self.threshold}",
            ),
            (self.keep in KEEP_CHOICES, f"keep must be one of {', '.join(KEEP_CHOICES)}, got {self.keep!r}"),
            (self.max_synthetic is None or self.max_synthetic >= 0, "max_synthetic must be >= 0"),
            (self.tasks is None or self.tasks >= 1, f"tasks must be >= 1, got {self.tasks}"),
            (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
            (bool(self.run) and bool(self.output), "need a run folder and an output folder"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class InputMismatch(Exception):
    """The input shard is not the one the run scored (other keys, fewer samples, another size): a failed shard."""


@dataclass(frozen=True)
class SelectTask:
    """One shard's unit of work: small and picklable (paths, the RUN shard's state record, the rule)."""

    name: str
    shard: Shard | None  # the input shard; None when the input has no shard of this name
    run: str  # RUN folder (URL or absolute path)
    run_state: dict[str, Any] | None  # RUN's `_state/{name}.json`; None: the run never finished this shard
    run_digest: str | None  # its identity: NEW's state records it, a rerun redoes the shard when RUN's changed
    output: str
    storage_options: dict[str, Any]
    rule: dict[str, Any]  # select_texts keyword arguments: threshold, keep, max_synthetic
    size_only: bool  # `input` overridden: compare only the input files' sizes (a moved file gets a new mtime/ETag)


# ------------------------------------------------------------------------------------------------ one shard


def select_shard(task: SelectTask, attempt: int = 0) -> dict[str, Any]:
    """Re-decide one shard and write its outputs in NEW (parquet + kept tar, then the state file last).
    Returns the state record. A shard that cannot be selected (failed or missing in RUN, input gone or other)
    gets a failed state saying why; anything else raises (the driver retries)."""
    so = task.storage_options
    fs, root = fsspec.core.url_to_fs(task.output, **so)
    rfs, rroot = fsspec.core.url_to_fs(task.run, **so)
    root, rroot = root.rstrip("/"), rroot.rstrip("/")
    st, fp = task.run_state, task.shard.fingerprint if task.shard is not None else None

    def fail(msg: str) -> dict[str, Any]:
        return write_failed_state(fs, root, task.name, msg, fp)

    if st is None:
        return fail("not done in the run (no _state record): finish the run, then rerun select")
    pq_path = posixpath.join(rroot, "parquet", f"{task.name}.parquet")
    if not rfs.exists(pq_path):  # a shard the run gave up on (no rows at all), or a damaged run folder
        return fail(f"failed in the run: {st.get('error')}" if st.get("state") != "done" else "no parquet in the run")
    if task.shard is None:
        return fail("its input shard is not in the input (moved? pass --input)")
    want, have = st.get("input"), task.shard.fingerprint
    if want is not None and have is not None and (_size(want) != _size(have) if task.size_only else want != have):
        return fail(f"the input shard changed since the run ({want} -> {have})")
    with rfs.open(pq_path, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    for r in rows:
        if r["status"] == "ok":  # status rows (decode errors, repeated keys) keep their verdict
            r["kept_texts"], r["reason"] = select_texts(
                _web_text(r["caption"]),
                r["web_itm"],
                r["synthetic_captions"] or [],
                r["synthetic_itm"] or [],
                **task.rule,
            )
            r["kept"] = bool(r["kept_texts"])
    record = {"input": fp, "run_state": task.run_digest}
    writer = ShardWriter(fs, root, task.name, attempt, record)
    try:
        images = _kept_images(task, rows)
        for r in rows:
            if r["kept"]:
                r["image"], r["image_ext"] = images[r["idx"]]
            writer.add(r)
        # a shard the run read only in part (a truncated tar) stays failed, with the same reason and its rows
        return writer.commit(st.get("error") if st.get("state") != "done" else None)
    except InputMismatch as e:
        writer.abort()
        return fail(str(e))
    except BaseException:
        writer.abort()
        raise


def _kept_images(task: SelectTask, rows: list[dict[str, Any]]) -> dict[int, tuple[bytes | None, str | None]]:
    """idx -> (original image bytes, extension) of the kept rows, streamed from the input shard up to the last one
    needed; every sample read on the way must carry the key the run recorded at its position."""
    need = {r["idx"] for r in rows if r["kept"]}
    if not need:
        return {}
    keys = {r["idx"]: r["key"] for r in rows}
    out: dict[int, tuple[bytes | None, str | None]] = {}
    reader = ShardReader(task.shard, task.storage_options)
    for s in reader:
        if keys.get(s["idx"]) != s["key"]:
            raise InputMismatch(
                f"the input shard is not the one the run scored: sample {s['idx']} is {s['key']!r}, "
                f"the run has {keys.get(s['idx'])!r}"
            )
        if s["idx"] in need:
            out[s["idx"]] = (s["image"], s["image_ext"])
            if len(out) == len(need):
                break
    if len(out) < len(need):
        raise InputMismatch(
            f"the input shard ended after {reader.count} samples ({reader.error or 'end of file'}); "
            f"the run kept rows up to sample {max(need)}"
        )
    return out


def _size(fingerprint: str) -> str:
    return fingerprint.split(",", 1)[0]


def _digest(record: dict[str, Any] | None) -> str | None:
    if record is None:
        return None
    return hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=12).hexdigest()


# ------------------------------------------------------------------------------------------------ the manifest


def run_identity(manifest: dict[str, Any]) -> str:
    """What makes RUN's rows what they are (output version, input, model digests, settings), not when or where it
    ran: an overwritten RUN with the same models and settings is the same corpus."""
    core = {
        "output_version": manifest.get("output_version"),
        "input": manifest.get("input"),
        "models": {k: v.get("digest") for k, v in (manifest.get("models") or {}).items()},
        "settings": manifest.get("settings"),
    }
    return hashlib.blake2b(json.dumps(core, sort_keys=True).encode(), digest_size=16).hexdigest()


def selection_manifest(run_manifest: dict[str, Any], run: str, rule: dict[str, Any], read_from: str) -> dict[str, Any]:
    """NEW's `_run.json`: RUN's models and input, RUN's settings with the selection's in place, and `selection_of`
    (RUN's folder and identity). Laid out as a run's manifest, so `differences` compares it the same way."""
    return {
        "output_version": run_manifest.get("output_version"),
        "capfilt_version": run_manifest.get("capfilt_version"),
        "input": run_manifest.get("input"),
        "models": run_manifest.get("models", {}),
        "settings": {**run_manifest.get("settings", {}), **rule},
        "selection_of": {
            "output": run,
            "identity": run_identity(run_manifest),
            "settings": run_manifest.get("settings"),
        },
        "read_from": read_from,  # where the image bytes were read (not compared: shards may move between reruns)
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
    }


def selection_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes `new` another selection than `old` (empty: the same one; resume)."""
    if "selection_of" not in old:
        return ["it holds a capfilt run's output, not a selection"]
    a, b = old["selection_of"], new["selection_of"]
    diffs = []
    if a.get("output") != b["output"]:
        diffs.append(f"selection of {a.get('output')} -> {b['output']}")
    elif a.get("identity") != b["identity"]:
        diffs.append(f"{b['output']} was remade by another run since (identity {a.get('identity')} -> {b['identity']})")
    return diffs + differences(old, new)


# ------------------------------------------------------------------------------------------------ the job


def run_select(cfg: SelectSettings, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Select (or resume selecting) RUN into NEW. Returns the summary; `summary["failed_shards"]` non-empty means
    exit non-zero. Never loads a model. Raises pipelines.run.job.JobInterrupted on SIGINT/SIGTERM."""
    from pipelines.run.job import JobInterrupted, interrupts

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    so = cfg.storage_options
    check_store(cfg.run, so, "run")
    check_store(cfg.output, so, "output")
    rfs, rroot = fsspec.core.url_to_fs(cfg.run, **so)
    rroot = rroot.rstrip("/")
    run_manifest = read_manifest(rfs, rroot)
    if run_manifest is None:
        raise FileNotFoundError(f"{cfg.run} has no _run.json: not the output folder of a capfilt run")
    fs, root = fsspec.core.url_to_fs(cfg.output, **so)
    root = root.rstrip("/")
    if (fs.protocol, root) == (rfs.protocol, rroot):
        raise ValueError("the selection needs its own output folder (NEW must not be RUN)")
    threshold = cfg.threshold if cfg.threshold is not None else run_manifest["settings"]["threshold"]
    rule = {"threshold": threshold, "keep": cfg.keep, "max_synthetic": cfg.max_synthetic}
    input_ = cfg.input or run_manifest["input"]
    shards = {s.name: s for s in list_shards(input_, so)}
    new = selection_manifest(run_manifest, cfg.run, rule, input_)

    lease = Lease(fs, root, timeout=cfg.lease_timeout).acquire()
    try:
        open_output(
            fs, root, cfg.output, new, overwrite=cfg.overwrite, diff=selection_differences, made_by="selection",
            echo=echo,
        )  # fmt: skip
        for sub in ("parquet", "tars", "_state"):
            fs.makedirs(posixpath.join(root, sub), exist_ok=True)
        clean_tmp(fs, root, before=lease.started)
        run_states, done = read_states(rfs, rroot), read_states(fs, root)
        builder, todo, changed = SummaryBuilder(), [], []
        for name in sorted(set(shards) | set(run_states)):
            st, path = run_states.get(name), shards[name].path if name in shards else None
            digest = _digest(st)
            mine = done.get(name)
            if mine is not None and mine.get("state") == "done":
                if mine.get("run_state") == digest:
                    builder.add(name, path, mine)
                    continue
                changed.append(name)  # RUN recomputed this shard since: select it again
            task = SelectTask(name, shards.get(name), cfg.run, st, digest, cfg.output, so, rule, cfg.input is not None)
            todo.append(task)
        for name in sorted(output_shards(fs, root) - set(shards) - set(run_states)):
            builder.add(name, None, done.get(name), orphan=True)
        skipped = len(builder.names) - len(builder.orphans)
        echo(
            f"capfilt select: {cfg.run} -> {cfg.output}, threshold {threshold}, keep {cfg.keep}"
            + (f", at most {cfg.max_synthetic} synthetic" if cfg.max_synthetic is not None else "")
            + f": {skipped + len(todo)} shards ({skipped} already done, {len(todo)} to do)"
        )
        t0, n_rows, interrupted = time.time(), 0, False
        driver: dict[str, Any] = {"records": 0, "record_bytes": 0, "retries": 0, "workers_lost": 0}
        driver["in_process"], cpu0 = cfg.in_process, time.process_time()
        records = _execute(cfg, todo, driver)
        try:
            with interrupts():
                for rec in records:
                    builder.add(rec["shard"], shards[rec["shard"]].path if rec["shard"] in shards else None, rec)
                    n_rows += int(rec.get("in", 0))
                    driver["records"] += 1
                    driver["record_bytes"] += len(json.dumps(rec))
                    if rec.get("state") != "done" and cfg.progress:
                        echo(f"  shard {rec['shard']} FAILED: {rec.get('error')}")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            records.close()  # its own finally cancels what is in flight and stops the Ray it started
        for t in todo:
            if t.name not in builder.names:  # only when the job stopped early
                builder.add(t.name, t.shard.path if t.shard else None, None)
        elapsed, driver["cpu_seconds"] = time.time() - t0, round(time.process_time() - cpu0, 3)
        models = run_manifest.get("models", {})
        head = {"input": input_, "output": cfg.output, "selection_of": cfg.run}
        head |= {"captioner": models.get("captioner", {}).get("spec"), "filter": models.get("filter", {}).get("spec")}
        summary = builder.build(
            {**head, "settings": new["settings"]},
            skipped=skipped,
            changed=changed,
            interrupted=interrupted,
            elapsed=elapsed,
            n_rows=n_rows,
            driver=driver,
        )
        write_summary(fs, root, summary, threshold)
    finally:
        lease.release()
    if interrupted:
        raise JobInterrupted("interrupted; rerun the same command to resume")
    echo(format_summary(summary).replace("capfilt run", "capfilt select", 1))
    return summary


def _execute(cfg: SelectSettings, todo: list[SelectTask], driver: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each task's state record as it commits: Ray tasks (`tasks` in flight, failures retried here, where a shard
    can go to any worker), or one after another in this process."""
    if not todo:
        return
    if cfg.in_process:
        for t in todo:
            yield _with_retries(t, cfg.retries, driver)
        return
    import ray
    from ray.exceptions import RayError, RayTaskError

    started_ray = False
    if not ray.is_initialized():
        ray.init(address=cfg.address, log_to_driver=cfg.progress, include_dashboard=False)
        started_ray = True
    remote = ray.remote(select_shard).options(num_cpus=1, max_retries=0)
    width = cfg.tasks or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    queue, inflight, attempts = deque(todo), {}, {}
    try:
        while queue or inflight:
            while queue and len(inflight) < width:
                t = queue.popleft()
                inflight[remote.remote(t, attempts.get(t.name, 0))] = t
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                t = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except RayError as e:
                    if not isinstance(e, RayTaskError):
                        driver["workers_lost"] += 1
                    attempts[t.name] = attempts.get(t.name, 0) + 1
                    if attempts[t.name] <= cfg.retries:
                        driver["retries"] += 1
                        queue.appendleft(t)
                        continue
                    rec = _give_up(t, attempts[t.name], e)
                yield rec
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
        if started_ray:
            ray.shutdown()


def _with_retries(t: SelectTask, retries: int, driver: dict[str, Any]) -> dict[str, Any]:
    for attempt in range(retries + 1):
        try:
            rec = select_shard(t, attempt)
            break
        except Exception as e:  # noqa: BLE001 - retried, then the shard's failure
            if attempt == retries:
                rec = _give_up(t, attempt + 1, e)
            else:
                driver["retries"] += 1
    return rec


def _give_up(t: SelectTask, attempts: int, e: BaseException) -> dict[str, Any]:
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    msg = f"gave up after {attempts} attempts: {type(cause).__name__}: {lines[0] if lines else ''}"
    fs, root = fsspec.core.url_to_fs(t.output, **t.storage_options)
    return write_failed_state(fs, root.rstrip("/"), t.name, msg, t.shard.fingerprint if t.shard else None)
