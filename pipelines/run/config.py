"""`capfilt run`'s settings: RunSettings (what CapFilt computes, inherited from CapFiltSettings, + where and how the
job runs), the pool's size range, and the model checks done before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.stages import CapFiltSettings
from pipelines.settings import Settings, resolve_path


@dataclass
class RunSettings(CapFiltSettings, Settings):
    """`capfilt run` settings: what CapFilt computes (CapFiltSettings, inherited) + where and how the job runs.
    `RunSettings.load()` reads configs/capfilt.yaml; local paths (input, output, model folders) become absolute: the
    actors' working directory is not ours."""

    PRESET: ClassVar[str | None] = "capfilt.yaml"

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


def model_config(spec: str, role: str) -> Any:
    """Read a checkpoint's BlipConfig (special ids from its tokenizer) and check the family, before Ray starts."""
    import blip

    try:
        cfg = blip.read_config(spec)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{role} {spec!r}: {e}") from None
    blip.check_family(cfg.family, role, f"{role} {spec!r}")
    return cfg
