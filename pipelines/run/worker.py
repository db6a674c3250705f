"""One input shard -> its outputs, inside a CapFilt worker: the unit of work of `capfilt run`.

    reader thread (ShardReader: raw bytes, in order)
        -> decode pool (PIL releases the GIL; `decode_threads` per worker, shared by its shard calls)
        -> bounded queue of full model batches (`prefetch_batches`: memory bounded per worker)
        -> CapFiltStage under the worker's model lock (captioner + filter on one device)
        -> ShardWriter (kept samples streamed into the tar, rows held for the parquet) -> state file last

No Ray here: `ShardProcessor` is a plain class (`setup()`, `__call__(shard) -> record`), run inside a Ray actor by
pipelines/run/scheduler.py and tested without Ray. Several calls may run at once on one processor
(`shards_per_actor`, two on a GPU; the actor's `max_concurrency` is that + 1 for its `ready()`): the next shard's
read and decode then hide behind the current shard's model work, and the
lock keeps the device busy with one batch at a time; only one shard is read at a time (the next one starts when the
current one is read, its last batches still queued), so the overlap costs no contention. What goes back to the caller is one small record per shard
(its counts and score histograms), never a sample.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from capfilt.decode import DEFAULT_MAX_PIXELS, allow_max_pixels, decode_or_error
from capfilt.stages import stage_batch
from pipelines.io import Shard, ShardReader, ShardWriter

_END = object()


@dataclass
class WorkerSettings:
    """How a worker runs (not what CapFilt computes: that is CapFiltSettings)."""

    output: str  # the job's output folder (absolute local path or fsspec URL)
    storage_options: dict[str, Any]
    image_size: int  # decode size: the larger of the two models' sizes
    decode_threads: int = 2
    prefetch_batches: int = 3  # decoded batches queued ahead of the model, per shard call
    max_pixels: int = DEFAULT_MAX_PIXELS
    torch_threads: int | None = None  # CPU workers: intra-op threads


class ShardProcessor:
    """CapFilt over whole shards, writing each shard's parquet + tar + state itself. Thread-safe `__call__`."""

    def __init__(self, stage_settings: dict[str, Any], settings: WorkerSettings) -> None:
        self.stage_settings, self.settings = stage_settings, settings
        self.processed = 0  # samples through the model, every shard call together (heartbeat)
        self._count_lock = threading.Lock()
        self.identity: dict[str, Any] = {}  # who computes (node, actor): written into every state record

    def setup(self) -> None:
        import torch

        from capfilt.stages import CapFiltStage

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        allow_max_pixels(self.settings.max_pixels)
        self.stage = CapFiltStage(**self.stage_settings)
        self.stage.setup()
        # the batch size this worker runs (batch_size "auto" is measured on its device): in every state record
        self.identity = {**self.identity, "batch_size": self.stage.batch_size}
        if self.stage.batch_fit is not None:
            print(self.stage.batch_fit.describe(), flush=True)  # reaches the driver's log
        self.model_lock = threading.Lock()
        # one shard is read at a time: the next call's reader starts when the current one has read its shard (its
        # last batches still queued for the model), so reading overlaps the model without two readers competing
        self.read_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        self.fs, root = fsspec.core.url_to_fs(self.settings.output, **self.settings.storage_options)
        self.root = root.rstrip("/")

    def __call__(self, shard: Shard, attempt: int = 0) -> dict[str, Any]:
        """Process one shard end to end; returns its state record (also written to `_state/{shard}.json`).
        `attempt` counts earlier tries at this shard (their temporaries are removed)."""
        record = {"input": shard.fingerprint, **self.identity}
        writer = ShardWriter(self.fs, self.root, shard.name, attempt, record)
        reader = ShardReader(shard, self.settings.storage_options)
        stop = threading.Event()
        batches: queue.Queue = queue.Queue(maxsize=self.settings.prefetch_batches)
        feeder = threading.Thread(target=self._feed, args=(reader, batches, stop), daemon=True)
        feeder.start()
        try:
            while True:
                item = batches.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                rows, decoded = item
                for row in self.process_batch(rows, [f.result() for f in decoded]):
                    writer.add(row)
            feeder.join()
            return writer.commit(reader.error)
        except BaseException:
            stop.set()
            writer.abort()
            raise

    def _feed(self, reader: ShardReader, batches: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: full batches of rows, each with its decode futures, into the bounded queue."""
        try:
            while not self.read_lock.acquire(timeout=0.2):
                if stop.is_set():
                    return
            try:
                for rows in _chunks(iter(reader), self.stage.batch_size):
                    s, cap = self.settings.image_size, self.settings.max_pixels
                    decoded = [
                        self.pool.submit(decode_or_error, r["image"], s, cap)
                        if r.get("duplicate_of") is None
                        else _done((None, "duplicate_key", f"key {r['key']!r} already at idx {r['duplicate_of']}"))
                        for r in rows
                    ]
                    if not _put(batches, (rows, decoded), stop):
                        return
            finally:
                self.read_lock.release()
            _put(batches, _END, stop)
        except BaseException as e:  # noqa: BLE001 - a reader bug reaches the caller, not a silent hang
            _put(batches, e, stop)

    def process_batch(self, rows: list[dict[str, Any]], decoded: list[tuple]) -> list[dict[str, Any]]:
        """READ_FIELDS rows + their decode results -> output rows: each read row with its SampleResult's fields and
        its decode status added (ShardWriter keeps capfilt.schema.OUT_COLUMNS, and the image bytes when kept)."""
        batch = stage_batch(rows, decoded, self.settings.image_size)
        batch["pixels"] = self.stage.pin(batch["pixels"])  # outside the lock: the model thread only starts the copy
        with self.model_lock:
            results = self.stage.results(batch)
        with self._count_lock:
            self.processed += len(rows)
        # a decode error wins; else a read note (non-UTF-8 caption, bad .json) stays visible
        return [
            {**r, **asdict(res), "status": d[1], "error": d[2] or r["note"]}
            for r, d, res in zip(rows, decoded, results)
        ]


def _done(result: Any) -> Future:
    """A finished future: a row that needs no decoding (a repeated key) goes the decoded rows' way."""
    f: Future = Future()
    f.set_result(result)
    return f


def _chunks(it: Iterator[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up when the consumer has stopped (its shard failed): no thread left hanging."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
