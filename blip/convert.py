"""Checkpoint conversion as pure functions: Hugging Face `transformers` BLIP keys <-> original Salesforce BLIP keys.

Our modules carry the original names, so an original `.pth` needs no renaming; a `transformers` checkpoint
(BlipForConditionalGeneration / BlipForImageTextRetrieval / BlipForQuestionAnswering) goes through one table,
`WEIGHT_MAP` (reference: transformers' `convert_blip_original_pytorch_to_hf.py`). Sizes and the model family are
inferred from an original state dict's keys and shapes, or read from a transformers `config.json`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from blip.config import BlipConfig, TextConfig, VisionConfig

# (original module prefix, transformers module prefix); `{}` is a layer index; `None` = no counterpart (dropped).
# First match wins, so specific entries precede the identity prefixes below them.
WEIGHT_MAP: list[tuple[str, str | None]] = [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj", "vision_model.embeddings.patch_embedding"),
    ("visual_encoder.blocks.{}.norm1", "vision_model.encoder.layers.{}.layer_norm1"),
    ("visual_encoder.blocks.{}.attn.qkv", "vision_model.encoder.layers.{}.self_attn.qkv"),
    ("visual_encoder.blocks.{}.attn.proj", "vision_model.encoder.layers.{}.self_attn.projection"),
    ("visual_encoder.blocks.{}.norm2", "vision_model.encoder.layers.{}.layer_norm2"),
    ("visual_encoder.blocks.{}.mlp.fc1", "vision_model.encoder.layers.{}.mlp.fc1"),
    ("visual_encoder.blocks.{}.mlp.fc2", "vision_model.encoder.layers.{}.mlp.fc2"),
    ("visual_encoder.norm", "vision_model.post_layernorm"),
    # transformers keeps position_ids as a non-persistent buffer; the original checkpoints store them
    ("text_encoder.embeddings.position_ids", None),
    ("text_decoder.bert.embeddings.position_ids", None),
    ("text_encoder", "text_encoder"),
    ("text_decoder", "text_decoder"),
    ("vision_proj", "vision_proj"),
    ("text_proj", "text_proj"),
    ("itm_head", "itm_head"),
    ("temp", None),  # BlipForImageTextRetrieval has no ITC temperature
]

# LM head weights tied to the decoder's word embeddings / prediction bias; `save_pretrained` drops them
TIED_KEYS = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}
# pretraining / retrieval fine-tuning state that transformers has no place for
TRAINING_STATE = re.compile(r"^(\w+_m\.|\w+_m$|image_queue$|text_queue$|idx_queue$|queue_ptr$|ptr_queue$)")


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + r"(\..+)?$")


_ORIG_TO_HF = [(_compile(o), h) for o, h in WEIGHT_MAP]
_HF_TO_ORIG = [(_compile(h), o) for o, h in WEIGHT_MAP if h is not None]


def _rename(key: str, table: list[tuple[re.Pattern[str], str | None]]) -> tuple[bool, str | None]:
    for pattern, target in table:
        m = pattern.match(key)
        if m:
            if target is None:
                return True, None
            *layers, rest = m.groups()
            return True, target.format(*layers) + (rest or "")
    return False, None


def _raise_unknown(keys: list[str], what: str) -> None:
    shown = ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    raise ValueError(f"unknown keys for a {what} BLIP checkpoint: {shown}")


def hf_to_original(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers BLIP state dict -> original (and our) key names. Restores the tied LM-head keys if dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # old .bin files store these buffers; they are always arange
            continue
        known, new = _rename(key, _HF_TO_ORIG)
        if not known:
            unknown.append(key)
        elif new is not None:
            out[new] = value
    if unknown:
        _raise_unknown(unknown, "transformers")
    if "text_decoder.bert.embeddings.word_embeddings.weight" in out:
        for tied, source in TIED_KEYS.items():
            out.setdefault(tied, out[source])
    if "visual_encoder.cls_token" in out:  # (1, 1, D) in both; reshape guards against a flat (D,) export
        out["visual_encoder.cls_token"] = out["visual_encoder.cls_token"].reshape(1, 1, -1)
    return out


def original_to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original BLIP key names -> transformers names. Pretraining state (momentum copies, queues) has no
    transformers counterpart and raises; `temp` and `position_ids` are dropped."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        known, new = _rename(key, _ORIG_TO_HF)
        if not known:
            unknown.append(key)
        elif new is not None:
            out[new] = value
    if unknown:
        _raise_unknown(unknown, "original (transformers has no BLIP pretraining model, so no momentum/queue keys)")
    return out


def _count_layers(state_dict: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(idx) + 1 if idx else 0


def detect_family(state_dict: dict[str, Tensor]) -> str:
    """Model family from sentinel keys of an original-layout state dict."""
    has = {p: any(k.startswith(p) for k in state_dict) for p in ("visual_encoder.", "text_encoder.", "text_decoder.")}
    itm = "itm_head.weight" in state_dict
    training = any(TRAINING_STATE.match(k) for k in state_dict)
    cross = any(k.startswith("text_encoder.encoder.layer.0.crossattention.") for k in state_dict)
    if not has["visual_encoder."]:
        raise ValueError("not a BLIP checkpoint: no visual_encoder.* keys")
    if has["text_decoder."] and not has["text_encoder."]:
        return "caption"
    if has["text_encoder."] and itm:
        return "pretrain" if has["text_decoder."] and training else "retrieval"
    if has["text_encoder."] and has["text_decoder."] and cross:
        return "vqa"
    raise ValueError(
        "cannot tell the BLIP model family from the keys: expected text_decoder.* (caption), "
        "text_encoder.* + itm_head (retrieval), + text_decoder.* and queues (pretrain), "
        "or text_encoder.* with crossattention + text_decoder.* (vqa)"
    )


def config_from_original(state_dict: dict[str, Tensor], family: str | None = None) -> BlipConfig:
    """BlipConfig from an original-layout state dict: family from sentinel keys, sizes from shapes (head dim 64)."""
    family = family or detect_family(state_dict)
    sd = state_dict
    pos = sd["visual_encoder.pos_embed"]  # (1, 1+N, Dv)
    width = pos.shape[-1]
    patch = sd["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_count_layers(sd, "visual_encoder.blocks."),
        heads=width // 64,
        mlp_ratio=sd["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
    )
    t = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in sd else "text_decoder.bert."
    words = sd[t + "embeddings.word_embeddings.weight"]  # (V, H): the vocabulary size comes from the weights
    layers = _count_layers(sd, t + "encoder.layer.")
    text = TextConfig(
        vocab_size=words.shape[0],
        hidden_size=words.shape[1],
        layers=layers,
        heads=words.shape[1] // 64,
        intermediate_size=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0],
        encoder_width=width,
    )
    # cross-attention in-features: the image tokens (vision width) for the image-grounded towers; the question
    # encoder's states (text width) for the VQA answer decoder
    try:
        own_family = detect_family(sd)
    except ValueError:
        own_family = family
    for tower in ("text_encoder.", "text_decoder.bert."):
        got = _cross_width(sd, tower, layers)
        reads, want = (
            ("question states", text.hidden_size)
            if tower != "text_encoder." and own_family == "vqa"
            else ("image tokens", width)
        )
        if got is not None and got != want:
            raise ValueError(
                f"{tower}*.crossattention reads {got}-d inputs, but its {reads} are {want}-d "
                f"(vision width {width}, text width {text.hidden_size})"
            )
    extra: dict[str, Any] = {}
    if "vision_proj.weight" in sd:
        extra["embed_dim"] = sd["vision_proj.weight"].shape[0]
    if "image_queue" in sd:
        extra["queue_size"] = sd["image_queue"].shape[1]  # (E, Q)
    return BlipConfig(family=family, vision=vision, text=text, **extra)


def _cross_width(sd: dict[str, Tensor], prefix: str, layers: int) -> int | None:
    """In-features of a text tower's cross-attention keys (None: the tower has none in this state dict)."""
    for i in range(layers):
        w = sd.get(f"{prefix}encoder.layer.{i}.crossattention.self.key.weight")
        if w is not None:
            return w.shape[1]
    return None


_HF_ARCH_FAMILY = {
    "BlipForConditionalGeneration": "caption",
    "BlipForImageTextRetrieval": "retrieval",
    "BlipForQuestionAnswering": "vqa",
}
# transformers' defaults for fields a config.json may leave out (BlipTextConfig: 8 heads; BlipVisionConfig: eps 1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16, layer_norm_eps=1e-5)  # fmt: skip
_HF_TEXT_DEFAULTS = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=512, layer_norm_eps=1e-12, pad_token_id=0,
                         bos_token_id=30522, sep_token_id=102)  # fmt: skip


def config_from_hf(config_json: dict[str, Any], family: str | None = None) -> BlipConfig:
    """BlipConfig from a transformers BLIP `config.json`, honouring its values (eps, heads) over ours."""
    if family is None:
        archs = [a for a in config_json.get("architectures") or [] if a in _HF_ARCH_FAMILY]
        if not archs:
            raise ValueError(
                f"config.json names no known BLIP architecture ({config_json.get('architectures')}); expected one of "
                f"{', '.join(_HF_ARCH_FAMILY)} or pass family="
            )
        family = _HF_ARCH_FAMILY[archs[0]]
    v = {**_HF_VISION_DEFAULTS, **(config_json.get("vision_config") or {})}
    t = {**_HF_TEXT_DEFAULTS, **(config_json.get("text_config") or {})}
    image_size, patch = v["image_size"], v["patch_size"]
    if isinstance(image_size, (list, tuple)):
        image_size = image_size[0]
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    vision = VisionConfig(
        image_size=image_size,
        patch_size=patch,
        width=v["hidden_size"],
        layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"],
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        layer_norm_eps=v["layer_norm_eps"],
    )
    text = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        intermediate_size=t["intermediate_size"],
        max_position_embeddings=t["max_position_embeddings"],
        layer_norm_eps=t["layer_norm_eps"],
        encoder_width=v["hidden_size"],
        pad_token_id=t["pad_token_id"],
        bos_token_id=t["bos_token_id"],
        sep_token_id=t["sep_token_id"],
    )
    return BlipConfig(family=family, vision=vision, text=text, embed_dim=config_json.get("image_text_hidden_size", 256))


def interpolate_pos_embed(pos_embed: Tensor, num_patches_new: int) -> Tensor:
    """(1, 1+N, D) -> (1, 1+N', D): the [CLS] position kept, the patch grid resized bicubically (as the original)."""
    n_old = pos_embed.shape[1] - 1
    old, new = int(round(n_old**0.5)), int(round(num_patches_new**0.5))
    if old * old != n_old or new * new != num_patches_new:
        raise ValueError(f"position embeddings need square patch grids, got {n_old} -> {num_patches_new} patches")
    if old == new:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, new*new, D)
    return torch.cat([cls_pos, grid], dim=1)


_FAMILY_HF_ARCH = {v: k for k, v in _HF_ARCH_FAMILY.items()}


def config_to_hf(cfg: BlipConfig) -> dict[str, Any]:
    """Our config -> a transformers BLIP `config.json` dict (no dropout: parity and export are inference)."""
    if cfg.family not in _FAMILY_HF_ARCH:
        raise ValueError(f"transformers has no BLIP class for the {cfg.family!r} family")
    v, t = cfg.vision, cfg.text
    if cfg.family == "vqa" and v.width != t.hidden_size:
        raise ValueError(
            f"transformers' BlipForQuestionAnswering builds its answer decoder's cross-attention at the vision width "
            f"({v.width}), but the decoder reads the {t.hidden_size}-d question states: no transformers equivalent"
        )
    return {
        "model_type": "blip",
        "architectures": [_FAMILY_HF_ARCH[cfg.family]],
        "image_text_hidden_size": cfg.embed_dim,
        "vision_config": {
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
        },
        "text_config": {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "encoder_hidden_size": v.width,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_position_embeddings,
            "layer_norm_eps": t.layer_norm_eps,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "pad_token_id": t.pad_token_id,
            "bos_token_id": t.bos_token_id,
            "sep_token_id": t.sep_token_id,
        },
    }
