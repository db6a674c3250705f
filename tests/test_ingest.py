"""`capfilt ingest`: img2dataset against a real HTTP server on loopback, read back with the webdataset library."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from cli import main
from pipelines.ingest import IngestError, inspect_url_list, read_stats


def _read_tars(tars: list[str]) -> dict[str, dict]:
    """Every sample of the shards, by key, decoded with webdataset itself (what capfilt's readers build on)."""
    samples = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in samples
        samples[sample["__key__"]] = sample
    return samples


@pytest.fixture(scope="module")
def url_table(http_image_server) -> pd.DataFrame:
    srv = http_image_server
    not_image = srv.add_file("page.html", b"<html>not an image</html>")
    urls = srv.urls + [srv.missing_url(i) for i in range(3)] + [not_image]
    captions = srv.captions + ["gone 0", "gone 1", "gone 2", "a web page"]
    return pd.DataFrame({"url": urls, "caption": captions, "source": [f"src{i}" for i in range(len(urls))]})


@pytest.fixture(scope="module")
def ingested(url_table: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The parquet list ingested once through the CLI (shards of 10 so there are several)."""
    d = tmp_path_factory.mktemp("ingest")
    url_table.to_parquet(d / "urls.parquet")
    r = CliRunner().invoke(
        main, ["ingest", str(d / "urls.parquet"), str(d / "out"), "--threads", "8", "--shard-size", "10"]
    )
    assert r.exit_code == 0, r.output
    return d / "out", r.output


def test_ingest_writes_every_success_with_caption_and_original_bytes(ingested, url_table, http_image_server) -> None:
    out, _ = ingested
    tars = sorted(str(p) for p in out.glob("*.tar"))
    assert len(tars) == 3  # 24 rows / 10 per shard
    samples = _read_tars(tars)
    srv = http_image_server
    by_url = {json.loads(s["json"])["url"]: s for s in samples.values()}
    assert set(by_url) == set(srv.urls)  # every image, nothing else (404s and the web page are not in the tars)
    for url, caption, size in zip(srv.urls, srv.captions, srv.sizes):
        s = by_url[url]
        assert set(s) >= {"__key__", "jpg", "txt", "json"}
        assert s["txt"].decode() == caption
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["status"] == "success"
        assert meta["caption"] == caption and meta["source"] == url_table.set_index("url").loc[url, "source"]
        served = (srv.root / url.rsplit("/", 1)[1]).read_bytes()
        if url.endswith(".jpg"):
            assert s["jpg"] == served  # JPEG bytes kept verbatim: capfilt decodes and resizes itself
        else:
            assert s["jpg"][:3] == b"\xff\xd8\xff"  # other formats converted to JPEG, size unchanged
        assert Image.open(io.BytesIO(s["jpg"])).size == size


def test_ingest_counts_failures_and_loses_no_row(ingested, url_table) -> None:
    out, output = ingested
    stats = read_stats(str(out))
    assert stats.count == len(url_table) == 24
    assert stats.successes == 20
    assert stats.failed_to_download == 3 and stats.failed_to_resize == 1
    assert sum(n for msg, n in stats.errors.items() if "404" in msg) == 3
    # the CLI summary shows the same numbers
    assert "success          20" in output and "failed            4" in output and "404" in output
    # the sidecars hold one row per input row, failures included, with the img2dataset key
    side = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("*.parquet"))])
    assert len(side) == 24 and side["key"].is_unique
    assert sorted(side["url"]) == sorted(url_table["url"])
    assert side["status"].value_counts().to_dict() == {"success": 20, "failed_to_download": 3, "failed_to_resize": 1}
    # keys encode the input row: row i of the list -> key i
    assert (side.set_index("url").loc[url_table["url"], "key"].astype(int).tolist()) == list(range(24))


def test_ingest_rerun_resumes_without_redoing(ingested) -> None:
    out, _ = ingested
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    r = CliRunner().invoke(main, ["ingest", str(out.parent / "urls.parquet"), str(out), "--shard-size", "10"])
    assert r.exit_code == 0, r.output
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert read_stats(str(out)).count == 24


@pytest.mark.slow
def test_ingest_csv_with_resize_and_custom_columns(http_image_server, tmp_path: Path) -> None:
    srv = http_image_server
    pd.DataFrame({"image_url": srv.urls[:6], "alt": srv.captions[:6]}).to_csv(tmp_path / "urls.csv", index=False)
    args = ["ingest", str(tmp_path / "urls.csv"), str(tmp_path / "out"), "--url-col", "image_url"]
    args += ["--caption-col", "alt", "--image-size", "32", "--threads", "4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    samples = _read_tars(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")))
    assert len(samples) == 6
    for s in samples.values():
        meta = json.loads(s["json"])
        i = srv.urls.index(meta["url"])
        assert s["txt"].decode() == srv.captions[i]
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        assert min(w, h) == 32 and (meta["original_width"], meta["original_height"]) == srv.sizes[i]


@pytest.mark.slow
def test_ingest_txt_inside_a_ray_task(http_image_server, tmp_path: Path, ray_local) -> None:
    """img2dataset forks its own processes: ingest must work from a Ray worker too."""
    srv = http_image_server
    (tmp_path / "urls.txt").write_text("\n".join(srv.urls[:4] + [srv.missing_url()]) + "\n")

    @ray_local.remote
    def job(src: str, dst: str) -> tuple[int, int]:
        from pipelines.ingest import ingest

        r = ingest(src, dst, threads=4)
        return r.successes, r.failed

    assert ray_local.get(job.remote(str(tmp_path / "urls.txt"), str(tmp_path / "out"))) == (4, 1)
    samples = _read_tars(sorted(str(p) for p in (tmp_path / "out").glob("*.tar")))
    assert sorted(json.loads(s["json"])["url"] for s in samples.values()) == sorted(srv.urls[:4])
    assert all("txt" not in s for s in samples.values())  # a .txt list carries no captions


# -- bad input: clear errors before anything is downloaded -----------------------------------


def _cli_error(args: list[str]) -> str:
    r = CliRunner().invoke(main, ["ingest", *args])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    return r.output


def test_ingest_errors(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert "not found" in _cli_error([str(tmp_path / "nope.parquet"), out])
    pd.DataFrame({"url": pd.Series([], dtype=str), "caption": pd.Series([], dtype=str)}).to_parquet(
        tmp_path / "e.parquet"
    )
    assert "empty" in _cli_error([str(tmp_path / "e.parquet"), out])
    (tmp_path / "e.txt").write_text("\n\n")
    assert "empty" in _cli_error([str(tmp_path / "e.txt"), out])
    pd.DataFrame({"link": ["http://x/a.jpg"], "caption": ["a"]}).to_parquet(tmp_path / "l.parquet")
    msg = _cli_error([str(tmp_path / "l.parquet"), out])
    assert "'url'" in msg and "link" in msg and "--url-col" in msg
    msg = _cli_error([str(tmp_path / "l.parquet"), out, "--url-col", "link", "--caption-col", "alt"])
    assert "'alt'" in msg and "--caption-col" in msg
    (tmp_path / "u.xlsx").write_bytes(b"x")
    assert "format" in _cli_error([str(tmp_path / "u.xlsx"), out])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    assert "cannot read" in _cli_error([str(tmp_path / "bad.parquet"), out])
    assert not (tmp_path / "out").exists()  # nothing started


def test_inspect_url_list_folder_and_extra_columns(tmp_path: Path) -> None:
    for i in range(2):
        pd.DataFrame({"url": [f"http://x/{i}.jpg"], "caption": ["c"], "key": ["k"], "lang": ["en"]}).to_parquet(
            tmp_path / f"part{i}.parquet"
        )
    info = inspect_url_list(str(tmp_path))
    assert info.input_format == "parquet" and info.rows == 2 and len(info.files) == 2
    assert info.extra_columns == ["lang"]  # "key" is img2dataset's own column: not carried
    (tmp_path / "more.csv").write_text("url\nhttp://x/a.jpg\n")
    with pytest.raises(IngestError, match="mixes"):
        inspect_url_list(str(tmp_path))


@pytest.mark.slow
def test_ingest_to_s3(http_image_server, s3_server, tmp_path: Path) -> None:
    """Output straight to an S3 bucket (moto on loopback), configured through the AWS_* env alone."""
    srv = http_image_server
    pd.DataFrame({"url": srv.urls[:5] + [srv.missing_url()], "caption": srv.captions[:5] + ["x"]}).to_parquet(
        tmp_path / "urls.parquet"
    )
    bucket = s3_server.make_bucket()
    out = f"s3://{bucket}/shards"
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "urls.parquet"), out, "--threads", "4"])
    assert r.exit_code == 0, r.output
    stats = read_stats(out)
    assert (stats.successes, stats.failed_to_download) == (5, 1)
    assert stats.shards == [f"{out}/00000.tar"]
    assert sorted(p.rsplit("/", 1)[1] for p in s3_server.fs.ls(f"{bucket}/shards", refresh=True)) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]  # and no img2dataset _tmp/ left behind
    local = tmp_path / "00000.tar"
    s3_server.fs.get(stats.shards[0], str(local))
    samples = _read_tars([str(local)])
    assert sorted(s["txt"].decode() for s in samples.values()) == sorted(srv.captions[:5])
