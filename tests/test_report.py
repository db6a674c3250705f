"""`capfilt report`: the HTML page of a capfilt output folder, rendered by headless Chromium.

The output folder comes from a real CapFilt pass (tiny random models) over a synthetic corpus plus a shard of hostile
images, so the page shows decode errors, kept and dropped samples. Chromium loads the page with a script that records
every <img>'s naturalWidth into the DOM; the dumped DOM then proves that every picture decodes and that the numbers on
the page are summary.json's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, init_weights
from blip.tokenizer import build_tokenizer
from capfilt.synth import write_corpus
from pipelines.report.gather import COUNT_NAMES
from pipelines.report.page import write_report
from tests.synth_fixtures import make_bad_corpus, write_truncated_shard

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _tiny(family: str, vocab_dir: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = BlipConfig.from_name("tiny", family=family, vision={"image_size": 64})
    model = MODEL_CLASSES[family](cfg)
    init_weights(model, std=0.2)  # a useful scale: the image must matter to the scores
    model.tokenizer = build_tokenizer(vocab_dir)
    return model.eval()


def _median_web_itm(input_dir: Path, cap: torch.nn.Module, filt: torch.nn.Module) -> float:
    """The filter's median web-text ITM over the corpus: a threshold that keeps some samples and drops others,
    whatever the random weights give."""
    from capfilt.decode import decode_or_error
    from capfilt.stages import CapFiltStage, stage_batch
    from pipelines.io import ShardReader, list_shards

    rows = [r for s in list_shards(str(input_dir)) for r in ShardReader(s)]
    stage = CapFiltStage.from_models(cap, filt, num_captions=0, device="cpu", dtype="float32")
    stage.setup()
    decoded = [decode_or_error(r["image"], stage.image_size) for r in rows]
    return float(
        np.median([s for s in stage(stage_batch(rows, decoded, stage.image_size))["web_itm"] if s is not None])
    )


@pytest.fixture(scope="module")
def run_output(tiny_vocab_dir, tmp_path_factory) -> dict:
    """A real `capfilt run` (Ray actors, tiny random models) over 2 synthetic shards, 1 hostile shard and 1 cut tar."""
    from blip import save_pretrained
    from pipelines.run.config import RunSettings
    from pipelines.run.job import run_capfilt

    root = tmp_path_factory.mktemp("report")
    inp, bad = root / "input", root / "bad"
    write_corpus(str(inp), samples=24, noise=0.5, seed=3, image_size=64, samples_per_shard=12)
    expected_bad = make_bad_corpus(str(bad), seed=3, image_size=64)
    shutil.copy(bad / "00000.tar", inp / "00002.tar")  # hostile images next to the good shards
    write_truncated_shard(str(inp / "00001.tar"), str(inp / "00003.tar"), 0.37)  # cut mid-member: fails
    cap, filt = _tiny("caption", tiny_vocab_dir, 1), _tiny("retrieval", tiny_vocab_dir, 2)
    threshold = _median_web_itm(inp, cap, filt)
    cfg = RunSettings.load(
        Path(__file__).resolve().parent.parent / "configs" / "capfilt_tiny.yaml",
        input=str(inp),
        output=str(root / "out"),
        captioner=str(save_pretrained(cap, root / "captioner")),
        filter=str(save_pretrained(filt, root / "filter")),
        threshold=threshold,
        progress=False,
    )
    summary = run_capfilt(cfg, echo=lambda msg: None)
    assert summary == json.loads((root / "out" / "summary.json").read_text())
    return {"input": inp, "out": root / "out", "bad": expected_bad, "summary": summary}


class _Dom(HTMLParser):
    """Collects what the test checks from Chromium's dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.counts: dict[str, str] = {}
        self.shard_cells: dict[str, dict[str, str]] = {}
        self.cards: list[dict[str, str]] = []
        self.placeholders = 0
        self.loaded = False
        self._cell: tuple[str, str] | None = None  # (what, name) of the element whose text comes next
        self._shard: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body" and a.get("data-loaded") == "1":
            self.loaded = True
        if tag == "img":
            self.imgs.append(a)
        if "data-count" in a:
            self._cell = ("count", a["data-count"])
        if tag == "tr" and "data-shard" in a:
            self._shard = a["data-shard"]
            self.shard_cells[self._shard] = {}
        if tag == "td" and "data-col" in a and self._shard:
            self._cell = ("shard", a["data-col"])
        if "data-verdict" in a:
            self.cards.append(a)
        if "ph" in a.get("class", "").split():
            self.placeholders += 1

    def handle_data(self, data: str) -> None:
        if self._cell:
            what, name = self._cell
            if what == "count":
                self.counts[name] = data.strip()
            else:
                self.shard_cells[self._shard][name] = data.strip()
            self._cell = None


_PROBE = (
    "<script>window.addEventListener('load',()=>{for(const i of document.images)"
    "i.setAttribute('data-natural-width',i.naturalWidth);document.body.setAttribute('data-loaded','1')});</script>"
)


def _render(report: Path, tmp_path: Path) -> _Dom:
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: apt-get install -y chromium"
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    parsed = _Dom()
    parsed.feed(dom)
    assert parsed.loaded, "the page's load event never fired"
    return parsed


def test_report_renders_in_chromium_with_summary_numbers(run_output, tmp_path):
    out, summary = run_output["out"], run_output["summary"]
    rows = pq.read_table(out / "parquet").to_pylist()
    html_path = Path(write_report(str(out), str(tmp_path / "report.html"), max_samples=200))
    page = html_path.read_text()
    # self-contained: no URL the browser would fetch (sample URLs appear only as text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "url(http" not in page

    dom = _render(html_path, tmp_path)
    # counts shown == summary.json's
    stated = {**summary["counts"], "failed_shards": len(summary["failed_shards"])}
    shown = {k: int(v) for k, v in dom.counts.items()}
    assert shown == {k: stated[k] for k in COUNT_NAMES if k != "other_errors" or stated[k]}
    assert stated["decode_errors"] > 0 and 0 < stated["kept"] < stated["in"] and stated["failed_shards"] == 1
    # per-shard table == summary.json's per-shard stats
    per_shard = {s["shard"]: s for s in summary["per_shard"]}
    assert set(dom.shard_cells) == set(per_shard) == {"00000", "00001", "00002", "00003"}
    for name, cells in dom.shard_cells.items():
        for col in ("in", "kept", "dropped", "decode_errors", "other_errors"):
            assert int(cells[col]) == per_shard[name][col], (name, col)
        assert cells["state"].startswith(per_shard[name]["state"])
    # the rows agree with summary.json, so the page raised no disagreement warning
    assert 'class="warn"' not in page
    # every picture decodes in the browser: 3 histograms, the shard bars, one thumbnail per decodable sample
    assert len(dom.imgs) >= 4 and all(int(i["data-natural-width"]) > 0 for i in dom.imgs)
    thumbs = [i for i in dom.imgs if i["src"].startswith("data:image/jpeg")]
    assert all(0 < int(i["data-natural-width"]) <= 128 for i in thumbs)
    # one card per sample (fewer than the cap): a thumbnail for each decodable one, a placeholder for each error
    assert len(dom.cards) == len(rows)
    n_err = sum(r["status"] == "decode_error" for r in rows)
    assert dom.placeholders == n_err == summary["counts"]["decode_errors"]
    assert len(thumbs) == len(rows) - n_err
    verdicts = {(c["data-shard"], c["data-key"]): c["data-verdict"] for c in dom.cards}
    assert len(verdicts) == len(rows)
    for r in rows:
        assert verdicts[r["shard"], r["key"]] == (
            "failed" if r["status"] != "ok" else "kept" if r["kept"] else "dropped"
        )
    # the decode errors are the hostile shard's expected ones
    bad_keys = {k for k, v in run_output["bad"].items() if v["status"] == "decode_error"}
    assert {(c["data-shard"], c["data-key"]) for c in dom.cards if c["data-verdict"] == "failed"} == {
        ("00002", k) for k in bad_keys
    }


def test_cards_capped_borderline_first(run_output, tmp_path):
    out, summary = run_output["out"], run_output["summary"]
    thr = summary["settings"]["threshold"]
    page = Path(write_report(str(out), str(tmp_path / "r.html"), max_samples=10)).read_text()
    keys = re.findall(r'<div class="card [a-z]+" data-key="([^"]+)" data-shard="([^"]+)"', page)
    assert len(keys) == 10
    rows = {(r["key"], r["shard"]): r for r in pq.read_table(out / "parquet").to_pylist()}

    def margin(r: dict) -> float:
        s = ([r["web_itm"]] if r["web_itm"] is not None else []) + list(r["synthetic_itm"])
        return min(abs(x - thr) for x in s) if s else float("inf")

    scored = [k for k in keys if rows[k]["status"] == "ok"]
    failed = [k for k in keys if rows[k]["status"] != "ok"]
    assert failed and keys[-len(failed) :] == failed  # errors stay visible, after the borderline cards
    margins = [margin(rows[k]) for k in scored]
    assert margins == sorted(margins)
    # the scored cards are the most borderline ok samples
    all_ok = sorted(margin(r) for r in rows.values() if r["status"] == "ok")
    assert margins == all_ok[: len(scored)]


def test_dropped_images_need_the_input(run_output, tmp_path):
    """Kept samples' pictures come from the output tars; without the input, dropped ones become placeholders."""
    out = run_output["out"]
    tmp_out = tmp_path / "out"
    shutil.copytree(out, tmp_out)
    summary = json.loads((tmp_out / "summary.json").read_text())
    summary["input"] = str(tmp_path / "gone")
    (tmp_out / "summary.json").write_text(json.dumps(summary))
    page = Path(write_report(str(tmp_out), max_samples=500)).read_text()
    assert (tmp_out / "report.html").exists()
    rows = pq.read_table(out / "parquet").to_pylist()
    n_kept = sum(r["kept"] for r in rows)
    assert page.count('<img src="data:image/jpeg') == n_kept
    assert "cannot list input" in page
    # --input points the report at the shards again
    page = Path(write_report(str(tmp_out), input=str(run_output["input"]), max_samples=500)).read_text()
    assert page.count('<img src="data:image/jpeg') == sum(r["status"] == "ok" for r in rows)


def test_cli(run_output, tmp_path):
    from cli import main

    target = tmp_path / "sub" / "page.html"
    r = CliRunner().invoke(main, ["report", str(run_output["out"]), "--out", str(target), "--max-samples", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(target) and target.exists()
    assert len(re.findall(r'<div class="card ', target.read_text())) == 5
    r = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["report", str(run_output["out"]), "--storage-options", "{nope"])
    assert r.exit_code == 1 and "--storage-options is not valid JSON" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "no per-sample parquet" in r.output


def test_report_of_an_output_on_s3(run_output, s3_server, tmp_path):
    """OUTPUT_DIR on an object store (moto's S3 server on loopback): read through fsspec, the page written there too."""
    bucket = s3_server.make_bucket()
    s3_server.fs.put(str(run_output["out"]), f"{bucket}/out", recursive=True)
    s3_server.fs.invalidate_cache()
    url = f"s3://{bucket}/out"
    written = write_report(url, max_samples=500, storage_options=s3_server.storage_options)
    assert written == f"{url}/report.html"
    s3_server.fs.invalidate_cache()
    page = s3_server.fs.cat(f"{bucket}/out/report.html").decode("utf-8")
    rows = pq.read_table(run_output["out"] / "parquet").to_pylist()
    # kept images from the tars on S3, dropped ones from the local input named in summary.json
    assert page.count('<img src="data:image/jpeg') == sum(r["status"] == "ok" for r in rows)
    assert f'<td data-count="in">{run_output["summary"]["counts"]["in"]}</td>' in page
