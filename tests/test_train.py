"""Pretraining and fine-tuning on Ray Train (tiny model, CPU, gloo), data handling, schedules, kill-and-resume."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests._wds import write_tars

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "pretrain_tiny.yaml")


# ---------------------------------------------------------------------------------------------------- fast


def test_learning_rate_schedules():
    from pipelines.train.settings import TrainSettings, learning_rate

    s = TrainSettings(init_lr=3e-4, warmup_lr=1e-6, min_lr=1e-6, warmup_steps=100, lr_decay_rate=0.9, epochs=20)
    assert learning_rate(s, 0, 0) == pytest.approx(1e-6)
    assert learning_rate(s, 0, 50) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)
    assert learning_rate(s, 0, 500) == pytest.approx(3e-4)
    assert learning_rate(s, 3, 0) == pytest.approx(3e-4 * 0.9**3)
    assert learning_rate(s, 200, 0) == pytest.approx(1e-6)  # floored at min_lr
    c = TrainSettings(schedule="cosine", init_lr=1e-5, min_lr=0.0, warmup_steps=0, epochs=6)
    assert [learning_rate(c, e, 7) for e in (0, 3, 6)] == pytest.approx([1e-5, 5e-6, 0.0])


def test_settings_reject_typos_and_bad_values(tmp_path):
    from pipelines.train.settings import TrainSettings

    with pytest.raises(ValueError, match="unknown setting"):
        TrainSettings.load(TINY, batchsize=3)
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings.load(TINY, schedule="linear")
    with pytest.raises(FileNotFoundError):
        TrainSettings.load(tmp_path / "nope.yaml")


def test_samples_bad_data_counted_and_texts_from_both_layouts(tmp_path):
    from pipelines.train.data import iter_samples, list_tars

    write_tars(tmp_path / "plain", 10, per_tar=5, corrupt=2, empty=1)
    write_tars(tmp_path / "kept", 6, per_tar=6, kept_layout=True)
    (tmp_path / "kept" / "broken.tar").write_bytes(b"not a tar at all" * 40)
    plain = list(iter_samples(list_tars(str(tmp_path / "plain"))))
    assert [p.status for p in plain].count("decode_error") == 2
    assert [p.status for p in plain].count("empty_text") == 1
    assert all(len(p.texts) == 1 for p in plain if p.status == "ok")
    kept = list(iter_samples(list_tars(str(tmp_path / "kept"))))
    statuses = [p.status for p in kept]
    assert statuses.count("bad_tar") == 1 and statuses.count("ok") == 6
    assert all(len(p.texts) == 2 for p in kept if p.status == "ok")  # every kept text is a candidate
    with pytest.raises(FileNotFoundError, match="no webdataset .tar files"):
        list_tars(str(tmp_path / "empty_dir_*"))


def test_train_augmentations_shapes_and_randomness():
    from pipelines.train.data import AugmentConfig, random_resized_crop, train_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    cfg = AugmentConfig(image_size=32, min_scale=0.5)
    outs = [train_transform(img, cfg, random.Random(i)) for i in range(6)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) > 1  # different draws, different crops/ops
    assert np.array_equal(train_transform(img, cfg, random.Random(3)), outs[3])  # seeded = reproducible
    crop = random_resized_crop(img, 16, random.Random(0), (1.0, 1.0))  # full-area crop keeps the content
    assert crop.size == (16, 16)


def test_epoch_plan_and_augmentation_draws_are_seeded(tmp_path, tiny_vocab_dir):
    """Data order and every random draw are a function of (seed, epoch, rank, world): same in, same rows out."""
    from blip.tokenizer import build_tokenizer
    from capfilt.seeds import stable_seed
    from pipelines.train.data import (
        AugmentConfig,
        TextPrep,
        _tar_to_rows,
        epoch_plan,
        list_tars,
        read_tasks,
        tar_names,
    )

    tars = [f"t{i}.tar" for i in range(5)]
    assert epoch_plan(tars, 7, 0) == epoch_plan(list(reversed(tars)), 7, 0)  # the order of --data does not matter
    assert epoch_plan(tars, 7, 0)[0] != epoch_plan(tars, 7, 1)[0]  # reshuffled per epoch
    for world in (2, 3):  # at least one tar per rank: each tar read by exactly one rank
        parts = [epoch_plan(tars, 7, 3, r, world) for r in range(world)]
        assert sorted(p for ps, _, _ in parts for p in ps) == sorted(tars) and {(o, s) for _, o, s in parts} == {(0, 1)}
    parts = [epoch_plan(tars[:2], 7, 0, r, 4) for r in range(4)]  # fewer tars than ranks: every rank strides
    assert [(o, s) for _, o, s in parts] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert stable_seed(1, 2, 0, "a") == stable_seed(1, 2, 0, "a") != stable_seed(1, 3, 0, "a")
    # the same data in another folder or bucket (another clone, another workdir): the same order and draws
    here = [f"/home/a/runs/demo/data/{d}/{i:05d}.tar" for d in ("web", "clean") for i in range(3)]
    there = [p.replace("/home/a/runs/demo", "s3://bucket/x") for p in here]
    assert tar_names(here)[here[0]] == "web/00000.tar" and tar_names(["/d/only.tar"]) == {"/d/only.tar": "only.tar"}
    for epoch, rank, world in ((0, 0, 1), (2, 1, 2)):
        a, b = read_tasks(here, 7, epoch, rank, world), read_tasks(there, 7, epoch, rank, world)
        assert [t["path"].replace("/home/a/runs/demo", "s3://bucket/x") for t in a] == [t["path"] for t in b]
        assert [t["seed"] for t in a] == [t["seed"] for t in b] and len({t["seed"] for t in a}) == len(a)

    write_tars(tmp_path / "d", 12, per_tar=12)
    (path,) = list_tars(str(tmp_path / "d"))
    aug, text, tok = AugmentConfig(32, 0.5, True, 2, 5), TextPrep(), build_tokenizer(tiny_vocab_dir)

    def rows(seed, offset=0, stride=1):
        row = {"path": path, "seed": seed, "offset": offset, "stride": stride}
        return [(r["image"].tobytes(), r["idx"]) for r in _tar_to_rows(row, aug, text, tok, None)]

    assert rows(5) == rows(5) and [i for _, i in rows(5)] == [i for _, i in rows(6)]
    assert [b for b, _ in rows(5)] != [b for b, _ in rows(6)]  # new crops/flips/ops with another seed
    halves = [i for _, i in rows(5, 0, 2)] + [i for _, i in rows(5, 1, 2)]
    assert sorted(halves) == sorted(i for _, i in rows(5)) and len(halves) == 12


def test_collapse_probe_on_collapsed_and_separated_features():
    import torch

    from pipelines.train.loop import PROBE_KEYS, collapse_probe

    class Toy(torch.nn.Module):  # the probe's view of a model: ITC features and a temperature
        def __init__(self, img, txt):
            super().__init__()
            self.img, self.txt, self.temp = img, txt, torch.nn.Parameter(torch.tensor(0.07))

        def encode_image(self, px):
            return self.img[:, None]

        def image_feat(self, emb):
            return torch.nn.functional.normalize(emb[:, 0], dim=-1)

        def text_feat(self, ids, mask):
            return torch.nn.functional.normalize(self.txt, dim=-1)

    eye, idx = torch.eye(8), torch.arange(8)
    good = collapse_probe(Toy(eye, eye), None, None, None, idx)
    assert set(good) == set(PROBE_KEYS) and good["r1_i2t"] == good["r1_t2i"] == 1.0
    assert good["img_cos_mean"] == pytest.approx(0.0) and good["it_cos_gap"] == pytest.approx(1.0)
    same = torch.ones(8, 4) + 1e-4 * torch.randn(8, 4)
    bad = collapse_probe(Toy(same, same), None, None, None, idx)
    assert bad["img_cos_mean"] > 0.999 and bad["it_cos_std"] < 1e-3 and abs(bad["it_cos_gap"]) < 1e-3
    dup = collapse_probe(
        Toy(eye, eye[[1, 0, 2, 3, 4, 5, 6, 7]]), None, None, None, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7])
    )
    assert dup["r1_i2t"] == 1.0  # a text of the same sample id (two captions of one image) is a hit


def test_local_ray_drops_only_the_state_api_warning(caplog):
    """The worker hook silences the placement-group cleaner's State API warning, not the cleaner's other lines."""
    import logging

    from pipelines.train.local_ray import _PG_CLEANER_LOGGER, quiet_worker_logs

    log = logging.getLogger(_PG_CLEANER_LOGGER)
    quiet_worker_logs()
    quiet_worker_logs()  # a second call adds no second filter
    try:
        with caplog.at_level(logging.WARNING, logger=_PG_CLEANER_LOGGER):
            log.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
            log.warning("Detected that the Ray Train controller actor (x) is dead.")
        assert [r.getMessage() for r in caplog.records] == ["Detected that the Ray Train controller actor (x) is dead."]
        assert len(log.filters) == 1
    finally:
        log.filters.clear()


def test_cli_no_tars_and_queue_errors_are_clear(tmp_path, tiny_vocab_dir):
    from cli import main

    r = CliRunner().invoke(
        main, ["pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"), "--config", TINY]
    )
    assert r.exit_code == 1 and "no webdataset .tar files" in r.output
    write_tars(tmp_path / "d", 8, per_tar=8)
    args = ["pretrain", "--data", str(tmp_path / "d"), "--output", str(tmp_path / "o"), "--config", TINY]
    args += ["--tokenizer", str(tiny_vocab_dir), "--batch-size", "6"]  # queue 64 % 6 != 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "queue size 64 must be divisible by the global batch 6" in r.output
    r = CliRunner().invoke(main, ["finetune", "--task", "caption", "--data", str(tmp_path / "d"), "--output", "x"])
    assert r.exit_code == 1 and "--init" in r.output


# ---------------------------------------------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from capfilt.synth import write_corpus

    d = tmp_path_factory.mktemp("synth")
    write_corpus(str(d), samples=240, noise=0.0, seed=1, image_size=64, samples_per_shard=60)
    return d


def _losses(output: Path) -> list[dict]:
    return [json.loads(x) for x in (output / "log.jsonl").read_text().splitlines()]


def _assert_all_losses_drop(rows: list[dict], keys=("loss_itc", "loss_itm", "loss_lm"), n: int = 5) -> None:
    for k in keys:
        first, last = np.mean([r[k] for r in rows[:n]]), np.mean([r[k] for r in rows[-n:]])
        assert last < first, f"{k} did not go down: first {n} steps {first:.4f}, last {n} steps {last:.4f}"


# Learning settings for the few-dozen-step tests: the queue holds exactly one global batch (so the ITC loss is measured
# against real features from the second step on, not the random initial queue) and no distillation ramp.
LEARN = {"alpha": 0.0, "init_lr": 5e-4, "warmup_steps": 3}


@pytest.fixture(scope="module")
def pretrained(corpus, tiny_vocab_dir, tmp_path_factory):
    from pipelines.train.job import train
    from pipelines.train.settings import TrainSettings

    out = tmp_path_factory.mktemp("pretrain1")
    s = TrainSettings.load(
        TINY, data=str(corpus), output=str(out), tokenizer=str(tiny_vocab_dir), max_steps=30, queue_size=8,
        torch_threads=2, **LEARN,
    )  # fmt: skip
    t0 = time.time()
    summary = train(s)
    summary["test_seconds"] = time.time() - t0
    return out, summary


@pytest.mark.slow
def test_pretrain_one_worker_lowers_every_loss(pretrained):
    from blip import load

    out, summary = pretrained
    assert summary["final_step"] == 30 and summary["world_size"] == 1
    assert summary["torch_threads"] == 2  # the setting, not the worker's 1 CPU (Ray's OMP_NUM_THREADS)
    rows = _losses(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    _assert_all_losses_drop(rows)
    assert (out / "log.csv").read_text().count("\n") == 31 and (out / "loss_curves.png").stat().st_size > 1000
    model = load(str(out))  # the final model is our folder format
    assert model.config.family == "pretrain" and model.image_queue.shape == (64, 8)
    ckpt = out / "checkpoints" / "step_00000030"
    assert (ckpt / "train_state.pt").is_file() and (ckpt / "rng_rank0.pt").is_file()


@pytest.mark.slow
def test_finetuned_captioner_and_filter_load_in_capfilt(pretrained, corpus, tmp_path):
    import torch

    from blip import load
    from blip.image import preprocess
    from capfilt.stages import CapFiltStage
    from pipelines.train.job import train
    from pipelines.train.settings import TrainSettings

    init, _ = pretrained
    outs = {}
    for task in ("caption", "retrieval"):
        cfg = str(ROOT / "configs" / f"finetune_{task}_tiny.yaml")
        s = TrainSettings.load(cfg, data=str(corpus), output=str(tmp_path / task), init=str(init), max_steps=4)
        summary = train(s)
        assert summary["final_step"] == 4
        outs[task] = tmp_path / task
    cap, filt = load(str(outs["caption"])), load(str(outs["retrieval"]))
    assert cap.config.family == "caption" and filt.config.family == "retrieval"
    # fine-tuning started from the pretrained weights (shared ViT), not from scratch
    pre = load(str(init))
    assert not torch.equal(cap.visual_encoder.pos_embed, pre.visual_encoder.pos_embed)  # it trained
    assert torch.allclose(cap.visual_encoder.pos_embed, pre.visual_encoder.pos_embed, atol=0.05)  # from there
    stage = CapFiltStage(captioner=str(outs["caption"]), filter=str(outs["retrieval"]), device="cpu", dtype="float32")
    stage.setup()
    px = preprocess([Image.new("RGB", (64, 64), (200, 30, 30))], 64)
    caps = stage.cap_model.generate(px, sample=True, num_captions=2, max_length=10, min_length=3)
    itm, itc = stage.filt_model.score(px, [caps[0] + ["a red circle"]])
    assert len(caps[0]) == 2 and len(itm[0]) == 3 and all(0.0 <= p <= 1.0 for p in itm[0])


@pytest.mark.slow
def test_pretrain_two_workers_kill_and_resume(corpus, tiny_vocab_dir, tmp_path):
    """2 DDP workers (gloo): SIGKILL mid-epoch after a checkpoint, --resume continues from it with the batches the
    epoch had not seen yet, so the loss curve is the one of an uninterrupted run with the same config (the same
    config, run twice, gives the same curve); losses drop; ranks agree."""
    out = tmp_path / "run"

    def command(output, data=corpus):
        cmd = [sys.executable, str(ROOT / "cli.py"), "pretrain", "--config", TINY, "--data", str(data)]
        cmd += ["--output", str(output), "--tokenizer", str(tiny_vocab_dir), "--workers", "2", "--max-steps", "24"]
        return (
            cmd + ["--checkpoint-every", "8", "--set", "queue_size=16"] + [f"--set={k}={v}" for k, v in LEARN.items()]
        )

    cmd = command(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log1 = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while not (out / "checkpoints" / "step_00000008" / "train_state.pt").exists():
            assert p.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the run and the Ray processes it started (its own session)
        p.wait()
    from pipelines.train.checkpoints import latest_checkpoint

    killed_at = int(latest_checkpoint(out).name.split("_")[1])
    assert 8 <= killed_at < 24 and not (out / "train_summary.json").exists()
    assert killed_at % 15 != 0  # mid-epoch: 240 samples / global batch 16 = 15 steps per epoch

    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"(step {killed_at})" in r.stdout + r.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["final_step"] == 24 and summary["world_size"] == 2 and summary["global_batch"] == 16
    assert summary["params_in_sync"] is True and summary["param_digest_max_diff"] == 0.0
    assert summary["torch_threads"] == 1  # unset: the worker's CPUs, as Ray sets them
    rows = _losses(out)
    assert [r["step"] for r in rows] == list(range(1, 25))  # each step once: redone steps replace the lost ones
    _assert_all_losses_drop(rows)

    # the uninterrupted run of the same config, on a copy of the data in another folder (another clone or workdir):
    # the same curve, step for step (CPU float noise at most)
    ref, copy = tmp_path / "uninterrupted", tmp_path / "elsewhere" / "corpus"
    shutil.copytree(corpus, copy)
    r = subprocess.run(command(ref, copy), cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Ray started in-process has no State API: its placement-group cleaner's once-a-second warning is dropped
    assert "Failed to query Ray Train Controller" not in r.stdout + r.stderr
    # each progress line reaches the log once (Ray Train's print patch teed every line to the driver twice)
    steps = re.findall(r"\] step (\d+)/\d+ ep", r.stdout + r.stderr)
    assert steps and len(steps) == len(set(steps)), steps
    want = _losses(ref)
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in want] and want[-1]["epoch"] == 1
    for k in ("loss", "loss_itc", "loss_itm", "loss_lm", "r1_i2t", "img_cos_mean"):
        np.testing.assert_allclose([r[k] for r in rows], [r[k] for r in want], rtol=1e-5, atol=1e-6, err_msg=k)
