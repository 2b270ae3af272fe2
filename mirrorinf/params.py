"""One typed, validated model of params.yaml: every knob of the pipeline.

DVC reads params.yaml for stage dependencies; the flows read it through :func:`load_params`.
Every section forbids unknown keys, so a typo is an error naming the key path instead of a
silently ignored setting. Relative paths are resolved against the directory of the params file
(the project root), so the pipeline behaves the same from any working directory.

Pure pydantic + yaml: no orchestration imports here.
"""

from __future__ import annotations

import difflib
import errno
import os
import posixpath
import re
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mirrorinf.engine import ForwardInfConfig
from mirrorinf.errors import ParamsError
from mirrorinf.summary import GateThresholds

__all__ = [
    "DataParams",
    "DemoParams",
    "GateParams",
    "MlflowParams",
    "ModelParams",
    "Params",
    "ParamsError",
    "QueryParams",
    "TaskParams",
    "TrainParams",
    "check_alias",
    "check_model_name",
    "load_params",
    "params_from_dict",
]

N_DIGITS = 1797  # rows in scikit-learn's bundled digits data set (the demo's source)
MAX_SHOWN = 200  # characters of a bad value shown in an error message
MAX_NAME = 256  # MLflow's registered model name column
_ALIAS = re.compile(r"^[\w\-]+$")  # MLflow 3's alias rule


def shown(value: Any) -> str:
    """A bounded repr of a bad value for an error message (never the whole of a huge value)."""
    short = reprlib.Repr()  # walks only the first few items and levels of a container
    short.maxstring = short.maxother = MAX_SHOWN
    text = short.repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def has_uri_scheme(location: str) -> bool:
    """``s3://b``, ``mlflow-artifacts:/x``, ``file:/p`` yes; ``mlruns/a``, ``C:\\a`` no."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", location) is not None


def check_model_name(name: str) -> str:
    """``name`` if MLflow 3 accepts it as a registered model name, else ValueError saying why
    (MLflow refuses '/' and ':' and names that change as paths, e.g. '.', 'a/../b')."""
    if not name.strip():
        raise ValueError("a registered model name cannot be empty")
    bad = "'/' or ':'" if ("/" in name or ":" in name) else None
    if bad is None and (posixpath.normpath(name) != name or name in (".", "..")):
        bad = "a name that changes as a path ('.', '..')"
    if bad is None and (len(name) > MAX_NAME or not name.isprintable()):
        bad = f"more than {MAX_NAME} characters or control characters"
    if bad:
        raise ValueError(
            f"registered model name {shown(name)} is not valid in MLflow: it cannot contain "
            f"{bad}; use letters, digits, '.', '_' or '-' (e.g. {_suggest(name)!r})"
        )
    return name


def check_alias(alias: str) -> str:
    """``alias`` if MLflow 3 accepts it (letters, digits, '_', '-'; not 'latest' or 'v<N>')."""
    if not _ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(
            f"alias {shown(alias)} is not valid in MLflow: use letters, digits, '_' and '-' "
            "(not 'latest' or 'v<number>', which MLflow reserves)"
        )
    return alias


def _suggest(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "-", name).strip("-.")[:MAX_NAME] or "my-model"


def _engine_config(value: Any) -> ForwardInfConfig:
    """params.yaml's ``influence`` mapping -> the engine's validated config (once, here)."""
    if isinstance(value, ForwardInfConfig):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of ForwardInfConfig fields, got {shown(value)}")
    return ForwardInfConfig.from_dict(value)


# the engine's config object itself travels through flows and tasks; YAML/JSON see its dict
EngineConfig = Annotated[
    ForwardInfConfig,
    PlainValidator(_engine_config),
    PlainSerializer(lambda cfg: cfg.to_dict(), return_type=dict),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageParams(_Section):
    """How an image folder's files become tensors (data.format: images)."""

    mode: Literal["RGB", "L"] = Field(
        "RGB", description="Decode to RGB (3 channels) or L (grayscale, 1 channel)."
    )
    size: list[Annotated[int, Field(ge=1)]] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="[height, width] to resize every image to (bilinear). null: keep the "
        "files' size, which must then be the same for all.",
    )
    mean: list[float] | None = Field(
        None,
        description="Per-channel mean subtracted after scaling pixels to [0, 1]. null: none "
        "(pixels stay in [0, 1]: no normalisation beyond /255).",
    )
    std: list[Annotated[float, Field(gt=0)]] | None = Field(
        None, description="Per-channel std divided by after the mean. null: none."
    )


class ColumnParams(_Section):
    """Columns of a HuggingFace datasets folder (data.format: hf)."""

    inputs: list[str] = Field(
        ["x"],
        min_length=1,
        description="Input column(s). One: the model's x; several: named inputs passed by name "
        "(e.g. [input_ids, attention_mask]), like x_<name> arrays in an .npz.",
    )
    label: str | None = Field(None, description="Label column. null: data.label_column.")
    id: str | None = Field(None, description="Id column shown in the review. null: row positions.")


class DataParams(_Section):
    """Where the training, validation and query sets come from."""

    source: Literal["demo", "dvc", "file"] = Field(
        "demo",
        description="demo: build the embedded digits demo at the paths below; dvc: read the paths "
        "from the DVC repo `repo` at revision `rev`; file: read plain local files.",
    )
    repo: str = Field(".", description="DVC repository (local path or git URL); source=dvc only.")
    rev: str | None = Field(
        None,
        description="Git revision for source=dvc. null = the revision recorded on the model's "
        "training run, else the workspace.",
    )
    train: str = Field("data/demo/train.npz", description="Training set (.npz or .parquet).")
    val: str = Field("data/demo/val.npz", description="Validation set (group influence).")
    query: str = Field("data/demo/query.npz", description="Query set (pairwise influence).")
    label_column: str = Field(
        "label", description="Label column of parquet files (and of datasets folders)."
    )
    format: Literal["auto", "npz", "parquet", "images", "hf"] = Field(
        "auto",
        description="auto: from the path (.npz; .parquet/.pq; a folder with dataset_info.json "
        "or state.json = HuggingFace datasets save_to_disk folder; a folder of class subfolders "
        "holding .png/.jpg/.jpeg = image folder), or one of npz, parquet, images, hf.",
    )
    image: ImageParams = Field(default_factory=ImageParams)
    columns: ColumnParams = Field(default_factory=ColumnParams)
    factory: str | None = Field(
        None,
        description='"package.module:function" returning a map-style torch Dataset for a split '
        "name (called as f('train'), f('val'), f('query')); items (x, y), (x, y, id) or dicts "
        "with keys x, y, id. Runs your own code; the paths are then not read. Needs "
        "source: file.",
    )
    ground_truth: str | None = Field(
        None,
        description="Optional JSON with planted flipped ids / leak pairs (the demo writes "
        "data/demo/ground_truth.json and uses it automatically).",
    )

    @model_validator(mode="after")
    def _factory_source(self) -> DataParams:
        if self.factory is not None and self.source != "file":
            raise ValueError(
                f"data.factory reads the data itself; set data.source: file (not {self.source})"
            )
        return self

    def reader(self) -> dict[str, Any]:
        """How to read each split: the keyword arguments of ``tasks.data.load_dataset``."""
        return {
            "label_column": self.label_column,
            "fmt": self.format,
            "image": self.image.model_dump(),
            "columns": self.columns.model_dump(),
            "factory": self.factory,
        }


class DemoParams(_Section):
    """The embedded demo: scikit-learn digits with planted label noise and leaks."""

    n_train: int = Field(800, ge=50)
    n_val: int = Field(200, ge=10)
    n_query: int = Field(40, ge=1, description="Query points, leaks included.")
    flip_fraction: float = Field(0.1, ge=0, le=0.5, description="Training labels flipped.")
    n_leaks: int = Field(5, ge=0, description="Queries that are exact copies of training images.")
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> DemoParams:
        if self.n_leaks > self.n_query:
            raise ValueError(f"n_leaks ({self.n_leaks}) must be <= n_query ({self.n_query})")
        need = self.n_train + self.n_val + self.n_query - self.n_leaks
        if need > N_DIGITS:
            raise ValueError(
                f"n_train + n_val + n_query - n_leaks = {need} exceeds the {N_DIGITS} digits images"
            )
        return self


class TrainParams(_Section):
    """Training of the demo MLP (used when no model version or alias is given)."""

    hidden: int = Field(64, ge=1, description="Hidden units of the one-hidden-layer MLP.")
    epochs: int = Field(150, ge=1, description="Full-batch Adam steps.")
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(0.01, ge=0, description="Adam L2; keeps flipped labels unfit.")
    seed: int = 0


class ModelParams(_Section):
    """Which registered model to analyse; with no version and no alias, train the demo MLP."""

    name: str = Field("mirrorinf-demo", min_length=1, description="Registered model name.")
    version: int | None = Field(None, ge=1, description="Registered model version.")
    alias: str | None = Field(None, min_length=1, description="Registered model alias.")
    allow_pickle: bool = Field(
        False,
        description="Load mlflow.pytorch models saved with pickle. Unpickling runs whatever code "
        "the artifact holds: only for a model store you trust. pt2 and mirrorinf's own format "
        "load without it.",
    )
    train: TrainParams = Field(default_factory=TrainParams)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("alias")
    @classmethod
    def _valid_alias(cls, value: str | None) -> str | None:
        return value if value is None else check_alias(value)

    @model_validator(mode="after")
    def _one_ref(self) -> ModelParams:
        if self.version is not None and self.alias is not None:
            raise ValueError("give model.version or model.alias, not both")
        return self

    @property
    def train_demo(self) -> bool:
        """True when the pipeline must train (or reuse) the demo model itself."""
        return self.version is None and self.alias is None


class TaskParams(_Section):
    """What the model was trained to do: the task kind, and optionally the user's own loss and
    where the prediction is in the model's output (the names are a contract)."""

    kind: Literal["classification", "binary", "regression", "multilabel", "sequence"] = Field(
        "classification",
        description="classification: integer labels, [n, C] logits (cross-entropy); binary: 0/1 "
        "labels, one logit [n] or [n, 1] (BCE-with-logits); regression: float targets [n] or "
        "[n, D] (squared error summed over D); multilabel: 0/1 targets [n, L] (BCE-with-logits "
        "summed over labels); sequence: token labels [n, T] with -100 = ignored, logits "
        "[n, T, V] (mean token cross-entropy; causal LMs: labels already shifted).",
    )
    loss: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='null = the kind\'s built-in loss, or "package.module:function": your '
        "per-example loss f(outputs, targets) -> [n] (reduction none). It is imported from "
        "your code (the module must be importable, e.g. on PYTHONPATH): this runs your code.",
    )
    output: str | int | None = Field(
        None,
        description="null = the model returns the prediction tensor; else the attribute or "
        "dict key (e.g. logits for transformers outputs) or tuple index holding it.",
    )

    @property
    def float_targets(self) -> bool:
        """Targets are read as float (regression, multilabel) rather than integer labels."""
        return self.kind in ("regression", "multilabel")


class QueryParams(_Section):
    """Which points to explain with pairwise influence."""

    source: Literal["query", "val"] = Field("query", description="Set used as queries.")
    max_queries: int | None = Field(100, ge=1, description="First N queries; null = all.")


class GateParams(GateThresholds):
    """Gate thresholds (shared with the summary and the Great Expectations suite) + alias."""

    alias_on_pass: str | None = Field(
        "influence-passed", description="Alias set on a model version that passes; null = none."
    )

    @field_validator("alias_on_pass")
    @classmethod
    def _valid_alias(cls, value: str | None) -> str | None:
        return value if value is None else check_alias(value)

    def thresholds(self) -> GateThresholds:
        """The thresholds alone, as the summary and checks take them."""
        return GateThresholds(**self.model_dump(exclude={"alias_on_pass"}))


class MlflowParams(_Section):
    """The MLflow store (embedded SQLite by default)."""

    tracking_uri: str = Field("sqlite:///mlruns/mlflow.db", min_length=1)
    artifact_location: str | None = Field(
        None,
        min_length=1,
        description="Where new experiments keep artifacts. null: beside the database for the "
        "embedded SQLite store (mlruns/artifacts), the server's own artifact store for a "
        "tracking server (what its UI and other clients read). URIs with a scheme "
        "(mlflow-artifacts:/, s3://, file:) pass through untouched; a path is made absolute.",
    )
    experiment: str = Field("mirrorinf", min_length=1)


class ShardingParams(_Section):
    """Sharded, resumable scoring of the training set (mirrorinf.shards)."""

    size: int | None = Field(
        None,
        ge=1,
        description="Training rows per shard; null = score the whole set in one task. Each "
        "shard is a Prefect task (mapped over the task runner) persisted atomically; a rerun "
        "skips finished shards, a changed model/data/config starts afresh.",
    )
    dir: str = Field("outputs/shards", min_length=1, description="Shard store folder.")


class DaskParams(_Section):
    """The Dask cluster used when runner is "dask"."""

    workers: int = Field(2, ge=1, description="Worker processes of a local cluster.")
    address: str | None = Field(None, description="Address of an existing cluster instead.")


class PrefectParams(_Section):
    """The history kept by the temporary Prefect API (``.prefect/``, used when PREFECT_API_URL
    is unset; a configured server keeps its own history)."""

    keep_runs: int | None = Field(
        20,
        ge=1,
        description="Influence flow runs kept in .prefect/; after each run the older ones "
        "(their task runs, states and logs) are deleted. null = keep all.",
    )


class Params(_Section):
    """All of params.yaml."""

    data: DataParams = Field(default_factory=DataParams)
    demo: DemoParams = Field(default_factory=DemoParams)
    model: ModelParams = Field(default_factory=ModelParams)
    task: TaskParams = Field(default_factory=TaskParams)
    queries: QueryParams = Field(default_factory=QueryParams)
    influence: EngineConfig = Field(
        default_factory=ForwardInfConfig,
        description="The engine's ForwardInfConfig (fields documented there).",
    )
    gate: GateParams = Field(default_factory=GateParams)
    mlflow: MlflowParams = Field(default_factory=MlflowParams)
    sharding: ShardingParams = Field(default_factory=ShardingParams)
    runner: Literal["threads", "dask"] = Field(
        "threads",
        description='Prefect task runner: "threads" (one machine) or "dask" (prefect-dask: a '
        "local cluster of dask.workers processes, or the cluster at dask.address).",
    )
    dask: DaskParams = Field(default_factory=DaskParams)
    prefect: PrefectParams = Field(default_factory=PrefectParams)
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description='Engine device: "auto", "cpu", "cuda", "cuda:1", "mps".',
    )
    cache: bool = Field(True, description="Reuse scores keyed on model, data md5 and config.")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; null = torch's default (all cores)."
    )

    _root: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # `demo:` with nothing under it parses as None: treat it as "all defaults"
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @property
    def root(self) -> Path:
        """Directory that relative paths are resolved against (the params file's directory)."""
        return self._root

    def with_root(self, root: str | Path) -> Params:
        """A copy whose relative paths resolve against ``root``."""
        new = self.model_copy()
        new._root = Path(root).resolve()
        return new

    def replace(self, **sections: Any) -> Params:
        """A copy with some sections or fields replaced (same root), validated again."""
        data = self.model_dump(exclude_unset=True)  # defaults stay defaults (env precedence)
        for key, value in sections.items():
            data[key] = value.model_dump() if isinstance(value, BaseModel) else value
        return params_from_dict(data, root=self._root)

    def resolve(self, path: str | Path) -> Path:
        """An absolute path: ``path`` itself if absolute, else under the root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._root / p)

    def tracking_uri(self) -> str:
        """The MLflow tracking URI with a relative SQLite path made absolute.

        Precedence, as MLflow users expect: a ``mlflow.tracking_uri`` written in the params
        file, else the ``MLFLOW_TRACKING_URI`` environment variable, else the embedded store.
        """
        uri = self.mlflow.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env and "tracking_uri" not in self.mlflow.model_fields_set:
            return env
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
            return prefix + str(self.resolve(uri[len(prefix) :]))
        return uri

    def artifact_location(self) -> str | None:
        """Artifact location for new experiments (None: the tracking server decides)."""
        loc = self.mlflow.artifact_location
        if loc is None:
            uri = self.tracking_uri()
            if uri.startswith("sqlite:///"):  # the embedded store: artifacts beside the database
                return str(Path(uri[len("sqlite:///") :]).parent / "artifacts")
            return None
        return loc if has_uri_scheme(loc) else str(self.resolve(loc))

    def output_dirs(self) -> dict[str, Path]:
        """Local folders a run writes to, keyed by the params key that names each, so a run can
        check them before it starts anything (remote stores are left to their own errors)."""
        out: dict[str, Path] = {}
        uri = self.tracking_uri()
        if uri.startswith("sqlite:///"):
            out["mlflow.tracking_uri"] = Path(uri[len("sqlite:///") :]).parent
        loc = self.artifact_location()
        if loc is not None and (not has_uri_scheme(loc) or loc.startswith("file:")):
            out["mlflow.artifact_location"] = Path(re.sub(r"^file:(//)?", "", loc))
        if self.sharding.size:
            out["sharding.dir"] = self.resolve(self.sharding.dir)
        if self.data.source == "demo":  # the demo data sets are written there
            out["data.train"] = self.resolve(self.data.train).parent
        return out


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names valid at ``loc`` (the parent of an unknown key), for the error message."""
    current: Any = model
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else None


def _bounded(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _bounded(".".join(str(p) for p in loc) or "(top level)")
        msg = _bounded(str(e["msg"]).removeprefix("Value error, "), 2 * MAX_SHOWN)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Params, loc[:-1])
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            close = difflib.get_close_matches(str(loc[-1]), allowed or [], n=1)
            hint = f"; did you mean {close[0]!r}?{hint}" if close else hint
            lines.append(f"{key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            got = e.get("input")
            value = shown(got)
            extra = "" if isinstance(got, dict) or value in msg else f" (got {value})"
            lines.append(f"{key}: {msg}{extra}")
    return f"{source}: invalid params: " + "; ".join(lines)


def params_from_dict(
    data: dict[str, Any] | None, *, root: str | Path | None = None, source: str = "params"
) -> Params:
    """Validate a plain mapping into :class:`Params`; ParamsError names the bad key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None
    return params.with_root(root if root is not None else Path.cwd())


class _AliasError(yaml.YAMLError):
    """An alias (``*name``) in a params file: refused, since aliases can expand without bound."""

    def __init__(self, anchor: str, line: int) -> None:
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader with aliases refused before anything is built ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasError(str(event.anchor), event.start_mark.line + 1)
        return super().compose_node(parent, index)


EMPTY_HINT = (
    "to start, run the embedded demo from the mirrorinf repository (`mirrorinf run --params "
    "params.yaml`, or put `data: {source: demo}` in this file), or write your settings here "
    "(params.yaml in the repository lists every key)"
)


def _check_file(p: Path) -> None:
    """ParamsError naming the real reason a params path cannot be read (not always "not found")."""
    try:
        p.stat()
    except FileNotFoundError:
        broken = " (a symlink to a missing file)" if p.is_symlink() else ""
        raise ParamsError(f"params file not found: {p}{broken}") from None
    except OSError as err:
        reason = err.strerror or str(err)
        if err.errno == errno.ELOOP:
            reason += " (a symlink loop)"
        raise ParamsError(f"cannot read params file {p}: {reason}") from None
    if not p.is_file():
        kind = "a folder" if p.is_dir() else "not a regular file"
        raise ParamsError(f"params file {p} is {kind}; give the path of a YAML file")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params YAML file; relative paths in it resolve against its folder.

    Aliases (``*name``) are refused before anything is built, and an empty file (or only
    comments) is an error naming the two ways to start, not a silent run of the demo.
    """
    p = Path(path)
    _check_file(p)
    try:
        data = yaml.load(p.read_text(), Loader=_NoAliasLoader)
    except _AliasError as err:
        raise ParamsError(
            f"{p}: line {err.line}: YAML aliases (*{_bounded(err.anchor, 40)}) are not allowed in "
            "params files (they can expand without bound); write the value out"
        ) from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{p}: not valid YAML: {_bounded(str(err), 2 * MAX_SHOWN)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{p}: cannot read: {err}") from None
    if data is None:
        raise ParamsError(f"{p}: the params file is empty; {EMPTY_HINT}")
    return params_from_dict(data, root=p.resolve().parent, source=str(p))
