"""Quiet, local defaults for the tools' environment variables (telemetry off, local homes).

Called by the entry points only (the ``mirrorinf`` CLI, the DVC stages, benchmarks), never on
import: ``mirrorinf.trigger()`` in a user's process leaves their Prefect profile and settings
alone. Must run before prefect / mlflow / dvc / great_expectations are imported, because they
read these at import time. A value already in the environment always wins.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["set_tool_env"]


def set_tool_env(root: str | Path) -> None:
    """Telemetry/analytics off, the Hugging Face Hub offline, short MLflow HTTP retries; Prefect
    home (and DVC site cache) inside the project ``root``."""
    base = Path(root).resolve()
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_HOME": str(base / ".prefect"),
        # transformers / huggingface_hub: models load from the logged files only, no network
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        # a tracking server that is down: MLflow's default (7 retries, backoff factor 2) waits
        # about 4 minutes per request, and a run makes many; 3 retries, factor 1: ~10 s
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    # a Prefect API that died mid-run: Prefect's default (5 retries, 2**n s) waits about a
    # minute per request before the CLI can say so; 3 retries: about 15 s (still rides out a
    # busy server's 503s). Not when the project's Prefect profile sets it.
    profiles = Path(os.environ.get("PREFECT_HOME", defaults["PREFECT_HOME"])) / "profiles.toml"
    if "PREFECT_CLIENT_MAX_RETRIES" not in _text(profiles):
        defaults["PREFECT_CLIENT_MAX_RETRIES"] = "3"
    if (base / ".dvc").is_dir():  # never create .dvc/ in a folder that is not a DVC repo
        defaults["DVC_SITE_CACHE_DIR"] = str(base / ".dvc" / "tmp" / "site-cache")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _text(path: Path) -> str:
    """The text of ``path``, or "" when it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
