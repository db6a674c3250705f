"""Model FLOPs of BLIP / CapFilt counted from a BlipConfig by formula (matmul FLOPs = 2 * MACs).

Counted: every matmul (linear layers, attention scores and values, the LM head). Not counted: layer norms,
softmax, GELU, embeddings lookups (a few percent at most). Used for model FLOP utilisation (MFU) in the benches.
"""

from __future__ import annotations

from blip.config import BlipConfig

# bf16 dense tensor-core peaks, TFLOP/s (no sparsity). The H200 has the H100 SXM's compute (same GH100 die and
# clocks, more and faster memory), so 989; issue 25's "~790" is lower than the datasheet and is not used here.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "RTX 4090": 165.0, "4090": 165.0}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak for a torch.cuda.get_device_name() string, or None when unknown."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def _attn_block(n_q: int, n_kv: int, d_q: int, d_kv: int) -> int:
    """Q from queries, K/V from n_kv keys of width d_kv, scores + values, output projection."""
    q = 2 * n_q * d_q * d_q
    kv = 2 * 2 * n_kv * d_kv * d_q
    scores = 2 * 2 * n_q * n_kv * d_q
    proj = 2 * n_q * d_q * d_q
    return q + kv + scores + proj


def vit_flops(cfg: BlipConfig) -> int:
    """One image through the ViT at the config's image size (patch embedding + layers, with the CLS token)."""
    v = cfg.vision
    n = v.num_patches + 1
    d = v.width
    hidden = int(d * v.mlp_ratio)
    patch = 2 * v.num_patches * (3 * v.patch_size**2) * d
    per_layer = _attn_block(n, n, d, d) + 2 * 2 * n * d * hidden
    return patch + v.layers * per_layer


def text_encoder_flops(cfg: BlipConfig, text_len: int, cross: bool) -> int:
    """One text of text_len tokens through the BERT text tower; with cross-attention to the image tokens if cross."""
    t = cfg.text
    d, n_img = t.hidden_size, cfg.vision.num_patches + 1
    per_layer = _attn_block(text_len, text_len, d, d) + 2 * 2 * text_len * d * t.intermediate_size
    if cross:
        per_layer += _attn_block(text_len, n_img, d, t.encoder_width)
    return t.layers * per_layer


def filter_flops_per_image(cfg: BlipConfig, texts: int = 2, text_len: int = 35) -> int:
    """The filter for one image: its ViT, the ITM of `texts` texts (cross-attention + ITM head) and the ITC of
    the same texts (unimodal text encoder + projections)."""
    d = cfg.text.hidden_size
    itm = texts * (text_encoder_flops(cfg, text_len, cross=True) + 2 * d * 2)
    itc = texts * (text_encoder_flops(cfg, text_len, cross=False) + 2 * d * cfg.embed_dim)
    itc += 2 * cfg.vision.width * cfg.embed_dim
    return vit_flops(cfg) + itm + itc


def decoder_flops_per_image(cfg: BlipConfig, tokens: int = 30, captions: int = 1, prompt_len: int = 5) -> int:
    """The caption decoder with a KV cache, for `captions` captions of `tokens` generated tokens each (after a
    prompt of prompt_len tokens): per token self-attention projections, attention over the cache, cross-attention
    over the image tokens (their K/V computed once per image and caption row), FFN, LM head."""
    t = cfg.text
    d, n_img = t.hidden_size, cfg.vision.num_patches + 1
    cross_kv = t.layers * 2 * 2 * n_img * t.encoder_width * d  # once per caption row
    total = 0
    for pos in range(prompt_len + tokens):
        ctx = pos + 1
        layer = 2 * d * d * 4  # q, k, v, o of self-attention for one token
        layer += 2 * 2 * ctx * d  # scores + values over the cache
        layer += 2 * d * d * 2 + 2 * 2 * n_img * d  # cross-attention q, o + scores/values over image tokens
        layer += 2 * 2 * d * t.intermediate_size
        total += t.layers * layer
        if pos >= prompt_len - 1:
            total += 2 * d * d + 2 * d * t.vocab_size  # LM head transform + projection for a generated token
    return captions * (total + cross_kv)


def capfilt_flops_per_image(
    cap_cfg: BlipConfig, filt_cfg: BlipConfig, captions: int = 1, tokens: int = 30, texts: int = 2
) -> int:
    """One image through CapFilt: the captioner's ViT and decoder, the filter's ViT and ITM/ITC of `texts` texts."""
    return (
        vit_flops(cap_cfg)
        + decoder_flops_per_image(cap_cfg, tokens=tokens, captions=captions)
        + filter_flops_per_image(filt_cfg, texts=texts)
    )


def peak_bytes_per_image(
    cap_cfg: BlipConfig, filt_cfg: BlipConfig, captions: int = 1, max_length: int = 30, bytes_per: int = 2
) -> int:
    """An estimate of CapFilt's inference memory per image (what `batch_size: auto` measures on the device): the
    larger of the two phases, plus the pixels. Captioner: image tokens, the cross-attention K/V once per image and
    gathered per caption row, the static self-attention cache, the fp32 logits of a step (three live copies).
    Filter: the cross K/V per image and gathered per text (web + captions). Either phase: the ViT's largest
    transient, ~10 token-widths per token (MLP input + 4x hidden + GELU's 4x). SDPA's fused kernels hold no scores."""

    def cross(cfg: BlipConfig) -> int:
        return cfg.text.layers * 2 * (cfg.vision.num_patches + 1) * cfg.text.hidden_size * bytes_per

    def vit(cfg: BlipConfig) -> int:
        return 10 * (cfg.vision.num_patches + 1) * cfg.vision.width * bytes_per

    t = cap_cfg.text
    tokens = (cap_cfg.vision.num_patches + 1) * cap_cfg.vision.width * bytes_per
    cache = captions * t.layers * 2 * max_length * t.hidden_size * bytes_per
    logits = captions * 3 * t.vocab_size * 4
    captioner = max(vit(cap_cfg), tokens + cross(cap_cfg) * (1 + captions) + cache + logits)
    filt = max(vit(filt_cfg), cross(filt_cfg) * (2 + captions))
    pixels = 3 * max(cap_cfg.vision.image_size, filt_cfg.vision.image_size) ** 2
    return max(captioner, filt) + pixels


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the peak."""
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


if __name__ == "__main__":
    for size in ("base", "large"):
        cap, filt = BlipConfig.from_name(size, "caption"), BlipConfig.from_name(size, "retrieval")
        total = capfilt_flops_per_image(cap, filt)
        print(
            f"CapFilt-{size[0].upper()}: ViT {vit_flops(cap) / 1e9:.1f} GFLOP, decoder "
            f"{decoder_flops_per_image(cap) / 1e9:.1f}, filter {filter_flops_per_image(filt) / 1e9:.1f}, "
            f"total {total / 1e12:.3f} TFLOP/image, ~{peak_bytes_per_image(cap, filt) / 2**20:.0f} MB/image bf16"
        )
