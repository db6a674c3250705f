"""CapFilt on in-memory batches (dicts of arrays / lists): a plain class with `setup()` + `__call__(batch)`.

A batch (`stage_batch`) is read rows + their decoded pixels (capfilt/decode.py). `CapFiltStage` holds the captioner
and the filter on one device and, per batch: N synthetic captions by nucleus sampling (counter-based noise keyed by
one seed per sample, `stable_seed(seed, key)`, so reruns, retries and a different batch composition or batch size
give the same captions), then the filter's ITM match probability and ITC cosine for the web text and
each synthetic caption; a text is kept when its ITM probability >= threshold, a sample when any text is kept
(`select_texts`: the one keep rule, also applied by `capfilt select` to the stored scores).
The result columns and their types are capfilt/schema.py's (`SampleResult`). No Ray in here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blip.generate import resolve_compile
from blip.generation import GenerationConfig
from blip.image import normalize
from capfilt.decode import stack_pixels
from capfilt.memory import BatchFit, auto_batch_size
from capfilt.schema import RESULT_COLUMNS, SampleResult
from capfilt.seeds import stable_seed

_NUCLEUS = GenerationConfig.nucleus()  # CapFilt's captions: the original's sampling path
# the one table of model dtypes (capfilt run, caption, score, vqa)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """The device named by "auto" (CUDA when there is one), "cpu", "cuda" or "cuda:N"; CUDA where there is none: error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype named by "auto" (bfloat16 on CUDA, float32 elsewhere) or by a key of DTYPES."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _web_text(t: Any) -> str | None:
    """Missing web text (no .txt, null, blank) is recorded as missing: null scores, never kept."""
    if t is None or (isinstance(t, float | np.floating) and np.isnan(t)):  # NaN: missing, from pandas/Ray batches
        return None
    t = str(t)
    return t if t.strip() else None


KEEP_CHOICES = ("both", "web", "synthetic")  # which texts may be kept: `capfilt select --keep`


def select_texts(
    web: str | None,
    web_itm: float | None,
    synthetic: list[str],
    synthetic_itm: list[float],
    threshold: float,
    keep: str = "both",
    max_synthetic: int | None = None,
) -> tuple[list[str], str | None]:
    """The one keep rule (CapFiltStage and `capfilt select`): a text is kept when its ITM match probability
    >= threshold. -> (kept texts, web text first then synthetic captions in caption order; reason: None when any is
    kept, else "below_threshold", or "no_text" when there was no text to judge).

    `keep` limits which texts may be kept (web, synthetic or both); `max_synthetic` keeps at most that many passing
    captions, the best-scored (ties: the earlier caption). The defaults are `capfilt run`'s rule."""
    if keep not in KEEP_CHOICES:
        raise ValueError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")
    web = web if keep != "synthetic" else None
    pairs = list(zip(synthetic, synthetic_itm)) if keep != "web" else []
    passing = [i for i, (_, q) in enumerate(pairs) if q >= threshold]
    if max_synthetic is not None and len(passing) > max_synthetic:
        passing = sorted(sorted(passing, key=lambda i: -pairs[i][1])[:max_synthetic])  # sorted() is stable
    kept = ([web] if web is not None and web_itm is not None and web_itm >= threshold else []) + [
        pairs[i][0] for i in passing
    ]
    if kept:
        return kept, None
    return kept, "below_threshold" if (web is not None or pairs) else "no_text"


@dataclass
class CapFiltSettings:
    """What CapFilt does to a sample: declared once, embedded by `capfilt run`'s RunSettings (pipelines/run/config.py)."""

    captioner: str = "Salesforce/blip-image-captioning-large"  # checkpoint path or hub id (blip.load)
    filter: str = "Salesforce/blip-itm-large-coco"
    num_captions: int = 1
    # the captioner's decoding: the original's nucleus sampling (blip.GenerationConfig.nucleus), options and ranges
    # declared there; lengths count the prompt tokens, as the original
    top_p: float = _NUCLEUS.top_p
    max_length: int = _NUCLEUS.max_length
    min_length: int = _NUCLEUS.min_length
    repetition_penalty: float = _NUCLEUS.repetition_penalty
    threshold: float = 0.5
    device: str = "auto"
    dtype: str = "auto"  # bfloat16 on GPU, float32 on CPU
    # images per forward pass (larger batches are processed in chunks); "auto": measured on the device at setup
    # (capfilt/memory.py: the largest that fits its free memory; 32 on CPU)
    batch_size: int | str = 32
    seed: int = 0
    text_max_length: int = 35  # filter tokenisation, as the original retrieval code
    compile: str = "auto"  # the captioner's decode step under torch.compile: auto (on for CUDA) | off | on

    def validate(self) -> None:
        checks = [
            (self.num_captions >= 0, f"num_captions must be >= 0, got {self.num_captions}"),
            (0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}"),
            (
                self.batch_size == "auto" or (isinstance(self.batch_size, int) and self.batch_size >= 1),
                f"batch_size must be >= 1 or 'auto', got {self.batch_size!r}",
            ),
            (
                self.min_length < self.max_length,  # a caption must be able to end
                f"need min_length < max_length, got {self.min_length}, {self.max_length}",
            ),
            (self.text_max_length >= 2, f"text_max_length must be >= 2, got {self.text_max_length}"),
            (
                self.dtype in ("auto", *DTYPES),
                f"unknown dtype {self.dtype!r}; expected auto or one of {sorted(DTYPES)}",
            ),
            (
                self.compile in ("auto", "off", "on"),
                f"compile must be 'auto', 'off' or 'on', got {self.compile!r}",
            ),
        ]
        _ = self.generation  # the decoding options in their ranges: GenerationConfig validates them once built
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def generation(self) -> GenerationConfig:
        """The captioner's decoding options."""
        return GenerationConfig.nucleus(**GenerationConfig.pick(vars(self)))

    def stage_settings(self) -> dict[str, Any]:
        """Just the CapFiltSettings fields (of a subclass such as RunSettings), as CapFiltStage keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(CapFiltSettings)}


def stage_batch(rows: list[dict[str, Any]], decoded: list[tuple], image_size: int) -> dict[str, Any]:
    """Read rows (`key`, `caption`: pipelines.io's READ_FIELDS) + their `decode_or_error` results -> the batch
    `CapFiltStage.results` takes: the one way a batch is made (the CapFilt worker, the bench, tests)."""
    return {
        "key": [r["key"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "status": [d[1] for d in decoded],
        "pixels": stack_pixels(decoded, image_size),  # (B, S, S, 3) uint8
    }


@dataclass
class CapFiltStage(CapFiltSettings):
    """Captioner + filter on one device; `__call__` maps a decoded batch to result rows (see the module docstring)."""

    cap_model: Any = field(default=None, repr=False)
    filt_model: Any = field(default=None, repr=False)
    batch_fit: BatchFit | None = field(default=None, repr=False)  # batch_size "auto": what setup measured

    @classmethod
    def from_models(cls, captioner_model: torch.nn.Module, filter_model: torch.nn.Module, **kw: Any) -> CapFiltStage:
        """A stage around already-built models (tests, benchmarks); `setup()` then only moves them to the device."""
        return cls(
            captioner="<in-memory>", filter="<in-memory>", cap_model=captioner_model, filt_model=filter_model, **kw
        )

    def setup(self) -> None:
        """Load both models onto ONE device, so an image crosses to it once."""
        self.validate()
        self._device = resolve_device(self.device)
        self._dtype = resolve_dtype(self.dtype, self._device)
        from blip import check_family, load

        if self.cap_model is None or self.filt_model is None:
            self.cap_model = load(self.captioner, device=str(self._device), dtype=self._dtype)
            self.filt_model = load(self.filter, device=str(self._device), dtype=self._dtype)
        for role, spec, m in (("captioner", self.captioner, self.cap_model), ("filter", self.filter, self.filt_model)):
            check_family(m.config.family, role, f"{role} {spec!r}")
        self.cap_model = self.cap_model.to(self._device, self._dtype).eval()
        self.filt_model = self.filt_model.to(self._device, self._dtype).eval()
        if self.batch_size == "auto":
            self.batch_fit = auto_batch_size(self._probe, self._device)
            self.batch_size = self.batch_fit.batch_size

    def _probe(self, n: int) -> None:
        """One model batch of `n` worst-case samples, for `batch_size: auto`: random images, web texts of the filter's
        full `text_max_length`, eager (a probe size must not leave a captured graph behind)."""
        S = self.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        web = " ".join(["photo"] * self.text_max_length)
        self._run_ok(pixels, [f"probe-{i}" for i in range(n)], [web] * n, compile="off")

    @property
    def image_size(self) -> int:
        """The size to decode images to: the larger model size (the other one is resized on the device)."""
        return max(self.cap_model.config.vision.image_size, self.filt_model.config.vision.image_size)

    def _pixels_for(self, x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """(B, S, S, 3) uint8 on the device -> the model's normalised (B, 3, s, s).

        When the two models want different sizes the second resize is bicubic on the device (torch, antialiased),
        which differs slightly from PIL's bicubic on the CPU; with equal sizes (the released checkpoints) it is exact.
        """
        cfg = model.config
        s = cfg.vision.image_size
        if x.shape[1] != s:
            y = x.permute(0, 3, 1, 2).float()  # (B, 3, S, S)
            y = F.interpolate(y, size=(s, s), mode="bicubic", antialias=True, align_corners=False)
            x = y.round_().clamp_(0, 255).permute(0, 2, 3, 1)  # (B, s, s, 3) in [0, 255]
        return normalize(x, cfg.image_mean, cfg.image_std, self._dtype)

    @torch.no_grad()
    def _run_ok(
        self, pixels: np.ndarray | torch.Tensor, keys: list[str], webs: list[str | None], compile: str | None = None
    ) -> list[SampleResult]:
        if not torch.is_tensor(pixels):
            pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        x = pixels.to(self._device, non_blocking=True)  # (B, S, S, 3) uint8; asynchronous from a pinned buffer
        caps: list[list[str]] = [[] for _ in keys]
        if self.num_captions > 0:
            compile = self.compile if compile is None else compile
            seeds = torch.tensor([stable_seed(self.seed, k) for k in keys], dtype=torch.long)  # (B,)
            images = self._pixels_for(x, self.cap_model)  # (B, 3, s, s)
            n = len(keys)
            # a captured step is one graph (and one set of static buffers) per shape: a short batch (a shard's last)
            # is padded to the batch size, so a run is one shape. Costs < 5% of the captioner's work on shards of
            # >= 20 batches; the padding rows are copies of the first image, their captions dropped (own seeds).
            pad = 0
            if resolve_compile(compile, self._device) and isinstance(self.batch_size, int):
                pad = self.batch_size - n
            if pad > 0:
                images = torch.cat([images, images[:1].expand(pad, -1, -1, -1)])
                seeds = torch.cat([seeds, seeds[:1].expand(pad)])
            caps = self.cap_model.generate(images, self.num_captions, self.generation, seeds=seeds, compile=compile)
            caps = caps[:n]
        texts = [([w] if w is not None else []) + c for w, c in zip(webs, caps)]
        itm, itc = self.filt_model.score(self._pixels_for(x, self.filt_model), texts, self.text_max_length)
        out = []
        for w, c, p, s in zip(webs, caps, itm, itc):
            off = 1 if w is not None else 0
            kept_texts, reason = select_texts(w, p[0] if off else None, c, p[off:], self.threshold)
            out.append(
                SampleResult(
                    synthetic_captions=c,
                    web_itm=p[0] if off else None,
                    web_itc=s[0] if off else None,
                    synthetic_itm=p[off:],
                    synthetic_itc=s[off:],
                    kept_texts=kept_texts,
                    kept=bool(kept_texts),
                    reason=reason,
                )
            )
        return out

    def pin(self, pixels: np.ndarray) -> np.ndarray | torch.Tensor:
        """A batch's (B, S, S, 3) uint8 pixels in page-locked host memory when the device is CUDA, so the copy to the
        device is one asynchronous DMA; the worker calls this before it waits for the model. Elsewhere: unchanged."""
        if not hasattr(self, "_device"):
            self.setup()
        if self._device.type != "cuda":
            return pixels
        return torch.from_numpy(np.ascontiguousarray(pixels)).pin_memory()

    def results(self, batch: dict[str, Any]) -> list[SampleResult]:
        """A `stage_batch` (`pixels` (B, S, S, 3) uint8, numpy or a `pin`ned tensor; `status`, `key`, `caption`) -> one
        result per row.

        Rows whose status is not "ok" get SampleResult's defaults (empty lists, not kept), `reason` = their status.
        """
        if not hasattr(self, "_device"):
            self.setup()
        n = len(batch["key"])
        status = [str(s) for s in batch["status"]]
        keys = [str(k) for k in batch["key"]]
        webs = [_web_text(t) for t in batch.get("caption", [None] * n)]
        results: list[SampleResult | None] = [None] * n
        ok = [i for i in range(n) if status[i] == "ok"]
        pixels = batch["pixels"]
        for j in range(0, len(ok), self.batch_size):
            idx = ok[j : j + self.batch_size]
            contiguous = idx[-1] - idx[0] + 1 == len(idx)  # a slice keeps a pinned buffer pinned (no copy)
            sel = pixels[idx[0] : idx[-1] + 1] if contiguous else pixels[idx]
            for i, r in zip(idx, self._run_ok(sel, [keys[i] for i in idx], [webs[i] for i in idx])):
                results[i] = r
        return [r if r is not None else SampleResult(reason=s) for r, s in zip(results, status)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """`results` as columns: the batch's own columns (less `pixels`) + RESULT_COLUMNS (tests, benchmarks)."""
        results = self.results(batch)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for col in RESULT_COLUMNS:
            out[col] = [getattr(r, col) for r in results]
        return out
