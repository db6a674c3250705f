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


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # capfilt.stages.DTYPES + auto


def tokenizer_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--tokenizer` -> `tokenizer_path`: the tokenizer for a checkpoint without one next to it."""
    return click.option(
        "--tokenizer",
        "tokenizer_path",
        default=None,
        help="Tokenizer folder or BERT vocab.txt (for a bare .pth); its special ids are the model's.",
    )(fn)


def device_options(device: str | None = "auto", dtype: str | None = "float32") -> Callable[..., Any]:
    """`--device` and `--dtype` (None defaults: the config's value)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--dtype",
            type=click.Choice(DTYPE_CHOICES),
            default=dtype,
            show_default=dtype is not None,
            help="auto: bfloat16 on CUDA, float32 elsewhere.",
        )(fn)
        return click.option(
            "--device", default=device, show_default=device is not None, help="auto, cpu, cuda or cuda:N."
        )(fn)

    return decorate


FROM_CONFIG = "from the config, "  # `capfilt run`'s options: None (not given) keeps the YAML config's value


def decoding_option(
    name: str, flag: str | None = None, param: str | None = None, preset: str = "", unset: str | None = None, **kw: Any
) -> Callable[..., Any]:
    """A click option for one blip.GenerationConfig field: its range from GenerationConfig.RANGES (one table for
    caption, eval, vqa and run), its default GenerationConfig's, or `preset`'s (a GenerationConfig constructor:
    "nucleus", "vqa"). `unset` (e.g. "from the config, "): the option defaults to None (not given) and its help
    ends with `[default: <unset><the value>]`."""
    from blip.generation import GenerationConfig

    low, high, low_open = GenerationConfig.RANGES[name]
    kind = click.FloatRange if isinstance(low, float) else click.IntRange
    value = getattr(getattr(GenerationConfig, preset)() if preset else GenerationConfig(), name)
    if unset is not None:
        kw["default"] = None
        kw["help"] = " ".join(filter(None, (kw.get("help"), f"[default: {unset}{value}]")))
    kw.setdefault("default", value)
    kw.setdefault("show_default", kw["default"] is not None)
    flag = flag or "--" + name.replace("_", "-")
    return click.option(flag, param or name, type=kind(min=low, max=high, min_open=low_open), **kw)


class BatchSize(click.ParamType):
    """A batch size: a whole number >= 1, or `auto` (measured on the device when the models are loaded)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if value == "auto" or (isinstance(value, int) and value >= 1):
            return value
        try:
            n = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} is not >= 1", param, ctx)
        return n


def storage_options_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--storage-options JSON` -> `storage_options` (a dict, or None); bad JSON is one `error:` line."""

    @wraps(fn)
    def parse(*args: Any, storage_options: str | None = None, **kwargs: Any) -> Any:
        import json

        so = None
        if storage_options:
            try:
                so = json.loads(storage_options)
            except ValueError as e:
                raise CapfiltError(f"--storage-options is not valid JSON: {e}") from None
            if not isinstance(so, dict):
                raise CapfiltError("--storage-options must be a JSON object")
        return fn(*args, storage_options=so, **kwargs)

    return click.option(
        "--storage-options",
        default=None,
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'.',
    )(friendly_errors(parse))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """capfilt: BLIP's CapFilt (captioner + filter) at web scale on Ray."""


# -- commands are added below, one block each ---------------------------------------------


def _train_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `pretrain` and `finetune` (None = the preset's value)."""
    opts = [
        click.option("--data", required=True, help="Tars: folder, glob, .tar, fsspec URL, or a comma-separated list."),
        click.option("--output", required=True, help="Output folder: final model, checkpoints/, logs, loss curves."),
        click.option("--config", default=None, help="YAML preset. [default: configs/<task>.yaml]"),
        click.option("--tokenizer", default=None, help="Tokenizer folder or vocab.txt (from-scratch runs)."),
        click.option("--workers", type=click.IntRange(min=1), default=None, help="Ray Train workers (DDP ranks)."),
        click.option("--address", default=None, help="Ray cluster address ('auto' joins a running cluster)."),
        click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --output."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Per-worker batch."),
        click.option("--epochs", type=click.IntRange(min=1), default=None),
        click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many steps."),
        click.option("--lr", "init_lr", type=float, default=None, help="Peak learning rate."),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints."),
        click.option("--set", "set_items", multiple=True, help="Any other setting: KEY=VALUE (YAML value)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@main.command()
@_train_options
@click.option("--init", default=None, help="Start from this checkpoint (anything blip.load reads).")
@click.option(
    "--model-config",
    "model",
    type=click.Choice(["tiny", "base", "large"]),
    default=None,
    help="Model preset for a from-scratch run.",
)
@friendly_errors
def pretrain(set_items: tuple[str, ...], **kw: Any) -> None:
    """BLIP pretraining (ITC + ITM + LM) on webdataset tars with Ray Train."""
    from pipelines.train.job import run_command

    run_command("pretrain", kw.pop("config"), set_items, **kw)


@main.command()
@click.option("--task", type=click.Choice(["caption", "retrieval"]), required=True)
@_train_options
@click.option("--init", default=None, help="Checkpoint to fine-tune (pretrain, caption or retrieval).")
@friendly_errors
def finetune(task: str, set_items: tuple[str, ...], **kw: Any) -> None:
    """Fine-tune the captioner (caption) or the filter (retrieval); the output loads as --captioner / --filter."""
    from pipelines.train.job import run_command

    run_command(task, kw.pop("config"), set_items, **kw)


@main.command(name="warmup-vision")
@click.option("--output", required=True, help="Folder for vision.safetensors (timm ViT keys), log.jsonl, summary.")
@click.option("--config", default="warmup_vision_tiny.yaml", show_default=True, help="YAML preset.")
@click.option("--steps", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--address", default=None, help="Ray cluster address ('auto' joins a running cluster).")
@click.option("--set", "set_items", multiple=True, help="Any other setting: KEY=VALUE (YAML value).")
@friendly_errors
def warmup_vision(config: str, set_items: tuple[str, ...], **kw: Any) -> None:
    """Train a ViT supervised on the synthetic world (the stand-in for BLIP's ImageNet ViT); pretraining starts from
    it with `--set init_vision=OUTPUT`."""
    from pipelines.settings import overrides, resolve_preset
    from pipelines.train.warmup import WarmupSettings, warmup_vision

    s = WarmupSettings.load(resolve_preset(config), **overrides(set_items, **kw))
    r = warmup_vision(s)
    acc = ", ".join(f"{k} {v:.1%}" for k, v in r["test_accuracy"].items())
    click.echo(f"done: held-out accuracy {acc}; ViT in {r['output']} (pretrain with --set init_vision={r['output']})")


@main.command(name="eval")
@click.option("--task", type=click.Choice(["retrieval", "caption"]), required=True)
@click.option("--model", "model_path", required=True, help="Checkpoint (anything blip.load reads).")
@click.option("--data", required=True, help="Tars with images and reference texts.")
@click.option("--output", default=None, help="JSON file, or a folder for eval_<task>.json.")
@click.option(
    "--k-test",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="ITM re-rank depth (the original configs: 256 for COCO, 128 for Flickr30K).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), default=None)
@decoding_option("num_beams")
@decoding_option("max_length", help="Counts the prompt.")
@decoding_option("min_length")
@decoding_option("repetition_penalty", help="Beam search repetition penalty (the original's NoCaps eval: 1.1).")
@click.option(
    "--ground-truth",
    default=None,
    help="Captioning: a COCO-format ground truth (coco_karpathy_test_gt.json, nocaps_val_4500_captions.json); "
    "predictions are written in COCO's result format and scored with pycocoevalcap (BLEU, METEOR, ROUGE_L, CIDEr, "
    "SPICE).",
)
@click.option(
    "--scorers",
    default="bleu,meteor,rouge_l,cider,spice",
    show_default=True,
    help="With --ground-truth: which COCO caption scorers run (METEOR and SPICE need Java).",
)
@friendly_errors
def eval_(scorers: str, **kw: Any) -> None:
    """Retrieval R@1/5/10 both ways, or captioning BLEU-4 / CIDEr (all COCO caption metrics with --ground-truth);
    prints a table and writes JSON."""
    from pipelines.train.evaluate import evaluate

    evaluate(scorers=[s.strip() for s in scorers.split(",") if s.strip()], **kw)


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


# options of the URL-list form only (an annotation file brings its own images and captions)
URL_ONLY_OPTIONS = ("url_col", "caption_col", "image_size", "resize_mode", "processes", "timeout", "retries")


@main.command()
@click.argument("paths", nargs=-1, metavar="[URLS.parquet|csv|tsv|txt|jsonl] OUT")
@click.option(
    "--annotations",
    default=None,
    help="A BLIP annotation JSON (coco_karpathy_*.json, flickr30k_*.json, nocaps_*.json) instead of a URL list; "
    "give OUT only.",
)
@click.option("--image-root", default=None, help="Folder the annotation records' `image` paths are relative to.")
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
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads per process (URL list, default 64) or image-reading threads (--annotations, default 16).",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Samples per shard.")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True, help="Seconds per download.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Start OUT afresh instead of resuming (skipping finished shards).")
@click.option("--verbose", "-v", is_flag=True, help="Show img2dataset's own progress output.")
@click.pass_context
@friendly_errors
def ingest(
    ctx: click.Context,
    paths: tuple[str, ...],
    annotations: str | None,
    image_root: str | None,
    url_col: str,
    caption_col: str,
    image_size: int | None,
    resize_mode: str,
    processes: int,
    threads: int | None,
    shard_size: int,
    timeout: int,
    retries: int,
    overwrite: bool,
    verbose: bool,
) -> None:
    """Write webdataset shards (img2dataset layout) to OUT (local or s3://...): `capfilt ingest URLS OUT` downloads a
    URL list with img2dataset; `capfilt ingest --annotations FILE --image-root DIR OUT` turns BLIP's annotation files
    (COCO Karpathy, Flickr30K, NoCaps) and their images into the same layout."""
    if annotations is not None:
        if len(paths) != 1:
            raise click.UsageError("with --annotations give one argument, OUT (the URL-list form is URLS OUT)")
        if image_root is None:
            raise click.UsageError("--annotations needs --image-root (the folder its `image` paths are relative to)")
        given = [o for o in URL_ONLY_OPTIONS if ctx.get_parameter_source(o) != click.core.ParameterSource.DEFAULT]
        if given:
            names = ", ".join("--" + o.replace("_", "-") for o in given)
            raise click.UsageError(f"{names}: only for a URL list, not with --annotations")
        from pipelines.annotations import ingest_annotations
        from pipelines.settings import resolve_path

        result = ingest_annotations(
            str(resolve_path(annotations)),
            str(resolve_path(image_root)),
            str(resolve_path(paths[0])),
            shard_size=shard_size,
            threads=threads or 16,
            overwrite=overwrite,
            echo=click.echo,
        )
        click.echo(result.summary().replace("(download ", "(image missing/unreadable ", 1))
        return
    if len(paths) != 2:
        raise click.UsageError("give URLS OUT (or --annotations FILE --image-root DIR OUT)")
    if image_root is not None:
        raise click.UsageError("--image-root goes with --annotations")
    from pipelines.ingest import ingest as run_ingest

    try:
        result = run_ingest(
            paths[0],
            paths[1],
            url_col=url_col,
            caption_col=caption_col or None,
            image_size=image_size,
            resize_mode=resize_mode,
            processes=processes,
            threads=threads or 64,
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
@click.argument("output_dir")
@click.option("--out", default=None, help="HTML file to write.  [default: OUTPUT_DIR/report.html]")
@click.option("--max-samples", type=click.IntRange(min=0), default=200, show_default=True, help="Sample cards shown.")
@click.option("--input", "input_", default=None, help="Input shards, for dropped samples' images. [default: the run's]")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help="ITM threshold. [default: the run's]")
@storage_options_option
@friendly_errors
def report(
    output_dir: str,
    out: str | None,
    max_samples: int,
    input_: str | None,
    threshold: float | None,
    storage_options: dict[str, Any] | None,
) -> None:
    """Write a self-contained HTML report of a `capfilt run` OUTPUT_DIR and print its path."""
    from pipelines.report.page import write_report

    click.echo(write_report(output_dir, out, max_samples, input_, storage_options, threshold))


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--model",
    "model_path",
    required=True,
    help="Captioner: our folder, an original .pth, a transformers folder or a hub id.",
)
@decoding_option("num_beams", "--beam", "beam", unset="", help="Beam search with N beams.")
@decoding_option("top_p", default=None, help="Nucleus sampling instead of beam search (0.9 in the paper).")
@click.option(
    "--num-captions",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Captions per image (with --top-p).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (per image: seed + index).")
@decoding_option("max_length", help="Tokens incl. the 4-token prompt, as the original.")
@decoding_option("min_length", help="Tokens incl. the prompt, as the original.")
@device_options()
@tokenizer_option
@friendly_errors
def caption(
    images: tuple[str, ...], model_path: str, beam: int | None, top_p: float | None, num_captions: int, seed: int,
    max_length: int, min_length: int, device: str, dtype: str, tokenizer_path: str | None,
) -> None:  # fmt: skip
    """Caption IMAGES with a BLIP captioner; prints `IMAGE<TAB>caption`, one line per caption."""
    from capfilt.predict import caption_files

    for path, caps in caption_files(
        list(images), model_path, beam, top_p, num_captions, seed, max_length, min_length, device, dtype, tokenizer_path
    ):
        for c in caps:
            click.echo(f"{path}\t{c}")


@main.command()
@click.argument("image")
@click.argument("texts", nargs=-1, required=True)
@click.option(
    "--model", "model_path", required=True, help="Filter (retrieval or pretrain model): folder, .pth or hub id."
)
@click.option(
    "--first-token",
    type=click.Choice(["enc", "cls"]),
    default="enc",
    show_default=True,
    help="ITM input's first token: enc as the retrieval checkpoints were trained, cls as blip_itm.py / transformers.",
)
@device_options()
@tokenizer_option
@friendly_errors
def score(
    image: str, texts: tuple[str, ...], model_path: str, first_token: str, device: str, dtype: str,
    tokenizer_path: str | None,
) -> None:  # fmt: skip
    """Score each TEXT against IMAGE: ITM match probability and ITC cosine similarity, tab-separated."""
    from capfilt.predict import score_file

    rows = score_file(image, list(texts), model_path, device, dtype, tokenizer_path, first_token)
    click.echo("itm\titc\ttext")
    for text, itm, itc in rows:
        click.echo(f"{itm:.4f}\t{itc:.4f}\t{text}")


@main.command()
@click.argument("image")
@click.argument("questions", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, help="VQA model: our folder, an original .pth, a transformers "
              "folder or a hub id.")  # fmt: skip
@click.option(
    "--answers",
    "answers_path",
    default=None,
    help="Rank this answer list (JSON list or one answer per line), as the original VQAv2 evaluation; "
    "default: generate the answer.",
)
@click.option(
    "--k", type=click.IntRange(min=1), default=128, show_default=True, help="Candidates re-scored (--answers)."
)
@decoding_option("num_beams", "--beam", "beam", preset="vqa", help="Beams when generating.")
@decoding_option("max_length", preset="vqa", help="Tokens incl. [DEC], as the original's VQA.")
@decoding_option("min_length", preset="vqa", help="As the original's VQA.")
@click.option(
    "--attend-question-padding",
    is_flag=True,
    help="Generate as the original's generate mode: the decoder attends every question token, padding included.",
)
@device_options()
@tokenizer_option
@friendly_errors
def vqa(
    image: str, questions: tuple[str, ...], model_path: str, answers_path: str | None, k: int, beam: int,
    max_length: int, min_length: int, attend_question_padding: bool, device: str, dtype: str,
    tokenizer_path: str | None,
) -> None:  # fmt: skip
    """Answer each QUESTION about IMAGE with a BLIP VQA model; prints `question<TAB>answer`."""
    from capfilt.predict import answer_file

    rows = answer_file(
        image, list(questions), model_path, answers_path, k, beam, max_length, min_length, attend_question_padding,
        device, dtype, tokenizer_path,
    )  # fmt: skip
    for question, answer in rows:
        click.echo(f"{question}\t{answer}")


@main.command()
@click.argument("src")
@click.argument("dst")
@tokenizer_option
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
    from blip import convert_checkpoint

    model = convert_checkpoint(src, dst, family=family, image_size=image_size, tokenizer_path=tokenizer_path)
    n = sum(p.numel() for p in model.parameters())
    click.echo(
        f"wrote {dst}: {model.config.family} model, {model.config.vision.image_size} px, {n / 1e6:.1f}M parameters"
    )


@main.command()
@click.option(
    "--input",
    "input_",
    required=True,
    help="img2dataset shards: folder, glob or file (.tar/.parquet); local, s3:// or any fsspec URL.",
)
@click.option("--output", required=True, help="Output folder (local or fsspec URL); rerun the same command to resume.")
@click.option(
    "--captioner", default=None, help="Captioner checkpoint (folder, .pth or hub id). Default: from the config."
)
@click.option(
    "--filter",
    "filter_",
    default=None,
    help="Filter (ITM) checkpoint (folder, .pth or hub id). Default: from the config.",
)
@click.option("--config", "config_path", default=None, help="YAML settings (default configs/capfilt.yaml); flags win.")
@click.option(
    "--address", default=None, help="Join this Ray cluster ('auto' or host:port); default: Ray in this process."
)
@click.option("--num-captions", type=int, default=None, help="Synthetic captions per image.")
@decoding_option("top_p", preset="nucleus", unset=FROM_CONFIG, help="Nucleus sampling p.")
@decoding_option("max_length", preset="nucleus", unset=FROM_CONFIG, help="Caption tokens incl. the prompt.")
@decoding_option("min_length", preset="nucleus", unset=FROM_CONFIG)
@decoding_option("repetition_penalty", preset="nucleus", unset=FROM_CONFIG, help="As the original's sampling.")
@click.option("--threshold", type=float, default=None, help="Keep a text when its ITM match probability >= this.")
@click.option(
    "--batch-size",
    type=BatchSize(),
    default=None,
    help="Images per model batch, or auto: the largest that fits each GPU's free memory, measured when its models "
    "load (32 on CPU).",
)
@click.option(
    "--actors",
    default=None,
    help="N (fixed pool), MIN:MAX (elastic) or auto. auto: on a cluster 1 to one per shard not done (--max-actors), "
    "asking the autoscaler; with Ray started here one per GPU, or one CPU actor.",
)
@click.option("--max-actors", type=click.IntRange(min=1), default=None, help="Upper bound of --actors auto.")
@click.option(
    "--actor-resources",
    default=None,
    help="Extra Ray resources per actor as JSON, e.g. '{\"accelerator_type:H100\": 0.001}' (node type placement).",
)
@click.option(
    "--decode-threads", type=int, default=None, help="Decode threads per actor (default: 4 on GPU, reserved as CPUs)."
)
@click.option("--retries", type=int, default=None, help="Retries of a shard whose actor died or that raised.")
@device_options(device=None, dtype=None)
@click.option("--seed", type=int, default=None, help="Caption seed (combined with each sample key).")
@click.option(
    "--compile",
    type=click.Choice(["auto", "off", "on"]),
    default=None,
    help="torch.compile the decode step (CUDA graphs on CUDA); auto: on for CUDA, off on CPU. Same ids either way.",
)
@storage_options_option
@click.option("--no-progress", is_flag=True, help="No progress bars or per-shard lines; only the final summary.")
@click.option(
    "--overwrite", is_flag=True, help="The output was made by other models/settings/input: remove it, start over."
)
@click.option("--prune", is_flag=True, help="Remove the outputs of shards that are no longer in the input.")
@friendly_errors
def run(
    input_: str,
    output: str,
    filter_: str | None,
    config_path: str | None,
    storage_options: dict[str, Any] | None,
    no_progress: bool,
    overwrite: bool,
    prune: bool,
    **kw: Any,
) -> None:
    """CapFilt over img2dataset shards: synthetic captions + ITM/ITC filter -> per-sample parquet + kept-sample tars.

    Exit status 0 when every shard is done, 2 when any shard failed (reported in summary.json), 1 on a bad setup
    (also: the output is in use by another job, or was made by other models, settings or input), 130 when
    interrupted (Ctrl-C, SIGTERM; rerun the same command to resume).
    """
    import json

    from pipelines.run.config import RunSettings
    from pipelines.run.job import JobInterrupted, run_capfilt

    if kw.get("actor_resources") is not None:
        try:
            kw["actor_resources"] = json.loads(kw["actor_resources"])
        except ValueError as e:
            raise CapfiltError(f"--actor-resources is not valid JSON: {e}") from None
    cfg = RunSettings.load(
        config_path,
        input=input_,
        output=output,
        filter=filter_,
        storage_options=storage_options,
        progress=False if no_progress else None,
        overwrite=overwrite or None,
        prune=prune or None,
        **kw,
    )
    try:
        summary = run_capfilt(cfg)
    except (JobInterrupted, KeyboardInterrupt):  # the job said how far it got; before Ray starts there is nothing
        sys.exit(130)
    if summary["failed_shards"]:
        sys.exit(2)


KEEP_CHOICES = ("both", "web", "synthetic")  # capfilt.stages.KEEP_CHOICES (not imported: it would load torch)


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.argument("output", metavar="NEW")
@click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None, help="ITM threshold. [default: the run's]")
@click.option(
    "--keep",
    type=click.Choice(KEEP_CHOICES),
    default="both",
    show_default=True,
    help="Which texts may be kept: web text, synthetic captions, or both.",
)
@click.option(
    "--max-synthetic",
    type=click.IntRange(min=0),
    default=None,
    help="Keep at most N synthetic captions per sample (the best-scored). [default: all that pass]",
)
@click.option("--input", "input_", default=None, help="Where the run's input shards are now. [default: the run's]")
@click.option(
    "--address", default=None, help="Join this Ray cluster ('auto' or host:port); default: Ray in this process."
)
@click.option("--tasks", type=click.IntRange(min=1), default=None, help="Shards in flight. [default: 2 per CPU]")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="Retries of a shard.")
@click.option("--in-process", is_flag=True, help="No Ray: shards one after another in this process (small runs).")
@storage_options_option
@click.option("--no-progress", is_flag=True, help="No per-shard lines; only the final summary.")
@click.option("--overwrite", is_flag=True, help="NEW holds another selection (or a run): remove it, start over.")
@friendly_errors
def select(
    run_dir: str,
    output: str,
    input_: str | None,
    storage_options: dict[str, Any] | None,
    no_progress: bool,
    **kw: Any,
) -> None:
    """Re-select a finished `capfilt run` RUN into NEW from its stored ITM scores: no model, no GPU.

    Writes NEW as a run writes its output (per-shard parquet with the new decisions, kept-sample tars with the
    original image bytes from the input shards, summary.json); resumable, exactly once. Exit status as `capfilt run`:
    0 all shards done, 2 some failed, 1 bad setup (NEW holds another selection: --overwrite), 130 interrupted.
    """
    from pipelines.run.job import JobInterrupted
    from pipelines.run.select import SelectSettings, run_select

    cfg = SelectSettings(
        run=run_dir,
        output=output,
        input=input_,
        storage_options=storage_options or {},
        progress=not no_progress,
        **kw,
    )
    try:
        summary = run_select(cfg)
    except (JobInterrupted, KeyboardInterrupt):
        sys.exit(130)
    if summary["failed_shards"]:
        sys.exit(2)


@main.command()
@click.option(
    "--config",
    "config",
    default="bootstrap_demo.yaml",
    show_default=True,
    help="bootstrap YAML (a path, or a name in configs/)",
)
@click.option("--workdir", default=None, help="where every step writes (overrides the config's workdir)")
@click.option("--init", default=None, help="pretrained start of both pretraining arms (any checkpoint blip.load reads)")
@click.option(
    "--set",
    "set_items",
    multiple=True,
    help="Any other setting: KEY=VALUE (YAML value), e.g. seed=1, noise=0.5, pretrain.epochs=5 (one key of a step's map).",
)
@click.option(
    "--seeds",
    default=None,
    help="Comma-separated seeds, e.g. 0,1,2: one loop per seed in WORKDIR/seed_N, then the mean ± std table.",
)
@friendly_errors
def bootstrap(
    config: str, workdir: str | None, init: str | None, set_items: tuple[str, ...], seeds: str | None
) -> None:
    """BLIP's whole loop: pretrain -> fine-tune captioner + filter -> capfilt run -> pretrain again -> evaluate."""
    from pipelines.bootstrap import bootstrap as run_bootstrap

    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds") from None
    run_bootstrap(config, workdir, init, set_items, seed_list)


if __name__ == "__main__":
    main()
