"""Training settings (`capfilt pretrain` / `capfilt finetune`) and the learning-rate and distillation schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.settings import Settings, resolve_path, resolve_paths

TASKS = ("pretrain", "caption", "retrieval")  # each task trains the model family of the same name


@dataclass
class TrainSettings(Settings):
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

    def resolve_paths(self) -> None:
        """Relative `data` / `output` / `init` / `tokenizer` -> absolute, here in the process that read them: Ray
        Train workers do not run in the user's working directory. URLs and hub ids (`--init`) are kept."""

        self.data = resolve_paths(self.data) or self.data
        self.output = resolve_path(self.output) or self.output
        self.init = resolve_path(self.init, hub=True)
        self.tokenizer = resolve_path(self.tokenizer)
        self.init_vision = resolve_path(self.init_vision, hub=True)

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
