"""`batch_size: auto`: the largest batch the device's free memory holds, measured on the device, not guessed.

On CUDA, the stage runs two probe batches (eager, synthetic worst-case inputs: max-length web text, every caption to
`max_length` in the static cache) and reads the allocator's peak for each; peak = fixed + per_image x batch is
solved from the two points, and the batch filling `HEADROOM` of what the allocator can reach (free device memory +
what it already holds) is taken, rounded down to a multiple of 8 (tensor-core tiles), within [1, AUTO_MAX]. That size
is then run once more and stepped down (by the measured excess; halved when out of memory) until it fits, so the
chosen size has been measured. On CPU, throughput hardly depends on the batch size: auto is AUTO_CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AUTO_CPU = 32  # CPU: the default batch size
AUTO_MAX = 512  # host memory: prefetched batches are batch x S x S x 3 uint8 (512 at 384 px: 226 MB each)
PROBES = (16, 32)  # small enough to fit any GPU that holds the models, large enough to be past fixed overheads
HEADROOM = 0.85  # of the reachable memory: fragmentation, CUDA graph pools, the other model's workspaces
MULTIPLE = 8


@dataclass(frozen=True)
class BatchFit:
    """The chosen batch size and the measurements behind it (bytes)."""

    batch_size: int
    per_image: int  # peak growth per image
    fixed: int  # peak at batch 0: weights, workspaces
    limit: int  # what the allocator can reach (free + held by it)
    peak: int | None = None  # measured at batch_size (None on CPU)
    device: str = "cpu"  # where: the GPU's name on CUDA

    def describe(self) -> str:
        if self.peak is None:
            return f"batch_size auto: {self.batch_size} on {self.device} (the CPU default)"
        gb = 2**30
        return (
            f"batch_size auto: {self.batch_size} on {self.device} (peak {self.peak / gb:.1f} GB of {self.limit / gb:.1f} "
            f"GB; {self.per_image / 2**20:.0f} MB per image + {self.fixed / gb:.1f} GB)"
        )


def fit_batch_size(
    peaks: dict[int, int], limit: int, headroom: float = HEADROOM, multiple: int = MULTIPLE, cap: int = AUTO_MAX
) -> BatchFit:
    """Two measured (batch, peak bytes) points -> the largest batch whose linear peak fits headroom x limit."""
    (b1, p1), (b2, p2) = sorted(peaks.items())[:2]
    per_image = max(1, (p2 - p1) // (b2 - b1))
    fixed = max(0, p1 - per_image * b1)
    b = int((headroom * limit - fixed) // per_image)
    return BatchFit(batch_size=_round(max(1, min(cap, b)), multiple), per_image=per_image, fixed=fixed, limit=limit)


def _round(b: int, multiple: int = MULTIPLE) -> int:
    """Down to a multiple of `multiple` (tensor-core tiles) when at least one."""
    return b - b % multiple if b >= multiple else b


def search_batch_size(peak_at: Callable[[int], int | None], limit: int, device: str = "cuda") -> BatchFit:
    """`peak_at(b)`: the measured peak bytes of one batch of b, None when it ran out of memory. Probes PROBES (halved
    while they run out), fits, then runs the fitted size, stepping it down until it fits HEADROOM x `limit`."""
    probes = PROBES
    while True:
        peaks = {b: peak_at(b) for b in probes}
        if all(p is not None for p in peaks.values()):
            break
        if probes[0] == 1:
            raise _out_of_memory(device, limit)
        probes = (max(1, probes[0] // 2), probes[0])
    fit = fit_batch_size(peaks, limit)  # type: ignore[arg-type]  (no None left)
    b = fit.batch_size
    while True:  # run the chosen size once: measured, not extrapolated
        peak = peak_at(b)
        if peak is not None and (peak <= HEADROOM * limit or b == 1):
            return BatchFit(b, fit.per_image, fit.fixed, limit, peak, device)
        if b == 1:
            raise _out_of_memory(device, limit)
        # over the limit: scale down by the measured excess (out of memory: halve), always by at least one
        scaled = b // 2 if peak is None else int(b * (HEADROOM * limit - fit.fixed) / max(1, peak - fit.fixed))
        b = _round(max(1, min(scaled, b - 1)))


def _out_of_memory(device: str, limit: int) -> RuntimeError:
    return RuntimeError(f"batch_size auto: one image runs out of memory on {device} ({limit / 2**30:.1f} GB)")


def cuda_peak(run: Callable[[int], object], batch: int, device: torch.device) -> int | None:
    """The allocator's peak bytes while `run(batch)` runs; None when it runs out of memory."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def auto_batch_size(run: Callable[[int], object], device: torch.device) -> BatchFit:
    """Probe `run(batch)` (one model batch of worst-case inputs) on `device` and pick the batch size."""
    if device.type != "cuda":
        return BatchFit(batch_size=AUTO_CPU, per_image=0, fixed=0, limit=0)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    limit = free + torch.cuda.memory_reserved(device)  # free on the device + what this process's allocator holds
    return search_batch_size(lambda b: cuda_peak(run, b, device), limit, torch.cuda.get_device_name(device))
