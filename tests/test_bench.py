"""bench/: the FLOP formula against torch's own count, and the GPU check script's syntax."""

from __future__ import annotations

import importlib.util
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
    if not script.exists():
        pytest.skip("bench/gpu_check.sh not written yet")
    subprocess.run(["bash", "-n", str(script)], check=True)
