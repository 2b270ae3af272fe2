"""Quiet, local defaults for the tools' environment variables (telemetry off, local homes).

A value the user set wins; a value set here earlier with the working directory as root is
replaced when a caller later names the project root explicitly. Must run before prefect / mlflow /
dvc / great_expectations are imported, because they read these at import time; ``tasks``
calls it on import, and the CLI calls it again with the project root before importing flows.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["set_tool_env"]

_ours: dict[str, str] = {}  # values this module set (an explicit root may replace them)


def set_tool_env(root: str | Path | None = None) -> None:
    """Telemetry/analytics off; Prefect home (and DVC site cache) inside the project ``root``."""
    base = Path(root if root is not None else Path.cwd()).resolve()
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_HOME": str(base / ".prefect"),
    }
    if (base / ".dvc").is_dir():  # never create .dvc/ in a folder that is not a DVC repo
        defaults["DVC_SITE_CACHE_DIR"] = str(base / ".dvc" / "tmp" / "site-cache")
    for key, value in defaults.items():
        current = os.environ.get(key)
        if current is None or (root is not None and _ours.get(key) == current):
            os.environ[key] = value
            _ours[key] = value
