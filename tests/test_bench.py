"""bench/: the FLOP formula against torch's own count, and the GPU check script's syntax."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip.config import BlipConfig
from blip.model import BertModel, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]


def _flops_module():
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_flops"] = mod
    spec.loader.exec_module(mod)
    return mod


flops = _flops_module()


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("size", ["tiny"])
def test_vit_flops_match_torch_count(size):
    cfg = BlipConfig.from_name(size)
    vit = VisionTransformer(cfg.vision).eval()
    x = torch.zeros(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    counted = _counted(lambda: vit(x))
    assert counted == pytest.approx(flops.vit_flops(cfg), rel=0.03)


@pytest.mark.parametrize("cross", [False, True])
def test_text_encoder_flops_match_torch_count(cross):
    cfg = BlipConfig.from_name("tiny", "retrieval")
    bert = BertModel(cfg.text).eval()
    L = 35
    ids = torch.ones(1, L, dtype=torch.long)
    img = torch.zeros(1, cfg.vision.num_patches + 1, cfg.vision.width) if cross else None
    counted = _counted(lambda: bert(ids, attention_mask=torch.ones(1, L, dtype=torch.long), encoder_hidden_states=img))
    # FlopCounterMode does not count the masked SDPA calls of the text tower on CPU (the ViT's unmasked ones it
    # does): add their scores + values (2 matmuls of L x keys x d per layer) by hand, then compare
    d, n_img = cfg.text.hidden_size, cfg.vision.num_patches + 1
    sdpa = cfg.text.layers * 2 * 2 * L * (L + (n_img if cross else 0)) * d
    assert counted + sdpa == pytest.approx(flops.text_encoder_flops(cfg, L, cross=cross), rel=0.03)


def test_capfilt_l_is_about_0_8_tflop():
    cap, filt = BlipConfig.from_name("large"), BlipConfig.from_name("large", "retrieval")
    total = flops.capfilt_flops_per_image(cap, filt, captions=1, texts=2)
    assert 0.7e12 < total < 1.0e12
    assert flops.mfu(total, 400, 989) == pytest.approx(total * 400 / 989e12)
    assert flops.peak_tflops("NVIDIA H200") == 989 and flops.peak_tflops("Tesla T4") is None


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_check_script_syntax():
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    """The GPU check's steps, tiny and on CPU (~45 s on 2 cores): every step exits 0 and the summary has a table."""
    env = {**__import__("os").environ, "CAPFILT_GPU_CHECK_CPU": "1"}
    subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)], check=True, env=env, cwd=ROOT)
    status = (tmp_path / "status.txt").read_text().split("\n")
    assert all(" rc=0 " in line for line in status if line), status
    summary = (tmp_path / "summary.md").read_text()
    assert "caption beam=3 =len" in summary
    assert any(line.startswith("bench_memory rc=0") for line in status)
    assert "\ntiny " in summary and '"ratio_run_over_bare_steady"' in summary  # the memory row, the run ratio


def _random_model(family: str, size: str = "tiny"):
    import tempfile

    from blip.model import MODEL_CLASSES, init_weights
    from blip.tokenizer import build_tokenizer, write_vocab
    from capfilt.synth import VOCAB_WORDS

    torch.manual_seed(0)
    m = MODEL_CLASSES[family](BlipConfig.from_name(size, family=family))
    init_weights(m, std=0.2)
    m.tokenizer = build_tokenizer(write_vocab(Path(tempfile.mkdtemp()) / "vocab", VOCAB_WORDS))
    return m.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_decode_equals_eager():
    m = _random_model("caption", "base").cuda().to(torch.bfloat16)
    S = m.cfg.vision.image_size if hasattr(m, "cfg") else 384
    px = torch.randn(8, 3, S, S, generator=torch.Generator().manual_seed(1)).cuda().to(torch.bfloat16)
    with torch.inference_mode():
        for kw in (dict(sample=False, num_beams=1), dict(sample=False, num_beams=3), dict(sample=True)):
            eager = m.generate_ids(px, compile="off", max_length=20, min_length=5, **kw)
            compiled = m.generate_ids(px, compile="on", max_length=20, min_length=5, **kw)
            assert torch.equal(torch.as_tensor(eager), torch.as_tensor(compiled)), kw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_agrees_with_fp32():
    """bf16 weights vs fp32: greedy ids agree on >= 90% of tokens; ITM probabilities within 0.05, ITC within 0.02."""
    cap = _random_model("caption", "base").cuda()
    S = 384
    px = torch.randn(8, 3, S, S, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        a = torch.as_tensor(cap.generate_ids(px, sample=False, num_beams=1, max_length=20, min_length=20))
        b = torch.as_tensor(
            cap.to(torch.bfloat16).generate_ids(px.bfloat16(), sample=False, num_beams=1, max_length=20, min_length=20)
        )
    assert a.shape == b.shape and (a == b).float().mean().item() >= 0.9
    filt = _random_model("retrieval", "base").cuda()
    texts = [["a red circle", "a small blue square at the top"]] * 8
    with torch.inference_mode():
        itm32, itc32 = filt.score(px, texts)
        itm16, itc16 = filt.to(torch.bfloat16).score(px.bfloat16(), texts)
    assert torch.tensor(itm32).sub(torch.tensor(itm16)).abs().max().item() <= 0.05
    assert torch.tensor(itc32).sub(torch.tensor(itc16)).abs().max().item() <= 0.02


@pytest.mark.slow
def test_bench_run_no_ray_measures_one_actor_pipeline(tmp_path):
    """bench_run.py --no-ray (a GPU machine without Ray): one actor's ShardProcessor over every shard, in-process."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_run.py"), "--tiny", "--config", "configs/capfilt_tiny.yaml",
         "--device", "cpu", "--samples", "32", "--shards", "2", "--batch-size", "8", "--no-ray",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(r.stdout[r.stdout.index("{") :])
    assert (
        result["samples"] == 32 and result["actor_pipeline_samples_per_s"] > 0 and result["ratio_actor_over_bare"] > 0
    )
    assert len(list((tmp_path / "out_actor" / "_state").glob("*.json"))) == 2  # each shard committed by the actor
