"""params.yaml validation: one typed model, errors naming the key path (no tools started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mirrorinf.cli import main
from mirrorinf.engine import ForwardInfConfig
from mirrorinf.params import Params, ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: object, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_repo_params_yaml_is_valid_and_complete() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.root == ROOT
    assert p.data.source == "demo" and p.model.train_demo
    # every section of the model appears in the file, so params.yaml documents every knob
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == set(Params.model_fields)
    assert set(raw["influence"]) == set(p.influence.to_dict())
    # and it shows the engine's defaults, so running the demo means running the defaults
    assert p.influence == ForwardInfConfig() == params_from_dict({}).influence
    assert set(raw["gate"]) == set(p.gate.model_dump())


def test_defaults_and_empty_sections() -> None:
    p = params_from_dict({"demo": None, "gate": None})
    assert p.demo.flip_fraction == 0.1 and p.demo.n_leaks == 5
    assert p.model.name == "mirrorinf-demo" and p.gate.alias_on_pass == "influence-passed"
    assert p.mlflow.tracking_uri == "sqlite:///mlruns/mlflow.db"
    assert p.runner == "threads"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"bogus": 1}, "bogus: unknown key (allowed: cache, dask, data, demo"),
        ({"model": {"verison": 3}}, "model.verison: unknown key; did you mean 'version'?"),
        ({"demo": {"n_train": "many"}}, "demo.n_train"),
        ({"demo": {"flip_fraction": 2}}, "demo.flip_fraction"),
        ({"data": {"source": "s3"}}, "data.source"),
        ({"model": {"version": 0}}, "model.version"),
        ({"model": {"version": 2, "alias": "champion"}}, "model.version or model.alias"),
        ({"influence": {"mode": "bogus"}}, "ForwardInfConfig.mode"),
        ({"influence": {"lr_typo": 1}}, "influence: unknown ForwardInfConfig field(s) lr_typo"),
        ({"gate": {"max_leak": 1}}, "gate.max_leak: unknown key"),
        ({"gate": {"max_flagged_fraction": 1.5}}, "gate.max_flagged_fraction"),
        ({"demo": {"n_train": 1700}}, "exceeds the 1797 digits images"),
        ({"runner": "ray"}, "runner"),
    ],
)
def test_errors_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ParamsError) as info:
        params_from_dict(data)
    assert needle in str(info.value)


def test_relative_paths_resolve_against_the_params_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data": {"source": "file", "train": "d/train.npz"}})
    p = load_params(path)
    assert p.resolve(p.data.train) == tmp_path / "d" / "train.npz"
    assert p.tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert p.artifact_location() == str(tmp_path / "mlruns" / "artifacts")  # beside the db


@pytest.mark.parametrize(
    ("mlflow", "expected"),
    [
        ({"tracking_uri": "http://127.0.0.1:5000"}, None),  # the server's own artifact store
        ({"tracking_uri": "http://h:5000", "artifact_location": "mlflow-artifacts:/x"},
         "mlflow-artifacts:/x"),
        ({"artifact_location": "s3://bucket/p"}, "s3://bucket/p"),
        ({"artifact_location": "file:///data/a"}, "file:///data/a"),
        ({"artifact_location": "arts"}, "ROOT/arts"),
        ({"tracking_uri": "sqlite:////abs/m.db"}, "/abs/artifacts"),
    ],
)  # fmt: skip
def test_artifact_location_passes_uris_through(tmp_path: Path, mlflow: dict, expected) -> None:
    p = params_from_dict({"mlflow": mlflow}, root=tmp_path)
    want = expected.replace("ROOT", str(tmp_path)) if expected else None
    assert p.artifact_location() == want
    if expected and "://" not in expected and ":" in expected:  # no folder named after a URI
        assert "mlflow.artifact_location" not in p.output_dirs()
    assert p.resolve("/abs/x.npz") == Path("/abs/x.npz")
    # replace() validates again and keeps the root
    q = p.replace(model={"name": "m", "version": 3})
    assert q.root == tmp_path and q.model.version == 3 and q.data == p.data
    with pytest.raises(ParamsError, match=r"model\.version"):
        p.replace(model={"version": "x"})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(_write(tmp_path, "demo: [unclosed\n"))
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        load_params(_write(tmp_path, "- a\n- b\n"))
    assert load_params(_write(tmp_path, "{}\n")).model == Params().model  # {} = defaults
    for empty in ("", "# only comments\n\n"):  # not a silent run of the whole demo
        with pytest.raises(ParamsError, match="params file is empty; to start, run the embedded"):
            load_params(_write(tmp_path, empty))
    with pytest.raises(ParamsError, match="is a folder"):
        load_params(tmp_path)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(ParamsError, match=r"symbolic links \(a symlink loop\)"):
        load_params(loop)


def test_yaml_aliases_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    """Aliases can expand without bound ("billion laughs"; the e2e bad-input case is a bomb)."""
    with pytest.raises(ParamsError, match=r"line 2: YAML aliases \(\*a\) are not allowed"):
        load_params(_write(tmp_path, "x: &a [1, 2]\ninfluence: {steps: *a}\n"))
    assert load_params(_write(tmp_path, "threads: &n 2\n")).threads == 2  # an anchor alone is fine


def test_bad_values_are_shown_bounded(tmp_path: Path) -> None:
    """A huge bad value is cut in the message (at most 200 characters of it)."""
    with pytest.raises(ParamsError) as err:
        load_params(_write(tmp_path, {"demo": {"n_train": "x" * 100_000}}))
    assert "demo.n_train" in str(err.value) and len(str(err.value)) < 1000


@pytest.mark.parametrize("name", ["a/b", "a:b", "..", " "])
def test_model_names_mlflow_refuses_are_params_errors(tmp_path: Path, name: str) -> None:
    with pytest.raises(ParamsError, match=r"model\.name: "):
        load_params(_write(tmp_path, {"model": {"name": name}}))
    with pytest.raises(ParamsError, match="alias 'v2' is not valid"):
        load_params(_write(tmp_path, {"model": {"alias": "v2"}}))


def test_cli_reports_params_errors_with_exit_2(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, {"demo": {"n_train": "lots"}})
    assert main(["run", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "demo.n_train" in err and "Traceback" not in err
    assert main(["run", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking_uri written in params wins; else MLFLOW_TRACKING_URI; else the embedded store.
    A replaced section keeps what was written and what was default apart."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    default = params_from_dict({}, root=tmp_path)
    assert default.tracking_uri() == "http://tracking.example:5000"
    assert default.replace(model={"name": "m", "version": 2}).tracking_uri() == (
        "http://tracking.example:5000"
    )
    written = params_from_dict({"mlflow": {"tracking_uri": "sqlite:///s.db"}}, root=tmp_path)
    assert written.tracking_uri() == f"sqlite:///{tmp_path}/s.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default.tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
