"""BLIP (arXiv 2201.12086), top to bottom: ViT, BERT with the three modes, heads, the four model families.

Module names are the original Salesforce checkpoint names (`models/vit.py`, `models/med.py`, `models/blip*.py`), so an
original `.pth` state dict loads key for key. Attention is PyTorch SDPA throughout.

Shapes: B batch, N image patches, L = 1 + N image tokens, T text tokens, S key length, H text width, Dv vision width,
E ITC embedding size, nh heads, hd head size, V vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip.config import BlipConfig, TextConfig, VisionConfig
from blip.generate import generate_ids as _generate_ids
from blip.generation import GenerationConfig

_VQA = GenerationConfig.vqa()  # BlipVQA.answer's defaults: the original VQA's generated answers

# ----------------------------------------------------------------------------------------------------------------------
# Vision: ViT-B/16 or ViT-L/16, pre-norm, [CLS] token, learned position embeddings


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's DropPath)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, 3, S, S) -> (B, N, Dv)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.layers).tolist()  # stochastic depth decay rule
        self.blocks = nn.ModuleList([Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)  # (B, N, Dv)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, L, Dv)
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)  # (B, L, Dv)


# ----------------------------------------------------------------------------------------------------------------------
# Text: BERT-base with cross-attention in every layer (`med.py`). Three modes:
#   unimodal encoder  ([CLS] first, no image)           -> ITC
#   image-grounded encoder ([ENC] first, cross-attn)    -> ITM
#   image-grounded decoder ([DEC] first, causal)        -> LM
# Decoding writes self-attention keys/values into a static cache preallocated to max_length (fixed shapes, so a step
# can be captured); cross-attention keys/values are computed once per image.

KV = tuple[torch.Tensor, torch.Tensor]  # (B, nh, S, hd) each


class BertEmbeddings(nn.Module):
    """Word + position embeddings, LayerNorm; no token-type embeddings (as BLIP)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T); position_ids (T,) default 0..T-1 (a decoding step passes its cache positions)."""
        pos = self.position_ids[:, : input_ids.shape[1]] if position_ids is None else position_ids
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)  # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, is_cross: bool):
        super().__init__()
        H = cfg.hidden_size
        kv_in = cfg.encoder_width if is_cross else H
        self.num_heads = cfg.heads
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(kv_in, H)
        self.value = nn.Linear(kv_in, H)
        self.dropout_p = cfg.attention_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        return x.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2)  # (B, nh, T, hd)

    def kv(self, x: torch.Tensor) -> KV:
        return self._heads(self.key(x)), self._heads(self.value(x))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv: KV | None = None,
        cache: KV | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        q = self._heads(self.query(x))  # (B, nh, T, hd)
        if kv is None:  # self-attention
            k, v = self.kv(x)  # (B, nh, T, hd)
            if cache is not None:  # static cache (B, nh, T_max, hd): write these T positions in place, attend to all
                cache[0].index_copy_(2, cache_position, k)
                cache[1].index_copy_(2, cache_position, v)
                k, v = cache  # (B, nh, T_max, hd); `mask` hides the positions not written yet
        else:  # cross-attention on precomputed image keys/values
            k, v = kv
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hd)
        B, _, T, _ = y.shape
        return y.transpose(1, 2).reshape(B, T, -1), (k, v)


class BertSelfOutput(nn.Module):
    """Projection + residual + post-LayerNorm (BERT is post-norm); also the FFN output (`BertOutput`)."""

    def __init__(self, cfg: TextConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: TextConfig, is_cross: bool = False):
        super().__init__()
        self.self = BertSelfAttention(cfg, is_cross)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.crossattention = BertAttention(cfg, is_cross=True)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, in_features=cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cross_kv: KV | None = None,
        cross_mask: torch.Tensor | None = None,
        cache: KV | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KV]:
        a, present = self.attention.self(x, mask, cache=cache, cache_position=cache_position)
        x = self.attention.output(a, x)
        if cross_kv is not None:  # image-grounded modes; the unimodal encoder skips this
            c, _ = self.crossattention.self(x, cross_mask, kv=cross_kv)
            x = self.crossattention.output(c, x)
        return self.output(self.intermediate(x), x), present


class BertEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.layers)])


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `allowed` (..., T, S) -> additive float mask (0 where allowed, dtype-min elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


class BertModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def cross_kv(self, encoder_hidden_states: torch.Tensor) -> list[KV]:
        """Cross-attention keys/values of every layer, computed once per image: (B, L, Dv) -> [(B, nh, L, hd)] * 2."""
        return [layer.crossattention.self.kv(encoder_hidden_states) for layer in self.encoder.layer]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        causal: bool = False,
        cross_kv: list[KV] | None = None,
        kv_cache: list[KV] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        """input_ids (B, T), attention_mask (B, T) -> hidden states (B, T, H), self-attention keys/values per layer.

        Decoding step: `kv_cache` (per layer, (B, nh, T_max, hd) each) and `cache_position` (T,) = the positions of
        input_ids; their keys/values are written into the cache in place and each query attends to the cache up to its
        own position (a boolean mask (T, T_max)), so every step has the same shapes. `attention_mask` must be None.
        """
        B, T = input_ids.shape
        x = self.embeddings(input_ids, cache_position)
        dtype = x.dtype

        mask = None
        if kv_cache is not None:
            T_max = kv_cache[0][0].shape[2]
            mask = torch.arange(T_max, device=x.device)[None, :] <= cache_position[:, None]  # (T, T_max)
        elif attention_mask is not None or (causal and T > 1):
            allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device)
            if attention_mask is not None:
                allowed = allowed & attention_mask[:, None, None, :].bool()
            if causal:
                allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = _additive_mask(allowed, dtype)  # (B, 1, T, T)

        if cross_kv is None and encoder_hidden_states is not None:
            cross_kv = self.cross_kv(encoder_hidden_states.to(dtype))
        cross_mask = None
        # a decoding step builds the mask without looking at its values (no host sync inside a captured step)
        if cross_kv is not None and encoder_attention_mask is not None:
            if kv_cache is not None or not bool(encoder_attention_mask.all()):
                cross_mask = _additive_mask(encoder_attention_mask[:, None, None, :].bool(), dtype)  # (B, 1, 1, L)

        presents = []
        for i, layer in enumerate(self.encoder.layer):
            cache = kv_cache[i] if kv_cache is not None else None
            ckv = cross_kv[i] if cross_kv is not None else None
            x, present = layer(x, mask, ckv, cross_mask, cache, cache_position)
            presents.append(present)
        return x, presents


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.bias = self.bias  # one Parameter under both checkpoint keys, as the original

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))  # (B, T, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)


class BertLMHeadModel(nn.Module):
    """The image-grounded decoder: causal BERT + LM head tied to its word embeddings."""

    def __init__(self, cfg: TextConfig, label_smoothing: float = 0.1):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = BertOnlyMLMHead(cfg)
        self.label_smoothing = label_smoothing
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_kv: list[KV] | None = None,
        kv_cache: list[KV] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        h, presents = self.bert(
            input_ids,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            causal=True,
            cross_kv=cross_kv,
            kv_cache=kv_cache,
            cache_position=cache_position,
        )
        return self.cls.predictions(h), presents  # (B, T, V)

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy with label smoothing; labels -100 are ignored. 'none' sums per sample."""
        shifted = logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:]
        loss = F.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction=reduction,
            label_smoothing=self.label_smoothing,
        )
        if reduction == "none":
            loss = loss.view(targets.shape).sum(1)
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# Model families


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Gather a tensor from every DDP rank (no gradient), as the original queue update; identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


class BlipBase(nn.Module):
    """What every family shares: config, tokenizer, image encoding, tokenisation helpers."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.config = config
        self.tokenizer = None  # attached by blip.load / the caller; kept out of the state dict

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer attached (set model.tokenizer or load with blip.load)")
        return self.tokenizer

    def tokenize(self, texts: list[str], max_length: int = 35) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> ([CLS] ... [SEP] ids (B, T), attention mask (B, T)), padded to the longest."""
        tok = self._need_tokenizer()(
            texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return tok.input_ids.to(self.device), tok.attention_mask.to(self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_encoder(pixel_values.to(self.dtype))  # (B, L, Dv)

    @torch.no_grad()
    def extract_features(
        self, pixel_values: torch.Tensor | None = None, texts: list[str] | None = None, mode: str = "multimodal"
    ) -> torch.Tensor:
        """Last hidden states, as the original `blip_feature_extractor` (BLIP_Base.forward):

        - "image": the ViT's tokens (B, L, Dv) ([CLS] first; `vision_proj` of token 0 is the ITC image embedding);
        - "text": the unimodal text encoder, [CLS] first, no image (B, T, H);
        - "multimodal": the image-grounded encoder, [ENC] first, cross-attending every image token (B, T, H).
        Texts are padded to the longest of the batch (the original takes one text, or texts of equal length).
        """
        if mode not in ("image", "text", "multimodal"):
            raise ValueError(f"mode must be 'image', 'text' or 'multimodal', got {mode!r}")
        if mode != "text" and pixel_values is None:
            raise ValueError(f"mode {mode!r} needs pixel_values")
        if mode == "image":
            return self.encode_image(pixel_values)
        if texts is None:
            raise ValueError(f"mode {mode!r} needs texts")
        if not hasattr(self, "text_encoder"):
            raise ValueError(f"a {self.config.family} model has no text encoder: {mode!r} features need a "
                             "retrieval, pretrain or vqa model")  # fmt: skip
        ids, mask = self.tokenize(texts, max_length=self.config.text.max_position_embeddings)
        if mode == "text":
            return self.text_encoder(ids, mask)[0]
        ids[:, 0] = self.config.text.enc_token_id
        return self.text_encoder(ids, mask, self.encode_image(pixel_values))[0]


class CaptionMixin:
    """Captioning with `text_decoder` (BlipCaptioner, BlipPretrain)."""

    @property
    def prompt_length(self) -> int:
        # "[DEC] a picture of" -> 4 tokens at base: the prompt's ids without [SEP]
        return len(self._need_tokenizer()(self.config.prompt).input_ids) - 1

    def logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder logits (B, T, V); input_ids start with [DEC]."""
        image_embeds = self.encode_image(pixel_values)
        return self.text_decoder(input_ids, attention_mask, image_embeds)[0]

    def caption_loss(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0
    ) -> torch.Tensor:
        """LM loss of `[CLS]`-first ids (replaced by [DEC]); pads and the first `prompt_length` tokens not predicted."""
        ids = input_ids.clone()
        ids[:, 0] = self.config.text.bos_token_id
        labels = ids.masked_fill(ids == self.config.text.pad_token_id, -100)
        labels[:, :prompt_length] = -100
        logits, _ = self.text_decoder(ids, attention_mask, image_embeds)
        return self.text_decoder.lm_loss(logits, labels)

    def prompt_ids(self, batch_size: int) -> torch.Tensor:
        ids = self._need_tokenizer()([self.config.prompt] * batch_size, return_tensors="pt").input_ids
        ids[:, 0] = self.config.text.bos_token_id
        return ids[:, :-1].to(self.device)  # drop [SEP]: (B, prompt_length)

    @torch.no_grad()
    def generate_ids(
        self,
        pixel_values: torch.Tensor,
        generation: GenerationConfig | None = None,
        *,
        num_captions: int = 1,
        seeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        beam_length: str = "original",
        use_cache: bool = True,
        compile: str = "auto",
        **options: Any,
    ) -> torch.Tensor:
        """Token ids (B * num_captions, T) including [DEC] + prompt; lengths count the prompt (as the original).

        Decoding options: `generation` (default GenerationConfig(): the original's beam search) with `options` (its
        field names: sample=True, top_p=0.9, max_length=20, ...) replacing some. Sampling: `seeds` (B,) int64, one
        per image, makes an image's captions independent of its batch; otherwise seeds are drawn from `generator`
        (or the global one). `compile`: "auto" (on for CUDA) | "off" | "on", the decode step under torch.compile.
        See blip.generate.generate_ids.
        """
        image_embeds = self.encode_image(pixel_values)
        prompt = self.prompt_ids(image_embeds.shape[0])
        return _generate_ids(
            self.text_decoder,
            image_embeds,
            prompt,
            eos_token_id=self.config.text.sep_token_id,
            pad_token_id=self.config.text.pad_token_id,
            generation=generation,
            num_return=num_captions,
            seeds=seeds,
            generator=generator,
            beam_length=beam_length,
            use_cache=use_cache,
            compile=compile,
            **options,
        )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        num_captions: int = 1,
        generation: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> list[list[str]]:
        """Captions per image (prompt stripped), `num_captions` each. See `generate_ids` for the arguments."""
        options = {k: kwargs.pop(k) for k in GenerationConfig.pick(kwargs)}
        g = replace(generation or GenerationConfig(), **options)
        if not g.sample and num_captions != 1:
            raise ValueError("beam search returns one caption per image; use sample=True for several")
        ids = self.generate_ids(pixel_values, g, num_captions=num_captions, **kwargs)
        texts = self._need_tokenizer().batch_decode(ids, skip_special_tokens=True)
        n = len(self.config.prompt)  # the original strips the prompt by characters
        return [[t[n:].strip() for t in texts[i : i + num_captions]] for i in range(0, len(texts), num_captions)]


class FilterMixin:
    """ITC embeddings and ITM with `text_encoder` (BlipRetrieval, BlipPretrain)."""

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)  # (B, E)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.text_encoder(input_ids, attention_mask)  # unimodal mode: no image
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)  # (B, E)

    def itm_logits(
        self,
        image_embeds: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cross_kv: list[KV] | None = None,
        first_token: str = "enc",
    ) -> torch.Tensor:
        """ITM logits (B, 2) of the image-grounded encoder.

        first_token: "enc" writes [ENC] first, as the retrieval checkpoints were trained (`blip_retrieval.py`);
        "cls" keeps [CLS], as the original demo's `blip_itm.py` and the transformers port compute it.
        With precomputed `cross_kv` (one row per text) the image embeddings are not needed: pass None.
        """
        ids = input_ids.clone()
        ids[:, 0] = self._first_token_id(first_token)
        h, _ = self.text_encoder(ids, attention_mask, image_embeds, cross_kv=cross_kv)
        return self.itm_head(h[:, 0])

    def _first_token_id(self, first_token: str) -> int:
        if first_token not in ("enc", "cls"):
            raise ValueError(f"first_token must be 'enc' or 'cls', got {first_token!r}")
        return self.config.text.enc_token_id if first_token == "enc" else self.config.text.cls_token_id

    @torch.no_grad()
    def score(
        self, pixel_values: torch.Tensor, texts: list[list[str]], max_length: int = 35, first_token: str = "enc"
    ) -> tuple[list[list[float]], list[list[float]]]:
        """texts[i] scored against image i -> (ITM match probability, ITC cosine similarity), shaped like texts.

        first_token: the ITM input's first token, "enc" (default, as trained) or "cls" (as `blip_itm.py`).
        """
        image_embeds = self.encode_image(pixel_values)  # (B, L, Dv)
        return self.score_embeds(image_embeds, texts, max_length, first_token)

    @torch.no_grad()
    def score_embeds(
        self, image_embeds: torch.Tensor, texts: list[list[str]], max_length: int = 35, first_token: str = "enc"
    ) -> tuple[list[list[float]], list[list[float]]]:
        owner = [i for i, ts in enumerate(texts) for _ in ts]
        flat = [t for ts in texts for t in ts]
        if not flat:
            return [[] for _ in texts], [[] for _ in texts]
        idx = torch.tensor(owner, device=image_embeds.device)
        ids, mask = self.tokenize(flat, max_length)
        itc = (self.image_feat(image_embeds)[idx] * self.text_feat(ids, mask)).sum(-1)  # (M,)
        # cross-attention K/V once per image, then gathered per text
        cross = [(k[idx], v[idx]) for k, v in self.text_encoder.cross_kv(image_embeds)]
        itm = self.itm_logits(None, ids, mask, cross, first_token).float().softmax(-1)[:, 1]  # (M,)
        itm_l, itc_l = itm.tolist(), itc.float().tolist()
        out_itm, out_itc, j = [], [], 0
        for ts in texts:
            out_itm.append(itm_l[j : j + len(ts)])
            out_itc.append(itc_l[j : j + len(ts)])
            j += len(ts)
        return out_itm, out_itc


def _hard_negatives(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row drawn from `weights` (B, B); rows with no admissible candidate fall back to uniform."""
    empty = weights.sum(1) <= 0
    if empty.any():
        weights = weights.clone()
        weights[empty] = 1.0
    return torch.multinomial(weights.float(), 1, generator=generator).squeeze(1)


class ContrastiveMixin(FilterMixin):
    """Momentum encoders, feature queues, ITC with momentum distillation, ITM with hard negatives."""

    def _init_towers(self) -> None:
        """The filter's towers: ViT and the text encoder (unimodal for ITC, image-grounded for ITM)."""
        self.visual_encoder = VisionTransformer(self.config.vision)
        self.text_encoder = BertModel(self.config.text)

    def _init_heads(self) -> None:
        """ITC projections (-> E, L2-normalised by the caller), the learnable temperature and the ITM head."""
        cfg = self.config
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden_size, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))

    @torch.no_grad()
    def _dequeue_and_enqueue(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor | None = None
    ) -> None:
        """Momentum features of the global batch (all DDP ranks) into the queues; image ids too when fine-tuning."""
        # the pointer's name differs between the original pretraining and retrieval checkpoints: both are kept
        ptr_buf = self.ptr_queue if hasattr(self, "ptr_queue") else self.queue_ptr
        image_feats, text_feats = concat_all_gather(image_feat), concat_all_gather(text_feat)
        n, ptr = image_feats.shape[0], int(ptr_buf)
        if self.config.queue_size % n:
            raise ValueError(f"queue size {self.config.queue_size} must be divisible by the global batch {n}")
        self.image_queue[:, ptr : ptr + n] = image_feats.t()
        self.text_queue[:, ptr : ptr + n] = text_feats.t()
        if idx is not None:
            self.idx_queue[:, ptr : ptr + n] = concat_all_gather(idx).view(1, -1)
        ptr_buf[0] = (ptr + n) % self.config.queue_size

    def _init_momentum(self) -> None:
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for m in (self.visual_encoder_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m):
            m.requires_grad_(False)
        E, Q = self.config.embed_dim, self.config.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(E, Q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(E, Q), dim=0))

    def _model_pairs(self):
        return [
            (self.visual_encoder, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Momentum copies := online weights (done at init, and after loading weights)."""
        for model, model_m in self._model_pairs():
            for p, p_m in zip(model.parameters(), model_m.parameters()):
                p_m.data.copy_(p.data)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for model, model_m in self._model_pairs():
            for p, p_m in zip(model.parameters(), model_m.parameters()):
                p_m.data.mul_(m).add_(p.data, alpha=1 - m)

    def _itc(
        self,
        pixel_values: torch.Tensor,
        image_feat: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_feat: torch.Tensor,
        alpha: float,
        pos: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC with momentum distillation. pos (B, B + Q): positive mask. Returns loss and the momentum features."""
        with torch.no_grad():
            self._momentum_update()
            image_feat_m = F.normalize(self.vision_proj_m(self.visual_encoder_m(pixel_values)[:, 0]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)  # (E, B + Q)
            h_m, _ = self.text_encoder_m(input_ids, attention_mask)
            text_feat_m = F.normalize(self.text_proj_m(h_m[:, 0]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)  # (E, B + Q)
            targets = pos / pos.sum(1, keepdim=True)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_feat_all / self.temp, dim=1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_feat_all / self.temp, dim=1) + (1 - alpha) * targets
        sim_i2t = image_feat @ text_feat_all / self.temp  # (B, B + Q)
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * i2t_targets).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * t2i_targets).sum(1).mean()
        return (loss_i2t + loss_t2i) / 2, image_feat_m, text_feat_m

    def _itm(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        weights_i2t: torch.Tensor,
        weights_t2i: torch.Tensor,
    ) -> torch.Tensor:
        """ITM on B positives, B (negative image, text) and B (image, negative text) pairs, negatives drawn from ITC."""
        B = image_embeds.shape[0]
        ids = input_ids.clone()
        ids[:, 0] = self.config.text.enc_token_id
        neg_img = _hard_negatives(weights_t2i)  # a negative image per text
        neg_txt = _hard_negatives(weights_i2t)  # a negative text per image
        ids_all = torch.cat([ids, ids, ids[neg_txt]], dim=0)  # (3B, T)
        mask_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_txt]], dim=0)
        image_all = torch.cat([image_embeds, image_embeds[neg_img], image_embeds], dim=0)  # (3B, L, Dv)
        h, _ = self.text_encoder(ids_all, mask_all, image_all)
        logits = self.itm_head(h[:, 0])  # (3B, 2)
        labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)


class BlipCaptioner(BlipBase, CaptionMixin):
    """`blip_decoder`: ViT + image-grounded decoder (the CapFilt captioner)."""

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_decoder = BertLMHeadModel(config.text, config.label_smoothing)
        init_weights(self)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """LM loss; input_ids are the tokenized `prompt + caption` ([CLS] first), the prompt tokens are not predicted."""
        return self.caption_loss(self.encode_image(pixel_values), input_ids, attention_mask, self.prompt_length)


class BlipRetrieval(BlipBase, ContrastiveMixin):
    """`blip_retrieval` / `blip_itm`: ViT + text encoder + ITC projections + ITM head (the CapFilt filter)."""

    def __init__(self, config: BlipConfig, momentum: bool = False):
        super().__init__(config)
        self._init_towers()
        self._init_heads()
        self.momentum = momentum
        if momentum:  # fine-tuning state of the original retrieval checkpoints
            self._init_momentum()
            self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100))
            self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        init_weights(self)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor,
        alpha: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fine-tuning losses; idx (B,) image ids: texts of the same image are positives, never negatives."""
        if not self.momentum:
            raise RuntimeError("training the filter needs BlipRetrieval(config, momentum=True)")
        alpha = self.config.alpha if alpha is None else alpha
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.encode_image(pixel_values)
        image_feat = self.image_feat(image_embeds)
        text_feat = self.text_feat(input_ids, attention_mask)

        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.t(), self.idx_queue.clone().detach()], dim=1)  # (1, B + Q)
        pos = torch.eq(idx, idx_all).float()  # (B, B + Q)
        loss_itc, image_feat_m, text_feat_m = self._itc(
            pixel_values.to(self.dtype), image_feat, input_ids, attention_mask, text_feat, alpha, pos
        )
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx.view(-1))

        with torch.no_grad():
            same = torch.eq(idx, idx.t())
            weights_i2t = F.softmax(image_feat @ text_feat.t() / self.temp, dim=1).masked_fill(same, 0)
            weights_t2i = F.softmax(text_feat @ image_feat.t() / self.temp, dim=1).masked_fill(same, 0)
        loss_itm = self._itm(image_embeds, input_ids, attention_mask, weights_i2t, weights_t2i)
        return {"loss_itc": loss_itc, "loss_itm": loss_itm}


class BlipPretrain(BlipBase, ContrastiveMixin, CaptionMixin):
    """`blip_pretrain`: ITC + ITM + LM. The decoder shares everything with the encoder except self-attention."""

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self._init_towers()
        self.text_decoder = BertLMHeadModel(config.text, config.label_smoothing)
        self.tie_encoder_decoder()
        self._init_heads()
        self._init_momentum()
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        init_weights(self)

    def tie_encoder_decoder(self) -> None:
        """Share embeddings, cross-attention and FFN modules (the same Parameters); self-attention stays separate."""
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
            ld.crossattention, ld.intermediate, ld.output = le.crossattention, le.intermediate, le.output
        self.text_decoder.tie_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float | None = None,
        inbatch_itc: bool = False,
        random_itm_negatives: bool = False,
    ) -> dict[str, torch.Tensor]:
        """input_ids: [CLS]-first tokenized captions (the original pads to 30 tokens).

        `inbatch_itc=True` replaces ITC with momentum distillation and queues by plain in-batch ITC (online image vs
        online text, CLIP-style), leaving the momentum encoders and queues alone. BLIP starts from an ImageNet ViT and
        BERT, whose features already tell samples apart; from scratch they do not, and the momentum form of ITC then
        has no gradient that separates samples (the features collapse). A short in-batch phase stands in for that
        initialisation; call `copy_params()` when switching to the momentum form.

        `random_itm_negatives=True` draws ITM's negatives uniformly from the batch instead of by ITC similarity. Hard
        negatives often differ from the positive in one object or attribute; on them a from-scratch image-grounded
        encoder stayed at the 1/3 prior for a whole (tiny, 375-step) pretraining. Easy negatives first stand in, again,
        for the pretrained BERT the original starts from.
        """
        alpha = self.config.alpha if alpha is None else alpha
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        pixel_values = pixel_values.to(self.dtype)
        image_embeds = self.encode_image(pixel_values)  # (B, L, Dv)
        image_feat = self.image_feat(image_embeds)
        text_feat = self.text_feat(input_ids, attention_mask)

        B = image_embeds.shape[0]
        if inbatch_itc:
            sim = image_feat @ text_feat.t() / self.temp  # (B, B)
            labels = torch.arange(B, device=sim.device)
            loss_itc = (F.cross_entropy(sim.float(), labels) + F.cross_entropy(sim.t().float(), labels)) / 2
            image_feat_m, text_feat_m = image_feat.detach(), text_feat.detach()
        else:
            pos = torch.zeros(B, B + self.config.queue_size, device=image_feat.device)
            pos[:, :B].fill_diagonal_(1)
            loss_itc, image_feat_m, text_feat_m = self._itc(
                pixel_values, image_feat, input_ids, attention_mask, text_feat, alpha, pos
            )
            self._dequeue_and_enqueue(image_feat_m, text_feat_m)

        with torch.no_grad():  # the in-batch (momentum) columns of the ITC similarities decide the hard negatives
            if random_itm_negatives:
                weights_t2i = weights_i2t = torch.ones(B, B, device=image_feat.device).fill_diagonal_(0)
            else:
                weights_t2i = (F.softmax(text_feat @ image_feat_m.t() / self.temp, dim=1) + 1e-4).fill_diagonal_(0)
                weights_i2t = (F.softmax(image_feat @ text_feat_m.t() / self.temp, dim=1) + 1e-4).fill_diagonal_(0)
        loss_itm = self._itm(image_embeds, input_ids, attention_mask, weights_i2t, weights_t2i)
        loss_lm = self.caption_loss(image_embeds, input_ids, attention_mask, prompt_length=0)
        return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}


class BlipVQA(BlipBase):
    """`blip_vqa`: question encoder (image-grounded, [ENC] first) + answer decoder; encoder and decoder are untied.

    The answer decoder cross-attends the question encoder's states, so its cross-attention reads text-width inputs
    (`config.answer_decoder`), not the image tokens.
    """

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.visual_encoder = VisionTransformer(config.vision)
        self.text_encoder = BertModel(config.text)
        self.text_decoder = BertLMHeadModel(config.answer_decoder, config.label_smoothing)
        init_weights(self)

    def encode_question(self, pixel_values: torch.Tensor, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Question states (B, Tq, H) and the question mask (B, Tq); questions truncated to 35 tokens."""
        image_embeds = self.encode_image(pixel_values)
        ids, mask = self.tokenize(questions, max_length=35)
        ids[:, 0] = self.config.text.enc_token_id
        states, _ = self.text_encoder(ids, mask, image_embeds)  # (B, Tq, H)
        return states, mask

    def _answer_ids(self, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[DEC]-first answer ids (A, Ta), mask, labels (pads -100); not truncated below the position limit."""
        ids, mask = self.tokenize(answers, max_length=self.config.text.max_position_embeddings)
        ids[:, 0] = self.config.text.bos_token_id
        return ids, mask, ids.masked_fill(ids == self.config.text.pad_token_id, -100)

    def forward(
        self,
        pixel_values: torch.Tensor,
        questions: list[str],
        answers: list[str],
        n: list[int] | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Answer LM loss in the original's layout: question i has `n[i]` answers, consecutive in `answers`, each with
        its weight in `weights` (the original: each distinct annotator answer, weighted by its share). The loss is the
        weighted sum of the per-answer (label-smoothed, summed over tokens) losses divided by the number of questions.
        n=None: one answer per question; weights=None: weight 1 each.
        """
        n = [1] * len(questions) if n is None else list(n)
        if len(n) != len(questions) or sum(n) != len(answers):
            raise ValueError(f"{len(questions)} questions with n={n} answers each do not match {len(answers)} answers")
        states, q_mask = self.encode_question(pixel_values, questions)
        rows = torch.repeat_interleave(
            torch.arange(len(n), device=states.device), torch.tensor(n, device=states.device)
        )
        ids, mask, labels = self._answer_ids(answers)
        logits, _ = self.text_decoder(ids, mask, states[rows], q_mask[rows])
        loss = self.text_decoder.lm_loss(logits, labels, reduction="none")  # (A,)
        if weights is not None:
            loss = loss * weights.to(loss)
        return loss.sum() / len(questions)

    @torch.no_grad()
    def answer(
        self,
        pixel_values: torch.Tensor,
        questions: list[str],
        num_beams: int = _VQA.num_beams,
        max_length: int = _VQA.max_length,
        min_length: int = _VQA.min_length,
        attend_question_padding: bool = False,
    ) -> list[str]:
        """Generated answers (the original's `inference="generate"`): beam search from [DEC] on the question states.

        attend_question_padding: False (default) masks the padding of shorter questions in the batch; True lets the
        decoder attend every question token, padding included, exactly as the original's generate mode (its ids then
        depend on how long the other questions of the batch are).
        """
        states, q_mask = self.encode_question(pixel_values, questions)
        bos = torch.full((states.shape[0], 1), self.config.text.bos_token_id, device=states.device)
        ids = _generate_ids(
            self.text_decoder,
            states,
            bos,
            eos_token_id=self.config.text.sep_token_id,
            pad_token_id=self.config.text.pad_token_id,
            generation=GenerationConfig.vqa(num_beams=num_beams, max_length=max_length, min_length=min_length),
            encoder_attention_mask=None if attend_question_padding else q_mask,
        )
        return [a.strip() for a in self._need_tokenizer().batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def rank_answers(
        self, pixel_values: torch.Tensor, questions: list[str], answer_list: list[str], k: int = 128
    ) -> list[int]:
        """The original's `inference="rank"` (VQAv2 evaluation): for each question, the index in `answer_list` of the
        best candidate. The k candidates whose first token is most probable after [DEC] are re-scored by their whole
        log-likelihood (minus the summed label-smoothed LM loss, as the original); the highest wins.
        """
        if not answer_list:
            raise ValueError("rank_answers needs a non-empty answer_list")
        states, q_mask = self.encode_question(pixel_values, questions)  # (B, Tq, H)
        B = states.shape[0]
        ids, mask, labels = self._answer_ids(answer_list)  # (A, Ta)
        k = min(k, len(answer_list))
        first, _ = self.text_decoder(ids[:1, :1].expand(B, 1), None, states, q_mask)  # (B, 1, V)
        first_prob = first[:, 0].float().softmax(-1)[:, ids[:, 1]]  # (B, A): P(first answer token | question)
        top = first_prob.topk(k, dim=1).indices  # (B, k)
        cand = top.flatten()  # (B * k,)
        rows = torch.arange(B, device=states.device).repeat_interleave(k)
        logits, _ = self.text_decoder(ids[cand], mask[cand], states[rows], q_mask[rows])
        loglik = -self.text_decoder.lm_loss(logits, labels[cand], reduction="none").view(B, k)
        return top.gather(1, loglik.argmax(1, keepdim=True)).squeeze(1).tolist()


MODEL_CLASSES: dict[str, type[BlipBase]] = {
    "caption": BlipCaptioner,
    "retrieval": BlipRetrieval,
    "pretrain": BlipPretrain,
    "vqa": BlipVQA,
}


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT/ViT-style init for training from scratch: normal(0, std) linear/embeddings, LayerNorm (1, 0)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():  # the original ViT's position/cls init (0.02), scaled with the rest
        if isinstance(m, VisionTransformer):  # else a from-scratch run at std 0.08 has next to no position signal
            nn.init.trunc_normal_(m.pos_embed, std=std)
            nn.init.trunc_normal_(m.cls_token, std=std)
    if isinstance(model, ContrastiveMixin) and hasattr(model, "visual_encoder_m"):
        model.copy_params()
