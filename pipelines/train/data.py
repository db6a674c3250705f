"""Training and evaluation data: webdataset tars -> samples -> (Ray Data) -> fixed-size tensor batches.

Accepts plain img2dataset tars (`KEY.jpg` + one caption in `KEY.txt`) and the kept tars of `capfilt run`
(`KEY.json` carries a `texts` list of every kept text). Each training sample draws one of its texts at random every
epoch, as BLIP does with web text + synthetic captions. Bad samples (undecodable image, no non-empty text, unreadable
tar) are skipped and counted, never fatal.

Train augmentations follow the original BLIP: RandomResizedCrop (bicubic), horizontal flip and RandomAugment(2, 5)
over {Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y, Rotate}, written with PIL
(torchvision would pull a CUDA torch build).
"""

from __future__ import annotations

import json
import math
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps

from blip.image import resize_rgb
from capfilt.decode import load_rgb
from capfilt.seeds import stable_seed
from pipelines.io import IMAGE_EXTS

ImageFile.LOAD_TRUNCATED_IMAGES = False


# ---------------------------------------------------------------------------------------------------- finding tars


def list_tars(data: str) -> list[str]:
    """`--data` (a folder, a glob, one .tar, or a comma-separated list of those; local or fsspec URL) -> sorted tars,
    sub-folders included (`capfilt run`'s output folder holds its tars in `tars/`). The run's shard lister.

    Raises FileNotFoundError when nothing matches, so the CLI prints one clear line.
    """
    from pipelines.io import list_shards

    out: set[str] = set()
    for part in [p.strip() for p in data.split(",") if p.strip()]:
        try:
            out |= {s.path for s in list_shards(part, formats=("tar",), recursive=True)}
        except FileNotFoundError:
            continue
    if not out:
        raise FileNotFoundError(f"no webdataset .tar files found at {data!r}")
    return sorted(out)


# ---------------------------------------------------------------------------------------------------- samples


def iter_tar_groups(path: str) -> Iterator[dict[str, Any]]:
    """Stream one tar: yields {"__key__", "__url__", ext: bytes, ...} per sample (pipelines.io's tar reader: the
    same samples and keys `capfilt run` reads).

    A tar that cannot be read (truncated, not a tar) yields one {"__key__": None, "__error__": msg} record after the
    samples it could read, so the caller counts it.
    """
    import fsspec

    from pipelines.io import iter_tar_samples

    try:
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as f:
            for key, files in iter_tar_samples(f, fs.size(p)):
                yield {"__key__": key, "__url__": path, **files}
    except (tarfile.TarError, OSError, EOFError) as e:
        yield {"__key__": None, "__url__": path, "__error__": f"{type(e).__name__}: {e}"}


def pre_caption(text: str, max_words: int = 30) -> str:
    """The original BLIP text cleaning: lowercase, drop some punctuation, collapse spaces, cap the word count."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def sample_meta(group: dict[str, Any]) -> dict[str, Any]:
    """The sample's `.json` as a dict ({} when absent or not a JSON object)."""
    try:
        m = json.loads(group["json"]) if group.get("json") else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return m if isinstance(m, dict) else {}


def sample_texts(group: dict[str, Any], max_words: int = 30) -> list[str]:
    """All usable texts of a sample: the json `texts` list of `capfilt run`'s kept tars, else the `.txt` caption."""
    texts: list[str] = []
    m = sample_meta(group)
    if isinstance(m.get("texts"), list):
        texts = [t for t in m["texts"] if isinstance(t, str)]
    if not texts and group.get("txt") is not None:
        texts = [group["txt"].decode("utf-8", errors="replace")]
    cleaned = [pre_caption(t, max_words) for t in texts]
    return [t for t in cleaned if t]


@dataclass
class Parsed:
    key: str
    image: Image.Image | None
    texts: list[str]
    status: str  # "ok" | "decode_error" | "empty_text" | "no_image" | "bad_tar"
    error: str = ""
    meta: dict[str, Any] | None = None  # the sample's json (the synthetic world keeps its ground truth there)


def parse_group(group: dict[str, Any], max_words: int = 30, require_text: bool = True) -> Parsed:
    """One grouped tar record -> image + texts, or a status saying why it is unusable. `require_text=False` keeps
    images without any text (NoCaps-style eval shards, scored against a ground-truth file)."""
    key = group.get("__key__")
    if key is None:
        return Parsed(key=str(group.get("__url__")), image=None, texts=[], status="bad_tar", error=group["__error__"])
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        return Parsed(key=key, image=None, texts=[], status="no_image", error="no image member")
    texts = sample_texts(group, max_words)
    if not texts and require_text:
        return Parsed(key=key, image=None, texts=[], status="empty_text", error="no non-empty text")
    try:
        image = load_rgb(group[ext])[0]  # capfilt.decode's decoder: training sees the pixels CapFilt sees
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-sample status, never a crash
        return Parsed(key=key, image=None, texts=texts, status="decode_error", error=f"{type(e).__name__}: {e}")
    return Parsed(key=key, image=image, texts=texts, status="ok", meta=sample_meta(group))


def iter_samples(tars: list[str], max_words: int = 30, require_text: bool = True) -> Iterator[Parsed]:
    """Every record of every tar, parsed (bad ones included, with their status)."""
    for path in tars:
        for group in iter_tar_groups(path):
            yield parse_group(group, max_words, require_text)


# ---------------------------------------------------------------------------------------------------- augmentations


def random_resized_crop(
    img: Image.Image, size: int, rng: random.Random, scale: tuple[float, float] = (0.5, 1.0)
) -> Image.Image:
    """torchvision's RandomResizedCrop (ratio 3/4..4/3, 10 tries, then a centre crop), bicubic resize to size."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    # fallback: the largest centre crop with the ratio clamped into range
    in_ratio = w / h
    if in_ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif in_ratio > 4 / 3:
        cw, ch = round(h * (4 / 3)), h
    else:
        cw, ch = w, h
    x, y = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))


_GREY = (128, 128, 128)


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=_GREY)


# RandomAugment ops at magnitude M (of 10): enhance factor M/10*1.8+0.1, shear M/10*0.3, translate M px (of the
# original's translate_const 10 at M=10 -> M/10*10), rotate M/10*30 degrees; geometric ops get a random sign.
def _op(name: str, img: Image.Image, m: int, rng: random.Random) -> Image.Image:
    sign = 1 if rng.random() < 0.5 else -1
    if name == "Identity":
        return img
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Brightness":
        return ImageEnhance.Brightness(img).enhance(m / 10 * 1.8 + 0.1)
    if name == "Sharpness":
        return ImageEnhance.Sharpness(img).enhance(m / 10 * 1.8 + 0.1)
    if name == "ShearX":
        return _affine(img, (1, sign * m / 10 * 0.3, 0, 0, 1, 0))
    if name == "ShearY":
        return _affine(img, (1, 0, 0, sign * m / 10 * 0.3, 1, 0))
    if name == "TranslateX":
        return _affine(img, (1, 0, -sign * m / 10 * 10, 0, 1, 0))
    if name == "TranslateY":
        return _affine(img, (1, 0, 0, 0, 1, -sign * m / 10 * 10))
    if name == "Rotate":
        return img.rotate(sign * m / 10 * 30, resample=Image.NEAREST, fillcolor=_GREY)
    raise ValueError(f"unknown augmentation {name!r}")


RAND_AUG_OPS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)


def random_augment(img: Image.Image, rng: random.Random, n: int = 2, m: int = 5) -> Image.Image:
    """The original's RandomAugment(N, M): N ops drawn with replacement, each applied with probability 0.5."""
    for name in [rng.choice(RAND_AUG_OPS) for _ in range(n)]:
        if rng.random() < 0.5:
            img = _op(name, img, m, rng)
    return img


@dataclass
class AugmentConfig:
    image_size: int = 224
    min_scale: float = 0.5  # RandomResizedCrop scale range (min_scale, 1); the original pretrains with 0.2
    hflip: bool = True  # the original flips; turn off when captions say left/right
    rand_aug_n: int = 2  # 0 turns RandomAugment off
    rand_aug_m: int = 5


def train_transform(img: Image.Image, cfg: AugmentConfig, rng: random.Random) -> np.ndarray:
    """PIL RGB -> augmented (S, S, 3) uint8."""
    img = random_resized_crop(img, cfg.image_size, rng, (cfg.min_scale, 1.0))
    if cfg.hflip and rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if cfg.rand_aug_n > 0:
        img = random_augment(img, rng, cfg.rand_aug_n, cfg.rand_aug_m)
    return np.asarray(img, dtype=np.uint8)


def eval_transform(img: Image.Image, image_size: int) -> np.ndarray:
    """The original eval transform (bicubic resize to S x S, aspect not kept) -> (S, S, 3) uint8."""
    return resize_rgb(img, image_size)


# ---------------------------------------------------------------------------------------------------- Ray Data


@dataclass
class TextPrep:
    """How a caption becomes training tokens: cleaned (pre_caption, max_words), prompted, tokenised to max_length."""

    max_words: int = 30
    max_length: int = 30  # tokens incl. [CLS]/[SEP]; batches are trimmed to their longest text in the worker
    prompt: str = ""  # prepended to every training text (the captioner's "a picture of ")


class SkipCounter:
    """Ray actor: unique bad keys per reason (each epoch re-reads the data, so count keys, not events)."""

    def __init__(self) -> None:
        self.bad: dict[str, set[str]] = {}
        self.errors: dict[str, str] = {}

    def add(self, items: list[tuple[str, str, str]]) -> None:
        for status, key, err in items:
            self.bad.setdefault(status, set()).add(key)
            self.errors.setdefault(status, f"{key}: {err}")

    def counts(self) -> dict[str, Any]:
        return {
            "skipped": {k: len(v) for k, v in sorted(self.bad.items())},
            "example_errors": dict(self.errors),
        }


def epoch_plan(tars: list[str], seed: int, epoch: int, rank: int = 0, world: int = 1) -> tuple[list[str], int, int]:
    """What rank `rank` of `world` reads in `epoch`: (its tars in reading order, offset, stride).

    The tar order is a shuffle seeded by (seed, epoch), the same on every rank; with at least one tar per rank, rank r
    takes every world-th tar of it (offset 0, stride 1); with fewer tars than ranks, every rank reads every tar and
    keeps the samples whose index in the tar is offset (= rank) modulo stride (= world).
    """
    names = tar_names(tars)
    order = sorted(tars, key=names.__getitem__)
    random.Random(stable_seed(seed, epoch, "tar-order")).shuffle(order)
    if world == 1:
        return order, 0, 1
    if len(order) >= world:
        return order[rank::world], 0, 1
    return order, rank, world


def tar_names(tars: list[str]) -> dict[str, str]:
    """Each tar's path below the deepest folder all of them share ("web/00000.tar"): what seeds its draws, so a copy
    of the data (another clone, another workdir, another bucket) gives the same batches as the original."""
    parts = [t.split("/") for t in tars]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {t: "/".join(p[common:]) for t, p in zip(tars, parts, strict=True)}


def _tar_to_rows(
    row: dict[str, Any], aug: AugmentConfig, text: TextPrep, tokenizer: Any, counter: Any
) -> Iterator[dict[str, Any]]:
    """flat_map: one tar -> augmented, tokenised rows. Every draw (text choice, crop, flip, RandAugment) comes from
    `row["seed"]`, which is per (seed, epoch, rank, tar): new draws every epoch, the same draws on a rerun or resume."""
    rng = random.Random(row.get("seed"))  # None (no seed given): OS entropy
    offset, stride = row.get("offset", 0), row.get("stride", 1)
    bad: list[tuple[str, str, str]] = []
    for i, group in enumerate(iter_tar_groups(row["path"])):
        if i % stride != offset and group.get("__key__") is not None:
            continue  # another rank's sample
        p = parse_group(group, text.max_words)
        if p.status != "ok":
            bad.append((p.status, p.key, p.error))
            continue
        caption = text.prompt + rng.choice(p.texts)
        enc = tokenizer(caption, padding="max_length", truncation=True, max_length=text.max_length)
        yield {
            "image": train_transform(p.image, aug, rng),  # (S, S, 3) uint8
            "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),  # (L,)
            "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),  # (L,)
            "idx": np.int64(stable_seed(p.key)),
        }
    if bad and counter is not None:
        counter.add.remote(bad)


def read_tasks(tars: list[str], seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """One rank's read tasks of one epoch, in reading order: {path, seed of every draw in that tar, offset, stride}.
    The seed comes from the tar's name below the data's common folder, not its absolute path, so the same data in
    another clone, workdir or bucket trains on the same batches."""
    paths, offset, stride = epoch_plan(tars, seed, epoch, rank, world)
    names = tar_names(tars)
    return [
        {"path": p, "seed": stable_seed(seed, epoch, rank, names[p]), "offset": offset, "stride": stride} for p in paths
    ]


def build_train_dataset(
    tars: list[str],
    aug: AugmentConfig,
    text: TextPrep,
    tokenizer: Any,
    counter: Any = None,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
):
    """One epoch of one rank's training rows as a lazy, streaming Ray Dataset: one read task per tar, in the order
    of `epoch_plan`, rows kept in that order (preserve_order), every random draw seeded per (seed, epoch, rank, tar
    name relative to the data's common folder).
    Rows are mixed further by the local shuffle buffer of `iter_torch_batches` (seed it with `shuffle_seed`). So one
    (seed, epoch, rank, world) always gives the same batches. No all-to-all step, so it streams."""
    import ray.data

    items = read_tasks(tars, seed, epoch, rank, world)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(_tar_to_rows, fn_kwargs={"aug": aug, "text": text, "tokenizer": tokenizer, "counter": counter})
    ds.context.execution_options.preserve_order = True  # blocks in tar order, whichever read task ends first
    return ds


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle-buffer seed of one rank's epoch (numpy takes 32..64-bit ints)."""
    return stable_seed(seed, epoch, rank, "local-shuffle")


def count_tar_samples(tars: list[str]) -> int:
    """Number of samples in the tars (headers only): sizes an epoch for schedules."""
    from pipelines.io import count_samples

    return sum(count_samples(p) for p in tars)
