"""Decode cost per image at model size: how many CPU cores a GPU's CapFilt actor needs for decoding.

Times `capfilt.decode.decode_image` (PIL decode with JPEG draft, EXIF, RGB, bicubic resize) on one thread, and with
N threads in one process (PIL releases the GIL), for JPEGs of typical web sizes.

    python bench/bench_decode.py --size 384 --threads 1 2
"""

from __future__ import annotations

import argparse
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from capfilt.decode import decode_image


def web_like_jpeg(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth colour fields + texture noise; compresses like a photo, ~q90)."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384, help="model image size")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=64)
    args = ap.parse_args()
    result = {"size": args.size, "ms_per_image": {}}
    for w, h in ((512, 384), (1024, 768), (2048, 1536)):
        data = [web_like_jpeg(w, h, i) for i in range(args.images)]
        decode_image(data[0], args.size)  # warm-up
        row = {"kB": round(sum(map(len, data)) / len(data) / 1024, 1)}
        for n in args.threads:
            with ThreadPoolExecutor(n) as pool:
                t = time.perf_counter()
                list(pool.map(lambda d: decode_image(d, args.size), data))
                s = time.perf_counter() - t
            row[f"{n}_threads_images_per_s"] = round(len(data) / s, 1)
            if n == 1:
                row["ms_per_image_1_thread"] = round(1000 * s / len(data), 2)
        result["ms_per_image"][f"{w}x{h}"] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
