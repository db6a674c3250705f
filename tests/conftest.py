"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_vocab_dir(tmp_path_factory: pytest.TempPathFactory):
    """An offline bert-base-uncased-layout tokenizer folder (30522-line vocab.txt + tokenizer files)."""
    from blip.tokenizer import write_vocab

    try:  # the synthetic world's words, once capfilt.synth exists
        from capfilt.synth import VOCAB_WORDS
    except ImportError:
        VOCAB_WORDS = ()
    return write_vocab(tmp_path_factory.mktemp("vocab"), VOCAB_WORDS)


# -- real servers and real Ray, shared by every test that needs them ----------------------
# Nothing here is mocked: moto's S3 server, an HTTP server and Ray all run for real on loopback.
# Fixture names are a stable interface for the other test files:
#   s3_server         (session)  moto S3 on 127.0.0.1; sets AWS_* env so Ray workers reach it too
#   http_image_server (session)  ThreadingHTTPServer serving PIL-made images; 404 for missing paths
#   ray_local         (function) in-process Ray, 2 CPUs; reused between tests, restarted when needed
#   ray_cluster       (function) ray.cluster_utils.Cluster, 1-CPU head + 1-CPU worker; yields the address


@dataclass
class S3Server:
    """A moto S3 server on loopback. Credentials are the dummy "testing"/"testing"."""

    endpoint_url: str
    fs: Any  # s3fs.S3FileSystem bound to endpoint_url
    storage_options: dict[str, Any] = field(default_factory=dict)
    _buckets: itertools.count = field(default_factory=itertools.count)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when None; S3 wants >= 3 chars) and return its name."""
        name = name or f"capfilt-test-{next(self._buckets)}"
        if len(name) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters, got {name!r}")
        if not self.fs.exists(name):
            self.fs.mkdir(name)
        self.fs.invalidate_cache()
        return name

    def pyarrow_fs(self) -> Any:
        """A pyarrow filesystem over the s3fs one, for Ray Data's `filesystem=` argument."""
        import pyarrow.fs as pafs

        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (free port) for the whole session.

    The AWS_* variables are set in this process (and undone at the end), so anything started
    after this fixture -- Ray workers included; `ray_local` restarts Ray if they changed --
    reaches the server with a plain `s3fs.S3FileSystem()` or pyarrow's S3 filesystem.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
    }.items():
        env.setenv(k, v)
    env.delenv("AWS_SESSION_TOKEN", raising=False)
    env.delenv("AWS_PROFILE", raising=False)
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
    # skip_instance_cache: fsspec caches instances by arguments; a stale one from a previous server must not leak in
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    try:
        yield S3Server(endpoint_url=endpoint, fs=fs, storage_options=opts)
    finally:
        env.undo()
        server.stop()


@dataclass
class HttpImageServer:
    """Static files over HTTP on loopback: `urls[i]` is an image whose true caption is `captions[i]`."""

    base_url: str
    root: Path
    urls: list[str]
    captions: list[str]
    sizes: list[tuple[int, int]]  # (width, height) of each image

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def missing_url(self, i: int = 0) -> str:
        """A URL that answers 404."""
        return f"{self.base_url}/missing-{i}.jpg"

    def add_file(self, name: str, data: bytes) -> str:
        """Serve `data` at /name from now on; returns the URL."""
        (self.root / name).write_bytes(data)
        return self.url(name)


_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (235, 210, 40)}
_SHAPES = ("square", "circle", "triangle")


def _make_image(i: int) -> tuple[bytes, str, str, tuple[int, int]]:
    """Image i: a coloured shape on a grey background -> (bytes, extension, caption, (w, h))."""
    from PIL import Image, ImageDraw

    colour = list(_COLOURS)[i % len(_COLOURS)]
    shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
    w, h = 48 + 8 * (i % 5), 40 + 6 * (i % 4)  # varied sizes so "original size kept" is checkable
    img = Image.new("RGB", (w, h), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    fill = _COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    ext = "png" if i % 7 == 6 else "jpg"  # a few PNGs: not every web image is a JPEG
    buf = io.BytesIO()
    img.save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
    return buf.getvalue(), ext, f"a {colour} {shape} on a grey background", (w, h)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature is the stdlib's
        pass


@pytest.fixture(scope="session")
def http_image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpImageServer]:
    """20 small images (shapes, 16 JPEG + a few PNG) served from a temp dir on 127.0.0.1:<free port>."""
    root = tmp_path_factory.mktemp("http_images")
    names, captions, sizes = [], [], []
    for i in range(20):
        data, ext, caption, size = _make_image(i)
        name = f"img{i:03d}.{ext}"
        (root / name).write_bytes(data)
        names.append(name)
        captions.append(caption)
        sizes.append(size)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield HttpImageServer(base, root, [f"{base}/{n}" for n in names], captions, sizes)
    finally:
        server.shutdown()
        server.server_close()


# Ray: one Ray runtime per process at a time. `ray_local` keeps its runtime between tests (start-up costs
# seconds on 2 cores) and restarts it only when a cluster ran in between or the AWS_* env changed
# (workers inherit the env at start, so they see s3_server only if Ray started after it).
_RAY_QUIET = {"RAY_DEDUP_LOGS": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
_ray_local_state: dict[str, Any] = {"env": None}


def _aws_env() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _ray_local_state["env"] = None


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@pytest.fixture(scope="session")
def _ray_session_cleanup() -> Iterator[None]:
    os.environ.update(_RAY_QUIET)
    yield
    _ray_shutdown()


@pytest.fixture
def ray_local(_ray_session_cleanup: None) -> Iterator[Any]:
    """In-process Ray with 2 CPUs and a 300 MB object store; yields the `ray` module.

    Code under test may call `ray.init()` guarded by `ray.is_initialized()`; it must not shut Ray
    down (if it does, the next test simply starts a fresh runtime).
    """
    import ray

    if ray.is_initialized() and _ray_local_state["env"] != _aws_env():
        _ray_shutdown()
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=0,
            object_store_memory=300 * 1024**2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        _ray_local_state["env"] = _aws_env()
    _quiet_ray_data()
    yield ray


@pytest.fixture
def ray_cluster(_ray_session_cleanup: None) -> Iterator[str]:
    """A two-node Ray cluster on this machine (1-CPU head, 1-CPU worker node); yields its address.

    The driver is not connected: pass the address to the code under test (`--address ADDR`) or call
    `ray.init(address=ADDR)`. Any Ray runtime (e.g. `ray_local`'s) is shut down first, and this
    process's connection and the cluster are shut down afterwards.
    """
    from ray.cluster_utils import Cluster

    _ray_shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "object_store_memory": 200 * 1024**2,
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=1, num_gpus=0, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        _ray_shutdown()
        cluster.shutdown()


@pytest.fixture
def ray_cluster_3(_ray_session_cleanup: None) -> Iterator[Any]:
    """A head with no CPUs (nothing runs there but the driver's side) and two 1-CPU worker nodes; yields the
    `ray.cluster_utils.Cluster`, so a test can remove a worker node while a job runs (`cluster.remove_node`)."""
    from ray.cluster_utils import Cluster

    _ray_shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "num_gpus": 0, "object_store_memory": 150 * 1024**2, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=0, object_store_memory=150 * 1024**2)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        _ray_shutdown()
        cluster.shutdown()


# -- a real autoscaling cluster: Ray's fake multi-node provider on this machine --------------------------------
# ray.cluster_utils.AutoscalingCluster is not usable as shipped (its example.yaml is missing from the wheel and its
# start()/shutdown() run `ray stop --force`, which kills every Ray on the machine), so the head is started here with
# `ray start --head --autoscaling-config=...` in a temp dir of its own, and only that cluster's processes are killed.
FAKE_WORKER_TYPE = "capfilt.worker"
FAKE_GPU = "fake_gpu"


@dataclass
class AutoscalingTestCluster:
    """A running fake-autoscaler cluster: a head with no CPUs and `capfilt.worker` nodes (1 CPU + 1 `fake_gpu`)."""

    address: str  # for ray.init(address=...) and `--address`
    temp_dir: str
    config_path: str
    idle_timeout_s: float
    start_s: float  # seconds `ray start --head` took

    def alive_worker_nodes(self) -> int:
        """Alive nodes that have the fake_gpu resource (the driver must be connected)."""
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get(FAKE_GPU, 0) > 0)

    def worker_node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(FAKE_GPU, 0) > 0]

    @staticmethod
    def wait_for(pred: Any, timeout: float, interval: float = 0.5) -> float:
        """Poll `pred()` until true; returns the seconds waited, raises TimeoutError after `timeout`."""
        import time

        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)
        return time.monotonic() - t0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psutil() -> Any:
    """psutil as Ray vendors it (ray/thirdparty_files, on sys.path once ray is imported); not a dependency here."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _cluster_processes(*marks: str) -> list[Any]:
    """Every process whose command line names one of `marks` -- the cluster's temp dir or GCS address: gcs_server,
    raylets, monitor, log monitors, client server, workers of the head and of the fake nodes -- plus all their
    descendants."""
    psutil = _psutil()

    found: dict[int, Any] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and any(m in a for a in p.info["cmdline"] or () for m in marks):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return list(found.values())


def _kill_cluster(*marks: str) -> None:
    psutil = _psutil()

    for _ in range(3):
        procs = _cluster_processes(*marks)
        if not procs:
            return
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def autoscaling_cluster(_ray_session_cleanup: None) -> Iterator[AutoscalingTestCluster]:
    """A real Ray cluster with Ray's fake multi-node autoscaler; yields an `AutoscalingTestCluster`.

    Head: 0 CPUs, nothing runs there. Worker type `capfilt.worker`: {"CPU": 1, "fake_gpu": 1}, 0..3 nodes,
    idle timeout 6 s, autoscaler loop every 1 s. The driver is not connected: call `ray.init(address=c.address)`.
    Any Ray runtime of this process is shut down first; the connection and the cluster's processes (only its own,
    found by its temp dir) are gone afterwards.
    """
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    import ray._private.services as services

    _ray_shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    port = _free_port()
    ip = services.get_node_ip_address()
    idle_timeout_min = 0.1
    config = {
        "cluster_name": "capfilt-fake",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_min,
        # As upstream's fake_multi_node/example.yaml (absent from the wheel): no node updaters (they would try SSH and
        # mark every node "launch failed"), nodes named by id; gcs_address, else the provider assumes port 6379;
        # launch_multiple: one launch call starts `count` nodes, not one.
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "gcs_address": f"{ip}:{port}",
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            FAKE_WORKER_TYPE: {
                "resources": {"CPU": 1, FAKE_GPU: 1, "object_store_memory": 100 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 3,
            },
        },
    }
    config_path = os.path.join(temp_dir, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    # The cluster's auth mode must be the driver's (this process): `ray start` would turn token auth on when
    # ~/.ray/auth_token exists, and an earlier local `ray.init()` in this session sets RAY_AUTH_MODE=token here.
    # On a mismatch the GCS's calls into the driver (the owner's WaitForActorRefDeleted) are refused, which the GCS
    # reads as "owner gone": every actor dies "never started ... all references removed".
    auth_mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": auth_mode}
    ray_exe = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [
        ray_exe,
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={ip}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={config_path}",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--object-store-memory={100 * 1024**2}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    t0 = time.monotonic()
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        start_s = time.monotonic() - t0
        services.find_gcs_addresses.cache_clear()
        yield AutoscalingTestCluster(f"{ip}:{port}", temp_dir, config_path, idle_timeout_min * 60, start_s)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"ray start --head failed:\n{e.stdout}\n{e.stderr}") from e
    finally:
        _ray_shutdown()
        _kill_cluster(temp_dir, f"{ip}:{port}")
        services.find_gcs_addresses.cache_clear()
        if not os.environ.get("CAPFILT_KEEP_RAY_TMP"):
            shutil.rmtree(temp_dir, ignore_errors=True)
