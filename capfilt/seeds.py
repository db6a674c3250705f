"""One stable hash for every seed and id derived from names: (run seed, sample key) for the captions, (seed, epoch,
rank, tar) for training draws, a sample key for retrieval's same-image ids.

Python's hash() is salted per process; this is the same in every process, on every machine and in every Python run,
which is what lets a retried shard rewrite identical bytes and a resumed training run redraw the same batches."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit non-negative int from `parts` (each taken as its str): blake2b of the parts joined by NUL."""
    digest = hashlib.blake2b("\x00".join(str(p) for p in parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
