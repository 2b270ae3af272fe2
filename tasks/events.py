"""Prefect events: ``mirrorinf.model.registered``, emitted when a model version is registered.

A deployment served by ``mirrorinf serve`` reacts to it (see ``flows/trigger.py``). Emitting is
best effort and only happens when a Prefect API is configured (``PREFECT_API_URL``): without one,
Prefect would start a temporary server just to swallow the event.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = [
    "MODEL_REGISTERED",
    "emit_model_registered",
    "model_resource",
    "prefect_api_configured",
]

logger = logging.getLogger(__name__)

MODEL_REGISTERED = "mirrorinf.model.registered"


def model_resource(name: str, version: str | int) -> dict[str, str]:
    """The event's resource: ``mlflow.model.<name>.<version>`` with name and version labels."""
    return {
        "prefect.resource.id": f"mlflow.model.{name}.{version}",
        "mlflow.model.name": name,
        "mlflow.model.version": str(version),
    }


def prefect_api_configured() -> bool:
    """True when ``PREFECT_API_URL`` points at a Prefect server (or Cloud)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def emit_model_registered(
    name: str, version: str | int, *, payload: dict[str, Any] | None = None
) -> str | None:
    """Tell Prefect that ``models:/name/version`` was registered; call it after registering.

    Returns the event id, or None when no Prefect API is configured or emitting failed (a
    warning says why); it never raises, so a training script cannot fail because of it.
    """
    try:
        if not prefect_api_configured():
            logger.debug("no PREFECT_API_URL: %s not emitted", MODEL_REGISTERED)
            return None
        from prefect.events import emit_event

        event = emit_event(
            MODEL_REGISTERED, resource=model_resource(name, version), payload=payload or {}
        )
    except Exception as err:  # best effort: never fail the caller's training
        logger.warning("could not emit %s for %s v%s: %s", MODEL_REGISTERED, name, version, err)
        return None
    return str(event.id) if event is not None else None
