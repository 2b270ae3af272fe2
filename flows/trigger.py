"""Trigger the influence flow after training: a call, or a deployment reacting to an event.

- :func:`trigger` scores one registered model version: in this process, or, when a Prefect API
  is configured and a deployment of :func:`influence_for_model` exists, by submitting a run to it.
- :func:`serve` (``mirrorinf serve``) serves that deployment with an event trigger: every
  ``mirrorinf.model.registered`` event (see ``tasks/events.py``) starts a run for the model name
  and version in the event's resource.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import flow

from mirrorinf.flows.influence import InfluenceResult, run_influence
from mirrorinf.params import Params, load_params, params_from_dict
from mirrorinf.tasks.events import MODEL_REGISTERED, emit_model_registered, prefect_api_configured

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

__all__ = [
    "DEPLOYMENT",
    "FLOW_NAME",
    "build_deployment",
    "emit_model_registered",
    "influence_for_model",
    "model_registered_trigger",
    "pinned_params",
    "serve",
    "trigger",
]

logger = logging.getLogger(__name__)

FLOW_NAME = "mirrorinf-influence-version"
DEPLOYMENT = "mirrorinf"
ParamsLike = Params | str | Path | dict[str, Any] | None


def _as_params(params: ParamsLike) -> Params:
    """Params from an object, a YAML path, a mapping, or None (./params.yaml, else defaults)."""
    if isinstance(params, Params):
        return params
    if isinstance(params, (str, Path)):
        return load_params(params)
    if params is None:
        return load_params("params.yaml") if Path("params.yaml").is_file() else params_from_dict({})
    return params_from_dict(params)


def pinned_params(model_name: str, version: str | int, params: ParamsLike = None) -> Params:
    """``params`` with the model pinned to ``models:/model_name/version``."""
    p = _as_params(params)
    model = {**p.model.model_dump(), "name": model_name, "version": int(version), "alias": None}
    return p.replace(model=model)


@flow(name=FLOW_NAME, validate_parameters=False, persist_result=False)
def influence_for_model(
    model_name: str,
    version: str,
    params: dict[str, Any] | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """The influence flow for one model version, with JSON parameters (what deployments take).

    Args:
        params: params.yaml as a mapping (None: all defaults); the model section is overridden.
        root: directory that relative paths in ``params`` resolve against (default: cwd).
    """
    base = params_from_dict(params or {}, root=root)
    return run_influence(pinned_params(model_name, version, base)).to_dict()


def _deployment_exists(name: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def quiet_prefect(verbose: bool = False) -> Iterator[None]:
    """Prefect's INFO lines and failure tracebacks off for the duration (restored after): in a
    user's training script mirrorinf speaks through its own ``mirrorinf`` logger and, on
    failure, the exception it raises."""
    names = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.events")
    saved = {name: logging.getLogger(name).level for name in names}
    if not verbose:
        for name in names:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def trigger(
    model_name: str,
    version: str | int,
    params: ParamsLike = None,
    *,
    deployment: str = f"{FLOW_NAME}/{DEPLOYMENT}",
    verbose: bool = False,
) -> InfluenceResult | UUID:
    """Score influence for ``models:/model_name/version``; call it at the end of training.

    With a Prefect API configured (``PREFECT_API_URL``) and the deployment ``deployment``
    present (``mirrorinf serve``), a run is submitted to it and its flow-run id returned at once.
    Otherwise the flow runs here and its :class:`InfluenceResult` is returned.

    Args:
        params: a Params, a params YAML path, a mapping of params.yaml sections, or None
            (./params.yaml when present, else defaults). The model section is overridden.
        verbose: let Prefect print its flow and task lines (off: a training script's output
            stays its own; results and failures come back as the return value / exception).
    """
    with quiet_prefect(verbose):
        return _trigger(model_name, version, params, deployment)


def _trigger(
    model_name: str, version: str | int, params: ParamsLike, deployment: str
) -> InfluenceResult | UUID:
    pinned = pinned_params(model_name, version, params)
    if prefect_api_configured() and _deployment_exists(deployment):
        from prefect.deployments import run_deployment

        run = run_deployment(
            deployment,
            parameters={
                "model_name": model_name,
                "version": str(version),
                "params": pinned.model_dump(mode="json"),
                "root": str(pinned.root),
            },
            timeout=0,
            as_subflow=False,
        )
        logger.info("submitted %s v%s to %s: flow run %s", model_name, version, deployment, run.id)
        return run.id
    from mirrorinf.tasks.checks import preload_gx
    from mirrorinf.tasks.server import prefect_api

    # a temporary API, if none is configured, dies with this process; GX imports meanwhile
    with prefect_api(while_starting=preload_gx()):
        return run_influence(pinned)


def model_registered_trigger(model_name: str | None = None) -> DeploymentEventTrigger:
    """An event trigger on ``mirrorinf.model.registered`` (of one model name, or any)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    pattern = f"mlflow.model.{model_name}.*" if model_name else "mlflow.model.*"
    return DeploymentEventTrigger(
        name=f"{MODEL_REGISTERED} -> influence",
        expect={MODEL_REGISTERED},
        match={"prefect.resource.id": pattern},
        parameters={
            "model_name": "{{ event.resource['mlflow.model.name'] }}",
            "version": "{{ event.resource['mlflow.model.version'] }}",
        },
    )


def build_deployment(
    params: Params, *, name: str = DEPLOYMENT, model_name: str | None = None
) -> RunnerDeployment:
    """A deployment of :func:`influence_for_model` with the event trigger and ``params``."""
    from prefect.deployments.runner import EntrypointType

    return influence_for_model.to_deployment(
        name=name,
        parameters={"params": params.model_dump(mode="json"), "root": str(params.root)},
        triggers=[model_registered_trigger(model_name)],
        description="mirrorinf influence for each registered model version "
        f"(event {MODEL_REGISTERED})",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve(params: Params, *, name: str = DEPLOYMENT, model_name: str | None = None) -> None:
    """Serve the deployment (blocks): runs the flow for each model-registered event."""
    from prefect import serve as prefect_serve

    if not prefect_api_configured():
        logger.warning(
            "PREFECT_API_URL is not set: serving on a temporary API that nothing else can reach; "
            "start `prefect server start` and export PREFECT_API_URL"
        )
    prefect_serve(build_deployment(params, name=name, model_name=model_name))
