"""`capfilt eval`: retrieval recall and captioning scores equal independent brute-force computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests._wds import write_tars


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    # 14 samples: 1 corrupt image, 1 empty text (skipped and counted), 12 usable with two texts each
    meta = write_tars(d, 14, per_tar=7, corrupt=1, empty=1, kept_layout=True)
    return d, meta[2:]


def _save(tmp_path, family, vocab):
    from blip import save_pretrained
    from blip.config import BlipConfig
    from blip.model import MODEL_CLASSES, init_weights
    from blip.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family))
    init_weights(model, std=0.2)  # a useful scale, so images and texts actually move the scores
    model.tokenizer = build_tokenizer(vocab)
    out = tmp_path / family
    save_pretrained(model, out)
    return out, model.eval()


def test_retrieval_matches_brute_force(tmp_path, eval_data, tiny_vocab_dir):
    from blip.image import preprocess
    from pipelines.train.data import pre_caption
    from pipelines.train.evaluate import evaluate

    data, meta = eval_data
    path, model = _save(tmp_path, "retrieval", tiny_vocab_dir)
    k = 5
    res = evaluate("retrieval", str(path), str(data), output=str(tmp_path / "r.json"), k_test=k, batch_size=5)
    assert res["skipped"] == {"decode_error": 1, "empty_text": 1}
    assert json.loads((tmp_path / "r.json").read_text())["metrics"] == res["metrics"]

    # brute force, pair by pair: every ITC similarity and every ITM logit, then ranks with plain Python sorting
    from pipelines.train.data import iter_samples, list_tars

    samples = [p for p in iter_samples(list_tars(str(data))) if p.status == "ok"]
    assert [p.key for p in samples] == [m["key"] for m in meta]
    texts = [pre_caption(t) for m in meta for t in m["texts"]]
    owner = [i for i, m in enumerate(meta) for _ in m["texts"]]
    with torch.no_grad():
        px = preprocess([p.image for p in samples], model.config.vision.image_size)
        emb = model.encode_image(px)
        ids, mask = model.tokenize(texts, max_length=35)
        itc = (model.image_feat(emb) @ model.text_feat(ids, mask).t()).numpy()  # (Ni, Nt)
        itm = np.zeros_like(itc)
        for i in range(len(samples)):
            for t in range(len(texts)):
                itm[i, t] = float(model.itm_logits(emb[i : i + 1], ids[t : t + 1], mask[t : t + 1])[0, 1])

    def recall(score_rows, hits, kk):
        n = 0
        for r, row in enumerate(score_rows):
            order = sorted(range(len(row)), key=lambda c: -row[c])
            n += any(c in hits[r] for c in order[:kk])
        return 100.0 * n / len(score_rows)

    def rescored(sim, logits):
        out = []
        for r in range(sim.shape[0]):
            top = set(sorted(range(sim.shape[1]), key=lambda c: -sim[r, c])[:k])
            out.append([sim[r, c] + logits[r, c] if c in top else -100.0 for c in range(sim.shape[1])])
        return out

    i2t, t2i = rescored(itc, itm), rescored(itc.T, itm.T)
    img_hits = [{t for t in range(len(texts)) if owner[t] == i} for i in range(len(samples))]
    txt_hits = [{owner[t]} for t in range(len(texts))]
    for kk in (1, 5, 10):
        assert res["metrics"][f"txt_r{kk}"] == pytest.approx(recall(i2t, img_hits, kk), abs=1e-9)
        assert res["metrics"][f"img_r{kk}"] == pytest.approx(recall(t2i, txt_hits, kk), abs=1e-9)
    # per query ranks (for paired comparisons): each R@K is the share of ranks below K
    ranks = res["ranks"]
    assert (len(ranks["image_to_text"]), len(ranks["text_to_image"])) == (len(samples), len(texts))
    qk = res["query_keys"]  # whose rank each one is
    assert qk["image_to_text"] == [m["key"] for m in meta]
    assert qk["text_to_image"] == [f"{m['key']}#{j}" for m in meta for j in range(len(m["texts"]))]
    for kk in (1, 5):
        assert res["metrics"][f"txt_r{kk}"] == pytest.approx(100 * np.mean(np.array(ranks["image_to_text"]) < kk))
        assert res["metrics"][f"img_r{kk}"] == pytest.approx(100 * np.mean(np.array(ranks["text_to_image"]) < kk))
    # the re-ranking matters: ITC alone would give other numbers on random weights at least sometimes; and a
    # perfect scorer gets 100
    from capfilt.metrics import retrieval_recall

    ideal = retrieval_recall(
        np.array([[1.0 if owner[t] == i else 0.0 for t in range(len(texts))] for i in range(len(samples))]),
        np.array([[1.0 if owner[t] == i else 0.0 for i in range(len(samples))] for t in range(len(texts))]),
        [sorted(h) for h in img_hits],
        owner,
    )
    assert ideal["r_mean"] == 100.0


def test_caption_eval_matches_direct_scoring(tmp_path, eval_data, tiny_vocab_dir):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from blip.image import preprocess
    from pipelines.train.data import iter_samples, list_tars, pre_caption
    from pipelines.train.evaluate import evaluate

    data, meta = eval_data
    path, model = _save(tmp_path, "caption", tiny_vocab_dir)
    res = evaluate("caption", str(path), str(data), k_test=5, batch_size=4, num_beams=2, max_length=12, min_length=3)
    samples = [p for p in iter_samples(list_tars(str(data))) if p.status == "ok"]
    with torch.no_grad():
        px = preprocess([p.image for p in samples], model.config.vision.image_size)
        caps = [c[0] for c in model.generate(px, sample=False, num_beams=2, max_length=12, min_length=3)]
    assert res["predictions"] == {p.key: c for p, c in zip(samples, caps)}
    tok = PTBTokenizer()
    gts = tok.tokenize({m["key"]: [{"caption": pre_caption(t)} for t in m["texts"]] for m in meta})
    out = tok.tokenize({p.key: [{"caption": c}] for p, c in zip(samples, caps)})
    bleu, _ = Bleu(4).compute_score(gts, out, verbose=0)
    cider, each = Cider().compute_score(gts, out)
    assert res["metrics"]["bleu4"] == pytest.approx(100 * bleu[3])
    assert res["metrics"]["cider"] == pytest.approx(100 * cider)
    # per image (for paired comparisons): each image's own CIDEr, whose mean is the corpus CIDEr
    assert res["per_image"]["cider"] == pytest.approx({k: 100 * c for k, c in zip(gts, each)})
    assert np.mean(list(res["per_image"]["cider"].values())) == pytest.approx(res["metrics"]["cider"])


def test_caption_scores_perfect_and_wrong():
    from capfilt.metrics import caption_scores

    refs = {"a": ["a red circle on the left", "red circle"], "b": ["a blue square in the middle"]}
    perfect = caption_scores({"a": "a red circle on the left", "b": "a blue square in the middle"}, refs)
    wrong = caption_scores({"a": "green triangle", "b": "yellow star at the top"}, refs)
    assert perfect["bleu4"] > 90 and wrong["bleu4"] < perfect["bleu4"]
    assert wrong["cider"] < perfect["cider"]
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({"c": "x"}, refs)


def test_eval_cli_no_tars_is_a_clear_error(tmp_path):
    from cli import main

    r = CliRunner().invoke(main, ["eval", "--task", "retrieval", "--model", str(tmp_path), "--data", str(tmp_path)])
    assert r.exit_code == 1
    assert "no webdataset .tar files" in r.output
