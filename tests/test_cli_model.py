"""`capfilt caption`, `capfilt score`, `capfilt convert` through click's CliRunner (the real commands, tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import blip
from blip.config import BlipConfig
from blip.model import MODEL_CLASSES
from blip.tokenizer import build_tokenizer
from cli import main


@pytest.fixture(scope="module")
def models(tiny_vocab_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_models")
    out = {}
    for family in ("caption", "retrieval", "pretrain"):
        torch.manual_seed(0)
        model = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family)).eval()
        model.tokenizer = build_tokenizer(tiny_vocab_dir)
        out[family] = blip.save_pretrained(model, root / family)
        torch.save({"model": model.state_dict()}, root / f"{family}.pth")
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (64, 64), (50, 90)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    bad = root / "broken.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    paths.append(bad)
    return paths


def _run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def _assert_clean_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1, (code, out, err)
    assert out == ""  # nothing half-printed before the error
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_caption_beam_and_sampling(models: dict[str, Path], images: list[Path]) -> None:
    good = images[:3]
    code, out, err = _run("caption", *good, "--model", models["caption"], "--device", "cpu")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == [str(p) for p in good]
    # the same model through the Python API gives the same beam captions
    model = blip.load(models["caption"])
    from capfilt.predict import read_images

    pixels = blip.image.normalize(
        read_images([str(p) for p in good], 64), model.config.image_mean, model.config.image_std
    )
    want = [c[0] for c in model.generate(pixels, sample=False, num_beams=3)]
    assert [ln.split("\t", 1)[1] for ln in lines] == want

    args = ("caption", *good, "--model", models["caption"], "--top-p", 0.9, "--num-captions", 3, "--seed", 7)
    code, out, err = _run(*args)
    assert code == 0, err
    sampled = out.strip().splitlines()
    assert len(sampled) == 9 and sampled == _run(*args)[1].strip().splitlines()  # seeded: reruns agree
    # per-image seeds: captioning an image alone gives its captions from the batch
    alone = _run("caption", good[0], "--model", models["caption"], "--top-p", 0.9, "--num-captions", 3, "--seed", 7)[1]
    assert alone.strip().splitlines() == sampled[:3]
    # a pretraining checkpoint captions too (shared decoder)
    assert _run("caption", good[0], "--model", models["pretrain"])[0] == 0


def test_score(models: dict[str, Path], images: list[Path]) -> None:
    texts = ["a red circle", "two dogs on the grass"]
    code, out, err = _run("score", "--model", models["retrieval"], images[0], *texts)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header == "itm\titc\ttext"
    model = blip.load(models["retrieval"])
    from capfilt.predict import read_images

    pixels = blip.image.normalize(read_images([str(images[0])], 64), model.config.image_mean, model.config.image_std)
    itm, itc = model.score(pixels, [texts])
    for row, text, p, s in zip(rows, texts, itm[0], itc[0], strict=True):
        got_p, got_s, got_t = row.split("\t")
        assert (
            got_t == text and float(got_p) == pytest.approx(p, abs=1e-4) and float(got_s) == pytest.approx(s, abs=1e-4)
        )
        assert 0.0 <= float(got_p) <= 1.0 and -1.0 <= float(got_s) <= 1.0


def test_convert(models: dict[str, Path], tiny_vocab_dir: Path, tmp_path: Path) -> None:
    src = models["caption"].parent / "pretrain.pth"
    code, out, err = _run("convert", src, tmp_path / "cap", "--tokenizer", tiny_vocab_dir, "--family", "caption")
    assert code == 0, err
    assert "caption model" in out
    converted = blip.load(tmp_path / "cap")
    pre = blip.load(models["pretrain"])
    assert type(converted).__name__ == "BlipCaptioner"
    own = converted.state_dict()
    assert all(torch.equal(v, pre.state_dict()[k]) for k, v in own.items())


def test_clear_errors(models: dict[str, Path], images: list[Path], tiny_vocab_dir: Path, tmp_path: Path) -> None:
    good, broken = images[0], images[3]
    _assert_clean_error(
        *_run("caption", tmp_path / "nope.png", "--model", models["caption"]), "nope.png", "does not exist"
    )
    _assert_clean_error(*_run("caption", broken, "--model", models["caption"]), "broken.jpg", "cannot read image")
    _assert_clean_error(*_run("caption", good, "--model", tmp_path / "missing"), "missing", "does not exist")
    _assert_clean_error(*_run("caption", good, "--model", models["retrieval"]), "retrieval model")
    _assert_clean_error(*_run("score", "--model", models["caption"], good, "a dog"), "caption model")
    _assert_clean_error(*_run("caption", good, "--model", models["caption"], "--num-captions", 2), "--top-p")
    _assert_clean_error(*_run("caption", good, "--model", models["caption"], "--beam", 2, "--top-p", 0.9), "not both")
    junk = tmp_path / "junk.pth"
    torch.save({"model": {"layers.0.weight": torch.ones(1)}}, junk)
    _assert_clean_error(*_run("convert", junk, tmp_path / "out"), "junk.pth", "unknown checkpoint layout")
    (tmp_path / "garbage.pth").write_bytes(b"garbage")
    _assert_clean_error(*_run("score", "--model", tmp_path / "garbage.pth", good, "x"), "cannot read checkpoint")
    # a bare .pth with no tokenizer anywhere near it
    bare = tmp_path / "bare" / "caption.pth"
    bare.parent.mkdir()
    bare.write_bytes((models["caption"].parent / "caption.pth").read_bytes())
    _assert_clean_error(*_run("caption", good, "--model", bare), "no tokenizer")
    assert _run("caption", good, "--model", bare, "--tokenizer", tiny_vocab_dir)[0] == 0
    pre = models["pretrain"].parent / "pretrain.pth"
    code, out, err = _run("score", "--model", pre, "--tokenizer", tiny_vocab_dir / "vocab.txt", good, "a dog")
    assert code == 0 and len(out.strip().splitlines()) == 2, err
