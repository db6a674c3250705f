"""BLIP pretraining and fine-tuning on Ray Train (TorchTrainer + DDP), fed by Ray Data streaming webdataset tars.

One entry point, `train(settings)`, serves `capfilt pretrain` (ITC + ITM + LM, BlipPretrain) and `capfilt finetune`
(task "caption": BlipCaptioner LM loss with the prompt; task "retrieval": BlipRetrieval ITC + ITM with momentum
encoders and queues, same-image pairs never negatives).

Layout of `--output`:
  config.json, model.safetensors, tokenizer files   the final model (our folder format: `blip.load(output)` reads it)
  checkpoints/step_00000123/                         model folder + train_state.pt (optimizer, schedule position,
                                                     step, RNG per rank, queues); `--resume` picks the latest
  log.jsonl, log.csv, loss_curves.png                per logged step: losses, lr, samples/s
  train_summary.json                                 run totals, skipped-sample counts, cross-worker parameter check

The driver builds the initial model once (from scratch with a preset, from `--init`, or from the latest checkpoint),
checks the settings (queue size divisible by the global batch, ...), and hands weights + state to the workers through
the object store. Checkpoints are written by rank 0 straight into `--output` (a shared path on multi-node clusters).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.train.checkpoints import latest_checkpoint, list_checkpoints
from pipelines.train.loop import LoopConfig, train_loop_per_worker
from pipelines.train.models import build_model
from pipelines.train.settings import TrainSettings

# ---------------------------------------------------------------------------------------------------- driver


def _init_ray(s: TrainSettings) -> None:
    from pipelines.train.local_ray import init_ray

    # local: the train workers hold CPUs for their whole life; leave at least one for the Ray Data read tasks
    init_ray(s.address, int(math.ceil(s.workers * s.cpus_per_worker)) + 1)


def plot_losses(output: str | Path) -> Path | None:
    """loss_curves.png from log.jsonl: one panel per objective."""
    p = Path(output) / "log.jsonl"
    if not p.is_file():
        return None
    rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel per loss, the learning rate, then the collapse probe (contrastive tasks): temp, cosines, R@1
    panels: list[tuple[str, list[str]]] = [(k, [k]) for k in rows[0] if k.startswith("loss")]
    panels.append(("learning rate", ["lr"]))
    if "temp" in rows[0]:
        panels += [
            ("ITC temperature", ["temp"]),
            ("cosines (collapse: img mean -> 1, std/gap -> 0)", ["img_cos_mean", "img_cos_std", "it_cos_std", "it_cos_gap"]),
            ("in-batch R@1", ["r1_i2t", "r1_t2i"]),
        ]  # fmt: skip
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    steps = [r["step"] for r in rows]
    for ax, (title, cols) in zip(axes.flat, panels):
        for c in cols:
            ax.plot(steps, [r.get(c, float("nan")) for r in rows], label=c if len(cols) > 1 else None)
        if len(cols) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(output) / "loss_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def train(s: TrainSettings) -> dict[str, Any]:
    """Run pretraining / fine-tuning to the end; returns the summary also written to output/train_summary.json."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.data import AugmentConfig, SkipCounter, TextPrep, count_tar_samples, list_tars

    if not s.output:
        raise ValueError("--output is required")
    tars = list_tars(s.data)
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)

    resume_dir = latest_checkpoint(out) if s.resume else None
    if s.resume and resume_dir is None:
        print(f"no checkpoint in {out / 'checkpoints'}; starting from the beginning")
    model, tok = build_model(s, str(resume_dir) if resume_dir else s.init)
    cfg = model.config
    if s.task in ("pretrain", "retrieval") and cfg.queue_size % s.global_batch:
        raise ValueError(
            f"queue size {cfg.queue_size} must be divisible by the global batch {s.global_batch} "
            f"(batch_size {s.batch_size} x {s.workers} workers)"
        )
    n_samples = count_tar_samples(tars)
    steps_per_epoch = n_samples // s.global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{n_samples} samples in {len(tars)} tars are fewer than one global batch of {s.global_batch}")

    train_state, rng_states = None, {}
    if resume_dir is not None:
        train_state = torch.load(resume_dir / "train_state.pt", map_location="cpu", weights_only=False)
        for f in resume_dir.glob("rng_rank*.pt"):
            rng_states[int(f.stem[len("rng_rank") :])] = torch.load(f, weights_only=False)
        print(f"resuming from {resume_dir} (step {train_state['step']})")

    _init_ray(s)
    use_gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    counter = ray.remote(SkipCounter).options(num_cpus=0).remote()
    aug = AugmentConfig(cfg.vision.image_size, s.min_scale, s.hflip, s.rand_aug_n, s.rand_aug_m)
    prompt = cfg.prompt if s.task == "caption" else ""

    loop = LoopConfig(
        settings=s,
        model_config=cfg,
        tokenizer=tok,
        state_ref=ray.put(model.state_dict()),
        train_state_ref=ray.put(train_state) if train_state is not None else None,
        rng_states=rng_states,
        steps_per_epoch=steps_per_epoch,
        tars=tars,
        augment=aug,
        text=TextPrep(max_words=s.max_words, max_length=s.max_length, prompt=prompt),
        counter=counter,
    )
    del model, train_state
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.workers, use_gpu=use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}
        ),
        run_config=RunConfig(name="capfilt_" + s.task, storage_path=str((out / "ray_results").resolve())),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    worker = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]
    summary = {
        "task": s.task,
        "data": s.data,
        "tars": len(tars),
        "samples_in_tars": n_samples,
        "global_batch": s.global_batch,
        "steps_per_epoch": steps_per_epoch,
        **worker,
        "wall_seconds": wall,
        "mean_samples_per_s": float(np.mean([r["samples_per_s"] for r in rows])) if rows else None,
        "last": rows[-1] if rows else None,
        **ray.get(counter.counts.remote()),
        "checkpoints": [str(p) for _, p in list_checkpoints(out)],
        "output": str(out),
    }
    plot_losses(out)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_command(task: str, config: str | None, set_items: tuple[str, ...] = (), **overrides: Any) -> dict[str, Any]:
    """`capfilt pretrain` / `capfilt finetune`: preset YAML (default per task) + `--set key=value` + flags -> train."""
    from pipelines.settings import overrides as merge

    if config is None:
        config = "pretrain_base.yaml" if task == "pretrain" else f"finetune_{task}.yaml"  # a name in configs/
    s = TrainSettings.load(config, **{**merge(set_items, **overrides), "task": task})
    if task != "pretrain" and not (s.init or s.resume):
        raise ValueError("fine-tuning needs --init CKPT (a pretrain, caption or retrieval checkpoint)")
    summary = train(s)
    last = summary.get("last") or {}
    losses = " ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss"))
    print(
        f"done: {summary.get('final_step')} steps, {losses}; "
        f"{summary.get('mean_samples_per_s') or 0:.1f} samples/s; skipped {summary.get('skipped', {})}; "
        f"model in {s.output}, logs in {s.output}/log.jsonl, curves in {s.output}/loss_curves.png"
    )
    return summary
