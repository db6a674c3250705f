"""`capfilt run` on multi-node Ray clusters on this machine (ray.cluster_utils.Cluster), joined via --address:
a plain run, and a worker node lost while its shards are in flight."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from capfilt.synth import write_corpus
from pipelines.run import run_capfilt
from pipelines.worker import ShardProcessor
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
