"""`capfilt run` on multi-node Ray clusters on this machine (ray.cluster_utils.Cluster), joined via --address:
a plain run, and a worker node lost while its shards are in flight."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from capfilt.synth import write_corpus
from pipelines.run.job import run_capfilt
from pipelines.run.worker import ShardProcessor
from tests.test_run import capfilt_models, check_output, tiny_config

_FIXTURES = (capfilt_models,)  # shared fixture from tests/test_run.py


@pytest.mark.slow
def test_run_on_two_node_cluster(ray_cluster, tmp_path, capfilt_models):
    import ray

    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 12, seed=6, image_size=64, samples_per_shard=4)
    out = str(tmp_path / "out")
    summary = run_capfilt(tiny_config(corpus, out, capfilt_models, address=ray_cluster))
    assert not ray.is_initialized()  # the job connected to the cluster and disconnected, leaving it up
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 12
    check_output(out, corpus)


class SlowBatches(ShardProcessor):
    """Real CapFilt, slowed per batch, so that shards are surely in flight when the node goes."""

    def process_batch(self, rows, decoded):
        time.sleep(0.4)
        return super().process_batch(rows, decoded)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


SLOT = {"num_cpus": 1, "resources": {"capfilt_slot": 1}, "object_store_memory": 150 * 1024**2}  # an actor's node type


@pytest.fixture
def slot_cluster(_ray_session_cleanup):
    """A `ray.cluster_utils.Cluster` whose head holds no `capfilt_slot` (no actor lands there); tests add SLOT nodes."""
    from ray.cluster_utils import Cluster

    from tests.conftest import _ray_shutdown

    _ray_shutdown()
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": 150 * 1024**2, "include_dashboard": False},
    )
    try:
        yield cluster
    finally:
        _ray_shutdown()
        cluster.shutdown()


def _job_in_thread(cfg) -> tuple[threading.Thread, dict]:
    """run_capfilt in a thread (Ray's Cluster.add_node must run in the main thread); result["summary" | "error"]."""
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = run_capfilt(cfg, processor_cls=SlowBatches)
        except BaseException as e:  # noqa: BLE001 - reported by the test's assertion
            result["error"] = e

    t = threading.Thread(target=job, daemon=True)
    t.start()
    return t, result


@pytest.mark.slow
def test_worker_node_lost_mid_run(ray_cluster_3, tmp_path, capfilt_models):
    """Two worker nodes, one actor each; one node is removed while both hold shards. Its shards are retried on the
    other node, the shards committed before the loss are not recomputed, every key ends up exactly once."""
    import ray

    cluster = ray_cluster_3
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 40, seed=8, image_size=64, samples_per_shard=4)  # 10 shards
    out = Path(tmp_path / "out")
    cfg = tiny_config(
        corpus, str(out), capfilt_models, address=cluster.address, actors=2, batch_size=2, shards_per_actor=2
    )
    removed: dict = {}

    def remove_a_worker_node() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not list((out / "_state").glob("*.json")):
            time.sleep(0.05)
        removed["done_before"] = {p.name: p.stat().st_mtime_ns for p in (out / "parquet").glob("*.parquet")}
        victim = cluster.worker_nodes and sorted(cluster.worker_nodes, key=lambda n: n.unique_id)[0]
        cluster.remove_node(victim, allow_graceful=False)
        removed["node"] = victim.unique_id

    killer = threading.Thread(target=remove_a_worker_node, daemon=True)
    killer.start()
    summary = run_capfilt(cfg, processor_cls=SlowBatches)
    killer.join(timeout=60)
    assert "node" in removed, "the node was not removed during the run"
    assert not ray.is_initialized()
    d = summary["driver"]
    assert d["workers_lost"] >= 1 and d["retries"] >= 1, d
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 40
    check_output(str(out), corpus)  # every key exactly once, parquet and kept tars
    for name, mtime in removed["done_before"].items():  # committed before the loss: never recomputed
        assert (out / "parquet" / name).stat().st_mtime_ns == mtime
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_node_added_mid_run_gets_an_actor(slot_cluster, tmp_path, capfilt_models):
    """An elastic pool (`actors: 1:3`) on a cluster with one node of the actors' type: a second such node joins
    mid-run (as an autoscaler or an operator would add it); it gets an actor that commits shards, and every key ends
    up exactly once. The custom resource stands in for a GPU node type (`actor_resources`)."""
    cluster = slot_cluster
    first = cluster.add_node(**SLOT)
    cluster.wait_for_nodes()
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 48, seed=9, image_size=64, samples_per_shard=3)  # 16 shards
    out = tmp_path / "out"
    cfg = tiny_config(
        corpus, str(out), capfilt_models, address=cluster.address, actors="1:3", batch_size=1,
        actor_resources={"capfilt_slot": 1},
    )  # fmt: skip
    t, result = _job_in_thread(cfg)
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("_state/*.json")):
        time.sleep(0.05)
    done_before = len(list(out.glob("_state/*.json")))
    added = cluster.add_node(**SLOT).node_id
    t.join(timeout=300)
    assert "summary" in result, result.get("error")
    summary = result["summary"]
    assert done_before < 16
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 48
    check_output(str(out), corpus)
    by_node: dict = {}
    for row in summary["per_shard"]:
        by_node[row["node"]] = by_node.get(row["node"], 0) + 1
    assert set(by_node) == {first.node_id, added}, by_node  # never the head: it has no capfilt_slot
    assert by_node[added] >= 1
    assert {n["node"] for n in summary["per_node"]} == set(by_node)
    assert summary["driver"]["max_live_actors"] == 2


def test_device_auto_on_a_cluster_without_gpus_is_an_error(ray_cluster, tmp_path, capfilt_models):
    """`--device auto` on a cluster with no GPU now: one `error:` line, exit 1, no actor started."""
    import subprocess

    from tests.test_run_faults import REPO, _cmd, _env

    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 4, seed=6, image_size=64, samples_per_shard=4)
    cmd = [*_cmd(corpus, str(tmp_path / "out"), capfilt_models), "--address", ray_cluster, "--device", "auto"]
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: --device auto on a cluster that has no GPU now: pass --device cuda to wait for GPU nodes (the "
        "autoscaler is asked for them), or --device cpu to run on CPU actors"
    ]
    assert "actor pool" not in p.stderr and "Traceback" not in p.stderr
    assert not list((tmp_path / "out" / "_state").glob("*.json"))


@pytest.mark.slow
def test_draining_node_gets_no_new_shards(slot_cluster, tmp_path, capfilt_models):
    """Two worker nodes with an actor each; one is drained mid-run (`ray drain-node`, as a spot preemption notice or
    KubeRay scale-down does, with a deadline far enough): its actor finishes what it holds and gets no new shard, the
    other node does the rest, every key exactly once."""
    import subprocess

    cluster = slot_cluster
    nodes = [cluster.add_node(**SLOT) for _ in range(2)]
    cluster.wait_for_nodes()
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 48, seed=10, image_size=64, samples_per_shard=3)  # 16 shards
    out = tmp_path / "out"
    cfg = tiny_config(
        corpus, str(out), capfilt_models, address=cluster.address, actors="2", batch_size=1,
        actor_resources={"capfilt_slot": 1},
    )  # fmt: skip
    t, result = _job_in_thread(cfg)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("_state/*.json"))) < 2:
        time.sleep(0.05)
    victim = nodes[0].node_id
    drained_at = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", cluster.address,
         "--node-id", victim, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "test",
         "--deadline-remaining-seconds", "600"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    t.join(timeout=300)
    assert "summary" in result, result.get("error")
    summary = result["summary"]
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 48
    check_output(str(out), corpus)
    assert summary["driver"]["actors_drained"] == 1
    states = [json.loads(p.read_text()) for p in out.glob("_state/*.json")]
    on_victim = [s for s in states if s["node"] == victim]
    # nothing started on the drained node after the driver saw the drain (it looks every 5 s)
    assert all(s["finished"] - s["seconds"] < drained_at + 7 for s in on_victim), on_victim
    assert len(on_victim) < 16 and any(s["node"] == nodes[1].node_id for s in states)


@pytest.mark.slow
def test_elastic_pool_on_the_fake_autoscaler(autoscaling_cluster, tmp_path, capfilt_models):
    """Ray's own autoscaler (fake multi-node provider): the job starts with no worker node; the nodes come because
    capfilt asked for them (`request_resources`, one bundle per wanted actor); actors run on several of them; every
    key exactly once; after the job the request is cleared and the worker nodes scale down."""
    import ray

    from tests.conftest import FAKE_GPU

    c = autoscaling_cluster
    ray.init(address=c.address)
    assert c.alive_worker_nodes() == 0
    ray.shutdown()
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 96, seed=11, image_size=64, samples_per_shard=4)  # 24 shards
    out = tmp_path / "out"
    cfg = tiny_config(
        corpus, str(out), capfilt_models, address=c.address, actors="auto", max_actors=3, batch_size=1,
        actor_resources={FAKE_GPU: 1},
    )  # fmt: skip
    summary = run_capfilt(cfg, processor_cls=SlowBatches)
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 96
    check_output(str(out), corpus)
    nodes = {json.loads(p.read_text())["node"] for p in out.glob("_state/*.json")}
    assert len(nodes) >= 2, nodes  # the pool grew onto the nodes the autoscaler added for it
    assert len(summary["per_node"]) == len(nodes) and summary["driver"]["actors_started"] >= 2
    ray.init(address=c.address)
    try:
        assert not set(nodes) - {n["NodeID"] for n in ray.nodes()}  # they were this cluster's worker nodes
        c.wait_for(lambda: c.alive_worker_nodes() == 0, timeout=120)  # request cleared, idle nodes removed
    finally:
        ray.shutdown()
