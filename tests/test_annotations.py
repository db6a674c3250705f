"""BLIP's annotation files (COCO Karpathy, Flickr30K, NoCaps) -> shards -> fine-tuning and the standard evaluation.

The files are written here with the original loaders' field names and nesting (`data/coco_karpathy_dataset.py`,
`data/flickr30k_dataset.py`, `data/nocaps_dataset.py`), the images with PIL, the ground truths in COCO annotation
format (what `data/utils.py:coco_caption_eval` loads with pycocotools).
"""

from __future__ import annotations

import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from cli import main
from tests._wds import COLOURS, SHAPES, draw_scene

ROOT = Path(__file__).resolve().parent.parent


def _captions(colour: str, shape: str) -> list[str]:
    return [
        f"A {colour} {shape}.",
        f"a {colour} {shape} on white background",
        f"a picture of a {colour} {shape}",
        f"{shape} {colour}",
        f"the {colour} {shape} on a white background",
    ]


@pytest.fixture(scope="module")
def ann(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Annotation files in every layout + images (one missing, one PNG behind a .jpg name, one not an image)."""
    d = tmp_path_factory.mktemp("ann")
    img = d / "images"
    rng = random.Random(0)
    combos = [(c, s) for c in COLOURS for s in SHAPES]

    def save(rel: str, i: int, fmt: str = "JPEG") -> None:
        p = img / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(*combos[i % len(combos)], 48, rng).save(p, format=fmt)

    # coco_karpathy_train.json: one record per caption (image, caption, image_id), images' captions consecutive
    train = []
    for i in range(6):
        rel, cid = f"train2014/COCO_train2014_{100 + i:012d}.jpg", 100 + i
        save(rel, i)
        train += [{"caption": c, "image": rel, "image_id": f"coco_{cid}"} for c in _captions(*combos[i])]
    # coco_karpathy_test.json: one record per image with its caption list; the last image is missing on disk
    test, gt_images, gt_anns = [], [], []
    for i in range(6):
        cid = 391895 + i
        rel = f"val2014/COCO_val2014_{cid:012d}.jpg"
        if i < 5:
            save(rel, i + 3)
        test.append({"image": rel, "caption": _captions(*combos[(i + 3) % len(combos)])})
        gt_images.append({"id": cid})
        gt_anns += [{"image_id": cid, "caption": c, "id": len(gt_anns) + 1} for c in test[-1]["caption"]]
    gt = {"annotations": gt_anns, "images": gt_images, "type": "captions", "info": "dummy", "licenses": "dummy"}
    # flickr30k_test.json: one PNG behind a .jpg name (converted to JPEG), one file that is not an image
    flickr = []
    for i in range(4):
        rel = f"flickr30k-images/{1000092795 + i}.jpg"
        if i == 3:
            (img / rel).write_bytes(b"<html>not an image</html>")
        else:
            save(rel, i + 6, "PNG" if i == 1 else "JPEG")
        flickr.append({"image": rel, "caption": _captions(*combos[(i + 6) % len(combos)])})
    # nocaps_val.json: images only (image, img_id), and its ground truth
    nocaps, nc_images, nc_anns = [], [], []
    for i in range(3):
        rel = f"val/{'0013ea2087020901'[: 14 + i]}.jpg"
        save(rel, i + 9)
        nocaps.append({"image": rel, "img_id": i})
        nc_images.append({"id": i, "file_name": rel.split("/")[-1]})
        nc_anns += [{"image_id": i, "caption": c, "id": len(nc_anns)} for c in _captions(*combos[i + 9])[:3]]
    files = {
        "coco_karpathy_train.json": train,
        "coco_karpathy_test.json": test,
        "coco_karpathy_test_gt.json": gt,
        "flickr30k_test.json": flickr,
        "nocaps_val.json": nocaps,
        "nocaps_val_gt.json": {"images": nc_images, "annotations": nc_anns},
    }
    for name, obj in files.items():
        (d / name).write_text(json.dumps(obj))
    return {"dir": d, "images": img, **{k.removesuffix(".json"): v for k, v in files.items()}}


def _ingest(ann: dict, name: str, out: Path, *extra: str) -> str:
    args = ["ingest", "--annotations", str(ann["dir"] / f"{name}.json"), "--image-root", str(ann["images"])]
    r = CliRunner().invoke(main, [*args, str(out), "--threads", "4", *extra])
    assert r.exit_code == 0, r.output
    return r.output


def _samples(out: Path) -> dict[str, dict]:
    tars = sorted(str(p) for p in out.glob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False)}


def _sidecar(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))], ignore_index=True)


# ---------------------------------------------------------------------------------------------------- ingest


def test_detect_layout_and_bad_files(tmp_path: Path) -> None:
    from pipelines.annotations import detect_layout
    from pipelines.ingest import IngestError

    assert detect_layout([{"image": "a.jpg", "caption": "x", "image_id": "coco_1"}]) == "train"
    assert detect_layout([{"image": "a.jpg", "caption": ["x", "y"]}]) == "eval"
    assert detect_layout([{"image": "a.jpg", "img_id": 0}]) == "images"
    with pytest.raises(IngestError, match="record 1 is a 'eval'"):
        detect_layout([{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": ["y"]}])
    with pytest.raises(IngestError, match='record 0 not an object with an "image"'):
        detect_layout([{"file": "a.jpg", "caption": "x"}])
    with pytest.raises(IngestError, match="non-empty JSON list"):
        detect_layout({"images": []})
    (tmp_path / "gt.json").write_text(json.dumps({"images": [], "annotations": []}))
    r = CliRunner().invoke(
        main, ["ingest", "--annotations", str(tmp_path / "gt.json"), "--image-root", str(tmp_path), str(tmp_path / "o")]
    )
    assert r.exit_code == 1 and "non-empty JSON list" in r.output and "Traceback" not in r.output
    # the two forms of the positional arguments
    r = CliRunner().invoke(main, ["ingest", "--annotations", str(tmp_path / "gt.json"), str(tmp_path / "o")])
    assert r.exit_code == 2 and "--image-root" in r.output
    r = CliRunner().invoke(main, ["ingest", "--annotations", "a.json", "--image-root", ".", "urls.parquet", "out"])
    assert r.exit_code == 2 and "one argument, OUT" in r.output
    r = CliRunner().invoke(main, ["ingest", "--annotations", "a.json", "--image-root", ".", "o", "--url-col", "u"])
    assert r.exit_code == 2 and "--url-col: only for a URL list" in r.output
    r = CliRunner().invoke(main, ["ingest", "only_out"])
    assert r.exit_code == 2 and "URLS OUT" in r.output


def test_ingest_train_file_one_sample_per_caption_record(ann: dict, tmp_path: Path) -> None:
    out = tmp_path / "train"
    output = _ingest(ann, "coco_karpathy_train", out, "--shard-size", "8")
    assert "layout 'train'" in output and "30 records" in output and "6 images, 30 captions" in output
    samples = _samples(out)
    assert len(samples) == 30 and len(list(out.glob("*.tar"))) == 4
    # img2dataset's keys: shard * 10^ceil(log10(shard size)) + index in shard
    assert sorted(samples) == sorted(f"{s * 10 + i:06d}" for s in range(4) for i in range(8) if s * 8 + i < 30)
    by_index = {s * 8 + i: f"{s * 10 + i:06d}" for s in range(4) for i in range(8)}
    for n, rec in enumerate(ann["coco_karpathy_train"]):
        s = samples[by_index[n]]
        meta = json.loads(s["json"])
        assert s["txt"].decode() == rec["caption"] and meta["texts"] == [rec["caption"]]
        assert meta["image_id"] == rec["image_id"] and meta["image"] == rec["image"]
        assert s["jpg"] == (ann["images"] / rec["image"]).read_bytes()  # JPEG kept byte for byte
    side = _sidecar(out)
    assert len(side) == 30 and set(side["status"]) == {"success"} and side["key"].is_unique
    # what training reads: one text per sample, the record's caption (pre_caption applied as the original)
    from pipelines.train.data import iter_samples, list_tars

    parsed = list(iter_samples(list_tars(str(out))))
    assert [p.status for p in parsed] == ["ok"] * 30 and parsed[0].texts == ["a red circle"]


def test_ingest_eval_files_missing_and_bad_images_are_status_rows(ann: dict, tmp_path: Path) -> None:
    out = tmp_path / "test"
    output = _ingest(ann, "coco_karpathy_test", out, "--shard-size", "4")
    assert "layout 'eval'" in output and "success           5" in output and "failed            1" in output
    samples, side = _samples(out), _sidecar(out)
    assert len(samples) == 5 and len(side) == 6  # every record accounted for
    missing = side[side["status"] != "success"].iloc[0]
    assert missing["status"] == "failed_to_download" and "FileNotFoundError" in missing["error_message"]
    rec = ann["coco_karpathy_test"][5]
    assert missing["image"] == rec["image"] and missing["caption"] == rec["caption"][0]
    assert list(missing["texts"]) == rec["caption"]
    for s in samples.values():
        meta = json.loads(s["json"])
        rec = next(r for r in ann["coco_karpathy_test"] if r["image"] == meta["image"])
        assert meta["texts"] == rec["caption"] and s["txt"].decode() == rec["caption"][0]
    from capfilt.metrics import coco_image_id

    ids = sorted(coco_image_id(json.loads(s["json"])) for s in samples.values())
    assert ids == [391895 + i for i in range(5)]  # from the file name, as coco_karpathy_caption_eval

    out = tmp_path / "flickr"
    output = _ingest(ann, "flickr30k_test", out)
    side = _sidecar(out).set_index("image")
    assert side["status"].tolist() == ["success"] * 3 + ["failed_to_resize"]
    assert "not an image" in side["error_message"].iloc[3]
    png = next(s for s in _samples(out).values() if json.loads(s["json"])["image"].endswith("1000092796.jpg"))
    assert png["jpg"][:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(png["jpg"])).size == (48, 48)
    assert "image missing/unreadable 0, decode/resize 1" in output

    out = tmp_path / "nocaps"
    output = _ingest(ann, "nocaps_val", out)
    assert "layout 'images'" in output
    for s in _samples(out).values():
        meta = json.loads(s["json"])
        assert "txt" not in s and meta["texts"] == [] and meta["img_id"] in (0, 1, 2)


def test_ingest_resumes_and_refuses_to_mix(ann: dict, tmp_path: Path) -> None:
    out = tmp_path / "t"
    _ingest(ann, "coco_karpathy_train", out, "--shard-size", "8")
    (out / "00002_stats.json").unlink()  # as if killed before shard 2's commit point
    (out / "00002.tar").write_bytes(b"partial")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00002.tar"}
    output = _ingest(ann, "coco_karpathy_train", out, "--shard-size", "8")
    assert "resuming: 3 of 4 shards already done" in output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name != "00002.tar"} == before
    assert len(_samples(out)) == 30
    r = CliRunner().invoke(
        main,
        ["ingest", "--annotations", str(ann["dir"] / "coco_karpathy_train.json"), "--image-root", str(ann["images"]),
         str(out), "--shard-size", "10"],
    )  # fmt: skip
    assert r.exit_code == 1 and "other input" in r.output and "--overwrite" in r.output
    _ingest(ann, "coco_karpathy_train", out, "--shard-size", "10", "--overwrite")
    assert len(list(out.glob("*.tar"))) == 3 and len(_samples(out)) == 30


# ---------------------------------------------------------------------------------------------------- metrics


def test_retrieval_hand_computed_five_captions_per_image() -> None:
    """3 images x 5 captions; image 1 is found only through its 4th caption; ranks worked out by hand."""
    from capfilt.metrics import recall_at, rerank, retrieval_ranks

    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(3)]
    txt2img = [t // 5 for t in range(15)]
    i2t = np.zeros((3, 15))
    i2t[0] = np.linspace(0.5, 0.1, 15)  # falls with the index...
    i2t[0, 8], i2t[0, 3] = 0.9, 0.8  # ...but image 1's caption first, then its own 4th: rank 1
    i2t[1] = np.linspace(0.5, 0.1, 15)  # image 0's captions ahead of its own 5..7 (ranks 5..7)...
    i2t[1, 8] = 0.95  # ...and its 4th caption (text 8) on top: rank 0, only through that caption
    i2t[1, 9] = -1.0
    i2t[2] = np.linspace(0.9, 0.1, 15)  # its own captions (10..14) come last but one wins place 6
    i2t[2, 13] = i2t[2, 5] - 0.001  # just below the 6th text: rank 6
    t2i = np.tile([0.2, 0.1, 0.0], (15, 1))
    for t in range(15):
        t2i[t, txt2img[t]] = 1.0
    t2i[0] = [0.5, 0.9, 0.1]  # own image second: rank 1
    t2i[1] = [0.5, 0.9, 0.1]
    t2i[12] = [0.9, 0.8, 0.1]  # own image (2) third: rank 2
    ranks_i, ranks_t = retrieval_ranks(i2t, t2i, img2txt, txt2img)
    assert ranks_i.tolist() == [1, 0, 6]
    assert ranks_t.tolist() == [1, 1] + [0] * 10 + [2] + [0] * 2
    r = recall_at(ranks_i, ranks_t)
    assert r["txt_r1"] == pytest.approx(100 / 3) and r["txt_r5"] == pytest.approx(200 / 3) and r["txt_r10"] == 100
    assert r["img_r1"] == pytest.approx(80.0) and r["img_r5"] == 100 and r["img_r10"] == 100
    assert r["r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 80 + 100 + 100) / 6)
    # ITM re-rank of the top k: the ITC top-2 of a row get logit + sim, everything else -100 (train_retrieval.py)
    sim = np.array([[0.3, 0.9, 0.5, 0.1]])
    out = rerank(sim, lambda r, cand: np.array([{1: -2.0, 2: 1.0}[int(c)] for c in cand]), k=2)
    assert out.tolist() == [[-100.0, -1.1, 1.5, -100.0]]


def test_coco_caption_eval_agrees_with_caption_scores(ann: dict) -> None:
    """Our scoring without a ground-truth file (capfilt.metrics.caption_scores) and the COCO caption evaluation of
    the same captions give the same BLEU-4 and CIDEr; METEOR / SPICE run or are skipped with one note each."""
    from capfilt.metrics import caption_scores, coco_caption_scores

    gt = json.loads((ann["dir"] / "coco_karpathy_test_gt.json").read_text())
    refs: dict[int, list[str]] = {}
    for a in gt["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    preds = {i: c[k % 5] if k % 2 else "a small thing on a table" for k, (i, c) in enumerate(sorted(refs.items()))}
    ours = caption_scores({str(i): p for i, p in preds.items()}, {str(i): r for i, r in refs.items()})
    per: dict = {}
    coco, notes = coco_caption_scores(gt, [{"image_id": i, "caption": p} for i, p in preds.items()], per)  # all 5
    assert coco["bleu4"] == pytest.approx(ours["bleu4"]) and coco["cider"] == pytest.approx(ours["cider"])
    assert coco["tokenizer"] == ours["tokenizer"]
    assert np.mean(list(per["cider"].values())) == pytest.approx(coco["cider"])
    assert {"bleu1", "bleu2", "bleu3", "rouge_l"} <= set(coco)
    for name in ("meteor", "spice"):
        assert (name in coco) != any(n.startswith(name.upper()) for n in notes), (name, notes)
    if shutil.which("java") is None:
        assert "meteor" not in coco and "spice" not in coco
    # a result outside the ground truth: one clear error
    with pytest.raises(ValueError, match="not all in the ground truth"):
        coco_caption_scores(gt, [{"image_id": 7, "caption": "x"}])


# ---------------------------------------------------------------------------------------------------- end to end


def _tiny_pretrained(out: Path, vocab: Path) -> Path:
    import torch

    from blip import save_pretrained
    from blip.config import BlipConfig
    from blip.model import MODEL_CLASSES, init_weights
    from blip.tokenizer import build_tokenizer

    torch.manual_seed(0)
    model = MODEL_CLASSES["pretrain"](BlipConfig.from_name("tiny", family="pretrain"))
    init_weights(model, std=0.2)
    model.tokenizer = build_tokenizer(vocab)
    save_pretrained(model, out)
    return out


@pytest.mark.slow
def test_annotations_to_finetune_to_standard_eval(ann: dict, tmp_path: Path, tiny_vocab_dir: Path, ray_local) -> None:
    """ingest (train, test, nocaps) -> capfilt finetune a few steps on the train shards -> capfilt eval: captioning
    against the COCO-format ground truths (COCO results file written), retrieval with all 5 captions per image."""
    for name in ("coco_karpathy_train", "coco_karpathy_test", "nocaps_val"):
        _ingest(ann, name, tmp_path / name)
    init = _tiny_pretrained(tmp_path / "pre", tiny_vocab_dir)
    cfg = str(ROOT / "configs" / "finetune_caption_tiny.yaml")
    args = ["finetune", "--task", "caption", "--data", str(tmp_path / "coco_karpathy_train"), "--init", str(init)]
    args += ["--output", str(tmp_path / "cap"), "--config", cfg, "--max-steps", "2", "--batch-size", "4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cap" / "config.json").read_text())  # the fine-tuned captioner, our folder format

    ev = ["eval", "--task", "caption", "--model", str(tmp_path / "cap"), "--max-length", "10", "--num-beams", "2"]
    ev += ["--scorers", "bleu,rouge_l,cider"]  # METEOR's ~20 s start is covered by the agreement test
    gt = str(ann["dir"] / "coco_karpathy_test_gt.json")
    r = CliRunner().invoke(
        main, [*ev, "--data", str(tmp_path / "coco_karpathy_test"), "--ground-truth", gt, "--output", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    assert "scored 5 of the 6 ground-truth images" in r.output  # the missing image has no prediction
    results = json.loads((tmp_path / "caption_results.json").read_text())
    assert sorted(x["image_id"] for x in results) == [391895 + i for i in range(5)]
    assert all(isinstance(x["caption"], str) for x in results)
    res = json.loads((tmp_path / "eval_caption.json").read_text())
    assert {"bleu4", "cider", "rouge_l"} <= set(res["metrics"]) and res["ground_truth"] == gt

    # NoCaps: images only; without a ground truth there is nothing to score against (one clear error)
    nc = ["--data", str(tmp_path / "nocaps_val")]
    r = CliRunner().invoke(main, [*ev, *nc])
    assert r.exit_code == 1 and "--ground-truth" in r.output
    out = tmp_path / "nocaps_eval.json"
    nc_gt = str(ann["dir"] / "nocaps_val_gt.json")
    r = CliRunner().invoke(
        main, [*ev, *nc, "--ground-truth", nc_gt, "--output", str(out), "--repetition-penalty", "1.1"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(x["image_id"] for x in json.loads((tmp_path / "nocaps_eval_results.json").read_text())) == [0, 1, 2]
    assert "scored" not in r.output  # every ground-truth image predicted

    # retrieval on the test shards: 5 images x 5 captions each, the ITM re-rank of the top k
    r = CliRunner().invoke(
        main,
        ["eval", "--task", "retrieval", "--model", str(init), "--data", str(tmp_path / "coco_karpathy_test"),
         "--k-test", "8", "--output", str(tmp_path / "ret.json")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ret.json").read_text())
    assert res["num_images"] == 5 and res["num_texts"] == 25 and res["k_test"] == 8
    r = CliRunner().invoke(
        main, [*ev, "--task", "retrieval", "--data", str(tmp_path / "nocaps_val"), "--ground-truth", gt]
    )
    assert r.exit_code == 1 and "--ground-truth is for captioning" in r.output
