"""MLflow's fluent API pointed at a test's store for one block, leaving nothing behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


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
