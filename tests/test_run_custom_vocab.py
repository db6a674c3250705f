"""`capfilt run` end to end with transformers BLIP folders saved with their own (non-bert) vocabulary (issue 10).

The captioner and the filter are transformers models with random weights, a vocabulary of a few hundred tokens whose
special ids are nowhere near bert-base-uncased's ([SEP] 1, [CLS] 3, [PAD] 4), and a ViT wider than the text
transformer; `save_pretrained` + the tokenizer files make them hub-style folders. A misfit tokenizer is one error
before Ray starts.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers

from blip.config import BlipConfig
from blip.convert import config_to_hf
from blip.tokenizer import build_tokenizer
from capfilt.synth import write_corpus
from pipelines.run.config import RunSettings
from pipelines.run.job import run_capfilt
from tests.test_any_vocab import write_odd_vocab

TINY_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "capfilt_tiny.yaml")


def _hf_folder(cls: type, family: str, tok, folder: Path, seed: int, vocab_files: Path) -> str:
    cfg = BlipConfig.from_name(
        "tiny", family=family, vision={"width": 192, "heads": 3}, text={"vocab_size": len(tok)}
    ).with_tokenizer(tok)
    d = config_to_hf(cfg)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=cfg.embed_dim
    )
    model = cls(hf_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # transformers' vision init is ~1e-10: re-draw so that images matter
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name.lower() and name.endswith("weight")) else 0.05 * noise)
    model.save_pretrained(folder)
    build_tokenizer(vocab_files).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def custom_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, object]:
    root = tmp_path_factory.mktemp("custom_vocab_models")
    vocab = write_odd_vocab(root / "vocab")
    tok = build_tokenizer(vocab)
    cap = _hf_folder(transformers.BlipForConditionalGeneration, "caption", tok, root / "captioner", 1, vocab)
    filt = _hf_folder(transformers.BlipForImageTextRetrieval, "retrieval", tok, root / "filter", 2, vocab)
    return cap, filt, tok


def test_run_with_custom_vocab_transformers_folders(ray_local, custom_models, tmp_path: Path) -> None:
    cap, filt, _ = custom_models
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), 6, noise=0.3, seed=0, image_size=64, samples_per_shard=3)
    out = tmp_path / "out"
    cfg = RunSettings.load(TINY_CONFIG, input=str(corpus), output=str(out), captioner=cap, filter=filt, progress=False)
    summary = run_capfilt(cfg)
    assert not summary["failed_shards"], summary
    df = pd.read_parquet(out / "parquet")
    assert len(df) == 6 and not df["key"].duplicated().any() and (df["status"] == "ok").all()
    assert all(len(c) == cfg.num_captions for c in df["synthetic_captions"])
    assert all(0.0 <= p <= 1.0 for ps in df["synthetic_itm"] for p in ps)
    assert any(c.strip() for caps in df["synthetic_captions"] for c in caps)  # words of this vocabulary


def test_run_misfit_tokenizer_is_one_error_before_ray(custom_models, tiny_vocab_dir: Path, tmp_path: Path) -> None:
    """A transformers folder whose tokenizer is longer than its embedding (bert-base vocab on a small model)."""
    import shutil

    cap, filt, _ = custom_models
    bad = tmp_path / "bad_filter"
    shutil.copytree(filt, bad)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / f).unlink(missing_ok=True)
        if (Path(tiny_vocab_dir) / f).is_file():
            shutil.copy(Path(tiny_vocab_dir) / f, bad / f)
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), 3, noise=0.3, seed=0, image_size=64, samples_per_shard=3)
    cfg = RunSettings.load(
        TINY_CONFIG, input=str(corpus), output=str(tmp_path / "out"), captioner=cap, filter=str(bad), progress=False
    )
    with pytest.raises(ValueError, match=r"filter .*does not fit.*30524 tokens") as e:
        run_capfilt(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "_state").exists()  # nothing was started
