"""The whole bootstrap loop (configs/bootstrap_ci.yaml, a small version of the demo) end to end, then a rerun that
skips every finished step. Run as a new user runs the README's command: `capfilt bootstrap --config <shipped config>`
in a fresh copy of the repository (its relative `workdir` as shipped, no --workdir), in a child process that owns its
Ray runtime, whose workers do not run in that folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capfilt.synth import caption_accuracy, read_truth

STEPS = ["data", "warmup_vision", "pretrain_noisy", "finetune_captioner", "finetune_filter", "capfilt", "pretrain_capfilt",
         "finetune_captioner_capfilt", "finetune_retrieval_capfilt", "eval_ft_noisy", "eval_ft_capfilt",
         "filter_quality"]  # fmt: skip
F_STEPS = ["capfilt_filter_only", "pretrain_filter_only", "finetune_captioner_filter_only",
           "finetune_retrieval_filter_only", "eval_ft_filter_only"]  # fmt: skip


ROOT = Path(__file__).resolve().parents[1]


def _clone(dst: Path) -> Path:
    """The working tree as `git clone` would give it (tracked + new files, nothing git ignores: no runs/, no .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    return dst


def _bootstrap(clone: Path, *extra: str) -> subprocess.CompletedProcess:
    """The README's command, from the clone's root; the clone's code first on the path (not the editable install)."""
    exe = Path(sys.executable).parent / "capfilt"
    cli = [str(exe)] if exe.is_file() else [sys.executable, "-c", "import cli; cli.main()"]
    env = {**os.environ, "PYTHONPATH": str(clone)}
    return subprocess.run(
        cli + ["bootstrap", "--config", "configs/bootstrap_ci.yaml", *extra],
        capture_output=True, text=True, timeout=1200, cwd=clone, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_bootstrap_loop_end_to_end_and_rerun(tmp_path: Path) -> None:
    clone = _clone(tmp_path / "clone")
    assert "workdir: runs/" in (clone / "configs" / "bootstrap_ci.yaml").read_text()  # relative, as the demo's
    work = clone / "runs" / "bootstrap_ci"
    p = _bootstrap(clone)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "C+F" in p.stdout and f"report: {work / 'bootstrap_report.json'}" in p.stdout

    report = json.loads((work / "bootstrap_report.json").read_text())
    for row in ("no bootstrap", "C+F"):
        r = report["rows"][row]
        assert set(r["retrieval"]) >= {"txt_r1", "txt_r5", "img_r1", "img_r5"}
        assert 0 <= r["retrieval"]["txt_r1"] <= r["retrieval"]["txt_r5"] <= 100
        assert {"bleu4", "cider", "synth_attribute_accuracy"} <= set(r["caption"])
    assert all((work / "_done" / f"{s}.json").is_file() for s in STEPS)
    # the paired differences are per-query means: they equal the table's own row differences
    rows, paired = report["rows"], report["paired"]["C+F"]
    for name, (sec, m) in {"TR@1": ("retrieval", "txt_r1"), "IR@1": ("retrieval", "img_r1"),
                           "CIDEr": ("caption", "cider"), "attr acc": ("caption", "synth_attribute_accuracy")}.items():  # fmt: skip
        want = rows["C+F"][sec][m] - rows["no bootstrap"][sec][m]
        assert paired[name]["diff"] == pytest.approx(want, abs=1e-6) and paired[name]["se"] >= 0
    assert paired["TR@1"]["n"] == paired["attr acc"]["n"] == 32
    assert "C+F - no bootstrap, paired over the same 32 test queries (diff ± SE): TR@1 " in p.stdout
    # each row is measured after fine-tuning its pretrained model on the clean set (the paper's Table 1, FT): the
    # noisy arm's retrieval model is the loop's filter, the C+F arm's is fine-tuned by the same recipe
    evaluated = {r: json.loads((work / "eval" / n / "eval_retrieval.json").read_text())["model"]
                 for r, n in (("no bootstrap", "ft_noisy"), ("C+F", "ft_capfilt"))}  # fmt: skip
    assert evaluated == {"no bootstrap": str(work / "filter"), "C+F": str(work / "retrieval_capfilt")}
    assert json.loads((work / "retrieval_capfilt" / "config.json").read_text())["family"] == "retrieval"

    # every web sample went through capfilt exactly once; the filter numbers agree with an independent count
    df = pd.read_parquet(work / "capfilt" / "parquet")
    truth = read_truth(str(work / "data" / "web"))
    assert sorted(df["key"]) == sorted(truth)
    ok = df[df["status"] == "ok"]
    thr = report["capfilt_run"]["threshold"]
    noisy = {k for k, t in truth.items() if t["noise_kind"] != "none"}
    dropped = {k for k, s in zip(ok["key"], ok["web_itm"]) if s is None or s < thr}
    f = report["filter"]
    assert f["noisy_web_texts"] == len(noisy & set(ok["key"]))
    assert f["drop_recall"] == pytest.approx(len(dropped & noisy) / max(1, len(noisy)))
    # the attribute accuracy of the web texts the filter kept, recomputed from the parquet and the truth
    kept_acc = [caption_accuracy(t, truth[k]["objects"]) for k, t in zip(ok["key"], ok["caption"]) if k not in dropped]
    ta = f["text_accuracy"]
    assert ta["web_kept"]["n"] == len(kept_acc) and ta["web"]["n"] == len(ok)
    if kept_acc:
        assert ta["web_kept"]["accuracy"] == pytest.approx(100 * sum(kept_acc) / len(kept_acc))
    else:  # the CI config's short filter may keep no web text
        assert ta["web_kept"]["accuracy"] is None
    assert ta["synthetic"]["n"] == int(ok["synthetic_captions"].map(len).sum())
    # the second pretraining read the kept tars + the clean set and its model exists; it took as many optimizer steps
    # as the first (equal_steps), over as many epochs of its own (smaller) corpus as that needs
    assert (work / "pretrain_capfilt" / "model.safetensors").is_file()
    pre = report["pretrain"]
    assert pre["C+F"]["steps"] == pre["no bootstrap"]["steps"] == 8
    assert pre["C+F"]["samples"] == int(ok["kept"].sum()) + 64  # kept web samples + the clean set
    assert pre["C+F"]["epochs"] == -(-8 // (pre["C+F"]["samples"] // 16))
    assert "pretraining: no bootstrap 224 samples, 8 steps; C+F" in p.stdout
    # the ViT warm-up both arms started from, and each step's wall time, in the report and the table
    assert set(report["warmup_vision"]["test_accuracy"]) == {"shape", "color", "size", "empty"}
    assert "ViT warm-up (both arms start from it), held-out: shape " in p.stdout
    assert (
        list(report["seconds"]) == STEPS and min(report["seconds"].values()) >= 0 < report["seconds"]["pretrain_noisy"]
    )
    assert f"time: {sum(report['seconds'].values()) / 60:.1f} min (data " in p.stdout

    # the same step on web shards without the synthetic world's ground truth (your own data): counts only
    from pipelines.bootstrap import Bootstrap, BootstrapSettings, format_report

    own = Bootstrap(BootstrapSettings(workdir=str(work))).filter_quality({"web": str(tmp_path / "no_truth_here")})
    assert own["ground_truth"] is False and "drop_recall" not in own and own["web_texts"] == len(ok)
    assert own["samples_kept"] == pytest.approx(ok["kept"].mean()) and f["ground_truth"] is True
    assert "filter: keeps" in format_report({**report, "filter": own})

    t0 = time.time()
    again = _bootstrap(clone)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == len(STEPS)
    assert time.time() - t0 < 120

    # the "F" row: the same filter over the same web corpus without captions; only its own four steps run
    f_only = _bootstrap(clone, "--set", "filter_only=true")
    assert f_only.returncode == 0, f_only.stdout[-3000:] + f_only.stderr[-3000:]
    assert f_only.stdout.count("done before, skipped") == len(STEPS)
    assert all((work / "_done" / f"{s}.json").is_file() for s in F_STEPS)
    report_f = json.loads((work / "bootstrap_report.json").read_text())
    assert list(report_f["rows"]) == ["no bootstrap", "F", "C+F"] and report_f["rows"]["C+F"] == report["rows"]["C+F"]
    df_f = pd.read_parquet(work / "capfilt_filter_only" / "parquet").set_index("key")
    assert sorted(df_f.index) == sorted(truth) and (df_f["synthetic_captions"].map(len) == 0).all()
    web_itm = ok.set_index("key")["web_itm"].dropna()
    assert df_f.loc[web_itm.index, "web_itm"].to_numpy() == pytest.approx(web_itm.to_numpy(), abs=1e-4)
    assert report_f["pretrain"]["F"]["steps"] == 8
    assert report_f["pretrain"]["F"]["samples"] == int(df_f["kept"].sum()) + 64
    assert "\nF " in f_only.stdout

    # --seeds: one loop per seed in WORKDIR/seed_N, then the table over seeds. Seed 0's loop is this one (copied, so
    # every training step is skipped), measured this time with zero-shot retrieval (the pretrained models themselves,
    # as the demo config does): only the two evaluations run; the table and bootstrap_seeds.json carry their numbers.
    seed0 = clone / "runs" / "seeds" / "seed_0"
    shutil.copytree(work, seed0)
    zs = ["--set", "retrieval_eval=zero_shot"]
    seeds = _bootstrap(clone, "--seeds", "0", "--workdir", "runs/seeds", *zs)
    assert seeds.returncode == 0, seeds.stdout[-3000:] + seeds.stderr[-3000:]
    assert (
        seeds.stdout.count("done before, skipped") == len(STEPS) - 3 and "mean ± std over 1 seeds (0)" in seeds.stdout
    )
    assert "== eval_noisy\n" in seeds.stdout and "== finetune_retrieval_capfilt" not in seeds.stdout
    evaluated = {r: json.loads((seed0 / "eval" / n / "eval_retrieval.json").read_text())["model"]
                 for r, n in (("no bootstrap", "noisy"), ("C+F", "capfilt"))}  # fmt: skip
    assert evaluated == {"no bootstrap": str(seed0 / "pretrain_noisy"), "C+F": str(seed0 / "pretrain_capfilt")}
    report0 = json.loads((seed0 / "bootstrap_report.json").read_text())
    assert report0["rows"]["C+F"]["caption"] == report["rows"]["C+F"]["caption"]  # the same captioner, re-evaluated
    agg = json.loads((clone / "runs" / "seeds" / "bootstrap_seeds.json").read_text())
    assert agg["seeds"] == [0] and agg["rows"]["C+F"]["txt_r1"]["values"] == [
        report0["rows"]["C+F"]["retrieval"]["txt_r1"]
    ]


def test_paired_difference_is_the_mean_difference_and_its_standard_error():
    from pipelines.bootstrap import paired_difference

    rng = np.random.default_rng(0)
    hard = rng.uniform(0, 100, 500)  # per-query difficulty both models share
    base, other = hard + rng.normal(0, 5, 500), hard + 2 + rng.normal(0, 5, 500)
    got = paired_difference(base, other)
    d = other - base
    assert got["n"] == 500 and got["diff"] == pytest.approx(d.mean())
    assert got["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(500))
    unpaired = np.sqrt(base.var(ddof=1) / 500 + other.var(ddof=1) / 500)
    assert got["se"] < unpaired / 3  # the shared difficulty cancels
    assert paired_difference([0, 100, 0, 100], [100, 100, 0, 0]) == pytest.approx(
        {"diff": 0.0, "se": float(np.sqrt(20000 / 3) / 2), "n": 4}
    )


def test_roc_auc_matches_brute_force():
    import numpy as np

    from pipelines.bootstrap import roc_auc

    rng = np.random.default_rng(0)
    pos, neg = rng.random(40).round(1), (rng.random(55) * 0.8).round(1)  # rounded: many ties
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert abs(roc_auc(pos, neg) - brute) < 1e-12
    assert roc_auc([1.0, 2.0], [0.0]) == 1.0 and roc_auc([0.0], [1.0, 2.0]) == 0.0 and roc_auc([], [1.0]) is None


def test_bootstrap_init_starts_both_arms_from_the_checkpoint(tmp_path, tiny_vocab_dir, monkeypatch):
    """`capfilt bootstrap --init CKPT`: pretraining starts from CKPT with CKPT's own tokenizer, not the synthetic one."""
    import torch

    from blip import save_pretrained
    from blip.config import BlipConfig
    from blip.model import BlipPretrain
    from blip.tokenizer import build_tokenizer
    from pipelines.bootstrap import Bootstrap, BootstrapSettings
    from pipelines.train.models import build_model
    from pipelines.train.settings import TrainSettings

    torch.manual_seed(0)
    ckpt = BlipPretrain(BlipConfig.from_name("tiny", family="pretrain", queue_size=64))
    ckpt.tokenizer = build_tokenizer(tiny_vocab_dir)
    save_pretrained(ckpt, tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)  # a relative --init, as a user types it
    cfg = BootstrapSettings.load(
        str(ROOT / "configs" / "bootstrap_ci.yaml"), workdir=str(tmp_path / "w"), init="pretrained"
    )
    assert cfg.init == str(tmp_path / "pretrained")
    overrides = Bootstrap(cfg).pretrain_overrides(str(tmp_path / "synthetic_vocab"))
    assert "tokenizer" not in overrides and overrides["init"] == cfg.init
    s = TrainSettings.load(cfg.pretrain_config, **overrides, data=str(tmp_path), output=str(tmp_path / "o"))
    model, tok = build_model(s, s.init)
    assert len(tok) == len(ckpt.tokenizer)
    for k, v in ckpt.state_dict().items():  # the arm starts from the checkpoint's weights
        assert torch.equal(model.state_dict()[k], v), k


def test_bootstrap_set_overrides_one_key_of_a_step(tmp_path):
    """`capfilt bootstrap --set seed=1 --set pretrain.epochs=3`: top-level settings replaced, a step's map merged."""
    from pipelines.bootstrap import BootstrapSettings
    from pipelines.settings import parse_set, read_yaml

    demo = read_yaml(ROOT / "configs" / "bootstrap_demo.yaml")
    items = ["seed=1", "noise=0.6", "pretrain.epochs=3", "eval.k-test=4", f"workdir={tmp_path}"]
    cfg = BootstrapSettings.load(str(ROOT / "configs" / "bootstrap_demo.yaml"), **parse_set(items))
    assert (cfg.seed, cfg.noise, cfg.workdir) == (1, 0.6, str(tmp_path))
    assert cfg.pretrain == {**demo["pretrain"], "epochs": 3} and cfg.eval == {**demo["eval"], "k_test": 4}
    with pytest.raises(ValueError, match="'seed' is not a map"):
        BootstrapSettings.load(str(ROOT / "configs" / "bootstrap_demo.yaml"), **parse_set(["seed.x=1"]))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set(["seed"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 0\npretrain: {epochs: 1\n")  # an unclosed map: a typo, not a traceback
    for args, msg in ((["--set", "nosuch=1"], "nosuch"), (["--set", "retrieval_eval=fine"], "retrieval_eval"),
                      (["--config", str(broken)], "not valid YAML")):  # fmt: skip
        r = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "bootstrap", *args, "--workdir", str(tmp_path)],
            capture_output=True, text=True, cwd=tmp_path,
        )  # fmt: skip
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()] and msg in r.stderr
        assert r.stderr.startswith("error:"), r.stderr


def test_aggregate_seeds_mean_std_and_direction():
    import numpy as np

    from pipelines.bootstrap import COLUMNS, aggregate_seeds, format_seeds

    rng = np.random.default_rng(0)

    def row():
        return {
            sec: {m: float(rng.uniform(0, 100)) for s, m, _, _ in COLUMNS if s == sec}
            for sec in ("retrieval", "caption")
        }

    def report():
        f = {"web_itm_auc": {k: float(rng.random()) for k in ("all", "attribute")}}
        f.update({k: float(rng.random()) for k in ("drop_recall", "clean_web_kept", "synthetic_kept")})
        return {"rows": {"no bootstrap": row(), "C+F": row()}, "filter": f}

    reports = {s: report() for s in (3, 1, 2)}
    agg = aggregate_seeds(reports)
    assert agg["seeds"] == [1, 2, 3]
    for sec, m, _, _ in COLUMNS:
        cf = [reports[s]["rows"]["C+F"][sec][m] for s in (3, 1, 2)]
        base = [reports[s]["rows"]["no bootstrap"][sec][m] for s in (3, 1, 2)]
        assert agg["rows"]["C+F"][m]["mean"] == pytest.approx(np.mean(cf))
        assert agg["rows"]["C+F"][m]["std"] == pytest.approx(np.std(cf, ddof=1))
        d = np.subtract(cf, base)
        assert (
            agg["difference"][m]["mean"] == pytest.approx(d.mean())
            and agg["difference"][m]["cf_higher"] == (d > 0).sum()
            and agg["difference"][m]["se"] == pytest.approx(np.std(d, ddof=1) / np.sqrt(3))
        )
    for k in ("drop_recall", "clean_web_kept"):
        assert agg["filter"][k]["mean"] == pytest.approx(np.mean([reports[s]["filter"][k] for s in (3, 1, 2)]))
    att = [reports[s]["filter"]["web_itm_auc"]["attribute"] for s in (3, 1, 2)]
    assert agg["filter"]["web_itm_auc"]["attribute"]["std"] == pytest.approx(np.std(att, ddof=1))
    text = format_seeds(agg)
    assert "3 seeds (1, 2, 3)" in text and "C+F - no bootstrap" in text and "mean ± SE over the 3 seeds" in text
    assert "filter: drops" in text and "attribute" in text and "filter ROC-AUC" in text
    _, m0, h0, _ = COLUMNS[0]
    agg["difference"][m0].update(mean=5.1, se=0.04)  # seeds that agree: the SE is not rounded to 0.0
    assert f"{h0} +5.1 ± 0.04," in format_seeds(agg)
    # a user's own shards have no ground truth: no drop/keep line, the table still prints
    for r in reports.values():
        r["filter"] = {"web_itm_auc": {}}
    text = format_seeds(aggregate_seeds(reports))
    assert "filter: drops" not in text and "C+F higher in" in text


def test_paired_differences_match_queries_by_key_and_refuse_different_test_sets(tmp_path):
    from pipelines.bootstrap import paired_differences

    def write(name: str, keys: list[str], ranks: list[int], cider: dict[str, float]) -> str:
        d = tmp_path / name
        d.mkdir()
        qk = {"image_to_text": keys, "text_to_image": [k + "#0" for k in keys]}
        ret = {"ranks": {"image_to_text": ranks, "text_to_image": ranks}, "query_keys": qk}
        (d / "eval_retrieval.json").write_text(json.dumps(ret))
        (d / "eval_caption.json").write_text(json.dumps({"per_image": {"cider": cider}}))
        return str(d)

    base = write("base", ["a", "b", "c"], [0, 3, 0], {"a": 10.0, "b": 20.0, "c": 30.0})
    # the same hits on the same queries, listed in another order: by position a and b would differ (SE > 0)
    other = write("other", ["b", "a", "c"], [3, 0, 0], {"c": 60.0, "b": 20.0, "a": 40.0})
    got = paired_differences({"no bootstrap": base, "C+F": other})["C+F"]
    assert got["TR@1"] == {"diff": 0.0, "se": 0.0, "n": 3} and got["IR@1"]["se"] == 0.0
    assert got["CIDEr"]["diff"] == pytest.approx(20.0)  # (30 + 0 + 30) / 3
    elsewhere = write("elsewhere", ["a", "b", "d"], [0, 0, 0], {"a": 1.0, "b": 1.0, "d": 1.0})
    with pytest.raises(ValueError, match="different test queries"):
        paired_differences({"no bootstrap": base, "C+F": elsewhere})
