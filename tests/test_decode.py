"""Decode stage on hostile and awkward images: the right status, a useful message, the right pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from blip.image import resize_rgb
from capfilt import synth
from capfilt.decode import DecodeError, apply_draft, decode_image, decode_image_with_size, decode_or_error, stack_pixels
from tests import synth_fixtures

# What the error message of each failing case must mention, so a user can tell what was wrong.
_MESSAGE_WORDS = {
    "truncated_jpeg": "truncated",
    "zero_bytes": "empty",
    "text_as_jpg": "not an image",
    "random_bytes": "not an image",
    "bomb_png": "bomb",
    "bomb_gif": "bomb",
}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, dict]:
    out = tmp_path_factory.mktemp("bad")
    expected = synth_fixtures.make_bad_corpus(str(out))
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    return samples, expected


def test_every_hostile_case(bad_batch: tuple[list, dict]) -> None:
    """The worker's path: decode_or_error per sample (never raises), stack_pixels for the model batch."""
    samples, expected = bad_batch
    decoded = [decode_or_error(s["jpg"], 64) for s in samples]
    pixels = stack_pixels(decoded, 64)
    n = len(samples)
    assert pixels.shape == (n, 64, 64, 3) and pixels.dtype == np.uint8
    keys = [s["__key__"] for s in samples]
    _, status, error, width, height = (list(c) for c in zip(*decoded))
    seen = set()
    for i, key in enumerate(keys):
        case, want = expected[key]["case"], expected[key]["status"]
        seen.add(case)
        assert status[i] == want, (case, error[i])
        if want == "ok":
            assert error[i] == "" and pixels[i].any() and width[i] >= 1
        else:
            assert not pixels[i].any()
            assert _MESSAGE_WORDS[case] in error[i].lower(), (case, error[i])
    assert seen == {v["case"] for v in expected.values()}
    by_case = {expected[k]["case"]: i for i, k in enumerate(keys)}
    assert (width[by_case["one_pixel"]], height[by_case["one_pixel"]]) == (1, 1)
    assert width[by_case["truncated_jpeg"]] == 96  # the header was readable: its size is reported
    # the animated GIF gives its first frame (blue), not its second (red)
    assert np.abs(pixels[by_case["animated_gif"]].astype(int) - [30, 70, 220]).max() <= 3


def test_exif_rotation_really_rotates() -> None:
    # stored 64 wide x 32 high: left half red, right half blue; orientation 6 = display rotated 90 degrees clockwise,
    # so the displayed image is 32 wide x 64 high with red on top.
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, :32] = (220, 30, 30)
    a[:, 32:] = (30, 70, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())
    px, w, h = decode_image_with_size(data, 32)
    assert (w, h) == (32, 64)
    assert np.abs(px[4, 16].astype(int) - [220, 30, 30]).max() < 20  # top: red
    assert np.abs(px[28, 16].astype(int) - [30, 70, 220]).max() < 20  # bottom: blue
    # without the EXIF tag the same pixels decode unrotated: red on the left
    plain = decode_image(_encode(Image.fromarray(a), "JPEG", quality=95), 32)
    assert np.abs(plain[16, 4].astype(int) - [220, 30, 30]).max() < 20
    assert np.abs(plain[28, 4].astype(int) - [220, 30, 30]).max() < 20
    assert np.abs(plain[4, 28].astype(int) - [30, 70, 220]).max() < 20  # right: blue


def test_alpha_composited_on_white() -> None:
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black ...
    rgba[8:24, 8:24] = (220, 30, 30, 255)  # ... around an opaque red square
    rgba[0:4, 0:4] = (0, 0, 0, 128)  # half-transparent black corner
    px = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), 32)
    assert (px[30, 30] == 255).all()  # transparent -> white, not black
    assert (px[16, 16] == [220, 30, 30]).all()
    assert np.abs(px[1, 1].astype(int) - 127).max() <= 1  # 50% black over white
    # LA and palette-with-transparency take the same path
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert (decode_image(_encode(la, "PNG"), 32)[30, 30] == 255).all()
    p = Image.new("P", (32, 32), 0)
    p.putpalette([0, 0, 0, 30, 160, 50] + [0] * 762)
    p.paste(1, (8, 8, 24, 24))
    pt = decode_image(_encode(p, "PNG", transparency=0), 32)
    assert (pt[0, 0] == 255).all() and (pt[16, 16] == [30, 160, 50]).all()


def test_16bit_brightness() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))  # (8, 64) 16-bit ramp
    data = _encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    px = decode_image(data, 64)[:, :, 0].astype(int)  # (64, 64) grey
    expect = np.rint(np.linspace(0, 255, 64)).astype(int)
    assert np.abs(px[4] - expect).max() <= 2  # scaled by 1/257, not clipped at 255
    half = decode_image(_encode(Image.fromarray(np.full((16, 16), 32768, np.uint16)), "PNG"), 16)
    assert np.abs(half.astype(int) - 128).max() <= 1
    # a 32-bit "I" image holding 16-bit values is scaled the same way
    i32 = Image.fromarray(np.full((16, 16), 65535, np.int32), "I")
    assert (decode_image(_encode(i32, "TIFF"), 16) == 255).all()


def test_cmyk_colours_plausible() -> None:
    for cmyk, rgb in (((0, 255, 255, 0), (255, 0, 0)), ((255, 0, 255, 0), (0, 255, 0)), ((0, 0, 0, 255), (0, 0, 0))):
        data = _encode(Image.new("CMYK", (32, 32), cmyk), "JPEG", quality=95)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        px = decode_image(data, 16)
        assert np.abs(px.astype(int) - rgb).max() < 30, (cmyk, px[0, 0])


def test_other_modes() -> None:
    one_bit = Image.new("1", (16, 16), 0)
    one_bit.paste(1, (0, 0, 8, 16))
    px = decode_image(_encode(one_bit, "PNG"), 16)
    assert (px[8, 2] == 255).all() and (px[8, 13] == 0).all()
    grey = decode_image(_encode(Image.new("L", (16, 16), 77), "JPEG"), 8)
    assert np.abs(grey.astype(int) - 77).max() <= 2
    webp = decode_image(_encode(Image.new("RGB", (16, 16), (30, 70, 220)), "WEBP", lossless=True), 8)
    assert (webp == [30, 70, 220]).all()


def test_bit_exact_with_model_preprocessing() -> None:
    img = synth.render_scene(synth.make_scene(1, 7), 120, 1, 7)
    for fmt in ("PNG", "JPEG"):  # 120 px JPEG at 96: below the draft threshold, so no draft
        data = _encode(img, fmt)
        ref = resize_rgb(Image.open(io.BytesIO(data)), 96)
        assert np.array_equal(decode_image(data, 96), ref)


def test_draft_close_to_full_decode_and_never_below_target() -> None:
    big = synth.render_scene(synth.make_scene(2, 3), 800, 2, 3).resize((1000, 800))
    data = _encode(big, "JPEG", quality=95)
    full = resize_rgb(Image.open(io.BytesIO(data)), 96).astype(int)
    drafted = decode_image(data, 96).astype(int)
    assert not np.array_equal(full, drafted)  # the draft path really ran
    assert np.abs(full - drafted).mean() < 2.0 and np.abs(full - drafted).max() < 60
    for w, h, s in ((1000, 800, 96), (193, 500, 96), (4000, 250, 96), (777, 777, 384), (1600, 1200, 224)):
        img = Image.open(io.BytesIO(_encode(Image.new("RGB", (w, h), (9, 9, 9)), "JPEG")))
        drafted = apply_draft(img, s)
        img.load()
        assert min(img.size) >= s, (w, h, s, img.size)
        assert drafted == (min(w, h) >= 2 * s) and (img.size != (w, h)) == drafted
    # a PNG is never drafted
    png = Image.open(io.BytesIO(_encode(Image.new("RGB", (800, 800)), "PNG")))
    assert not apply_draft(png, 96)


def test_errors_for_missing_and_capped() -> None:
    for data, word in ((None, "no image"), (b"", "empty"), (float("nan"), "no image"), ("text", "not bytes")):
        with pytest.raises(DecodeError, match=word):
            decode_image(data, 32)
    ok = _encode(Image.new("RGB", (96, 96), (1, 2, 3)), "PNG")
    with pytest.raises(DecodeError, match=r"too large: 96x96 = 9216 pixels > max_pixels 1000") as e:
        decode_image(ok, 32, max_pixels=1000)
    assert (e.value.width, e.value.height) == (96, 96)
    # between PIL's warning and error thresholds: still an error, not a warning
    with pytest.raises(DecodeError, match="bomb"):
        decode_image(synth_fixtures.png_bomb(10_000, 10_000), 32, max_pixels=10**9)
    assert decode_image(np.frombuffer(ok, np.uint8), 8).shape == (8, 8, 3)  # bytes as a uint8 array


def test_image_members_of_any_kind_and_missing_ones(tmp_path: Path) -> None:
    """A sample's image is whichever image member it has (`.png` as well as `.jpg`): read by the shard reader, decoded
    by decode_or_error; an empty image or none at all is a decode_error row with the reason, never a crash."""
    import tarfile

    from pipelines.io import ShardReader, list_shards

    png = _encode(Image.new("RGB", (20, 10), (30, 160, 50)), "PNG")
    jpg = _encode(Image.new("RGB", (10, 20), (220, 30, 30)), "JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tf:
        for name, data in (("a.jpg", jpg), ("b.png", png), ("c.jpg", b""), ("d.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows = list(ShardReader(list_shards(str(tmp_path))[0]))
    assert [r["image_ext"] for r in rows] == ["jpg", "png", "jpg", None]
    decoded = [decode_or_error(r["image"], 8) for r in rows]
    assert [d[1] for d in decoded] == ["ok", "ok", "decode_error", "decode_error"]
    assert [d[3:] for d in decoded] == [(10, 20), (20, 10), (0, 0), (0, 0)]
    assert "empty" in decoded[2][2] and "no image" in decoded[3][2]
    assert stack_pixels(decoded, 8).shape == (4, 8, 8, 3) and stack_pixels([], 8).shape == (0, 8, 8, 3)


def test_corpus_decodes(tmp_path: Path) -> None:
    """Every image of a synthetic corpus decodes, at the corpus' own size bit-exactly with the model preprocessing."""
    synth.write_corpus(str(tmp_path), 20, image_size=64, samples_per_shard=20)
    samples = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False))
    decoded = [decode_or_error(s["jpg"], 64) for s in samples]
    assert {d[1] for d in decoded} == {"ok"}
    ref = np.stack([resize_rgb(Image.open(io.BytesIO(s["jpg"])), 64) for s in samples])
    assert np.array_equal(stack_pixels(decoded, 64), ref)
