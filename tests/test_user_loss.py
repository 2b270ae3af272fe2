"""The user's own loss (task.loss): checked on the model's outputs before any scoring, so a
loss that raises, reduces or gives NaN is one message and exit 2; a module beside params.yaml
is importable from the CLI as from ``python -m``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mirrorinf.errors import InputError
from mirrorinf.params import TaskParams
from mirrorinf.tasks.data import load_dataset, write_npz
from mirrorinf.tasks.model import check_fit
from mirrorinf.usercode import load_callable

LOSSES = """
import torch.nn.functional as F

def good(out, y):
    return F.cross_entropy(out, y, reduction="none", label_smoothing=0.1)

def scalar(out, y):
    return F.cross_entropy(out, y)

def column(out, y):
    return F.cross_entropy(out, y, reduction="none")[:, None]

def boom(out, y):
    raise KeyError("boom")

def nan(out, y):
    return F.cross_entropy(out, y, reduction="none") * float("nan")

def one_arg(out):
    return out.sum(1)
"""


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("good", None),
        ("scalar", r"must return one loss per example \(shape \(20,\) for 20 rows\), got \(\)"),
        ("column", r"got \(20, 1\) on the first 20 rows of the train set"),
        ("boom", r"failed on the model's outputs .*KeyError: 'boom'"),
        ("nan", r"returned NaN or inf for 20 of the first 20 rows"),
        ("one_arg", r"TypeError: one_arg\(\) takes 1 positional argument"),
    ],
)
def test_a_loss_that_cannot_score_is_bad_input_before_scoring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, said: str | None
) -> None:
    """Each of these was a traceback (exit 3) from inside the engine, or (NaN) a message
    blaming the inputs for overflowing."""
    (tmp_path / "userloss_mod.py").write_text(LOSSES)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "t.npz", rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 3)
    split = load_dataset(tmp_path / "t.npz", name="train")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    task = TaskParams(loss=f"userloss_mod:{name}")
    if said is None:
        check_fit(model, [split], task)
        return
    with pytest.raises(InputError, match=said):
        check_fit(model, [split], task)


def test_cli_makes_the_project_folder_importable_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``task.loss: "myloss:fn"`` with myloss.py beside params.yaml was "cannot import module"
    from the CLI (its console script does not put the folder on the path, unlike python -m);
    the folder goes last on sys.path (installed packages keep their names) and into
    PYTHONPATH (worker processes)."""
    from mirrorinf.cli import _project_importable

    (tmp_path / "projloss_mod.py").write_text(LOSSES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    with pytest.raises(InputError, match="cannot import module 'projloss_mod'"):
        load_callable("projloss_mod:good", "task.loss")
    _project_importable(tmp_path)
    _project_importable(tmp_path)  # twice: once on the path
    assert load_callable("projloss_mod:good", "task.loss").__name__ == "good"
    assert sys.path[-1] == str(tmp_path.resolve()) and sys.path.count(str(tmp_path.resolve())) == 1
    assert os.environ["PYTHONPATH"] == os.pathsep.join(["/elsewhere", str(tmp_path.resolve())])
