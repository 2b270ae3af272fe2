"""The DVC route as a user runs it: ``dvc repro`` of prepare -> train -> influence in a copy of
this project (a fresh git + DVC repo in a temp folder, its own MLflow store), then a change of
only a gate param reruns only the influence stage, which re-scores the same model version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_helpers import git, make_dvc_repo

from mirrorinf.tasks.tracking import get_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL_DEMO = {"n_train": 300, "n_val": 100, "n_query": 20, "n_leaks": 3, "flip_fraction": 0.1}


def _dvc(project: Path, env: dict[str, str], *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project's pipeline files and code in a fresh git + DVC repository."""
    project = make_dvc_repo(tmp_path_factory.mktemp("dvc-route") / "proj")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mirrorinf", "tasks", "flows"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["demo"].update(SMALL_DEMO)
    params["model"]["train"]["epochs"] = 60
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(project, "add", "-A")
    git(project, "commit", "-qm", "pipeline")
    return project


def test_dvc_repro_then_only_influence_reruns_on_a_gate_change(
    prefect_harness: Path, project: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        # the stages run `python -m ...`: this interpreter's environment first on PATH
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    first = _dvc(project, env, "repro")
    for stage in ("prepare", "train", "influence"):
        assert f"Running stage '{stage}'" in first, first

    model = json.loads((project / "outputs" / "model.json").read_text())
    metrics = json.loads((project / "outputs" / "influence.json").read_text())
    client = get_client(f"sqlite:///{project}/mlruns/mlflow.db")
    tags = client.get_model_version(model["name"], str(model["version"])).tags
    # the demo plants flipped labels and leaks: its gate fails by design, and says so everywhere
    assert tags["mirrorinf.gate"] == "failed" and metrics["gate_passed"] is False
    assert metrics["model_version"] == int(model["version"])
    shown = json.loads(_dvc(project, env, "metrics", "show", "--json"))
    assert shown, "dvc metrics show returned nothing"
    assert '"gate_passed": false' in json.dumps(shown)
    first_run = tags["mirrorinf.run_id"]

    # only a gate param changes: prepare and train are up to date, influence reruns
    git(project, "add", "-A")
    git(project, "commit", "-qm", "first repro")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"].update(max_flagged_fraction=1.0, max_harmful_fraction=1.0, max_leaks=1000)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _dvc(project, env, "status")
    assert "influence" in status and "prepare:" not in status and "train:" not in status, status

    second = _dvc(project, env, "repro")
    assert "Running stage 'influence'" in second, second
    assert "Running stage 'prepare'" not in second and "Running stage 'train'" not in second
    again = json.loads((project / "outputs" / "model.json").read_text())
    assert again == model  # the same version, not retrained
    tags = client.get_model_version(model["name"], str(model["version"])).tags
    assert tags["mirrorinf.run_id"] != first_run  # re-scored: a new influence run
    assert tags["mirrorinf.gate"] == "passed"  # the loosened gate is what decided
    assert json.loads((project / "outputs" / "influence.json").read_text())["gate_passed"] is True
