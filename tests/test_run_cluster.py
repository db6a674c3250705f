"""`capfilt run` on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster), joined via --address."""

from __future__ import annotations

import pytest

from capfilt.synth import write_corpus
from pipelines.run import run_capfilt
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
