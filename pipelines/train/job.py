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

import csv
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

TASKS = ("pretrain", "caption", "retrieval")  # each task trains the model family of the same name
LOSS_KEYS = {
    "pretrain": ("loss_itc", "loss_itm", "loss_lm"),
    "caption": ("loss_lm",),
    "retrieval": ("loss_itc", "loss_itm"),
}
CKPT_RE = re.compile(r"^step_(\d+)$")
# logged with the losses of the contrastive tasks (see collapse_probe): collapse shows as img_cos_mean -> 1,
# it_cos_std -> 0, it_cos_gap -> 0 and R@1 at chance (1 / batch)
PROBE_KEYS = ("temp", "img_cos_mean", "img_cos_std", "it_cos_std", "it_cos_gap", "r1_i2t", "r1_t2i")


@dataclass
class TrainSettings:
    """Every run setting; YAML presets in configs/ set these keys, CLI flags override them."""

    task: str = "pretrain"  # pretrain | caption | retrieval
    data: str = ""
    output: str = ""
    model: str = "base"  # preset for a from-scratch model: tiny | base | large
    init: str | None = None  # any checkpoint blip.load reads
    tokenizer: str | None = None  # tokenizer folder / vocab.txt (from-scratch runs; a checkpoint carries its own)
    # from-scratch runs: start the ViT from these weights, as the original pretraining starts from DeiT's ImageNet ViT
    # (a timm/DeiT .pth, a `capfilt warmup-vision` folder, or any BLIP checkpoint's visual encoder)
    init_vision: str | None = None
    resume: bool = False
    # model overrides (None: keep the preset's / checkpoint's value)
    image_size: int | None = None
    queue_size: int | None = None
    momentum: float | None = None
    alpha: float | None = None
    label_smoothing: float | None = None
    drop_path_rate: float | None = None
    grad_checkpointing: bool = False
    # from-scratch init std: 0.02 is BERT/ViT's, made for the pretrained towers BLIP starts from; a tiny model trained
    # from scratch needs ~1/sqrt(width) or its image and text features start (and stay) nearly identical
    init_std: float = 0.02
    # pretraining from scratch: the first steps use plain in-batch ITC instead of momentum ITC + queues (a stand-in
    # for the pretrained towers BLIP starts from; see BlipPretrain.forward); 0 = the original recipe throughout
    itc_warmup_steps: int = 0
    # pretraining from scratch: the first steps draw ITM's negatives uniformly from the batch instead of by ITC
    # similarity (see BlipPretrain.forward); 0 = the original's hard negatives throughout
    itm_warmup_steps: int = 0
    # optimisation (the original BLIP schedules are per epoch)
    batch_size: int = 75  # per worker; global batch = batch_size * workers
    epochs: int = 20
    max_steps: int | None = None  # stop after this many optimizer steps in total (tests, smoke runs)
    init_lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000  # linear warmup_lr -> init_lr over the first steps of epoch 0
    lr_decay_rate: float = 0.9
    schedule: str = "step"  # step: lr = max(min_lr, init_lr * rate**epoch) | cosine: init_lr -> min_lr over epochs
    weight_decay: float = 0.05
    grad_clip: float | None = None
    bf16: bool = True  # autocast on GPU only
    # data
    min_scale: float = 0.2
    hflip: bool = True
    rand_aug_n: int = 2
    rand_aug_m: int = 5
    max_words: int = 30
    max_length: int = 30
    shuffle_buffer: int = 1000
    # run
    workers: int = 1
    cpus_per_worker: float = 1.0
    # torch threads per worker; None: the worker's CPUs (Ray sets OMP_NUM_THREADS to them). More than that
    # oversubscribes the node on purpose, e.g. both cores of a 2-core laptop while the light data tasks share them.
    torch_threads: int | None = None
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    address: str | None = None
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 42
    extra: dict[str, Any] = field(default_factory=dict)  # unknown YAML keys, kept for the record

    @classmethod
    def from_yaml(cls, path: str | Path | None, **overrides: Any) -> TrainSettings:
        """Preset YAML + overrides (None values ignored); unknown keys are an error, so typos do not pass silently."""
        from pipelines.settings import load_settings

        return load_settings(cls, path, overrides)

    def resolve_paths(self) -> TrainSettings:
        """Relative `data` / `output` / `init` / `tokenizer` -> absolute, here in the process that read them: Ray
        Train workers do not run in the user's working directory. URLs and hub ids (`--init`) are kept."""
        from pipelines.settings import resolve_path, resolve_paths

        self.data = resolve_paths(self.data) or self.data
        self.output = resolve_path(self.output) or self.output
        self.init = resolve_path(self.init, hub=True)
        self.tokenizer = resolve_path(self.tokenizer)
        self.init_vision = resolve_path(self.init_vision, hub=True)
        return self

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {sorted(TASKS)}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; expected 'step' or 'cosine'")
        for name in ("batch_size", "epochs", "workers", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 (got {self.torch_threads})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.init_vision and self.init:
            raise ValueError("init_vision starts a from-scratch run's ViT; with --init the checkpoint has its own ViT")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers


# ---------------------------------------------------------------------------------------------------- schedule


def learning_rate(s: TrainSettings, epoch: int, step_in_epoch: int) -> float:
    """The original BLIP schedules: per-epoch step decay (pretrain) or per-epoch cosine (finetune), with a linear
    warmup from warmup_lr to init_lr over the first `warmup_steps` steps of epoch 0."""
    if s.schedule == "cosine":
        lr = (s.init_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / s.epochs)) + s.min_lr
    else:
        lr = max(s.min_lr, s.init_lr * s.lr_decay_rate**epoch)
    if epoch == 0 and s.warmup_steps > 0:
        lr = min(lr, s.warmup_lr + (s.init_lr - s.warmup_lr) * step_in_epoch / s.warmup_steps)
    return lr


def alpha_at(base_alpha: float, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Momentum-distillation weight, ramped linearly over the first epoch as in the original."""
    if epoch > 0:
        return base_alpha
    return base_alpha * min(1.0, step_in_epoch / max(1, steps_per_epoch))


# ---------------------------------------------------------------------------------------------------- models


def _model_class(family: str, cfg: Any) -> nn.Module:
    from blip.model import MODEL_CLASSES, BlipRetrieval

    if family == "retrieval":  # fine-tuning the filter needs the momentum encoders and queues
        return BlipRetrieval(cfg, momentum=True)
    return MODEL_CLASSES[family](cfg)


def _config_overrides(s: TrainSettings, cfg: Any) -> Any:
    vision = {"grad_checkpointing": s.grad_checkpointing}
    if s.image_size is not None:
        vision["image_size"] = s.image_size
    if s.drop_path_rate is not None:
        vision["drop_path_rate"] = s.drop_path_rate
    top = {
        k: getattr(s, k) for k in ("queue_size", "momentum", "alpha", "label_smoothing") if getattr(s, k) is not None
    }
    return replace(cfg, vision=replace(cfg.vision, **vision), **top)


def transfer_weights(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Copy every key of `sd` that `model` has (shape-checked; ViT position embeddings resized); report the rest.

    This is how a pretrain checkpoint becomes a captioner or a filter: its state dict holds both families' keys.
    """
    from blip.convert import interpolate_pos_embed

    own = model.state_dict()
    take: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for k, v in sd.items():
        if k not in own:
            continue
        if k.endswith("pos_embed") and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            v = interpolate_pos_embed(v, own[k].shape[1] - 1)
        if v.shape != own[k].shape:
            skipped.append(k)
            continue
        take[k] = v
    missing = [k for k in own if k not in take]
    model.load_state_dict(take, strict=False)
    return {"missing": missing, "shape_mismatch": skipped}


def build_model(s: TrainSettings, source: str | None) -> tuple[nn.Module, Any]:
    """The model to train (the task is its family), from scratch or from `source` (anything `blip.load` reads,
    training checkpoints with their momentum encoders and queues included); returns (model, tokenizer).

    The tokenizer decides the special ids; from scratch it also sets the vocabulary size (len(tokenizer)).
    """
    import blip
    from blip.config import BlipConfig
    from blip.convert import TRAINING_STATE
    from blip.model import ContrastiveMixin, init_weights
    from blip.tokenizer import build_tokenizer

    family = s.task
    if source is None:
        if not s.tokenizer:
            raise ValueError("a from-scratch run needs --tokenizer (a tokenizer folder or vocab.txt)")
        tok = build_tokenizer(s.tokenizer)
        preset = BlipConfig.from_name(s.model, family=family, text={"vocab_size": len(tok)})
        cfg = _config_overrides(s, preset.with_tokenizer(tok))
        torch.manual_seed(s.seed)
        model = _model_class(family, cfg)
        init_weights(model, std=s.init_std)
        if s.init_vision:
            from blip.checkpoint import load_vision_weights

            load_vision_weights(model.visual_encoder, s.init_vision)
            if isinstance(model, ContrastiveMixin) and hasattr(model, "visual_encoder_m"):
                model.copy_params()  # the momentum ViT starts from the same weights
    else:
        loaded = blip.load(source, tokenizer_path=s.tokenizer, keep_training_state=True)
        tok = loaded.tokenizer
        cfg = _config_overrides(s, replace(loaded.config, family=family))
        model = _model_class(family, cfg)
        report = transfer_weights(model, loaded.state_dict())
        core = [k for k in report["missing"] if not TRAINING_STATE.match(k)]
        if core:
            raise ValueError(
                f"{source} lacks {len(core)} weights the {family} model needs (e.g. {', '.join(core[:4])}); "
                "initialise a captioner from a caption or pretrain checkpoint, a filter from a retrieval or pretrain one"
            )
        if isinstance(model, ContrastiveMixin) and any(k.split(".")[0].endswith("_m") for k in report["missing"]):
            model.copy_params()  # momentum copies start from the online weights, as the original
        del loaded
    model.tokenizer = tok
    return model, tok


def save_folder(model: nn.Module, path: str | Path, slim: bool = False) -> None:
    """Our folder format. `slim` drops momentum encoders and queues of a filter, so `blip.load` / `capfilt run` read
    it as a plain BlipRetrieval; training checkpoints keep everything."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if slim and getattr(model, "momentum", False):
        from blip.model import BlipRetrieval

        plain = BlipRetrieval(model.config, momentum=False)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
        plain.tokenizer = model.tokenizer
        model = plain
    from blip import save_pretrained

    save_pretrained(model, path)


# ---------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    d = Path(output) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "train_state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output: str | Path) -> Path | None:
    cks = list_checkpoints(output)
    return cks[-1][1] if cks else None


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def _queues(model: nn.Module) -> dict[str, torch.Tensor]:
    from blip.convert import TRAINING_STATE

    return {k: v.detach().cpu().clone() for k, v in model.named_buffers() if TRAINING_STATE.match(k)}


# ---------------------------------------------------------------------------------------------------- worker loop


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


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_min(flag: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _param_digest(model: nn.Module) -> torch.Tensor:
    """One float64 per tensor (parameters and buffers): equal across ranks iff DDP kept them in sync (to fp error
    of the sum; the test also compares the full tensors)."""
    return torch.stack([t.detach().double().sum() for t in model.state_dict().values()])


def _write_checkpoint(
    raw: nn.Module, opt: torch.optim.Optimizer, s: TrainSettings, pos: dict[str, int], rank: int, world: int
) -> Path:
    """Rank 0 writes model + train_state into a temp folder, every rank its RNG, then an atomic rename: a kill
    mid-write never leaves a half checkpoint that --resume would pick."""
    out = Path(s.output) / "checkpoints"
    step = pos["step"]
    final, tmp = out / f"step_{step:08d}", out / f".tmp_step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        save_folder(raw, tmp)
        state = {
            **pos,
            "world_size": world,
            "optimizer": opt.state_dict(),
            "queues": _queues(raw),
            "settings": asdict(s),
        }
        torch.save(state, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(s.output)[: -s.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


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
class _Worker:
    """One Ray Train worker's state: settings, its rank, the DDP model (and the module inside), the optimizer, and
    the position in the schedule."""

    s: TrainSettings
    config: dict[str, Any]
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


def _setup_worker(config: dict[str, Any]) -> _Worker:
    """The model from the driver's weights, wrapped for DDP; the optimizer; seeds; a resumed run's state."""
    import ray
    import ray.train
    import ray.train.torch

    s = TrainSettings(**config["settings"])
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg = config["model_config"]
    train_state = ray.get(config["train_state_ref"]) if config["train_state_ref"] is not None else None

    raw = _model_class(model_cfg.family, model_cfg)
    raw.load_state_dict(ray.get(config["state_ref"]), strict=False)  # tied aliases: the only keys a saver drops
    raw.tokenizer = config["tokenizer"]
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
        rng = config["rng_states"].get(rank) if train_state["world_size"] == world else None
        if rng is not None:
            _set_rng_state(rng)
    return w


def _epoch_batches(w: _Worker, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of `epoch`: the same for the same (seed, epoch, rank, world), run after run."""
    from pipelines.train.data import build_train_dataset, shuffle_seed

    s, c = w.s, w.config
    ds = build_train_dataset(
        c["tars"], c["augment"], c["text"], c["tokenizer"], c["counter"], s.seed, epoch, w.rank, w.world
    )
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

    s, cfg, raw = w.s, w.config["model_config"], w.raw
    keys = LOSS_KEYS[s.task]
    lr = learning_rate(s, w.epoch, w.step_in_epoch)
    for g in w.opt.param_groups:
        g["lr"] = lr
    pixels = normalize(batch["image"], cfg.image_mean, cfg.image_std)  # (B, 3, S, S)
    length = int(batch["attention_mask"].sum(1).max())  # trim to the longest text (padding="longest")
    ids, mask = batch["input_ids"][:, :length], batch["attention_mask"][:, :length]
    alpha = alpha_at(cfg.alpha, w.epoch, w.step_in_epoch, w.config["steps_per_epoch"])
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

    digest = _param_digest(w.raw).to(w.device)
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: epochs of this rank's batches, steps, logs, checkpoints, the final check."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop prints its own progress line
    w = _setup_worker(config)
    s = w.s
    keys = LOSS_KEYS[s.task] + (PROBE_KEYS if s.task in ("pretrain", "retrieval") else ())
    log = _Log(s.output, keys, w.step) if w.rank == 0 else None
    steps_per_epoch = config["steps_per_epoch"]
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
            if _all_min(int(batch is not None), w.device) == 0:
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
                _write_checkpoint(w.raw, w.opt, s, w.position, w.rank, w.world)
                last_ckpt = w.step
        if w.step_in_epoch >= steps_per_epoch or batch is None:
            w.epoch, w.step_in_epoch = w.epoch + 1, 0
        del it
    if last_ckpt != w.step:
        _write_checkpoint(w.raw, w.opt, s, w.position, w.rank, w.world)
    _finish(w, t_start)


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

    from pipelines.train.data import AugmentConfig, SkipCounter, count_tar_samples, list_tars
    from pipelines.train.data import TextConfig as DataTextConfig

    s.resolve_paths()
    s.validate()
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
    text = DataTextConfig(max_words=s.max_words, max_length=s.max_length, prompt=prompt)

    loop_config = {
        "settings": asdict(s),
        "model_config": cfg,
        "tokenizer": tok,
        "state_ref": ray.put(model.state_dict()),
        "train_state_ref": ray.put(train_state) if train_state is not None else None,
        "rng_states": rng_states,
        "steps_per_epoch": steps_per_epoch,
        # each rank streams its own epochs (pipelines.train.data.build_train_dataset): order and draws seeded per
        # (seed, epoch, rank), so a rerun or a resume sees the same batches
        "tars": tars,
        "augment": aug,
        "text": text,
        "counter": counter,
    }
    del model, train_state
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
    s = TrainSettings.from_yaml(config, **{**merge(set_items, **overrides), "task": task})
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
