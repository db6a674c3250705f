"""Is a checkpoint spec a Hugging Face hub id or a local path? One rule, shared by blip.checkpoint.resolve and the
settings loaders (which make local paths absolute but must leave hub ids alone). No torch: cheap to import."""

from __future__ import annotations

import os

# suffixes of files a spec may name (checkpoints, configs, tokenizer files): never a hub id
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".json", ".txt", ".yaml", ".yml")


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` that is not a local path: exactly one "/", no leading `.`, `/` or `~`, no file suffix, and
    nothing at that path here (a local folder of that name wins)."""
    return (
        spec.count("/") == 1
        and not spec.startswith((".", "/", "~"))
        and not spec.endswith(FILE_SUFFIXES)
        and not os.path.exists(spec)
    )
