"""Training checkpoints in `--output/checkpoints/step_N/`: the model folder + train_state.pt (optimizer, schedule
position, queues, settings) + one RNG state per rank, written through a temp folder and an atomic rename; and the
distributed helpers they need (barrier, all-min, the cross-rank parameter digest)."""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from pipelines.train.models import save_folder
from pipelines.train.settings import TrainSettings

CKPT_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(output: str | Path) -> list[tuple[int, Path]]:
    d = Path(output) / "checkpoints"
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "train_state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output: str | Path) -> Path | None:
    cks = list_checkpoints(output)
    return cks[-1][1] if cks else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


def queues(model: nn.Module) -> dict[str, torch.Tensor]:
    from blip.convert import TRAINING_STATE

    return {k: v.detach().cpu().clone() for k, v in model.named_buffers() if TRAINING_STATE.match(k)}


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_min(flag: int, device: torch.device) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([flag], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def param_digest(model: nn.Module) -> torch.Tensor:
    """One float64 per tensor (parameters and buffers): equal across ranks iff DDP kept them in sync (to fp error
    of the sum; the test also compares the full tensors)."""
    return torch.stack([t.detach().double().sum() for t in model.state_dict().values()])


def write_checkpoint(
    raw: nn.Module, opt: torch.optim.Optimizer, s: TrainSettings, pos: dict[str, int], rank: int, world: int
) -> Path:
    """Rank 0 writes model + train_state into a temp folder, every rank its RNG, then an atomic rename: a kill
    mid-write never leaves a half checkpoint that --resume would pick."""
    out = Path(s.output) / "checkpoints"
    step = pos["step"]
    final, tmp = out / f"step_{step:08d}", out / f".tmp_step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        save_folder(raw, tmp)
        state = {
            **pos,
            "world_size": world,
            "optimizer": opt.state_dict(),
            "queues": queues(raw),
            "settings": asdict(s),
        }
        torch.save(state, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(s.output)[: -s.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
