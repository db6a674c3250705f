"""One output folder = one corpus: the run manifest (models, settings, input), input fingerprints per shard, compressed
and repeated-key shards, the output's lease, unreachable stores and interrupts. Real Ray, real processes, a real S3
server (moto) on loopback; tiny random models."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from capfilt.synth import write_corpus
from pipelines.io import ShardReader, StorageError, check_store, list_shards
from pipelines.run.job import run_capfilt
from pipelines.run.lease import Lease, LeaseHeld
from pipelines.run.manifest import model_fingerprint
from pipelines.run.worker import ShardProcessor, WorkerSettings
from tests.test_run import capfilt_models, check_output, input_keys, tiny_config
from tests.test_run_faults import REPO, _cmd, _env

_FIXTURES = (capfilt_models,)  # shared fixture from tests/test_run.py


def _rekey(src: Path, dst: Path, prefix: str) -> None:
    """A copy of a webdataset tar whose sample keys all get `prefix` (same images and texts, other keys)."""
    buf = io.BytesIO()
    with tarfile.open(src) as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            m.name = prefix + m.name
            tout.addfile(m, io.BytesIO(data))
    dst.write_bytes(buf.getvalue())


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under the output with its size and mtime: "untouched" means this is unchanged."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def _other_filter(models: tuple[str, str], dst: Path) -> str:
    """A second filter checkpoint: the first one's folder with one weight changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(models[1], dst)
    sd = load_file(dst / "model.safetensors")
    k = next(k for k in sd if k.endswith("itm_head.weight"))
    sd[k] = sd[k] + 0.5
    save_file(sd, dst / "model.safetensors")
    return str(dst)


# ------------------------------------------------------------------------------------------------ no Ray


def test_compressed_and_odd_shards_are_listed(tmp_path):
    write_corpus(str(tmp_path / "c"), 12, seed=1, image_size=32, samples_per_shard=4)  # 00000..00002.tar
    d = tmp_path / "c"
    (d / "00001.tar.gz").write_bytes(gzip.compress((d / "00001.tar").read_bytes()))
    (d / "00001.tar").unlink()
    (d / "00002.tgz").write_bytes(gzip.compress((d / "00002.tar").read_bytes()))
    (d / "00002.tar").unlink()
    (d / "00003.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd not really zstd")
    (d / "notes.tar.md5").write_text("not a shard")
    shards = list_shards(str(d))
    assert [(s.name, s.format) for s in shards] == [
        ("00000", "tar"),
        ("00001", "tar"),
        ("00002", "tar"),
        ("00003", "tar"),
    ]
    assert all(s.fingerprint and s.fingerprint.startswith("size=") for s in shards)
    for s in shards[:3]:
        r = ShardReader(s)
        assert len(list(r)) == 4 and r.error is None
    bad = ShardReader(shards[3])
    assert list(bad) == [] and "cannot read a .tar.zst shard" in bad.error
    # a plain tar next to a compressed one of the same stem: both kept, under distinct names
    (d / "00000.tar.gz").write_bytes(gzip.compress((d / "00000.tar").read_bytes()))
    names = [s.name for s in list_shards(str(d))]
    assert names.count("00000") == 1 and "00000_tar_gz" in names and len(names) == 5


def test_fingerprint_changes_with_the_file(tmp_path):
    write_corpus(str(tmp_path / "c"), 4, seed=1, image_size=32, samples_per_shard=4)
    before = list_shards(str(tmp_path / "c"))[0].fingerprint
    assert list_shards(str(tmp_path / "c"))[0].fingerprint == before
    _rekey(tmp_path / "c" / "00000.tar", tmp_path / "x.tar", "x")
    os.replace(tmp_path / "x.tar", tmp_path / "c" / "00000.tar")
    assert list_shards(str(tmp_path / "c"))[0].fingerprint != before


def test_repeated_keys_become_status_rows(tmp_path, capfilt_models):
    """`a.jpg, b.jpg b.txt, a.jpg a.txt` and `c.jpg c.jpg c.txt`: every occurrence is a row; repeats are
    `duplicate_key` rows that name the first occurrence. ShardProcessor without Ray."""
    from PIL import Image

    from capfilt.synth import encode_jpeg

    jpg = encode_jpeg(Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8)))
    src = tmp_path / "in"
    src.mkdir()
    (src / "00000.tar").write_bytes(
        _tar(
            [("a.jpg", jpg), ("b.jpg", jpg), ("b.txt", b"b web"), ("a.jpg", jpg), ("a.txt", b"a web")]
            + [("c.jpg", jpg), ("c.jpg", jpg), ("c.txt", b"c web")]
        )
    )
    rows = list(ShardReader(list_shards(str(src))[0]))
    assert [(r["key"], r["duplicate_of"]) for r in rows] == [("a", None), ("b", None), ("a", 0), ("c", None), ("c", 3)]
    cfg = tiny_config(str(src), str(tmp_path / "out"), capfilt_models)
    proc = ShardProcessor(
        {**cfg.stage_settings(), "device": "cpu"},
        WorkerSettings(output=str(tmp_path / "out"), storage_options={}, image_size=32, decode_threads=1),
    )
    proc.setup()
    rec = proc(list_shards(str(src))[0])
    assert rec["state"] == "done" and rec["in"] == 5 and rec["duplicate_keys"] == 2 and rec["ok"] == 3
    df = pd.read_parquet(tmp_path / "out" / "parquet" / "00000.parquet")
    dup = df[df["status"] == "duplicate_key"]
    assert list(dup["key"]) == ["a", "c"] and list(dup["idx"]) == [2, 4]
    assert list(dup["error"]) == ["key 'a' already at idx 0", "key 'c' already at idx 3"]
    assert not dup["kept"].any() and set(dup["reason"]) == {"duplicate_key"}
    assert rec["input"] == list_shards(str(src))[0].fingerprint  # the state names its input


def test_model_fingerprint_is_content(tmp_path, capfilt_models):
    a = model_fingerprint(capfilt_models[1])
    shutil.copytree(capfilt_models[1], tmp_path / "copy")
    assert model_fingerprint(str(tmp_path / "copy"))["digest"] == a["digest"]  # moved or copied: the same model
    assert model_fingerprint(str(tmp_path / "copy"), a)["digest"] == a["digest"]  # reusing recorded digests
    other = _other_filter(capfilt_models, tmp_path / "other")
    assert model_fingerprint(other)["digest"] != a["digest"]
    assert model_fingerprint(capfilt_models[0])["digest"] != a["digest"]


def test_lease_local(tmp_path):
    root = str(tmp_path / "out")
    import fsspec

    fs = fsspec.filesystem("file")
    first = Lease(fs, root, timeout=60, every=0.2).acquire()
    with pytest.raises(LeaseHeld, match=r"output in use by job \w+ on host .* \(pid \d+\) since"):
        Lease(fs, root, timeout=60).acquire()
    time.sleep(0.5)
    rec = json.loads((tmp_path / "out" / "_lock").read_text())
    assert rec["job_id"] == first.job_id and time.time() - rec["heartbeat"] < 0.5  # the heartbeat renews it
    first.release()
    assert not (tmp_path / "out" / "_lock").exists()
    # a lease whose heartbeat is older than the timeout is stale: taken over, and its old holder notices
    old = Lease(fs, root, timeout=60, every=3600).acquire()
    stale = {**json.loads((tmp_path / "out" / "_lock").read_text()), "heartbeat": time.time() - 120}
    (tmp_path / "out" / "_lock").write_text(json.dumps(stale))
    new = Lease(fs, root, timeout=60).acquire()
    assert new.took_over["job_id"] == old.job_id
    old.heartbeat()
    assert old.lost and "taken over" in old.lost
    new.release()
    # a lease of a process that is gone from this host needs no timeout (a SIGKILLed job's rerun)
    p = subprocess.Popen(["true"])
    p.wait()
    dead = {**stale, "job_id": "dead", "pid": p.pid, "host": socket.gethostname(), "heartbeat": time.time()}
    (tmp_path / "out" / "_lock").write_text(json.dumps(dead))
    taker = Lease(fs, root, timeout=3600).acquire()
    assert taker.took_over["job_id"] == "dead"
    taker.release()


def test_lease_s3_conditional_writes(s3_server):
    fs, bucket = s3_server.fs, s3_server.make_bucket()
    root = f"{bucket}/out"
    first = Lease(fs, root, timeout=60, every=3600).acquire()
    with pytest.raises(LeaseHeld, match="output in use by job"):
        Lease(fs, root, timeout=60).acquire()
    first.heartbeat()  # renews on its own ETag
    assert first.lost is None
    stale = {**json.loads(fs.cat(f"{root}/_lock")), "heartbeat": time.time() - 120, "host": "elsewhere"}
    fs.pipe(f"{root}/_lock", json.dumps(stale).encode())
    second = Lease(fs, root, timeout=60, every=3600).acquire()
    assert second.took_over["job_id"] == first.job_id
    first.heartbeat()
    assert first.lost  # its conditional renewal is refused: it knows it lost the output
    second.release()
    assert not fs.exists(f"{root}/_lock")


def test_unreachable_store_is_one_line_in_seconds(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    so = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    t0 = time.time()
    with pytest.raises(StorageError, match=rf"output s3://nowhere/out: cannot reach the store .*127.0.0.1:{port}"):
        check_store("s3://nowhere/out", so, "output")
    assert time.time() - t0 < 10
    # the CLI: one error line, exit 1, before Ray starts
    corpus = tmp_path / "c"
    write_corpus(str(corpus), 2, seed=1, image_size=32, samples_per_shard=2)
    cmd = [
        *_cmd(str(corpus), "s3://nowhere/out", ("cap", "filt")),
        "--storage-options",
        json.dumps(so),
    ]
    t0 = time.time()
    p = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and time.time() - t0 < 20  # (includes starting Python and importing torch)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: output s3://nowhere/out: cannot reach the store")


# ------------------------------------------------------------------------------------------------ real Ray


def test_rerun_with_other_settings_or_models_is_refused(tmp_path, ray_local, capfilt_models):
    """A run cut short (one shard's state lost) then rerun with another threshold, num_captions, seed or filter:
    refused with the differences named, before anything is written; `overwrite` then makes one consistent corpus."""
    corpus, out = tmp_path / "c", tmp_path / "out"
    write_corpus(str(corpus), 12, seed=3, image_size=64, samples_per_shard=4)
    run_capfilt(tiny_config(str(corpus), str(out), capfilt_models, threshold=0.5))
    manifest = json.loads((out / "_run.json").read_text())
    assert manifest["settings"]["threshold"] == 0.5 and manifest["settings"]["dtype"] == "float32"
    assert set(manifest["models"]) == {"captioner", "filter"} and manifest["input"] == str(corpus)
    (out / "_state" / "00002.json").unlink()  # as if killed before shard 00002 committed
    before = _snapshot(out)
    other = _other_filter(capfilt_models, tmp_path / "filter2")
    cases = [
        ({"threshold": 0.77}, r"threshold 0\.5 -> 0\.77"),
        ({"num_captions": 1}, r"num_captions 2 -> 1"),
        ({"seed": 5}, r"seed 0 -> 5"),
        ({"filter": other}, r"filter .* -> .*filter2"),
    ]
    for kw, pattern in cases:
        models = (capfilt_models[0], kw.pop("filter", capfilt_models[1]))
        with pytest.raises(ValueError, match=pattern) as e:
            run_capfilt(tiny_config(str(corpus), str(out), models, **kw))
        assert "--overwrite" in str(e.value)
        assert _snapshot(out) == before  # untouched: no row, no state, no manifest written
    # --overwrite: the earlier run's outputs go, the new settings make the whole corpus
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models, threshold=0.77, overwrite=True))
    assert s["shards_skipped"] == 0 and s["counts"]["in"] == 12
    df = check_output(str(out), str(corpus))
    best = df.apply(lambda r: max([r["web_itm"] or 0.0, *r["synthetic_itm"]]), axis=1)
    assert (df["kept"] == (best >= 0.77)).all()
    assert json.loads((out / "_run.json").read_text())["settings"]["threshold"] == 0.77
    # the same settings again: resumes (nothing to do)
    again = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models, threshold=0.77))
    assert again["shards_skipped"] == 3 and again["rows_this_run"] == 0


def test_changed_input_is_recomputed_and_missing_input_reported(tmp_path, ray_local, capfilt_models):
    corpus, out = tmp_path / "c", tmp_path / "out"
    write_corpus(str(corpus), 12, seed=3, image_size=64, samples_per_shard=4)  # 00000..00002
    run_capfilt(tiny_config(str(corpus), str(out), capfilt_models))
    # replace 00001 (same name, other keys) and add 00003
    _rekey(corpus / "00001.tar", tmp_path / "x.tar", "x")
    os.replace(tmp_path / "x.tar", corpus / "00001.tar")
    shutil.copy(corpus / "00000.tar", tmp_path / "y.tar")
    _rekey(tmp_path / "y.tar", corpus / "00003.tar", "y")
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models))
    assert s["shards_changed"] == ["00001"] and s["shards_skipped"] == 2 and s["counts"]["in"] == 16
    check_output(str(out), str(corpus))  # parquet keys == input keys, the replaced shard's old keys gone
    # remove 00000 from the input: reported, its rows stay (and are counted: the summary describes the folder)
    (corpus / "00000.tar").unlink()
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models))
    assert s["orphaned_shards"] == ["00000"] and s["failed_shards"] == [] and s["counts"]["in"] == 16
    assert len(pd.read_parquet(out / "parquet")) == 16
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models, prune=True))
    assert s["orphaned_shards"] == [] and s["counts"]["in"] == 12
    df = check_output(str(out), str(corpus))
    assert set(df["key"]) == input_keys(str(corpus)) and not (out / "tars" / "00000.tar").exists()
    per_shard = {r["shard"]: r for r in s["per_shard"]}
    assert set(per_shard) == {"00001", "00002", "00003"} and all(r["node"] for r in per_shard.values())


def test_mixed_compressed_folder_every_sample_once(tmp_path, ray_local, capfilt_models):
    corpus, out = tmp_path / "c", tmp_path / "out"
    write_corpus(str(corpus), 12, seed=5, image_size=64, samples_per_shard=4)
    (corpus / "00001.tar.gz").write_bytes(gzip.compress((corpus / "00001.tar").read_bytes()))
    (corpus / "00002.tgz").write_bytes(gzip.compress((corpus / "00002.tar").read_bytes()))
    keys = input_keys(str(corpus))
    (corpus / "00001.tar").unlink()
    (corpus / "00002.tar").unlink()
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models))
    assert s["shards"] == 3 and s["failed_shards"] == [] and s["counts"]["in"] == 12
    df = pd.read_parquet(out / "parquet")
    assert sorted(df["key"]) == sorted(keys)
    assert sorted(p.name for p in (out / "tars").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]  # plain


def test_webdataset_test_shard_layout_tgz(tmp_path, ray_local, capfilt_models):
    """webdataset's own test shards: one gzipped tar, `KEY.png` + `KEY.cls`, no text at all. Every sample is
    accounted for: no web text, synthetic captions judged alone; kept samples keep their PNG bytes."""
    from PIL import Image

    corpus, out = tmp_path / "c", tmp_path / "out"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    members, pngs = [], {}
    for i in range(6):
        key = f"n01440764_{10026 + i}"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs[key] = buf.getvalue()
        members += [(f"{key}.cls", str(i % 3).encode()), (f"{key}.png", pngs[key])]
    (corpus / "imagenet-000000.tgz").write_bytes(gzip.compress(_tar(members)))
    s = run_capfilt(tiny_config(str(corpus), str(out), capfilt_models, threshold=0.0))
    assert s["shards"] == 1 and s["failed_shards"] == [] and s["counts"]["in"] == 6
    df = pd.read_parquet(out / "parquet").set_index("key")
    assert sorted(df.index) == sorted(pngs) and (df["status"] == "ok").all()
    assert df["caption"].isna().all() and df["web_itm"].isna().all()
    assert all(len(c) >= 1 for c in df["synthetic_captions"])
    kept = {}
    import webdataset as wds

    for sample in wds.WebDataset(str(out / "tars" / "imagenet-000000.tar"), shardshuffle=False, empty_check=False):
        kept[sample["__key__"]] = sample
    assert set(kept) == set(df.index[df["kept"]]) and kept  # threshold 0: every synthetic caption passes
    assert all(kept[k]["png"] == pngs[k] for k in kept)  # original bytes, original extension


def test_second_job_on_one_output_is_refused(tmp_path, capfilt_models):
    """A live job's lease keeps a second one out (one error line, exit 1, nothing touched); the lease of a killed
    job on this host is taken over at once."""
    import fsspec

    corpus, out = tmp_path / "c", tmp_path / "out"
    write_corpus(str(corpus), 4, seed=3, image_size=64, samples_per_shard=4)
    live = Lease(fsspec.filesystem("file"), str(out), timeout=60, every=0.5).acquire()
    (out / "parquet").mkdir()
    (out / "parquet" / ".00000.parquet.a0.tmp").write_bytes(b"a live job's temporary")
    p = subprocess.run(
        _cmd(str(corpus), str(out), capfilt_models), env=_env(), cwd=REPO, capture_output=True, text=True
    )
    assert p.returncode == 1, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith(f"error: output in use by job {live.job_id} on host {socket.gethostname()}")
    assert (out / "parquet" / ".00000.parquet.a0.tmp").exists()  # its temporaries are not cleaned away
    live.release()


@pytest.mark.slow
def test_sigint_exits_130_and_rerun_completes(tmp_path, capfilt_models):
    corpus, out = tmp_path / "c", tmp_path / "out"
    write_corpus(str(corpus), 24, seed=7, image_size=64, samples_per_shard=3)  # 8 shards
    cmd = [*_cmd(str(corpus), str(out), capfilt_models), "--actors", "1"]
    p = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if list((out / "_state").glob("*.json")) if (out / "_state").is_dir() else []:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.stdout.read()
    p.send_signal(signal.SIGINT)
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 130, text
    line = next(x for x in text.splitlines() if x.startswith("interrupted:"))
    done = int(line.split()[1].split("/")[0])
    assert line.endswith("/8 shards done; rerun the same command to resume") and 1 <= done < 8
    assert not (out / "_lock").exists()  # the lease is released
    r = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"({done} already done, {8 - done} to do)" in r.stderr
    check_output(str(out), str(corpus))
