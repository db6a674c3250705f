"""Test fixtures built on the synthetic world: hostile inputs (bombs, corrupt and odd images, bad texts) and
truncated shards. Test data, not product code: it lives with the tests."""

from __future__ import annotations

import io
import json
import tarfile
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from capfilt.synth import (
    _TAR_MTIME,
    ShardRecord,
    _meta,
    _write_parquet,
    _write_stats,
    compute_key,
    encode_jpeg,
    make_sample,
    meta_schema,
    render_scene,
)

# -- hostile inputs ------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A ~100-byte PNG whose header declares width x height 8-bit grey pixels (its data stops after a row)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one filtered scanline; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def gif_bomb(width: int = 65_535, height: int = 65_535) -> bytes:
    """A tiny GIF whose logical screen and single frame declare width x height pixels."""
    import struct

    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame + b";"


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bad_cases(seed: int, image_size: int) -> list[tuple[str, str, bytes, str | bytes | None]]:
    """(case, expected decode status, image bytes, txt payload or None) for every hostile case."""
    s0, s1 = make_sample(seed, 0, noise=0.0), make_sample(seed, 1, noise=0.0)
    good0 = encode_jpeg(render_scene(s0.objects, image_size, seed, 0))
    good1 = encode_jpeg(render_scene(s1.objects, image_size, seed, 1))

    rgba = Image.new("RGBA", (image_size, image_size), (0, 0, 0, 0))  # transparent, black "under" the alpha
    ImageDraw.Draw(rgba).ellipse([8, 8, image_size - 8, image_size - 8], fill=(220, 30, 30, 255))
    cmyk = Image.new("CMYK", (image_size, image_size), (0, 255, 255, 0))  # pure red in CMYK
    grey16 = Image.fromarray(np.full((image_size, image_size), 32768, dtype=np.uint16))  # 50% grey, 16-bit
    frames = [Image.new("RGB", (image_size, image_size), c) for c in ((30, 70, 220), (220, 30, 30))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return [
        ("good", "ok", good0, s0.true_caption),
        ("good_png_named_jpg", "ok", _encode(render_scene(s1.objects, image_size, seed, 1), "PNG"), s1.true_caption),
        ("truncated_jpeg", "decode_error", good1[: len(good1) // 2], s1.true_caption),
        ("zero_bytes", "decode_error", b"", "an empty file"),
        ("text_as_jpg", "decode_error", b"<html><body>404 Not Found</body></html>\n", "a page, not an image"),
        ("random_bytes", "decode_error", np.random.default_rng(seed).bytes(2048), "noise"),
        ("png_alpha", "ok", _encode(rgba, "PNG"), "a large red circle in the center"),
        ("cmyk_jpeg", "ok", _encode(cmyk, "JPEG", quality=95), "a red square"),
        ("png_16bit", "ok", _encode(grey16, "PNG"), "a grey picture"),
        ("animated_gif", "ok", gif.getvalue(), "a blue picture"),
        ("one_pixel", "ok", _encode(Image.new("RGB", (1, 1), (30, 160, 50)), "PNG"), "a green dot"),
        ("bomb_png", "decode_error", png_bomb(), "a bomb"),
        ("bomb_gif", "decode_error", gif_bomb(), "a bomb"),
        ("missing_txt", "ok", good0, None),
        ("non_utf8_caption", "ok", good1, "caf\xe9 \xab photo \xbb".encode("latin-1") + b"\xff\xfe"),
        ("caption_10kb", "ok", good0, ("a large red circle " * 600)[:10_240]),
    ]


def make_bad_corpus(out_dir: str, seed: int = 0, image_size: int = 96) -> dict[str, dict[str, str]]:
    """One webdataset shard `00000.tar` (+ sidecar parquet and stats) of hostile samples, one per key.

    Returns key -> {"case": name, "status": expected decode status ("ok" | "decode_error")}. Text-side cases
    (missing .txt, non-UTF-8 .txt, a 10 kB caption) hold a good image: their decode status is "ok" and the
    reader downstream must cope with the text.
    """
    fs, folder = fsspec.core.url_to_fs(out_dir)
    folder = folder.rstrip("/")
    fs.makedirs(folder, exist_ok=True)
    cases = _bad_cases(seed, image_size)
    expected: dict[str, dict[str, str]] = {}
    records = []
    for i, (case, status, image, txt) in enumerate(cases):
        key = compute_key(i, 0, 100)
        caption = txt.decode("utf-8", errors="replace") if isinstance(txt, bytes) else txt
        meta = _meta(key, caption, image, image_size, image_size, None)
        meta["url"] = f"http://synth.local/bad/{case}.jpg"
        meta["case"] = case
        records.append(ShardRecord(key, image, txt, meta))
        expected[key] = {"case": case, "status": status}
    fs_schema = meta_schema(with_synth=False).append(pa.field("case", pa.string()))
    import webdataset as wds

    start = time.time()
    with fs.open(f"{folder}/00000.tar", "wb") as f:
        writer = wds.TarWriter(f, mtime=_TAR_MTIME)
        for r in records:
            sample: dict[str, Any] = {"__key__": r.key, "jpg": r.image, "json": json.dumps(r.meta, indent=4)}
            if r.txt is not None:
                sample["txt"] = r.txt
            writer.write(sample)
        writer.close()
    _write_parquet(fs, f"{folder}/00000.parquet", [r.meta for r in records], fs_schema)
    _write_stats(fs, folder, "00000", len(records), start)
    return expected


def write_truncated_shard(src_tar: str, dst_tar: str, fraction: float = 0.5) -> list[str]:
    """Copy the first `fraction` of a tar's bytes to `dst_tar` (a shard cut off mid-transfer, no end marker).

    Returns the keys whose members all lie wholly before the cut, i.e. the samples a tolerant reader can still get.
    """
    with fsspec.open(src_tar, "rb") as f:
        data = f.read()
    cut = int(len(data) * fraction)
    members: dict[str, bool] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key = m.name.split(".", 1)[0]
            members[key] = members.get(key, True) and m.offset_data + m.size <= cut
    with fsspec.open(dst_tar, "wb") as f:
        f.write(data[:cut])
    return [k for k, whole in members.items() if whole]
