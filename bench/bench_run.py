"""`capfilt run` throughput vs the bare CapFiltStage loop on the same data and models; prints the ratio.

The bare loop: decode every sample in this process (not timed), then time only `CapFiltStage.__call__` over batches,
i.e. the model work with no Ray, no I/O and no writing. `capfilt run` runs twice on the same number of shards, once
with 1/8 of the samples: the difference in time is the steady state (actor start-up and model loading, paid once per
job, cancel out). Ray is started before the clocks. Also printed: the driver's CPU seconds per 1,000 samples
(this process is the driver), which should be ~0 and not grow with the samples per shard. Goal: ratio >= 0.9.

`--no-ray` (where Ray is not installed, e.g. a bare GPU machine): instead of `capfilt run`, one CapFilt actor's whole
pipeline in this process: its ShardProcessor (reader thread, decode threads, the stage under the model lock, the
shard writer) over every shard, `shards_per_actor` calls at a time as on an actor (2 on a GPU), models loaded
before the clock. That is `capfilt run` per GPU less Ray's per-shard call (~0.03 driver CPU s per shard).

    python bench/bench_run.py --tiny --config configs/capfilt_tiny.yaml   # CPU, tiny random models, 4096 samples
    python bench/bench_run.py --captioner DIR --filter DIR --device cuda --batch-size 64   # GPU, real models
    git worktree add /tmp/old OLD_COMMIT && python bench/bench_run.py --tiny --config ... --code /tmp/old
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "capfilt.yaml"


def _tiny_models(root: Path, size: str = "tiny") -> tuple[str, str]:
    import torch

    from blip import save_pretrained
    from blip.config import BlipConfig
    from blip.model import MODEL_CLASSES, init_weights
    from blip.tokenizer import build_tokenizer, write_vocab
    from capfilt.synth import VOCAB_WORDS

    tok = build_tokenizer(write_vocab(root / "vocab", VOCAB_WORDS))
    out = []
    for family in ("caption", "retrieval"):
        torch.manual_seed(0)
        m = MODEL_CLASSES[family](BlipConfig.from_name(size, family=family))
        init_weights(m, std=0.2)
        m.tokenizer = tok
        out.append(str(save_pretrained(m, root / family)))
    return out[0], out[1]


def bare_loop(cfg, corpus: str) -> tuple[float, int, int]:
    """Seconds spent in CapFiltStage over all samples (decode done beforehand, untimed), samples, batch size."""
    import torch

    from capfilt.decode import decode_or_error
    from capfilt.stages import CapFiltStage, stage_batch
    from pipelines.io import ShardReader, list_shards

    stage = CapFiltStage(**cfg.stage_settings())
    stage.setup()
    if stage._device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.actor_cpus)))  # the same threads as one CPU actor
    rows = [r for s in list_shards(corpus) for r in ShardReader(s)]
    decoded = [decode_or_error(r["image"], stage.image_size) for r in rows]
    n, b = len(rows), stage.batch_size  # batch_size auto: what the stage measured
    batches = [stage_batch(rows[i : i + b], decoded[i : i + b], stage.image_size) for i in range(0, n, b)]
    stage(stage_batch(rows[:2], decoded[:2], stage.image_size))  # warm-up (kernels, allocator)
    if stage._device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for batch in batches:
        stage(batch)
    if stage._device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n, b


def actor_loop(cfg, corpus: str, out: str) -> tuple[float, int]:
    """Seconds for one CapFilt actor's pipeline (ShardProcessor, no Ray) over every shard of `corpus`, and samples:
    the actor `capfilt run` would start here (pool_shape with this machine's GPUs, actor_settings)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pipelines.io import list_shards
    from pipelines.run.config import model_config
    from pipelines.run.scheduler import actor_settings, pool_shape
    from pipelines.run.worker import ShardProcessor

    cfg = dataclasses.replace(cfg, output=out)
    shape = pool_shape(cfg, torch.cuda.device_count(), on_cluster=False)
    image_size = max(
        model_config(m, role).vision.image_size for m, role in ((cfg.captioner, "captioner"), (cfg.filter, "filter"))
    )
    proc = ShardProcessor(*actor_settings(cfg, shape, image_size))
    proc.setup()
    shards = list_shards(corpus)
    t = time.perf_counter()
    with ThreadPoolExecutor(shape.per_actor) as pool:
        records = list(pool.map(proc, shards))
    seconds = time.perf_counter() - t
    assert all(r["state"] == "done" for r in records), records
    return seconds, sum(int(r["in"]) for r in records)


# Runs in a child interpreter whose imports come from `--code` (default: this checkout), so the same measurement can
# be taken of another version of capfilt (e.g. the previous design, from a `git worktree`).
_JOBS = """
import json, sys, time
import ray
from pipelines.run.config import RunSettings
from pipelines.run.job import run_capfilt
config, overrides, jobs = json.loads(sys.argv[1])
ray.init(include_dashboard=False, log_to_driver=False)
out = []
for corpus, folder in jobs:
    cfg = RunSettings.load(config, input=corpus, output=folder, progress=False, **overrides)
    cpu, t = time.process_time(), time.perf_counter()
    s = run_capfilt(cfg, echo=lambda m: None)
    out.append({"wall": time.perf_counter() - t, "cpu": time.process_time() - cpu, "in": s["counts"]["in"],
                "failed": len(s["failed_shards"])})
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def run_jobs(code: Path, config: str, overrides: dict, jobs: list[tuple[str, str]]) -> list[dict]:
    """`capfilt run` on each (corpus, output) in one child process (Ray started before the clocks)."""
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_USAGE_STATS_ENABLED": "0"}
    arg = json.dumps([config, overrides, jobs])
    r = subprocess.run([sys.executable, "-c", _JOBS, arg], env=env, cwd=code, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
        raise RuntimeError(f"capfilt run failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=256, help="synthetic corpus image size (decoded to model size)")
    ap.add_argument("--captioner")
    ap.add_argument("--filter")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU)")
    ap.add_argument("--random-size", choices=["tiny", "base", "large"], help="random models of this preset (GPU check)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=None, help="N or auto")
    ap.add_argument("--num-captions", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--code", default=str(REPO), help="capfilt checkout whose `capfilt run` is measured")
    ap.add_argument("--no-ray", action="store_true", help="one actor's pipeline without Ray instead of capfilt run")
    args = ap.parse_args()

    from capfilt.synth import write_corpus
    from pipelines.run.config import RunSettings

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_run_"))
    cap, filt = args.captioner, args.filter
    if args.tiny or args.random_size:
        cap, filt = _tiny_models(work, args.random_size or "tiny")
    if not (cap and filt):
        ap.error("give --captioner and --filter, or --tiny")
    # the same shard count at two sizes: the difference is the steady state (actor start-up and model loading,
    # paid once per job, cancel out), and the driver's cost per sample shows whether it depends on sample count
    per_shard = max(1, args.samples // args.shards)
    small_per_shard = max(1, per_shard // 8)
    big, small = str(work / "corpus"), str(work / "corpus_small")
    write_corpus(big, per_shard * args.shards, image_size=args.image_size, samples_per_shard=per_shard)
    write_corpus(small, small_per_shard * args.shards, image_size=args.image_size, samples_per_shard=small_per_shard)
    cfg = RunSettings.load(
        args.config, input=big, output=str(work / "out"), captioner=cap, filter=filt, batch_size=args.batch_size,
        num_captions=args.num_captions, device=args.device, progress=False,
    )  # fmt: skip

    bare_s, n, batch = bare_loop(cfg, big)
    if args.no_ray:
        actor_s, n_actor = actor_loop(cfg, big, str(work / "out_actor"))
        assert n_actor == n, (n_actor, n)
        result = {
            "mode": "no-ray: one actor's pipeline in this process",
            "samples": n,
            "shards": args.shards,
            "batch_size": cfg.batch_size if cfg.batch_size == batch else f"{cfg.batch_size} -> {batch}",
            "num_captions": cfg.num_captions,
            "bare_stage_samples_per_s": round(n / bare_s, 2),
            "actor_pipeline_samples_per_s": round(n / actor_s, 2),
            "ratio_actor_over_bare": round(bare_s / actor_s, 3),
        }
        print(json.dumps(result, indent=2))
        return
    keys = ("captioner", "filter", "num_captions", "batch_size", "device")
    overrides = {k: getattr(cfg, k) for k in keys}
    code = Path(args.code).resolve()
    # a first job warms up what only the first one pays (Ray's worker processes, imports, matplotlib)
    jobs = [(small, str(work / "out_warmup")), (small, str(work / "out_small")), (big, str(work / "out_big"))]
    (_, r_small, r_big) = run_jobs(code, str(Path(args.config or DEFAULT_CONFIG).resolve()), overrides, jobs)
    n_small = r_small["in"]
    assert r_big["in"] == n and not r_big["failed"], r_big
    steady = (n - n_small) / (r_big["wall"] - r_small["wall"])
    result = {
        "code": str(code),
        "samples": n,
        "shards": args.shards,
        "batch_size": cfg.batch_size if cfg.batch_size == batch else f"{cfg.batch_size} -> {batch}",
        "num_captions": cfg.num_captions,
        "bare_stage_samples_per_s": round(n / bare_s, 2),
        "capfilt_run_samples_per_s_end_to_end": round(n / r_big["wall"], 2),
        "capfilt_run_samples_per_s_steady": round(steady, 2),
        "ratio_run_over_bare_steady": round(steady / (n / bare_s), 3),
        "driver_cpu_s_per_1000_samples": round(1000 * r_big["cpu"] / n, 3),
        "driver_cpu_s_per_1000_samples_marginal": round(1000 * (r_big["cpu"] - r_small["cpu"]) / (n - n_small), 3),
        "driver_cpu_s_per_shard": round(r_big["cpu"] / args.shards, 4),
        "jobs": {"small": [n_small, round(r_small["wall"], 2)], "big": [n, round(r_big["wall"], 2)]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
