"""The output contract is declared once, in capfilt/schema.py: the parquet a worker writes, the stage's result, the
shards' state records and the report's reader all derive from it. No Ray: ShardProcessor runs in this process."""

from __future__ import annotations

import ast
import shutil
from dataclasses import fields
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import capfilt.stages
from blip import save_pretrained
from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, init_weights
from blip.tokenizer import build_tokenizer
from capfilt.schema import COUNT_KEYS, HIST_RANGES, OUT_COLUMNS, OUT_SCHEMA, RESULT_COLUMNS, SampleResult
from capfilt.synth import write_corpus
from pipelines.io import list_shards, read_states
from pipelines.run.worker import ShardProcessor, WorkerSettings
from tests.synth_fixtures import make_bad_corpus

REPO = Path(__file__).resolve().parent.parent
STAGE = {"num_captions": 2, "max_length": 10, "threshold": 0.55, "device": "cpu", "dtype": "float32", "batch_size": 4}


@pytest.fixture(scope="module")
def models(tiny_vocab_dir) -> tuple[torch.nn.Module, torch.nn.Module]:
    out = []
    for family, seed in (("caption", 1), ("retrieval", 2)):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[family](BlipConfig.from_name("tiny", family=family, vision={"image_size": 64}))
        init_weights(model, std=0.2)  # a useful scale: some samples kept, some dropped
        model.tokenizer = build_tokenizer(tiny_vocab_dir)
        out.append(model.eval())
    return out[0], out[1]


@pytest.fixture(scope="module")
def output(models, tmp_path_factory) -> str:
    """A worker's outputs for a synthetic shard and a shard of hostile images (decode errors, repeated keys, ...);
    the worker loads the models from their folders, as in a run."""
    root = tmp_path_factory.mktemp("schema")
    write_corpus(str(root / "input"), samples=6, noise=0.5, seed=3, image_size=64, samples_per_shard=6)
    make_bad_corpus(str(root / "bad"), seed=3, image_size=64)
    shutil.copy(root / "bad" / "00000.tar", root / "input" / "00001.tar")
    cap, filt = (str(save_pretrained(m, root / name)) for m, name in zip(models, ("captioner", "filter")))
    stage = {**STAGE, "captioner": cap, "filter": filt}
    processor = ShardProcessor(stage, WorkerSettings(output=str(root / "out"), storage_options={}, image_size=64))
    processor.setup()
    for shard in list_shards(str(root / "input")):
        processor(shard)
    return str(root / "out")


def test_schema_declares_columns_types_and_the_stage_part():
    assert OUT_COLUMNS == OUT_SCHEMA.names and len(set(OUT_COLUMNS)) == len(OUT_COLUMNS)
    assert RESULT_COLUMNS == tuple(f.name for f in fields(SampleResult))
    for f in fields(SampleResult):
        assert OUT_SCHEMA.field(f.name).type == f.metadata["arrow"]
    assert set(HIST_RANGES) <= set(RESULT_COLUMNS)
    assert capfilt.stages.RESULT_COLUMNS is RESULT_COLUMNS  # the stage's columns are the schema's


def test_parquet_written_by_the_worker_is_the_schema(output):
    files = sorted(Path(output, "parquet").glob("*.parquet"))
    assert len(files) == 2
    for f in files:
        assert pq.read_schema(f).equals(OUT_SCHEMA), f


def test_stage_result_is_the_sample_result(models):
    stage = capfilt.stages.CapFiltStage.from_models(*models, **STAGE)
    batch = {
        "key": ["a", "b"],
        "caption": ["a red circle", None],
        "status": ["ok", "decode_error"],
        "pixels": np.zeros((2, 64, 64, 3), dtype=np.uint8),
    }
    results = stage.results(batch)
    assert all(isinstance(r, SampleResult) for r in results)
    assert results[1] == SampleResult(reason="decode_error")  # the unscored sample's result: the defaults
    columns = stage(batch)
    assert [c for c in columns if c not in batch] == list(RESULT_COLUMNS)
    assert columns["web_itm"] == [r.web_itm for r in results]


def test_report_reads_the_schema_and_recounts_the_state_records(output, monkeypatch):
    import pipelines.report.gather as report

    read = []
    real = report.pq.read_table
    monkeypatch.setattr(report.pq, "read_table", lambda f, columns: read.append(columns) or real(f, columns=columns))
    fs = fsspec.filesystem("file")
    states = read_states(fs, output)
    scan = report.scan_output(fs, output, STAGE["threshold"], 10, states)
    assert read == [[c for c in OUT_COLUMNS if c != "json"]] * 2
    totals = {k: sum(st[k] for st in states.values()) for k in COUNT_KEYS}
    assert 0 < totals["kept"] < totals["ok"] and totals["decode_errors"] > 0  # a run worth recounting
    for name, st in states.items():
        assert scan.shards[name].counts == {k: st[k] for k in COUNT_KEYS}
    for col in HIST_RANGES:
        merged = np.sum([st["histograms"][col] for st in states.values()], axis=0)
        np.testing.assert_array_equal(scan.hists[col], merged.reshape(report.CHART_BINS, -1).sum(axis=1))


def _column_names_in(node: ast.AST) -> set[str]:
    """Output column names a literal lists: as elements, dict keys, or first items of (name, type) pairs."""
    if isinstance(node, ast.Dict):
        elts = node.keys
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        elts = [e.elts[0] if isinstance(e, ast.Tuple) and e.elts else e for e in node.elts]
    else:
        return set()
    return {e.value for e in elts if isinstance(e, ast.Constant) and e.value in OUT_COLUMNS}


def test_no_other_module_declares_the_output_columns():
    """Outside capfilt/schema.py no literal lists most of a row (the reader's input fields and the kept tar's json
    name 6 of them), no module defines its own column list or counting constants, and nothing else bins scores."""
    own = {"OUT_COLUMNS", "OUT_SCHEMA", "RESULT_COLUMNS", "COUNT_KEYS", "SHARD_COUNTS", "HIST_BINS", "HIST_RANGES"}
    found = []
    for path in sorted([*REPO.glob("blip/*.py"), *REPO.glob("capfilt/*.py"), *REPO.glob("pipelines/**/*.py")]):
        if path.name == "schema.py" and path.parent.name == "capfilt":
            continue
        tree = ast.parse(path.read_text())
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if len(_column_names_in(node)) >= 7:
                found.append(f"{rel}:{node.lineno} lists output columns")
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                found += [f"{rel}:{node.lineno} defines {t.id}" for t in targets if getattr(t, "id", None) in own]
            if isinstance(node, ast.Attribute) and node.attr == "histogram":
                found.append(f"{rel}:{node.lineno} bins scores")
    assert not found, found
