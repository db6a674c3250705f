"""A synthetic world in img2dataset format: shape scenes, their true captions, and web-like noisy alt-text.

Each image shows 1-3 shapes (shape, colour, size, position) on a lightly textured background; its TRUE caption comes
from a small grammar ("a large red circle on the left and a small blue square on the right") that a tiny BLIP can
learn. At rate `noise` the web text is replaced by one of three kinds of web noise:

- `other`:     the true caption of another image (a wrong but well-formed caption),
- `attribute`: one attribute (colour / shape / size / position) of one object is wrong,
- `junk`:      alt-text such as "IMG_2931.jpg", "click here to buy", "untitled".

Shards are written the way img2dataset 1.46 writes them (writer.py / downloader.py / logger.py): keys from
`compute_key` (shard id then zero-padded in-shard index), `{shard:05d}.tar` with `.jpg/.txt/.json` members, the
sidecar `{shard:05d}.parquet` and `{shard:05d}_stats.json`; or, in parquet mode, `{shard:05d}.parquet` with a `jpg`
binary column. The ground truth rides along as an extra column `synth` (img2dataset's `save_additional_columns`
puts such columns first), so it is in every `.json` and every parquet row.

Everything is a pure function of (seed, sample index): any shard can be regenerated on its own.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

# -- the grammar ----------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
# Canonical order: objects in a caption are listed in this order, so one scene has exactly one true caption.
POSITIONS = ("left", "right", "top", "bottom", "center")
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Scene layout as fractions of the image side; radii chosen so that two large shapes never touch.
_CENTERS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}
_RADIUS = {"small": 0.075, "large": 0.13}
_JITTER = 0.02

NOISE_KINDS = ("other", "attribute", "junk")
ATTRIBUTES = ("shape", "color", "size", "position")

_JUNK_FIXED = (
    "photo",
    "untitled",
    "image",
    "click here to buy",
    "buy now",
    "free shipping",
    "stock photo",
    "screenshot",
    "thumbnail",
    "no description available",
    "best price",
    "download",
)
# File-name alt-texts; {n} is a random number.
_JUNK_FILES = ("IMG_{n:04d}.jpg", "DSC{n:05d}", "DSC_{n:04d}.JPG", "image{n}.png", "photo_{n}.jpeg")

# Synonyms a generated caption may use; parse_caption maps them onto the grammar's values.
_POSITION_SYNONYMS = {"centre": "center", "middle": "center"}
_SHAPE_SYNONYMS = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text.lower())


# Every word (and punctuation token) the captions, the captioning prompt and the junk texts use, so an offline
# tokenizer vocab can hold them as whole words. Digits cover the numbers in file names (BERT splits them to pieces).
VOCAB_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(SHAPES)
        | set(COLORS)
        | set(SIZES)
        | {w for p in POSITION_PHRASE.values() for w in p.split()}
        | {"a", "and", ",", "picture", "of"}
        | {w for t in _JUNK_FIXED for w in _words(t)}
        | {w for t in _JUNK_FILES for w in _words(t.format(n=0))}
        | {str(d) for d in range(10)}
    )
)


@dataclass(frozen=True)
class SynthObject:
    shape: str
    color: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {POSITION_PHRASE[self.position]}"

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


def make_caption(objects: list[SynthObject] | list[dict[str, str]]) -> str:
    """Objects -> the grammar's caption: "a X", "a X and a Y", "a X, a Y and a Z" (canonical position order)."""
    objs = [o if isinstance(o, SynthObject) else SynthObject(**o) for o in objects]
    phrases = [o.phrase() for o in sorted(objs, key=lambda o: POSITIONS.index(o.position))]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def parse_caption(text: str) -> list[dict[str, str | None]]:
    """Text -> objects [{shape, color, size, position}], missing attributes None. Lenient: it reads any text.

    An object is born at a shape word and takes the size/colour words seen since the previous object; a position
    word goes to the latest object that has none. Words outside the grammar ("picture", "of", junk) are ignored.
    """
    objects: list[dict[str, str | None]] = []
    pending: dict[str, str | None] = {"size": None, "color": None}
    for w in _words(text):
        w = _POSITION_SYNONYMS.get(w, _SHAPE_SYNONYMS.get(w, w))
        if w in SIZES:
            pending["size"] = w
        elif w in COLORS:
            pending["color"] = w
        elif w in SHAPES:
            objects.append({"shape": w, "color": pending["color"], "size": pending["size"], "position": None})
            pending = {"size": None, "color": None}
        elif w in POSITIONS and objects and objects[-1]["position"] is None:
            objects[-1]["position"] = w
    return objects


def caption_accuracy(text: str, truth_objects: list[dict[str, str]] | list[SynthObject]) -> float:
    """Attribute accuracy of `text` against the true objects, in [0, 1].

    Objects are matched one-to-one (best assignment over all permutations; scenes have <= 3 objects) and the number
    of correct attributes is divided by 4 * max(#true, #parsed): a missing or an invented object costs its 4
    attributes. The exact true caption scores 1.0; junk text scores 0.0.
    """
    truth = [o.as_dict() if isinstance(o, SynthObject) else dict(o) for o in truth_objects]
    pred = parse_caption(text)
    n = max(len(truth), len(pred))
    if n == 0:
        return 1.0
    if not truth or not pred:
        return 0.0

    def agree(t: dict[str, Any], p: dict[str, Any]) -> int:
        return sum(t[a] == p[a] for a in ATTRIBUTES)

    small, large = (truth, pred) if len(truth) <= len(pred) else (pred, truth)
    best = max(
        sum(agree(s, large[j]) for s, j in zip(small, perm))
        for perm in itertools.permutations(range(len(large)), len(small))
    )
    return best / (len(ATTRIBUTES) * n)


def scene_targets(objects: list[SynthObject] | list[dict[str, str]]) -> np.ndarray:
    """A scene's labels for the supervised ViT warm-up (`capfilt warmup-vision`, the synthetic world's ImageNet):
    per position (POSITIONS order) the class of its object's shape, colour and size, 1-based, 0 = no object there.
    Returns (len(POSITIONS), 3) int64; the class counts are TARGET_CLASSES."""
    y = np.zeros((len(POSITIONS), 3), dtype=np.int64)
    for o in objects:
        o = o if isinstance(o, SynthObject) else SynthObject(**o)
        y[POSITIONS.index(o.position)] = (SHAPES.index(o.shape) + 1, _COLOR_NAMES.index(o.color) + 1,
                                          SIZES.index(o.size) + 1)  # fmt: skip
    return y


_COLOR_NAMES = tuple(COLORS)
# classes per position of scene_targets: (shape, colour, size), each with "no object" as class 0
TARGET_CLASSES = (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1)


# -- scenes, noise, images -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSample:
    index: int
    objects: tuple[SynthObject, ...]
    true_caption: str
    text: str  # the web text: the true caption or its noised version
    noise_kind: str  # "none" | "other" | "attribute" | "junk"

    def truth(self) -> dict[str, Any]:
        """The `synth` metadata field."""
        return {
            "true_caption": self.true_caption,
            "noise_kind": self.noise_kind,
            "text": self.text,
            "objects": [o.as_dict() for o in self.objects],
        }


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    # Independent streams per (seed, sample, purpose): scene, noise and image texture never shift each other.
    return np.random.default_rng([seed, index, stream])


def make_scene(seed: int, index: int) -> tuple[SynthObject, ...]:
    rng = _rng(seed, index, 0)
    n = int(rng.integers(1, 4))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    objs = [
        SynthObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=SIZES[rng.integers(len(SIZES))],
            position=POSITIONS[p],
        )
        for p in positions
    ]
    return tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position)))


def _wrong_attribute(objects: tuple[SynthObject, ...], rng: np.random.Generator) -> tuple[SynthObject, ...]:
    """Change exactly one attribute of one object; a new position must not collide with another object's."""
    objs = list(objects)
    while True:
        i = int(rng.integers(len(objs)))
        attr = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
        values = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "position": POSITIONS}[attr]
        taken = {o.position for o in objs} if attr == "position" else set()
        choices = [v for v in values if v != getattr(objs[i], attr) and v not in taken]
        if choices:
            d = objs[i].as_dict()
            d[attr] = choices[rng.integers(len(choices))]
            objs[i] = SynthObject(**d)
            return tuple(objs)


def make_junk(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return _JUNK_FIXED[rng.integers(len(_JUNK_FIXED))]
    return _JUNK_FILES[rng.integers(len(_JUNK_FILES))].format(n=int(rng.integers(0, 10_000)))


def make_sample(seed: int, index: int, noise: float = 0.3, total: int | None = None) -> SynthSample:
    """Sample `index` of the world `seed`. `total` bounds the index of the image whose caption `other` borrows."""
    objects = make_scene(seed, index)
    true_caption = make_caption(list(objects))
    rng = _rng(seed, index, 1)
    kind, text = "none", true_caption
    if rng.random() < noise:
        kind = NOISE_KINDS[rng.integers(len(NOISE_KINDS))]
        if kind == "other":
            span = max(total or 0, index + 2, 16)
            for _ in range(100):  # another image whose true caption differs from this one's
                j = int(rng.integers(span))
                text = make_caption(list(make_scene(seed, j)))
                if j != index and text != true_caption:
                    break
        elif kind == "attribute":
            text = make_caption(list(_wrong_attribute(objects, rng)))
        else:
            text = make_junk(rng)
    return SynthSample(index, objects, true_caption, text, kind)


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / points
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88  # same visual weight as the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: tuple[SynthObject, ...], image_size: int, seed: int, index: int) -> Image.Image:
    """Draw the scene at 2x and downsample (anti-aliased edges), on a light background with a faint texture."""
    rng = _rng(seed, index, 2)
    big = 2 * image_size
    bg = rng.integers(200, 246, size=3)
    texture = rng.normal(0.0, 5.0, size=(big, big, 1))  # grey grain, so colours stay the objects' own
    canvas = np.clip(bg[None, None, :] + texture, 0, 255).astype(np.uint8)  # (2S, 2S, 3)
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    for o in objects:
        fx, fy = _CENTERS[o.position]
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        color = np.clip(np.array(COLORS[o.color]) + rng.integers(-15, 16, size=3), 0, 255)
        _draw_shape(
            draw, o.shape, (fx + jx) * big, (fy + jy) * big, _RADIUS[o.size] * big, tuple(int(c) for c in color)
        )
    return img.resize((image_size, image_size), Image.LANCZOS)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    """img2dataset's default encode quality for jpg is 95."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# -- img2dataset layout --------------------------------------------------------------------------------------------

OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5 digits
_TAR_MTIME = 0.0  # fixed member mtime so a rerun writes byte-identical tars (img2dataset uses the wall clock)


def compute_key(
    index_in_shard: int, shard_id: int, samples_per_shard: int, oom_shard_count: int = OOM_SHARD_COUNT
) -> str:
    """img2dataset's key: shard id then the in-shard index zero-padded to ceil(log10(samples_per_shard)) digits."""
    oom_sample_per_shard = math.ceil(math.log10(samples_per_shard))
    true_key = (10**oom_sample_per_shard) * shard_id + index_in_shard
    return f"{true_key:0{oom_sample_per_shard + oom_shard_count}d}"


def shard_name(shard_id: int, oom_shard_count: int = OOM_SHARD_COUNT) -> str:
    return f"{shard_id:0{oom_shard_count}d}"


_OBJECT_TYPE = pa.struct([(a, pa.string()) for a in ATTRIBUTES])
SYNTH_TYPE = pa.struct(
    [
        ("true_caption", pa.string()),
        ("noise_kind", pa.string()),
        ("text", pa.string()),
        ("objects", pa.list_(_OBJECT_TYPE)),
    ]
)


def meta_schema(with_synth: bool = True) -> pa.Schema:
    """The sidecar parquet schema img2dataset builds: input columns (extra, caption, url) + its own fields."""
    fields = [("synth", SYNTH_TYPE)] if with_synth else []
    fields += [
        ("caption", pa.string()),
        ("url", pa.string()),
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
    ]
    return pa.schema(fields)


def _meta(
    key: str, caption: str, image: bytes, width: int, height: int, synth: dict[str, Any] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"synth": synth} if synth is not None else {}
    meta.update(
        caption=caption,
        url=f"http://synth.local/{key}.jpg",
        key=key,
        status="success",
        error_message=None,
        width=width,
        height=height,
        original_width=width,
        original_height=height,
        exif="{}",  # exifread finds no tags in a PIL-written JPEG; img2dataset stores json.dumps({})
        sha256=hashlib.sha256(image).hexdigest(),
    )
    return meta


@dataclass
class ShardRecord:
    """One sample to write: image bytes, the .txt payload (None = no .txt member), and its metadata."""

    key: str
    image: bytes
    txt: str | bytes | None
    meta: dict[str, Any]
    image_ext: str = "jpg"


def write_webdataset_shard(fs: fsspec.AbstractFileSystem, folder: str, name: str, records: list[ShardRecord]) -> None:
    """`{name}.tar` + sidecar `{name}.parquet` + `{name}_stats.json`, as img2dataset's WebDatasetSampleWriter."""
    import webdataset as wds

    start = time.time()
    with fs.open(f"{folder}/{name}.tar", "wb") as f:
        writer = wds.TarWriter(f, mtime=_TAR_MTIME)
        for r in records:
            sample: dict[str, Any] = {"__key__": r.key, r.image_ext: r.image}
            if r.txt is not None:
                sample["txt"] = r.txt
            sample["json"] = json.dumps(r.meta, indent=4)
            writer.write(sample)
        writer.close()
    _write_parquet(fs, f"{folder}/{name}.parquet", [r.meta for r in records], meta_schema("synth" in records[0].meta))
    _write_stats(fs, folder, name, len(records), start)


def _write_parquet(fs: fsspec.AbstractFileSystem, path: str, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _write_stats(fs: fsspec.AbstractFileSystem, folder: str, name: str, count: int, start: float) -> None:
    end = time.time()
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": end - start,
        "start_time": start,
        "end_time": end,
        "status_dict": {"success": count} if count else {},
    }
    with fs.open(f"{folder}/{name}_stats.json", "w") as f:
        json.dump(stats, f, indent=4)


def write_corpus(
    out_dir: str,
    samples: int,
    noise: float = 0.3,
    seed: int = 0,
    image_size: int = 96,
    samples_per_shard: int = 100,
    output_format: str = "webdataset",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` synthetic samples to `out_dir` (a path or an fsspec URL such as s3://bucket/prefix).

    Returns a summary: shard names, sample count, and counts per noise kind.
    """
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if output_format not in ("webdataset", "parquet"):
        raise ValueError(f"output_format must be 'webdataset' or 'parquet', got {output_format!r}")

    fs, folder = fsspec.core.url_to_fs(out_dir, **(storage_options or {}))
    folder = folder.rstrip("/")
    fs.makedirs(folder, exist_ok=True)
    kinds: Counter[str] = Counter()
    shards = []
    for shard_id in range(math.ceil(samples / samples_per_shard)):
        name = shard_name(shard_id)
        start = time.time()
        records = []
        for i in range(min(samples_per_shard, samples - shard_id * samples_per_shard)):
            s = make_sample(seed, shard_id * samples_per_shard + i, noise, total=samples)
            kinds[s.noise_kind] += 1
            key = compute_key(i, shard_id, samples_per_shard)
            image = encode_jpeg(render_scene(s.objects, image_size, seed, s.index))
            records.append(
                ShardRecord(key, image, s.text, _meta(key, s.text, image, image_size, image_size, s.truth()))
            )
        if output_format == "webdataset":
            write_webdataset_shard(fs, folder, name, records)
        else:
            # img2dataset's ParquetSampleWriter: metadata columns + the image bytes column; no separate txt column
            rows = [{**r.meta, "jpg": r.image} for r in records]
            _write_parquet(fs, f"{folder}/{name}.parquet", rows, meta_schema().append(pa.field("jpg", pa.binary())))
            _write_stats(fs, folder, name, len(records), start)
        shards.append(name)
    return {
        "out_dir": out_dir,
        "format": output_format,
        "samples": samples,
        "shards": shards,
        "noise_kinds": dict(kinds),
    }


def read_truth(corpus_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """key -> the `synth` ground truth, read from the sidecar / parquet files of a corpus written by write_corpus."""
    fs, folder = fsspec.core.url_to_fs(corpus_dir, **(storage_options or {}))
    truth: dict[str, dict[str, Any]] = {}
    for path in sorted(fs.glob(folder.rstrip("/") + "/*.parquet")):
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["key", "synth"])
        for key, synth in zip(t.column("key").to_pylist(), t.column("synth").to_pylist()):
            truth[key] = synth
    return truth
