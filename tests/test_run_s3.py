"""`capfilt run` reading from and writing to an S3-compatible server on loopback (moto) through s3fs."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd

from capfilt.synth import write_corpus
from pipelines.run import run_capfilt
from tests.test_run import capfilt_models, tiny_config

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
