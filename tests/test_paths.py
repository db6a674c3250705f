"""User paths are made absolute where configs and flags are read (Ray workers run in another directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_resolve_path_keeps_urls_and_hub_ids(tmp_path, monkeypatch):
    from pipelines.settings import resolve_path, resolve_paths

    monkeypatch.chdir(tmp_path)
    assert resolve_path("runs/x") == str(tmp_path / "runs" / "x")
    assert resolve_path("./a/b", hub=True) == str(tmp_path / "a" / "b")
    assert resolve_path("~/m") == os.path.expanduser("~/m")
    assert resolve_path("s3://bucket/shards") == "s3://bucket/shards"
    assert resolve_path("gs://b/x", hub=True) == "gs://b/x"
    assert resolve_path(None) is None and resolve_path("") == ""
    # a hub id: exactly one "/", nothing of that name here
    assert resolve_path("Salesforce/blip-itm-base-coco", hub=True) == "Salesforce/blip-itm-base-coco"
    assert resolve_path("Salesforce/blip-itm-base-coco") == str(tmp_path / "Salesforce" / "blip-itm-base-coco")
    assert resolve_path("ckpts/model_base.pth", hub=True) == str(tmp_path / "ckpts" / "model_base.pth")
    assert resolve_path("a/b/c", hub=True) == str(tmp_path / "a" / "b" / "c")
    assert resolve_path("bare", hub=True) == str(tmp_path / "bare")
    assert resolve_path("org/model.ckpt", hub=True) == str(tmp_path / "org" / "model.ckpt")  # a file, not an id
    (tmp_path / "Salesforce" / "blip-itm-base-coco").mkdir(parents=True)  # a local folder of that name wins
    assert resolve_path("Salesforce/blip-itm-base-coco", hub=True) == str(
        tmp_path / "Salesforce" / "blip-itm-base-coco"
    )
    # --data lists: every part, globs kept
    got = resolve_paths("data/web, s3://b/clean ,shards/*.tar")
    assert got == f"{tmp_path}/data/web,s3://b/clean,{tmp_path}/shards/*.tar"


def test_train_settings_and_bootstrap_config_resolve_relative_paths(tmp_path, monkeypatch):
    from pipelines.bootstrap import BootstrapSettings
    from pipelines.train.settings import TrainSettings

    monkeypatch.chdir(tmp_path)
    s = TrainSettings.load(
        ROOT / "configs" / "pretrain_tiny.yaml", data="d1,s3://b/d2", output="out", init="ck", tokenizer="tok"
    )
    assert (s.data, s.output) == (f"{tmp_path}/d1,s3://b/d2", str(tmp_path / "out"))
    assert (s.init, s.tokenizer) == (str(tmp_path / "ck"), str(tmp_path / "tok"))
    s = TrainSettings.load(None, data="d", output="o", init="Salesforce/blip-image-captioning-base")
    assert s.init == "Salesforce/blip-image-captioning-base"

    (tmp_path / "my_pretrain.yaml").write_text("task: pretrain\n")
    (tmp_path / "boot.yaml").write_text("workdir: runs/b\nweb: shards/web\npretrain_config: my_pretrain.yaml\n")
    c = BootstrapSettings.load(tmp_path / "boot.yaml")
    assert c.workdir == str(tmp_path / "runs" / "b") and c.web == str(tmp_path / "shards" / "web")
    assert c.pretrain_config == str(tmp_path / "my_pretrain.yaml")  # a file here
    assert c.caption_config == str(ROOT / "configs" / "finetune_caption_tiny.yaml")  # a name in configs/
    assert BootstrapSettings.load(tmp_path / "boot.yaml", workdir="w2").workdir == str(tmp_path / "w2")


@pytest.mark.parametrize("url", ["s3://bucket/x", "gs://b/y"])
def test_urls_survive_settings(url):
    from pipelines.train.settings import TrainSettings

    assert TrainSettings.load(None, data=url, output="o").data == url


def test_number_settings_read_as_numbers(tmp_path):
    """YAML 1.1 reads `5e-4` (no dot) as text: as a setting it must still reach the optimizer as a number, from a
    preset file and from `--set` alike; a value that is no number is refused by name."""
    from pipelines.settings import parse_set
    from pipelines.train.settings import TrainSettings

    (tmp_path / "p.yaml").write_text("task: pretrain\ninit_lr: 5e-4\nbatch_size: 1e1\n")
    s = TrainSettings.load(tmp_path / "p.yaml", data="d", output="o")
    assert (s.init_lr, s.batch_size) == (5e-4, 10) and isinstance(s.batch_size, int)
    s = TrainSettings.load(None, data="d", output="o", **parse_set(["min_lr=1e-6", "torch_threads=2"]))
    assert s.min_lr == 1e-6 and isinstance(s.min_lr, float) and s.torch_threads == 2
    assert TrainSettings.load(None, data="d", output="o", max_steps=None).max_steps is None
    for bad, message in [("init_lr=fast", "init_lr: expected a number, got 'fast'"),
                         ("batch_size=2.5", "batch_size: expected an integer, got 2.5"),
                         ("epochs=true", "epochs: expected an integer, got True"),
                         ("init_lr=yes", "init_lr: expected a number, got True")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainSettings.load(None, data="d", output="o", **parse_set([bad]))


def test_one_hub_id_rule_for_settings_and_checkpoint_loading(tmp_path, monkeypatch):
    """What the settings leave unresolved is exactly what blip.checkpoint.resolve tries on the hub."""
    from blip.checkpoint import resolve
    from blip.hub import looks_like_hub_id

    monkeypatch.chdir(tmp_path)
    for spec in ("org/model.ckpt", "org/config.json", "org/settings.yaml", "./org/name", "a/b/c", "bare"):
        assert not looks_like_hub_id(spec)
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve(spec)  # refused locally: never sent to the hub
    assert looks_like_hub_id("Salesforce/blip-itm-base-coco")
