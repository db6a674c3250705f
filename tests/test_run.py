"""`capfilt run` end to end on local Ray with tiny random models, plus its shard I/O and config checks.

Ray tests take ~20-60 s each on 2 shared cores (Ray start-up + model loading in the actors dominate).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from blip import save_pretrained
from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, init_weights
from blip.tokenizer import build_tokenizer
from capfilt.synth import write_corpus
from pipelines.io import ShardReader, ShardWriter, list_shards
from pipelines.run.config import RunSettings
from pipelines.run.job import run_capfilt
from tests.synth_fixtures import make_bad_corpus, write_truncated_shard

TINY_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "capfilt_tiny.yaml")


# ------------------------------------------------------------------------------------------------ shared fixtures


@pytest.fixture(scope="session")
def capfilt_models(tmp_path_factory, tiny_vocab_dir) -> tuple[str, str]:
    """A tiny random captioner and filter saved as our folders (config.json + safetensors + tokenizer)."""
    root = tmp_path_factory.mktemp("capfilt_models")
    tok = build_tokenizer(tiny_vocab_dir)
    out = []
    for family, name, seed in (("caption", "captioner", 1), ("retrieval", "filter", 2)):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family))
        init_weights(model, std=0.2)
        model.tokenizer = tok
        out.append(str(save_pretrained(model, root / name)))
    return out[0], out[1]


@pytest.fixture(scope="session")
def wds_corpus(tmp_path_factory) -> str:
    """3 webdataset shards x 6 synthetic samples (img2dataset layout)."""
    d = tmp_path_factory.mktemp("wds_corpus")
    write_corpus(str(d), 18, noise=0.3, seed=0, image_size=64, samples_per_shard=6)
    return str(d)


def tiny_config(input: str, output: str, models: tuple[str, str], **kw):
    return RunSettings.load(
        TINY_CONFIG, input=input, output=output, captioner=models[0], filter=models[1], progress=False, **kw
    )


def input_keys(corpus: str) -> set[str]:
    """Every sample key of a corpus, read with webdataset's own naming rule (tars) or pandas (parquet)."""
    keys: set[str] = set()
    for shard in list_shards(corpus):
        if shard.format == "tar":
            with tarfile.open(shard.path) as tf:
                keys |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
        else:
            keys |= set(pd.read_parquet(shard.path, columns=["key"])["key"])
    return keys


def read_kept_tars(out: str) -> dict[str, dict]:
    """Kept samples read back with webdataset: key -> {jpg, txt, json}."""
    import webdataset as wds

    tars = sorted(str(p) for p in (Path(out) / "tars").glob("*.tar"))
    samples = {}
    for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        assert s["__key__"] not in samples, f"{s['__key__']} twice in the kept tars"
        samples[s["__key__"]] = s
    return samples


def check_output(out: str, corpus: str, expected_keys: set[str] | None = None) -> pd.DataFrame:
    """The output contract: every input key exactly once; kept tars == kept rows with the original image bytes."""
    df = pd.read_parquet(Path(out) / "parquet")
    keys = expected_keys if expected_keys is not None else input_keys(corpus)
    assert not df["key"].duplicated().any(), "a key appears twice in the parquet"
    assert set(df["key"]) == keys
    kept = read_kept_tars(out)
    assert set(kept) == set(df.loc[df["kept"], "key"])
    originals = {}
    for shard in list_shards(corpus):
        if shard.format == "tar":
            try:
                with tarfile.open(shard.path, mode="r|") as tf:
                    for m in tf:
                        if m.name.endswith(".jpg"):
                            originals[m.name[:-4]] = tf.extractfile(m).read()
            except tarfile.ReadError:  # a truncated shard: its readable part
                pass
        else:
            t = pd.read_parquet(shard.path, columns=["key", "jpg"])
            originals.update(zip(t["key"], t["jpg"]))
    by_key = df.set_index("key")
    for key, s in kept.items():
        assert s["jpg"] == originals[key]  # original bytes, never re-encoded
        meta = json.loads(s["json"])
        assert meta["texts"] == list(by_key.loc[key, "kept_texts"])
        assert s["txt"].decode().split("\n") == list(by_key.loc[key, "kept_texts"])
    return df


# ------------------------------------------------------------------------------------------------ no Ray


def test_list_shards_and_names(tmp_path, wds_corpus):
    shards = list_shards(wds_corpus)
    assert [s.name for s in shards] == ["00000", "00001", "00002"] and {s.format for s in shards} == {"tar"}
    assert [s.name for s in list_shards(wds_corpus + "/*")] == ["00000", "00001", "00002"]  # sidecars dropped
    assert [s.name for s in list_shards(wds_corpus + "/00001.tar")] == ["00001"]
    # same stems from two folders: names keep the folder so outputs never collide
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "00000.tar").write_bytes(Path(wds_corpus, "00000.tar").read_bytes())
    assert sorted(s.name for s in list_shards(str(tmp_path) + "/*/*.tar")) == ["a__00000", "b__00000"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no .tar \(.tar.gz, .tgz, ...\) or .parquet"):
        list_shards(str(tmp_path / "empty"))


def test_read_truncated_tar_keeps_readable_samples(tmp_path, wds_corpus):
    dst = str(tmp_path / "00009.tar")
    whole = write_truncated_shard(wds_corpus + "/00000.tar", dst, fraction=0.55)
    reader = ShardReader(list_shards(dst)[0])
    samples = list(reader)
    assert "ReadError" in reader.error
    assert reader.count == len(samples) and [r["idx"] for r in samples] == list(range(len(samples)))
    complete = {r["key"] for r in samples if r["image"] is not None and r["caption"] is not None}
    assert whole and set(whole) <= complete  # every sample wholly before the cut is read in full
    # not a tar at all
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 50)
    reader = ShardReader(list_shards(str(tmp_path / "junk.tar"))[0])
    assert list(reader) == [] and reader.error


def test_tar_cut_at_a_member_boundary_is_truncated(tmp_path, wds_corpus):
    """`tarfile` reads a tar cut exactly before a header as complete; the missing end-of-archive marker gives it away."""
    src = Path(wds_corpus) / "00001.tar"
    with tarfile.open(src) as tf:
        members = tf.getmembers()
    cut = members[len(members) // 2 + 1]  # a header that starts a later member
    dst = tmp_path / "00007.tar"
    dst.write_bytes(src.read_bytes()[: cut.offset])
    reader = ShardReader(list_shards(str(dst))[0])
    list(reader)
    assert "truncated" in reader.error
    # the complete copy still reads clean
    reader = ShardReader(list_shards(str(src))[0])
    assert len(list(reader)) == 6 and reader.error is None


def test_parquet_input_keeps_nested_metadata_and_unique_fallback_keys(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capfilt.synth import read_truth

    write_corpus(
        str(tmp_path / "pq"), 6, noise=0.5, seed=3, image_size=32, samples_per_shard=6, output_format="parquet"
    )
    shard = list_shards(str(tmp_path / "pq"))[0]
    rows = list(ShardReader(shard))
    truth = read_truth(str(tmp_path / "pq"))
    for r in rows:  # the ground truth (a nested struct column) reaches the sample json
        assert json.loads(r["json"])["synth"]["true_caption"] == truth[r["key"]]["true_caption"]
    # no key column: positional keys stay unique past the reader's 256-row batches
    n = 300
    table = pa.table({"jpg": [b"x"] * n, "caption": [f"c{i}" for i in range(n)]})
    pq.write_table(table, tmp_path / "nokey.parquet")
    keys = [r["key"] for r in ShardReader(list_shards(str(tmp_path / "nokey.parquet"))[0])]
    assert len(keys) == n and len(set(keys)) == n


def test_shard_writer_streams_kept_samples_and_commits_last(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")

    def row(i: int, kept: bool) -> dict:
        return {
            "shard": "s0", "idx": i, "key": f"k{i}", "url": None, "caption": "c",
            "synthetic_captions": ["x"], "web_itm": 0.9, "web_itc": 0.1, "synthetic_itm": [0.2],
            "synthetic_itc": [0.0], "kept_texts": ["c"] if kept else [], "kept": kept, "reason": None,
            "status": "ok", "error": None, "json": None, "image": b"IMG%d" % i, "image_ext": "jpg",
        }  # fmt: skip

    outputs = []
    for attempt in range(2):  # a retried shard rewrites byte-identical files
        w = ShardWriter(fs, str(tmp_path), "s0")
        for i, kept in enumerate((False, True, True)):
            w.add(row(i, kept))
        assert not (tmp_path / "_state" / "s0.json").exists() or attempt
        assert not (tmp_path / "tars" / "s0.tar").exists() or attempt  # only a hidden temporary so far
        stats = w.commit()
        assert stats["in"] == 3 and stats["kept"] == 2 and stats["state"] == "done"
        outputs.append(
            ((tmp_path / "parquet" / "s0.parquet").read_bytes(), (tmp_path / "tars" / "s0.tar").read_bytes())
        )
    assert outputs[0] == outputs[1]
    assert not list(tmp_path.rglob("*.tmp"))
    df = pd.read_parquet(tmp_path / "parquet")
    assert list(df["key"]) == ["k0", "k1", "k2"]
    with tarfile.open(tmp_path / "tars" / "s0.tar") as tf:
        assert sorted(tf.getnames()) == sorted(f"k{i}.{e}" for i in (1, 2) for e in ("jpg", "txt", "json"))
        assert {m.mtime for m in tf.getmembers()} == {0}
    assert json.loads((tmp_path / "_state" / "s0.json").read_text())["state"] == "done"
    # an aborted writer leaves nothing behind
    w = ShardWriter(fs, str(tmp_path), "s1")
    w.add(row(0, True))
    w.abort()
    assert not (tmp_path / "tars" / "s1.tar").exists() and not list(tmp_path.rglob("*.tmp"))


def test_config_errors_before_ray(tmp_path, capfilt_models, wds_corpus):
    ok = {
        "input": wds_corpus,
        "output": str(tmp_path / "o"),
        "captioner": capfilt_models[0],
        "filter": capfilt_models[1],
    }
    for bad, msg in (
        ({"top_p": 0.0}, "top_p"),
        ({"threshold": 1.5}, "threshold"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_captions": -1}, "num_captions"),
        ({"min_length": 30}, "min_length"),
    ):
        with pytest.raises(ValueError, match=msg):
            RunSettings.load(TINY_CONFIG, **{**ok, **bad})
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_captoins: 3\n")
    with pytest.raises(ValueError, match="unknown setting"):
        RunSettings.load(str(bad_yaml), **ok)
    from cli import main

    base = ["run", "--config", TINY_CONFIG, "--output", str(tmp_path / "o")]
    cases = [
        (["--input", str(tmp_path / "missing"), "--captioner", capfilt_models[0], "--filter", capfilt_models[1]], "does not exist"),
        (["--input", wds_corpus, "--captioner", str(tmp_path / "nomodel"), "--filter", capfilt_models[1]], "captioner"),
        (["--input", wds_corpus, "--captioner", capfilt_models[1], "--filter", capfilt_models[1]], "'retrieval' checkpoint"),
        (["--input", wds_corpus, "--captioner", capfilt_models[0], "--filter", capfilt_models[1], "--storage-options", "{"], "JSON"),
        (["--input", wds_corpus, "--captioner", capfilt_models[0], "--filter", capfilt_models[1], "--retries", "-1"], "retries"),
        (["--input", wds_corpus, "--captioner", capfilt_models[0], "--filter", capfilt_models[1], "--decode-threads", "0"], "decode_threads"),
    ]  # fmt: skip
    import ray

    was_up = ray.is_initialized()
    for args, msg in cases:
        r = CliRunner().invoke(main, base + args)
        assert r.exit_code == 1, r.output
        assert msg in r.output
    assert ray.is_initialized() == was_up  # all reported before Ray starts


# ------------------------------------------------------------------------------------------------ on Ray


def test_run_webdataset_then_resume(ray_local, tmp_path, capfilt_models, wds_corpus):
    out = str(tmp_path / "out")
    summary = run_capfilt(tiny_config(wds_corpus, out, capfilt_models))
    df = check_output(out, wds_corpus)
    assert len(df) == 18 and set(df["shard"]) == {"00000", "00001", "00002"}
    assert (df["status"] == "ok").all()
    assert df["synthetic_captions"].map(len).eq(2).all()  # num_captions from the tiny config
    assert df["synthetic_itm"].map(len).eq(2).all() and df["web_itm"].notna().all()
    # the keep rule, recomputed from the stored scores
    for _, r in df.iterrows():
        texts = [r["caption"], *r["synthetic_captions"]]
        scores = [r["web_itm"], *r["synthetic_itm"]]
        assert list(r["kept_texts"]) == [t for t, p in zip(texts, scores) if p >= 0.5]
        assert r["kept"] == bool(len(r["kept_texts"])) and (r["reason"] is None) == r["kept"]
    # the ground truth of the synthetic corpus rides along in the json column
    assert all("synth" in json.loads(j) for j in df["json"])
    # summary: counts agree with the parquet; per shard; quantiles; the plot is a PNG
    c = summary["counts"]
    assert (c["in"], c["kept"], c["dropped"]) == (18, int(df["kept"].sum()), int((~df["kept"]).sum()))
    assert summary["failed_shards"] == [] and [s["in"] for s in summary["per_shard"]] == [6, 6, 6]
    assert {s["batch_size"] for s in summary["per_shard"]} == {8}  # the batch size each worker ran, per shard
    q = summary["quantiles"]["web_itm"]
    assert q["p5"] <= q["p50"] <= q["p95"] and abs(q["p50"] - df["web_itm"].median()) < 0.05
    assert json.loads((Path(out) / "summary.json").read_text())["counts"] == c
    assert (Path(out) / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rerun: every shard is done, nothing recomputed, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in (Path(out) / "parquet").glob("*.parquet")}
    # (batch_size auto is how it runs, not what it computes: the rerun is the same corpus)
    again = run_capfilt(tiny_config(wds_corpus, out, capfilt_models, batch_size="auto"))
    assert again["shards_skipped"] == 3 and again["rows_this_run"] == 0 and again["counts"] == c
    assert {p.name: p.stat().st_mtime_ns for p in (Path(out) / "parquet").glob("*.parquet")} == mtimes


def test_run_parquet_input_matches_webdataset(ray_local, tmp_path, capfilt_models):
    """img2dataset parquet output as input; same samples as webdataset input give the same captions and scores."""
    pq_corpus, wds = str(tmp_path / "pq"), str(tmp_path / "wds")
    write_corpus(pq_corpus, 8, seed=3, image_size=64, samples_per_shard=4, output_format="parquet")
    write_corpus(wds, 8, seed=3, image_size=64, samples_per_shard=4)
    run_capfilt(tiny_config(pq_corpus, str(tmp_path / "out_pq"), capfilt_models))
    a = check_output(str(tmp_path / "out_pq"), pq_corpus)
    run_capfilt(tiny_config(wds, str(tmp_path / "out_wds"), capfilt_models))
    b = check_output(str(tmp_path / "out_wds"), wds)
    a, b = a.set_index("key").sort_index(), b.set_index("key").sort_index()
    assert list(a["caption"]) == list(b["caption"]) and list(a["url"]) == list(b["url"])
    assert list(a["synthetic_captions"].map(list)) == list(b["synthetic_captions"].map(list))
    np.testing.assert_allclose(a["web_itm"], b["web_itm"], atol=1e-5)


def test_run_bad_input_corpus(ray_local, tmp_path, capfilt_models):
    """Hostile samples become status rows, never a crash or a lost sample."""
    corpus = str(tmp_path / "bad")
    expected = make_bad_corpus(corpus, image_size=64)
    out = str(tmp_path / "out")
    summary = run_capfilt(tiny_config(corpus, out, capfilt_models))
    df = check_output(out, corpus, set(expected)).set_index("key")
    assert summary["failed_shards"] == []
    for key, e in expected.items():
        r = df.loc[key]
        assert r["status"] == e["status"], (e["case"], r["status"], r["error"])
        if e["status"] == "decode_error":
            assert r["error"] and not r["kept"] and r["reason"] == "decode_error", e["case"]
            assert len(r["synthetic_captions"]) == 0
        else:
            assert len(r["synthetic_captions"]) == 2, e["case"]
    cases = {e["case"]: k for k, e in expected.items()}
    missing = df.loc[cases["missing_txt"]]
    assert missing["caption"] is None and np.isnan(missing["web_itm"])  # missing web text: recorded as missing
    non_utf8 = df.loc[cases["non_utf8_caption"]]
    assert "not UTF-8" in non_utf8["error"] and "caf" in non_utf8["caption"] and not np.isnan(non_utf8["web_itm"])
    assert len(df.loc[cases["caption_10kb"], "caption"]) >= 10_000 and not np.isnan(
        df.loc[cases["caption_10kb"], "web_itm"]
    )
    assert summary["counts"]["decode_errors"] == sum(e["status"] == "decode_error" for e in expected.values())


def test_driver_receives_one_small_record_per_shard(ray_local, tmp_path, capfilt_models):
    """What reaches the driver is one record per shard, of a size that does not grow with the shard's samples."""
    per_record = {}
    for shards, per_shard in ((16, 2), (2, 16)):
        corpus = str(tmp_path / f"c{shards}")
        write_corpus(corpus, shards * per_shard, seed=11, image_size=64, samples_per_shard=per_shard)
        summary = run_capfilt(tiny_config(corpus, str(tmp_path / f"o{shards}"), capfilt_models, num_captions=1))
        d = summary["driver"]
        assert summary["counts"]["in"] == shards * per_shard and summary["failed_shards"] == []
        assert d["records"] == shards and d["retries"] == 0, d
        per_record[per_shard] = d["record_bytes"] / d["records"]
    # 8x the samples per shard, the same record: counts and fixed-bin histograms, no rows
    assert per_record[16] < 1.2 * per_record[2] and per_record[16] < 8_000, per_record


def test_pool_shape_one_actor_per_gpu_with_its_decode_cores(tmp_path, wds_corpus):
    """The GPU path's placement, checked without a GPU: one actor per GPU, each reserving its decode threads as CPUs
    on the GPU's node, two shards in flight; CPU-only clusters get CPU actors with one shard in flight. Ray started
    here: a fixed pool; on a cluster (`address`): elastic, asking the autoscaler for one bundle per actor."""
    from pipelines.run.scheduler import pool_shape

    def shape(cfg, gpus, on_cluster=False):
        p = pool_shape(cfg, gpus, on_cluster)
        return (p.lo, p.hi, p.elastic, p.device, p.options, p.bundle, p.threads, p.per_actor)

    cfg = RunSettings.load(None, input=wds_corpus, output=str(tmp_path / "o"))  # configs/capfilt.yaml: device auto
    assert shape(cfg, 8) == (8, 8, False, "cuda", {"num_gpus": 1, "num_cpus": 4}, {"GPU": 1, "CPU": 4}, 4, 2)
    assert shape(cfg, 0) == (1, 1, False, "cpu", {"num_cpus": 1.0}, {"CPU": 1}, 1, 1)
    assert shape(cfg, 8, on_cluster=True)[:4] == (1, 1024, True, "cuda")  # auto on a cluster: 1..one per shard
    with pytest.raises(ValueError, match="--device auto on a cluster that has no GPU now: pass --device cuda"):
        pool_shape(cfg, 0, on_cluster=True)
    cfg = RunSettings.load(None, input=wds_corpus, output=str(tmp_path / "o"), device="cuda", max_actors=16)
    assert shape(cfg, 0, on_cluster=True)[:4] == (1, 16, True, "cuda")  # waits for GPU nodes, asks for them
    cfg = RunSettings.load(None, input=wds_corpus, output=str(tmp_path / "o"), decode_threads=6)
    assert shape(cfg, 2)[4:7] == ({"num_gpus": 1, "num_cpus": 6}, {"GPU": 1, "CPU": 6}, 6)
    cfg = RunSettings.load(TINY_CONFIG, input=wds_corpus, output=str(tmp_path / "o"), device="cpu", actors="3")
    assert shape(cfg, 8)[:4] == (3, 3, False, "cpu")  # GPUs present, CPU asked for
    kw = {"device": "cpu", "actors": "2:6", "actor_resources": {"accelerator_type:H100": 0.001}}
    cfg = RunSettings.load(TINY_CONFIG, input=wds_corpus, output=str(tmp_path / "o"), **kw)
    assert shape(cfg, 0) == (
        2, 6, True, "cpu", {"num_cpus": 1.0, "resources": {"accelerator_type:H100": 0.001}},
        {"CPU": 1.0, "accelerator_type:H100": 0.001}, 1, 1,
    )  # fmt: skip
    for bad in ("0", "3:2", "x", "1:y"):
        with pytest.raises(ValueError, match="actors must be"):
            RunSettings.load(TINY_CONFIG, input=wds_corpus, output=str(tmp_path / "o"), actors=bad)


def test_run_exports_ray_metrics(tmp_path, wds_corpus, ray_local, capfilt_models):
    """The job on the operators' dashboard: the driver's Ray metrics reach the node's Prometheus endpoint (what the
    Ray dashboard, Prometheus and Grafana scrape)."""
    import time
    import urllib.request

    node = ray_local._private.worker.global_worker.node
    run_capfilt(tiny_config(wds_corpus, str(tmp_path / "out"), capfilt_models))
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wanted = {"ray_capfilt_shards_total", "ray_capfilt_samples_committed_total", "ray_capfilt_live_actors"}
    values: dict[str, float] = {}
    deadline = time.time() + 60  # the metrics agent flushes every few seconds
    while time.time() < deadline and not wanted <= set(values):
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in wanted | {"ray_capfilt_shards_queued", "ray_capfilt_samples_per_second"}:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    assert wanted <= set(values), values
    assert values["ray_capfilt_samples_committed_total"] >= 18 and values["ray_capfilt_shards_total"] >= 3
