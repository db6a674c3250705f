"""The decoding options are declared once (blip.GenerationConfig): the model's defaults, CapFilt's settings and the
CLI's options of caption, eval, vqa and run all come from it."""

from __future__ import annotations

from dataclasses import fields

import click
import pytest
import torch
from click.testing import CliRunner

from blip import GenerationConfig
from blip.config import BlipConfig
from blip.model import BlipCaptioner
from capfilt.stages import CapFiltSettings


def test_ranges_are_checked_once_built():
    assert GenerationConfig().sample is False and GenerationConfig.nucleus().repetition_penalty == 1.1
    for bad in ({"top_p": 0.0}, {"top_p": 1.5}, {"num_beams": 0}, {"max_length": 1}, {"repetition_penalty": 0.0}):
        (name,) = bad
        with pytest.raises(ValueError, match=name):
            GenerationConfig(**bad)
    with pytest.raises(ValueError, match="top_p"):  # CapFilt's settings check their decoding options there too
        CapFiltSettings(captioner="c", filter="f", top_p=0.0).validate()
    assert CapFiltSettings(captioner="c", filter="f").generation == GenerationConfig.nucleus()


def test_model_defaults_are_the_config(tiny_vocab_dir):
    from blip.tokenizer import build_tokenizer

    tok = build_tokenizer(tiny_vocab_dir)
    cfg = BlipConfig.from_name("tiny", family="caption", text={"vocab_size": len(tok)}).with_tokenizer(tok)
    torch.manual_seed(0)
    model = BlipCaptioner(cfg).eval()
    model.tokenizer = tok
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    defaults = model.generate_ids(px)
    assert torch.equal(defaults, model.generate_ids(px, GenerationConfig()))
    assert torch.equal(defaults, model.generate_ids(px, **{f.name: getattr(GenerationConfig(), f.name) for f in
                                                           fields(GenerationConfig)}))  # fmt: skip
    g = GenerationConfig(num_beams=1, max_length=9, min_length=9)
    assert torch.equal(model.generate_ids(px, g), model.generate_ids(px, num_beams=1, max_length=9, min_length=9))
    assert model.generate_ids(px, g).shape == (2, 9)


def _param(command: str, name: str) -> click.Parameter:
    from cli import main

    return next(p for p in main.commands[command].params if p.name == name)


@pytest.mark.parametrize("name", ["top_p", "max_length", "min_length", "repetition_penalty", "num_beams"])
def test_cli_options_share_the_ranges(name):
    low, high, low_open = GenerationConfig.RANGES[name]
    where = {"top_p": ("caption", "run"), "max_length": ("caption", "run", "eval", "vqa"),
             "min_length": ("caption", "run", "eval", "vqa"), "repetition_penalty": ("run", "eval"),
             "num_beams": ("caption", "eval", "vqa")}[name]  # fmt: skip
    for command in where:
        param = _param(command, {"num_beams": "beam"}.get(name, name) if command in ("caption", "vqa") else name)
        assert (param.type.min, param.type.max, param.type.min_open) == (low, high, low_open), (command, name)


def test_out_of_range_is_refused_by_caption_and_run_alike(tmp_path):
    from cli import main

    for args in (["caption", "x.jpg", "--model", "m"], ["run", "--input", "i", "--output", str(tmp_path / "o")]):
        r = CliRunner().invoke(main, [*args, "--top-p", "1.5"])
        assert r.exit_code == 2 and "--top-p" in r.output and "1.5" in r.output, r.output


def test_declared_defaults_are_the_presets():
    """The keyword defaults of the callers and the CLI's defaults are a GenerationConfig's (or a preset's) values."""
    import inspect

    from blip.model import BlipVQA
    from capfilt.predict import answer_file, caption_files

    def defaults(fn, names):
        return {n: inspect.signature(fn).parameters[n].default for n in names}

    lengths = ("max_length", "min_length")
    vqa = GenerationConfig.vqa()
    assert (vqa.num_beams, vqa.max_length, vqa.min_length, vqa.sample) == (3, 10, 1, False)  # the original's VQA
    for fn in (BlipVQA.answer, answer_file):
        assert defaults(fn, ("num_beams", *lengths)) == {n: getattr(vqa, n) for n in ("num_beams", *lengths)}
    assert defaults(caption_files, lengths) == {n: getattr(GenerationConfig(), n) for n in lengths}
    assert [_param("vqa", n).default for n in ("beam", *lengths)] == [3, 10, 1]
    assert [_param("caption", n).default for n in ("beam", "top_p", *lengths)] == [None, None, 20, 5]
    run = ("top_p", *lengths, "repetition_penalty")
    assert [_param("run", n).default for n in run] == [None] * 4  # not given: the YAML config's value
    nucleus = GenerationConfig.nucleus()
    assert [f"from the config, {getattr(nucleus, n)}]" in _param("run", n).help for n in run] == [True] * 4
