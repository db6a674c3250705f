"""`capfilt warmup-vision`: the synthetic world's stand-in for the ImageNet ViT that BLIP pretraining starts from.

BLIP initialises its ViT from DeiT/timm ImageNet weights (`blip_pretrain.py` loads `deit_base_patch16_224`), so its
towers already see objects before ITC, ITM and LM begin. A tiny ViT trained from scratch by those objectives alone
does not learn shape (the loop's captioner named the right shape for 21% of objects, chance 17%). This step trains
the ViT supervised, as ImageNet classification does, on a split of the synthetic world that no other step uses: per
position of the scene, the shape, colour and size of the object there (or none), from the [CLS] token.

The output is a ViT state dict with timm's key names (`vision.safetensors`, the head under `head.*`), which
`--set init_vision=...` (TrainSettings.init_vision) loads into a from-scratch pretraining, as it loads a DeiT `.pth`.
Training runs as one Ray task (a GPU when the cluster has one), so the driver only waits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipelines.settings import Settings, resolve_path


@dataclass
class WarmupSettings(Settings):
    output: str = ""
    model: str = "tiny"  # model preset whose ViT is trained (its `vision` config)
    image_size: int | None = None  # None: the preset's
    # the split: rendered on the fly from the synthetic world's generator with its own seed, so it shares no scene
    # draw with the loop's web / clean / test sets (seeds seed, seed + 1, seed + 2)
    samples: int = 20000
    test_samples: int = 1000
    data_seed: int = 1000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    init_std: float = 0.08  # as the from-scratch pretraining (TrainSettings.init_std)
    log_every: int = 100
    seed: int = 0
    cpus: float = 2.0  # the Ray task's CPUs (and torch threads)
    use_gpu: bool | None = None  # None: when the cluster has a GPU
    address: str | None = None

    def resolve_paths(self) -> None:
        self.output = resolve_path(self.output) or self.output

    def validate(self) -> None:
        if not self.output:
            raise ValueError("warmup-vision needs --output")
        for name in ("samples", "test_samples", "steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.model not in ("tiny", "base", "large"):
            raise ValueError(f"model must be tiny, base or large, got {self.model!r}")


def vision_config(s: WarmupSettings) -> Any:
    from dataclasses import replace

    from blip.config import BlipConfig

    v = BlipConfig.from_name(s.model, family="pretrain").vision
    return replace(v, image_size=s.image_size) if s.image_size else v


def render_split(seed: int, start: int, n: int, image_size: int) -> tuple[Any, Any]:
    """Scenes [start, start + n) of the generator at `seed`: ((n, S, S, 3) uint8 through a JPEG round trip, as the
    shards store them; (n, positions, 3) targets)."""
    import io

    import numpy as np
    from PIL import Image

    from blip.image import resize_rgb
    from capfilt.synth import encode_jpeg, make_scene, render_scene, scene_targets

    pixels, targets = [], []
    for i in range(start, start + n):
        objects = make_scene(seed, i)
        img = Image.open(io.BytesIO(encode_jpeg(render_scene(objects, image_size, seed, i))))
        pixels.append(resize_rgb(img, image_size))
        targets.append(scene_targets(objects))
    return np.stack(pixels), np.stack(targets)


class VisionWarmup(nn.Module):
    """ViT + one linear head on [CLS]: per position, logits of shape / colour / size (TARGET_CLASSES each)."""

    def __init__(self, vcfg: Any, std: float, seed: int):
        from blip.model import VisionTransformer, init_weights
        from capfilt.synth import POSITIONS, TARGET_CLASSES

        super().__init__()
        torch.manual_seed(seed)
        self.vit = VisionTransformer(vcfg)
        init_weights(self.vit, std=std)
        self.classes = TARGET_CLASSES
        self.head = nn.Linear(vcfg.width, len(POSITIONS) * sum(TARGET_CLASSES))
        nn.init.trunc_normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> [(B, positions, classes)] for shape, colour, size."""
        z = self.head(self.vit(pixels)[:, 0])  # (B, positions * sum(classes))
        return list(z.view(z.shape[0], -1, sum(self.classes)).split(self.classes, dim=-1))

    def loss(self, pixels: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Cross-entropy summed over the three attributes, averaged over positions; and the argmax per attribute."""
        import torch.nn.functional as F

        out = self(pixels)
        loss = sum(F.cross_entropy(z.flatten(0, 1).float(), y[..., k].flatten()) for k, z in enumerate(out))
        return loss, [z.argmax(-1) for z in out]

    def export(self) -> dict[str, torch.Tensor]:
        """timm ViT names (as DeiT's checkpoints: no `vit.` prefix) + the head."""
        return {k.removeprefix("vit."): v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


def accuracy(pred: list[Any], y: Any) -> dict[str, float]:
    """Per attribute, the share right over the positions that hold an object; `empty`: positions without one
    predicted empty (by the shape head)."""
    present = y[..., 0] > 0
    out = {
        a: float((p == y[..., k])[present].float().mean())
        for k, (a, p) in enumerate(zip(("shape", "color", "size"), pred))
    }
    out["empty"] = float((pred[0] == 0)[~present].float().mean()) if bool((~present).any()) else 1.0
    return out


def _train(s: WarmupSettings) -> dict[str, Any]:
    """The training itself (inside the Ray task): render the split, train, evaluate on its held-out part, save."""
    import numpy as np
    from safetensors.torch import save_file

    from blip.checkpoint import VISION_FILE
    from blip.image import normalize

    torch.set_num_threads(max(1, int(s.cpus)))
    device = torch.device("cuda" if torch.cuda.is_available() and s.use_gpu is not False else "cpu")
    vcfg = vision_config(s)
    t0 = time.time()
    x_train, y_train = render_split(s.data_seed + s.seed, 0, s.samples, vcfg.image_size)
    x_test, y_test = render_split(s.data_seed + s.seed, s.samples, s.test_samples, vcfg.image_size)
    render_s = time.time() - t0
    model = VisionWarmup(vcfg, s.init_std, s.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    g = np.random.default_rng(s.seed)
    out = Path(s.output)
    log = open(out / "log.jsonl", "w")

    def evaluate() -> dict[str, float]:
        model.train(False)
        preds: list[list[Any]] = []
        with torch.no_grad():
            for i in range(0, len(x_test), 256):
                px = normalize(torch.from_numpy(x_test[i : i + 256]).to(device))
                preds.append(model(px))
        model.train(True)
        pred = [torch.cat([p[k].argmax(-1) for p in preds]).cpu() for k in range(3)]
        return accuracy(pred, torch.from_numpy(y_test))

    t1 = time.time()
    model.train(True)
    for step in range(1, s.steps + 1):
        # cosine decay from lr to min_lr: the head and the ViT settle at the end
        lr = s.min_lr + (s.lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * (step - 1) / s.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = g.integers(0, len(x_train), size=s.batch_size)
        px = normalize(torch.from_numpy(x_train[idx]).to(device))  # (B, 3, S, S)
        y = torch.from_numpy(y_train[idx]).to(device)  # (B, positions, 3)
        loss, pred = model.loss(px, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % s.log_every == 0 or step == s.steps:
            row = {"step": step, "lr": lr, "loss": loss.item(), **{f"train_{k}": v for k, v in accuracy(pred, y).items()},
                   "elapsed_s": time.time() - t1}  # fmt: skip
            if step == s.steps or step % (10 * s.log_every) == 0:
                row |= {f"test_{k}": v for k, v in evaluate().items()}
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"[warmup-vision] step {step}/{s.steps} loss {row['loss']:.3f} "
                  + " ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("test_")), flush=True)  # fmt: skip
    log.close()
    save_file(model.export(), str(out / VISION_FILE))
    (out / "config.json").write_text(json.dumps({"vision": asdict(vcfg), "warmup": asdict(s)}, indent=2))
    return {
        "output": str(out),
        "test_accuracy": evaluate(),
        "final_loss": loss.item(),
        "render_seconds": render_s,
        "train_seconds": time.time() - t1,
        "device": str(device),
    }


def warmup_vision(s: WarmupSettings) -> dict[str, Any]:
    """Train the ViT in one Ray task; writes `output/vision.safetensors`, `log.jsonl`, `warmup_summary.json`."""
    import ray

    from pipelines.train.local_ray import init_ray

    Path(s.output).mkdir(parents=True, exist_ok=True)
    init_ray(s.address, int(math.ceil(s.cpus)))
    gpu = s.use_gpu if s.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(_train).options(num_cpus=s.cpus, num_gpus=1 if gpu else 0, max_retries=1)
    summary = ray.get(task.remote(s))
    (Path(s.output) / "warmup_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
