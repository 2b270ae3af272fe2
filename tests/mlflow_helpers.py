"""MLflow's fluent API pointed at a test's store for one block, leaving nothing behind; a
user's training run in it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """``mlflow.set_tracking_uri(uri)`` for the block. MLflow also exports it as
    MLFLOW_TRACKING_URI (for subprocesses); both are restored after, so later tests and the
    commands they start do not inherit this store (or MLflow's ./mlflow.db default)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable as well


@contextmanager
def training_run(project: Path, uri: str) -> Iterator[None]:
    """An MLflow run in the project's "train" experiment (created, artifacts under
    ``mlruns/artifacts``, on first use), opened as a user's training script opens one."""
    import mlflow

    (project / "mlruns").mkdir(exist_ok=True)
    with fluent_tracking_uri(uri):
        exp = mlflow.get_experiment_by_name("train")
        exp_id = (
            exp.experiment_id
            if exp
            else mlflow.create_experiment("train", str(project / "mlruns" / "artifacts"))
        )
        with mlflow.start_run(experiment_id=exp_id):
            yield
