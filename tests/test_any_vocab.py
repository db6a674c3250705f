"""Every BLIP checkpoint, any vocabulary (issue 10): special ids come from the tokenizer, the vocabulary size from the
weights, the VQA answer decoder cross-attends at the text width; VQA ranking and loss checked against brute force.

The models here are small but not our presets: a non-BERT vocabulary of a few hundred tokens with the special tokens
in an unusual order ([SEP] 1, [CLS] 3, [PAD] 4, [DEC]/[ENC] at the end), a 192-wide ViT (3 heads) and a 128-wide text
transformer (2 heads): head dim 64 everywhere, vision width != text width.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from click.testing import CliRunner
from PIL import Image

import blip
from blip.checkpoint import CheckpointError
from blip.config import BlipConfig
from blip.convert import config_to_hf, original_to_hf
from blip.model import MODEL_CLASSES, BlipRetrieval, init_weights
from blip.tokenizer import COMMON_WORDS, build_tokenizer, write_vocab
from cli import main

SPECIALS = ["[MASK]", "[SEP]", "[UNK]", "[CLS]", "[PAD]"]  # ids 0..4: nothing where bert-base-uncased has it
FAMILIES = ["caption", "retrieval", "pretrain", "vqa"]
QUESTIONS = ["what colour is the big circle on the left", "how many"]  # different lengths: padding matters


def write_odd_vocab(directory: Path, dec_enc_inside: bool = False) -> Path:
    """A small BERT-style vocab (tokenizer files too) with the special tokens at unusual ids."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    inside = ["[DEC]", "[ENC]"] if dec_enc_inside else []
    vocab = list(dict.fromkeys(SPECIALS + inside + chars + COMMON_WORDS.split() + ["##" + c for c in "abcdefs"]))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    build_tokenizer(directory / "vocab.txt").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_odd_vocab(tmp_path_factory.mktemp("odd_vocab"))


@pytest.fixture(scope="module")
def tok(vocab: Path):
    return build_tokenizer(vocab)


def odd_config(family: str, tok, **kw) -> BlipConfig:
    cfg = BlipConfig.from_name(
        "tiny", family=family, vision={"width": 192, "heads": 3}, text={"vocab_size": len(tok)}, queue_size=8, **kw
    )
    return cfg.with_tokenizer(tok)


def odd_model(family: str, tok, seed: int = 0, momentum: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = odd_config(family, tok)
    model = BlipRetrieval(cfg, momentum=True) if momentum else MODEL_CLASSES[family](cfg)
    init_weights(model, std=0.1)  # large enough that images and texts change the outputs
    model.tokenizer = tok
    return model.eval()


def pixels(n: int = 2, size: int = 64, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, S, S)


def test_tokenizer_is_the_authority_for_ids(vocab: Path, tmp_path: Path) -> None:
    tok = build_tokenizer(vocab)
    n = len(tok) - 2
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.bos_token_id, tok.enc_token_id) == (
        4, 3, 1, n, n + 1,
    )  # fmt: skip
    cfg = odd_config("caption", tok)
    t = cfg.text
    assert (t.pad_token_id, t.cls_token_id, t.sep_token_id, t.bos_token_id, t.enc_token_id) == (4, 3, 1, n, n + 1)
    assert t.vocab_size == len(tok)
    # [DEC]/[ENC] already in the vocab keep their ids
    inside = build_tokenizer(write_odd_vocab(tmp_path / "inside", dec_enc_inside=True))
    assert (inside.bos_token_id, inside.enc_token_id, len(inside)) == (5, 6, n + 2)  # nothing added
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} tokens but the model's vocabulary is 100"):
        BlipConfig.from_name("tiny", text={"vocab_size": 100}).with_tokenizer(tok)


def test_small_bert_free_vocab_from_write_vocab(tmp_path: Path) -> None:
    """write_vocab(pad_to_bert=False): the synthetic world's small vocabulary; a model trained from it is that small."""
    from pipelines.train.models import build_model
    from pipelines.train.settings import TrainSettings

    d = write_vocab(tmp_path / "v", ["hexagon"], pad_to_bert=False)
    tok = build_tokenizer(d)
    words = tok.convert_tokens_to_ids(["a", "hexagon"])
    assert len(tok) < 1000 and tok("a hexagon").input_ids == [2, *words, 3]
    for task in ("pretrain", "caption", "retrieval"):
        model, t = build_model(TrainSettings(task=task, model="tiny", tokenizer=str(d)), None)
        c = model.config.text
        assert c.vocab_size == len(tok) and (c.pad_token_id, c.cls_token_id, c.sep_token_id) == (0, 2, 3)
        assert (c.bos_token_id, c.enc_token_id) == (tok.bos_token_id, tok.enc_token_id)
        emb = (model.text_decoder.bert if task == "caption" else model.text_encoder).embeddings.word_embeddings
        assert emb.num_embeddings == len(tok)


# -- original-layout checkpoints ({'model': sd}, original key names) of every family -----------------------------------


@torch.no_grad()
def run_every_entry_point(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every public entry point of the model's family; returns the outputs to compare two models on."""
    px = pixels()
    c = model.config.text
    out = [model.encode_image(px), model.extract_features(px, mode="image")]
    if hasattr(model, "generate_ids"):
        beam = model.generate_ids(px, sample=False, num_beams=2, max_length=12)
        greedy = model.generate_ids(px, sample=False, num_beams=1, max_length=12, use_cache=False)
        sampled = model.generate_ids(px, sample=True, num_captions=2, max_length=12, seeds=torch.tensor([0, 1]))
        assert beam[:, 0].eq(c.bos_token_id).all() and len(model.generate(px, sample=False, num_beams=2)) == 2
        out += [beam, greedy, sampled]
    if hasattr(model, "score"):
        texts = [["a red circle", "a dog on the grass"], ["two cats"]]
        for first in ("enc", "cls"):
            out += [torch.tensor([v for row in x for v in row]) for x in model.score(px, texts, first_token=first)]
        out += [model.extract_features(px, ["a red circle", "two dogs"], mode=m) for m in ("text", "multimodal")]
    if hasattr(model, "answer"):
        for attend in (False, True):
            out.append(torch.tensor([len(a) for a in model.answer(px, QUESTIONS, num_beams=2,
                                                                  attend_question_padding=attend)]))  # fmt: skip
        out.append(torch.tensor(model.rank_answers(px, QUESTIONS, ["red", "two", "a dog", "blue"], k=2)))
        out.append(model.extract_features(px, QUESTIONS, mode="multimodal"))
    return out


def train_losses(model: torch.nn.Module) -> list[torch.Tensor]:
    """One training forward of the family (losses finite and differentiable)."""
    px = pixels(4)
    ids, mask = model.tokenize(["a red circle", "a blue square on the left", "two cats", "a picture"], 30)
    fam = model.config.family
    torch.manual_seed(0)
    if fam == "vqa":
        losses = [model(px[:2], QUESTIONS, ["red", "blue", "two"], n=[2, 1], weights=torch.tensor([0.5, 0.5, 1.0]))]
    elif fam == "retrieval":
        losses = list(model(px, ids, mask, idx=torch.tensor([0, 1, 2, 3])).values())
    else:
        losses = [model(px, ids, mask)] if fam == "caption" else list(model(px, ids, mask).values())
    assert all(torch.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_original_layout_checkpoint_any_vocab(family: str, tok, vocab: Path, tmp_path: Path) -> None:
    src = odd_model(family, tok, momentum=family == "retrieval")  # the released retrieval .pth has momentum state
    sd = src.state_dict()
    if family == "vqa":  # the answer decoder reads the 128-d question states, the question encoder the 192-d image
        assert sd["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 128)
        assert sd["text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (128, 192)
    torch.save({"model": sd}, tmp_path / "model.pth")

    loaded = blip.load(tmp_path / "model.pth", tokenizer_path=vocab)
    assert type(loaded) is type(src) and loaded.config.text == src.config.text
    assert loaded.config.vision == src.config.vision and loaded.config.text.sep_token_id == 1
    want = run_every_entry_point(src)
    for x, y in zip(run_every_entry_point(loaded), want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert blip.read_config(tmp_path / "model.pth", tokenizer_path=vocab) == loaded.config

    # training from it: momentum state kept on request, every loss computes
    trained = blip.load(tmp_path / "model.pth", tokenizer_path=vocab, keep_training_state=True).train()
    assert set(trained.state_dict()) == set(sd)
    train_losses(trained)

    # capfilt convert -> our folder, whose config.json records the ids
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "model.pth"), str(tmp_path / "ours"), "--tokenizer",
                                  str(vocab)])  # fmt: skip
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "ours" / "config.json").read_text())["text"]
    assert {k: recorded[k] for k in ("pad_token_id", "cls_token_id", "sep_token_id")} == {
        "pad_token_id": 4, "cls_token_id": 3, "sep_token_id": 1,
    }  # fmt: skip
    assert recorded["bos_token_id"] == tok.bos_token_id and recorded["vocab_size"] == len(tok)
    ours = blip.load(tmp_path / "ours")
    for x, y in zip(run_every_entry_point(ours), want, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_generation_stops_on_the_tokenizers_sep(tok) -> None:
    model = odd_model("caption", tok)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[tok.sep_token_id] += 100.0  # [SEP] (id 1) as soon as allowed
        ids = model.generate_ids(pixels(), sample=False, num_beams=1, max_length=20, min_length=6)
    assert ids.shape == (2, 7) and ids[:, -1].eq(1).all()  # 4 prompt tokens + 1 word + [SEP]
    beam = model.generate_ids(pixels(), sample=False, num_beams=3, max_length=20, min_length=6)
    assert beam.shape == (2, 7) and beam[:, -1].eq(1).all()


def test_mismatched_tokenizer_is_one_clear_error(tok, vocab: Path, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    torch.save({"model": odd_model("caption", tok).state_dict()}, tmp_path / "small.pth")
    for fn in (blip.load, blip.read_config):
        with pytest.raises(CheckpointError, match=r"tokenizer .* does not fit checkpoint .*small\.pth.*30524 tokens"):
            fn(tmp_path / "small.pth", tokenizer_path=tiny_vocab_dir)  # the bert-base vocab is 30524 long
    img = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    for args in (["caption", str(img)], ["score", str(img), "a dog"], ["vqa", str(img), "what?"]):
        r = CliRunner().invoke(
            main, [*args, "--model", str(tmp_path / "small.pth"), "--tokenizer", str(tiny_vocab_dir)]
        )
        assert r.exit_code == 1 and r.stdout == "", r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "does not fit" in lines[0], r.stderr


def test_read_config_reads_no_weights_for_folders(tok, tmp_path: Path, monkeypatch) -> None:
    import blip.checkpoint

    model = odd_model("retrieval", tok)
    blip.save_pretrained(model, tmp_path / "ours")
    hf = hf_model("retrieval", model)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")

    def no_weights(*a, **k):
        raise AssertionError("read_config read weights")

    monkeypatch.setattr(blip.checkpoint, "_read_file", no_weights)
    assert blip.read_config(tmp_path / "ours") == model.config
    got = blip.read_config(tmp_path / "hf")
    assert got.text.sep_token_id == 1 and got.text.vocab_size == len(tok) and got.vision.width == 192
    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((tmp_path / "ours" / f).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer for .*notok"):
        blip.read_config(tmp_path / "notok")
    (tmp_path / "ours" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        blip.read_config(tmp_path / "ours")


# -- transformers folders saved with a custom vocabulary --------------------------------------------------------------

HF_CLASSES = {
    "caption": transformers.BlipForConditionalGeneration,
    "retrieval": transformers.BlipForImageTextRetrieval,
    "vqa": transformers.BlipForQuestionAnswering,
}


def hf_model(family: str, ours: torch.nn.Module) -> torch.nn.Module:
    d = config_to_hf(ours.config)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=ours.config.embed_dim
    )
    hf = HF_CLASSES[family](hf_cfg).eval()
    hf.load_state_dict(original_to_hf(ours.state_dict()), strict=True)
    return hf


@pytest.mark.parametrize("family", ["caption", "retrieval", "vqa"])
def test_transformers_folder_with_custom_vocab(family: str, tok, tmp_path: Path) -> None:
    if family == "vqa":  # transformers' VQA decoder cross-attends at the vision width: only equal widths exist there
        torch.manual_seed(0)
        src = MODEL_CLASSES["vqa"](BlipConfig.from_name("tiny", family="vqa", text={"vocab_size": len(tok)})
                                   .with_tokenizer(tok))  # fmt: skip
        init_weights(src, std=0.1)
        src.tokenizer = tok
        src.eval()
        with pytest.raises(ValueError, match="no transformers equivalent"):
            config_to_hf(odd_config("vqa", tok))
    else:
        src = odd_model(family, tok)
    hf = hf_model(family, src)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    loaded = blip.load(tmp_path / "hf")
    c = loaded.config.text
    assert (c.vocab_size, c.pad_token_id, c.cls_token_id, c.sep_token_id) == (len(tok), 4, 3, 1)
    assert (c.bos_token_id, c.enc_token_id) == (tok.bos_token_id, tok.enc_token_id)
    px = pixels(size=src.config.vision.image_size)
    enc = tok(["a red circle on the left", "two cats"], padding=True, return_tensors="pt")
    with torch.no_grad():
        if family == "caption":  # the same logits as transformers, and the same greedy ids
            ids = enc.input_ids.clone()
            ids[:, 0] = tok.bos_token_id
            want = hf(pixel_values=px, input_ids=ids, attention_mask=enc.attention_mask).logits
            got = loaded.logits(px, ids, enc.attention_mask)
            keep = enc.attention_mask.bool()
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
        elif family == "retrieval":  # ITM with [CLS] first is exactly what transformers computes by default
            want = hf(input_ids=enc.input_ids, pixel_values=px, attention_mask=enc.attention_mask).itm_score
            got = loaded.itm_logits(loaded.encode_image(px), enc.input_ids, enc.attention_mask, first_token="cls")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            enc_first = loaded.itm_logits(loaded.encode_image(px), enc.input_ids, enc.attention_mask)
            assert (enc_first - got).abs().max() > 1e-3  # the two conventions differ
        else:
            q = tok(QUESTIONS, padding=True, return_tensors="pt")
            ids = q.input_ids.clone()
            ids[:, 0] = tok.enc_token_id
            image_embeds = hf.vision_model(pixel_values=px).last_hidden_state
            want = hf.text_encoder(input_ids=ids, attention_mask=q.attention_mask, encoder_hidden_states=image_embeds)
            got, _ = loaded.encode_question(px, QUESTIONS)
            keep = q.attention_mask.bool()
            torch.testing.assert_close(got[keep], want.last_hidden_state[keep], rtol=1e-4, atol=1e-4)
    for x, y in zip(run_every_entry_point(loaded), run_every_entry_point(src), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# -- VQA against brute force ------------------------------------------------------------------------------------------


def smoothed_nll(logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Label-smoothed cross-entropy of each position, written out: (1 - eps) * NLL + eps * mean over the vocab."""
    logp = logits.float().log_softmax(-1)  # (T, V)
    return (1 - eps) * -logp.gather(1, target[:, None])[:, 0] + eps * -logp.mean(-1)  # (T,)


@torch.no_grad()
def alone(model, px: torch.Tensor, question: str, answer: str) -> tuple[float, float]:
    """One question and one answer with no batch and no padding: (P(first answer token), summed smoothed loss)."""
    c = model.config.text
    q = model.tokenizer([question], return_tensors="pt").input_ids
    q[:, 0] = c.enc_token_id
    states, _ = model.text_encoder(q, None, model.encode_image(px[None]))
    a = model.tokenizer([answer], return_tensors="pt").input_ids
    a[:, 0] = c.bos_token_id
    logits, _ = model.text_decoder(a, None, states)  # (1, Ta, V)
    first = float(logits[0, 0].float().softmax(-1)[a[0, 1]])
    return first, float(smoothed_nll(logits[0, :-1], a[0, 1:]).sum())


def test_rank_answers_against_brute_force(tok) -> None:
    model = odd_model("vqa", tok, seed=4)
    px = pixels()
    answers = ["red", "two", "a dog", "blue", "a small white cat", "yes", "no", "three people"]
    brute = [[alone(model, px[i], q, a) for a in answers] for i, q in enumerate(QUESTIONS)]
    for k in (1, 3, len(answers)):
        want = []
        for row in brute:
            top = sorted(range(len(answers)), key=lambda j: -row[j][0])[:k]  # most probable first tokens
            want.append(min(top, key=lambda j: row[j][1]))  # highest log-likelihood = lowest summed loss
        assert model.rank_answers(px, QUESTIONS, answers, k=k) == want, k


def test_vqa_loss_normalisation_against_brute_force(tok) -> None:
    model = odd_model("vqa", tok, seed=5)
    px = pixels()
    answers, n = ["red", "a red one", "blue", "two"], [3, 1]  # question 0 has three weighted answers
    weights = torch.tensor([0.5, 0.3, 0.2, 1.0])
    with torch.no_grad():
        got = model(px, QUESTIONS, answers, n=n, weights=weights)
        owner = [0, 0, 0, 1]
        per = [alone(model, px[owner[j]], QUESTIONS[owner[j]], a)[1] for j, a in enumerate(answers)]
        want = sum(float(w) * loss for w, loss in zip(weights, per)) / len(QUESTIONS)  # / questions, not / answers
        torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)
        one_each = model(px, QUESTIONS, ["red", "two"])
        torch.testing.assert_close(one_each, torch.tensor((per[0] + per[3]) / 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        model(px, QUESTIONS, answers, n=[2, 1])


def test_vqa_generation_question_mask_switch(tok) -> None:
    """Default: a padded question is answered as if alone; attend_question_padding=True: as the original's generate
    mode, whose decoder sees the padding positions' states too."""
    from blip.generate import generate_ids

    model = odd_model("vqa", tok, seed=6)
    px = pixels()
    masked = model.answer(px, QUESTIONS, num_beams=1, max_length=8)
    assert masked[1] == model.answer(px[1:], QUESTIONS[1:], num_beams=1, max_length=8)[0]
    with torch.no_grad():
        states, _ = model.encode_question(px, QUESTIONS)
        bos = torch.full((2, 1), tok.bos_token_id)
        ids = generate_ids(model.text_decoder, states, bos, eos_token_id=1, pad_token_id=4, num_beams=1, max_length=8,
                           min_length=1)  # fmt: skip
    want = [a.strip() for a in tok.batch_decode(ids, skip_special_tokens=True)]
    assert model.answer(px, QUESTIONS, num_beams=1, max_length=8, attend_question_padding=True) == want


def test_extract_features_as_the_original(tok) -> None:
    model = odd_model("pretrain", tok)
    px = pixels()
    texts = ["a red circle", "two dogs on the grass"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.extract_features(px, mode="image"), model.visual_encoder(px))
        text = model.extract_features(texts=texts, mode="text")
        torch.testing.assert_close(text, model.text_encoder(enc.input_ids, enc.attention_mask)[0])
        torch.testing.assert_close(F.normalize(model.text_proj(text[:, 0]), dim=-1), model.text_feat(enc.input_ids,
                                   enc.attention_mask))  # fmt: skip
        ids = enc.input_ids.clone()
        ids[:, 0] = tok.enc_token_id
        want = model.text_encoder(ids, enc.attention_mask, model.visual_encoder(px))[0]
        torch.testing.assert_close(model.extract_features(px, texts, mode="multimodal"), want)
    with pytest.raises(ValueError, match="mode must be"):
        model.extract_features(px, texts, mode="both")
    with pytest.raises(ValueError, match="no text encoder"):
        odd_model("caption", tok).extract_features(px, texts, mode="text")


def test_cli_score_first_token_and_vqa(tok, vocab: Path, tmp_path: Path) -> None:
    from capfilt.predict import read_images

    img = tmp_path / "img.png"
    Image.new("RGB", (70, 50), (20, 200, 30)).save(img)
    filt = blip.save_pretrained(odd_model("retrieval", tok), tmp_path / "filter")
    vqa = blip.save_pretrained(odd_model("vqa", tok, seed=2), tmp_path / "vqa")
    model = blip.load(filt)
    px = blip.image.normalize(read_images([str(img)], 64), model.config.image_mean, model.config.image_std)
    for first in ("enc", "cls"):
        r = CliRunner().invoke(
            main, ["score", str(img), "a green square", "--model", str(filt), "--first-token", first]
        )
        assert r.exit_code == 0, r.output
        itm = float(r.stdout.strip().splitlines()[1].split("\t")[0])
        assert itm == pytest.approx(model.score(px, [["a green square"]], first_token=first)[0][0][0], abs=1e-4)

    answers = ["green", "red", "two", "a square"]
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    (tmp_path / "answers.txt").write_text("\n".join(answers) + "\n")
    vmodel = blip.load(vqa)
    vpx = px.expand(2, -1, -1, -1)
    want_rank = [answers[i] for i in vmodel.rank_answers(vpx, QUESTIONS, answers, k=2)]
    for f in ("answers.json", "answers.txt"):
        r = CliRunner().invoke(main, ["vqa", str(img), *QUESTIONS, "--model", str(vqa), "--answers", str(tmp_path / f),
                                      "--k", "2"])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert [ln.split("\t") for ln in r.stdout.strip().splitlines()] == [list(x) for x in zip(QUESTIONS, want_rank)]
    r = CliRunner().invoke(main, ["vqa", str(img), *QUESTIONS, "--model", str(vqa), "--beam", "2"])
    assert r.exit_code == 0, r.output
    want = vmodel.answer(vpx, QUESTIONS, num_beams=2)
    assert [ln.split("\t", 1)[1] if "\t" in ln else "" for ln in r.stdout.rstrip("\n").split("\n")] == want
    r = CliRunner().invoke(main, ["vqa", str(img), "what?", "--model", str(filt)])
    assert r.exit_code == 1 and "needs a vqa model" in r.stderr
