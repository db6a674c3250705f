"""Evaluation metrics on plain arrays (no model, no Ray): retrieval recall@K and captioning BLEU-4 / CIDEr.

Retrieval follows the original BLIP evaluation: rank by ITC similarity, re-score the top k candidates with
ITM logit + ITC similarity (the rest get -100), then recall@K in both directions. Captioning uses the COCO caption
scorer package (`pycocoevalcap`: PTB tokenizer, BLEU, CIDEr), not a hand-written CIDEr.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence

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
