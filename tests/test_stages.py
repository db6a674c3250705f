"""CapFiltStage on in-memory batches: no Ray, tiny random models."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, init_weights
from blip.tokenizer import build_tokenizer
from capfilt.seeds import stable_seed
from capfilt.stages import RESULT_COLUMNS, CapFiltStage


def _tiny(family: str, vocab_dir, image_size: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BlipConfig.from_name("tiny", family=family, vision={"image_size": image_size})
    model = MODEL_CLASSES[family](cfg)
    init_weights(model, std=0.2)  # a useful scale: the image must matter to the outputs
    model.tokenizer = build_tokenizer(vocab_dir)
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_vocab_dir):
    return _tiny("caption", tiny_vocab_dir, seed=1), _tiny("retrieval", tiny_vocab_dir, seed=2)


def _batch(n: int, size: int = 64, seed: int = 0, keys: list[str] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "key": np.array(keys or [f"{i:09d}" for i in range(n)], dtype=object),
        "pixels": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),  # (B, S, S, 3)
        "status": np.array(["ok"] * n, dtype=object),
        "caption": np.array([f"a red circle number {i}" for i in range(n)], dtype=object),
        "url": np.array([f"http://x/{i}.jpg" for i in range(n)], dtype=object),
    }


def _stage(models, **kw) -> CapFiltStage:
    kw.setdefault("max_length", 10)  # short random captions keep the tests fast on 2 shared cores
    stage = CapFiltStage.from_models(*models, device="cpu", dtype="float32", **kw)
    stage.setup()
    return stage


def test_columns_and_decisions(models):
    stage = _stage(models, num_captions=3, threshold=0.5)
    b = _batch(4)
    b["status"][1] = "decode_error"
    b["caption"][2] = None  # missing web text
    out = stage(b)
    assert set(RESULT_COLUMNS) <= set(out) and "pixels" not in out
    assert list(out["url"]) == list(b["url"])  # metadata passes through
    for i in (0, 2, 3):
        assert len(out["synthetic_captions"][i]) == 3 and all(isinstance(c, str) for c in out["synthetic_captions"][i])
        assert len(out["synthetic_itm"][i]) == len(out["synthetic_itc"][i]) == 3
        assert all(0.0 <= p <= 1.0 for p in out["synthetic_itm"][i])
        assert all(-1.0001 <= s <= 1.0001 for s in out["synthetic_itc"][i])
        texts = ([] if i == 2 else [b["caption"][i]]) + out["synthetic_captions"][i]
        scores = ([] if i == 2 else [out["web_itm"][i]]) + out["synthetic_itm"][i]
        assert out["kept_texts"][i] == [t for t, p in zip(texts, scores) if p >= 0.5]
        assert out["kept"][i] == bool(out["kept_texts"][i])
        assert (out["reason"][i] is None) == out["kept"][i]
    # decode error: passes through, nothing computed
    assert out["synthetic_captions"][1] == [] and out["web_itm"][1] is None
    assert out["kept"][1] is False and out["reason"][1] == "decode_error"
    # missing web text: recorded as missing, not scored as ""
    assert out["web_itm"][2] is None and out["web_itc"][2] is None


def test_threshold_extremes(models):
    b = _batch(3)
    keep_all = _stage(models, num_captions=2, threshold=0.0)(b)
    assert all(k for k in keep_all["kept"])
    assert all(len(t) == 3 for t in keep_all["kept_texts"])  # web + 2 synthetic
    assert [t[0] for t in keep_all["kept_texts"]] == list(b["caption"])  # web text first
    keep_none = _stage(models, num_captions=2, threshold=1.0)(b)  # a softmax probability stays below 1 here
    assert max(p for ps in keep_none["synthetic_itm"] for p in ps) < 1.0 and max(keep_none["web_itm"]) < 1.0
    assert not any(keep_none["kept"]) and set(keep_none["reason"]) == {"below_threshold"}
    with pytest.raises(ValueError, match="threshold"):  # a probability threshold: [0, 1], checked by the stage too
        _stage(models, threshold=1.01)(b)
    none_at_all = _stage(models, num_captions=0, threshold=0.0)({**b, "caption": np.array([None] * 3, dtype=object)})
    assert set(none_at_all["reason"]) == {"no_text"}


def test_captions_independent_of_batch_composition(models):
    """Per-key seeds: a sample's captions and scores do not depend on its batch, its position or a rerun."""
    stage = _stage(models, num_captions=3, seed=7)
    full = _batch(5, seed=3)  # 5 images x 3 captions
    out_full = stage(full)
    for order in ([4, 0, 2], [1, 3]):
        sub = {k: v[order] for k, v in full.items()}
        out_sub = stage(sub)
        for j, i in enumerate(order):
            assert out_sub["synthetic_captions"][j] == out_full["synthetic_captions"][i]
            np.testing.assert_allclose(out_sub["synthetic_itm"][j], out_full["synthetic_itm"][i], atol=1e-5)
            np.testing.assert_allclose(out_sub["web_itc"][j], out_full["web_itc"][i], atol=1e-5)
    # chunking inside the stage (batch_size < batch) gives the same results too
    for bs in (2, 1):
        chunked = _stage(models, num_captions=3, seed=7, batch_size=bs)(full)
        assert chunked["synthetic_captions"] == out_full["synthetic_captions"]
    # another run seed gives other captions (random tiny models sample nearly uniformly over 30k tokens)
    other = _stage(models, num_captions=3, seed=8)(full)
    assert other["synthetic_captions"] != out_full["synthetic_captions"]


def test_compile_setting_reaches_the_decoder(models, monkeypatch):
    seen = []
    real = models[0].generate_ids
    monkeypatch.setattr(models[0], "generate_ids", lambda *a, **kw: seen.append(kw["compile"]) or real(*a, **kw))
    _stage(models, num_captions=1, compile="off")(_batch(2))
    _stage(models, num_captions=1)(_batch(2))
    assert seen == ["off", "auto"]
    with pytest.raises(ValueError, match="compile must be"):
        _stage(models, compile="yes")


def test_sample_seed_is_stable():
    assert stable_seed(0, "000000001") == stable_seed(0, "000000001")
    assert stable_seed(0, "000000001") != stable_seed(1, "000000001") != stable_seed(0, "000000002")
    assert 0 <= stable_seed(123, "k") < 2**63
    # a sample's seed decides its captions, so it is a contract of the outputs: the former stages.sample_seed's
    # formula (blake2b-64 of f"{seed}\x00{key}", little-endian, top bit cleared), written out here on purpose
    for seed, key in ((0, "000000001"), (123, "k"), (7, "é/ü")):
        digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
        assert stable_seed(seed, key) == int.from_bytes(digest, "little") & (2**63 - 1)


def test_different_model_sizes_resize_on_device(tiny_vocab_dir):
    cap = _tiny("caption", tiny_vocab_dir, image_size=32, seed=1)
    filt = _tiny("retrieval", tiny_vocab_dir, image_size=64, seed=2)
    stage = _stage((cap, filt), num_captions=1)
    assert stage.image_size == 64
    out = stage(_batch(2, size=64))
    assert all(len(c) == 1 for c in out["synthetic_captions"]) and all(p is not None for p in out["web_itm"])


def test_images_matter(models):
    """The scores depend on the image (a stage that ignored pixels would pass the tests above)."""
    stage = _stage(models, num_captions=0)
    a = _batch(2, seed=0)
    b = {**a, "pixels": 255 - a["pixels"]}
    assert not np.allclose(stage(a)["web_itm"], stage(b)["web_itm"], atol=1e-6)


def test_wrong_family_is_a_clear_error(models):
    with pytest.raises(ValueError, match="a captioner needs a caption or pretrain model"):
        _stage((models[1], models[1]))


def test_tensor_pixels_as_pinned_on_cuda_give_the_same_results(models):
    """`pin` hands the stage a torch tensor on CUDA (page-locked): the same results as numpy pixels, whether the ok
    rows of a chunk are contiguous (a slice, still pinned) or not (a gather)."""
    stage = _stage(models, num_captions=2, batch_size=3)
    assert stage.pin(_batch(2)["pixels"]).__class__ is np.ndarray  # CPU: nothing to pin
    for failed in ([], [1]):
        b = _batch(6)
        for i in failed:
            b["status"][i] = "decode_error"
        ref = stage(b)
        out = stage({**b, "pixels": torch.from_numpy(b["pixels"])})
        assert out["synthetic_captions"] == ref["synthetic_captions"] and out["synthetic_itm"] == ref["synthetic_itm"]
