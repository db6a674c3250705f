"""`capfilt run`: CapFilt over img2dataset shards on Ray; workers write their shards, the driver only schedules.

    driver: list shards, check both models, skip done shards  --(one shard descriptor per call)-->
    a fixed pool of CapFilt actors (one per GPU, or CPU actors), each: read + decode threads -> model batches ->
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

import pickle
import posixpath
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.stages import CapFiltSettings
from pipelines.io import Shard, check_store, clean_tmp, iter_states, list_shards, write_failed_state
from pipelines.lease import Lease, LeaseHeld
from pipelines.manifest import (
    build_manifest,
    differences,
    has_run_outputs,
    output_shards,
    read_manifest,
    remove_outputs,
    remove_shard_outputs,
    write_manifest,
)
from pipelines.settings import CONFIG_DIR, load_settings, resolve_path
from pipelines.summary import SummaryBuilder, format_summary, write_summary
from pipelines.worker import ShardProcessor, WorkerSettings

DEFAULT_CONFIG = CONFIG_DIR / "capfilt.yaml"

# ------------------------------------------------------------------------------------------------ configuration


@dataclass
class RunConfig(CapFiltSettings):
    """`capfilt run` settings: what CapFilt computes (CapFiltSettings, inherited) + where and how the job runs."""

    input: str = ""
    output: str = ""
    actors: int | None = None  # None: one per GPU in the cluster, or one CPU actor when there is none
    actor_cpus: float = 1.0  # CPU actors: CPUs reserved per actor (also its torch threads)
    decode_threads: int | None = None  # per actor; None: 4 on a GPU actor (which reserves them as CPUs), 1 on CPU
    # shard calls in flight per actor; None: 2 on a GPU actor (the next shard's read and the last one's commit overlap
    # the model), 1 on a CPU actor (there the overlap competes with the model for the cores: measured slower)
    shards_per_actor: int | None = None
    prefetch_batches: int = 3  # decoded batches queued ahead of the model, per shard call
    retries: int = 3  # a shard whose actor died or whose processing raised is retried this many times
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb cap (PIL's default)
    address: str | None = None  # Ray cluster address ("auto"); None: start Ray in this process
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for input and output (s3 endpoint)
    progress: bool = True  # a progress bar (shards, samples/s) and a line per failed shard
    overwrite: bool = False  # the output was made by other models/settings/input: remove it and start over
    prune: bool = False  # remove the outputs of shards that are no longer in the input
    lease_timeout: float = 120.0  # s without a heartbeat after which another job's lease on the output is stale

    def resolve_paths(self) -> None:
        """Local input/output/model folders -> absolute: the actors' working directory is not ours."""
        self.input, self.output = resolve_path(self.input), resolve_path(self.output)
        self.captioner, self.filter = resolve_path(self.captioner, hub=True), resolve_path(self.filter, hub=True)

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.actors is None or self.actors >= 1, f"actors must be >= 1, got {self.actors}"),
            (self.actor_cpus > 0, f"actor_cpus must be > 0, got {self.actor_cpus}"),
            (self.decode_threads is None or self.decode_threads >= 1, "decode_threads must be >= 1"),
            (
                self.shards_per_actor is None or self.shards_per_actor >= 1,
                f"shards_per_actor must be >= 1, got {self.shards_per_actor}",
            ),
            (self.prefetch_batches >= 1, f"prefetch_batches must be >= 1, got {self.prefetch_batches}"),
            (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
            (self.max_pixels > 0, f"max_pixels must be > 0, got {self.max_pixels}"),
            (self.lease_timeout > 0, f"lease_timeout must be > 0, got {self.lease_timeout}"),
            (isinstance(self.storage_options, dict), "storage_options must be a mapping"),
            (bool(self.input), "no --input given"),
            (bool(self.output), "no --output given"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """YAML preset (default configs/capfilt.yaml) + overrides (CLI flags; None means "not given") -> RunConfig.

    Local paths (input, output, model folders) become absolute here: the actors' working directory is not ours."""
    return load_settings(RunConfig, path if path is not None else DEFAULT_CONFIG, overrides)


def model_config(spec: str, role: str) -> Any:
    """Read a checkpoint's BlipConfig (special ids from its tokenizer) and check the family, before Ray starts."""
    import blip

    try:
        cfg = blip.read_config(spec)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{role} {spec!r}: {e}") from None
    allowed = {"captioner": ("caption", "pretrain"), "filter": ("retrieval", "pretrain")}[role]
    if cfg.family not in allowed:
        raise ValueError(f"{role} {spec!r} is a {cfg.family!r} checkpoint; a {role} must be one of {allowed}")
    return cfg


# ------------------------------------------------------------------------------------------------ the Ray actor


class CapFiltWorker:
    """The Ray actor around a ShardProcessor (models loaded once per actor); threaded: shard calls overlap."""

    def __init__(self, processor_cls: type, stage_settings: dict[str, Any], settings: WorkerSettings) -> None:
        import ray

        self.processor = processor_cls(stage_settings, settings)
        ctx = ray.get_runtime_context()
        self.processor.identity = {"node": ctx.get_node_id(), "actor": ctx.get_actor_id()}
        self.processor.setup()

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def process(self, shard: Shard, attempt: int) -> dict[str, Any]:
        return self.processor(shard, attempt)

    def heartbeat(self) -> int:
        return self.processor.processed


@dataclass
class _Actor:
    handle: Any
    node: str
    inflight: set = field(default_factory=set)
    heartbeat: Any = None  # the pending heartbeat call
    heartbeat_sent: float = 0.0  # when it was sent
    processed: int = 0  # its last heartbeat


# ------------------------------------------------------------------------------------------------ the job


class JobInterrupted(Exception):
    """SIGINT / SIGTERM during a run: the actors are stopped and the lease released; the CLI exits 130."""


def run_capfilt(cfg: RunConfig, echo: Any = None, processor_cls: type = ShardProcessor) -> dict[str, Any]:
    """Run (or resume) the job. Returns the summary dict; `summary["failed_shards"]` non-empty means exit non-zero.

    Everything that can be checked without Ray is checked first: both stores, input shards, both models (with their
    tokenizers), the output's lease and manifest. `processor_cls` is the per-actor worker (a ShardProcessor subclass
    in fault tests). Raises JobInterrupted on SIGINT/SIGTERM (after stopping the actors and releasing the lease).
    """
    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.resolve_paths()  # also for a RunConfig built in code: the actors do not share our working directory
    cfg.validate()
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


def _open_corpus(cfg: RunConfig, out_fs: Any, root: str, echo: Any) -> None:
    """Compare this run with the folder's manifest: the same corpus resumes; another is refused, or with
    `overwrite` removed first. A new folder gets its manifest before any shard is written."""
    old = read_manifest(out_fs, root)
    new = build_manifest(cfg, old)
    if old is None and has_run_outputs(out_fs, root) and not cfg.overwrite:
        raise ValueError(
            f"{cfg.output} holds the outputs of a run without a manifest (_run.json: an earlier capfilt), so they "
            "cannot be checked against these models and settings; use another --output, or --overwrite to remove "
            "them and start over"
        )
    diffs = differences(old, new) if old is not None else []
    if diffs and not cfg.overwrite:
        raise ValueError(
            f"{cfg.output} was made by another run ({'; '.join(diffs)}); a rerun must use the same models, settings "
            "and input: use another --output, or --overwrite to remove what the other run made and start over"
        )
    if cfg.overwrite and (old is not None or has_run_outputs(out_fs, root)):
        remove_outputs(out_fs, root)
        echo(f"  --overwrite: removed the earlier run's outputs from {cfg.output}")
        old = None
    if old is None or new["models"] != old["models"]:  # new, or digests reused: keep the file stamps current
        write_manifest(out_fs, root, new if old is None else {**old, "models": new["models"]})


def _run_locked(
    cfg: RunConfig,
    shards: list[Shard],
    image_size: int,
    out_fs: Any,
    root: str,
    lease: Lease,
    echo: Any,
    processor_cls: type,
) -> dict[str, Any]:
    import ray

    _open_corpus(cfg, out_fs, root, echo)
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
            with _interrupts():
                if not ray.is_initialized():
                    ray.init(address=cfg.address, log_to_driver=cfg.progress, include_dashboard=False)
                    started_ray = True
                sched = _schedule(cfg, todo, image_size, out_fs, root, echo, processor_cls, driver, lambda: lease.lost)
                for rec in sched:
                    builder.add(rec["shard"], by_name[rec["shard"]].path, rec)
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
        {
            **head,
            "settings": settings,
            "shards_skipped": skipped,
            "shards_changed": changed,
            "interrupted": interrupted,
        },
        {
            "seconds": round(elapsed, 2),
            "rows_this_run": n_rows,
            "rows_per_second": round(n_rows / elapsed, 2) if elapsed > 0 and n_rows else None,
            "driver": driver,
        },
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
def _interrupts() -> Iterator[None]:
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


def pool_shape(cfg: RunConfig, cluster_gpus: int) -> tuple[int, str, dict[str, Any], int, int]:
    """(actors, device, Ray resources per actor, decode threads and shard calls in flight per actor) for a cluster
    with `cluster_gpus` GPUs."""
    gpus = cluster_gpus if cfg.device in ("auto", "cuda") else 0
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    on_gpu = device.startswith("cuda")
    threads = cfg.decode_threads or (4 if on_gpu else 1)
    # a GPU actor reserves its decode cores on the GPU's node: decoding stays next to the device it feeds
    resources = {"num_gpus": 1, "num_cpus": threads} if on_gpu else {"num_cpus": cfg.actor_cpus}
    return cfg.actors or max(gpus, 1), device, resources, threads, cfg.shards_per_actor or (2 if on_gpu else 1)


def _schedule(
    cfg: RunConfig,
    todo: list[Shard],
    image_size: int,
    out_fs: Any,
    root: str,
    echo: Any,
    processor_cls: type,
    driver: dict[str, Any],
    lost: Any = lambda: None,
) -> Any:
    """Feed shards to a fixed actor pool; yield each shard's state record as it commits (or finally fails).
    `lost()` says why the job must stop (its lease on the output was taken over), or None."""
    import ray
    from ray.exceptions import RayError, RayTaskError
    from tqdm import tqdm

    cpu0 = time.process_time()
    n_actors, device, resources, threads, per_actor = pool_shape(cfg, int(ray.cluster_resources().get("GPU", 0)))
    on_gpu = device.startswith("cuda")
    stage_settings = {**cfg.stage_settings(), "device": device}
    worker = WorkerSettings(
        output=cfg.output,
        storage_options=cfg.storage_options,
        image_size=image_size,
        decode_threads=threads,
        prefetch_batches=cfg.prefetch_batches,
        max_pixels=cfg.max_pixels,
        torch_threads=None if on_gpu else max(1, int(cfg.actor_cpus)),
    )
    # failures are handled here, not by Ray's restarts: a dead actor's shards must go to whichever actor is alive
    Remote = ray.remote(CapFiltWorker).options(
        max_concurrency=per_actor + 1, max_restarts=0, max_task_retries=0, **resources
    )
    queue = deque(todo)
    attempts: dict[str, int] = {}
    actors: dict[int, _Actor] = {}
    starting: dict[Any, Any] = {}  # ready() ref -> handle, until the actor has loaded its models
    inflight: dict[Any, tuple[Shard, int]] = {}  # process() ref -> (shard, actor id)
    next_id = iter(range(1 << 62))
    start_failures, waited_since = 0, time.time()
    samples, t_start = 0, time.time()

    def start_actor() -> None:
        h = Remote.remote(processor_cls, stage_settings, worker)
        starting[h.ready.remote()] = h

    def lose_actor(aid: int) -> None:
        a = actors.pop(aid, None)
        if a is not None:
            driver["workers_lost"] += 1
            ray.kill(a.handle, no_restart=True)
            start_actor()  # a replacement, placed wherever the cluster has room (another node after a node loss)

    def retry_or_fail(shard: Shard, error: str) -> dict[str, Any] | None:
        attempts[shard.name] = attempts.get(shard.name, 0) + 1
        if attempts[shard.name] <= cfg.retries:
            driver["retries"] += 1
            queue.appendleft(shard)
            return None
        msg = f"gave up after {attempts[shard.name]} attempts: {error}"
        return write_failed_state(out_fs, root, shard.name, msg, shard.fingerprint)

    for _ in range(n_actors):
        start_actor()
    bar = tqdm(total=len(todo), unit="shard", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while queue or inflight:
            if lost():  # another job took the output over (this one looked dead to it): stop writing
                raise LeaseHeld(f"stopped: {lost()}")
            for aid, a in actors.items():
                while queue and len(a.inflight) < per_actor:
                    shard = queue.popleft()
                    ref = a.handle.process.remote(shard, attempts.get(shard.name, 0))
                    a.inflight.add(ref)
                    inflight[ref] = (shard, aid)
            if not actors and time.time() - waited_since > 120:
                echo(f"  waiting for resources to start CapFilt actors ({resources} each); {len(queue)} shards queued")
                waited_since = time.time()
            done, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=1.0)
            for ref in done:
                if ref in starting:
                    h = starting.pop(ref)
                    try:
                        actors[next(next_id)] = _Actor(h, ray.get(ref))
                        waited_since = time.time()
                    except RayError as e:  # the actor could not start (model load failed, node died meanwhile)
                        start_failures += 1
                        if start_failures > n_actors * (cfg.retries + 1):
                            raise RuntimeError(f"CapFilt actors keep failing to start; last error: {e}") from None
                        start_actor()
                    continue
                shard, aid = inflight.pop(ref)
                if aid in actors:
                    actors[aid].inflight.discard(ref)
                try:
                    rec = ray.get(ref)
                except RayTaskError as e:  # the shard's processing raised; the actor is fine
                    rec = retry_or_fail(shard, _first_line(e))
                except RayError as e:  # the actor died (crash, OOM kill, node lost): replace it
                    lose_actor(aid)
                    rec = retry_or_fail(shard, f"worker lost: {type(e).__name__}")
                if rec is None:
                    continue
                driver["records"] += 1
                driver["record_bytes"] += len(pickle.dumps(rec))
                samples += int(rec.get("in", 0))
                if rec.get("state") != "done" and cfg.progress:
                    bar.write(f"  shard {rec['shard']} FAILED: {rec.get('error')}")
                bar.update(1)
                yield rec
            if cfg.progress:  # live samples/s from the actors' counters
                live = _heartbeats(actors, driver)
                bar.set_postfix_str(f"{samples} samples committed, {live / (time.time() - t_start):.1f} samples/s")
    finally:
        bar.close()
        for a in actors.values():
            ray.kill(a.handle, no_restart=True)
        for h in starting.values():
            ray.kill(h, no_restart=True)
        driver["cpu_seconds"] = round(time.process_time() - cpu0, 3)


def _heartbeats(actors: dict[int, _Actor], driver: dict[str, Any], period: float = 2.0) -> int:
    """Collect finished heartbeat calls (polled every scheduler turn, so a short run still gets one) and send a new
    one per actor at most every `period` s, the first as soon as the actor is up; returns the samples processed by
    live actors."""
    import ray

    for a in actors.values():
        if a.heartbeat is not None:
            ready, _ = ray.wait([a.heartbeat], timeout=0)
            if not ready:
                continue
            try:
                a.processed = ray.get(a.heartbeat)
                driver["heartbeats"] += 1
            except Exception:  # noqa: BLE001 - a dying actor; its shard calls report the failure
                pass
            a.heartbeat = None
        if time.time() - a.heartbeat_sent >= period:
            a.heartbeat, a.heartbeat_sent = a.handle.heartbeat.remote(), time.time()
    return sum(a.processed for a in actors.values())


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"
