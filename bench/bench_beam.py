"""Beam-search bookkeeping cost: the batched `_beam_search` against the per-image Python loop it replaced (issue 25).

A tiny random decoder (1 layer, hidden 32) keeps the model's share of each step small, so the time is mostly the
search itself: top-k over nb * V, finished hypotheses, reordering. The reference is the previous implementation, kept
in tests/test_beam_vectorized.py; both must give the same ids. Best of `--reps`, ms per `generate_ids` call.

    python bench/bench_beam.py --batch 32 --beams 3
    python bench/bench_beam.py --batch 256 --beams 3 --device cuda
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

import blip.generate as gen
from blip.config import TextConfig
from blip.model import BertLMHeadModel, init_weights

ROOT = Path(__file__).resolve().parent.parent


def reference():
    """The previous implementation, from tests/test_beam_vectorized.py."""
    spec = importlib.util.spec_from_file_location("beam_reference", ROOT / "tests" / "test_beam_vectorized.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reference_beam_search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beams", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=30524)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--min-length", type=int, default=5)
    ap.add_argument("--eos-bias", type=float, default=2.0, help="raise [SEP] so beams finish at various steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()

    torch.manual_seed(0)
    eos, pad, bos = 102 % args.vocab, 0, 1
    cfg = TextConfig(vocab_size=args.vocab, hidden_size=32, layers=1, heads=2, intermediate_size=64, encoder_width=32,
                     pad_token_id=pad, sep_token_id=eos, bos_token_id=bos)  # fmt: skip
    decoder = BertLMHeadModel(cfg)
    init_weights(decoder, std=0.5)
    with torch.no_grad():
        decoder.cls.predictions.bias[eos] += args.eos_bias
    decoder = decoder.eval().to(args.device)
    states = torch.randn(args.batch, 8, 32, device=args.device)  # (B, L, Dv)
    prompt = torch.full((args.batch, 1), bos, device=args.device)
    kw = dict(num_beams=args.beams, max_length=args.max_length, min_length=args.min_length, compile="off")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None

    def timed(search) -> tuple[float, torch.Tensor]:
        gen_search, gen._beam_search = gen._beam_search, search
        try:
            best = float("inf")
            for _ in range(args.reps + 1):  # the first call warms up
                sync()
                t = time.perf_counter()
                out = gen.generate_ids(decoder, states, prompt, eos, pad, **kw)
                sync()
                best = min(best, time.perf_counter() - t)
            return 1000 * best, out
        finally:
            gen._beam_search = gen_search

    new_ms, new = timed(gen._beam_search)
    ref_ms, ref = timed(reference())
    assert torch.equal(new, ref), "the batched beam search differs from the reference"
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        **{k: getattr(args, k) for k in ("batch", "beams", "vocab", "max_length", "min_length")},
        "steps": new.shape[1] - 1,
        "ms_batched": round(new_ms, 2),
        "ms_reference": round(ref_ms, 2),
        "speedup": round(ref_ms / new_ms, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
