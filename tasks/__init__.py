"""Prefect tasks: thin wrappers doing I/O with one tool each (DVC, MLflow, GX) around the engine.

Importing this package sets quiet tool defaults (telemetry off, local Prefect home) before any
tool is imported; see :mod:`tasks.env`.
"""

from tasks.env import set_tool_env

set_tool_env()
