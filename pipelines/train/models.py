"""The model a training run starts from: from scratch (a preset + tokenizer, optionally a warmed-up ViT) or from any
checkpoint `blip.load` reads (weights copied key for key by blip.checkpoint.transfer_weights); and our folder format
for what it writes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipelines.train.settings import TrainSettings


def model_class(family: str, cfg: Any) -> nn.Module:
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


def build_model(s: TrainSettings, source: str | None) -> tuple[nn.Module, Any]:
    """The model to train (the task is its family), from scratch or from `source` (anything `blip.load` reads,
    training checkpoints with their momentum encoders and queues included); returns (model, tokenizer).

    The tokenizer decides the special ids; from scratch it also sets the vocabulary size (len(tokenizer)).
    """
    import blip
    from blip.checkpoint import transfer_weights
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
        model = model_class(family, cfg)
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
        model = model_class(family, cfg)
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
