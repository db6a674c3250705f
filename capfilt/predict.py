"""Caption and score image files with a loaded BLIP model: the `capfilt caption` / `capfilt score` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blip.image import normalize
from capfilt.decode import DecodeError, decode_image

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return device


def read_images(paths: list[str], image_size: int) -> torch.Tensor:
    """Image files -> (B, S, S, 3) uint8; a missing or unreadable file is an error naming it."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"image {p} does not exist")
        try:
            out.append(torch.from_numpy(np.array(decode_image(path.read_bytes(), image_size))))
        except DecodeError as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
    return torch.stack(out)


def _load(model_path: str, families: tuple[str, ...], what: str, device: str, dtype: str, tokenizer_path: str | None):
    import blip

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    model = blip.load(model_path, device=resolve_device(device), dtype=DTYPES[dtype], tokenizer_path=tokenizer_path)
    if model.config.family not in families:
        raise ValueError(f"{model_path} is a {model.config.family} model; {what} needs a {' or '.join(families)} model")
    return model


def _pixels(model, uint8: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    return normalize(uint8.to(model.device), cfg.image_mean, cfg.image_std, model.dtype)  # (B, 3, S, S)


@torch.no_grad()
def caption_files(
    images: list[str],
    model_path: str,
    beam: int | None = None,
    top_p: float | None = None,
    num_captions: int = 1,
    seed: int = 0,
    max_length: int = 20,
    min_length: int = 5,
    device: str = "auto",
    dtype: str = "float32",
    tokenizer_path: str | None = None,
    batch_size: int = 16,
) -> list[tuple[str, list[str]]]:
    """(image path, captions) per image. Beam search (default 3 beams) or nucleus sampling (`top_p`, repetition
    penalty 1.1 as the original), seeded per image so a caption does not depend on the batch it ran in."""
    if beam is not None and top_p is not None:
        raise ValueError("choose beam search (--beam) or nucleus sampling (--top-p), not both")
    if top_p is None and num_captions != 1:
        raise ValueError("several captions per image need sampling: add --top-p (0.9 in the paper)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    model = _load(model_path, ("caption", "pretrain"), "captioning", device, dtype, tokenizer_path)
    size = model.config.vision.image_size
    uint8 = read_images(images, size)  # every file is checked before any work is done
    results: list[tuple[str, list[str]]] = []
    for start in range(0, len(images), batch_size):
        pixels = _pixels(model, uint8[start : start + batch_size])
        if top_p is None:
            caps = model.generate(
                pixels, sample=False, num_beams=beam or 3, max_length=max_length, min_length=min_length
            )
        else:
            gens = [torch.Generator(model.device).manual_seed(seed + start + i) for i in range(len(pixels))]
            caps = model.generate(
                pixels, sample=True, top_p=top_p, num_captions=num_captions, max_length=max_length,
                min_length=min_length, repetition_penalty=1.1, generator=gens,
            )  # fmt: skip
        results += zip(images[start : start + batch_size], caps)
    return results


@torch.no_grad()
def score_file(
    image: str,
    texts: list[str],
    model_path: str,
    device: str = "auto",
    dtype: str = "float32",
    tokenizer_path: str | None = None,
) -> list[tuple[str, float, float]]:
    """(text, ITM match probability, ITC cosine similarity) for each text against one image."""
    if not texts:
        raise ValueError("give at least one TEXT to score")
    model = _load(model_path, ("retrieval", "pretrain"), "scoring", device, dtype, tokenizer_path)
    pixels = _pixels(model, read_images([image], model.config.vision.image_size))
    itm, itc = model.score(pixels, [texts])
    return list(zip(texts, itm[0], itc[0]))
