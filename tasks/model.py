"""Models in the MLflow registry: train + register the demo model, load a version as torch.

Safe by default, no unpickling of arbitrary code:

- mirrorinf's own format: ``mirrorinf_model.json`` (architecture name and constructor arguments
  from :data:`mirrorinf.demo.ARCHITECTURES`) and ``state_dict.pt`` (tensors only, loaded with
  ``torch.load(weights_only=True)``);
- ``mlflow.pytorch`` models in MLflow's ``pt2`` format (``torch.export``; MLflow 3's default):
  a traced graph plus weights, loaded with :func:`torch.export.load`, which runs no pickled code;
- ``mlflow.pytorch`` models in ``pickle`` format only with ``allow_pickle=True``
  (``model.allow_pickle`` in params, ``--allow-pickle`` on the CLI): unpickling runs whatever
  code the file names, so a tampered artifact store becomes code execution on this machine.
- ``mlflow.transformers`` models (safetensors weights, a class transformers ships, never
  remote code; the tokenizer kept for the review): :mod:`mirrorinf.tasks.hf_model`.

The training run records the data it trained on (tags ``mirrorinf.data.<set>.*``: path, rev,
commit, md5), so the influence flow can score on exactly that data. The demo model is reused,
not retrained, when a version with the same training key (data md5 + training params) exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from mirrorinf.demo import build_model, model_spec, train_demo_model
from mirrorinf.engine import Inputs, OutputSpec, select_output
from mirrorinf.engine.examples import describe, each, parts, rows
from mirrorinf.engine.inputs import kind_problem
from mirrorinf.errors import DataError, InputError, ModelError
from mirrorinf.params import TaskParams
from mirrorinf.tasks.data import Split, check_labels, retry_unless_input_error
from mirrorinf.tasks.events import emit_model_registered
from mirrorinf.tasks.hf_model import tokenizer_of
from mirrorinf.tasks.tracking import ensure_experiment, get_client, mlflow_run, provenance_tags
from mirrorinf.usercode import load_callable

__all__ = [
    "ModelRef",
    "call_model",
    "check_fit",
    "load_model_uri",
    "load_registered_model",
    "load_registered_model_task",
    "output_size",
    "predict_labels",
    "tokenizer_of",
    "train_and_register",
    "train_and_register_task",
]

logger = logging.getLogger(__name__)

SPEC_FILE = "mirrorinf_model.json"
WEIGHTS_FILE = "state_dict.pt"
FORMAT = "mirrorinf-state-dict/1"
TRAIN_KEY_TAG = "mirrorinf.train_key"


@dataclass(frozen=True)
class ModelRef:
    """A registered model version and what trained it.

    Attributes:
        training_data: {set name: provenance dict} read from the training run's tags (empty
            when the version was registered by something else).
        reused: True when an existing version was reused instead of training a new one.
    """

    name: str
    version: str
    run_id: str | None
    source: str
    training_data: dict[str, dict[str, str]] = field(default_factory=dict)
    reused: bool = False

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "uri": self.uri,
            "source": self.source,
            "training_data": self.training_data,
            "reused": self.reused,
        }


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _training_data(client: Any, run_id: str | None) -> dict[str, dict[str, str]]:
    """{set: {field: value}} from a training run's ``mirrorinf.data.<set>.<field>`` tags."""
    if not run_id:
        return {}
    try:
        tags = client.get_run(run_id).data.tags
    except Exception as err:  # the run may be gone; the model is still usable
        logger.warning("cannot read training run %s: %s", run_id, err)
        return {}
    out: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["mirrorinf", "data"]:
            out.setdefault(parts[2], {})[parts[3]] = value
    return out


def _ref(client: Any, mv: Any, reused: bool = False) -> ModelRef:
    return ModelRef(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        source=mv.source,
        training_data=_training_data(client, mv.run_id),
        reused=reused,
    )


def train_key(train: Split, train_params: dict[str, Any]) -> str:
    """Identity of a demo training: training data md5 + training params."""
    blob = json.dumps({"data": train.provenance.md5, "train": train_params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _find_by_train_key(client: Any, name: str, key: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tag.`{TRAIN_KEY_TAG}`='{key}'")
    except MlflowException as err:
        if _not_found(err):
            return None
        raise
    ready = [mv for mv in found if mv.status == "READY"]
    return max(ready, key=lambda mv: int(mv.version)) if ready else None


def save_model_dir(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write the no-pickle format (spec JSON + state_dict) of a model from ARCHITECTURES."""
    spec = model_spec(model)
    if spec is None:
        raise ModelError(
            f"{type(model).__name__} is not a registered architecture; "
            "log it with mlflow.pytorch instead"
        )
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / SPEC_FILE).write_text(json.dumps({"format": FORMAT, "spec": spec}, indent=2))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / WEIGHTS_FILE)
    return d


def train_and_register(
    train: Split,
    val: Split | None,
    *,
    name: str,
    train_params: dict[str, Any],
    tracking_uri: str,
    experiment: str,
    artifact_location: str | None = None,
) -> ModelRef:
    """Train the demo MLP on ``train`` and register it as a new version of ``name``.

    Reuses the newest version with the same training key instead of training again. The
    training run records the data provenance (path, rev, md5) and training metrics; it is
    marked FAILED if anything goes wrong, and by the next training or influence run if this
    process is killed (owner tags, as on influence runs).
    """
    first = train.read(0, 1)
    if isinstance(first, dict) or first.ndim != 2 or not first.is_floating_point():
        got = (
            f"named inputs {list(first)}"
            if isinstance(first, dict)
            else f"{str(first.dtype).removeprefix('torch.')} rows of shape {tuple(first.shape[1:])}"
        )
        raise DataError(
            f"train set {train.provenance.path!r}: the demo MLP (trained when model.version and "
            f"model.alias are null) takes real-valued features x [n, d], got {got}; save x as "
            "float32 [n, d], or register your own model and set model.version"
        )
    client = get_client(tracking_uri)
    key = train_key(train, train_params)
    existing = _find_by_train_key(client, name, key)
    if existing is not None:
        logger.info("reusing %s v%s (same data and training params)", name, existing.version)
        return _ref(client, existing, reused=True)

    from mirrorinf.tasks.verdict import owner_tags, reap_dead_runs  # verdict imports tracking

    exp_id = ensure_experiment(client, experiment, artifact_location)
    # a training run killed mid-way stays RUNNING in MLflow: the next one marks it FAILED
    reap_dead_runs(client, exp_id, by=f"a training run of {name}")
    datasets = {"train": train.provenance}
    if val is not None:
        datasets["val"] = val.provenance
    tags = {
        "mirrorinf.kind": "train",
        TRAIN_KEY_TAG: key,
        **provenance_tags(datasets),
        **owner_tags(),
    }
    with mlflow_run(client, exp_id, run_name=f"train-{name}", tags=tags) as run_id:
        from mlflow.entities import Metric, Param

        model, info = train_demo_model(train.x, train.y, **train_params)
        if val is not None:
            with torch.no_grad():
                info["val_accuracy"] = float((model(val.x).argmax(1) == val.y).float().mean())
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in sorted(train_params.items())],
            metrics=[Metric(k, float(v), 0, 0) for k, v in info.items()],
        )
        with tempfile.TemporaryDirectory(prefix="mirrorinf-model-") as tmp:
            save_model_dir(model, Path(tmp) / "model")
            client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
        artifact_uri = client.get_run(run_id).info.artifact_uri
        try:
            client.create_registered_model(name)
        except Exception as err:
            if "already exists" not in str(err).lower() and "ALREADY_EXISTS" not in str(
                getattr(err, "error_code", "")
            ):
                raise
        mv = client.create_model_version(
            name, source=f"{artifact_uri}/model", run_id=run_id, tags={TRAIN_KEY_TAG: key}
        )
    logger.info("registered %s v%s (train acc %.3f)", name, mv.version, info["train_accuracy"])
    emit_model_registered(name, mv.version)  # best effort; a served deployment reacts to it
    return _ref(client, mv)


def _resolve_version(client: Any, name: str, version: Any, alias: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        # a missing alias is INVALID_PARAMETER_VALUE, not RESOURCE_DOES_NOT_EXIST, in MLflow 3
        if not (_not_found(err) or (alias is not None and "not found" in str(err).lower())):
            raise
    try:
        versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        versions = []
    if not versions:
        raise ModelError(f"registered model {name!r} not found (or it has no versions)") from None
    what = f"alias {alias!r}" if alias is not None else f"version {version}"
    raise ModelError(
        f"registered model {name!r} has no {what} (versions: {', '.join(map(str, versions))})"
    ) from None


def _load_dir(local: Path, what: str) -> torch.nn.Module:
    spec_path = local / SPEC_FILE
    if spec_path.is_file():
        try:
            meta = json.loads(spec_path.read_text())
            model = build_model(meta["spec"])
            state = torch.load(local / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise ModelError(f"{what}: cannot rebuild the model: {err}") from None
        return model.eval()
    raise ModelError(f"{what}: no {SPEC_FILE} found and not an MLflow pytorch model")


class ExportedModel(torch.nn.Module):
    """A ``torch.export`` graph as an ordinary module (the graph itself refuses ``.eval()``).

    The graph was traced in the mode the model had when it was logged (normally eval), so
    ``train()``/``eval()`` only flip the flag here and never reach the graph. A graph of several
    inputs takes them positionally; ``input_names`` (the names of its logged MLflow signature,
    in order) lets it take them by name, as every model gets several named inputs.
    """

    def __init__(self, graph: torch.nn.Module, input_names: list[str] | None = None) -> None:
        super().__init__()
        self.graph = graph
        self.input_names = input_names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs and not args and self.input_names:
            if set(kwargs) != set(self.input_names):
                raise TypeError(
                    f"the model takes the inputs {self.input_names} (its logged MLflow "
                    f"signature, in that order) but the data has {sorted(kwargs)}: name the "
                    "arrays x_<input name>"
                )
            return self.graph(*(kwargs[n] for n in self.input_names))
        return self.graph(*args, **kwargs)

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self


def _signature_inputs(meta: dict[str, Any]) -> list[str] | None:
    """The input names of a logged MLflow signature, in order (None: unnamed or none)."""
    try:
        inputs = json.loads((meta.get("signature") or {}).get("inputs") or "[]")
        names = [str(spec["name"]) for spec in inputs]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return names if len(names) > 1 else None


def _pt2_pickle_payload(path: Path) -> str | None:
    """What in a pt2 archive would be unpickled on load (None: plain tensors and JSON only).

    torch.export.load unpickles weights or constants marked ``use_pickle``, custom and opaque
    objects, and retries sample inputs with weights-only loading switched off; each is checked
    here first.
    """
    import io
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith((".so", ".cpp", ".pyd", ".dll")):
                    return f"compiled code ({name})"
                base = name.rsplit("/", 1)[-1]
                if base.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                            ("weight_", "tensor_")
                        ):
                            return f"a pickled object ({fqn})"
                elif "/sample_inputs/" in name:
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except Exception:
                        return f"pickled sample inputs ({name})"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable pt2 archive: {err}") from None
    return None


def _mlflow_model(local: Path, what: str, allow_pickle: bool) -> torch.nn.Module:
    """An MLflow model: the ``pytorch`` flavour (pt2; pickle only when allowed) or the
    ``transformers`` flavour (safetensors, no remote code: :mod:`mirrorinf.tasks.hf_model`)."""
    import yaml

    try:
        meta = yaml.safe_load((local / "MLmodel").read_text())
        flavors = meta["flavors"]
    except (KeyError, TypeError, yaml.YAMLError) as err:
        raise ModelError(f"{what}: not a readable MLflow model (MLmodel: {err})") from None
    if isinstance(flavors, dict) and "pytorch" not in flavors and "transformers" in flavors:
        from mirrorinf.tasks.hf_model import load_transformers

        return load_transformers(local, flavors["transformers"], what, allow_pickle)
    if not isinstance(flavors, dict) or "pytorch" not in flavors:
        found = ", ".join(flavors) if isinstance(flavors, dict) else "none"
        raise ModelError(
            f"{what}: MLflow flavour(s) {found}; mirrorinf reads mlflow.pytorch and "
            "mlflow.transformers models"
        )
    flavor = flavors["pytorch"]
    data = local / str(flavor.get("model_data", "data"))
    exported = data / "model.pt2"
    if exported.is_file():
        unsafe = None if allow_pickle else _pt2_pickle_payload(exported)
        if unsafe is not None:
            raise ModelError(
                f"{what}: its pt2 archive holds {unsafe}, which loads by unpickling and so can "
                "run arbitrary code; if you trust the model store set model.allow_pickle: true "
                "in params.yaml (--allow-pickle for mirrorinf score)"
            )
        try:
            program = torch.export.load(str(exported))
        except Exception as err:  # corrupt archive or a torch too old for it
            raise ModelError(f"{what}: cannot load the pt2 model: {err}") from None
        return ExportedModel(program.module(), _signature_inputs(meta)).eval()
    if not allow_pickle:
        raise ModelError(
            f"{what} was logged with pickle serialization; loading it unpickles and so runs "
            "whatever code the file contains. Re-log it with mlflow.pytorch.log_model(..., "
            "serialization_format='pt2', input_example=...), or if you trust the model store "
            "set model.allow_pickle: true in params.yaml (--allow-pickle for mirrorinf score)"
        )
    logger.warning("%s: loading a pickled model (model.allow_pickle is true)", what)
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(str(local), map_location="cpu").eval()
    except Exception as err:
        raise ModelError(f"{what}: cannot unpickle the model: {err}") from None


def _load_source(client: Any, uri: str, what: str, allow_pickle: bool = False) -> torch.nn.Module:
    """Download a model's artifacts and rebuild it (mirrorinf format, else an MLflow model)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="mirrorinf-load-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=tmp, tracking_uri=client.tracking_uri
                )
            )
        except Exception as err:
            raise ModelError(f"{what}: cannot download model artifacts: {err}") from None
        if (local / SPEC_FILE).is_file():
            return _load_dir(local, what)
        if (local / "MLmodel").is_file():
            return _mlflow_model(local, what, allow_pickle)
        raise ModelError(f"{what}: artifacts have neither {SPEC_FILE} nor an MLmodel file")


def load_registered_model(
    name: str,
    version: Any = None,
    alias: str | None = None,
    *,
    tracking_uri: str,
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, ModelRef]:
    """Load ``models:/name/version`` (or ``@alias``) as a torch module in eval mode.

    Pickled ``mlflow.pytorch`` models are refused unless ``allow_pickle`` (see the module doc).

    Raises:
        ModelError: unknown model, version or alias (listing the versions there are), or
            artifacts that cannot be rebuilt.
    """
    if (version is None) == (alias is None):
        raise ModelError("give exactly one of a model version or alias")
    client = get_client(tracking_uri)
    mv = _resolve_version(client, name, version, alias)
    ref = _ref(client, mv)
    # MLflow 3 versions have sources like models:/m-<id>, which mlflow resolves through the
    # *global* tracking URI; the registry's download URI is the artifact location itself
    source = mv.source
    if source.startswith("models:/"):
        source = client.get_model_version_download_uri(mv.name, mv.version)
    return _load_source(client, source, ref.uri, allow_pickle), ref


def load_model_uri(
    uri: str, *, tracking_uri: str, allow_pickle: bool = False
) -> tuple[torch.nn.Module, ModelRef | None]:
    """Load ``models:/name/version``, ``models:/name@alias`` or a local model directory."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        name, at, alias = rest.partition("@")
        if at:
            if not name or not alias or "/" in alias:
                raise ModelError(
                    f"bad model URI {uri!r}: use models:/NAME/VERSION or models:/NAME@ALIAS"
                )
            return load_registered_model(
                name, alias=alias, tracking_uri=tracking_uri, allow_pickle=allow_pickle
            )
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise ModelError(
                f"bad model URI {uri!r}: use models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        return load_registered_model(
            name, version=version, tracking_uri=tracking_uri, allow_pickle=allow_pickle
        )
    local = Path(uri)
    if local.is_dir():
        if (local / "MLmodel").is_file():
            return _mlflow_model(local, uri, allow_pickle), None
        return _load_dir(local, uri), None
    raise ModelError(f"model not found: {uri!r} (use models:/NAME/VERSION or a model directory)")


def call_model(model: torch.nn.Module, x: Inputs, output: OutputSpec = None) -> torch.Tensor:
    """The model's prediction on ``x`` (named inputs as keyword arguments; ``output`` picks the
    prediction out of a tuple, dict or output object, as ``task.output`` says)."""
    raw = model(**x) if isinstance(x, dict) else model(x)
    return select_output(raw, output)


def _run_head(
    model: torch.nn.Module, x: Inputs, output: OutputSpec, n: int, total: int | None = None
) -> torch.Tensor:
    """The prediction on the first ``n`` examples; ModelError when the model cannot run.
    ``total``: the split's number of rows when ``x`` holds only its first rows (messages)."""
    head = rows(x, slice(0, n))
    if total is not None:  # describe the whole split, not the rows read
        x = each(x, lambda v: torch.empty((total, *v.shape[1:]), dtype=v.dtype, device="meta"))
    try:
        with torch.no_grad():
            return call_model(model, head, output)
    except ValueError as err:  # task.output does not fit the model's output
        raise ModelError(str(err)) from None
    # e.g. a feature-count mismatch; a pt2 graph's shape guard raises AssertionError
    except (RuntimeError, TypeError, IndexError, AssertionError) as err:
        shown = describe(x).replace(" torch.float32", "") if not isinstance(x, dict) else None
        what = f"x {shown}" if shown else describe(x)
        hint = ""
        if any(not v.is_floating_point() for v in parts(x)):
            hint = (
                "; x is an integer array, which is passed as integers (token ids): if the model "
                "takes real-valued features, save x as float (x.astype('float32'))"
            )
        raise ModelError(f"the model cannot run on the data ({what}): {err}{hint}") from None


def output_size(
    model: torch.nn.Module, x: Inputs, output: OutputSpec = None, total: int | None = None
) -> int:
    """Number of model outputs (classes), from one forward pass on the first example."""
    out = _run_head(model, x, output, 1, total)
    if out.ndim != 2:
        raise ModelError(
            f"the model returns shape {tuple(out.shape)}; expected [n, n_classes] for "
            "task.kind: classification (set task.kind to what the model was trained for)"
        )
    return int(out.shape[1])


def check_fit(model: torch.nn.Module, splits: list[Split], task: TaskParams) -> None:
    """Before any scoring: the model runs on every split and its outputs fit the targets and
    the task kind (DataError naming the kind that would fit). A user's own loss (task.loss)
    owns its targets: then only that the model runs."""
    if task.kind == "classification" and task.loss is None:
        first = splits[0]
        n_classes = output_size(model, first.read(0, 1), task.output, len(first))
        for data in splits:
            check_labels(data, n_classes)
    loss_fn = load_callable(task.loss, "task.loss") if task.loss else None
    for data in splits:
        out = _run_head(model, data.read(0, 64), task.output, 64, len(data))
        if loss_fn is not None:
            _check_loss(loss_fn, str(task.loss), out, data.y[:64], data)
            continue
        problem = kind_problem(task.kind, out.double(), data.y[:64])
        if problem is not None:
            raise DataError(f"{data.name} set {data.provenance.path!r}: {problem}")


def _check_loss(loss_fn: Any, spec: str, out: torch.Tensor, y: torch.Tensor, data: Split) -> None:
    """InputError (exit 2) unless the user's loss, called as the engine calls it on the
    model's outputs for the first rows of ``data``, gives one finite loss per row: a loss that
    raised, reduced to a scalar or gave NaN was a traceback (exit 3) or a message about
    overflowing inputs."""
    n = len(out)
    rows_of = f"the first {n} rows of the {data.name} set {data.provenance.path!r}"
    try:
        with torch.no_grad():
            got = loss_fn(out, y)
    except Exception as err:
        raise InputError(
            f"task.loss {spec!r} failed on the model's outputs for {rows_of}: "
            f"{type(err).__name__}: {err}; it is called as loss(outputs, targets) and returns "
            "one loss per example"
        ) from None
    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
    if shape != (n,):
        raise InputError(
            f"task.loss {spec!r} must return one loss per example (shape ({n},) for {n} rows), "
            f"got {shape} on {rows_of}; use reduction='none'"
        )
    bad = int((~torch.isfinite(got)).sum())
    if bad:
        raise InputError(
            f"task.loss {spec!r} returned NaN or inf for {bad} of {rows_of} at the trained "
            "model; a loss must be finite where the model was trained"
        )


train_and_register_task = task(
    train_and_register,
    name="train-register-demo-model",
    retries=1,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)
load_registered_model_task = task(
    load_registered_model,
    name="load-model",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=retry_unless_input_error,
    cache_policy=NO_CACHE,
    persist_result=False,
)


def _prediction(out: torch.Tensor, kind: str) -> torch.Tensor:
    """What the model predicts for each example, per task kind (see predict_labels)."""
    n = len(out)
    if kind == "binary":
        return (out.reshape(n) > 0).long()
    if kind == "multilabel":
        return (out.reshape(n, -1) > 0).long()
    if kind == "regression":
        flat = out.reshape(n, -1).float()
        return flat[:, 0] if flat.shape[1] == 1 else flat
    return out.argmax(dim=-1)


def predict_labels(
    model: torch.nn.Module, data: Split, batch: int = 4096, task: TaskParams | None = None
) -> np.ndarray | None:
    """The model's prediction for every example, in file order, per task kind:
    classification the argmax class; binary logit > 0; multilabel each label's logit > 0
    ([n, L]); regression the predicted value(s); sequence the most likely token per position
    ([n, T]: for a causal LM the predicted next tokens)."""
    task = task or TaskParams()
    if task.kind == "sequence":
        batch = min(batch, 16)  # [batch, T, vocabulary] logits
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None  # filled batch by batch: no list of batches and second copy
    try:
        with torch.inference_mode():
            for i in range(0, len(data), batch):
                part = _prediction(call_model(model, data.read(i, i + batch), task.output),
                                   task.kind).cpu().numpy()  # fmt: skip
                if out is None:
                    out = np.empty((len(data), *part.shape[1:]), dtype=part.dtype)
                out[i : i + len(part)] = part
    finally:
        model.train(was_training)
    return out if out is not None else np.zeros(0, dtype=np.int64)
