"""`capfilt run` reading from and writing to an S3-compatible server on loopback (moto) through s3fs, also killed
and rerun."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time

import pandas as pd
import pytest

from capfilt.synth import write_corpus
from pipelines.run.job import run_capfilt
from tests.test_run import capfilt_models, tiny_config
from tests.test_run_faults import REPO, _cmd, _env, _kill_tree

_FIXTURES = (capfilt_models,)  # shared fixture from tests/test_run.py


def test_run_s3_in_and_out(s3_server, ray_local, capfilt_models):
    bucket = s3_server.make_bucket()
    so = s3_server.storage_options
    write_corpus(f"s3://{bucket}/corpus", 8, seed=4, image_size=64, samples_per_shard=4, storage_options=so)
    out = f"s3://{bucket}/out"
    summary = run_capfilt(tiny_config(f"s3://{bucket}/corpus", out, capfilt_models, storage_options=so))
    assert summary["failed_shards"] == [] and summary["counts"]["in"] == 8
    fs = s3_server.fs
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{bucket}/out/parquet")) == ["00000.parquet", "00001.parquet"]
    df = pd.read_parquet(f"{out}/parquet", storage_options=so)
    assert len(df) == 8 and not df["key"].duplicated().any()
    kept = set()
    for name in ("00000", "00001"):
        with fs.open(f"{bucket}/out/tars/{name}.tar", "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            kept |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
    assert kept == set(df.loc[df["kept"], "key"])
    with fs.open(f"{bucket}/out/summary.json") as f:
        assert json.load(f)["counts"]["in"] == 8
    # resume works on S3 too: the state objects mark both shards done
    again = run_capfilt(tiny_config(f"s3://{bucket}/corpus", out, capfilt_models, storage_options=so))
    assert again["shards_skipped"] == 2 and again["rows_this_run"] == 0


@pytest.mark.slow
def test_run_s3_sigkill_then_rerun(s3_server, tmp_path, capfilt_models):
    """SIGKILL the whole job (a child process with its own Ray) part-way, with S3 in and out; the rerun cleans the
    incomplete multipart uploads under the output, skips the committed shards and ends with every key once."""
    bucket = s3_server.make_bucket()
    so, fs = s3_server.storage_options, s3_server.fs
    corpus, out = f"s3://{bucket}/corpus", f"s3://{bucket}/out"
    write_corpus(corpus, 24, seed=12, image_size=64, samples_per_shard=3, storage_options=so)  # 8 shards
    cmd = _cmd(corpus, out, capfilt_models) + ["--storage-options", json.dumps(so)]
    p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done: list[str] = []
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None and not done:
            fs.invalidate_cache()
            done = fs.glob(f"{bucket}/out/_state/*.json")
            time.sleep(0.1)
    finally:
        _kill_tree(p)
    log = p.stdout.read().decode(errors="replace")
    fs.invalidate_cache()
    done = fs.glob(f"{bucket}/out/_state/*.json")
    assert 1 <= len(done) < 8, f"could not kill part-way (done: {done})\n{log[-3000:]}"
    # what a kill mid-upload leaves on S3: an upload that never completed (invisible, but billed until aborted)
    fs.call_s3("create_multipart_upload", Bucket=bucket, Key="out/tars/00007.tar")
    assert any(u["Key"] == "out/tars/00007.tar" for u in fs.list_multipart_uploads(bucket))

    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert not [u for u in fs.list_multipart_uploads(bucket) if u["Key"].startswith("out/")]
    fs.invalidate_cache()
    with fs.open(f"{bucket}/out/summary.json") as f:
        summary = json.load(f)
    assert summary["shards_skipped"] == len(done) and summary["shards_done"] == 8
    df = pd.read_parquet(f"{out}/parquet", storage_options=so)
    assert len(df) == 24 and not df["key"].duplicated().any()
    kept = set()
    for path in fs.glob(f"{bucket}/out/tars/*.tar"):
        with fs.open(path, "rb") as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            names = [m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
        assert len(names) == len(set(names))
        kept |= set(names)
    assert kept == set(df.loc[df["kept"], "key"])
