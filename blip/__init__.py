"""BLIP model library: pure PyTorch + tokenizer; no Ray, no I/O beyond checkpoints."""

from __future__ import annotations

import importlib
from typing import Any

# lazy exports: `import blip` stays cheap (no torch / transformers until a name is used)
_EXPORTS = {
    "BlipConfig": "blip.config",
    "GenerationConfig": "blip.generation",
    "preprocess": "blip.image",
    "build_tokenizer": "blip.tokenizer",
    "write_vocab": "blip.tokenizer",
    "CheckpointError": "blip.checkpoint",
    "resolve": "blip.checkpoint",
    "read_config": "blip.checkpoint",
    "load": "blip.checkpoint",
    "save_pretrained": "blip.checkpoint",
    "load_vision_weights": "blip.checkpoint",
    "convert_checkpoint": "blip.checkpoint",
    "check_family": "blip.checkpoint",
    "transfer_weights": "blip.checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        obj = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = obj
        return obj
    raise AttributeError(f"module 'blip' has no attribute {name!r}")
