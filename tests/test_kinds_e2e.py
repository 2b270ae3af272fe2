"""Task kinds end to end: the user's own model logged as MLflow pt2 and pinned by version, their
data in .npz files, ``run_influence`` with a real SQLite MLflow store, the Prefect test harness
and the Great Expectations gate.

Regression (an MLP on scikit-learn's diabetes data, 5% of targets replaced by far values) and
binary (a one-logit MLP on breast cancer, 5% labels flipped): the self-influence the gate flags
on ranks the planted rows far above chance (AUROC printed and asserted). Multilabel: a small
synthetic case. A custom loss through ``task.loss`` (a module written here), token ids through
an embedding (integer inputs stay integer, a planted duplicate is a leak by exact equality),
and two named inputs (``x_a``, ``x_b``) for a model taking two arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e_helpers import Bag, auroc, fit, mlp, register, run, save_splits, train_table
from torch import nn

from mirrorinf.cli import main
from mirrorinf.flows.influence import InfluenceResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kinds")


def _split(n: int, n_train: int, n_val: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


def planted_run(
    project: Path,
    name: str,
    model: nn.Module,
    x: np.ndarray,
    ys: tuple,
    splits: tuple,
    planted: np.ndarray,
    kind: str,
) -> tuple[InfluenceResult, float, dict, int]:
    """Register ``model``, write the splits (training targets ``ys[1]`` with planted rows),
    run the flow for ``kind``; (result, AUROC of self-influence vs the planted rows, data
    section, version)."""
    (y, y_tr), (tr, va, qu) = ys, splits
    version = register(project, name, model, x[tr][:2])
    data = save_splits(project, name, {
        "train": {"x": x[tr], "y": y_tr, "ids": tr},
        "val": {"x": x[va], "y": y[va], "ids": va},
        "query": {"x": x[qu], "y": y[qu], "ids": qu},
    })  # fmt: skip
    result = run(project, name, version, data, task={"kind": kind})
    return result, auroc(train_table(project, result), tr[planted]), data, version


# --------------------------------------------------------------------------- regression
@pytest.fixture(scope="module")
def regression(prefect_harness: Path, project: Path) -> tuple[InfluenceResult, float, dict]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    tr, va, qu = _split(len(y), 300, 100)
    rng = np.random.default_rng(1)
    y_tr = y[tr].copy()
    planted = rng.choice(len(tr), size=15, replace=False)  # 5% of the training targets
    y_tr[planted] += rng.choice([-1.0, 1.0], size=15) * rng.uniform(3, 5, size=15)
    # a regularised MLP (one that memorised the corrupted targets ranks them lower: 0.78 at
    # 32 hidden units, 300 steps, weight decay 1e-3; see the README)
    model = fit(mlp(10, 1, 16), torch.from_numpy(x[tr]), torch.from_numpy(y_tr)[:, None],
                nn.MSELoss(), 200, wd=1e-2)  # fmt: skip
    result, score, data, version = planted_run(
        project, "diabetes-mlp", model, x, (y, y_tr), (tr, va, qu), planted, "regression"
    )
    print(f"regression (diabetes, 5% corrupted targets): suspect-target AUROC {score:.3f}")
    return result, score, {"planted": tr[planted], "data": data, "version": version}


def test_regression_flags_corrupted_targets(regression) -> None:
    result, score, info = regression
    assert score > 0.8, score
    summary = result.summary
    assert summary["task_kind"] == "regression" and summary["suspect_noun"] == "suspect target"
    flagged = {row["id"] for row in summary["top_mislabels"]}
    # what the gate flags is mostly the planted rows (5% of the set: chance precision 0.05)
    assert flagged and len(flagged & set(info["planted"].tolist())) / len(flagged) >= 0.6
    assert all(row["flag_rule"] for row in summary["top_mislabels"])


def test_regression_cli_words_suspect_targets(regression, project, capsys) -> None:
    _, _, info = regression
    params = project / "params-diabetes.yaml"
    import yaml

    params.write_text(yaml.safe_dump({
        "data": info["data"], "model": {"name": "diabetes-mlp", "version": info["version"]},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "kinds"},
        "task": {"kind": "regression"}, "threads": 1,
    }))  # fmt: skip
    assert main(["run", "--params", str(params)]) in (0, 1)
    out = capsys.readouterr().out
    assert "suspect targets:" in out and "flagged by:" in out and "FLAGGED" not in out


def test_regression_data_under_classification_names_the_kind(regression, project) -> None:
    from mirrorinf.errors import InputError

    _, _, info = regression
    with pytest.raises(InputError, match=r"set task\.kind: regression"):
        run(project, "diabetes-mlp", info["version"], info["data"])


# --------------------------------------------------------------------------- binary
@pytest.fixture(scope="module")
def binary(prefect_harness: Path, project: Path) -> tuple[InfluenceResult, float, dict]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    tr, va, qu = _split(len(y), 400, 100)
    rng = np.random.default_rng(2)
    y_tr = y[tr].copy()
    planted = rng.choice(len(tr), size=20, replace=False)
    y_tr[planted] = 1 - y_tr[planted]
    model = fit(mlp(30, 1, 16), torch.from_numpy(x[tr]),
                torch.from_numpy(y_tr).float()[:, None], nn.BCEWithLogitsLoss(), 200)  # fmt: skip
    result, score, data, version = planted_run(
        project, "breast-logit", model, x, (y, y_tr), (tr, va, qu), planted, "binary"
    )
    print(f"binary (breast cancer, 5% flipped labels): mislabel AUROC {score:.3f}")
    return result, score, {"data": data, "version": version}


def test_binary_flags_flipped_labels(binary) -> None:
    result, score, _ = binary
    assert score > 0.8, score
    assert result.summary["suspect_noun"] == "suspected mislabel"


def test_one_logit_model_as_classification_names_binary(binary, project) -> None:
    from mirrorinf.errors import InputError

    _, _, info = binary
    with pytest.raises(InputError, match=r"1 output and the targets are 0/1: set task\.kind: "):
        run(project, "breast-logit", info["version"], info["data"])


# --------------------------------------------------------------------------- multilabel
def test_multilabel_synthetic(prefect_harness: Path, project: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(360, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 4)) > 0).astype(np.int64)  # 0/1 ints in the file: fine
    tr, va, qu = np.arange(240), np.arange(240, 330), np.arange(330, 360)
    y_tr = y[tr].copy()
    planted = rng.choice(240, size=12, replace=False)
    y_tr[planted] = 1 - y_tr[planted]  # every label of the row flipped
    model = fit(mlp(8, 4, 16), torch.from_numpy(x[tr]), torch.from_numpy(y_tr).float(),
                nn.BCEWithLogitsLoss(), 200)  # fmt: skip
    version = register(project, "multi", model, x[:2])
    data = save_splits(project, "multi", {
        "train": {"x": x[tr], "y": y_tr}, "val": {"x": x[va], "y": y[va]},
        "query": {"x": x[qu], "y": y[qu]},
    })  # fmt: skip
    result = run(project, "multi", version, data, task={"kind": "multilabel"})
    table = train_table(project, result)
    score = auroc(table, planted)
    print(f"multilabel (synthetic, 5% rows flipped): suspect-target AUROC {score:.3f}")
    assert score > 0.8, score
    assert result.summary["suspect_noun"] == "suspect target"
    assert table["label"].iloc[0].count(",") == 3  # the row's 4 labels, shown as one value


# --------------------------------------------------------------------------- custom loss
LOSS_MODULE = '''
import torch
from torch.nn import functional as F

CALLS = []


def smoothed(outputs, targets):
    """Label-smoothed cross-entropy, per example."""
    CALLS.append(len(targets))
    return F.cross_entropy(outputs, targets.long(), reduction="none", label_smoothing=0.3)
'''


def test_custom_loss_from_task_loss_is_used(
    prefect_harness: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sklearn.datasets import load_breast_cancer

    code = project / "userloss"
    code.mkdir()
    (code / "my_losses.py").write_text(LOSS_MODULE)
    monkeypatch.syspath_prepend(str(code))
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    tr, va, qu = _split(len(y), 300, 100, seed=4)
    model = fit(mlp(30, 2, 16), torch.from_numpy(x[tr]), torch.from_numpy(y[tr]),
                nn.CrossEntropyLoss(label_smoothing=0.3), 150)  # fmt: skip
    version = register(project, "breast-smooth", model, x[:2])
    data = save_splits(project, "smooth", {
        "train": {"x": x[tr], "y": y[tr]}, "val": {"x": x[va], "y": y[va]},
        "query": {"x": x[qu], "y": y[qu]},
    })  # fmt: skip
    plain = run(project, "breast-smooth", version, data)
    custom = run(project, "breast-smooth", version, data, task={"loss": "my_losses:smoothed"})
    assert sys.modules["my_losses"].CALLS, "the user's loss was never called"
    assert not custom.cache_hit  # another loss: not the default task's cached scores
    a, b = train_table(project, plain), train_table(project, custom)
    assert not np.allclose(a["self_influence"], b["self_influence"])


# --------------------------------------------------------------------------- token ids
def test_integer_token_inputs_stay_integer_and_duplicates_leak(
    prefect_harness: Path, project: Path
) -> None:
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, size=(300, 6))
    y = (ids < 10).any(axis=1).astype(np.int64)
    tr, va, qu = np.arange(200), np.arange(200, 270), np.arange(270, 300)
    q_ids = ids[qu].copy()
    q_ids[0] = ids[17]  # a planted duplicate of training row 17
    q_y = y[qu].copy()
    q_y[0] = y[17]
    torch.manual_seed(0)
    model = fit(Bag(), torch.from_numpy(ids[tr]), torch.from_numpy(y[tr]),
                nn.CrossEntropyLoss(), 150)  # fmt: skip
    version = register(project, "bag", model, ids[:2])
    data = save_splits(project, "bag", {
        "train": {"x": ids[tr], "y": y[tr]}, "val": {"x": ids[va], "y": y[va]},
        "query": {"x": q_ids, "y": q_y},
    })  # fmt: skip
    result = run(project, "bag", version, data, gate={"leak_cosine": 0.95})
    leaks = {(row["query_id"], row["train_id"]) for row in result.summary["leaks"]}
    assert (0, 17) in leaks
    assert all(row["train_id"] == 17 for row in result.summary["leaks"])  # exact copies only


# --------------------------------------------------------------------------- named inputs
class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(8, 3, 16)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], dim=1))


def test_two_named_inputs(prefect_harness: Path, project: Path) -> None:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    rng = np.random.default_rng(6)
    x = rng.normal(size=(260, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 3))).argmax(1)
    a, b = np.ascontiguousarray(x[:, :5]), np.ascontiguousarray(x[:, 5:])
    sl = {"train": slice(0, 180), "val": slice(180, 240), "query": slice(240, 260)}
    model = fit(TwoInputs(), {"a": torch.from_numpy(a[:180]), "b": torch.from_numpy(b[:180])},
                torch.from_numpy(y[:180]), nn.CrossEntropyLoss(), 150)  # fmt: skip
    # a pt2 model with several inputs takes them positionally, in its signature's order
    sig = ModelSignature(inputs=Schema([
        TensorSpec(np.dtype(np.float32), (-1, 5), "a"),
        TensorSpec(np.dtype(np.float32), (-1, 3), "b"),
    ]))  # fmt: skip
    version = register(project, "two", model, (a[:2], b[:2]), signature=sig)
    data = save_splits(project, "two", {
        k: {"x_b": b[s], "x_a": a[s], "y": y[s]} for k, s in sl.items()
    })  # fmt: skip
    result = run(project, "two", version, data)
    assert result.summary["counts"]["n_train"] == 180
    # the same rows through the eager model by name: the pt2 graph got a and b in its order
    table = train_table(project, result)
    from mirrorinf import ForwardInf

    want = ForwardInf(model).self_influence(
        (
            {"a": torch.from_numpy(a[:180]), "b": torch.from_numpy(b[:180])},
            torch.from_numpy(y[:180]),
        )
    )
    np.testing.assert_allclose(table["self_influence"], want.numpy(), rtol=1e-3, atol=1e-9)
