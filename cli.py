"""The `capfilt` command line: parses and validates, then calls one function per command.

Every command turns an expected failure (bad path, unreadable image, unknown checkpoint layout,
bad config value) into one clear error line and exit status 1, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click


class CapfiltError(Exception):
    """An error the user can fix; printed as one line, exit status 1."""


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Expected errors become `error: ...` on stderr and exit 1; bugs still show a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (CapfiltError, FileNotFoundError, ValueError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """capfilt: BLIP's CapFilt (captioner + filter) at web scale on Ray."""


# -- commands are added below, one block each ---------------------------------------------


@main.command()
@click.argument("out")
@click.option("--samples", type=click.IntRange(min=0), default=1000, show_default=True, help="Number of samples.")
@click.option(
    "--noise", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True, help="Noisy web-text rate (0 = clean)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=96, show_default=True)
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--format", "output_format", type=click.Choice(["webdataset", "parquet"]), default="webdataset")
@friendly_errors
def synth(
    out: str, samples: int, noise: float, seed: int, image_size: int, samples_per_shard: int, output_format: str
) -> None:
    """Write a synthetic shape-scene corpus with true captions and web-like noise, in img2dataset layout, to OUT."""
    from capfilt.synth import write_corpus

    r = write_corpus(out, samples, noise, seed, image_size, samples_per_shard, output_format)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["noise_kinds"].items()))
    click.echo(f"wrote {r['samples']} samples in {len(r['shards'])} {output_format} shards to {out} ({kinds})")

if __name__ == "__main__":
    main()
