"""`capfilt select`: a finished `capfilt run` re-decided from its stored scores, into a new folder, without a model.

One real run (tiny random models, a corpus with a truncated shard and a shard of undecodable images) is shared by
the module; its model folders are deleted right after it, so every select here would fail if it loaded a model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from capfilt.stages import select_texts
from capfilt.synth import write_corpus
from pipelines.run.job import run_capfilt
from pipelines.run.select import SelectSettings, run_select
from tests.synth_fixtures import make_bad_corpus, write_truncated_shard
from tests.test_run import capfilt_models, check_output, read_kept_tars, tiny_config
from tests.test_run_corpus import _rekey
from tests.test_run_faults import REPO, _env, _kill_tree

_FIXTURES = (capfilt_models,)  # shared fixture from tests/test_run.py

GOOD_SHARDS = 10  # 3 samples each; 00009 is cut short (a failed shard with rows)


@pytest.fixture(scope="module")
def run_out(tmp_path_factory, capfilt_models) -> dict:
    """A `capfilt run` over 10 shards (the last truncated) + one shard of hostile samples (decode errors); the
    models it used are deleted afterwards."""
    tmp = tmp_path_factory.mktemp("select_run")
    src, corpus = tmp / "src", tmp / "corpus"
    write_corpus(str(src), 3 * GOOD_SHARDS, seed=4, image_size=64, samples_per_shard=3)
    corpus.mkdir()
    for i in range(GOOD_SHARDS - 1):
        shutil.copy(src / f"{i:05d}.tar", corpus / f"{i:05d}.tar")
    last = f"{GOOD_SHARDS - 1:05d}"
    write_truncated_shard(str(src / f"{last}.tar"), str(corpus / f"{last}.tar"), fraction=0.7)
    make_bad_corpus(str(tmp / "bad"), seed=1, image_size=64)
    _rekey(tmp / "bad" / "00000.tar", corpus / "bad.tar", "bad")  # other keys than the good shards'
    models = [str(shutil.copytree(m, tmp / "models" / Path(m).name)) for m in capfilt_models]
    out = str(tmp / "out")
    summary = run_capfilt(tiny_config(str(corpus), out, models, batch_size=4))
    shutil.rmtree(tmp / "models")  # no model from here on: a select that loads one fails
    assert [f["shard"] for f in summary["failed_shards"]] == [last]
    df = pd.read_parquet(Path(out) / "parquet")
    assert (df["status"] == "decode_error").any() and df["kept"].any() and not df["kept"].all()
    return {"corpus": str(corpus), "out": out, "tmp": tmp, "df": df, "summary": summary, "models": models}


def _scores(df: pd.DataFrame) -> np.ndarray:
    ok = df[df["status"] == "ok"]
    return np.concatenate([ok["web_itm"].dropna().to_numpy(), np.concatenate(ok["synthetic_itm"].to_numpy())])


def expected_texts(row: pd.Series, t: float, keep: str = "both", max_synthetic: int | None = None) -> list[str]:
    """The keep rule written out independently of capfilt.stages, on one stored parquet row."""
    if row["status"] != "ok":
        return []
    web = [row["caption"]] if keep != "synthetic" and row["web_itm"] is not None and row["web_itm"] >= t else []
    syn = [] if keep == "web" else [(c, q) for c, q in zip(row["synthetic_captions"], row["synthetic_itm"])]
    best = sorted(range(len(syn)), key=lambda i: (-syn[i][1], i))
    passing = [i for i in best if syn[i][1] >= t][: max_synthetic if max_synthetic is not None else len(syn)]
    return web + [syn[i][0] for i in sorted(passing)]


def _select(run_out: dict, new: str, **kw) -> dict:
    return run_select(SelectSettings(run=run_out["out"], output=new, progress=False, **kw), echo=lambda m: None)


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "select", *args]


# ------------------------------------------------------------------------------------------------ no Ray


def test_select_texts_is_the_run_rule_and_its_options():
    caps, q = ["a", "b", "c"], [0.7, 0.2, 0.7]
    assert select_texts("web", 0.5, caps, q, 0.5) == (["web", "a", "c"], None)  # capfilt run's rule
    assert select_texts("web", 0.4, caps, q, 0.5, keep="web") == ([], "below_threshold")
    assert select_texts("web", 0.9, caps, q, 0.5, keep="synthetic") == (["a", "c"], None)
    assert select_texts("web", 0.9, caps, [0.6, 0.9, 0.6], 0.5, max_synthetic=2) == (["web", "a", "b"], None)
    assert select_texts(None, None, [], [], 0.5) == ([], "no_text")
    assert select_texts(None, None, caps, q, 0.5, keep="web") == ([], "no_text")


# ------------------------------------------------------------------------------------------------ on Ray


def test_same_settings_reproduce_the_run(run_out, ray_local, tmp_path):
    """The run's own threshold: the same kept tars byte for byte, the same parquet, the same accounting; the failed
    shard stays failed with its rows; `capfilt report` reads the new folder."""
    assert not any(Path(m).exists() for m in run_out["models"])
    new = str(tmp_path / "new")
    summary = _select(run_out, new)
    out = Path(run_out["out"])
    for tar in sorted((out / "tars").glob("*.tar")):
        assert (Path(new) / "tars" / tar.name).read_bytes() == tar.read_bytes(), tar.name
    for p in sorted((out / "parquet").glob("*.parquet")):
        assert pq.read_table(Path(new) / "parquet" / p.name).equals(pq.read_table(p)), p.name
    assert sorted(p.name for p in (Path(new) / "tars").glob("*")) == sorted(p.name for p in (out / "tars").glob("*"))
    ran = run_out["summary"]
    assert summary["counts"] == ran["counts"] and summary["failed_shards"][0]["shard"] == f"{GOOD_SHARDS - 1:05d}"
    assert summary["failed_shards"][0]["error"] == ran["failed_shards"][0]["error"]
    written = json.loads((Path(new) / "summary.json").read_text())
    assert written["settings"]["threshold"] == 0.5 and written["selection_of"] == run_out["out"]
    manifest = json.loads((Path(new) / "_run.json").read_text())
    assert manifest["selection_of"]["output"] == run_out["out"] and manifest["settings"]["keep"] == "both"

    from pipelines.report.page import write_report

    html = Path(write_report(new)).read_text()
    assert "summary.json disagrees" not in html and "threshold" in html


@pytest.mark.parametrize("where", ["stricter", "looser"])
def test_other_threshold_keeps_exactly_the_passing_rows(run_out, ray_local, tmp_path, where):
    df = run_out["df"]
    s = _scores(df)  # the median of the scores above (below) the run's threshold: some samples change sides
    t = round(float(np.median(s[s >= 0.5] if where == "stricter" else s[s < 0.5])), 4)
    new = str(tmp_path / "new")
    summary = _select(run_out, new, threshold=t)
    got = check_output(new, run_out["corpus"], set(df["key"])).set_index("key")
    want = df.set_index("key").apply(expected_texts, axis=1, t=t)
    assert got.loc[want.index, "kept_texts"].map(list).tolist() == want.tolist()
    assert got.loc[want.index, "kept"].tolist() == want.map(bool).tolist()
    kept, ran = set(got.index[got["kept"]]), set(df.loc[df["kept"], "key"])
    assert kept < ran if where == "stricter" else kept > ran
    assert summary["counts"]["kept"] == len(kept) and summary["counts"]["in"] == len(df)
    bad = got[got["status"] != "ok"]  # status rows are carried as they were
    assert len(bad) and not bad["kept"].any() and (bad["reason"] == bad["status"]).all()


def test_keep_and_max_synthetic_in_process(run_out, tmp_path):
    """`--keep synthetic --max-synthetic 1` at a looser threshold, without Ray."""
    df = run_out["df"]
    t = round(float(np.quantile(_scores(df), 0.2)), 4)
    new = str(tmp_path / "new")
    _select(run_out, new, threshold=t, keep="synthetic", max_synthetic=1, in_process=True)
    got = check_output(new, run_out["corpus"], set(df["key"])).set_index("key")
    want = df.set_index("key").apply(expected_texts, axis=1, t=t, keep="synthetic", max_synthetic=1)
    assert got.loc[want.index, "kept_texts"].map(list).tolist() == want.tolist()
    assert want.map(len).max() == 1 and got["kept"].any()


@pytest.mark.slow
def test_sigkill_mid_select_then_rerun_is_exactly_once(run_out, tmp_path):
    df = run_out["df"]
    t = round(float(np.quantile(_scores(df), 0.4)), 4)
    ref = str(tmp_path / "ref")
    _select(run_out, ref, threshold=t, in_process=True)

    new = tmp_path / "new"
    args = _cli(run_out["out"], str(new), "--threshold", str(t), "--tasks", "1", "--no-progress")
    p = subprocess.Popen(args, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    n = GOOD_SHARDS + 1
    deadline, done_at_kill = time.time() + 120, []
    try:
        while time.time() < deadline and p.poll() is None:
            done_at_kill = list((new / "_state").glob("*.json")) if (new / "_state").is_dir() else []
            if done_at_kill:
                break
            time.sleep(0.01)
    finally:
        _kill_tree(p)
    log = p.stdout.read().decode(errors="replace")
    done_after_kill = sorted(f.name for f in (new / "_state").glob("*.json"))
    assert 1 <= len(done_at_kill) and len(done_after_kill) < n, f"not killed part-way\n{log[-3000:]}"

    r = subprocess.run(args, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]  # 2: the run's failed shard is still failed
    summary = json.loads((new / "summary.json").read_text())
    assert summary["shards_skipped"] >= len(done_after_kill) - 1 and summary["shards"] == n
    assert not list(new.rglob("*.tmp"))
    got = check_output(str(new), run_out["corpus"], set(df["key"]))  # every key exactly once, tars == kept rows
    for p_ref in sorted((Path(ref) / "parquet").glob("*.parquet")):
        assert pq.read_table(new / "parquet" / p_ref.name).equals(pq.read_table(p_ref)), p_ref.name
        tar = p_ref.name.replace(".parquet", ".tar")
        assert (new / "tars" / tar).read_bytes() == (Path(ref) / "tars" / tar).read_bytes()
    assert len(got) == len(df)


def test_no_model_module_is_imported(run_out, tmp_path):
    """Besides the deleted model folders: a select in a fresh process never imports the model code."""
    code = (
        "import sys; from pipelines.run.select import SelectSettings, run_select; "
        f"run_select(SelectSettings(run={run_out['out']!r}, output={str(tmp_path / 'new')!r}, threshold=0.3, "
        "in_process=True, progress=False)); "
        "bad = [m for m in ('blip.model', 'blip.checkpoint', 'blip.convert') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_other_settings_refused_same_resume_overwrite_redoes(run_out, tmp_path):
    from cli import main

    new = str(tmp_path / "new")
    runner = CliRunner()
    r = runner.invoke(main, ["select", run_out["out"], new, "--threshold", "0.45", "--in-process", "--no-progress"])
    assert r.exit_code == 2, r.output  # the run's failed shard
    states = {p.name: p.stat().st_mtime_ns for p in (Path(new) / "_state").glob("*.json")}

    r = runner.invoke(main, ["select", run_out["out"], new, "--threshold", "0.55", "--in-process"])
    assert r.exit_code == 1
    err = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "threshold 0.45 -> 0.55" in err[0] and "--overwrite" in err[0], r.output
    r = runner.invoke(main, ["select", run_out["out"], new, "--keep", "web", "--threshold", "0.45", "--in-process"])
    assert r.exit_code == 1 and "keep both -> web" in r.output

    r = runner.invoke(main, ["select", run_out["out"], new, "--threshold", "0.45", "--in-process"])  # resumes
    assert r.exit_code == 2 and f"({GOOD_SHARDS} already done, 1 to do)" in r.output, r.output
    done = {n: t for n, t in states.items() if n != f"{GOOD_SHARDS - 1:05d}.json"}
    assert all((Path(new) / "_state" / n).stat().st_mtime_ns == t for n, t in done.items())

    r = runner.invoke(main, ["select", run_out["out"], new, "--threshold", "0.55", "--in-process", "--overwrite"])
    assert r.exit_code == 2, r.output
    got = pd.read_parquet(Path(new) / "parquet").set_index("key")
    want = run_out["df"].set_index("key").apply(expected_texts, axis=1, t=0.55)
    assert got.loc[want.index, "kept_texts"].map(list).tolist() == want.tolist()
    assert set(read_kept_tars(new)) == set(got.index[got["kept"]])
    assert json.loads((Path(new) / "_run.json").read_text())["settings"]["threshold"] == 0.55
