"""Evaluation metrics on plain arrays (no model, no Ray): retrieval recall@K and captioning BLEU-4 / CIDEr.

Retrieval follows the original BLIP evaluation: rank by ITC similarity, re-score the top k candidates with
ITM logit + ITC similarity (the rest get -100), then recall@K in both directions. Captioning uses the COCO caption
scorer package (`pycocoevalcap`: PTB tokenizer, BLEU, CIDEr), not a hand-written CIDEr.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def rerank(
    sim: np.ndarray, itm_logit: Callable[[int, np.ndarray], np.ndarray], k: int, axis_images: bool = True
) -> np.ndarray:
    """Re-score the top-k of each row of `sim` with `itm_logit(row, candidates) + sim`; others get -100.

    sim: (R, C) ITC similarities (rows are queries). itm_logit(r, cols) -> (len(cols),) ITM match logits.
    """
    R, C = sim.shape
    k = min(k, C)
    out = np.full((R, C), -100.0, dtype=np.float64)
    for r in range(R):
        top = np.argsort(-sim[r], kind="stable")[:k]
        out[r, top] = np.asarray(itm_logit(r, top), dtype=np.float64) + sim[r, top]
    return out


def retrieval_ranks(
    score_i2t: np.ndarray, score_t2i: np.ndarray, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the 0-based rank of its best true match: (Ni,) for image -> text (the best of the image's texts),
    (Nt,) for text -> image."""
    ranks_i = np.empty(len(img2txt), dtype=np.int64)
    for i, row in enumerate(score_i2t):
        order = np.argsort(-row, kind="stable")
        ranks_i[i] = min(int(np.where(order == t)[0][0]) for t in img2txt[i])
    ranks_t = np.empty(len(txt2img), dtype=np.int64)
    for t, row in enumerate(score_t2i):
        order = np.argsort(-row, kind="stable")
        ranks_t[t] = int(np.where(order == txt2img[t])[0][0])
    return ranks_i, ranks_t


def retrieval_recall(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent. score_i2t (Ni, Nt), score_t2i (Nt, Ni); an image is a hit when any of its texts ranks
    within K; a text when its image does. Also the mean of the six numbers (`r_mean`), as the original."""
    return recall_at(*retrieval_ranks(score_i2t, score_t2i, img2txt, txt2img), ks)


def recall_at(ranks_i: np.ndarray, ranks_t: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent (and `r_mean`) from retrieval_ranks' per-query ranks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * float(np.mean(ranks_i < k))  # image -> text
    for k in ks:
        out[f"img_r{k}"] = 100.0 * float(np.mean(ranks_t < k))  # text -> image
    out["r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks] + [out[f"img_r{k}"] for k in ks]))
    return out


def _simple_tokenize(text: str) -> str:
    # used only when Java (needed by the PTB tokenizer) is missing: lowercase, punctuation removed, as PTB mostly does
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


def caption_scores(
    preds: dict[str, str], refs: dict[str, list[str]], per_image: dict[str, dict[str, float]] | None = None
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr of `preds[key]` against `refs[key]` with pycocoevalcap (PTB tokenizer when Java exists);
    `per_image`, when given, receives each image's CIDEr (the corpus score is their mean)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    keys = sorted(preds)
    missing = [k for k in keys if not refs.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predicted captions have no reference caption (e.g. {missing[0]})")
    if not keys:
        raise ValueError("no captions to score")
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in refs[k]] for k in keys})
        res = tok.tokenize({k: [{"caption": preds[k]}] for k in keys})
        tokenizer = "ptb"
    else:
        gts = {k: [_simple_tokenize(c) for c in refs[k]] for k in keys}
        res = {k: [_simple_tokenize(preds[k])] for k in keys}
        tokenizer = "simple (no java)"
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    if per_image is not None:
        per_image["cider"] = {k: 100.0 * float(c) for k, c in zip(gts, cider_each)}  # in gts order, as Cider
    return {
        "bleu1": 100.0 * float(bleu[0]),
        "bleu4": 100.0 * float(bleu[3]),
        "cider": 100.0 * float(cider),
        "tokenizer": tokenizer,  # type: ignore[dict-item]
    }


def coco_image_id(meta: dict, key: str = "") -> int:
    """A sample's COCO image id, as the original loaders give it: `img_id` (NoCaps: `int(ann['img_id'])`), else the
    number at the end of the image's file name, exactly as `coco_karpathy_caption_eval` derives it
    (`ann['image'].split('/')[-1].strip('.jpg').split('_')[-1]`: "val2014/COCO_val2014_000000391895.jpg" -> 391895)."""
    if meta.get("img_id") is not None:
        return int(meta["img_id"])
    image = meta.get("image")
    if isinstance(image, str):
        try:
            return int(image.split("/")[-1].strip(".jpg").split("_")[-1])
        except ValueError:
            pass
    raise ValueError(
        f"sample {key}: no COCO image id (no img_id in its json, and its image {image!r} does not end in a number); "
        "ingest the annotation file with `capfilt ingest --annotations`"
    )


def _java_note(name: str) -> str | None:
    return None if shutil.which("java") else f"{name} skipped: it needs Java (`java` not on PATH)"


COCO_SCORERS = ("bleu", "meteor", "rouge_l", "cider", "spice")


def coco_caption_scores(
    gt: dict,
    results: list[dict],
    per_image: dict[int, dict[str, float]] | None = None,
    scorers: Sequence[str] = COCO_SCORERS,
) -> tuple[dict[str, float], list[str]]:
    """The COCO caption evaluation the original runs (`coco_caption_eval`: pycocotools COCO + loadRes + COCOEvalCap:
    PTB tokenizer, BLEU-1..4, METEOR, ROUGE_L, CIDEr, SPICE) on a ground truth in COCO annotation format (a dict, as
    `json.load` of e.g. coco_karpathy_test_gt.json) and results [{"image_id": int, "caption": str}].

    Scored on the images of `results` (COCOEvalCap's `params['image_id'] = cocoRes.getImgIds()`; the standard
    protocol has a result for every ground-truth image). Scores x 100 (`bleu4`, `cider`, ... as the rest of capfilt).
    A scorer that cannot run here (METEOR and SPICE need Java; SPICE also Stanford CoreNLP, which pycocoevalcap
    downloads at first use) is skipped with one note; returns (metrics, notes). `scorers`: a subset of COCO_SCORERS
    (METEOR alone takes ~20 s to load its paraphrase table). `per_image`, when given, receives
    each image's score per metric, keyed by image id.
    """
    import contextlib
    import os

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocotools.coco import COCO

    unknown = set(scorers) - set(COCO_SCORERS)
    if unknown:
        raise ValueError(f"unknown caption scorers {sorted(unknown)}; choose from {', '.join(COCO_SCORERS)}")
    notes: list[str] = []
    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
        try:
            res = coco.loadRes([dict(r) for r in results])  # loadRes adds fields
        except AssertionError as e:
            raise ValueError(
                "the predictions' image ids are not all in the ground truth (wrong --ground-truth file, or image ids "
                f"that differ from it): {e}"
            ) from None
    ids = sorted(res.getImgIds())
    if not ids:
        raise ValueError("no captions to score")
    n_gt = len(coco.getImgIds())
    if len(ids) < n_gt:
        notes.append(f"scored {len(ids)} of the {n_gt} ground-truth images (the standard protocol scores all)")
    gts = {i: coco.imgToAnns[i] for i in ids}
    out = {i: res.imgToAnns[i] for i in ids}
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()):
            gts_t, out_t = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(out)
    else:
        notes.append("tokenizer: PTB needs Java; a simple lowercase/punctuation tokenizer was used (scores differ)")
        gts_t = {i: [_simple_tokenize(a["caption"]) for a in gts[i]] for i in ids}
        out_t = {i: [_simple_tokenize(a["caption"]) for a in out[i]] for i in ids}

    def meteor() -> Any:
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()

    def spice() -> Any:
        from pycocoevalcap.spice import get_stanford_models as gsm
        from pycocoevalcap.spice.spice import Spice

        jar = os.path.join(gsm.SPICEDIR, gsm.SPICELIB, f"{gsm.JAR}.jar")
        if not os.path.exists(jar):  # Spice() would download it, and hang or fail without network
            raise RuntimeError(
                f"Stanford CoreNLP ({gsm.JAR}.jar) is not in pycocoevalcap/spice/{gsm.SPICELIB}; pycocoevalcap "
                "downloads it at first use: run `python -m pycocoevalcap.spice.get_stanford_models` once with network"
            )
        return Spice()

    table: list[tuple[str, Callable[[], Any], list[str], str | None]] = [
        ("BLEU", lambda: Bleu(4), ["bleu1", "bleu2", "bleu3", "bleu4"], None),
        ("METEOR", meteor, ["meteor"], _java_note("METEOR")),
        ("ROUGE_L", Rouge, ["rouge_l"], None),
        ("CIDEr", Cider, ["cider"], None),
        ("SPICE", spice, ["spice"], _java_note("SPICE")),
    ]
    metrics: dict[str, float] = {}
    for (name, make, keys, unavailable), short in zip(table, COCO_SCORERS):
        if short not in scorers:
            continue
        if unavailable:
            notes.append(unavailable)
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                scorer = make()
                kw = {"verbose": 0} if name == "BLEU" else {}
                score, each = scorer.compute_score(gts_t, out_t, **kw)
        except Exception as e:  # noqa: BLE001 - a scorer that cannot run here is skipped with a note, not fatal
            notes.append(f"{name} skipped: {type(e).__name__}: {str(e).strip()[:300]}")
            continue
        scores, eaches = (score, each) if len(keys) > 1 else ([score], [each])
        for k, s, e in zip(keys, scores, eaches):
            metrics[k] = 100.0 * float(s)
            if per_image is not None:
                vals = [float(x["All"]["f"]) if isinstance(x, dict) else float(x) for x in e]  # SPICE: dicts
                per_image[k] = {i: 100.0 * v for i, v in zip(gts_t, vals)}
    metrics["tokenizer"] = "ptb" if shutil.which("java") else "simple (no java)"  # type: ignore[assignment]
    return metrics, notes
