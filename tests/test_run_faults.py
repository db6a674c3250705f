"""`capfilt run` under faults: SIGKILL part-way then rerun (exactly once, same results), a truncated shard, an actor
that dies mid-batch. Real Ray, real processes; tiny random models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from capfilt.synth import write_corpus, write_truncated_shard
from pipelines.run import run_capfilt
from tests.test_run import TINY_CONFIG, capfilt_models, check_output, input_keys, tiny_config

_FIXTURES = (capfilt_models,)  # pytest finds fixtures by module attribute; shared with tests/test_run.py

REPO = Path(__file__).resolve().parent.parent


def _cmd(corpus: str, out: str, models: tuple[str, str]) -> list[str]:
    return [
        sys.executable, str(REPO / "cli.py"), "run", "--config", TINY_CONFIG, "--input", corpus, "--output", out,
        "--captioner", models[0], "--filter", models[1], "--batch-size", "1", "--no-progress",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(REPO))
    env.pop("CAPFILT_TEST_CRASH_ONCE", None)
    return env


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively, from /proc (Linux)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (the in-process Ray's raylet, GCS, workers), by pid."""
    kids = _descendants(p.pid)
    p.send_signal(signal.SIGKILL)
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=30)


def _same_results(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a, b = a.set_index("key").sort_index(), b.set_index("key").sort_index()
    assert list(a.index) == list(b.index)
    assert list(a["synthetic_captions"].map(list)) == list(b["synthetic_captions"].map(list))
    np.testing.assert_allclose(a["web_itm"], b["web_itm"], atol=1e-5)
    np.testing.assert_allclose(
        np.concatenate(a["synthetic_itm"].values), np.concatenate(b["synthetic_itm"].values), atol=1e-5
    )
    np.testing.assert_allclose(
        np.concatenate(a["synthetic_itc"].values), np.concatenate(b["synthetic_itc"].values), atol=1e-5
    )
    assert list(a["kept"]) == list(b["kept"]) and list(a["kept_texts"].map(list)) == list(b["kept_texts"].map(list))


@pytest.mark.slow
def test_sigkill_then_rerun_is_exactly_once(ray_local, tmp_path, capfilt_models):
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 48, seed=5, image_size=64, samples_per_shard=6)  # 8 shards
    # the reference: one uninterrupted run (in this process, on the test's Ray)
    ref_out = str(tmp_path / "ref")
    run_capfilt(tiny_config(corpus, ref_out, capfilt_models, batch_size=2))
    ref = check_output(ref_out, corpus)

    out = str(tmp_path / "out")
    state = Path(out) / "_state"
    p = subprocess.Popen(
        _cmd(corpus, out, capfilt_models), env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 240
    done_at_kill: list[str] = []
    try:
        while time.time() < deadline and p.poll() is None:
            done_at_kill = sorted(f.name for f in state.glob("*.json")) if state.is_dir() else []
            if done_at_kill:
                break
            time.sleep(0.05)
    finally:
        _kill_tree(p)
    log = p.stdout.read().decode(errors="replace")
    assert 1 <= len(done_at_kill) < 8, f"could not kill part-way (done: {done_at_kill})\n{log[-3000:]}"
    done_after_kill = sorted(f.name for f in state.glob("*.json"))
    assert len(done_after_kill) < 8, "the job finished before the kill landed"
    mtimes = {n: (Path(out) / "parquet" / n.replace(".json", ".parquet")).stat().st_mtime_ns for n in done_after_kill}

    r = subprocess.run(
        _cmd(corpus, out, capfilt_models), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["shards_skipped"] == len(done_after_kill) and summary["shards_done"] == 8
    for n, t in mtimes.items():  # completed shards are not recomputed
        assert (Path(out) / "parquet" / n.replace(".json", ".parquet")).stat().st_mtime_ns == t
    assert not list(Path(out).rglob("*.tmp"))  # leftovers of the killed run are gone
    got = check_output(out, corpus)  # every key exactly once in parquet and kept tars
    _same_results(got, ref)


def test_truncated_shard_and_actor_crash(ray_local, tmp_path, capfilt_models, monkeypatch):
    """One truncated tar among good ones, and the CapFilt actor dies in its first batch: the bad shard is reported
    (name and reason, exit status 2); every other shard completes; no row lost or duplicated by the retry."""
    src = str(tmp_path / "src")
    write_corpus(src, 15, seed=9, image_size=64, samples_per_shard=5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("00000", "00002"):
        (corpus / f"{name}.tar").write_bytes(Path(src, f"{name}.tar").read_bytes())
    readable = write_truncated_shard(f"{src}/00001.tar", str(corpus / "00001.tar"), fraction=0.6)
    crash = tmp_path / "crash.marker"
    monkeypatch.setenv("CAPFILT_TEST_CRASH_ONCE", str(crash))
    out = str(tmp_path / "out")
    from cli import main

    r = CliRunner().invoke(main, _cmd(str(corpus), out, capfilt_models)[2:])
    assert r.exit_code == 2, r.output
    assert crash.exists(), "the injected actor crash did not happen"
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert [f["shard"] for f in summary["failed_shards"]] == ["00001"]
    assert "ReadError" in summary["failed_shards"][0]["error"] and "00001.tar" in summary["failed_shards"][0]["path"]
    assert {s["shard"]: s["state"] for s in summary["per_shard"]} == {
        "00000": "done",
        "00001": "failed",
        "00002": "done",
    }
    keys = input_keys(f"{src}/00000.tar") | input_keys(f"{src}/00002.tar") | set(readable)
    df = check_output(out, str(corpus), keys)  # every readable key exactly once, despite the retried batch
    assert (df["status"] == "ok").all()
    # the retried rows are the rows an undisturbed run gives
    monkeypatch.delenv("CAPFILT_TEST_CRASH_ONCE")
    ref_out = str(tmp_path / "ref")
    run_capfilt(tiny_config(f"{src}/0000[02].tar", ref_out, capfilt_models, batch_size=2))
    _same_results(df[df["shard"] != "00001"], pd.read_parquet(Path(ref_out) / "parquet"))
