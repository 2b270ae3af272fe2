"""Prefect flows: compose the tasks in ``tasks/``; no math here.

Importing this package sets quiet tool defaults (telemetry off, Prefect home under the project's
``.prefect/``) before Prefect is imported by the flow modules.
"""

from tasks.env import set_tool_env

set_tool_env()
