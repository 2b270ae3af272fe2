"""Sharded, resumable scoring: the training set in row ranges, each persisted atomically.

A shard's scores are a pure function of (model, training rows, queries, validation set, config),
so shards can be scored in any order, on any worker, and a rerun only scores the shards that are
not on disk yet. Each file is written to a temporary name and renamed, and a shard's small JSON
marker is renamed into place last: a crash leaves a shard either absent or complete. A changed
identity (model, data, config, code) invalidates every shard of the store.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.io import atomic_write

log = logging.getLogger(__name__)

ARRAYS = ("pairwise", "self_influence", "group_influence", "leak_pairwise", "query_self_drop")


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering 0..n in order, each at most ``size`` rows."""
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class ShardStore:
    """A folder of shard results for one identity (model, data, config, code, shard plan)."""

    def __init__(self, root: str | Path, identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))

    def open(self) -> ShardStore:
        """Create the store, or clear it when it holds shards of another identity."""
        manifest = self.root / "manifest.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = None
            if old == self.identity:
                return self
            log.info("shard store %s holds another model/data/config: starting afresh", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.identity, sort_keys=True, indent=1).encode()
        atomic_write(manifest, lambda fh: fh.write(payload))
        return self

    def _marker(self, start: int, stop: int) -> Path:
        return self.root / f"shard_{start:09d}_{stop:09d}.json"

    def done(self, start: int, stop: int) -> bool:
        return self._marker(start, stop).exists()

    def save(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        """Write a shard's arrays, then its marker (the marker says: complete)."""
        names = sorted(arrays)
        for name in names:
            arr = arrays[name]
            atomic_write(
                self.root / f"shard_{start:09d}_{stop:09d}.{name}.npy",
                lambda fh, arr=arr: np.save(fh, arr, allow_pickle=False),
            )
        payload = json.dumps({"start": start, "stop": stop, "arrays": names}).encode()
        atomic_write(self._marker(start, stop), lambda fh: fh.write(payload))
        with open(self.root / "computations.log", "a") as fh:  # audit: one line per scoring
            fh.write(f"{start}:{stop}\n")

    def load(self, start: int, stop: int) -> dict[str, np.ndarray]:
        meta = json.loads(self._marker(start, stop).read_text())
        return {
            name: np.load(
                self.root / f"shard_{start:09d}_{stop:09d}.{name}.npy", allow_pickle=False
            )
            for name in meta["arrays"]
        }

    def assemble(self, ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Concatenate every shard's row arrays in order (all shards must be done)."""
        missing = [r for r in ranges if not self.done(*r)]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) not scored yet, first {missing[0]}")
        parts = [self.load(*r) for r in ranges]
        out = {
            name: np.concatenate([p[name] for p in parts], axis=0)
            for name in parts[0]
            if name != "query_self_drop"
        }
        out["query_self_drop"] = parts[0]["query_self_drop"]
        return out

    def computations(self) -> Iterator[str]:
        path = self.root / "computations.log"
        if path.exists():
            yield from path.read_text().split()
