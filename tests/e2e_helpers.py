"""Helpers shared by the end-to-end tests of a user's own model (test_kinds_e2e,
test_sources_e2e, test_transformers_e2e): log it as MLflow pt2 and register it, write its data as
.npz, run the influence flow on a SQLite store in the project, read the run's training table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow_helpers import training_run
from sklearn.metrics import roc_auc_score
from torch import nn

from mirrorinf.flows.influence import InfluenceResult, run_influence
from mirrorinf.params import params_from_dict
from mirrorinf.tasks.tracking import get_client


def uri(project: Path) -> str:
    return f"sqlite:///{project}/mlruns/mlflow.db"


def register(
    project: Path, name: str, model: nn.Module, example: Any, signature: Any = None
) -> int:
    """Log ``model`` as MLflow pt2 (the user's way) and register it; returns the version."""
    import mlflow.pytorch

    with training_run(project, uri(project)):
        info = mlflow.pytorch.log_model(
            model.eval(), name="model", registered_model_name=name, input_example=example,
            signature=signature, pip_requirements=["torch"],
        )  # fmt: skip
    return int(info.registered_model_version)


def save_splits(project: Path, prefix: str, splits: dict[str, dict[str, np.ndarray]]) -> dict:
    """Write each split as .npz; returns the params data section."""
    for split, arrays in splits.items():
        np.savez(project / f"{prefix}-{split}.npz", **arrays)
    return {"source": "file", **{s: f"{prefix}-{s}.npz" for s in ("train", "val", "query")}}


def run(project: Path, name: str, version: int, data: dict, **sections: Any) -> InfluenceResult:
    params = {
        "data": data,
        "model": {"name": name, "version": version},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "kinds"},
        "threads": 1,
        **sections,
    }
    return run_influence(params_from_dict(params, root=project))


def train_table(project: Path, result: InfluenceResult) -> pd.DataFrame:
    client = get_client(uri(project))
    path = client.download_artifacts(result.run_id, "tables/train.parquet", str(project / "dl"))
    return pd.read_parquet(path)


def fit(model: nn.Module, x: Any, y: torch.Tensor, loss: Any, steps: int, wd: float = 1e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        out = model(**x) if isinstance(x, dict) else model(x)
        loss(out, y).backward()
        opt.step()
    return model.eval()


def mlp(d_in: int, d_out: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights whatever ran before
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def auroc(table: pd.DataFrame, planted: np.ndarray) -> float:
    is_planted = table["id"].isin(planted).to_numpy()
    return float(roc_auc_score(is_planted, table["self_influence"].to_numpy()))


class Bag(nn.Module):
    """Bag of tokens: an embedding, which needs integer ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(dim=1))
