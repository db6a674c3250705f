from __future__ import annotations

import pytest
import torch
import transformers

from blip.config import BlipConfig
from blip.convert import (
    config_from_hf,
    config_from_original,
    config_to_hf,
    detect_family,
    hf_to_original,
    interpolate_pos_embed,
    original_to_hf,
)
from blip.model import MODEL_CLASSES, BlipRetrieval

HF_CLASSES = {
    "caption": transformers.BlipForConditionalGeneration,
    "retrieval": transformers.BlipForImageTextRetrieval,
    "vqa": transformers.BlipForQuestionAnswering,
}


def _ours(family: str, **overrides) -> torch.nn.Module:
    return MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family, **overrides))


def _hf(cfg: BlipConfig) -> torch.nn.Module:
    d = config_to_hf(cfg)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=cfg.embed_dim
    )
    return HF_CLASSES[cfg.family](hf_cfg)


@pytest.mark.parametrize("family", ["caption", "retrieval", "vqa"])
def test_rename_table_covers_transformers_keys(family: str) -> None:
    ours = _ours(family)
    sd = ours.state_dict()
    hf_keys = set(_hf(ours.config).state_dict())
    assert set(original_to_hf(sd)) == hf_keys
    back = hf_to_original(original_to_hf(sd))
    dropped = {k for k in sd if k.endswith("position_ids") or k == "temp"}
    assert set(back) == set(sd) - dropped
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_tied_lm_head_keys_optional() -> None:
    sd = original_to_hf(_ours("caption").state_dict())
    without = {k: v for k, v in sd.items() if ".predictions.decoder." not in k}  # as save_pretrained writes
    back = hf_to_original(without)
    assert torch.equal(
        back["text_decoder.cls.predictions.decoder.weight"], sd["text_decoder.bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(back["text_decoder.cls.predictions.decoder.bias"], sd["text_decoder.cls.predictions.bias"])


def test_rename_errors_name_the_keys() -> None:
    with pytest.raises(ValueError, match="text_model.foo"):
        hf_to_original({"vision_model.post_layernorm.weight": torch.ones(2), "text_model.foo": torch.ones(1)})
    with pytest.raises(ValueError, match="visual_encoder_m"):
        original_to_hf(_ours("pretrain").state_dict())  # transformers has no BLIP pretraining class


def test_detect_family() -> None:
    for family in ("caption", "retrieval", "pretrain", "vqa"):
        assert detect_family(_ours(family).state_dict()) == family
    # the released retrieval checkpoints keep momentum encoders and queues but have no decoder
    momentum = BlipRetrieval(BlipConfig.from_name("tiny", family="retrieval"), momentum=True).state_dict()
    assert any(k.endswith("_queue") or "_m." in k for k in momentum)
    assert detect_family(momentum) == "retrieval"
    with pytest.raises(ValueError, match="visual_encoder"):
        detect_family({"foo.weight": torch.ones(1)})
    sd = {k: v for k, v in _ours("vqa").state_dict().items() if not k.startswith("text_decoder.")}
    with pytest.raises(ValueError, match="cannot tell"):
        detect_family(sd)


@pytest.mark.parametrize("family", ["caption", "retrieval", "pretrain", "vqa"])
def test_config_from_original_recovers_sizes(family: str) -> None:
    # a non-preset size: 80 px (5x5 patches), 3 ViT layers, 192-wide ViT (3 heads), 1 text layer
    ours = _ours(family, vision={"image_size": 80, "layers": 3, "width": 192, "heads": 3}, text={"layers": 1})
    got = config_from_original(ours.state_dict())
    want = ours.config
    assert got.family == family
    assert got.vision == want.vision
    assert got.text == want.text
    if family in ("retrieval", "pretrain"):
        assert got.embed_dim == want.embed_dim
    if family == "pretrain":
        assert got.queue_size == want.queue_size


def test_config_from_hf_honours_folder_values() -> None:
    d = {
        "architectures": ["BlipForImageTextRetrieval"],
        "model_type": "blip",
        "image_text_hidden_size": 256,
        "vision_config": {"hidden_size": 768, "image_size": 384, "num_hidden_layers": 12},  # eps left out
        "text_config": {"hidden_size": 768, "num_attention_heads": 12, "vocab_size": 30524},
    }
    cfg = config_from_hf(d)
    assert cfg.family == "retrieval"
    assert cfg.vision.layer_norm_eps == 1e-5  # BlipVisionConfig's default, not the original ViT's 1e-6
    assert cfg.text.heads == 12 and cfg.text.encoder_width == 768
    del d["text_config"]["num_attention_heads"]
    assert config_from_hf(d).text.heads == 8  # BlipTextConfig's default
    assert config_from_hf({**d, "architectures": None}, family="vqa").family == "vqa"
    with pytest.raises(ValueError, match="architecture"):
        config_from_hf({**d, "architectures": ["BlipModel"]})
    # and ours -> transformers -> ours is the identity on everything transformers knows about
    cfg = BlipConfig.from_name("tiny", family="caption")
    back = config_from_hf(config_to_hf(cfg))
    assert back.vision == cfg.vision
    assert (back.text.hidden_size, back.text.layers, back.text.heads, back.text.vocab_size) == (128, 2, 2, 30524)


def test_interpolate_pos_embed() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 16, 8, generator=g)  # 4x4 grid
    assert interpolate_pos_embed(pos, 16) is pos
    big = interpolate_pos_embed(pos, 36)  # 6x6
    assert big.shape == (1, 37, 8)
    assert torch.equal(big[:, 0], pos[:, 0])  # [CLS] position untouched
    const = torch.ones(1, 17, 8)
    torch.testing.assert_close(interpolate_pos_embed(const, 64), torch.ones(1, 65, 8))
    # down then up keeps a smooth (linear) field close to itself
    ramp = torch.linspace(0, 1, 8).repeat(8, 1).reshape(1, 64, 1)
    ramp = torch.cat([torch.zeros(1, 1, 1), ramp], 1)
    there_and_back = interpolate_pos_embed(interpolate_pos_embed(ramp, 144), 64)
    torch.testing.assert_close(there_and_back, ramp, atol=2e-2, rtol=0)
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(pos, 20)


def test_config_from_original_cross_attention_widths() -> None:
    """Image-grounded towers read the vision width, the VQA answer decoder the text width; anything else is named."""
    vqa = _ours("vqa", vision={"width": 192, "heads": 3})
    sd = vqa.state_dict()
    assert config_from_original(sd).vision.width == 192
    bad = dict(sd)
    key = "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"
    bad[key] = torch.zeros(128, 192)  # an answer decoder reading image tokens: not a BLIP VQA model
    with pytest.raises(
        ValueError, match=r"text_decoder\.bert\..*reads 192-d inputs, but its question states are 128-d"
    ):
        config_from_original(bad)
    cap = _ours("caption", vision={"width": 192, "heads": 3}).state_dict()
    cap["text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"] = torch.zeros(128, 128)
    cap["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"] = torch.zeros(128, 128)
    with pytest.raises(ValueError, match="reads 128-d inputs, but its image tokens are 192-d"):
        config_from_original(cap)
