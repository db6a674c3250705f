"""The Ray Train worker loop: every rank builds the model from the driver's weights, streams its own batches, steps,
logs (rank 0), checkpoints, and checks at the end that all ranks hold the same parameters."""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from blip.config import BlipConfig
from pipelines.train.checkpoints import all_min, param_digest, set_rng_state, write_checkpoint
from pipelines.train.data import AugmentConfig, TextPrep
from pipelines.train.models import model_class, save_folder
from pipelines.train.settings import TrainSettings, alpha_at, learning_rate

LOSS_KEYS = {
    "pretrain": ("loss_itc", "loss_itm", "loss_lm"),
    "caption": ("loss_lm",),
    "retrieval": ("loss_itc", "loss_itm"),
}
# logged with the losses of the contrastive tasks (see collapse_probe): collapse shows as img_cos_mean -> 1,
# it_cos_std -> 0, it_cos_gap -> 0 and R@1 at chance (1 / batch)
PROBE_KEYS = ("temp", "img_cos_mean", "img_cos_std", "it_cos_std", "it_cos_gap", "r1_i2t", "r1_t2i")


@torch.no_grad()
def collapse_probe(
    model: nn.Module, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor
) -> dict[str, float]:
    """Signs of contrastive collapse on one batch (the ITC features of the online towers, eval mode, no gradient):

    temp          the learned ITC temperature
    img_cos_*     mean / std of the image-image cosines between different samples (mean -> 1: all images alike)
    it_cos_std    std of all image-text cosines of the batch (-> 0: the similarities say nothing)
    it_cos_gap    mean cosine of matching pairs minus that of non-matching ones
    r1_i2t/t2i    in-batch R@1 (a hit: the top text/image belongs to the same sample id); chance is ~1 / batch
    """
    if not all(hasattr(model, a) for a in ("image_feat", "text_feat", "encode_image", "temp")):
        return {}
    was_training = model.training
    model.eval()  # no dropout / drop path: no random draws, so logging does not change the training curve
    try:
        img = model.image_feat(model.encode_image(pixels)).float()  # (B, E), L2-normalised
        txt = model.text_feat(ids, mask).float()  # (B, E)
    finally:
        model.train(was_training)
    b = img.shape[0]
    same = idx.view(-1, 1) == idx.view(1, -1)  # (B, B) same sample id (duplicates are not negatives)
    other = ~torch.eye(b, dtype=torch.bool, device=img.device)
    ii, it = img @ img.t(), img @ txt.t()  # (B, B)
    return {
        "temp": float(model.temp),
        "img_cos_mean": float(ii[other].mean()),
        "img_cos_std": float(ii[other].std()),
        "it_cos_std": float(it.std()),
        "it_cos_gap": float(it.diagonal().mean() - it[~same].mean()) if bool((~same).any()) else 0.0,
        "r1_i2t": float(same[torch.arange(b, device=img.device), it.argmax(1)].float().mean()),
        "r1_t2i": float(same[it.argmax(0), torch.arange(b, device=img.device)].float().mean()),
    }


class _Log:
    """Rank 0's JSONL + CSV log; on resume the lines after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, output: str, keys: tuple[str, ...], resume_step: int):
        self.jsonl, self.csv = Path(output) / "log.jsonl", Path(output) / "log.csv"
        self.cols = ["step", "epoch", "lr", "loss", *keys, "samples_per_s", "elapsed_s"]
        rows = []
        if resume_step > 0 and self.jsonl.is_file():
            rows = [json.loads(x) for x in self.jsonl.read_text().splitlines() if x.strip()]
            rows = [r for r in rows if r["step"] <= resume_step]
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.cols, extrasaction="ignore").writerow(row)


@dataclass
class LoopConfig:
    """What the driver hands every Ray Train worker (as `train_loop_config["loop"]`)."""

    settings: TrainSettings
    model_config: BlipConfig
    tokenizer: Any
    state_ref: Any  # ObjectRef of the initial state dict
    train_state_ref: Any | None  # ObjectRef of a resumed run's train_state.pt (optimizer, position, queues)
    rng_states: dict[int, dict[str, Any]]  # a resumed run's RNG state per rank
    steps_per_epoch: int
    # each rank streams its own epochs (pipelines.train.data.build_train_dataset): order and draws seeded per
    # (seed, epoch, rank), so a rerun or a resume sees the same batches
    tars: list[str]
    augment: AugmentConfig
    text: TextPrep
    counter: Any  # the SkipCounter actor


@dataclass
class _Worker:
    """One Ray Train worker's state: settings, its rank, the DDP model (and the module inside), the optimizer, and
    the position in the schedule."""

    s: TrainSettings
    config: LoopConfig
    rank: int
    world: int
    device: torch.device
    model: nn.Module  # DDP-wrapped (what forward/backward go through)
    raw: nn.Module  # the module inside: state, checkpoints, probes
    opt: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0

    @property
    def position(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


def _setup_worker(config: LoopConfig) -> _Worker:
    """The model from the driver's weights, wrapped for DDP; the optimizer; seeds; a resumed run's state."""
    import ray
    import ray.train
    import ray.train.torch

    s = config.settings
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg = config.model_config
    train_state = ray.get(config.train_state_ref) if config.train_state_ref is not None else None

    raw = model_class(model_cfg.family, model_cfg)
    raw.load_state_dict(ray.get(config.state_ref), strict=False)  # tied aliases: the only keys a saver drops
    raw.tokenizer = config.tokenizer
    # DDP broadcasts rank 0's weights and buffers at wrap time; the queues then stay in sync through the all-gather
    # in the model, so the per-forward buffer broadcast (two E x 57600 queues) is turned off.
    model = ray.train.torch.prepare_model(raw, parallel_strategy_kwargs={"forward_sync_buffers": False})
    raw = model.module if hasattr(model, "module") else model
    # the original applies weight decay 0.05 to every trainable parameter (one AdamW group); kept so
    opt = torch.optim.AdamW([p for p in raw.parameters() if p.requires_grad], lr=s.init_lr, weight_decay=s.weight_decay)
    w = _Worker(s, config, rank, world, ray.train.torch.get_device(), model, raw, opt)

    seed = s.seed + 1000 * rank
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if train_state is not None:
        opt.load_state_dict(train_state["optimizer"])
        w.step, w.epoch, w.step_in_epoch = train_state["step"], train_state["epoch"], train_state["step_in_epoch"]
        bufs = dict(raw.named_buffers())
        for k, v in train_state["queues"].items():
            if k in bufs:
                bufs[k].copy_(v.to(bufs[k].device))
        rng = config.rng_states.get(rank) if train_state["world_size"] == world else None
        if rng is not None:
            set_rng_state(rng)
    return w


def _epoch_batches(w: _Worker, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of `epoch`: the same for the same (seed, epoch, rank, world), run after run."""
    from pipelines.train.data import build_train_dataset, shuffle_seed

    s, c = w.s, w.config
    ds = build_train_dataset(c.tars, c.augment, c.text, c.tokenizer, c.counter, s.seed, epoch, w.rank, w.world)
    return iter(
        ds.iter_torch_batches(
            batch_size=s.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=s.shuffle_buffer or None,
            local_shuffle_seed=shuffle_seed(s.seed, epoch, w.rank) if s.shuffle_buffer else None,
            device=w.device,
        )
    )


def _train_step(w: _Worker, batch: dict[str, torch.Tensor], probe_now: bool) -> tuple[float, dict[str, float]]:
    """One optimizer step on `batch`; returns (lr, the step's losses + the collapse probe when `probe_now`)."""
    from blip.image import normalize

    s, cfg, raw = w.s, w.config.model_config, w.raw
    keys = LOSS_KEYS[s.task]
    lr = learning_rate(s, w.epoch, w.step_in_epoch)
    for g in w.opt.param_groups:
        g["lr"] = lr
    pixels = normalize(batch["image"], cfg.image_mean, cfg.image_std)  # (B, 3, S, S)
    length = int(batch["attention_mask"].sum(1).max())  # trim to the longest text (padding="longest")
    ids, mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    alpha = alpha_at(cfg.alpha, w.epoch, w.step_in_epoch, w.config.steps_per_epoch)
    with torch.autocast(device_type=w.device.type, dtype=torch.bfloat16, enabled=w.device.type == "cuda" and s.bf16):
        # collapse signs on this batch, before the step trains on it (no gradient, no random draws)
        probe = collapse_probe(raw, pixels, ids, mask, batch["idx"]) if probe_now else {}
        if s.task == "pretrain":
            if s.itc_warmup_steps and w.step == s.itc_warmup_steps:
                raw.copy_params()  # momentum encoders start from the warmed-up towers
            losses = w.model(
                pixels,
                ids,
                mask,
                alpha=alpha,
                inbatch_itc=w.step < s.itc_warmup_steps,
                random_itm_negatives=w.step < s.itm_warmup_steps,
            )
        elif s.task == "retrieval":
            losses = w.model(pixels, ids, mask, batch["idx"], alpha=alpha)
        else:
            losses = {"loss_lm": w.model(pixels, ids, mask)}
    loss = sum(losses[k] for k in keys)
    w.opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip)
    w.opt.step()
    w.step += 1
    w.step_in_epoch += 1
    return lr, {"loss": float(loss.detach()), **{k: float(losses[k].detach()) for k in keys}, **probe}


def _print_progress(w: _Worker, row: dict[str, Any], total_steps: int) -> None:
    parts = " ".join(f"{k[5:]} {row[k]:.3f}" for k in LOSS_KEYS[w.s.task])
    if "temp" in row:
        parts += f" | temp {row['temp']:.3f} R@1 {row['r1_i2t']:.2f}/{row['r1_t2i']:.2f}"
    done = int(20 * w.step / total_steps)
    print(
        f"[{w.s.task}] [{'#' * done}{'.' * (20 - done)}] step {w.step}/{total_steps} ep {w.epoch} | {parts} | "
        f"lr {row['lr']:.2e} | {row['samples_per_s']:.1f} samples/s",
        flush=True,
    )


def _finish(w: _Worker, t_start: float) -> None:
    """Check that every worker ends with the same parameters, save the final model, report to Ray Train."""
    import ray.train
    import torch.distributed as dist

    digest = param_digest(w.raw).to(w.device)
    in_sync, max_diff = True, 0.0
    if dist.is_available() and dist.is_initialized() and w.world > 1:
        gathered = [torch.empty_like(digest) for _ in range(w.world)]
        dist.all_gather(gathered, digest)
        max_diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        in_sync = max_diff == 0.0
    if w.rank == 0:
        save_folder(w.raw, w.s.output, slim=True)
    metrics = {
        "final_step": w.step,
        "epochs_done": w.epoch,
        "world_size": w.world,
        "params_in_sync": in_sync,
        "param_digest_max_diff": max_diff,
        "torch_threads": torch.get_num_threads(),
        "train_seconds": time.time() - t_start,
    }
    # Ray Train (v2) keeps metrics only with a checkpoint: rank 0 attaches a tiny one, the weights live in --output
    if w.rank == 0:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "result.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_loop_per_worker(train_loop_config: dict[str, LoopConfig]) -> None:
    """Runs on every Ray Train worker: epochs of this rank's batches, steps, logs, checkpoints, the final check."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop prints its own progress line
    config = train_loop_config["loop"]
    w = _setup_worker(config)
    s = w.s
    keys = LOSS_KEYS[s.task] + (PROBE_KEYS if s.task in ("pretrain", "retrieval") else ())
    log = _Log(s.output, keys, w.step) if w.rank == 0 else None
    steps_per_epoch = config.steps_per_epoch
    total_steps = min(s.max_steps or 10**18, s.epochs * steps_per_epoch)
    t_start, t_last, n_last = time.time(), time.time(), 0
    w.model.train()
    last_ckpt = w.step
    while w.epoch < s.epochs and w.step < total_steps:
        it = _epoch_batches(w, w.epoch)
        # resumed mid-epoch: replay (without training) the batches this epoch already trained on, so the run goes on
        # with exactly the batches and augmentation draws the uninterrupted run would have had
        for _ in range(w.step_in_epoch):
            if next(it, None) is None:
                break
        batch: dict[str, torch.Tensor] | None = None
        while w.step < total_steps and w.step_in_epoch < steps_per_epoch:
            batch = next(it, None)
            # every rank must run the same number of steps, or the DDP all-reduce hangs
            if all_min(int(batch is not None), w.device) == 0:
                break
            will_log = w.rank == 0 and ((w.step + 1) % s.log_every == 0 or w.step + 1 == total_steps)
            epoch = w.epoch
            lr, values = _train_step(w, batch, probe_now=will_log and len(keys) > len(LOSS_KEYS[s.task]))
            n_last += s.batch_size * w.world
            if will_log:
                now = time.time()
                row = {"step": w.step, "epoch": epoch, "lr": lr, **values}
                row |= {"samples_per_s": n_last / max(now - t_last, 1e-9), "elapsed_s": now - t_start}
                log.write(row)
                _print_progress(w, row, total_steps)
                t_last, n_last = now, 0
            if w.step % s.checkpoint_every == 0:
                write_checkpoint(w.raw, w.opt, s, w.position, w.rank, w.world)
                last_ckpt = w.step
        if w.step_in_epoch >= steps_per_epoch or batch is None:
            w.epoch, w.step_in_epoch = w.epoch + 1, 0
        del it
    if last_ckpt != w.step:
        write_checkpoint(w.raw, w.opt, s, w.position, w.rank, w.world)
    _finish(w, t_start)
