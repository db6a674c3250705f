"""The shared fixtures work: real moto S3, a real HTTP server, real Ray (local and two nodes)."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request

import pandas as pd
import pytest
from PIL import Image


def test_s3_server_roundtrip_with_s3fs(s3_server) -> None:
    bucket = s3_server.make_bucket()
    with pytest.raises(ValueError, match="3 characters"):
        s3_server.make_bucket("ab")
    s3_server.fs.pipe(f"{bucket}/dir/hello.txt", b"hello")
    assert s3_server.fs.cat(f"{bucket}/dir/hello.txt") == b"hello"
    # a fresh client configured only through the env the fixture set (what a Ray worker sees)
    import s3fs

    fresh = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fresh.cat(f"s3://{bucket}/dir/hello.txt") == b"hello"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3_server.endpoint_url
    # and through fsspec with the documented storage_options
    import fsspec

    with fsspec.open(f"s3://{bucket}/dir/hello.txt", "rb", **s3_server.storage_options) as f:
        assert f.read() == b"hello"


def test_ray_data_parquet_on_s3(s3_server, ray_local) -> None:
    ray = ray_local
    bucket = s3_server.make_bucket()
    pafs = s3_server.pyarrow_fs()
    ds = ray.data.from_items([{"key": f"{i:05d}", "x": i * i} for i in range(50)])
    # Ray Data wants a bucket/path when given a pyarrow filesystem (no scheme)
    ds.write_parquet(f"{bucket}/squares", filesystem=pafs)
    written = s3_server.fs.ls(f"{bucket}/squares")
    assert written and all(p.endswith(".parquet") for p in written)

    back = ray.data.read_parquet(f"{bucket}/squares", filesystem=pafs).to_pandas()
    assert sorted(back["x"]) == [i * i for i in range(50)]

    # tasks on Ray workers reach the server through the env alone (no filesystem passed in)
    @ray.remote
    def read_in_worker(path: str) -> int:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        with fs.open(fs.ls(path)[0], "rb") as f:
            return len(pd.read_parquet(f))

    n = ray.get(read_in_worker.remote(f"s3://{bucket}/squares"))
    assert 0 < n <= 50


def test_http_image_server(http_image_server) -> None:
    srv = http_image_server
    assert len(srv.urls) == len(srv.captions) == 20
    for url, size in zip(srv.urls[:8], srv.sizes[:8]):
        with urllib.request.urlopen(url, timeout=5) as r:
            img = Image.open(io.BytesIO(r.read()))
            assert img.size == size
    assert any(u.endswith(".png") for u in srv.urls) and any(u.endswith(".jpg") for u in srv.urls)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.missing_url(), timeout=5)
    assert e.value.code == 404
    url = srv.add_file("note.txt", b"not an image")
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.read() == b"not an image"


def test_ray_local_is_reused_and_restarted_after_cluster(ray_local) -> None:
    ray = ray_local
    assert ray.cluster_resources()["CPU"] == 2
    assert ray.get(ray.remote(lambda x: x + 1).remote(41)) == 42


@pytest.mark.slow
def test_ray_cluster_spreads_over_two_nodes(ray_cluster) -> None:
    import ray

    ray.init(address=ray_cluster, logging_level="WARNING", log_to_driver=False)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert ray.cluster_resources()["CPU"] == 2

    def where(batch: dict) -> dict:
        import time

        time.sleep(0.2)  # long enough that one node cannot take every block
        batch["node"] = [ray.get_runtime_context().get_node_id()] * len(batch["id"])
        return batch

    nodes = set(ray.data.range(40, override_num_blocks=8).map_batches(where, batch_size=5).to_pandas()["node"])
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_ray_local_after_cluster(ray_local) -> None:
    ray = ray_local
    # one node again: the cluster is gone and a fresh local runtime answers
    assert len([n for n in ray.nodes() if n["Alive"]]) == 1
    assert ray.cluster_resources()["CPU"] == 2


def test_slurm_script_starts_ray_per_node_then_capfilt(tmp_path) -> None:
    """scripts/slurm_capfilt.sbatch under stand-ins for SLURM's and Ray's commands (they log their arguments): a Ray
    head on the first node, a worker per other node joining the head's address, then `capfilt run --address` with
    one actor per GPU of the allocation and the user's arguments."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "slurm_capfilt.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "scontrol": "echo node-a; echo node-b; echo node-c",
        "srun": 'while [ $# -gt 0 ]; do case "$1" in -w) echo "srun on $2" >> "$LOG"; shift 2;; -*) shift;; *) break;; esac; done; "$@"',
        "hostname": "echo 10.0.0.1",
        "ray": 'echo "ray $*" >> "$LOG"',
        "capfilt": 'echo "capfilt $*" >> "$LOG"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "RAY_START_WAIT": "0"}
    env.update(SLURM_JOB_NODELIST="node-[a-c]", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="64")
    p = subprocess.run(["bash", str(script), "--input", "s3://b/in", "--output", "s3://b/out"], env=env, timeout=60)
    assert p.returncode == 0
    calls = log.read_text().splitlines()
    assert "ray start --head --node-ip-address=10.0.0.1 --port=6379 --num-cpus=64 --num-gpus=8 --block" in calls
    joins = [c for c in calls if c.startswith("ray start --address=10.0.0.1:6379")]
    assert len(joins) == 2 and {"srun on node-b", "srun on node-c"} <= set(calls)
    run = [c for c in calls if c.startswith("capfilt ")]
    assert run == [
        "capfilt run --address 10.0.0.1:6379 --device cuda --actors 24 --input s3://b/in --output s3://b/out"
    ]
