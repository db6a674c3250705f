"""Parity with transformers' BLIP (litgpt-style `test_against_*`): a transformers model with random weights is saved
with `save_pretrained`, loaded by `blip.load`, and both must give the same numbers (fp32, CPU).

transformers quirks handled here (its known pitfalls): its default vision init is ~1e-10, so every weight is
re-drawn at a useful scale; its ITM/VQA encoders are given the same [ENC]-first ids ours use; its VQA decoder ignores
the question mask, so the questions in a batch have equal length; its beam search normalises by the generated length
(our `beam_length="hf"`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import transformers

import blip
from blip.config import BlipConfig
from blip.convert import config_to_hf
from blip.generate import generate_ids

TOL = dict(rtol=1e-4, atol=1e-4)
SIZES = ["tiny", pytest.param("base", marks=pytest.mark.slow)]


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """All weights normal(0, 0.05) and norms around 1, so every input (the image included) matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm_weight = ("norm" in name.lower()) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm_weight else 0.05 * noise)


def _hf_folder(cls: type, cfg: BlipConfig, vocab_dir: Path, tmp_path: Path, seed: int = 0):
    d = config_to_hf(cfg)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=cfg.embed_dim
    )
    ref = cls(hf_cfg).eval()
    _redraw(ref, seed)
    folder = tmp_path / "hf"
    ref.save_pretrained(folder)
    for f in vocab_dir.iterdir():  # the hub folders carry their tokenizer files
        shutil.copy(f, folder / f.name)
    return ref, blip.load(folder)


def _pixels(cfg: BlipConfig, n: int = 2, seed: int = 1) -> torch.Tensor:
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


def _trim(row: list[int], start: int, eos: int = 102) -> list[int]:
    """Token ids up to and including the first eos after the prompt (transformers pads finished rows)."""
    return row[: row.index(eos, start) + 1] if eos in row[start:] else row


@pytest.mark.parametrize("size", SIZES)
def test_against_blip_captioning(size: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    cfg = BlipConfig.from_name(size, family="caption")
    ref, ours = _hf_folder(transformers.BlipForConditionalGeneration, cfg, tiny_vocab_dir, tmp_path)
    assert isinstance(ours, blip.model.BlipCaptioner)
    tok = ours.tokenizer
    pixels = _pixels(cfg)

    enc = tok(["a picture of a red dog", "a picture of two cats on a blue couch"], padding=True, return_tensors="pt")
    ids, mask = enc.input_ids.clone(), enc.attention_mask
    ids[:, 0] = tok.bos_token_id  # [DEC] first, as the original decoder (transformers' forward would keep [CLS])
    with torch.no_grad():
        want = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        got = ours.logits(pixels, ids, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], **TOL)
    # the images matter (guards against transformers' ~1e-10 vision init)
    assert (
        want[0, 1] - ref(pixel_values=pixels.flip(0), input_ids=ids, attention_mask=mask).logits[0, 1]
    ).abs().max() > 1e-2

    prompt = tok(["a picture of "] * len(pixels), return_tensors="pt").input_ids  # transformers drops the [SEP]
    n_prompt = prompt.shape[1] - 1
    ended_early = []
    for sep_boost in ("none", "mid") if size == "tiny" else ("none",):  # base: generation is slow on CPU
        if sep_boost == "mid":
            # random weights rarely pick [SEP]: raise its bias (in both models) so that greedy decoding of image 0
            # would end around token 10, exercising eos, min_length and finished beams
            with torch.no_grad():
                greedy = ours.generate_ids(pixels, sample=False, num_beams=1, max_length=20, min_length=5)
                lg = ours.logits(pixels, greedy, torch.ones_like(greedy))  # (B, T, V)
                boost = float(lg[0, 9].max() - lg[0, 9, tok.sep_token_id]) + 1e-3
                ref.text_decoder.cls.predictions.bias[tok.sep_token_id] += boost
                ours.text_decoder.cls.predictions.bias[tok.sep_token_id] += boost
        for num_beams in (1, 3):
            want_ids = ref.generate(
                pixels, input_ids=prompt.clone(), num_beams=num_beams, do_sample=False, max_length=20, min_length=5
            )
            got_ids = ours.generate_ids(
                pixels, sample=False, num_beams=num_beams, max_length=20, min_length=5, beam_length="hf"
            )
            got = [_trim(r, n_prompt) for r in got_ids.tolist()]
            assert got == [_trim(r, n_prompt) for r in want_ids.tolist()]
            assert got_ids[:, 0].eq(tok.bos_token_id).all() and got_ids.shape[1] <= 20
            assert all(len(r) >= 5 for r in got)  # min_length counts the prompt
            ended_early += [len(r) < 20 and r[-1] == tok.sep_token_id for r in got]
    assert any(ended_early) or size != "tiny"


@pytest.mark.parametrize("size", SIZES)
def test_against_blip_retrieval(size: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    cfg = BlipConfig.from_name(size, family="retrieval")
    ref, ours = _hf_folder(transformers.BlipForImageTextRetrieval, cfg, tiny_vocab_dir, tmp_path)
    assert isinstance(ours, blip.model.BlipRetrieval)
    tok = ours.tokenizer
    pixels = _pixels(cfg)
    texts = ["a red circle", "two blue dogs running on the green grass"]
    enc = tok(texts, padding=True, return_tensors="pt")
    cls_ids, mask = enc.input_ids, enc.attention_mask
    enc_ids = cls_ids.clone()
    enc_ids[:, 0] = tok.enc_token_id  # what the retrieval checkpoints were trained with

    with torch.no_grad():
        want_itm = ref(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        want_itc = ref(input_ids=cls_ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
        embeds = ours.encode_image(pixels)
        got_itm = ours.itm_logits(embeds, cls_ids, mask)  # replaces [CLS] with [ENC] itself
        got_itc = ours.image_feat(embeds) @ ours.text_feat(cls_ids, mask).T  # (B_img, B_txt)
    torch.testing.assert_close(got_itm, want_itm, **TOL)
    torch.testing.assert_close(got_itc, want_itc, **TOL)
    assert (want_itm.softmax(-1)[:, 1] - 0.5).abs().max() > 1e-3  # not a degenerate 50/50 head

    # the public API: every text against every image
    itm_prob, itc_sim = ours.score(pixels, [texts, texts])
    pair_pixels = pixels.repeat_interleave(len(texts), 0)  # image i with text j
    with torch.no_grad():
        want_pairs = ref(
            input_ids=enc_ids.repeat(2, 1), pixel_values=pair_pixels, attention_mask=mask.repeat(2, 1)
        ).itm_score.softmax(-1)[:, 1]
    torch.testing.assert_close(torch.tensor(itm_prob).flatten(), want_pairs, **TOL)
    torch.testing.assert_close(torch.tensor(itc_sim), want_itc, **TOL)


@pytest.mark.parametrize("size", ["tiny"])
def test_against_blip_vqa(size: str, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    cfg = BlipConfig.from_name(size, family="vqa")
    ref, ours = _hf_folder(transformers.BlipForQuestionAnswering, cfg, tiny_vocab_dir, tmp_path)
    assert isinstance(ours, blip.model.BlipVQA)
    tok = ours.tokenizer
    pixels = _pixels(cfg)
    questions = ["what color is the circle?", "how many dogs are there?"]
    enc = tok(questions, padding=True, return_tensors="pt")
    assert enc.attention_mask.all(), "equal-length questions: transformers' decoder ignores the question mask"
    q_ids = enc.input_ids.clone()
    q_ids[:, 0] = tok.enc_token_id

    with torch.no_grad():
        image_embeds = ref.vision_model(pixel_values=pixels).last_hidden_state
        want_states = ref.text_encoder(
            input_ids=q_ids, attention_mask=enc.attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        got_states, q_mask = ours.encode_question(pixels, questions)
        torch.testing.assert_close(got_states, want_states, **TOL)

        answer = tok(["two", "blue"], return_tensors="pt").input_ids.clone()
        answer[:, 0] = tok.bos_token_id
        want_logits = ref.text_decoder(input_ids=answer, encoder_hidden_states=want_states).logits
        got_logits, _ = ours.text_decoder(answer, torch.ones_like(answer), got_states, q_mask)
        torch.testing.assert_close(got_logits, want_logits, **TOL)

    for num_beams in (1, 3):
        want = ref.generate(
            input_ids=q_ids, pixel_values=pixels, attention_mask=enc.attention_mask, num_beams=num_beams,
            max_length=10, min_length=1,
        )  # fmt: skip
        with torch.no_grad():
            got = generate_ids(
                ours.text_decoder, got_states, answer[:, :1], eos_token_id=102, pad_token_id=0, sample=False,
                num_beams=num_beams, max_length=10, min_length=1, beam_length="hf", encoder_attention_mask=q_mask,
            )  # fmt: skip
        assert [_trim(r, 1) for r in got.tolist()] == [_trim(r, 1) for r in want.tolist()]
        want_text = [a.strip() for a in tok.batch_decode(want, skip_special_tokens=True)]
        if num_beams == 1:  # the public API (its beam search scores lengths as the original, not as transformers)
            assert ours.answer(pixels, questions, num_beams=1, max_length=10, min_length=1) == want_text
