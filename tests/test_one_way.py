"""One reader, one decoder: `capfilt run`, the training data and the report read the same samples with the same keys
and decode them to the same pixels (these drifted apart when each had its own copy)."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
from PIL import Image

from capfilt.decode import decode_image
from pipelines.io import ShardReader, count_samples, list_shards
from pipelines.report.gather import _images_from_tar
from pipelines.train.data import count_tar_samples, eval_transform, iter_tar_groups, list_tars, parse_group


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_keys_with_dots_in_folder_names_read_alike_by_run_training_and_report(tmp_path):
    img = _png(Image.new("RGB", (8, 8), (200, 10, 10)))
    members = {}
    keys = ["v1.2/set.a/0001", "v1.2/set.a/0002", "plain"]
    for k in keys:
        members |= {f"{k}.jpg": img, f"{k}.txt": b"a red square", f"{k}.json": json.dumps({"key": k}).encode()}
    members["v1.2/.hidden.txt"] = b"not a sample"
    sub = tmp_path / "out" / "tars"
    sub.mkdir(parents=True)
    _tar(sub / "00000.tar", members)

    (shard,) = list_shards(str(sub))
    run_keys = [r["key"] for r in ShardReader(shard)]
    (path,) = list_tars(str(tmp_path / "out"))  # training finds the tars in sub-folders
    train_keys = [g["__key__"] for g in iter_tar_groups(path)]
    fs = fsspec.filesystem("file")
    report_keys = sorted(_images_from_tar(fs, path, set(keys) | {"v1"}))
    assert run_keys == train_keys == keys
    assert report_keys == sorted(keys)  # the report's old rule (first dot of the path) gave "v1"
    assert count_samples(path) == count_tar_samples([path]) == 3


def test_alpha_and_16_bit_pngs_decode_alike_for_capfilt_and_training():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 24, dtype=np.uint8)[None, :]  # a transparency ramp
    deep = (rng.integers(0, 65536, (24, 24))).astype(np.uint16)

    def training_decode(data: bytes) -> Image.Image:  # the image training reads from a tar sample
        parsed = parse_group({"__key__": "k", "png": data, "txt": b"a caption"})
        assert parsed.status == "ok", parsed.error
        return parsed.image

    for data in (_png(Image.fromarray(rgba, "RGBA")), _png(Image.fromarray(deep))):
        capfilt_px = decode_image(data, 16)
        training_px = eval_transform(training_decode(data), 16)
        assert np.array_equal(capfilt_px, training_px)
    # and the alpha is composited on white (not dropped): a fully transparent pixel is white
    clear = np.zeros((8, 8, 4), dtype=np.uint8)
    assert (np.asarray(training_decode(_png(Image.fromarray(clear, "RGBA")))) == 255).all()
