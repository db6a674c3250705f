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
from pipelines.manifest import build_manifest, open_output, output_shards, read_manifest, remove_shard_outputs
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
    # "N": a fixed pool; "MIN:MAX": elastic (actors follow the queue and what the cluster has and can get);
    # auto/None: on a cluster (`address`) elastic 1..max_actors, one actor per shard not yet done; with Ray started
    # here, fixed: one per GPU, or one CPU actor
    actors: str | None = None
    max_actors: int | None = None  # bounds `auto` on a cluster
    actor_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per actor (node type)
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
            (self.max_actors is None or self.max_actors >= 1, f"max_actors must be >= 1, got {self.max_actors}"),
            (
                isinstance(self.actor_resources, dict)
                and all(isinstance(v, int | float) and v >= 0 for v in self.actor_resources.values()),
                f"actor_resources must map Ray resource names to amounts >= 0, got {self.actor_resources!r}",
            ),
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
        actor_range(self.actors, self.max_actors)  # raises on a bad range


def actor_range(actors: str | int | None, max_actors: int | None = None) -> tuple[int, int] | None:
    """`actors` -> (min, max) of the pool; None for `auto` (decided by where Ray runs, see `pool_shape`)."""
    if actors is None or str(actors).strip().lower() == "auto":
        return None
    text = str(actors).strip()
    lo, sep, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise ValueError(f"actors must be N, MIN:MAX or auto, got {actors!r}") from None
    if not 1 <= a <= b:
        raise ValueError(f"actors must be N >= 1 or MIN:MAX with 1 <= MIN <= MAX, got {actors!r}")
    return a, b


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
    draining: float | None = None  # its node is being drained: the deadline (unix s; 0: none), no new shards


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
            with _interrupts():
                if not ray.is_initialized():
                    ray.init(address=cfg.address, log_to_driver=cfg.progress, include_dashboard=False)
                    started_ray = True
                sched = _schedule(cfg, todo, image_size, out_fs, root, echo, processor_cls, driver, lambda: lease.lost)
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


MAX_REQUEST = 1024  # bundles asked of the autoscaler at most (beyond any cluster's max_workers, however many shards)


@dataclass
class PoolShape:
    """The actor pool: its size range, device, and what each actor reserves (Ray options and autoscaler bundle)."""

    lo: int
    hi: int
    elastic: bool  # follows the queue (and asks the autoscaler); fixed pools keep `lo` actors
    device: str
    options: dict[str, Any]  # ray.remote options: num_gpus / num_cpus / resources
    bundle: dict[str, float]  # the same as an autoscaler bundle
    threads: int  # decode threads per actor
    per_actor: int  # shard calls in flight per actor


def pool_shape(cfg: RunConfig, cluster_gpus: int, on_cluster: bool | None = None) -> PoolShape:
    """The pool for a cluster with `cluster_gpus` GPUs now. The device is what the user asked: `auto` means CUDA
    when the cluster has GPUs; on a cluster with none (yet) it is an error, since whether GPU nodes will come is the
    user's to say (`--device cuda` waits for them, `--device cpu` runs on CPUs)."""
    on_cluster = cfg.address is not None if on_cluster is None else on_cluster
    if cfg.device == "auto":
        if not cluster_gpus and on_cluster:
            raise ValueError(
                "--device auto on a cluster that has no GPU now: pass --device cuda to wait for GPU nodes (the "
                "autoscaler is asked for them), or --device cpu to run on CPU actors"
            )
        device = "cuda" if cluster_gpus else "cpu"
    else:
        device = cfg.device
    on_gpu = device.startswith("cuda")
    threads = cfg.decode_threads or (4 if on_gpu else 1)
    extra = {k: float(v) for k, v in cfg.actor_resources.items()}
    # a GPU actor reserves its decode cores on the GPU's node: decoding stays next to the device it feeds
    if on_gpu:
        options: dict[str, Any] = {"num_gpus": 1, "num_cpus": threads}
        bundle = {"GPU": 1.0, "CPU": float(threads), **extra}
    else:
        options, bundle = {"num_cpus": cfg.actor_cpus}, {"CPU": float(cfg.actor_cpus), **extra}
    if extra:
        options["resources"] = extra
    rng = actor_range(cfg.actors, cfg.max_actors)
    if rng is not None:
        lo, hi = rng
    elif on_cluster:
        lo, hi = 1, cfg.max_actors or MAX_REQUEST
    else:
        lo = hi = max(cluster_gpus if on_gpu else 1, 1)
    per_actor = cfg.shards_per_actor or (2 if on_gpu else 1)
    return PoolShape(lo, hi, lo < hi, device, options, bundle, threads, per_actor)


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
    """Feed shards to the actor pool; yield each shard's state record as it commits (or finally fails).
    `lost()` says why the job must stop (its lease on the output was taken over), or None.

    Each turn: size the pool (fixed, or elastic: clamp(shards not done, MIN, MAX), asking the autoscaler for that
    many actor bundles), start actors up to that size (Ray places them as nodes join), let idle ones go beyond it,
    stop feeding actors on draining nodes, hand out shards, then wait up to 1 s for a record or a started actor."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    cpu0 = time.process_time()
    shape = pool_shape(cfg, int(ray.cluster_resources().get("GPU", 0)))
    on_gpu = shape.device.startswith("cuda")
    stage_settings = {**cfg.stage_settings(), "device": shape.device}
    worker = WorkerSettings(
        output=cfg.output,
        storage_options=cfg.storage_options,
        image_size=image_size,
        decode_threads=shape.threads,
        prefetch_batches=cfg.prefetch_batches,
        max_pixels=cfg.max_pixels,
        torch_threads=None if on_gpu else max(1, int(cfg.actor_cpus)),
    )
    # failures are handled here, not by Ray's restarts: a dead actor's shards must go to whichever actor is alive
    Remote = ray.remote(CapFiltWorker).options(
        max_concurrency=shape.per_actor + 1, max_restarts=0, max_task_retries=0, **shape.options
    )
    queue = deque(todo)
    attempts: dict[str, int] = {}
    actors: dict[int, _Actor] = {}
    starting: dict[Any, Any] = {}  # ready() ref -> handle, until the actor has loaded its models
    inflight: dict[Any, tuple[Shard, int]] = {}  # process() ref -> (shard, actor id)
    next_id = iter(range(1 << 62))
    failures_in_a_row, waited_since = 0, time.time()
    autoscaler = _Autoscaler(shape.bundle) if cfg.address is not None else None
    progress = _Progress(cfg.progress, len(todo))
    metrics = _Metrics()
    drain_checked = 0.0
    samples, t_start = 0, time.time()
    mode = f"elastic {shape.lo}:{shape.hi}" if shape.elastic else f"fixed {shape.lo}"
    echo(f"  actor pool: {mode}, {shape.device}, {shape.bundle} each, {shape.per_actor} shard(s) in flight each")

    def wanted() -> int:
        if not shape.elastic:
            return shape.lo
        return max(shape.lo, min(shape.hi, len(queue) + len(inflight)))

    def start_actor() -> None:
        h = Remote.remote(processor_cls, stage_settings, worker)
        starting[h.ready.remote()] = h

    def kill(h: Any) -> None:
        try:
            ray.kill(h, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def lose_actor(aid: int) -> None:
        """An actor that died (or whose node's drain deadline passed): its shards go back to the queue."""
        a = actors.pop(aid, None)
        if a is not None:
            driver["workers_lost"] += 1
            kill(a.handle)
            for ref in list(a.inflight):
                if ref in inflight:
                    shard, _ = inflight.pop(ref)
                    rec = retry_or_fail(shard, "worker lost: its node is draining past its deadline")
                    if rec is not None:
                        committed.append(rec)

    def retry_or_fail(shard: Shard, error: str) -> dict[str, Any] | None:
        attempts[shard.name] = attempts.get(shard.name, 0) + 1
        if attempts[shard.name] <= cfg.retries:
            driver["retries"] += 1
            queue.appendleft(shard)
            return None
        msg = f"gave up after {attempts[shard.name]} attempts: {error}"
        return write_failed_state(out_fs, root, shard.name, msg, shard.fingerprint)

    def size_pool() -> None:
        """Start actors up to the wanted size; beyond it, drop pending ones first, then idle ones."""
        n = wanted()
        if autoscaler is not None:
            autoscaler.request(n)
        live = [aid for aid, a in actors.items() if a.draining is None]
        missing = n - len(live) - len(starting)
        if shape.elastic and missing > 0:  # as many as fit now, plus one waiting for the next node
            missing = min(missing, max(0, _fits(ray.available_resources(), shape.bundle) + 1 - len(starting)))
        for _ in range(max(0, missing)):
            start_actor()
        for ref in list(starting)[::-1][: max(0, -missing)]:
            kill(starting.pop(ref))
            missing += 1
        for aid in live:
            if missing >= 0:
                break
            if not actors[aid].inflight and not queue:
                kill(actors.pop(aid).handle)
                driver["actors_released"] += 1
                missing += 1

    committed: list[dict[str, Any]] = []
    driver.update(actors_started=0, actors_released=0, actors_drained=0, max_live_actors=0)
    try:
        while queue or inflight or committed:
            if lost():  # another job took the output over (this one looked dead to it): stop writing
                raise LeaseHeld(f"stopped: {lost()}")
            if time.time() - drain_checked > 5:
                drain_checked = time.time()
                _drain(actors, _draining_nodes(), lose_actor, kill, driver)
            size_pool()
            for aid, a in actors.items():
                while queue and a.draining is None and len(a.inflight) < shape.per_actor:
                    shard = queue.popleft()
                    ref = a.handle.process.remote(shard, attempts.get(shard.name, 0))
                    a.inflight.add(ref)
                    inflight[ref] = (shard, aid)
            if not actors and time.time() - waited_since > 120:
                echo(
                    f"  waiting for resources to start CapFilt actors ({shape.bundle} each); {len(queue)} shards queued"
                )
                waited_since = time.time()
            done, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=1.0) if not committed else ([], [])
            for ref in done:
                if ref in starting:
                    h = starting.pop(ref)
                    try:
                        actors[next(next_id)] = _Actor(h, ray.get(ref))
                        driver["actors_started"] += 1
                        failures_in_a_row, waited_since = 0, time.time()
                    except RayError as e:  # the actor could not start (model load failed, node died meanwhile)
                        failures_in_a_row += 1
                        # elastic: nodes come and go (an autoscaler may remove a node an actor was placed on)
                        if failures_in_a_row > max(shape.lo, min(shape.hi, 8)) * (cfg.retries + 1):
                            raise RuntimeError(f"CapFilt actors keep failing to start; last error: {e}") from None
                    continue
                if ref not in inflight:  # its actor was given up (drain deadline) and the shard requeued
                    continue
                shard, aid = inflight.pop(ref)
                if aid in actors:
                    actors[aid].inflight.discard(ref)
                try:
                    rec = ray.get(ref)
                except RayTaskError as e:  # the shard's processing raised; the actor is fine
                    rec = retry_or_fail(shard, _first_line(e))
                except RayError as e:  # the actor died (crash, OOM kill, node lost): its other shards fail too
                    if actors.pop(aid, None) is not None:  # counted once, whatever it held
                        driver["workers_lost"] += 1
                    rec = retry_or_fail(shard, f"worker lost: {type(e).__name__}")
                if rec is not None:
                    committed.append(rec)
            driver["max_live_actors"] = max(driver["max_live_actors"], len(actors))
            while committed:
                rec = committed.pop(0)
                driver["records"] += 1
                driver["record_bytes"] += len(pickle.dumps(rec))
                samples += int(rec.get("in", 0))
                ok = rec.get("state") == "done"
                if not ok and cfg.progress:
                    progress.write(f"  shard {rec['shard']} FAILED: {rec.get('error')}")
                metrics.shard(ok, int(rec.get("in", 0)))
                progress.update(1)
                yield rec
            live = _heartbeats(actors, driver)
            rate = live / max(time.time() - t_start, 1e-9)
            metrics.pool(len(actors), len(queue), rate)
            progress.status(f"actors {len(actors)}/{wanted()}, {samples} samples committed, {rate:.1f} samples/s")
    finally:
        progress.close()
        for a in actors.values():
            kill(a.handle)
        for h in starting.values():
            kill(h)
        if autoscaler is not None:
            autoscaler.clear()
        driver["cpu_seconds"] = round(time.process_time() - cpu0, 3)


def _fits(available: dict[str, float], bundle: dict[str, float]) -> int:
    """How many `bundle`s the cluster's free resources hold (summed over nodes: an upper bound)."""
    return int(min((available.get(k, 0.0) // v for k, v in bundle.items() if v > 0), default=0))


class _Autoscaler:
    """What the job asks of Ray's autoscaler: one bundle per wanted actor, sent when the number changes, cleared at
    the end (also on error and Ctrl-C) so the cluster can scale down."""

    def __init__(self, bundle: dict[str, float]) -> None:
        self.bundle, self.last = bundle, None

    def request(self, n: int) -> None:
        n = min(n, MAX_REQUEST)
        if n != self.last:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[dict(self.bundle) for _ in range(n)])
            self.last = n

    def clear(self) -> None:
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
        except Exception:  # noqa: BLE001 - Ray already gone: nothing persists the request
            pass


def _draining_nodes() -> dict[str, float]:
    """Nodes Ray is draining (spot preemption, `ray drain-node`, KubeRay scale-down) -> deadline (unix s, 0: none).
    Ray 2.60 exposes this to a driver through its GCS state accessor (`ray._private.state`); where it does not,
    nothing is draining and a node's loss goes through the node-loss path."""
    try:
        from ray._private.state import state

        return {node: ms / 1000.0 for node, ms in state.get_draining_nodes().items()}
    except Exception:  # noqa: BLE001 - another Ray version: no draining information
        return {}


def _drain(actors: dict[int, _Actor], draining: dict[str, float], lose: Any, kill: Any, driver: dict) -> None:
    """Actors on draining nodes get no new shards; an idle one is let go; one still busy when the deadline is near
    (10 s) is given up: its shards go back to the queue for actors elsewhere."""
    now = time.time()
    for aid, a in list(actors.items()):
        if a.node not in draining:
            continue
        if a.draining is None:
            driver["actors_drained"] += 1
        a.draining = draining[a.node]
        if not a.inflight:
            kill(actors.pop(aid).handle)
        elif a.draining and now > a.draining - 10:
            lose(aid)


class _Progress:
    """A tqdm bar in shards on a terminal; elsewhere (a cluster job's log) one line every 30 s, not a line per
    update: the first as soon as there is a status, then every `every` s, and the last one at the end."""

    def __init__(self, enabled: bool, total: int, every: float = 30.0) -> None:
        from tqdm import tqdm

        self.enabled, self.total, self.every = enabled, total, every
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="shard", file=sys.stderr, dynamic_ncols=True) if self.tty else None
        self.n, self.last, self.text = 0, 0.0, ""

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        elif self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def status(self, text: str) -> None:
        self.text = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"  {self.n}/{self.total} shards, {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.text:
            print(f"  {self.n}/{self.total} shards, {self.text}", file=sys.stderr, flush=True)


class _Metrics:
    """The job on the operators' dashboard (Ray metrics -> Prometheus / Grafana): shards done and failed, samples
    committed, live actors, queued shards, samples/s. Metric names are listed in the README."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge

        self.shards = Counter("capfilt_shards", "shards finished by this job", tag_keys=("state",))
        self.samples = Counter("capfilt_samples_committed", "samples committed (rows written) by this job")
        self.actors = Gauge("capfilt_live_actors", "CapFilt actors with their models loaded")
        self.queued = Gauge("capfilt_shards_queued", "shards waiting for an actor")
        self.rate = Gauge("capfilt_samples_per_second", "samples/s through the models, all live actors")

    def shard(self, ok: bool, samples: int) -> None:
        self.shards.inc(1, tags={"state": "done" if ok else "failed"})
        if samples:
            self.samples.inc(samples)

    def pool(self, actors: int, queued: int, rate: float) -> None:
        self.actors.set(actors)
        self.queued.set(queued)
        self.rate.set(rate)


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
