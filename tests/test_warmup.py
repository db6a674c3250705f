"""The ViT warm-up (the synthetic world's stand-in for BLIP's ImageNet ViT) and `init_vision`, which starts a
from-scratch pretraining's ViT from it, from a timm/DeiT state dict, or from any BLIP checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blip.checkpoint import CheckpointError, load_vision_weights
from blip.config import BlipConfig, VisionConfig
from blip.model import BlipRetrieval, VisionTransformer
from capfilt.synth import COLORS, POSITIONS, SHAPES, SIZES, TARGET_CLASSES, make_scene, scene_targets

ROOT = Path(__file__).resolve().parents[1]


def test_scene_targets_one_class_triple_per_position():
    for i in range(50):
        objects = make_scene(3, i)
        y = scene_targets(objects)
        assert y.shape == (len(POSITIONS), 3) and (y < np.array(TARGET_CLASSES)).all()
        held = {o.position: o for o in objects}
        for p, row in zip(POSITIONS, y):
            if p not in held:
                assert row.tolist() == [0, 0, 0]
                continue
            o = held[p]
            assert SHAPES[row[0] - 1] == o.shape and list(COLORS)[row[1] - 1] == o.color and SIZES[row[2] - 1] == o.size
    assert scene_targets([{"shape": "star", "color": "red", "size": "large", "position": "top"}])[2].tolist() == [
        SHAPES.index("star") + 1, list(COLORS).index("red") + 1, SIZES.index("large") + 1
    ]  # fmt: skip


def _vit(image_size: int = 64, width: int = 128, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(VisionConfig(image_size=image_size, patch_size=16, width=width, layers=2, heads=2))
    for p in vit.parameters():  # not the init: a copy must be visible
        torch.nn.init.normal_(p)
    return vit


def test_load_vision_weights_from_a_deit_style_pth_resizes_positions(tmp_path):
    """A timm/DeiT checkpoint ({"model": sd}, classifier head included) trained at another resolution: the ViT gets
    every weight, the position grid resized (the original's interpolate_pos_embed), the head left out."""
    src = _vit(image_size=32)  # a 2x2 patch grid
    sd = {**src.state_dict(), "head.weight": torch.randn(10, 128), "head.bias": torch.zeros(10)}
    torch.save({"model": sd, "epoch": 300}, tmp_path / "deit.pth")
    dst = _vit(seed=1)  # 4x4 grid
    ignored = load_vision_weights(dst, tmp_path / "deit.pth")
    assert ignored == ["head.bias", "head.weight"]
    for k, v in src.state_dict().items():
        if k != "pos_embed":
            assert torch.equal(dst.state_dict()[k], v), k
    pos = dst.pos_embed.detach()
    assert pos.shape == (1, 17, 128) and torch.equal(pos[:, 0], src.pos_embed.detach()[:, 0])  # [CLS] kept


def test_load_vision_weights_from_a_blip_checkpoint_and_refuses_a_misfit(tmp_path):
    from blip import save_pretrained
    from blip.tokenizer import build_tokenizer, write_vocab

    torch.manual_seed(0)
    blip_model = BlipRetrieval(BlipConfig.from_name("tiny", family="retrieval"))
    blip_model.tokenizer = build_tokenizer(write_vocab(tmp_path / "tok", ["a", "red", "circle"]))
    save_pretrained(blip_model, tmp_path / "filter")
    dst = _vit(seed=2)
    load_vision_weights(dst, tmp_path / "filter")
    for k, v in blip_model.visual_encoder.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    torch.save({"model": blip_model.state_dict()}, tmp_path / "model_base.pth")  # one original-layout file
    dst = _vit(seed=3)
    assert "text_encoder.embeddings.word_embeddings.weight" not in load_vision_weights(dst, tmp_path / "model_base.pth")
    for k, v in blip_model.visual_encoder.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=r"does not fit this ViT: shapes .*\(ViT: "):
        load_vision_weights(_vit(width=64), tmp_path / "filter")  # another width


def test_pretraining_from_scratch_starts_its_vit_and_momentum_vit_from_init_vision(tmp_path, tiny_vocab_dir):
    from safetensors.torch import save_file

    from pipelines.train.models import build_model
    from pipelines.train.settings import TrainSettings

    src = _vit()
    (tmp_path / "warm").mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "warm" / "vision.safetensors"))
    s = TrainSettings.load("pretrain_tiny.yaml", tokenizer=str(tiny_vocab_dir), data=str(tmp_path),
                                output=str(tmp_path / "o"), init_vision=str(tmp_path / "warm"))  # fmt: skip
    model, _ = build_model(s, None)
    plain, _ = build_model(TrainSettings.load("pretrain_tiny.yaml", tokenizer=str(tiny_vocab_dir)), None)
    for k, v in src.state_dict().items():
        assert torch.equal(model.visual_encoder.state_dict()[k], v), k
        assert torch.equal(model.visual_encoder_m.state_dict()[k], v), k  # momentum copy follows
    # everything else is the seeded from-scratch init, as without init_vision
    for k, v in plain.text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[k], v), k
    with pytest.raises(ValueError, match="init_vision starts a from-scratch run"):
        TrainSettings.load("pretrain_tiny.yaml", init="x", init_vision=str(tmp_path / "warm"))


def test_warmup_vision_trains_seeded_and_its_vit_loads(tmp_path, ray_local):
    """Two short runs with one seed give the same ViT bit for bit; a longer one learns (the loss falls well below the
    class prior's, held-out colours are right well above chance); its output starts a ViT through init_vision's
    loader."""
    import json

    from safetensors.torch import load_file

    from pipelines.train.warmup import WarmupSettings, warmup_vision

    def run(name: str, **kw: int) -> dict:
        s = WarmupSettings.load("warmup_vision_tiny.yaml", output=str(tmp_path / name), test_samples=128, cpus=1,
                                     **kw)  # fmt: skip
        return warmup_vision(s)

    for name in ("a", "b"):
        run(name, samples=256, steps=20, log_every=10)
    a, b = (load_file(str(tmp_path / n / "vision.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"head.weight", "head.bias", "pos_embed", "patch_embed.proj.weight"} <= set(a)

    acc = run("long", samples=2048, steps=250, log_every=50)["test_accuracy"]
    log = [json.loads(x) for x in (tmp_path / "long" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [50, 100, 150, 200, 250]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5  # step 50 sits near the prior (~3.3): every position "empty"
    assert set(acc) == {"shape", "color", "size", "empty"} and acc["color"] > 1.5 / len(COLORS)
    assert json.loads((tmp_path / "long" / "warmup_summary.json").read_text())["test_accuracy"] == acc
    vit = _vit()
    assert load_vision_weights(vit, tmp_path / "long") == ["head.bias", "head.weight"]
    assert torch.equal(vit.pos_embed.detach(), load_file(str(tmp_path / "long" / "vision.safetensors"))["pos_embed"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["warmup-vision", "--output", "w", "--set", "steps=0"], "steps must be >= 1 (got 0)"),
        # a `--set` of a key that also has a flag (--batch-size, not given) is not undone by the flag's None
        (["pretrain", "--data", "d", "--output", "o", "--set", "batch_size=0"], "batch_size must be >= 1 (got 0)"),
        # a number setting that is no number is refused by name before anything starts
        (
            ["pretrain", "--data", "d", "--output", "o", "--set", "init_lr=fast"],
            "init_lr: expected a number, got 'fast'",
        ),
    ],
)
def test_bad_setting_is_one_error_line_before_ray_starts(tmp_path, args, message):
    p = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *args], capture_output=True, text=True, cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1 and p.stderr.strip() == f"error: {message}"


def test_bootstrap_warms_up_only_from_scratch_on_the_synthetic_world(tmp_path):
    """The loop's warm-up step runs by default and not when the start or the data is the user's own."""
    from pipelines.bootstrap import Bootstrap, BootstrapSettings

    def uses(**kw) -> bool:
        return Bootstrap(BootstrapSettings(workdir=str(tmp_path / "w"), **kw)).uses_warmup()

    assert uses()
    assert not uses(warmup_vision=False)
    assert not uses(init=str(tmp_path))  # a pretrained start brings its own ViT
    assert not uses(web=str(tmp_path))  # your own web shards
    assert not uses(pretrain={"init_vision": str(tmp_path)})
    boot = Bootstrap(BootstrapSettings(workdir=str(tmp_path / "w")))
    assert boot.pretrain_overrides("tok", "warm")["init_vision"] == "warm"
    assert "init_vision" not in boot.pretrain_overrides("tok")
