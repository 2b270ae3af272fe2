"""Sharded, resumable scoring: the training set in row ranges, each persisted atomically.

A shard's scores are a pure function of (model, training rows, queries, validation set, config),
so shards can be scored in any order, on any worker, and a rerun only scores the shards that are
not on disk yet. Each file is written to a temporary name and renamed, and a shard's small signed
JSON marker (each array's sha256, shape, dtype) is renamed into place last: a crash leaves a
shard either absent or complete, and a modified, truncated or planted shard fails verification
and is scored again. A changed identity (model, data, config, code) invalidates every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mirrorinf.engine.scores import health
from mirrorinf.integrity import (
    MAX_RECORD_BYTES,
    NpyFile,
    RecordError,
    RowBlocks,
    SignedRecords,
    read_regular,
    remove_stale_tmp,
)
from mirrorinf.io import atomic_write

log = logging.getLogger(__name__)

ARRAYS = ("pairwise", "self_influence", "group_influence", "leak_pairwise", "query_self_drop")
ARRAYS += ("loss_after_fit",)  # the harmful flag's score: per row, so sharded like the others
# engine verb -> its score array; upcast counts queries (the same in every shard) or rows (self)
_VERBS = {"pairwise": "pairwise", "group": "group_influence", "self": "self_influence"}
MATRICES = ("pairwise", "leak_pairwise")  # [rows, n_query]: memory-mapped, never concatenated
# one value per training row: memory-mapped when the score cache is read (file-backed pages)
ROW_VECTORS = ("self_influence", "group_influence", "loss_after_fit")
MAPPED = MATRICES + ROW_VECTORS
ASSEMBLED = "scores"  # the record of all shards in training-row order


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering 0..n in order, each at most ``size`` rows."""
    if size <= 0:
        raise ValueError(f"shard size must be positive, got {size}")
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class ShardStore:
    """A folder of shard results for one identity (model, data, config, code, shard plan).

    Each shard is a signed record (:class:`mirrorinf.integrity.SignedRecords`): its marker
    ``shard_<start>_<stop>.json`` holds every array's sha256, shape and dtype under an HMAC bound
    to this identity and range. A shard whose marker or arrays do not verify is discarded (with a
    warning naming the file) and scored again; it is never used.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        blob = json.dumps(self.identity, sort_keys=True).encode()
        self.records = SignedRecords(self.root, "shard", hashlib.sha256(blob).hexdigest())

    def open(self) -> ShardStore:
        """Create the store, or clear it when it holds shards of another identity; remove the
        temporary files of writes a killed run left behind."""
        manifest = self.root / "manifest.json"
        if manifest.exists():
            try:
                old = json.loads(read_regular(manifest, MAX_RECORD_BYTES))
            except (OSError, ValueError, RecordError):  # e.g. a FIFO planted there
                old = None
            if old == self.identity:
                remove_stale_tmp(self.root)
                return self
            log.info("shard store %s holds another model/data/config: starting afresh", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.identity, sort_keys=True, indent=1).encode()
        atomic_write(manifest, lambda fh: fh.write(payload))
        return self

    @staticmethod
    def name(start: int, stop: int) -> str:
        """The record name of shard [start, stop)."""
        return f"shard_{start:09d}_{stop:09d}"

    def done(self, start: int, stop: int) -> bool:
        """The shard is on disk and verifies (else it is discarded, to be scored again)."""
        return self.records.read(self.name(start, stop)) is not None

    def save(
        self,
        start: int,
        stop: int,
        arrays: dict[str, np.ndarray],
        reports: dict[str, dict[str, Any]] | None = None,
        filled: dict[str, NpyFile] | None = None,
    ) -> None:
        """Write a shard's arrays, then its signed marker (the marker says: complete) holding
        the engine's reports of the shard (JSON); ``filled``: arrays the engine already wrote
        into this shard's files (:meth:`SignedRecords.new_array`)."""
        meta = {"start": start, "stop": stop, "reports": reports or {}}
        self.records.write(self.name(start, stop), arrays, meta, filled=filled)
        with open(self.root / "computations.log", "a") as fh:  # audit: one line per scoring
            fh.write(f"{start}:{stop}\n")

    def load(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """A verified shard's arrays; RuntimeError if it vanished or stopped verifying."""
        got = self.records.read(self.name(start, stop))
        if got is None:
            raise RuntimeError(f"shard {start}:{stop} is missing or failed verification")
        return got[0]

    def assemble(self, ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Every (verified) shard's row arrays in training-row order (all must be done)."""
        return self.assemble_with_reports(ranges)[0]

    def assemble_with_reports(
        self, ranges: list[tuple[int, int]]
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """The shards' arrays in training-row order, and the whole run's engine reports
        (:func:`merge_reports`); all shards must be done.

        The score matrices are copied shard by shard into one signed record of this store
        (``scores``: a float .npy per matrix, written under a temporary name and renamed when
        complete) and returned as verified read-only memory maps: never whole in memory. The
        per-row arrays are concatenated in memory."""
        got = {r: self.records.read(self.name(*r), mmap=MATRICES) for r in ranges}
        missing = [r for r, rec in got.items() if rec is None]
        if missing:
            raise RuntimeError(f"{len(missing)} shard(s) not scored yet, first {missing[0]}")
        parts = [rec[0] for rec in got.values() if rec is not None]
        rows = {name: np.concatenate([p[name] for p in parts], axis=0)
                for name in parts[0] if name not in (*MATRICES, "query_self_drop")}  # fmt: skip
        rows["query_self_drop"] = parts[0]["query_self_drop"]
        blocks = {}
        for name in MATRICES:
            if name in parts[0]:
                first = parts[0][name]
                shape = (sum(len(p[name]) for p in parts), *first.shape[1:])
                blocks[name] = RowBlocks(shape, first.dtype, [p[name] for p in parts])
        self.records.write(ASSEMBLED, rows, {"ranges": [list(r) for r in ranges]}, blocks)
        done = self.records.read(ASSEMBLED, mmap=MATRICES)
        if done is None:
            raise RuntimeError(f"the assembled scores in {self.root} failed verification")
        metas = [rec[1].get("reports", {}) for rec in got.values() if rec is not None]
        return done[0], merge_reports(metas, done[0])

    def computations(self) -> Iterator[str]:
        path = self.root / "computations.log"
        if path.exists():
            yield from path.read_text().split()


def merge_reports(
    parts: list[dict[str, dict[str, Any]]], rows: dict[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """The reports an unsharded run would give, from its shards' reports and assembled rows.

    Per verb: settings and curvature facts (mode, scale, steps, path, Ritz values, stability:
    the same in every shard, the curvature being the whole set's) from the first shard; the
    step range over all shards; rows and seconds summed; upcast rows summed (self) or the most
    upcast queries of a shard (pairwise, group); score health recomputed on the whole arrays.
    A verb some shard did not report (a store written by an older mirrorinf) is left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for verb, name in _VERBS.items():
        reps = [p[verb] for p in parts if verb in p]
        if not reps or len(reps) != len(parts) or name not in rows:
            continue
        merged = dict(reps[0])
        merged["n_train"] = sum(int(r["n_train"]) for r in reps)
        merged["seconds"] = sum(float(r["seconds"]) for r in reps)
        merged["lr_min"] = min(float(r["lr_min"]) for r in reps)
        merged["lr_max"] = max(float(r["lr_max"]) for r in reps)
        upcast = [int(r.get("upcast", 0)) for r in reps]
        merged["upcast"] = sum(upcast) if verb == "self" else max(upcast)
        # in row blocks: the pairwise matrix is a memory map, never widened whole
        zero, const = health(verb, rows[name])
        merged["zero_fraction"], merged["n_constant_queries"] = zero, const
        out[verb] = merged
    return out
