"""Test helper: small webdataset tars of coloured-shape images with their true captions (img2dataset layout).

Used by the training and evaluation tests; `capfilt.synth` is the full synthetic world, this is a minimal stand-in
that also writes the bad cases (corrupt image bytes, empty text) and `capfilt run`'s kept-tar layout.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("circle", "square", "triangle")
WORDS = tuple(COLOURS) + SHAPES + ("a", "picture", "of", "on", "white", "background")


def draw_scene(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(
    out_dir: str | Path,
    n: int,
    per_tar: int = 50,
    size: int = 64,
    seed: int = 0,
    corrupt: int = 0,
    empty: int = 0,
    kept_layout: bool = False,
) -> list[dict]:
    """Write n samples into `out_dir/NNNNN.tar`; returns [{"key", "caption", "texts", "colour", "shape"}].

    The first `corrupt` samples get truncated JPEG bytes, the next `empty` an empty caption. With `kept_layout`
    the json holds a `texts` list (true caption + a reworded one) as `capfilt run` writes it.
    """
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = []
    for t in range(0, n, per_tar):
        with tarfile.open(out_dir / f"{t // per_tar:05d}.tar", "w") as tar:
            for i in range(t, min(n, t + per_tar)):
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                key = f"{i:09d}"
                buf = io.BytesIO()
                draw_scene(colour, shape, size, rng).save(buf, "JPEG", quality=90)
                jpg = buf.getvalue()
                caption = f"a {colour} {shape}"
                texts = [caption, f"{colour} {shape} on white background"]
                if i < corrupt:
                    jpg = jpg[: len(jpg) // 3]
                elif i < corrupt + empty:
                    caption, texts = "  ", []
                _add(tar, f"{key}.jpg", jpg)
                _add(tar, f"{key}.txt", caption.encode())
                j = {"key": key, "caption": caption}
                if kept_layout:
                    j["texts"] = texts
                _add(tar, f"{key}.json", json.dumps(j).encode())
                meta.append({"key": key, "caption": caption, "texts": texts, "colour": colour, "shape": shape})
    return meta
