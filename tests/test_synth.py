"""The synthetic world: img2dataset layout (checked against img2dataset's own writer), noise, grammar, bad corpus."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from capfilt import synth
from tests import synth_fixtures


def _read_wds(paths: list[Path]) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    info = synth.write_corpus(str(out), 250, noise=0.3, seed=3, image_size=64, samples_per_shard=100)
    return out, info


def test_webdataset_layout_reads_back(corpus: tuple[Path, dict]) -> None:
    out, info = corpus
    assert info["shards"] == ["00000", "00001", "00002"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{ext}" for s in info["shards"] for ext in (".tar", ".parquet", "_stats.json")
    )
    samples = _read_wds(sorted(out.glob("*.tar")))
    assert len(samples) == 250
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 250
    from img2dataset.downloader import compute_key  # img2dataset's own key function

    assert keys == [compute_key(i % 100, i // 100, 2, 5) for i in range(250)]
    assert all(re.fullmatch(r"\d{7}", k) for k in keys)
    for s in samples:
        assert {"__key__", "__url__", "jpg", "txt", "json"} <= set(s)
        meta = json.loads(s["json"])
        text = s["txt"].decode("utf-8")
        assert text == meta["caption"] == meta["synth"]["text"]
        assert meta["key"] == s["__key__"] and meta["url"] == f"http://synth.local/{s['__key__']}.jpg"
        assert meta["sha256"] == hashlib.sha256(s["jpg"]).hexdigest()
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) == (meta["width"], meta["height"])
        assert meta["synth"]["true_caption"] == synth.make_caption(meta["synth"]["objects"])
        assert (meta["synth"]["noise_kind"] == "none") == (text == meta["synth"]["true_caption"])

    # sidecar parquet: one row per sample, same metadata as the .json members
    by_key = {s["__key__"]: json.loads(s["json"]) for s in samples}
    rows = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [r["key"] for r in rows] == keys
    assert all(r == by_key[r["key"]] for r in rows)
    stats = json.loads((out / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 50 and stats["status_dict"] == {"success": 50}


def test_same_bytes_as_img2dataset_writer(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    """Feed our samples through img2dataset's WebDatasetSampleWriter / ParquetSampleWriter: same members, same rows."""
    import exifread
    from img2dataset.writer import ParquetSampleWriter, WebDatasetSampleWriter

    out, _ = corpus
    ours = _read_wds([out / "00001.tar"])
    metas = [json.loads(s["json"]) for s in ours]
    for writer_cls, folder in ((WebDatasetSampleWriter, tmp_path / "wds"), (ParquetSampleWriter, tmp_path / "pq")):
        folder.mkdir()
        w = writer_cls(1, str(folder), True, 5, synth.meta_schema(), "jpg")
        for s, m in zip(ours, metas):
            w.write(s["jpg"], s["__key__"], m["caption"], dict(m))
        w.close()
    theirs = _read_wds([tmp_path / "wds" / "00001.tar"])
    strip = lambda s: {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}  # noqa: E731
    assert [strip(a) for a in ours] == [strip(b) for b in theirs]
    assert pq.read_table(tmp_path / "wds" / "00001.parquet").equals(pq.read_table(out / "00001.parquet"))
    # what img2dataset's extract_exif stores for these JPEGs
    assert metas[0]["exif"] == json.dumps(dict(exifread.process_file(io.BytesIO(ours[0]["jpg"]), details=False)))

    # parquet output format: img2dataset's parquet writer vs ours
    pq_out = tmp_path / "ours_pq"
    synth.write_corpus(
        str(pq_out), 250, noise=0.3, seed=3, image_size=64, samples_per_shard=100, output_format="parquet"
    )
    assert sorted(p.name for p in pq_out.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    ref = pq.read_table(tmp_path / "pq" / "00001.parquet")
    got = pq.read_table(pq_out / "00001.parquet")
    assert got.schema.names == ref.schema.names and got.schema.names[-1] == "jpg"
    assert got.equals(ref)


def test_noise_rate_and_kinds() -> None:
    n, noise = 600, 0.3
    samples = [synth.make_sample(11, i, noise, total=n) for i in range(n)]
    kinds = [s.noise_kind for s in samples]
    noisy = sum(k != "none" for k in kinds) / n
    assert abs(noisy - noise) < 0.06  # binomial sd ~0.019
    for kind in synth.NOISE_KINDS:
        assert kinds.count(kind) > 0.15 * noise * n  # all three kinds, roughly a third each
    true_captions = {s.true_caption for s in samples}
    for s in samples:
        truth = [o.as_dict() for o in s.objects]
        if s.noise_kind == "none":
            assert s.text == s.true_caption
            continue
        assert s.text != s.true_caption
        parsed = synth.parse_caption(s.text)
        if s.noise_kind == "attribute":  # exactly one attribute of one object differs
            assert len(parsed) == len(truth)
            assert synth.caption_accuracy(s.text, truth) == pytest.approx(1 - 1 / (4 * len(truth)))
        elif s.noise_kind == "other":  # a well-formed caption of some other scene of this world
            assert synth.make_caption(parsed) == s.text
            assert s.text in true_captions  # borrowed from an image of this same corpus
        else:  # junk: nothing of the grammar in it
            assert parsed == [] and synth.caption_accuracy(s.text, truth) == 0.0
    clean = [synth.make_sample(11, i, 0.0) for i in range(100)]
    assert all(s.noise_kind == "none" and s.text == s.true_caption for s in clean)


def test_determinism_by_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        synth.write_corpus(str(out), 30, seed=seed, image_size=32, samples_per_shard=20)
    for name in ("00000.tar", "00001.tar"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert pq.read_table(a / "00001.parquet").equals(pq.read_table(b / "00001.parquet"))
    # any sample regenerates on its own, whatever else was generated
    assert synth.make_sample(5, 17, 0.3, total=30) == synth.make_sample(5, 17, 0.3, total=30)


def test_parse_caption_round_trips_and_accuracy() -> None:
    for i in range(400):
        s = synth.make_sample(2, i, 0.0)
        truth = [o.as_dict() for o in s.objects]
        assert synth.parse_caption(s.true_caption) == truth
        assert synth.make_caption(truth) == s.true_caption
        assert synth.caption_accuracy(s.true_caption, truth) == 1.0
        # a captioner's output carries the prompt: still a perfect caption
        assert synth.caption_accuracy("a picture of " + s.true_caption, truth) == 1.0
    truth = [
        {"shape": "circle", "color": "red", "size": "large", "position": "left"},
        {"shape": "square", "color": "blue", "size": "small", "position": "right"},
    ]
    # order of objects in the text does not matter; a half caption scores half; extra objects cost
    assert synth.caption_accuracy("a small blue square on the right and a large red circle on the left", truth) == 1.0
    assert synth.caption_accuracy("a large red circle on the left", truth) == 0.5
    assert synth.caption_accuracy("a red circle", truth) == 0.25
    three = "a large red circle on the left, a small blue square on the right and a small red star at the top"
    assert synth.caption_accuracy(three, truth) == pytest.approx(8 / 12)
    assert synth.caption_accuracy("untitled", truth) == 0.0
    assert synth.parse_caption("a big green triangle in the middle") == [
        {"shape": "triangle", "color": "green", "size": None, "position": "center"}
    ]


def test_vocab_words_cover_every_text(tiny_vocab_dir: Path) -> None:
    """With VOCAB_WORDS in the offline vocab, no synthetic text (true, noised, junk) has an [UNK] token."""
    from blip.tokenizer import build_tokenizer

    tok = build_tokenizer(tiny_vocab_dir)
    texts = [s.text for s in (synth.make_sample(4, i, 1.0) for i in range(300))]
    texts += [synth.make_sample(4, i, 0.0).true_caption for i in range(100)] + ["a picture of a red star"]
    for t in texts:
        pieces = tok.tokenize(t)
        assert tok.unk_token not in pieces, (t, pieces)
    # grammar words are whole words, not word pieces
    assert all(len(tok.tokenize(w)) == 1 for w in synth.VOCAB_WORDS)


def test_parquet_format_and_fsspec_url(tmp_path: Path) -> None:
    info = synth.write_corpus("memory://synth-test/corpus", 12, samples_per_shard=5, output_format="parquet")
    assert info["shards"] == ["00000", "00001", "00002"]
    import fsspec

    fs = fsspec.filesystem("memory")
    assert sorted(fs.ls("/synth-test/corpus", detail=False)) == [
        f"/synth-test/corpus/{s}{e}" for s in info["shards"] for e in (".parquet", "_stats.json")
    ]
    with fs.open("/synth-test/corpus/00002.parquet", "rb") as f:
        t = pq.read_table(f)
    assert t.column("key").to_pylist() == ["000020", "000021"]  # 5 per shard -> one index digit
    img = Image.open(io.BytesIO(t.column("jpg")[0].as_py()))
    assert img.size == (96, 96)
    truth = synth.read_truth("memory://synth-test/corpus")
    assert sorted(truth) == [synth.compute_key(i % 5, i // 5, 5) for i in range(12)]
    assert truth["000020"]["true_caption"] == synth.make_sample(0, 10).true_caption


def test_scene_pixels_show_the_objects() -> None:
    """The drawn colour really is at the stated position (the captions are learnable from the pixels)."""
    for i in range(30):
        objs = synth.make_scene(9, i)
        arr = np.asarray(synth.render_scene(objs, 96, 9, i)).astype(int)  # (96, 96, 3)
        for o in objs:
            fx, fy = synth._CENTERS[o.position]
            px = arr[int(fy * 96), int(fx * 96)]
            assert np.abs(px - np.array(synth.COLORS[o.color])).max() < 40, (o, px)


def test_bad_corpus_layout(tmp_path: Path) -> None:
    expected = synth_fixtures.make_bad_corpus(str(tmp_path))
    cases = {v["case"] for v in expected.values()}
    assert {
        "truncated_jpeg",
        "zero_bytes",
        "text_as_jpg",
        "png_alpha",
        "cmyk_jpeg",
        "png_16bit",
        "animated_gif",
    } <= cases
    assert {"one_pixel", "bomb_png", "missing_txt", "non_utf8_caption", "caption_10kb", "good"} <= cases
    samples = {s["__key__"]: s for s in _read_wds([tmp_path / "00000.tar"])}
    assert sorted(samples) == sorted(expected)
    by_case = {v["case"]: samples[k] for k, v in expected.items()}
    assert "txt" not in by_case["missing_txt"]
    with pytest.raises(UnicodeDecodeError):
        by_case["non_utf8_caption"]["txt"].decode("utf-8")
    assert len(by_case["caption_10kb"]["txt"]) == 10_240
    assert by_case["zero_bytes"]["jpg"] == b""
    assert len(synth_fixtures.png_bomb()) < 200
    assert pq.read_table(tmp_path / "00000.parquet").column("key").to_pylist() == sorted(expected)


def test_truncated_shard(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = corpus
    dst = tmp_path / "00000.tar"
    intact = synth_fixtures.write_truncated_shard(str(out / "00000.tar"), str(dst), fraction=0.5)
    assert 30 < len(intact) < 70
    assert dst.stat().st_size == (out / "00000.tar").stat().st_size // 2
    with pytest.raises(tarfile.ReadError):  # a strict reader fails on the cut
        _read_wds([dst])
    got = [s["__key__"] for s in wds.WebDataset(str(dst), shardshuffle=False, handler=wds.warn_and_continue)]
    assert set(intact) <= set(got)


def test_cli_synth(tmp_path: Path) -> None:
    from cli import main

    r = CliRunner().invoke(
        main, ["synth", str(tmp_path / "o"), "--samples", "7", "--samples-per-shard", "5", "--noise", "0"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 7 samples in 2 webdataset shards" in r.output and "none 7" in r.output
    assert len(_read_wds(sorted((tmp_path / "o").glob("*.tar")))) == 7
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "p"), "--samples", "3", "--noise", "1.5"])
    assert r.exit_code != 0 and "noise" in r.output


def test_write_to_s3(s3_server) -> None:
    """write_corpus through fsspec to moto's S3 server on loopback; read back through s3fs."""
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/corpus"
    info = synth.write_corpus(url, 8, samples_per_shard=5, storage_options=s3_server.storage_options)
    s3_server.fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[1] for p in s3_server.fs.ls(f"{bucket}/corpus"))
    assert names == sorted(f"{s}{e}" for s in info["shards"] for e in (".tar", ".parquet", "_stats.json"))
    with s3_server.fs.open(f"{bucket}/corpus/00001.tar", "rb") as f:
        members = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert members[:3] == ["000010.jpg", "000010.json", "000010.txt"] and len(members) == 9
    truth = synth.read_truth(url, storage_options=s3_server.storage_options)
    assert len(truth) == 8 and truth["000012"] == synth.make_sample(0, 7, 0.3, total=8).truth()
