"""The model file on tiny configs: every family runs, losses and gradients, sharing, momentum, queues, decoding."""

from __future__ import annotations

import pytest
import torch

from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, BlipCaptioner, BlipRetrieval


@pytest.fixture(scope="module")
def tok(tiny_vocab_dir):
    from blip.tokenizer import build_tokenizer

    return build_tokenizer(tiny_vocab_dir)


def make(family: str, tok, **kw):
    torch.manual_seed(0)
    cfg = BlipConfig.from_name("tiny", family=family)
    model = BlipRetrieval(cfg, **kw) if family == "retrieval" else MODEL_CLASSES[family](cfg)
    model.tokenizer = tok
    return model


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


TEXTS = ["a red circle on the left", "a small blue square", "a large green triangle at the top", "a picture"]


@pytest.mark.parametrize("family", ["caption", "retrieval", "pretrain", "vqa"])
def test_original_checkpoint_key_names(family, tok):
    keys = set(make(family, tok).state_dict())
    assert "visual_encoder.blocks.1.attn.qkv.weight" in keys
    assert "visual_encoder.pos_embed" in keys and "visual_encoder.cls_token" in keys
    text = "text_decoder.bert" if family == "caption" else "text_encoder"
    assert f"{text}.encoder.layer.1.crossattention.self.key.weight" in keys
    assert f"{text}.embeddings.position_ids" in keys
    if family in ("caption", "pretrain", "vqa"):
        assert {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.bias"} <= keys
    if family in ("retrieval", "pretrain"):
        assert {"vision_proj.weight", "text_proj.weight", "itm_head.weight", "temp"} <= keys
    if family == "pretrain":
        assert {"visual_encoder_m.norm.weight", "image_queue", "text_queue", "queue_ptr"} <= keys
    assert not any("token_type" in k or "pooler" in k for k in keys)


def test_cross_attention_reads_vision_width(tok):
    cfg = BlipConfig.from_name("tiny", vision={"width": 192, "heads": 3})
    m = BlipCaptioner(cfg)
    assert m.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features == 192


def test_pretrain_losses_gradients_and_sharing(tok):
    model = make("pretrain", tok).train()
    ids, mask = model.tokenize(TEXTS, 30)
    losses = model(images(4), ids, mask)
    assert set(losses) == {"loss_itc", "loss_itm", "loss_lm"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    assert not any(p.requires_grad for n, p in model.named_parameters() if "_m." in n)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    enc, dec = model.text_encoder, model.text_decoder.bert
    sd = model.state_dict()
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.0.crossattention.self.key.weight",
                 "encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight"):  # fmt: skip
        assert torch.equal(sd[f"text_encoder.{name}"], sd[f"text_decoder.bert.{name}"]), name
    # self-attention is the one part the decoder does not share
    assert enc.encoder.layer[0].attention.self.query.weight is not dec.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(
        enc.encoder.layer[0].attention.self.query.weight, dec.encoder.layer[0].attention.self.query.weight
    )
    # the LM head is tied to the (shared) word embeddings
    assert model.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight


def test_momentum_update_and_queue_pointer(tok):
    model = make("pretrain", tok).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # online weights now differ from the momentum copies
    before_m = model.visual_encoder_m.norm.weight.detach().clone()
    online = model.visual_encoder.norm.weight.detach().clone()
    ids, mask = model.tokenize(TEXTS, 30)
    model(images(4), ids, mask)
    m = model.config.momentum
    torch.testing.assert_close(model.visual_encoder_m.norm.weight, before_m * m + online * (1 - m))
    assert int(model.queue_ptr) == 4
    # the first 4 queue columns hold the momentum image features of this batch: unit norm
    torch.testing.assert_close(model.image_queue[:, :4].norm(dim=0), torch.ones(4))
    for _ in range(15):
        model(images(4), ids, mask)
    assert int(model.queue_ptr) == (16 * 4) % model.config.queue_size


def test_queue_size_must_divide_by_batch(tok):
    model = make("pretrain", tok).train()
    ids, mask = model.tokenize(TEXTS[:3], 30)
    with pytest.raises(ValueError, match="divisible"):
        model(images(3), ids, mask)


def test_retrieval_finetune_losses(tok):
    model = make("retrieval", tok, momentum=True).train()
    ids, mask = model.tokenize(TEXTS, 35)
    out = model(images(4), ids, mask, idx=torch.tensor([7, 3, 3, 9]))
    assert set(out) == {"loss_itc", "loss_itm"} and all(torch.isfinite(v) for v in out.values())
    assert model.idx_queue[0, :4].tolist() == [7, 3, 3, 9]
    with pytest.raises(RuntimeError, match="momentum=True"):
        make("retrieval", tok).train()(images(4), ids, mask, idx=torch.arange(4))


def test_captioner_loss_masks_prompt(tok):
    model = make("caption", tok).eval()
    assert model.prompt_length == 4  # [DEC] a picture of
    texts = ["a picture of a red circle", "a picture of a blue square"]
    ids, mask = model.tokenize(texts)
    loss = model(images(2), ids, mask)
    assert torch.isfinite(loss)
    # independent computation: next-token CE (smoothing 0.1) over the caption tokens only, pads ignored
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.config.text.bos_token_id
    logits = model.logits(images(2), dec_ids, mask)
    assert logits.shape == (*ids.shape, model.config.text.vocab_size)
    targets = dec_ids[:, 4:].masked_fill(mask[:, 4:] == 0, -100)
    manual = torch.nn.functional.cross_entropy(
        logits[:, 3:-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(loss, manual)


def test_gradient_checkpointing_same_output(tok):
    torch.manual_seed(0)
    cfg = BlipConfig.from_name("tiny", text={"hidden_dropout": 0.0, "attention_dropout": 0.0})
    model = BlipCaptioner(cfg).train()
    model.tokenizer = tok
    ids, mask = model.tokenize(["a picture of a red circle"] * 2)
    x = images(2)
    a = model(x, ids, mask)
    model.visual_encoder.cfg.grad_checkpointing = True
    b = model(x, ids, mask)
    b.backward()
    torch.testing.assert_close(a, b)
    assert model.visual_encoder.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("kw", [dict(sample=False, num_beams=1), dict(sample=False, num_beams=3),
                                dict(sample=True, num_captions=3, repetition_penalty=1.1)])  # fmt: skip
def test_cached_and_uncached_decoding_identical(tok, kw):
    model = make("caption", tok).eval()
    x = images(3)
    seeds = torch.arange(3) if kw.get("sample") else None
    a = model.generate_ids(x, seeds=seeds, use_cache=True, **kw)
    b = model.generate_ids(x, seeds=seeds, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_generation_lengths_count_the_prompt(tok):
    model = make("caption", tok).eval()
    ids = model.generate_ids(images(4), sample=True, num_captions=2, max_length=12, min_length=9)
    assert ids.shape[1] <= 12
    sep = model.config.text.sep_token_id
    for row in ids.tolist():
        if sep in row:
            assert row.index(sep) >= 9  # no [SEP] before min_length tokens (prompt included)
    caps = model.generate(images(2), sample=True, num_captions=3)
    assert len(caps) == 2 and all(len(c) == 3 for c in caps)
    assert not any(c.startswith("a picture of") for cs in caps for c in cs)


def test_per_image_seeds_make_captions_independent_of_batch(tok):
    """One seed per image: an image's captions are the same alone, in a batch, and on a second run (more in
    tests/test_generate.py)."""
    model = make("caption", tok).eval()
    x = images(3)
    full = model.generate_ids(x, sample=True, num_captions=2, seeds=torch.tensor([5, 6, 7]))
    alone = model.generate_ids(x[1:2], sample=True, num_captions=2, seeds=torch.tensor([6]))
    n = alone.shape[1]
    assert torch.equal(full[2:4, :n], alone)
    assert torch.equal(full, model.generate_ids(x, sample=True, num_captions=2, seeds=torch.tensor([5, 6, 7])))
    assert not torch.equal(full, model.generate_ids(x, sample=True, num_captions=2, seeds=torch.tensor([5, 9, 7])))


def test_score_shapes_and_ranges(tok):
    model = make("retrieval", tok).eval()
    itm, itc = model.score(images(2), [TEXTS[:3], []])
    assert [len(x) for x in itm] == [3, 0] and [len(x) for x in itc] == [3, 0]
    assert all(0.0 <= p <= 1.0 for p in itm[0]) and all(-1.0 <= s <= 1.0 for s in itc[0])
    # the batched path equals scoring each text alone
    single = [model.score(images(2)[:1], [[t]]) for t in TEXTS[:3]]
    torch.testing.assert_close(torch.tensor(itm[0]), torch.tensor([s[0][0][0] for s in single]), atol=1e-5, rtol=0)


def test_bf16_inference_runs(tok):
    model = make("caption", tok).eval().to(torch.bfloat16)
    caps = model.generate(images(2), sample=False, num_beams=2, max_length=10)
    assert len(caps) == 2
    filt = make("retrieval", tok).eval().to(torch.bfloat16)
    itm, _ = filt.score(images(1), [["a red circle"]])
    assert 0.0 <= itm[0][0] <= 1.0


def test_vqa_answer_and_loss(tok):
    model = make("vqa", tok).eval()
    answers = model.answer(images(2), ["what colour is the circle", "how many shapes"], num_beams=2)
    assert len(answers) == 2
    loss = model.train()(images(2), ["what colour", "how many"], ["red", "two"])
    assert torch.isfinite(loss)
    loss.backward()


def test_drop_path_only_in_training(tok):
    cfg = BlipConfig.from_name("tiny", vision={"drop_path_rate": 0.5})
    m = BlipCaptioner(cfg)
    x = images(16)
    torch.manual_seed(0)
    m.eval()
    assert torch.equal(m.visual_encoder(x), m.visual_encoder(x))
    m.train()
    assert not torch.equal(m.visual_encoder(x), m.visual_encoder(x))


@pytest.mark.parametrize(
    "top_k,top_p,expected",
    [(0, 1.0, [0.5, 0.3, 0.15, 0.05]), (0, 0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]), (2, 1.0, [0.625, 0.375, 0, 0]),
     (0, 0.5, [1.0, 0, 0, 0])],
)  # fmt: skip
def test_sampler_draws_the_truncated_distribution(top_k, top_p, expected):
    from blip.generate import _sample, row_keys

    n = 40000
    scores = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(n, 1)  # (n, V)
    draws = _sample(scores, top_k, top_p, row_keys(torch.arange(n), per_row=1), step=4)  # n seeds, one row each
    freq = torch.bincount(draws, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor(expected), atol=0.01, rtol=0)


def test_pretrain_inbatch_itc_warmup_leaves_momentum_state_alone(tok):
    model = make("pretrain", tok).train()
    ids, mask = model.tokenize(TEXTS, 30)
    queue = model.image_queue.clone()
    momentum_w = model.visual_encoder_m.norm.weight.detach().clone()
    with torch.no_grad():
        model.visual_encoder.norm.weight.add_(0.1)  # online != momentum: a momentum update would move the copy
    out = model(images(4), ids, mask, inbatch_itc=True)
    assert set(out) == {"loss_itc", "loss_itm", "loss_lm"} and all(torch.isfinite(v) for v in out.values())
    assert int(model.queue_ptr) == 0 and torch.equal(model.image_queue, queue)
    assert torch.equal(model.visual_encoder_m.norm.weight, momentum_w)
    sum(out.values()).backward()
    assert model.visual_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.copy_params()
    assert torch.equal(model.visual_encoder_m.norm.weight, model.visual_encoder.norm.weight)


def test_pretrain_itm_warmup_draws_negatives_uniformly(tok, monkeypatch):
    import blip.model as bm

    seen: list[torch.Tensor] = []
    draw = bm._hard_negatives
    monkeypatch.setattr(bm, "_hard_negatives", lambda w, generator=None: seen.append(w.clone()) or draw(w, generator))
    model = make("pretrain", tok).train()
    ids, mask = model.tokenize(TEXTS, 30)
    uniform = torch.ones(4, 4).fill_diagonal_(0)
    model(images(4), ids, mask, inbatch_itc=True)
    assert len(seen) == 2 and not any(torch.allclose(w, uniform) for w in seen)  # ITC-weighted: hard negatives
    seen.clear()
    out = model(images(4), ids, mask, inbatch_itc=True, random_itm_negatives=True)
    assert len(seen) == 2 and all(torch.equal(w, uniform) for w in seen)
    assert torch.isfinite(out["loss_itm"])
