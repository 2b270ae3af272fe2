"""mirrorinf: mirrored influence (Forward-INF) from forward passes, as an MLOps step.

The engine (this package) is pure torch + numpy: no orchestration imports. Names are resolved
lazily so that the command line answers ``--help`` without importing torch. ``trigger`` and
``emit_model_registered`` are re-exported from ``flows`` / ``tasks``: Prefect loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "ForwardInf",
    "ForwardInfConfig",
    "ScoreReport",
    "SphereConfig",
    "cross_entropy",
    "emit_model_registered",
    "trigger",
]

_WHERE = {
    "ForwardInf": "mirrorinf.engine",
    "ScoreReport": "mirrorinf.engine",
    "cross_entropy": "mirrorinf.engine",
    "ForwardInfConfig": "mirrorinf.engine",
    "SphereConfig": "mirrorinf.engine",
    # orchestration helpers: they live in flows/ and tasks/ and import Prefect only when used
    "trigger": "mirrorinf.flows.trigger",
    "emit_model_registered": "mirrorinf.tasks.events",
}

if TYPE_CHECKING:
    from mirrorinf.engine import (
        ForwardInf,
        ForwardInfConfig,
        ScoreReport,
        SphereConfig,
        cross_entropy,
    )
    from mirrorinf.flows.trigger import trigger
    from mirrorinf.tasks.events import emit_model_registered


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mirrorinf' has no attribute {name!r}")
