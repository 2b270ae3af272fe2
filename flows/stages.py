"""DVC stage entry points: ``python -m mirrorinf.flows.stages prepare|train|influence``.

- prepare: write the embedded demo (data/demo/*.npz + ground_truth.json) when data.source=demo.
- train: train + register the demo model (or resolve the configured version) and write
  ``outputs/model.json`` (name, version, training run), the dependency of the next stage.
- influence: run the influence flow on that version; write ``outputs/influence.json``.

prepare and train call the task functions directly (no Prefect server: fast); influence runs
the Prefect flow. Exit codes as the CLI: 0 ok, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mirrorinf.tasks.env import set_tool_env

if TYPE_CHECKING:
    from mirrorinf.params import Params
    from mirrorinf.tasks.data import Split

__all__ = ["main"]

logger = logging.getLogger(__name__)

MODEL_JSON = "outputs/model.json"
INFLUENCE_JSON = "outputs/influence.json"


def _prepare(params: Params) -> None:
    from mirrorinf.tasks.data import prepare_demo

    if params.data.source != "demo":
        print(f"prepare: data.source is {params.data.source!r}; nothing to prepare")
        return
    path = prepare_demo(
        params.demo.model_dump(),
        params.resolve(params.data.train),
        params.resolve(params.data.val),
        params.resolve(params.data.query),
    )
    print(f"prepare: demo data in {path.parent}")


def _train(params: Params) -> None:
    from mirrorinf.tasks.data import load_dataset, write_json
    from mirrorinf.tasks.model import load_registered_model, train_and_register

    uri = params.tracking_uri()
    if params.model.train_demo:
        d = params.data
        kind = "dvc" if d.source == "dvc" else "file"
        kwargs = {"source": kind, "rev": d.rev, **d.reader()}
        if kind == "dvc":
            kwargs["repo"] = str(params.resolve(d.repo))

        def load(path: str, name: str) -> Split:
            target = path if kind == "dvc" else str(params.resolve(path))
            return load_dataset(target, name=name, display_path=path, **kwargs)

        ref = train_and_register(
            load(d.train, "train"),
            load(d.val, "val"),
            name=params.model.name,
            train_params=params.model.train.model_dump(),
            tracking_uri=uri,
            experiment=params.mlflow.experiment,
            artifact_location=params.artifact_location(),
        )
    else:
        _, ref = load_registered_model(
            params.model.name,
            params.model.version,
            params.model.alias,
            tracking_uri=uri,
            allow_pickle=params.model.allow_pickle,
        )
    # only what pins the version (not "reused"), so an unchanged model keeps the same md5
    pinned = {k: v for k, v in ref.to_dict().items() if k != "reused"}
    write_json(params.resolve(MODEL_JSON), pinned)
    print(f"train: {ref.uri} ({'reused' if ref.reused else 'ready'})")


def _influence(params: Params) -> None:
    import json

    from mirrorinf.errors import InputError
    from mirrorinf.tasks.data import write_json

    model_json = params.resolve(MODEL_JSON)
    if not model_json.is_file():
        raise InputError(f"{MODEL_JSON} not found: run the train stage first")
    ref = json.loads(model_json.read_text())
    pinned = params.replace(model={**params.model.model_dump(), "version": ref["version"],
                                   "alias": None})  # fmt: skip
    from mirrorinf.flows.influence import run_influence

    result = run_influence(pinned)
    metrics = {  # compact for `dvc metrics show`; the full summary is in the MLflow run
        "gate_passed": result.passed,
        "model_version": int(ref["version"]),
        **result.summary.get("counts", {}),
        **{f"truth_{k}": v for k, v in (result.summary.get("truth") or {}).items()},
    }
    write_json(params.resolve(INFLUENCE_JSON), metrics)
    print(f"influence: {ref['name']} v{ref['version']} gate {result.verdict} (run {result.run_id})")


STAGES = {"prepare": _prepare, "train": _train, "influence": _influence}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mirrorinf.flows.stages", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    path = Path(args.params)
    if not args.debug:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    set_tool_env(path.resolve().parent if path.is_file() else Path.cwd())
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    logging.getLogger("mirrorinf").setLevel(logging.DEBUG if args.debug else logging.INFO)

    from mirrorinf.errors import InputError
    from mirrorinf.params import load_params

    try:
        STAGES[args.stage](load_params(path))
    except InputError as err:
        if args.debug:
            raise
        print(f"{args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
