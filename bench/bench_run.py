"""`capfilt run` throughput vs the bare CapFiltStage loop on the same data and models; prints the ratio.

The bare loop: decode every sample in this process (not timed), then time only `CapFiltStage.__call__` over batches,
i.e. the model work with no Ray, no I/O and no writing. `capfilt run` is timed end to end (Ray start excluded: Ray
is started before the clock), so the ratio says how much the job adds on top of the models. Goal on GPU: >= 0.9.

    python bench/bench_run.py --samples 2000 --captioner DIR --filter DIR [--batch-size 32] [--device cuda]
    python bench/bench_run.py --samples 64 --tiny        # CPU smoke run with tiny random models
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _tiny_models(root: Path) -> tuple[str, str]:
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
        m = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family))
        init_weights(m, std=0.2)
        m.tokenizer = tok
        out.append(str(save_pretrained(m, root / family)))
    return out[0], out[1]


def bare_loop(cfg, corpus: str) -> tuple[float, int]:
    """Seconds spent in CapFiltStage over all samples (decode done beforehand, untimed)."""
    import torch

    from capfilt.decode import DecodeStage
    from capfilt.stages import CapFiltStage
    from pipelines.io import ShardReader, list_shards

    stage = CapFiltStage(
        cfg.captioner, cfg.filter, num_captions=cfg.num_captions, top_p=cfg.top_p, max_length=cfg.max_length,
        min_length=cfg.min_length, repetition_penalty=cfg.repetition_penalty, threshold=cfg.threshold,
        device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed,
    )  # fmt: skip
    stage.setup()
    if stage._device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.actor_cpus)))  # the same threads as one CPU actor
    decode = DecodeStage(image_size=stage.image_size, image_column="image", fallback_columns=())
    decode.setup()
    rows = [r for s in list_shards(corpus) for r in ShardReader(s)]
    batch = decode({k: np.array([r[k] for r in rows], dtype=object) for k in ("key", "image", "caption")})
    n = len(rows)
    stage({k: v[: min(2, n)] for k, v in batch.items()})  # warm-up (kernels, allocator)
    if stage._device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, n, cfg.batch_size):
        stage({k: v[i : i + cfg.batch_size] for k, v in batch.items()})
    if stage._device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=256, help="synthetic corpus image size (decoded to model size)")
    ap.add_argument("--captioner")
    ap.add_argument("--filter")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (CPU smoke run)")
    ap.add_argument("--config", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-captions", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from capfilt.synth import write_corpus
    from pipelines.run import load_config, run_capfilt

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_run_"))
    cap, filt = args.captioner, args.filter
    if args.tiny:
        cap, filt = _tiny_models(work)
    if not (cap and filt):
        ap.error("give --captioner and --filter, or --tiny")
    corpus = str(work / "corpus")
    write_corpus(corpus, args.samples, image_size=args.image_size, samples_per_shard=args.samples_per_shard)
    cfg = load_config(
        args.config, input=corpus, output=str(work / "out"), captioner=cap, filter=filt, batch_size=args.batch_size,
        num_captions=args.num_captions, device=args.device, progress=False,
    )  # fmt: skip

    bare_s, n = bare_loop(cfg, corpus)
    ray.init(include_dashboard=False, log_to_driver=False)
    t = time.perf_counter()
    summary = run_capfilt(cfg, echo=lambda m: None)
    job_s = time.perf_counter() - t
    ray.shutdown()
    assert summary["counts"]["in"] == n, summary["counts"]
    result = {
        "samples": n,
        "batch_size": cfg.batch_size,
        "num_captions": cfg.num_captions,
        "bare_stage_samples_per_s": round(n / bare_s, 2),
        "capfilt_run_samples_per_s": round(n / job_s, 2),
        "ratio_run_over_bare": round(bare_s / job_s, 3),
        "note": "capfilt run time includes actor start-up (model load) and writing; Ray start excluded",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
