"""`capfilt eval`: retrieval recall@1/5/10 both ways and captioning BLEU / METEOR / ROUGE_L / CIDEr / SPICE on
webdataset tars.

Evaluation sets are small (COCO's 5k test images), so this runs in one process on one device, reading the tars with
the same parser as training (bad samples skipped and counted). Retrieval is the original BLIP protocol: every image
against every text of the set (all captions of every image) by ITC similarity, the top `k_test` re-scored with ITM
logit + ITC similarity (`train_retrieval.py`: k_test 256 for COCO, 128 for Flickr30K). Captioning is the original's
too: beam search (3 beams, max 20, min 5 tokens counting the prompt "a picture of "), then either the COCO caption
evaluation against a ground-truth file in COCO annotation format (`ground_truth`: coco_karpathy_test_gt.json,
nocaps_val_4500_captions.json; predictions written in COCO's result format), or, without one, BLEU / CIDEr against
each sample's own texts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip.generation import GenerationConfig
from capfilt.metrics import (
    COCO_SCORERS,
    caption_scores,
    coco_caption_scores,
    coco_image_id,
    recall_at,
    rerank,
    retrieval_ranks,
)

_BEAM = GenerationConfig()  # the original's caption eval: beam search, its defaults declared once there


def load_model(path: str, device: str = "cpu") -> torch.nn.Module:
    """Anything `blip.load` reads (training checkpoints included: their momentum encoders and queues are dropped)."""
    import blip

    return blip.load(path, device=device)


def read_eval_set(
    data: str, image_size: int, max_samples: int | None = None, require_text: bool = True
) -> dict[str, Any]:
    """keys, (N, S, S, 3) uint8 images (eval transform), texts per image, each sample's json, and skipped-sample
    counts. `require_text=False` keeps images without texts (captioning against a ground-truth file)."""
    from pipelines.train.data import eval_transform, iter_samples, list_tars

    keys, images, texts, metas, truth = [], [], [], [], {}
    skipped: dict[str, int] = {}
    for p in iter_samples(list_tars(data), require_text=require_text):
        if p.status != "ok":
            skipped[p.status] = skipped.get(p.status, 0) + 1
            continue
        keys.append(p.key)
        images.append(eval_transform(p.image, image_size))
        texts.append(p.texts)
        metas.append(p.meta or {})
        synth = (p.meta or {}).get("synth")
        if isinstance(synth, dict) and isinstance(synth.get("objects"), list):
            truth[p.key] = synth["objects"]
        if max_samples is not None and len(keys) >= max_samples:
            break
    if not keys:
        hint = ""
        if require_text and skipped.get("empty_text"):
            hint = "; images without captions (NoCaps) are scored against a ground-truth file: --ground-truth GT.json"
        raise ValueError(f"no usable samples in {data} (skipped: {skipped}){hint}")
    return {
        "keys": keys, "images": np.stack(images), "texts": texts, "metas": metas, "truth": truth, "skipped": skipped,
    }  # fmt: skip


@torch.no_grad()
def retrieval_eval(
    model: torch.nn.Module, images: np.ndarray, texts: list[list[str]], k_test: int = 256, batch_size: int = 32
) -> dict[str, Any]:
    """Recall@K both ways. images (N, S, S, 3) uint8; texts[i] are the captions of image i."""
    from blip.image import normalize

    cfg = model.config
    flat = [t for ts in texts for t in ts]
    txt2img = [i for i, ts in enumerate(texts) for _ in ts]
    img2txt, j = [], 0
    for ts in texts:
        img2txt.append(list(range(j, j + len(ts))))
        j += len(ts)
    dev = model.device

    embeds, img_feats = [], []
    for b in range(0, len(images), batch_size):
        px = normalize(torch.from_numpy(images[b : b + batch_size]).to(dev), cfg.image_mean, cfg.image_std)
        e = model.encode_image(px)  # (b, L, Dv)
        embeds.append(e)
        img_feats.append(model.image_feat(e))
    image_embeds = torch.cat(embeds)  # (Ni, L, Dv)
    img_feat = torch.cat(img_feats)  # (Ni, E)
    ids, mask = model.tokenize(flat, max_length=35)  # (Nt, T), padded to the longest text
    txt_feat = torch.cat(
        [model.text_feat(ids[b : b + batch_size], mask[b : b + batch_size]) for b in range(0, len(flat), batch_size)]
    )
    sim = (img_feat @ txt_feat.t()).float().cpu().numpy()  # (Ni, Nt)

    def itm_i2t(i: int, cand: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(cand).to(dev)
        e = image_embeds[i : i + 1].expand(len(cand), -1, -1)
        return model.itm_logits(e, ids[c], mask[c])[:, 1].float().cpu().numpy()

    def itm_t2i(t: int, cand: np.ndarray) -> np.ndarray:
        c = torch.from_numpy(cand).to(dev)
        n = len(cand)
        return (
            model.itm_logits(image_embeds[c], ids[t : t + 1].expand(n, -1), mask[t : t + 1].expand(n, -1))[:, 1]
            .float()
            .cpu()
            .numpy()
        )

    score_i2t = rerank(sim, itm_i2t, k_test)
    score_t2i = rerank(sim.T.copy(), itm_t2i, k_test)
    ranks_i, ranks_t = retrieval_ranks(score_i2t, score_t2i, img2txt, txt2img)
    metrics = recall_at(ranks_i, ranks_t)
    return {
        "metrics": metrics,
        "num_images": len(images),
        "num_texts": len(flat),
        "k_test": min(k_test, len(flat)),
        # per query, for paired comparisons of two models on the same test set (pipelines.bootstrap)
        "ranks": {"image_to_text": ranks_i.tolist(), "text_to_image": ranks_t.tolist()},
    }


@torch.no_grad()
def caption_eval(
    model: torch.nn.Module,
    keys: list[str],
    images: np.ndarray,
    texts: list[list[str]],
    batch_size: int = 32,
    num_beams: int = _BEAM.num_beams,
    max_length: int = _BEAM.max_length,
    min_length: int = _BEAM.min_length,
    truth: dict[str, list[dict[str, str]]] | None = None,
    repetition_penalty: float = _BEAM.repetition_penalty,
    ground_truth: dict | None = None,
    metas: list[dict[str, Any]] | None = None,
    scorers: Sequence[str] = COCO_SCORERS,
) -> dict[str, Any]:
    """Beam-search captions (the original eval settings), scored against `ground_truth` (a COCO-format annotation
    dict; image ids from each sample's json, `metas`) when given, else against each image's texts."""
    from blip.image import normalize

    cfg = model.config
    preds: dict[str, str] = {}
    for b in range(0, len(images), batch_size):
        px = normalize(torch.from_numpy(images[b : b + batch_size]).to(model.device), cfg.image_mean, cfg.image_std)
        caps = model.generate(
            px, sample=False, num_beams=num_beams, max_length=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty,
        )  # fmt: skip
        for k, c in zip(keys[b : b + batch_size], caps):
            preds[k] = c[0]
    if ground_truth is not None:
        return _score_against_ground_truth(keys, preds, ground_truth, metas or [{}] * len(keys), len(images), scorers)
    refs = dict(zip(keys, texts))
    per_image: dict[str, dict[str, float]] = {}
    metrics: dict[str, Any] = caption_scores(preds, refs, per_image)
    if truth and all(k in truth for k in keys):  # the synthetic world knows what is in each image
        from capfilt.synth import caption_accuracy

        per_image["synth_attribute_accuracy"] = {k: 100.0 * caption_accuracy(preds[k], truth[k]) for k in keys}
        metrics["synth_attribute_accuracy"] = float(np.mean(list(per_image["synth_attribute_accuracy"].values())))
    # per_image: for paired comparisons of two models on the same test set (pipelines.bootstrap)
    return {"metrics": metrics, "num_images": len(images), "predictions": preds, "per_image": per_image}


def _score_against_ground_truth(
    keys: list[str],
    preds: dict[str, str],
    gt: dict,
    metas: list[dict[str, Any]],
    n_images: int,
    scorers: Sequence[str] = COCO_SCORERS,
) -> dict[str, Any]:
    """COCO results [{"image_id", "caption"}] (one per image id: the first, as the original's
    `save_result(..., remove_duplicate='image_id')`) scored by the COCO caption evaluation."""
    results, key_of = [], {}
    for k, m in zip(keys, metas):
        i = coco_image_id(m, k)
        if i not in key_of:
            key_of[i] = k
            results.append({"image_id": i, "caption": preds[k]})
    per_id: dict[str, dict[int, float]] = {}
    metrics, notes = coco_caption_scores(gt, results, per_id, scorers)
    per_image = {m: {key_of[i]: v for i, v in vals.items()} for m, vals in per_id.items() if m in ("cider", "bleu4")}
    return {
        "metrics": metrics, "num_images": n_images, "predictions": preds, "per_image": per_image,
        "results": results, "notes": notes,
    }  # fmt: skip


def evaluate(
    task: str,
    model_path: str,
    data: str,
    output: str | None = None,
    k_test: int = 256,
    batch_size: int = 32,
    max_samples: int | None = None,
    num_beams: int = _BEAM.num_beams,
    max_length: int = _BEAM.max_length,
    min_length: int = _BEAM.min_length,
    device: str | None = None,
    ground_truth: str | None = None,
    repetition_penalty: float = _BEAM.repetition_penalty,
    scorers: Sequence[str] = COCO_SCORERS,
) -> dict[str, Any]:
    """Run one evaluation; prints a table, writes JSON to `output` (a file, or a folder -> eval_<task>.json; with
    `ground_truth` also the predictions in COCO's result format, <stem>_results.json / caption_results.json)."""
    if task not in ("retrieval", "caption"):
        raise ValueError(f"unknown eval task {task!r}; expected 'retrieval' or 'caption'")
    if ground_truth is not None and task != "caption":
        raise ValueError("--ground-truth is for captioning (a COCO-format caption file); retrieval uses the texts")
    if set(scorers) - set(COCO_SCORERS):  # before any caption is generated
        raise ValueError(f"unknown --scorers {sorted(set(scorers) - set(COCO_SCORERS))}; choose from {COCO_SCORERS}")
    import blip
    from pipelines.settings import resolve_path, resolve_paths
    from pipelines.train.data import list_tars

    model_path, data, output = resolve_path(model_path, hub=True), resolve_paths(data), resolve_path(output)
    list_tars(data)  # fail fast on a --data path without tars
    gt = None
    if ground_truth is not None:
        ground_truth = resolve_path(ground_truth)
        gt = _read_ground_truth(str(ground_truth))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = load_model(model_path, device)
    role, what = {"retrieval": ("filter", "retrieval"), "caption": ("captioner", "captioning")}[task]
    blip.check_family(model.config.family, role, model_path, what)
    ds = read_eval_set(data, model.config.vision.image_size, max_samples, require_text=gt is None)
    if task == "retrieval":
        res = retrieval_eval(model, ds["images"], ds["texts"], k_test, batch_size)
        # who each rank belongs to: paired comparisons match queries by key, not by position (pipelines.bootstrap)
        res["query_keys"] = {
            "image_to_text": ds["keys"],
            "text_to_image": [f"{k}#{j}" for k, ts in zip(ds["keys"], ds["texts"]) for j in range(len(ts))],
        }
    else:
        res = caption_eval(
            model, ds["keys"], ds["images"], ds["texts"], batch_size, num_beams, max_length, min_length, ds["truth"],
            repetition_penalty, gt, ds["metas"], scorers,
        )  # fmt: skip
        if gt is not None:
            res["ground_truth"] = ground_truth
    res.update({"task": task, "model": model_path, "data": data, "skipped": ds["skipped"], "seconds": time.time() - t0})
    print(format_table(res))
    if output:
        p = Path(output)
        if p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / f"eval_{task}.json"
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        if "results" in res:  # COCO's result format, as the original's save_result writes it
            rp = p.with_name("caption_results.json" if p.name == "eval_caption.json" else f"{p.stem}_results.json")
            rp.write_text(json.dumps(res["results"]))
            res["results_json"] = str(rp)
        p.write_text(json.dumps(res, indent=2))
        res["json"] = str(p)
    return res


def _read_ground_truth(path: str) -> dict:
    """A caption ground truth in COCO annotation format ({"images": [{"id"}], "annotations": [{"image_id",
    "caption"}]}), checked enough for one clear error instead of a KeyError deep in pycocotools."""
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            gt = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--ground-truth {path} is not JSON: {e}") from None
    anns = gt.get("annotations") if isinstance(gt, dict) else None
    if not isinstance(anns, list) or not isinstance(gt.get("images"), list) or not anns:
        raise ValueError(
            f"--ground-truth {path} is not a caption file in COCO annotation format (a JSON object with 'images' "
            "and 'annotations' lists, e.g. coco_karpathy_test_gt.json)"
        )
    if not all(isinstance(a, dict) and "image_id" in a and "caption" in a for a in anns):
        raise ValueError(f"--ground-truth {path}: every annotation needs 'image_id' and 'caption'")
    for i, a in enumerate(anns):  # the released files carry ids; loadRes and the scorers only need them unique
        a.setdefault("id", i + 1)
    return gt


def format_table(res: dict[str, Any]) -> str:
    m = res["metrics"]
    lines = [f"{res['task']} eval of {res['model']} on {res['num_images']} images"]
    if res["task"] == "retrieval":
        lines.append(f"{'':14}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
        lines.append(f"{'image->text':14}" + "".join(f"{m[f'txt_r{k}']:8.2f}" for k in (1, 5, 10)))
        lines.append(f"{'text->image':14}" + "".join(f"{m[f'img_r{k}']:8.2f}" for k in (1, 5, 10)))
        lines.append(f"mean recall {m['r_mean']:.2f}  ({res['num_texts']} texts, ITM re-rank of top {res['k_test']})")
    else:
        for k, v in m.items():
            lines.append(f"{k:16}{v:10.2f}" if isinstance(v, float) else f"{k:16}{v!s:>10}")
    if res.get("skipped"):
        lines.append(f"skipped samples: {res['skipped']}")
    for note in res.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
