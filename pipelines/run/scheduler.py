"""`capfilt run`'s scheduler: the CapFilt actor pool (fixed or elastic, with the autoscaler's requests), shards
handed out one call at a time, dead actors replaced, failed shards retried, draining nodes avoided, progress and
Ray metrics. See job.py for the whole job and its fault model."""

from __future__ import annotations

import pickle
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipelines.io import Shard, write_failed_state
from pipelines.run.config import RunSettings, actor_range
from pipelines.run.lease import LeaseHeld
from pipelines.run.worker import WorkerSettings

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


# ------------------------------------------------------------------------------------------------ the pool


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


def pool_shape(cfg: RunSettings, cluster_gpus: int, on_cluster: bool | None = None) -> PoolShape:
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


def actor_settings(cfg: RunSettings, shape: PoolShape, image_size: int) -> tuple[dict[str, Any], WorkerSettings]:
    """What every CapFilt actor of the pool is built with: the stage's settings (on the pool's device) and the
    worker's (decode threads, prefetch, torch threads on CPU). Also bench/bench_run.py's in-process actor."""
    on_gpu = shape.device.startswith("cuda")
    worker = WorkerSettings(
        output=cfg.output,
        storage_options=cfg.storage_options,
        image_size=image_size,
        decode_threads=shape.threads,
        prefetch_batches=cfg.prefetch_batches,
        max_pixels=cfg.max_pixels,
        torch_threads=None if on_gpu else max(1, int(cfg.actor_cpus)),
    )
    return {**cfg.stage_settings(), "device": shape.device}, worker


def schedule(
    cfg: RunSettings,
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
    stage_settings, worker = actor_settings(cfg, shape, image_size)
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
