"""Ray for the training commands: a cluster's address, or Ray started in-process (a laptop, CI, the demo).

Without the dashboard (it would cost memory and a core's share on a small machine) Ray has no State API, and Ray
Train's placement-group cleaner, a safety net that polls whether the train controller still lives, then logs
"Failed to query Ray Train Controller actor state" about once a second for the whole fit(): hundreds of lines in
`make demo`. The workers' setup hook drops that one message; every other log line stays.

Ray Train 2 also patches `print` in its workers to log through the root logger *and* tee to stdout, so every
progress line reached the driver twice; `RAY_TRAIN_ENABLE_PRINT_PATCH=0` in the job's environment keeps plain print.
"""

from __future__ import annotations

import logging

_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_STATE_API_WARNING = "Failed to query Ray Train Controller actor state"


class _DropStateApiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_STATE_API_WARNING)


def quiet_worker_logs() -> None:
    """Ray's `worker_process_setup_hook`: runs once in every worker process of the job (actors included)."""
    log = logging.getLogger(_PG_CLEANER_LOGGER)
    if not any(isinstance(f, _DropStateApiWarning) for f in log.filters):
        log.addFilter(_DropStateApiWarning())


def init_ray(address: str | None, min_cpus: int) -> None:
    """Join `address` (a cluster), or start Ray in-process with at least `min_cpus` CPUs; a no-op when Ray is up."""
    import os

    import ray

    if ray.is_initialized():
        return
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars})
        return
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, min_cpus),
        include_dashboard=False,
        runtime_env={"worker_process_setup_hook": "pipelines.train.local_ray.quiet_worker_logs", "env_vars": env_vars},
    )
