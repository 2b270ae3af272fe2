"""Shared test setup: repository root importable (benchmarks._common holds ground-truth code),
tool telemetry off and a throw-away Prefect home (importing mirrorinf sets none of this)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# no tool phones home from tests
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: models are built here
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # also transformers' loading bars
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mirrorinf-prefect-home-"))
# hermetic: every test names its MLflow store; a developer's exported server is never written to
os.environ.pop("MLFLOW_TRACKING_URI", None)
# the cache's HMAC key: never the user's own (~/.config/mirrorinf); subprocesses inherit it
os.environ.setdefault(
    "MIRRORINF_CACHE_KEY_FILE",
    str(Path(tempfile.mkdtemp(prefix="mirrorinf-key-")) / "cache.key"),
)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One temporary Prefect API for the session; Prefect's result storage (which mirrorinf no
    longer uses: its score cache is its own) in a temp dir."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with (
        prefect_test_harness(server_startup_timeout=90),
        temporary_settings(updates={"results.local_storage_path": str(storage)}),
    ):
        yield storage
