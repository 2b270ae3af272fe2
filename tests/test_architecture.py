"""Package structure: the engine stays free of orchestration imports, importing changes nothing
in the environment, and the wheel ships only ``mirrorinf/`` (tasks and flows inside it)."""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import mirrorinf

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "mlflow", "dvc", "great_expectations")


def _python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_engine_and_pure_modules_import_no_orchestration_tool(tmp_path: Path) -> None:
    """Every module of the mirrorinf folder itself (engine, params, summary, review, CLI, ...)
    in a fresh interpreter: none of them pulls in Prefect, MLflow, DVC or GX."""
    names = sorted(
        f"mirrorinf.{m.name}"
        for m in pkgutil.walk_packages(mirrorinf.__path__)
        if not m.name.startswith(("tasks", "flows"))
    )
    assert "mirrorinf.engine" in names and "mirrorinf.params" in names, names
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {ORCHESTRATION!r})))"
    )
    loaded = json.loads(_python(code, tmp_path))
    assert loaded == [], f"orchestration modules imported by the pure layer: {loaded[:10]}"


def test_importing_tasks_and_flows_leaves_the_environment_alone(tmp_path: Path) -> None:
    """A user's training script imports mirrorinf (and its flows, for trigger): their Prefect
    home, profile and telemetry settings must be what they were."""
    names = sorted(
        f"mirrorinf.{pkg}.{m.name}"
        for pkg, folder in (("tasks", "tasks"), ("flows", "flows"))
        for m in pkgutil.iter_modules([str(ROOT / folder)])
    )
    assert "mirrorinf.flows.trigger" in names and "mirrorinf.tasks.env" in names
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(tmp_path / "users-own-prefect-home")
    code = (
        "import importlib, json, os\n"
        "before = dict(os.environ)\n"
        "import mirrorinf\n"
        "mirrorinf.trigger, mirrorinf.emit_model_registered\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "from prefect.settings import PREFECT_HOME\n"
        "after = dict(os.environ)\n"
        "keys = set(before) | set(after)\n"
        "changed = {k: after.get(k) for k in keys if before.get(k) != after.get(k)}\n"
        "print(json.dumps({'changed': changed, 'home': str(PREFECT_HOME.value())}))"
    )
    out = json.loads(_python(code, tmp_path, env).splitlines()[-1])
    assert out["changed"] == {}
    assert out["home"] == env["PREFECT_HOME"]


def test_stray_import_of_the_folders_fails_loudly() -> None:
    """From the repository root, ``import tasks`` would find the folder: it refuses."""
    for name in ("tasks", "flows"):
        out = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert f"import mirrorinf.{name}" in out.stderr, out.stderr[-500:]


@pytest.mark.slow
def test_wheel_holds_only_the_mirrorinf_package(tmp_path: Path) -> None:
    """Build the wheel from a copy of the sources; install it into a bare folder; the global
    names ``tasks`` and ``flows`` do not exist there, ``mirrorinf.tasks`` / ``.flows`` do."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mirrorinf", "tasks", "flows"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("mirrorinf-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    outside = [f for f in files if not f.startswith(("mirrorinf/", "mirrorinf-"))]
    assert outside == [], outside
    assert "mirrorinf/tasks/score.py" in files and "mirrorinf/flows/influence.py" in files
    assert "mirrorinf/engine/__init__.py" in files or "mirrorinf/engine.py" in files

    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # a neutral folder and only the installed copy on the path (no editable finder, no repo)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    code = (
        "import importlib.util as u, json, sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__]\n"
        "print(json.dumps({n: (u.find_spec(n).origin if u.find_spec(n) else None)\n"
        "  for n in ('tasks', 'flows', 'mirrorinf.tasks', 'mirrorinf.flows.trigger')}))"
    )
    found = json.loads(_python(code, tmp_path, env).splitlines()[-1])
    assert found["tasks"] is None and found["flows"] is None, found
    assert found["mirrorinf.tasks"].startswith(str(site)), found
    assert found["mirrorinf.flows.trigger"].startswith(str(site)), found
