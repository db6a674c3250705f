"""Captioner and ITM filter throughput: capfilt's BLIP against transformers' BLIP on the same weights and settings.

A transformers model is built at the real size with random weights (re-drawn at a useful scale), saved, loaded into
capfilt with `blip.load`, and both run the same work in one process, alternating, best of `--reps`:
- caption, beam: 3 beams, max 20 / min 5 tokens (prompt included), repetition penalty 1.0  (the original's eval);
- caption, sample: nucleus p=0.9, top-k 50, repetition penalty 1.1, `--num-captions` per image (CapFilt);
- itm: ITM probability + ITC cosine of `--texts` texts per image (CapFilt's filter).
transformers has no way to share one image encoding across several texts, so its ITM run repeats the image per text,
the way a user of its API scores pairs. Prints images/s for both and the ratio (ours / transformers).

    python bench/bench_model.py --size base --batch 8 --device cpu
    python bench/bench_model.py --size base --batch 64 --device cuda --dtype bf16
    python bench/bench_model.py --size base --only beam sample --compile on   # capfilt's decode step compiled
"""

# ruff: noqa: B023  (the timed lambdas are called inside their loop iteration)
from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import blip
from blip.config import BlipConfig
from blip.convert import config_to_hf
from blip.tokenizer import write_vocab

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flops as model_flops  # noqa: E402  (bench/flops.py)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def redraw(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers' default vision init is ~1e-10 (images would not matter): draw every weight at a useful scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name.lower() and name.endswith("weight") else 0.05 * noise)


def build_pair(cls: type, cfg: BlipConfig, workdir: Path, device: str, dtype: torch.dtype):
    d = config_to_hf(cfg)
    hf_cfg = transformers.BlipConfig(
        text_config=d["text_config"], vision_config=d["vision_config"], image_text_hidden_size=cfg.embed_dim
    )
    ref = cls(hf_cfg).eval()
    redraw(ref)
    folder = workdir / cfg.family
    ref.save_pretrained(folder)
    for f in (workdir / "vocab").iterdir():
        shutil.copy(f, folder / f.name)
    ours = blip.load(folder, device=device, dtype=dtype)
    return ref.to(device, dtype), ours


def timeit(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", choices=["tiny", "base", "large"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-captions", type=int, default=5)
    ap.add_argument("--texts", type=int, default=6, help="texts scored per image (web text + synthetic captions)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--only", nargs="*", default=["beam", "sample", "itm"], choices=["beam", "sample", "itm"])
    ap.add_argument("--compile", default="auto", choices=["auto", "off", "on"], help="capfilt's decode step")
    ap.add_argument(
        "--lengths",
        default="both",
        choices=["natural", "equal", "both"],
        help="natural: each side stops at its own EOS; equal: min_length = max_length on both sides (fair); both",
    )
    ap.add_argument("--max-length", type=int, default=20, help="caption length incl. the prompt")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: from the GPU name)")
    args = ap.parse_args()
    dtype, dev = DTYPES[args.dtype], args.device
    torch.manual_seed(0)

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"transformers {transformers.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else "") + f", {args.dtype}")  # fmt: skip
    print(f"# size {args.size}, batch {args.batch} images, best of {args.reps}, compile {args.compile}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_vocab(workdir / "vocab")
        B = args.batch

        if {"beam", "sample"} & set(args.only):
            cfg = BlipConfig.from_name(args.size, family="caption")
            ref, ours = build_pair(transformers.BlipForConditionalGeneration, cfg, workdir, dev, dtype)
            S = cfg.vision.image_size
            pixels = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
            prompt = ours.prompt_ids(B)  # [DEC] a picture of
            P, M = prompt.shape[1], args.max_length
            gen = M - P  # generated tokens per caption when lengths are forced equal
            modes = ["natural", "equal"] if args.lengths == "both" else [args.lengths]
            vit = model_flops.vit_flops(cfg)
            with torch.inference_mode():
                for mode in modes:
                    min_len = M if mode == "equal" else 5
                    tag = " =len" if mode == "equal" else ""
                    if "beam" in args.only:
                        kw = dict(num_beams=3, max_length=M, min_length=min_len, repetition_penalty=1.0)
                        t_ours = timeit(
                            lambda: ours.generate_ids(pixels, sample=False, compile=args.compile, **kw),
                            args.reps,
                            dev,
                        )
                        t_ref = timeit(
                            lambda: ref.generate(pixel_values=pixels, input_ids=prompt, **kw),
                            args.reps,
                            dev,
                        )
                        eq = mode == "equal"
                        fl = vit + model_flops.decoder_flops_per_image(cfg, tokens=gen, captions=3, prompt_len=P)
                        rows.append(
                            ("caption beam=3" + tag, B / t_ours, B / t_ref, 3 * gen if eq else None, fl if eq else None)
                        )
                    if "sample" in args.only:
                        N = args.num_captions
                        kw = dict(max_length=M, min_length=min_len, top_p=0.9, top_k=50, repetition_penalty=1.1)
                        t_ours = timeit(
                            lambda: ours.generate_ids(pixels, sample=True, num_captions=N, compile=args.compile, **kw),
                            args.reps,
                            dev,
                        )
                        t_ref = timeit(
                            lambda: ref.generate(
                                pixel_values=pixels,
                                input_ids=prompt,
                                do_sample=True,
                                num_return_sequences=N,
                                **kw,
                            ),
                            args.reps,
                            dev,
                        )
                        eq = mode == "equal"
                        fl = vit + model_flops.decoder_flops_per_image(cfg, tokens=gen, captions=N, prompt_len=P)
                        rows.append(
                            (
                                f"caption sample x{N}" + tag,
                                B / t_ours,
                                B / t_ref,
                                N * gen if eq else None,
                                fl if eq else None,
                            )
                        )
            del ref, ours

        if "itm" in args.only:
            cfg = BlipConfig.from_name(args.size, family="retrieval")
            ref, ours = build_pair(transformers.BlipForImageTextRetrieval, cfg, workdir, dev, dtype)
            S = cfg.vision.image_size
            pixels = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
            words = "a red circle on the left and a small blue square at the top of the picture".split()
            texts = [[" ".join(words[(i + j) % 5 : (i + j) % 5 + 6 + j]) for j in range(args.texts)] for i in range(B)]
            flat = [t for ts in texts for t in ts]
            enc = ours.tokenizer(flat, padding="longest", truncation=True, max_length=35, return_tensors="pt").to(dev)
            ids = enc.input_ids.clone()
            ids[:, 0] = cfg.text.enc_token_id
            rep = pixels.repeat_interleave(args.texts, dim=0)

            def hf_itm():
                itm = ref(pixel_values=rep, input_ids=ids, attention_mask=enc.attention_mask, use_itm_head=True)
                itc = ref(
                    pixel_values=rep, input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_itm_head=False
                )
                return itm.itm_score.softmax(-1)[:, 1], itc.itm_score

            with torch.inference_mode():
                t_ours = timeit(lambda: ours.score(pixels, texts), args.reps, dev)
                t_ref = timeit(hf_itm, args.reps, dev)
            fl = model_flops.filter_flops_per_image(cfg, texts=args.texts, text_len=ids.shape[1])
            rows.append((f"itm+itc x{args.texts} texts", B / t_ours, B / t_ref, None, fl))

    peak = args.peak_tflops
    if peak is None and dev.startswith("cuda"):
        peak = model_flops.peak_tflops(torch.cuda.get_device_name())
    # tokens/s: generated tokens (all beams / captions), only where the lengths are forced equal (known exactly);
    # MFU: model FLOPs (bench/flops.py) per image x images/s / peak, on CUDA or with --peak-tflops
    print(
        f"{'task':<28}{'capfilt img/s':>15}{'transformers img/s':>20}{'ratio':>8}"
        f"{'capfilt tok/s':>15}{'hf tok/s':>12}{'capfilt MFU':>13}{'hf MFU':>9}"
    )
    for name, ours_ips, ref_ips, tok, fl in rows:
        tk = f"{ours_ips * tok:>15.1f}{ref_ips * tok:>12.1f}" if tok else f"{'-':>15}{'-':>12}"
        if peak and fl:
            mf = f"{100 * model_flops.mfu(fl, ours_ips, peak):>12.1f}%{100 * model_flops.mfu(fl, ref_ips, peak):>8.1f}%"
        else:
            mf = f"{'-':>13}{'-':>9}"
        print(f"{name:<28}{ours_ips:>15.2f}{ref_ips:>20.2f}{ours_ips / ref_ips:>7.2f}x{tk}{mf}")


if __name__ == "__main__":
    main()
