"""`batch_size: auto` on this device, and the batch-size table for other GPU sizes (issue 25).

For each model size: random captioner + filter (blip presets) on the device, a CapFiltStage with `batch_size: auto`
(capfilt/memory.py: probes measured with the allocator, the pick run once). Prints the measured memory per image and
fixed, the pick and its peak, the formula's estimate (bench/flops.py), and the batch the same fit gives on 24, 48, 80
and 141 GB cards. On CPU auto is the CPU default and nothing is measured (only the estimate is printed).

    python bench/bench_memory.py --sizes base large --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from blip.config import BlipConfig
from blip.model import MODEL_CLASSES, init_weights
from blip.tokenizer import build_tokenizer, write_vocab
from capfilt.memory import AUTO_MAX, HEADROOM, fit_batch_size
from capfilt.stages import CapFiltStage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops as model_flops  # noqa: E402  (bench/flops.py)

CARDS_GB = (24, 48, 80, 141)


def random_model(family: str, size: str, device: str, tokenizer) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the large preset initialises in seconds on a GPU
        m = MODEL_CLASSES[family](BlipConfig.from_name(size, family=family))
        init_weights(m, std=0.02)
    m.tokenizer = tokenizer
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["base", "large"], choices=["tiny", "base", "large"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-captions", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=30)
    args = ap.parse_args()
    tok = build_tokenizer(write_vocab(Path(tempfile.mkdtemp()) / "vocab"))
    gb, mb = 2**30, 2**20
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# {name}, torch {torch.__version__}, num_captions {args.num_captions}, max_length {args.max_length}")
    header = (
        f"{'size':<7}{'est MB/img':>11}{'MB/img':>8}{'fixed GB':>9}{'limit GB':>9}{'auto':>6}{'peak GB':>8}{'s':>6}"
    )
    print(header + "".join(f"{f'@{c}GB':>7}" for c in CARDS_GB))
    for size in args.sizes:
        cap = random_model("caption", size, args.device, tok)
        filt = random_model("retrieval", size, args.device, tok)
        est = model_flops.peak_bytes_per_image(cap.config, filt.config, args.num_captions, args.max_length)
        stage = CapFiltStage.from_models(
            cap, filt, device=args.device, dtype=args.dtype, batch_size="auto",
            num_captions=args.num_captions, max_length=args.max_length,
        )  # fmt: skip
        t = time.perf_counter()
        stage.setup()
        took = time.perf_counter() - t
        fit = stage.batch_fit
        row = f"{size:<7}{est / mb:>11.1f}"
        if fit.peak is None:
            print(row + f"{'-':>8}{'-':>9}{'-':>9}{fit.batch_size:>6}{'-':>8}{took:>6.1f}  (CPU: not measured)")
        else:
            per_card = []
            for c in CARDS_GB:  # the same fit, on a card of c GB (the models' fixed part unchanged)
                pts = {16: fit.fixed + 16 * fit.per_image, 32: fit.fixed + 32 * fit.per_image}
                per_card.append(fit_batch_size(pts, c * 10**9).batch_size)
            print(
                row + f"{fit.per_image / mb:>8.0f}{fit.fixed / gb:>9.2f}{fit.limit / gb:>9.1f}{fit.batch_size:>6}"
                f"{fit.peak / gb:>8.1f}{took:>6.1f}" + "".join(f"{b:>7}" for b in per_card)
            )
        del stage, cap, filt
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"# auto: the largest batch whose measured peak fits {HEADROOM:.0%} of the free memory, at most {AUTO_MAX}")


if __name__ == "__main__":
    main()
