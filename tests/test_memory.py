"""`batch_size: auto` (capfilt/memory.py): the fit, the measured search, the stage's probe, and the padded compiled
decode that keeps one captured shape per run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from capfilt.memory import AUTO_CPU, AUTO_MAX, HEADROOM, PROBES, fit_batch_size, search_batch_size
from capfilt.stages import CapFiltStage
from tests.test_stages import _tiny

GB, MB = 2**30, 2**20


@pytest.fixture(scope="module")
def models(tiny_vocab_dir):
    return _tiny("caption", tiny_vocab_dir, seed=1), _tiny("retrieval", tiny_vocab_dir, seed=2)


def _linear(fixed: int, per: int):
    return lambda b: fixed + per * b


def test_fit_batch_size_is_the_largest_that_fits():
    fixed, per, limit = 2 * GB, 200 * MB, 80 * GB
    peak = _linear(fixed, per)
    fit = fit_batch_size({b: peak(b) for b in PROBES}, limit)
    b = fit.batch_size
    assert (fit.per_image, fit.fixed) == (per, fixed)
    assert b % 8 == 0 and peak(b) <= HEADROOM * limit < peak(b + 8)
    # bounded by AUTO_MAX (host memory), at least 1, and under 8 not rounded away
    assert fit_batch_size({16: 16 * MB, 32: 32 * MB}, 80 * GB).batch_size == AUTO_MAX
    assert fit_batch_size({16: 25 * GB, 32: 41 * GB}, 10 * GB).batch_size == 1
    assert fit_batch_size({16: 17 * GB, 32: 33 * GB}, 10 * GB).batch_size == 7  # (8.5 - 1) GB / 1 GB


class FakeDevice:
    """A device for the search alone (the CUDA measurement it stands for runs in bench/gpu_check.sh): peak bytes of
    a batch, super-linear past `knee`, out of memory past `capacity`. Records what was run."""

    def __init__(self, fixed: int, per: int, capacity: int, knee: int = 10**9, extra: int = 0) -> None:
        self.fixed, self.per, self.capacity, self.knee, self.extra = fixed, per, capacity, knee, extra
        self.ran: list[int] = []

    def __call__(self, b: int) -> int | None:
        self.ran.append(b)
        peak = self.fixed + self.per * b + self.extra * max(0, b - self.knee)
        return peak if peak <= self.capacity else None


def test_search_runs_the_size_it_picks():
    dev = FakeDevice(fixed=2 * GB, per=150 * MB, capacity=24 * GB)
    fit = search_batch_size(dev, limit=24 * GB)
    assert dev.ran[:2] == list(PROBES) and dev.ran[-1] == fit.batch_size  # the pick was measured
    assert fit.peak == dev(fit.batch_size) <= HEADROOM * 24 * GB


def test_search_steps_down_when_the_fit_was_optimistic():
    # linear at the probes, then each image past 64 costs 4x more: the extrapolated size is over the limit
    dev = FakeDevice(fixed=2 * GB, per=100 * MB, capacity=40 * GB, knee=64, extra=300 * MB)
    fit = search_batch_size(dev, limit=40 * GB)
    assert len(dev.ran) > 3 and fit.batch_size < dev.ran[2]  # it ran the fit, found it too big, went lower
    assert fit.peak == dev(fit.batch_size) <= HEADROOM * 40 * GB


def test_search_halves_probes_that_run_out_and_errors_when_one_image_does():
    dev = FakeDevice(fixed=2 * GB, per=500 * MB, capacity=12 * GB)  # batch 32 is out of memory
    fit = search_batch_size(dev, limit=12 * GB)
    assert dev.ran[:3] == [16, 32, 8] and 1 <= fit.batch_size <= 16 and fit.peak <= HEADROOM * 12 * GB
    with pytest.raises(RuntimeError, match="one image runs out of memory"):
        search_batch_size(FakeDevice(fixed=11 * GB, per=2 * GB, capacity=12 * GB), limit=12 * GB)


def test_stage_auto_on_cpu_and_its_probe(models):
    stage = CapFiltStage.from_models(*models, device="cpu", dtype="float32", batch_size="auto", max_length=10)
    stage.setup()
    assert stage.batch_size == AUTO_CPU and "CPU" in stage.batch_fit.describe()
    stage._probe(3)  # the worst-case probe batch (what CUDA measures) is valid stage input
    with pytest.raises(ValueError, match="batch_size must be >= 1 or 'auto'"):
        CapFiltStage.from_models(*models, batch_size="big").setup()


def test_batch_size_auto_from_yaml_and_cli(tmp_path):
    from cli import main
    from pipelines.run.config import RunSettings

    (tmp_path / "c.yaml").write_text("batch_size: auto\n")
    assert RunSettings.load(str(tmp_path / "c.yaml"), input="i", output="o").batch_size == "auto"
    assert RunSettings.load(None, input="i", output="o", batch_size="64").batch_size == 64  # --set text
    with pytest.raises(ValueError, match="batch_size"):
        RunSettings.load(None, input="i", output="o", batch_size="lots")
    for bad, msg in (("0", "0 is not >= 1"), ("lots", "neither a whole number nor 'auto'")):
        r = CliRunner().invoke(main, ["run", "--input", "i", "--output", "o", "--batch-size", bad])
        assert r.exit_code == 2 and msg in r.output, r.output


@pytest.mark.slow  # CPU torch.compile of the step: ~40 s cold on 2 shared cores
def test_compiled_decode_pads_short_batches_to_one_shape(models):
    """With the step compiled, a shard's short last batch (3 of 4) is padded to the batch size: the same captions as
    eager, and no new captured shape (on a GPU: one CUDA graph and one set of static buffers per run)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    rng = np.random.default_rng(0)
    batch = {
        "key": [f"{i:09d}" for i in range(7)],
        "pixels": rng.integers(0, 256, (7, 64, 64, 3), dtype=np.uint8),
        "status": ["ok"] * 7,
        "caption": [f"a red circle number {i}" for i in range(7)],
    }
    kw = dict(device="cpu", dtype="float32", num_captions=2, max_length=10, batch_size=4)
    eager = CapFiltStage.from_models(*models, compile="off", **kw)(batch)
    compiled = CapFiltStage.from_models(*models, compile="on", **kw)
    first = compiled({k: v[:4] for k, v in batch.items()})  # one full batch: the shape is captured
    graphs = counters["stats"]["unique_graphs"]
    out = compiled(batch)  # 4 + 3 (padded to 4)
    assert counters["stats"]["unique_graphs"] == graphs, "the short batch was compiled again"
    assert out["synthetic_captions"] == eager["synthetic_captions"]
    assert first["synthetic_captions"] == eager["synthetic_captions"][:4]
    assert out["synthetic_itm"] == eager["synthetic_itm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_batch_size_fits_and_runs():
    """On a GPU: the pick was measured within the limit, and a worst-case batch of that size runs within it."""
    from tests.test_bench import _random_model

    cap, filt = _random_model("caption", "base"), _random_model("retrieval", "base")
    stage = CapFiltStage.from_models(cap, filt, device="cuda", dtype="bfloat16", batch_size="auto")
    stage.setup()
    fit = stage.batch_fit
    assert fit.peak is not None and fit.peak <= HEADROOM * fit.limit and stage.batch_size == fit.batch_size
    print(fit.describe())
    torch.cuda.reset_peak_memory_stats()
    stage._probe(stage.batch_size)
    assert torch.cuda.max_memory_allocated() <= fit.limit
