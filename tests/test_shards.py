"""Sharded, resumable scoring: the store, shard-by-shard equality, a kill -9 resume, Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pipeline_helpers import SMALL_DEMO, make

from mirrorinf import ForwardInf
from mirrorinf.analysis import score_rows
from mirrorinf.flows.influence import run_influence
from mirrorinf.shards import ShardStore, shard_ranges

ROOT = Path(__file__).resolve().parents[1]


def test_shard_ranges_cover_in_order():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(3, 5) == [(0, 3)]
    with pytest.raises(ValueError, match="positive"):
        shard_ranges(3, 0)


def test_store_round_trip_ignores_partial_writes_and_invalidates(tmp_path):
    store = ShardStore(tmp_path / "s", {"model": "m", "v": 1}).open()
    store.save(0, 2, {"pairwise": np.ones((2, 3)), "query_self_drop": np.arange(3.0)})
    # a crash mid-write leaves a temporary file and no marker: the shard is not done, and
    # reopening the store removes the temporary file
    tmp = tmp_path / "s" / ".shard_000000002_000000004.pairwise.npy.k2j4x8.tmp"
    tmp.write_bytes(b"junk")
    assert store.done(0, 2) and not store.done(2, 4)
    ShardStore(tmp_path / "s", {"model": "m", "v": 1}).open()
    assert not tmp.exists()
    with pytest.raises(RuntimeError, match="not scored yet"):
        store.assemble([(0, 2), (2, 4)])
    store.save(2, 4, {"pairwise": np.zeros((2, 3)), "query_self_drop": np.arange(3.0)})
    out = store.assemble([(0, 2), (2, 4)])
    assert out["pairwise"].shape == (4, 3) and out["pairwise"][:2].sum() == 6
    assert list(store.computations()) == ["0:2", "2:4"]
    # same identity: kept; another model version: cleared
    assert ShardStore(tmp_path / "s", {"v": 1, "model": "m"}).open().done(0, 2)
    assert not ShardStore(tmp_path / "s", {"model": "m", "v": 2}).open().done(0, 2)


def test_shards_concatenate_to_the_whole_set():
    torch.manual_seed(0)
    x, y = torch.randn(300, 10), torch.randint(0, 3, (300,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    q, v = (x[:5] + 0.1, y[:5]), (x[250:], y[250:])
    # float64: exact up to summation order (in float32 batch shapes change which kernels run,
    # ~1e-3 relative rounding of the finite differences; the flow tests below bound that)
    cfg = {"precision": "float64"}
    whole, _ = score_rows(ForwardInf(model, cfg), (x, y), q, v)
    parts = [
        score_rows(ForwardInf(model, cfg), (x[a:b], y[a:b]), q, v)[0]
        for a, b in shard_ranges(300, 70)
    ]
    for name in ("pairwise", "self_influence", "group_influence", "loss_after_fit"):
        joined = np.concatenate([p[name] for p in parts])
        np.testing.assert_allclose(
            joined, whole[name], rtol=1e-5, atol=1e-9 * abs(whole[name]).max()
        )


def test_anchored_shards_equal_the_whole_set_with_the_whole_curvature():
    """Anchored mode: each shard passes the whole training set as its curvature set (as
    score_shard_task does), so shard scores are the unsharded run's; with its own rows as the
    curvature set a shard's scores differ (the failure this guards against)."""
    torch.manual_seed(0)
    x, y = torch.randn(300, 10), torch.randint(0, 3, (300,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    q, v = (x[:5] + 0.1, y[:5]), (x[250:], y[250:])
    cfg = {"mode": "anchored", "weight_decay": 1e-2, "seed": 5}
    whole, _ = score_rows(ForwardInf(model, cfg), (x, y), q, v)
    ranges = shard_ranges(300, 70)
    parts = [
        score_rows(ForwardInf(model, cfg), (x[a:b], y[a:b]), q, v, curvature=(x, y))[0]
        for a, b in ranges
    ]
    for name in ("pairwise", "group_influence", "self_influence", "loss_after_fit"):
        joined = np.concatenate([p[name] for p in parts])
        np.testing.assert_allclose(
            joined, whole[name], rtol=1e-6, atol=1e-9 * abs(whole[name]).max()
        )
    # the plain float32 leak twin: equal up to float32 rounding of finite differences
    _close(np.concatenate([p["leak_pairwise"] for p in parts]), whole["leak_pairwise"])
    for p in parts:
        np.testing.assert_allclose(p["query_self_drop"], whole["query_self_drop"], rtol=1e-6)
    a, b = ranges[0]
    own, _ = score_rows(ForwardInf(model, cfg), (x[a:b], y[a:b]), q, v)
    assert not np.allclose(own["pairwise"], whole["pairwise"][a:b], rtol=1e-3)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float32 rounding of finite differences (1e-3 of the scale)."""
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-3 * np.abs(b).max())
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99999


def _logged(run_id: str, project: Path, name: str) -> Path:
    """The artifact ``name`` (e.g. scores/pairwise.npy) logged by run ``run_id``."""
    hits = list((project / "mlruns").rglob(f"{run_id}/**/{name}"))
    assert hits, f"no {name} logged for run {run_id}"
    return hits[0]


def _scores(result_run_id: str, project: Path) -> np.ndarray:
    return np.load(_logged(result_run_id, project, "scores/pairwise.npy"))


@pytest.mark.slow
def test_sharded_flow_equals_single_task_and_resumes_after_kill(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    project = tmp_path / "proj"
    project.mkdir()
    single = run_influence(make(project))
    sharded_params = make(project, sharding={"size": 10, "dir": "outputs/shards"})
    store_root = (
        project / "outputs" / "shards" / f"{single.model['name']}-v{single.model['version']}"
    )

    # a separate process scoring 400 rows in 40 shards, killed with SIGKILL mid-way
    params_file = project / "params-sharded.yaml"
    raw = json.loads(json.dumps(sharded_params.model_dump(mode="json")))
    params_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirrorinf.cli", "run", "--params", str(params_file)],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(project / "child.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    log = store_root / "computations.log"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().split()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the run ended before it could be killed: " + (project / "child.log").read_text()[-3000:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = log.read_text().split()
    assert 3 <= len(before) < 40

    resumed = run_influence(sharded_params)
    after = log.read_text().split()
    assert after[: len(before)] == before
    assert sorted(set(after)) == sorted(after), "a finished shard was scored twice"
    assert len(after) == 40
    _close(_scores(resumed.run_id, project), _scores(single.run_id, project))
    assert resumed.verdict == single.verdict
    # a second rerun scores nothing
    again = run_influence(sharded_params)
    assert log.read_text().split() == after and again.cache_hit


@pytest.mark.slow
def test_dask_two_workers_equal_threads(prefect_harness, tmp_path):
    pytest.importorskip("prefect_dask")
    project = tmp_path / "proj"
    project.mkdir()
    small = {**SMALL_DEMO, "n_train": 200, "n_val": 60, "n_query": 10}
    threads = run_influence(make(project, demo=small, sharding={"size": 50}, cache=False))
    dask = run_influence(
        make(
            project,
            demo=small,
            runner="dask",
            dask={"workers": 2},
            sharding={"size": 50, "dir": "outputs/shards-dask"},
            cache=False,
        )
    )
    _close(_scores(dask.run_id, project), _scores(threads.run_id, project))
    assert dask.verdict == threads.verdict


@pytest.mark.slow
def test_sharded_anchored_flow_equals_unsharded(prefect_harness, tmp_path):
    """Anchored mode through the whole flow: a sharded run logs the unsharded run's scores
    (pairwise, group, self), the same engine reports (scale, eps range, basis, health),
    summary and verdict."""
    project = tmp_path / "proj"
    project.mkdir()
    small = {**SMALL_DEMO, "n_train": 200, "n_val": 60, "n_query": 8}
    common = {"demo": small, "influence": {"mode": "anchored"}, "cache": False}
    whole = run_influence(make(project, **common))
    sharded = run_influence(make(project, **common, sharding={"size": 70, "dir": "sh"}))
    names = ("pairwise", "group_influence", "self_influence", "query_self_drop", "loss_after_fit")
    for name in names:
        a = np.load(_logged(sharded.run_id, project, f"scores/{name}.npy"))
        b = np.load(_logged(whole.run_id, project, f"scores/{name}.npy"))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=name)
    reports = [
        json.loads(_logged(r.run_id, project, "scores/reports.json").read_text())
        for r in (sharded, whole)
    ]
    varying = {"seconds", "n_train"}
    for verb in ("pairwise", "group", "self"):
        got, want = ({k: v for k, v in rep[verb].items() if k not in varying} for rep in reports)
        assert got.keys() == want.keys(), verb
        for key, value in want.items():
            number = isinstance(value, float) and not isinstance(value, bool)
            assert got[key] == (pytest.approx(value, rel=1e-6) if number else value), (verb, key)
    assert reports[1]["pairwise"]["scale"] == "per_unit_query_weight"
    assert sharded.summary["scale"] == whole.summary["scale"]
    assert sharded.summary["score_health"] == whole.summary["score_health"]
    assert sharded.summary["counts"] == whole.summary["counts"]
    assert sharded.verdict == whole.verdict
