"""Which MLflow store the CLI uses: the project's params.yaml from any subfolder, never a new
empty store in whatever folder the command happens to run in."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mirrorinf.cli import main
from mirrorinf.tasks.tracking import get_client


def test_gate_outside_a_project_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["gate", "--model", "m", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "no params.yaml here or in a parent folder" in err
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_gate_from_a_subfolder_finds_the_projects_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"mlflow": {"tracking_uri": "sqlite:///store/m.db"}})
    )
    client = get_client(f"sqlite:///{tmp_path}/store/m.db")
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path / "nowhere"))
    sub = tmp_path / "src" / "deep"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert main(["gate", "--model", "m", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow store" not in err and "m v1:" in err  # the project's store, read
    assert not (sub / "mlruns").exists() and not (sub / "mlflow.db").exists()
