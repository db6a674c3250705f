"""Caption, score and question image files with a loaded BLIP model: `capfilt caption` / `score` / `vqa`.

Each loads its model with `blip.load`, which checks the checkpoint against its tokenizer (special ids, vocabulary
size) before any image is read; every image file is then checked before any model work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from blip.generation import GenerationConfig
from blip.image import normalize
from capfilt.decode import DecodeError, decode_image
from capfilt.stages import resolve_device, resolve_dtype

_VQA = GenerationConfig.vqa()  # `capfilt vqa`'s generated answers: the original's


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


def _load(model_path: str, role: str, task: str, device: str, dtype: str, tokenizer_path: str | None):
    import blip

    dev = resolve_device(device)
    model = blip.load(model_path, device=dev, dtype=resolve_dtype(dtype, dev), tokenizer_path=tokenizer_path)
    blip.check_family(model.config.family, role, model_path, task)
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
    max_length: int = GenerationConfig.max_length,
    min_length: int = GenerationConfig.min_length,
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
    lengths = {"max_length": max_length, "min_length": min_length}
    if top_p is not None:  # validated here, before the model loads
        gen = GenerationConfig.nucleus(top_p, **lengths)
    else:
        gen = GenerationConfig(**lengths, **({"num_beams": beam} if beam is not None else {}))
    model = _load(model_path, "captioner", "captioning", device, dtype, tokenizer_path)
    size = model.config.vision.image_size
    uint8 = read_images(images, size)  # every file is checked before any work is done
    results: list[tuple[str, list[str]]] = []
    for start in range(0, len(images), batch_size):
        pixels = _pixels(model, uint8[start : start + batch_size])
        seeds = seed + start + torch.arange(len(pixels))  # (B,): image i of the list is seeded by seed + i
        caps = model.generate(pixels, num_captions if gen.sample else 1, gen, seeds=seeds if gen.sample else None)
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
    first_token: str = "enc",
) -> list[tuple[str, float, float]]:
    """(text, ITM match probability, ITC cosine similarity) for each text against one image.

    first_token: "enc" ([ENC] first, as the retrieval checkpoints were trained) or "cls" (as `blip_itm.py`).
    """
    if not texts:
        raise ValueError("give at least one TEXT to score")
    if first_token not in ("enc", "cls"):
        raise ValueError(f"first token must be 'enc' or 'cls', got {first_token!r}")
    model = _load(model_path, "filter", "scoring", device, dtype, tokenizer_path)
    pixels = _pixels(model, read_images([image], model.config.vision.image_size))
    itm, itc = model.score(pixels, [texts], first_token=first_token)
    return list(zip(texts, itm[0], itc[0]))


def read_answer_list(path: str) -> list[str]:
    """Candidate answers: a JSON list (the original's answer_list.json) or a text file with one answer per line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"answer list {path} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            answers = json.loads(text)
        except ValueError as e:
            raise ValueError(f"answer list {path} is not JSON: {e}") from None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"answer list {path} must be a JSON list of strings")
    else:
        answers = [line.strip() for line in text.splitlines() if line.strip()]
    if not answers:
        raise ValueError(f"answer list {path} is empty")
    return answers


@torch.no_grad()
def answer_file(
    image: str,
    questions: list[str],
    model_path: str,
    answers_path: str | None = None,
    k: int = 128,
    num_beams: int = _VQA.num_beams,
    max_length: int = _VQA.max_length,
    min_length: int = _VQA.min_length,
    attend_question_padding: bool = False,
    device: str = "auto",
    dtype: str = "float32",
    tokenizer_path: str | None = None,
) -> list[tuple[str, str]]:
    """(question, answer) for each question about one image: ranked from `answers_path` (the original's
    `inference="rank"`) when given, else generated by beam search (`inference="generate"`)."""
    if not questions:
        raise ValueError("give at least one QUESTION")
    answer_list = read_answer_list(answers_path) if answers_path is not None else None
    model = _load(model_path, "vqa", "question answering", device, dtype, tokenizer_path)
    pixels = _pixels(model, read_images([image], model.config.vision.image_size)).expand(len(questions), -1, -1, -1)
    if answer_list is not None:
        answers = [answer_list[i] for i in model.rank_answers(pixels, questions, answer_list, k=k)]
    else:
        answers = model.answer(
            pixels, questions, num_beams=num_beams, max_length=max_length, min_length=min_length,
            attend_question_padding=attend_question_padding,
        )  # fmt: skip
    return list(zip(questions, answers))
