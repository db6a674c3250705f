"""Model configuration: one dataclass per tower plus the top-level BlipConfig, with named presets.

Defaults are the released BLIP checkpoints (ViT-B/16 at 384 px + BERT-base with cross-attention, `med_config.json`).
The special token ids default to those checkpoints' (bert-base-uncased + [DEC] + [ENC]); whoever pairs a config with
a tokenizer (`blip.load`, `blip.read_config`, training from scratch) overwrites them with `with_tokenizer`: the
tokenizer is the authority for the ids, the weights for the vocabulary size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from blip.image import CLIP_MEAN, CLIP_STD

FAMILIES = ("caption", "retrieval", "pretrain", "vqa")


@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6  # the original ViT; HF hub configs say 1e-5 (honoured when loading those)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    vocab_size: int = 30524  # bert-base-uncased (30522) + [DEC] + [ENC]
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    encoder_width: int = 768  # cross-attention key/value in-features of the image-grounded towers = vision width
    # special ids, from the tokenizer (these defaults: the released checkpoints' bert-base-uncased vocab)
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 30522  # [DEC]
    enc_token_id: int = 30523  # [ENC]


@dataclass
class BlipConfig:
    family: str = "caption"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size
    prompt: str = "a picture of "
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    queue_size: int = 57600
    momentum: float = 0.995
    alpha: float = 0.4
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        # the image-grounded towers' cross-attention reads the image tokens (the VQA decoder: see `answer_decoder`)
        self.text.encoder_width = self.vision.width
        for name, w, h in (
            ("vision", self.vision.width, self.vision.heads),
            ("text", self.text.hidden_size, self.text.heads),
        ):
            if w % h:
                raise ValueError(f"{name} width {w} is not divisible by its {h} heads")

    @property
    def answer_decoder(self) -> TextConfig:
        """The VQA answer decoder's text config: it cross-attends the question encoder's states, so its
        cross-attention in-features are the text width, not the vision width (they differ for ViT-L: 1024 vs 768)."""
        return replace(self.text, encoder_width=self.text.hidden_size)

    def with_tokenizer(self, tokenizer: Any) -> BlipConfig:
        """A copy whose special ids (pad, [CLS], [SEP], [DEC] = bos, [ENC]) are the tokenizer's.

        Raises ValueError when the tokenizer has more tokens than the vocabulary (the embedding rows) holds.
        """
        if len(tokenizer) > self.text.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {self.text.vocab_size}"
            )
        ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "enc_token_id": getattr(tokenizer, "enc_token_id", None),
        }
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)}")
        return replace(self, vision=replace(self.vision), text=replace(self.text, **ids))

    @classmethod
    def from_name(cls, name: str, family: str = "caption", **overrides: Any) -> BlipConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = PRESETS[name](family)
        vision = overrides.pop("vision", {})
        text = overrides.pop("text", {})
        return replace(cfg, vision=replace(cfg.vision, **vision), text=replace(cfg.text, **text), **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlipConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["text"] = TextConfig(**d.get("text", {}))
        return cls(**d)


def _tiny(family: str) -> BlipConfig:
    return BlipConfig(
        family=family,
        vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=2, heads=2),
        text=TextConfig(hidden_size=128, layers=2, heads=2, intermediate_size=512),
        embed_dim=64,
        queue_size=64,
    )


def _base(family: str) -> BlipConfig:
    # pretraining runs at 224 px; the captioning/retrieval checkpoints at 384, VQA at 480
    size = {"pretrain": 224, "vqa": 480}.get(family, 384)
    return BlipConfig(family=family, vision=VisionConfig(image_size=size))


def _large(family: str) -> BlipConfig:
    size = {"pretrain": 224, "vqa": 480}.get(family, 384)
    return BlipConfig(family=family, vision=VisionConfig(image_size=size, width=1024, layers=24, heads=16))


PRESETS = {"tiny": _tiny, "base": _base, "large": _large}
