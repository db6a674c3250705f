"""`capfilt run` under faults: SIGKILL part-way then rerun (exactly once, same results), a truncated shard, an actor
that dies mid-shard, a shard whose processing raises. Real Ray, real processes; tiny random models.

Faults inside the actors come from test-only ShardProcessor subclasses defined here and passed to `run_capfilt`
(pickled by value, so the Ray workers need not import this file): production code has no test hooks."""

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
from ray import cloudpickle

from capfilt.synth import write_corpus
from pipelines.run.job import run_capfilt
from pipelines.run.worker import ShardProcessor
from tests.synth_fixtures import write_truncated_shard
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


class CrashOnce(ShardProcessor):
    """Kills its own process in the middle of its first shard (after one model batch), once per marker file."""

    marker = ""

    def process_batch(self, rows, decoded):
        out = super().process_batch(rows, decoded)
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(f"crashed pid {os.getpid()} in shard {rows[0]['shard']}\n")
            os._exit(1)  # an actor death mid-shard: the driver replaces the actor and retries the shard elsewhere
        return out


class RaiseOn(ShardProcessor):
    """Raises inside one shard every time (a poison shard): retried, then reported failed; the others complete."""

    shard = ""

    def process_batch(self, rows, decoded):
        if rows[0]["shard"] == self.shard:
            raise RuntimeError(f"poison sample in {self.shard}")
        return super().process_batch(rows, decoded)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _subclass(base: type, **attrs) -> type:
    return type(base.__name__, (base,), attrs)


def test_truncated_shard_and_actor_crash(ray_local, tmp_path, capfilt_models):
    """One truncated tar among good ones, and the CapFilt actor dies in the middle of its first shard: the bad shard
    is reported (name and reason); every other shard completes; no row lost or duplicated by the retry."""
    src = str(tmp_path / "src")
    write_corpus(src, 15, seed=9, image_size=64, samples_per_shard=5)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("00000", "00002"):
        (corpus / f"{name}.tar").write_bytes(Path(src, f"{name}.tar").read_bytes())
    readable = write_truncated_shard(f"{src}/00001.tar", str(corpus / "00001.tar"), fraction=0.6)
    crash = tmp_path / "crash.marker"
    out = str(tmp_path / "out")
    cfg = tiny_config(str(corpus), out, capfilt_models, batch_size=2, shards_per_actor=2)  # two shards on the actor
    summary = run_capfilt(cfg, processor_cls=_subclass(CrashOnce, marker=str(crash)))
    assert crash.exists(), "the injected actor crash did not happen"
    # the dead actor's shards (the one it crashed in, and the next one it had started reading) were retried
    assert summary["driver"]["workers_lost"] == 1 and 1 <= summary["driver"]["retries"] <= cfg.shards_per_actor
    assert [f["shard"] for f in summary["failed_shards"]] == ["00001"]
    assert "ReadError" in summary["failed_shards"][0]["error"] and "00001.tar" in summary["failed_shards"][0]["path"]
    assert {s["shard"]: s["state"] for s in summary["per_shard"]} == {
        "00000": "done",
        "00001": "failed",
        "00002": "done",
    }
    keys = input_keys(f"{src}/00000.tar") | input_keys(f"{src}/00002.tar") | set(readable)
    df = check_output(out, str(corpus), keys)  # every readable key exactly once, despite the retried shard
    assert (df["status"] == "ok").all()
    assert not list(Path(out).rglob("*.tmp"))  # the dead attempt's temporaries are gone
    # the retried rows are the rows an undisturbed run gives
    ref_out = str(tmp_path / "ref")
    run_capfilt(tiny_config(f"{src}/0000[02].tar", ref_out, capfilt_models, batch_size=2))
    _same_results(df[df["shard"] != "00001"], pd.read_parquet(Path(ref_out) / "parquet"))


def test_poison_shard_is_retried_then_failed(ray_local, tmp_path, capfilt_models):
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 9, seed=2, image_size=64, samples_per_shard=3)
    out = str(tmp_path / "out")
    cfg = tiny_config(corpus, out, capfilt_models, retries=2)
    summary = run_capfilt(cfg, processor_cls=_subclass(RaiseOn, shard="00001"))
    assert [f["shard"] for f in summary["failed_shards"]] == ["00001"]
    err = summary["failed_shards"][0]["error"]
    assert "gave up after 3 attempts" in err and "poison sample in 00001" in err, err
    assert summary["driver"]["retries"] == 2 and summary["driver"]["workers_lost"] == 0
    assert summary["counts"]["in"] == 6
    assert not (Path(out) / "parquet" / "00001.parquet").exists() and not (Path(out) / "tars" / "00001.tar").exists()
    # the rerun retries only the failed shard (and, the poison gone, completes it)
    again = run_capfilt(tiny_config(corpus, out, capfilt_models))
    assert again["shards_skipped"] == 2 and again["failed_shards"] == [] and again["counts"]["in"] == 9
    check_output(out, corpus)


def test_progress_bar_fed_by_shard_records_and_heartbeats(ray_local, tmp_path, capfilt_models, capfd):
    corpus = str(tmp_path / "corpus")
    write_corpus(corpus, 16, seed=3, image_size=64, samples_per_shard=4)
    cfg = tiny_config(corpus, str(tmp_path / "out"), capfilt_models, batch_size=2)
    cfg.progress = True
    from tests.test_run_cluster import SlowBatches  # slowed per batch: the run outlasts a few heartbeat periods

    summary = run_capfilt(cfg, processor_cls=SlowBatches)
    err = capfd.readouterr().err
    assert summary["driver"]["heartbeats"] >= 1  # live samples/s came from the actor's counter
    assert "4/4 shards, actors 1/1" in err and "samples committed" in err and "samples/s" in err
    # not a terminal (a cluster job's log): a line at the start, every 30 s, at the end; never one per update
    assert 2 <= sum(" shards, actors " in line for line in err.splitlines()) <= 3
