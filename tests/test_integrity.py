"""Integrity of cached scores and shards under attack and crashes (issue 12, findings 1-2).

Unit tests of the signed records (mirrorinf.integrity) and, through the real flow (Prefect test
harness, SQLite MLflow, a small demo), each attack the issue reproduced: a planted pickle where a
cached result lives runs no code; a forged cache entry (digests consistent, no valid HMAC) and a
corrupted, truncated or wrong-shape shard are recomputed with the verdict of an untouched run;
temporary files of killed writes are removed; an honest entry is still reused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipeline_helpers import SMALL_DEMO, make

from mirrorinf.errors import InputError
from mirrorinf.flows.influence import InfluenceResult, run_influence
from mirrorinf.integrity import SignedRecords, cache_key, cache_key_path, remove_stale_tmp
from mirrorinf.params import Params
from mirrorinf.shards import ShardStore
from mirrorinf.tasks.score import SCORE_CACHE_DIR

ROOT = Path(__file__).resolve().parents[1]
DEMO = {**SMALL_DEMO, "n_train": 300, "n_query": 20}  # still fails its gate (mislabels, leaks)


# --------------------------------------------------------------------------- the key


def test_key_file_is_private_outside_the_project_and_shared_by_racing_first_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MIRRORINF_CACHE_KEY_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = tmp_path / "xdg" / "mirrorinf" / "cache.key"
    assert cache_key_path() == path
    # four processes create the key at once: all get the same one, nothing left over
    code = "from mirrorinf.integrity import cache_key; print(cache_key().hex())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(keys) == 1 and keys == {cache_key().hex()}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_bytes()) == 32
    assert os.listdir(path.parent) == ["cache.key"]
    path.write_bytes(b"short")
    with pytest.raises(InputError, match=r"holds 5 bytes, not 32; delete it"):
        cache_key()
    monkeypatch.setenv("MIRRORINF_CACHE_KEY_FILE", str(tmp_path / "file"))
    (tmp_path / "file").mkdir()  # not a file: a clear error, not a traceback
    with pytest.raises(InputError, match="cannot read the cache key file"):
        cache_key()


# --------------------------------------------------------------------------- records


def _records(root: Path, context: str = "c") -> SignedRecords:
    return SignedRecords(root, "test", context)


def _write_one(root: Path) -> SignedRecords:
    rec = _records(root)
    rec.write("r1", {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(2, np.float32)}, {"m": 1})
    return rec


def _forge(path: Path, body_edit: Any = None, key: bytes = b"x" * 32) -> None:
    """Rewrite a record's JSON consistently (optional edit) and sign it with ``key``."""
    record = json.loads(path.read_text())
    record.pop("hmac")
    if body_edit:
        body_edit(record)
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    record["hmac"] = hmac.new(key, blob, hashlib.sha256).hexdigest()
    path.write_text(json.dumps(record))


def _rewrite_array(root: Path, array: str, value: np.ndarray) -> Any:
    """Replace an array file; returns the record edit giving its new digest, shape and dtype
    (what an attacker without the key can do)."""
    np.save(root / f"r1.{array}.npy", value)
    sha = hashlib.sha256((root / f"r1.{array}.npy").read_bytes()).hexdigest()
    spec = {"sha256": sha, "shape": list(value.shape), "dtype": value.dtype.str}
    return lambda record: record["arrays"].__setitem__(array, spec)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _strip_hmac(path: Path) -> None:
    record = json.loads(path.read_text())
    record.pop("hmac")
    path.write_text(json.dumps(record))


# case -> (tampering, the reason the warning must give)
TAMPERING: dict[str, tuple[Any, str]] = {
    "overwritten": (lambda r: np.save(r / "r1.a.npy", np.ones((2, 3))), "sha256 mismatch"),
    "truncated": (lambda r: _truncate(r / "r1.b.npy"), "sha256 mismatch"),
    "array missing": (lambda r: (r / "r1.a.npy").unlink(), "cannot read"),
    "torn json": (lambda r: (r / "r1.json").write_text('{"format": '), "not JSON"),
    "unsigned": (lambda r: _strip_hmac(r / "r1.json"), "no HMAC"),
    "re-digested": (
        lambda r: _forge(r / "r1.json", _rewrite_array(r, "a", np.ones(3))),
        "HMAC mismatch",
    ),
    "key holder lies about dtype": (  # only a key holder gets here: the check still holds
        lambda r: _forge(
            r / "r1.json", lambda rec: rec["arrays"]["b"].update(dtype="<f8"), key=cache_key()
        ),
        "shape/dtype",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_record_is_discarded_with_a_warning(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = _write_one(tmp_path)
    arrays, meta = rec.read("r1")
    assert meta == {"m": 1} and arrays["b"].dtype == np.float32
    tamper, reason = TAMPERING[case]
    tamper(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mirrorinf.integrity"):
        assert rec.read("r1") is None
    assert reason in caplog.text and str(tmp_path / "r1.") in caplog.text, caplog.text
    assert not list(tmp_path.iterdir()), "the invalid record is discarded"


@pytest.mark.parametrize(
    ("planted", "mapped"), [("r1.json", False), ("r1.a.npy", False), ("r1.a.npy", True)]
)
def test_fifo_or_device_planted_as_a_record_file_is_discarded_not_waited_on(
    planted: str, mapped: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO where a record's file lives blocked the read forever (a run that never ends), and
    a symlink to /dev/zero read without end (memory): anyone who can write the folder could stop
    every run. Only regular files are read."""
    import threading

    rec = _write_one(tmp_path)
    (tmp_path / planted).unlink()
    os.mkfifo(tmp_path / planted)
    got: list[Any] = []
    reader = threading.Thread(
        target=lambda: got.append(rec.read("r1", mmap=("a",) if mapped else ())), daemon=True
    )
    with caplog.at_level(logging.WARNING, logger="mirrorinf.integrity"):
        reader.start()
        reader.join(20)
    if reader.is_alive():  # unblock it: a writer that opens and closes gives the reader EOF
        os.close(os.open(tmp_path / planted, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(20)
        pytest.fail(f"reading a record whose {planted} is a FIFO blocked")
    assert got == [None] and "not a regular file" in caplog.text, caplog.text
    assert not list(tmp_path.iterdir()), "the invalid record is discarded"
    zero = _write_one(tmp_path)  # a symlink to a device: refused before any read
    (tmp_path / planted).unlink()
    (tmp_path / planted).symlink_to("/dev/zero")
    assert zero.read("r1", mmap=("a",) if mapped else ()) is None


def test_fifo_planted_as_the_shard_manifest_starts_the_store_afresh(tmp_path: Path) -> None:
    """The shard store's manifest.json as a FIFO blocked open() forever."""
    import threading

    root = tmp_path / "shards"
    root.mkdir()
    os.mkfifo(root / "manifest.json")
    opener = threading.Thread(target=ShardStore(root, {"m": 1}).open, daemon=True)
    opener.start()
    opener.join(20)
    if opener.is_alive():
        os.close(os.open(root / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
        opener.join(20)
        pytest.fail("opening a shard store whose manifest is a FIFO blocked")
    assert json.loads((root / "manifest.json").read_text()) == {"m": 1}


def test_record_is_valid_only_where_it_was_written(tmp_path: Path) -> None:
    """A genuine record copied to another name or another store context does not verify."""
    _write_one(tmp_path / "a")
    for name in ("r1.json", "r1.a.npy", "r1.b.npy"):
        data = (tmp_path / "a" / name).read_bytes()
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / name).write_bytes(data)
        (tmp_path / "a" / name.replace("r1", "r2")).write_bytes(data)
    assert _records(tmp_path / "a").read("r2") is None
    assert _records(tmp_path / "b", context="other store").read("r1") is None
    assert _records(tmp_path / "a").read("r1") is not None


def test_object_arrays_are_never_loaded(tmp_path: Path) -> None:
    """Even under a valid signature (a key holder), a pickled .npy is refused, not unpickled."""
    rec = _write_one(tmp_path)
    marker = tmp_path / "ran"
    np.save(tmp_path / "r1.a.npy", np.array([_Exploit(marker)], dtype=object), allow_pickle=True)
    sha = hashlib.sha256((tmp_path / "r1.a.npy").read_bytes()).hexdigest()
    _forge(
        tmp_path / "r1.json",
        lambda r: r["arrays"]["a"].update(sha256=sha, shape=[1], dtype="|O"),
        key=cache_key(),
    )
    assert rec.read("r1") is None and not marker.exists()


def test_stale_temp_files_are_removed_by_prefix(tmp_path: Path) -> None:
    (tmp_path / ".k1.pairwise.npy.ab12cd.tmp").write_bytes(b"junk")
    (tmp_path / ".k2.json.ef34gh.tmp").write_bytes(b"junk")
    (tmp_path / "k1.pairwise.npy").write_bytes(b"kept")
    assert [p.name for p in remove_stale_tmp(tmp_path, "k1")] == [".k1.pairwise.npy.ab12cd.tmp"]
    assert [p.name for p in remove_stale_tmp(tmp_path)] == [".k2.json.ef34gh.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["k1.pairwise.npy"]


def test_shard_store_rescores_bad_shards_and_old_markers(tmp_path: Path) -> None:
    store = ShardStore(tmp_path, {"model": "m"}).open()
    store.save(0, 2, {"pairwise": np.ones((2, 3)), "query_self_drop": np.arange(3.0)})
    assert store.done(0, 2)
    # a marker of the format before signatures (no digests, no HMAC): not trusted
    (tmp_path / "shard_000000000_000000002.json").write_text(
        json.dumps({"start": 0, "stop": 2, "arrays": ["pairwise", "query_self_drop"]})
    )
    assert not store.done(0, 2)
    # a genuine shard of another store identity, copied in: not valid here
    other = ShardStore(tmp_path / "other", {"model": "other"}).open()
    other.save(0, 2, {"pairwise": np.zeros((2, 3)), "query_self_drop": np.arange(3.0)})
    for f in (tmp_path / "other").glob("shard_*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    assert not store.done(0, 2)
    with pytest.raises(RuntimeError, match="not scored yet"):
        store.assemble([(0, 2)])


def test_no_prefect_task_or_flow_persists_a_result() -> None:
    """Prefect's result store pickles: every task and flow of mirrorinf opts out explicitly (a
    user's PREFECT_TASKS_DEFAULT_PERSIST_RESULT would otherwise turn it on)."""
    import importlib
    import pkgutil

    from prefect import Flow, Task

    import mirrorinf.flows
    import mirrorinf.tasks

    found = {}
    for pkg in (mirrorinf.tasks, mirrorinf.flows):
        for info in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            for name, obj in vars(module).items():
                if isinstance(obj, (Task, Flow)) and obj.__module__ == module.__name__:
                    found[f"{module.__name__}.{name}"] = obj.persist_result
    assert "mirrorinf.tasks.score.score_task" in found and len(found) >= 12, found
    assert {k: v for k, v in found.items() if v is not False} == {}


# --------------------------------------------------------------------------- through the flow


class _Exploit:
    """Unpickling this writes ``marker``: proof that planted code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _outcome(result: InfluenceResult) -> tuple[str, dict[str, Any]]:
    return result.verdict, result.summary["counts"]


def _logged(result: InfluenceResult, project: Path, name: str) -> np.ndarray:
    hits = list((project / "mlruns").rglob(f"{result.run_id}/**/scores/{name}.npy"))
    assert hits, f"no {name} logged for run {result.run_id}"
    return np.load(hits[0])


@pytest.fixture(scope="module")
def untouched(
    prefect_harness: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Params, InfluenceResult, Path]:
    """A project, its params and the result of an untouched run (trains the demo model)."""
    project = tmp_path_factory.mktemp("integrity")
    params = make(project, demo=DEMO, model={"name": "integrity-demo"})
    before = set(prefect_harness.iterdir())
    result = run_influence(params)
    assert not result.cache_hit and result.verdict == "failed", result.reasons
    assert set(prefect_harness.iterdir()) == before, "Prefect persisted a result"
    return params, result, project


def _entry(project: Path) -> tuple[Path, str]:
    """The score cache folder and the key of its one entry."""
    cache = project / SCORE_CACHE_DIR
    keys = [p.stem for p in cache.glob("mirrorinf-scores-*.json")]
    assert len(keys) == 1, keys
    return cache, keys[0]


@pytest.mark.slow
def test_honest_cache_entry_is_reused(untouched: tuple[Params, InfluenceResult, Path]) -> None:
    params, first, project = untouched
    _entry(project)
    again = run_influence(params)
    assert again.cache_hit and _outcome(again) == _outcome(first)
    assert not any(project.rglob("*.tmp"))
    # the logged matrix is the engine's float32, identical from the cache
    logged = _logged(again, project, "pairwise")
    assert logged.dtype == np.float32
    np.testing.assert_array_equal(logged, _logged(first, project, "pairwise"))
    # stage timings are run metrics: the flow's stages and, computed, the engine's parts
    from mirrorinf.tasks.tracking import get_client

    client = get_client(params.tracking_uri())
    for result, parts in ((first, ("pairwise", "group", "self", "calibration", "store")),
                          (again, ("store",))):  # fmt: skip
        metrics = client.get_run(result.run_id).data.metrics
        for stage in ("score", "check", "logging", "review", *(f"score.{p}" for p in parts)):
            assert metrics[f"stage_seconds.{stage}"] >= 0, (stage, sorted(metrics))
        assert "stage_seconds.score.pairwise" not in metrics or result is first


@pytest.mark.slow
def test_planted_pickle_where_a_cached_result_lives_runs_no_code(
    untouched: tuple[Params, InfluenceResult, Path],
    prefect_harness: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    params, first, project = untouched
    cache, key = _entry(project)
    SignedRecords(cache, "scores").discard(key)
    marker = project / "planted-code-ran"
    payload = _Exploit(marker)

    def prefect_record(path: Path) -> None:  # the old cache format: JSON + base64 cloudpickle
        meta = ResultRecordMetadata(storage_key=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ResultRecord(metadata=meta, result=payload).serialize())

    planted = [prefect_harness / key, project / ".prefect" / "storage" / key, cache / f"{key}.json"]
    for path in planted:
        prefect_record(path)
    np.save(cache / f"{key}.pairwise.npy", np.array([payload], dtype=object), allow_pickle=True)
    # the plant is live: Prefect's own reader runs it
    ResultRecord.deserialize(planted[0].read_bytes())
    assert marker.exists()
    marker.unlink()
    try:
        with caplog.at_level(logging.WARNING, logger="mirrorinf.integrity"):
            result = run_influence(params)
        assert not marker.exists(), "planted code ran"
        assert not result.cache_hit and _outcome(result) == _outcome(first)
        assert f"{key}.json: no HMAC" in caplog.text, caplog.text
        _entry(project)  # recomputed and cached again
    finally:
        planted[0].unlink(missing_ok=True)  # the session's Prefect storage stays clean


@pytest.mark.slow
def test_forged_cache_entry_is_recomputed(untouched: tuple[Params, InfluenceResult, Path]) -> None:
    """Scores rescaled, digests recomputed consistently, signed with a guessed key."""
    params, first, project = untouched
    cache, key = _entry(project)
    record = json.loads((cache / f"{key}.json").read_text())
    record.pop("hmac")
    for name in ("self_influence", "group_influence", "pairwise", "leak_pairwise"):
        path = cache / f"{key}.{name}.npy"
        if path.exists():
            np.save(path, np.load(path) * 1e-3)
            record["arrays"][name]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    record["hmac"] = hmac.new(os.urandom(32), blob, hashlib.sha256).hexdigest()
    (cache / f"{key}.json").write_text(json.dumps(record))
    result = run_influence(params)
    assert not result.cache_hit and _outcome(result) == _outcome(first)
    np.testing.assert_array_equal(
        _logged(result, project, "pairwise"), _logged(first, project, "pairwise")
    )


@pytest.mark.slow
def test_corrupt_truncated_wrong_shape_shards_are_rescored(
    untouched: tuple[Params, InfluenceResult, Path], caplog: pytest.LogCaptureFixture
) -> None:
    params, first, project = untouched
    sharded = params.replace(sharding={"size": 100, "dir": "outputs/shards"})
    clean = run_influence(sharded)
    store = project / "outputs" / "shards" / f"integrity-demo-v{first.model['version']}"
    log = store / "computations.log"
    assert sorted(log.read_text().split()) == ["0:100", "100:200", "200:300"]

    def shard(start: int, name: str) -> Path:
        return store / f"shard_{start:09d}_{start + 100:09d}.{name}.npy"

    ones = np.ones_like(np.load(shard(0, "self_influence")))
    np.save(shard(0, "self_influence"), ones)  # right shape, wrong values
    blob = shard(100, "pairwise").read_bytes()
    shard(100, "pairwise").write_bytes(blob[: len(blob) // 2])  # truncated
    np.save(shard(200, "group_influence"), np.zeros(7))  # wrong shape
    leftovers = [
        store / ".shard_000000000_000000100.pairwise.npy.x1y2z3.tmp",
        store / ".manifest.json.a1b2c3.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"a killed write")
    with caplog.at_level(logging.WARNING, logger="mirrorinf.integrity"):
        again = run_influence(sharded)
    assert sorted(log.read_text().split()[3:]) == ["0:100", "100:200", "200:300"]
    for start, name in ((0, "self_influence"), (100, "pairwise"), (200, "group_influence")):
        assert f"{shard(start, name)}: sha256 mismatch" in caplog.text, caplog.text
    assert not again.cache_hit and _outcome(again) == _outcome(clean)
    for name in ("pairwise", "self_influence", "group_influence"):
        np.testing.assert_array_equal(_logged(again, project, name), _logged(clean, project, name))
    assert not any(p.exists() for p in leftovers)
    # and now every shard verifies: nothing scored on a third run
    third = run_influence(sharded)
    assert third.cache_hit and len(log.read_text().split()) == 6


@pytest.mark.slow
def test_model_rewritten_in_place_is_rescored(
    untouched: tuple[Params, InfluenceResult, Path],
) -> None:
    """The registered version's weights file rewritten in its artifact store (same version,
    same run: a re-upload, a restored backup, tampering): the cache key has the weights'
    digest, so the run scores the new weights instead of serving the old ones' scores."""
    import torch

    params, first, project = untouched
    cache, key = _entry(project)
    files = list((project / "mlruns").rglob("state_dict.pt"))
    assert files, "no weights file in the artifact store"
    saved = {f: f.read_bytes() for f in files}
    try:
        for f in files:
            state = torch.load(f, weights_only=True)
            torch.save({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, f)
        result = run_influence(params)
        assert not result.cache_hit
        assert not np.array_equal(
            _logged(result, project, "pairwise"), _logged(first, project, "pairwise")
        )
    finally:
        for f, blob in saved.items():
            f.write_bytes(blob)
        for stale in cache.glob("mirrorinf-scores-*"):
            if not stale.name.startswith(key):
                stale.unlink()
    assert run_influence(params).cache_hit  # the original bytes: the original entry again
