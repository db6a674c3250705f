"""`capfilt ingest` (img2dataset) against a loopback HTTP server, then `capfilt run` on its shards."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.run.job import run_capfilt
from tests.test_run import capfilt_models, check_output, tiny_config

_FIXTURES = (capfilt_models,)  # shared fixture from tests/test_run.py


@pytest.mark.slow
def test_ingest_then_run(http_image_server, ray_local, tmp_path, capfilt_models):
    from pipelines.ingest import ingest

    urls = tmp_path / "urls.csv"
    pd.DataFrame(
        {
            "url": http_image_server.urls[:8] + [http_image_server.missing_url()],
            "caption": http_image_server.captions[:8] + ["gone"],
        }
    ).to_csv(urls, index=False)
    shards = str(tmp_path / "shards")
    ingest(str(urls), shards, processes=1, threads=4, shard_size=4)
    out = str(tmp_path / "out")
    summary = run_capfilt(tiny_config(shards, out, capfilt_models))
    df = check_output(out, shards)
    assert len(df) == 8 and summary["failed_shards"] == []  # the 404 never reached a tar: img2dataset's sidecar has it
    assert set(df["url"]) == set(http_image_server.urls[:8])
    assert dict(zip(df["url"], df["caption"])) == dict(zip(http_image_server.urls[:8], http_image_server.captions[:8]))
