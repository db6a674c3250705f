"""The fake-autoscaler cluster fixture works the way the elastic actor pool uses it: an explicit resource request
scales worker nodes up, an actor needing the fake GPU lands on one of them, clearing the request lets them go."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def test_request_resources_scales_up_and_down(autoscaling_cluster, capsys):
    import ray
    from ray.autoscaler.sdk import request_resources

    c = autoscaling_cluster
    ray.init(address=c.address, log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()  # the driver's node is the head
    assert c.alive_worker_nodes() == 0

    t0 = time.monotonic()
    request_resources(bundles=[{"CPU": 1, "fake_gpu": 1}] * 2)
    c.wait_for(lambda: c.alive_worker_nodes() == 2, timeout=90)
    up_s = time.monotonic() - t0

    @ray.remote(num_cpus=1, resources={"fake_gpu": 1})
    class Probe:
        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

    probe = Probe.remote()
    node = ray.get(probe.node.remote(), timeout=60)
    assert node != head_id
    assert node in c.worker_node_ids()

    # A request persists until the next call replaces it; an empty one clears it.
    request_resources(bundles=[])
    ray.kill(probe)
    t1 = time.monotonic()
    c.wait_for(lambda: c.alive_worker_nodes() == 0, timeout=90)
    down_s = time.monotonic() - t1
    with capsys.disabled():
        print(
            f"\n[autoscaler] head start {c.start_s:.1f} s, scale-up 0->2 {up_s:.1f} s, scale-down 2->0 {down_s:.1f} s"
        )
