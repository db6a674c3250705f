from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers

import blip
from blip.checkpoint import CheckpointError
from blip.config import BlipConfig
from blip.convert import config_to_hf, interpolate_pos_embed, original_to_hf
from blip.model import MODEL_CLASSES, BlipRetrieval
from blip.tokenizer import build_tokenizer

FAMILIES = ["caption", "retrieval", "pretrain", "vqa"]


def _model(family: str, vocab_dir: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family, **overrides)).eval()
    model.tokenizer = build_tokenizer(vocab_dir)
    return model


def _pixels(size: int = 64) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))  # (B, 3, S, S)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@torch.no_grad()
def _outputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """A family's characteristic outputs, to compare two models on."""
    pixels = _pixels(model.config.vision.image_size)
    out = [model.encode_image(pixels)]
    if hasattr(model, "generate_ids"):
        out.append(model.generate_ids(pixels, sample=False, num_beams=2, max_length=8))
    if hasattr(model, "score"):
        out += [
            torch.tensor([v for row in x for v in row])
            for x in model.score(pixels, [["a red circle", "a dog"], ["two cats"]])
        ]
    if hasattr(model, "answer"):
        out.append(torch.tensor([len(a) for a in model.answer(pixels, ["what is it?", "how many?"], num_beams=2)]))
    return out


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_our_folder_round_trip(family: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    model = _model(family, tiny_vocab_dir)
    blip.save_pretrained(model, tmp_path / "m")
    loaded = blip.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training and loaded.tokenizer.enc_token_id == 30523
    assert _same_weights(model, loaded)
    _assert_same_outputs(model, loaded)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["wrapped", "bare", "ddp"])
def test_original_pth(family: str, layout: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    model = _model(family, tiny_vocab_dir)
    sd = model.state_dict()
    obj = {
        "wrapped": {"model": sd, "epoch": 3},  # what the original train scripts save (minus the optimizer)
        "bare": sd,
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[layout]
    torch.save(obj, tmp_path / "model.pth")
    loaded = blip.load(tmp_path / "model.pth", tokenizer_path=tiny_vocab_dir)
    assert type(loaded) is type(model)
    assert loaded.config.vision == model.config.vision and loaded.config.text == model.config.text
    assert _same_weights(model, loaded)
    _assert_same_outputs(model, loaded)


def test_original_retrieval_with_training_state(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    """The released retrieval checkpoints carry momentum encoders and queues; inference drops them explicitly."""
    torch.manual_seed(0)
    full = BlipRetrieval(BlipConfig.from_name("tiny", family="retrieval"), momentum=True)
    torch.save({"model": full.state_dict()}, tmp_path / "model_base_retrieval_coco.pth")
    loaded = blip.load(tmp_path / "model_base_retrieval_coco.pth", tokenizer_path=tiny_vocab_dir)
    assert isinstance(loaded, BlipRetrieval)
    own = loaded.state_dict()
    assert not any("_m." in k for k in own)
    assert all(torch.equal(own[k], v) for k, v in full.state_dict().items() if k in own)


def test_pretrained_checkpoint_as_another_family(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    """As the original fine-tuning does: a pretraining checkpoint loaded as a captioner / filter."""
    pre = _model("pretrain", tiny_vocab_dir)
    torch.save({"model": pre.state_dict()}, tmp_path / "model_base.pth")
    shutil.copytree(tiny_vocab_dir, tmp_path / "tokenizer")  # found next to the .pth
    cap = blip.load(tmp_path / "model_base.pth", family="caption")
    ret = blip.load(tmp_path / "model_base.pth", family="retrieval")
    assert type(cap).__name__ == "BlipCaptioner" and type(ret).__name__ == "BlipRetrieval"
    psd = pre.state_dict()
    assert all(torch.equal(v, psd[k]) for k, v in cap.state_dict().items())
    assert all(torch.equal(v, psd[k]) for k, v in ret.state_dict().items())
    # without asking for another family, a pretraining checkpoint loads as what it is
    assert type(blip.load(tmp_path / "model_base.pth")).__name__ == "BlipPretrain"


def test_pos_embed_resized_on_load(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    model = _model("caption", tiny_vocab_dir)  # 64 px: 4x4 patches
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    big = blip.load(tmp_path / "m.pth", tokenizer_path=tiny_vocab_dir, image_size=96)  # 6x6 patches
    assert big.config.vision.image_size == 96
    want = interpolate_pos_embed(model.state_dict()["visual_encoder.pos_embed"], 36)
    assert torch.equal(big.visual_encoder.pos_embed, want)
    assert big.encode_image(_pixels(96)).shape == (2, 37, 128)
    # a checkpoint at another resolution than the config asks for: our folder at 96 px, loaded back at 64
    blip.save_pretrained(big, tmp_path / "big")
    small = blip.load(tmp_path / "big", image_size=64)
    assert small.visual_encoder.pos_embed.shape == (1, 17, 128)


@pytest.mark.parametrize("family", ["caption", "retrieval", "vqa"])
def test_ours_to_transformers_folder_and_back(family: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    model = _model(family, tiny_vocab_dir)
    d = config_to_hf(model.config)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=model.config.embed_dim
    )
    hf = getattr(transformers, d["architectures"][0])(hf_cfg)
    hf.load_state_dict(original_to_hf(model.state_dict()), strict=True)
    hf.save_pretrained(tmp_path / "hf")
    model.tokenizer.save_pretrained(tmp_path / "hf")
    loaded = blip.load(tmp_path / "hf")
    assert type(loaded) is type(model)
    own = loaded.state_dict()
    # transformers has no ITC temperature: the loaded filter keeps its init value
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items() if k != "temp")
    _assert_same_outputs(model, loaded)


# -- errors: one clear message each -----------------------------------------------------------------------------------


def test_garbage_and_unsafe_files(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*garbage\.pth"):
        blip.load(tmp_path / "garbage.pth", tokenizer_path=tiny_vocab_dir)
    (tmp_path / "garbage.safetensors").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        blip.load(tmp_path / "garbage.safetensors", tokenizer_path=tiny_vocab_dir)
    # a pickle with an arbitrary object is refused, never executed
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": shutil.rmtree}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        blip.load(tmp_path / "evil.pth", tokenizer_path=tiny_vocab_dir)
    torch.save({"model": {"step": 3}}, tmp_path / "notensors.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        blip.load(tmp_path / "notensors.pth", tokenizer_path=tiny_vocab_dir)


def test_unknown_and_mismatched_keys(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    torch.save({"model": {"encoder.layers.0.weight": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"other\.pth: unknown checkpoint layout.*visual_encoder"):
        blip.load(tmp_path / "other.pth", tokenizer_path=tiny_vocab_dir)
    sd = _model("caption", tiny_vocab_dir).state_dict()
    torch.save({"model": {**sd, "text_decoder.extra_head.weight": torch.ones(2)}}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="unexpected 1 keys.*extra_head"):
        blip.load(tmp_path / "extra.pth", tokenizer_path=tiny_vocab_dir)
    missing = {k: v for k, v in sd.items() if "blocks.1." not in k}  # a ViT block short
    missing["visual_encoder.blocks.1.norm1.weight"] = sd["visual_encoder.blocks.1.norm1.weight"]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing .* keys"):
        blip.load(tmp_path / "missing.pth", tokenizer_path=tiny_vocab_dir)
    ret = _model("retrieval", tiny_vocab_dir).state_dict()
    torch.save({k: v for k, v in ret.items() if k != "temp"}, tmp_path / "notemp.pth")  # only transformers lacks it
    with pytest.raises(CheckpointError, match="missing 1 keys.*temp"):
        blip.load(tmp_path / "notemp.pth", tokenizer_path=tiny_vocab_dir)
    bad_shape = dict(sd)
    bad_shape["text_decoder.cls.predictions.bias"] = torch.zeros(7)
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match="shape mismatch.*predictions.bias"):
        blip.load(tmp_path / "shape.pth", tokenizer_path=tiny_vocab_dir)


def test_missing_path_tokenizer_and_hub(tiny_vocab_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        blip.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        blip.load("./models/caption")
    torch.save({"model": _model("caption", tiny_vocab_dir).state_dict()}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="no tokenizer.*tokenizer_path"):
        blip.load(tmp_path / "m.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        blip.load(tmp_path / "empty")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"'Salesforce/blip-capfilt-test'.*pass the local folder or \.pth"):
        blip.load("Salesforce/blip-capfilt-test")


def test_transformers_bin_and_sharded_folders(tiny_vocab_dir: Path, tmp_path: Path) -> None:
    """Older hub folders: pytorch_model.bin (with position_ids buffers and tied keys); sharded safetensors."""
    from safetensors.torch import save_file

    model = _model("retrieval", tiny_vocab_dir)
    hf_sd = original_to_hf(model.state_dict())
    hf_sd["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]  # old .bin files kept this buffer
    d = config_to_hf(model.config)
    for name in ("bin", "sharded"):
        folder = tmp_path / name
        model.tokenizer.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(d))
        if name == "bin":
            torch.save(hf_sd, folder / "pytorch_model.bin")
        else:
            keys = sorted(hf_sd)
            half = len(keys) // 2
            index = {}
            for i, part in enumerate((keys[:half], keys[half:])):
                shard = f"model-0000{i + 1}-of-00002.safetensors"
                save_file({k: hf_sd[k].contiguous() for k in part}, str(folder / shard))
                index.update(dict.fromkeys(part, shard))
            (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
        loaded = blip.load(folder)
        own = loaded.state_dict()
        assert all(torch.equal(own[k], v) for k, v in model.state_dict().items() if k != "temp"), name
