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


@main.command()
@click.argument("url_list", metavar="URLS.parquet|csv|tsv|txt|jsonl")
@click.argument("out")
@click.option("--url-col", default="url", show_default=True, help="Column holding the image URL.")
@click.option("--caption-col", default="caption", show_default=True, help="Column holding the web text ('' = none).")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Resize (down only) to this size; default: keep bytes.",
)
@click.option(
    "--resize-mode",
    type=click.Choice(["keep_ratio", "center_crop", "border", "keep_ratio_largest"]),
    default="keep_ratio",
    show_default=True,
    help="How --image-size resizes (keep_ratio: smaller side = size).",
)
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True, help="Download processes.")
@click.option("--threads", type=click.IntRange(min=1), default=64, show_default=True, help="Threads per process.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Samples per shard.")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True, help="Seconds per download.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Start OUT afresh instead of resuming (skipping finished shards).")
@click.option("--verbose", "-v", is_flag=True, help="Show img2dataset's own progress output.")
@friendly_errors
def ingest(
    url_list: str,
    out: str,
    url_col: str,
    caption_col: str,
    image_size: int | None,
    resize_mode: str,
    processes: int,
    threads: int,
    shard_size: int,
    timeout: int,
    retries: int,
    overwrite: bool,
    verbose: bool,
) -> None:
    """Download the images of a URL list with img2dataset into webdataset shards in OUT (local or s3://...)."""
    from pipelines.ingest import ingest as run_ingest

    try:
        result = run_ingest(
            url_list,
            out,
            url_col=url_col,
            caption_col=caption_col or None,
            image_size=image_size,
            resize_mode=resize_mode,
            processes=processes,
            threads=threads,
            shard_size=shard_size,
            timeout=timeout,
            retries=retries,
            overwrite=overwrite,
            verbose=verbose,
        )
    except RuntimeError as e:  # img2dataset itself failed: its output tail is the message
        raise CapfiltError(str(e)) from e
    click.echo(result.summary())


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--model",
    "model_path",
    required=True,
    help="Captioner: our folder, an original .pth, a transformers folder or a hub id.",
)
@click.option("--beam", type=click.IntRange(min=1), default=None, help="Beam search with N beams. [default: 3]")
@click.option(
    "--top-p",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Nucleus sampling instead of beam search (0.9 in the paper).",
)
@click.option(
    "--num-captions",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Captions per image (with --top-p).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (per image: seed + index).")
@click.option(
    "--max-length",
    type=click.IntRange(min=2),
    default=20,
    show_default=True,
    help="Tokens incl. the 4-token prompt, as the original.",
)
@click.option(
    "--min-length",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Tokens incl. the prompt, as the original.",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@friendly_errors
def caption(
    images: tuple[str, ...], model_path: str, beam: int | None, top_p: float | None, num_captions: int, seed: int,
    max_length: int, min_length: int, device: str, dtype: str,
) -> None:  # fmt: skip
    """Caption IMAGES with a BLIP captioner; prints `IMAGE<TAB>caption`, one line per caption."""
    from capfilt.predict import caption_files

    for path, caps in caption_files(
        list(images), model_path, beam, top_p, num_captions, seed, max_length, min_length, device, dtype
    ):
        for c in caps:
            click.echo(f"{path}\t{c}")


@main.command()
@click.argument("image")
@click.argument("texts", nargs=-1, required=True)
@click.option(
    "--model", "model_path", required=True, help="Filter (retrieval or pretrain model): folder, .pth or hub id."
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@friendly_errors
def score(image: str, texts: tuple[str, ...], model_path: str, device: str, dtype: str) -> None:
    """Score each TEXT against IMAGE: ITM match probability and ITC cosine similarity, tab-separated."""
    from capfilt.predict import score_file

    click.echo("itm\titc\ttext")
    for text, itm, itc in score_file(image, list(texts), model_path, device, dtype):
        click.echo(f"{itm:.4f}\t{itc:.4f}\t{text}")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option(
    "--tokenizer", "tokenizer_path", default=None, help="Tokenizer folder or BERT vocab.txt (for a bare .pth)."
)
@click.option(
    "--family",
    type=click.Choice(["caption", "retrieval", "pretrain", "vqa"]),
    default=None,
    help="Build this family (e.g. a captioner from a pretraining checkpoint). [default: the checkpoint's]",
)
@click.option(
    "--image-size", type=click.IntRange(min=16), default=None, help="Resize position embeddings to this image size."
)
@friendly_errors
def convert(src: str, dst: str, tokenizer_path: str | None, family: str | None, image_size: int | None) -> None:
    """Convert SRC (original .pth, transformers folder or hub id) into our folder DST."""
    from blip.load import convert_checkpoint

    model = convert_checkpoint(src, dst, family=family, image_size=image_size, tokenizer_path=tokenizer_path)
    n = sum(p.numel() for p in model.parameters())
    click.echo(
        f"wrote {dst}: {model.config.family} model, {model.config.vision.image_size} px, {n / 1e6:.1f}M parameters"
    )


if __name__ == "__main__":
    main()
