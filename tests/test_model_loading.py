"""Safe model loading from a real MLflow store (SQLite in a temp dir).

A pt2 model (MLflow 3's default mlflow.pytorch format) loads without unpickling and scores like
the model that was logged; a pickled model is refused unless allow_pickle says so; a pt2
archive tampered to carry a pickled payload is refused too.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow_helpers import fluent_tracking_uri
from torch import nn

from mirrorinf import ForwardInf, ForwardInfConfig
from mirrorinf.cli import main
from mirrorinf.errors import ModelError
from mirrorinf.tasks.model import load_model_uri


class Net(nn.Module):
    """A user's own architecture (not one of mirrorinf's), as in examples/custom_model.py."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Net]]:
    """A store holding Net as 'pt2-net' v1 (pt2) and 'pickled-net' v1 (pickle)."""
    import mlflow
    import mlflow.pytorch

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    torch.manual_seed(0)
    net = Net().eval()
    example = np.zeros((2, 6), np.float32)
    with fluent_tracking_uri(uri):
        exp = mlflow.create_experiment("models", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            mlflow.pytorch.log_model(
                net, name="m", registered_model_name="pt2-net", input_example=example,
                pip_requirements=["torch"],
            )  # fmt: skip
        with mlflow.start_run(experiment_id=exp):
            mlflow.pytorch.log_model(
                net, name="m", registered_model_name="pickled-net", serialization_format="pickle",
                pip_requirements=["torch"],
            )  # fmt: skip
    yield uri, net


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_pt2_loads_without_pickle_and_scores_like_the_original(store: tuple[str, Net]) -> None:
    uri, net = store
    loaded, ref = load_model_uri("models:/pt2-net/1", tracking_uri=uri)
    assert ref is not None and ref.version == "1"
    train, queries = _data(40, 1), _data(5, 2)
    torch.testing.assert_close(loaded(train[0]), net(train[0]))
    for cfg in (ForwardInfConfig(), ForwardInfConfig(fast_path="off")):
        fi = ForwardInf(loaded, cfg)  # the graph's linear calls take the rank-1 path too
        got = fi.pairwise(train, queries)
        assert fi.last_report is not None
        assert fi.last_report.path == ("lowrank" if cfg.fast_path == "auto" else "generic")
        want = ForwardInf(net, cfg).pairwise(train, queries)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert loaded.training is False  # modes restored after scoring


def test_pickled_model_refused_unless_allowed(store: tuple[str, Net]) -> None:
    uri, net = store
    with pytest.raises(ModelError, match=r"pickle serialization.*model\.allow_pickle: true"):
        load_model_uri("models:/pickled-net/1", tracking_uri=uri)
    loaded, _ = load_model_uri("models:/pickled-net/1", tracking_uri=uri, allow_pickle=True)
    x = _data(4, 3)[0]
    torch.testing.assert_close(loaded(x), net(x))


def _tamper(src: Path, dst: Path) -> None:
    """Copy a pt2 archive, marking one weight as pickled (what torch.export.load unpickles)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            blob = zin.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                config = json.loads(blob)
                next(iter(config["config"].values()))["use_pickle"] = True
                blob = json.dumps(config).encode()
            zout.writestr(item, blob)


def test_pt2_archive_with_a_pickled_payload_refused(
    store: tuple[str, Net], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow

    uri, _ = store
    source = mlflow.MlflowClient(uri).get_model_version_download_uri("pt2-net", "1")
    local = Path(
        mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    )
    archive = local / "data" / "model.pt2"
    _tamper(archive, tmp_path / "tampered.pt2")
    (tmp_path / "tampered.pt2").replace(archive)
    with pytest.raises(ModelError, match=r"pickled object \(hidden.weight\)"):
        load_model_uri(str(local), tracking_uri=uri)
    # the same through the CLI: exit 2, one message, nothing written
    out = tmp_path / "out"
    train = tmp_path / "train.npz"
    x, y = _data(10, 4)
    np.savez(train, x=x.numpy(), y=y.numpy())
    code = main(["score", "--model-uri", str(local), "--train", str(train), "--queries",
                 str(train), "--out", str(out), "--tracking-uri", uri])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "pickled object" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("shape", [(10, 5), (10, 1, 6)])
def test_pt2_model_on_data_of_another_shape_exits_2(
    store: tuple[str, Net],
    tmp_path: Path,
    shape: tuple[int, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A pt2 graph's shape guard raises AssertionError ("Guard failed"): it was exit 3 with a
    traceback, where a module's RuntimeError gave the one-line "cannot run on the data"."""
    uri, _ = store
    train = tmp_path / "train.npz"
    np.savez(train, x=np.zeros(shape, np.float32), y=np.zeros(shape[0], np.int64))
    out = tmp_path / "out"
    code = main(["score", "--model-uri", "models:/pt2-net/1", "--train", str(train), "--queries",
                 str(train), "--out", str(out), "--tracking-uri", uri])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the model cannot run on the data (x {shape})" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_extreme_input_values_exit_2_naming_the_row(
    prefect_harness: Path,
    store: tuple[str, Net],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A finite float32 value of 3e38 in one training row of wine overflowed its self-influence
    update: a FloatingPointError traceback (exit 3); now one line naming the row and its
    magnitude, the run FAILED, no temporary file left."""
    import mlflow
    import yaml
    from sklearn.datasets import load_wine

    uri, _ = store
    x, y = load_wine(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    splits = {"train": perm[:110], "val": perm[110:144], "query": perm[144:]}
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(13, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
    xt, yt = torch.from_numpy(x[splits["train"]]), torch.from_numpy(y[splits["train"]])
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    with fluent_tracking_uri(uri), mlflow.start_run():
        mlflow.pytorch.log_model(net.eval(), name="m", registered_model_name="wine-net",
                                 input_example=x[:2], pip_requirements=["torch"])  # fmt: skip
    for name, rows in splits.items():
        xs = x[rows].copy()
        if name == "train":
            xs[3, 2] = 3e38
        np.savez(tmp_path / f"{name}.npz", x=xs, y=y[rows])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"source": "file", **{k: f"{k}.npz" for k in splits}},
        "model": {"name": "wine-net", "version": 1},
        "mlflow": {"tracking_uri": uri, "experiment": "extreme"}, "threads": 1,
    }))  # fmt: skip
    capsys.readouterr()
    code = main(["run", "--params", str(params)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "scores are NaN or inf, first at train row id '3' of 'train.npz'" in err, err
    assert "largest |x| 3e+38" in err and "scale or clip the inputs" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("extreme")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"]
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []


def test_cli_on_a_pt2_model_prints_no_library_deprecation_notices(
    store: tuple[str, Net], tmp_path: Path
) -> None:
    """``mirrorinf score`` on a pt2 model, as a user runs it (the console script, a fresh
    process): torch.export's FutureWarning about its own LeafSpec used to be printed on every
    load. The CLI hides the libraries' Deprecation/FutureWarnings unless --debug."""
    import subprocess
    import sys

    uri, _ = store
    x, y = _data(20, 0)
    train = tmp_path / "train.npz"
    np.savez(train, x=x.numpy(), y=y.numpy())
    cli = Path(sys.executable).with_name("mirrorinf")
    out = str(tmp_path / "out")
    args = [str(cli), "score", "--model-uri", "models:/pt2-net/1", "--train", str(train),
            "--queries", str(train), "--out", out, "--tracking-uri", uri]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    debug = subprocess.run([*args[:2], "--debug", *args[2:]], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)  # fmt: skip
    assert debug.returncode == 0 and "FutureWarning" in debug.stderr, debug.stderr[-2000:]
