"""The decode loop (blip/generate.py): counter-based sampling noise, the static KV cache, the compiled step."""

from __future__ import annotations

import math

import pytest
import torch

from blip.config import BlipConfig
from blip.generate import _mix64, exp_noise, generate_ids, resolve_compile, row_keys
from blip.model import BlipCaptioner, BlipVQA, init_weights
from blip.tokenizer import build_tokenizer

U64 = (1 << 64) - 1


def splitmix64_mix(x: int) -> int:
    """The reference finaliser on Python ints (unsigned 64-bit, as in Vigna's splitmix64.c)."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


def as_u64(t: torch.Tensor) -> list[int]:
    return [v & U64 for v in t.tolist()]


@pytest.fixture(scope="module")
def tok(tiny_vocab_dir):
    return build_tokenizer(tiny_vocab_dir)


def captioner(tok, sep_bias: float = 0.0) -> BlipCaptioner:
    """A tiny captioner at a useful weight scale; `sep_bias` raises [SEP] so some captions end early."""
    torch.manual_seed(0)
    model = BlipCaptioner(BlipConfig.from_name("tiny", family="caption"))
    init_weights(model, std=0.2)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tok.sep_token_id] += sep_bias
    model.tokenizer = tok
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


SEEDS = torch.tensor([11, 2**62 + 5, 0, -7, 12345678901234567])  # one per image; negative int64 is a seed too


# -- the counter-based noise -------------------------------------------------------------------------------------------


def test_mix64_is_splitmix64_on_int64_bits():
    xs = [0, 1, 2**63 - 1, 2**63, U64, 0x9E3779B97F4A7C15, 123456789]
    t = torch.tensor([x - (1 << 64) if x >= 1 << 63 else x for x in xs], dtype=torch.long)
    assert as_u64(_mix64(t)) == [splitmix64_mix(x) for x in xs]
    # the first outputs of Vigna's splitmix64 seeded with 1234567 (the generator's own test values)
    state = 1234567
    outs = []
    for _ in range(3):
        state = (state + 0x9E3779B97F4A7C15) & U64
        outs.append(splitmix64_mix(state))
    assert outs == [6457827717110365317, 3203168211198807973, 9817491932198370423]


def test_noise_is_a_pure_function_of_seed_caption_step_token():
    keys = row_keys(SEEDS[:3], per_row=2)  # (6,)
    tokens = torch.tensor([[5, 9, 30000], [5, 9, 30000]]).repeat(3, 1)  # (6, 3)
    e = exp_noise(keys, 7, tokens)
    assert e.dtype == torch.float64 and (e > 0).all()
    # the token id is hashed, not its rank: permuting the candidates permutes their noise
    torch.testing.assert_close(exp_noise(keys, 7, tokens.flip(1)), e.flip(1), rtol=0, atol=0)
    # a row's noise does not depend on the other rows (image 1 alone, or in another batch)
    alone = exp_noise(row_keys(SEEDS[1:2], per_row=2), 7, tokens[:2])
    torch.testing.assert_close(alone, e[2:4], rtol=0, atol=0)
    # caption c of an image is keyed by (seed, c) only: 3 captions per image start with the same 2
    torch.testing.assert_close(row_keys(SEEDS[:3], per_row=3).view(3, 3)[:, :2], keys.view(3, 2), rtol=0, atol=0)
    # other step, other caption, other seed: other noise
    assert not torch.equal(exp_noise(keys, 8, tokens), e)
    assert not torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    # the uniforms are exact: the float64 of output (t * 2**32 + v + 1) of the row's splitmix64 stream, top 53 bits
    key0 = as_u64(keys)[0]
    h = splitmix64_mix((key0 + (7 * 2**32 + 5 + 1) * 0x9E3779B97F4A7C15) & U64)
    assert math.isclose(float(e[0, 0]), -math.log(((h >> 11) + 0.5) * 2.0**-53), rel_tol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_noise_identical_on_cpu_and_gpu():
    keys = row_keys(SEEDS, per_row=3)
    tokens = torch.randint(0, 30524, (keys.shape[0], 50), generator=torch.Generator().manual_seed(0))
    cpu = exp_noise(keys, 9, tokens)
    gpu = exp_noise(keys.cuda(), 9, tokens.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=2**-52, atol=0)  # the float64 log may differ in its last bit


# -- per-key determinism of sampled captions ---------------------------------------------------------------------------


def test_sampled_captions_depend_only_on_image_and_seed(tok):
    model = captioner(tok, sep_bias=8.0)
    x = images(5)
    kw = dict(sample=True, num_captions=3, max_length=14, min_length=6, repetition_penalty=1.1)
    full = model.generate_ids(x, seeds=SEEDS, **kw).view(5, 3, -1)  # (B, N, T)

    def same(got: torch.Tensor, want: torch.Tensor) -> bool:  # ids up to the shorter length (padding differs)
        n = min(got.shape[-1], want.shape[-1])
        return torch.equal(got[..., :n], want[..., :n]) and not (got[..., n:] != tok.pad_token_id).any()

    for order in ([4, 0, 2], [1, 3], [3]):  # other batch compositions and sizes, other positions
        sub = model.generate_ids(x[order], seeds=SEEDS[order], **kw).view(len(order), 3, -1)
        assert same(sub, full[order])
    for i in range(5):  # batch size 1
        assert same(model.generate_ids(x[i : i + 1], seeds=SEEDS[i : i + 1], **kw).view(1, 3, -1), full[i : i + 1])
    # caption c is keyed by (seed, c): asking for 2 captions gives the first 2 of the 3
    assert same(model.generate_ids(x, seeds=SEEDS, **{**kw, "num_captions": 2}).view(5, 2, -1), full[:, :2])
    assert torch.equal(model.generate_ids(x, seeds=SEEDS, **kw).view(5, 3, -1), full)  # a second run
    other = model.generate_ids(x, seeds=SEEDS + 1, **kw).view(5, 3, -1)
    assert not same(other, full)
    ended = (full == tok.sep_token_id).any(-1)
    assert ended.any() and not ended.all()  # finished rows and live rows were both exercised


def test_generator_or_global_seed_without_per_image_seeds(tok):
    model = captioner(tok)
    x = images(2)
    kw = dict(sample=True, num_captions=2, max_length=10)
    a = model.generate_ids(x, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, model.generate_ids(x, generator=torch.Generator().manual_seed(3), **kw))
    assert not torch.equal(a, model.generate_ids(x, generator=torch.Generator().manual_seed(4), **kw))
    torch.manual_seed(0)
    b = model.generate_ids(x, **kw)
    torch.manual_seed(0)
    assert torch.equal(b, model.generate_ids(x, **kw))
    with pytest.raises(TypeError, match="seeds="):
        model.generate_ids(x, generator=[torch.Generator(), torch.Generator()], **kw)
    with pytest.raises(ValueError, match="one int64 per image"):
        model.generate_ids(x, seeds=torch.tensor([1, 2, 3]), **kw)


# -- the static cache against recomputing the prefix -------------------------------------------------------------------

DECODES = {
    "greedy": dict(sample=False, num_beams=1, repetition_penalty=1.2),
    "beam": dict(sample=False, num_beams=3),
    "beam_rp": dict(sample=False, num_beams=2, repetition_penalty=1.3, min_length=7),
    "sample": dict(sample=True, num_captions=3, repetition_penalty=1.1),
}


@pytest.mark.parametrize("name", list(DECODES))
def test_static_cache_equals_no_cache(tok, name):
    model = captioner(tok, sep_bias=8.0)
    x = images(3)
    kw = {"max_length": 16, "min_length": 5, **DECODES[name]}
    if kw["sample"]:
        kw["seeds"] = SEEDS[:3]
    cached = model.generate_ids(x, use_cache=True, **kw)
    assert torch.equal(cached, model.generate_ids(x, use_cache=False, **kw))
    assert (cached == tok.sep_token_id).any()  # some rows finished before max_length
    # the cache is preallocated to max_length, (R, nh, T_max, hd), and reused by the next call of the same shape
    held = model.text_decoder._decode_buffers
    R = cached.shape[0] * (kw.get("num_beams", 1) if not kw["sample"] else 1)
    cfg = model.config.text
    assert held[1][0][0][0].shape == (R, cfg.heads, 16, cfg.hidden_size // cfg.heads)
    assert torch.equal(model.generate_ids(x, use_cache=True, **kw), cached)
    assert model.text_decoder._decode_buffers is held


def test_static_cache_with_a_padded_cross_attention_mask(tiny_vocab_dir):
    """The VQA answer decoder attends padded question states: the step builds the cross mask itself."""
    tok = build_tokenizer(tiny_vocab_dir)
    torch.manual_seed(0)
    model = BlipVQA(BlipConfig.from_name("tiny", family="vqa"))
    init_weights(model, std=0.2)
    model.tokenizer = tok
    model.eval()
    with torch.no_grad():
        states, mask = model.encode_question(images(2), ["what colour is the big circle on the left", "how many"])
    assert not mask.all()
    bos = torch.full((2, 1), tok.bos_token_id)
    for nb in (1, 3):
        kw = dict(eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, num_beams=nb, max_length=8,
                  min_length=1, encoder_attention_mask=mask)  # fmt: skip
        cached = generate_ids(model.text_decoder, states, bos, use_cache=True, **kw)
        assert torch.equal(cached, generate_ids(model.text_decoder, states, bos, use_cache=False, **kw))


# -- the compiled step -------------------------------------------------------------------------------------------------


def test_resolve_compile():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile("on", torch.device("cpu")) is True and resolve_compile("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="compile must be"):
        resolve_compile("yes", torch.device("cpu"))


@pytest.mark.slow  # ~40 s cold on 2 shared cores (inductor compiles C++); ~6 s with its on-disk cache warm
def test_compiled_step_equals_eager(tok):
    """CPU torch.compile of the fixed-shape step: the same ids as eager, and no recompilation from step to step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = captioner(tok, sep_bias=8.0)
    x = images(3)
    for name in ("greedy", "beam", "sample"):
        kw = {"max_length": 12, "min_length": 5, **DECODES[name]}
        if kw["sample"]:
            kw["seeds"] = SEEDS[:3]
        eager = model.generate_ids(x, compile="off", **kw)
        compiled = model.generate_ids(x, compile="on", **kw)
        assert torch.equal(compiled, eager), name
        frames = counters["stats"]["unique_graphs"]
        assert frames > 0  # the step was captured
        assert torch.equal(model.generate_ids(x, compile="on", **kw), eager)
        assert counters["stats"]["unique_graphs"] == frames, f"{name}: a second call of the same shapes recompiled"
