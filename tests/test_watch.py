"""``mirrorinf watch``: new versions scored without code in the training script, each once, each
model on its own data (real SQLite MLflow store, real flow runs on the Prefect test harness)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorinf.flows.watch import ATTEMPTS_TAG, PARAMS_TAG, watch_once
from mirrorinf.params import Params, params_from_dict
from mirrorinf.tasks.data import load_dataset, prepare_demo
from mirrorinf.tasks.model import train_and_register
from mirrorinf.tasks.tracking import get_client
from mirrorinf.tasks.verdict import VERDICT_TAG

pytestmark = pytest.mark.slow

DEMO = {"n_train": 300, "n_val": 100, "n_query": 20, "n_leaks": 2, "flip_fraction": 0.1}
TRAIN = {"hidden": 32, "epochs": 60, "lr": 0.01, "weight_decay": 0.01, "seed": 0}


def _data(project: Path, folder: str, seed: int) -> dict[str, str]:
    files = {k: f"{folder}/{k}.npz" for k in ("train", "val", "query")}
    prepare_demo({**DEMO, "seed": seed}, *(project / files[k] for k in ("train", "val", "query")))
    return {"source": "file", **files}


def _params(project: Path, data: dict[str, str]) -> dict[str, Any]:
    return {
        "data": data,
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "watch"},
        "threads": 1,
    }


def _register(params: Params, name: str) -> str:
    d = params.data
    ref = train_and_register(
        load_dataset(params.resolve(d.train), name="train"),
        load_dataset(params.resolve(d.val), name="val"),
        name=name,
        train_params=TRAIN,
        tracking_uri=params.tracking_uri(),
        experiment="watch",
        artifact_location=params.artifact_location(),
    )
    return str(ref.version)


def _new_version(client: Any, name: str) -> str:
    """Another version of the same weights (as a retrain that changed nothing would give)."""
    v1 = client.get_model_version(name, "1")
    return client.create_model_version(name, v1.source, run_id=v1.run_id).version


def test_watch_scores_each_new_version_once_on_its_own_data(
    prefect_harness: Path, tmp_path: Path
) -> None:
    project = tmp_path
    data_a, data_b = _data(project, "a", seed=0), _data(project, "b", seed=1)
    params = params_from_dict(_params(project, data_a), root=project)
    params_b = project / "params-b.yaml"
    params_b.write_text(yaml.safe_dump(_params(project, data_b)))
    _register(params, "watch-a")
    _register(params_from_dict(_params(project, data_b), root=project), "watch-b")
    client = get_client(params.tracking_uri())
    client.set_registered_model_tag("watch-b", PARAMS_TAG, "params-b.yaml")

    first = watch_once(params, ["watch-a", "watch-b"])
    assert set(first.scored) == {"watch-a/1", "watch-b/1"} and not first.failed
    for name, folder in (("watch-a", "a"), ("watch-b", "b")):
        tags = client.get_model_version(name, "1").tags
        run_tags = client.get_run(tags["mirrorinf.run_id"]).data.tags
        train_md5 = load_dataset(project / folder / "train.npz", name="train").provenance.md5
        assert run_tags["mirrorinf.data.train.md5"] == train_md5, name  # its own data

    assert watch_once(params, ["watch-a", "watch-b"]).scored == {}  # idempotent

    # a version left half-published (tags from a killed run, no verdict record) is rescored
    client.delete_model_version_tag("watch-b", "1", VERDICT_TAG)
    assert set(watch_once(params, ["watch-a", "watch-b"]).scored) == {"watch-b/1"}

    v2 = _new_version(client, "watch-a")
    assert VERDICT_TAG not in client.get_model_version("watch-a", v2).tags
    assert set(watch_once(params, ["watch-a", "watch-b"]).scored) == {f"watch-a/{v2}"}

    # a version whose params file is missing fails, is counted, and is given up after 2 tries
    v3 = _new_version(client, "watch-a")
    client.set_model_version_tag("watch-a", v3, PARAMS_TAG, "no-such-params.yaml")
    for attempt in (1, 2, 3):
        report = watch_once(params, ["watch-a"], max_attempts=2)
        assert (f"watch-a/{v3}" in report.failed) == (attempt <= 2), report
    assert client.get_model_version("watch-a", v3).tags[ATTEMPTS_TAG] == "2"

    # the command line, as a scheduler or a shell loop would call it
    v4 = _new_version(client, "watch-a")
    (project / "params.yaml").write_text(yaml.safe_dump(_params(project, data_a)))
    from prefect.settings import PREFECT_API_URL

    out = subprocess.run(
        [sys.executable, "-m", "mirrorinf.cli", "watch", "--model", "watch-a", "--once"],
        cwd=project,
        env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"watch-a/{v4}: gate " in out.stdout, out.stdout + out.stderr[-2000:]
    assert VERDICT_TAG in client.get_model_version("watch-a", v4).tags
