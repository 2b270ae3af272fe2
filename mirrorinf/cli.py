"""The ``mirrorinf`` command: run | score | gate | ui | serve.

Exit codes: 0 ok (gate passed), 1 gate failed, 2 bad input (one clear message, no traceback
unless --debug), 3 unexpected error (a bug or a broken tool: traceback shown), 130 interrupted.
Heavy tools (torch, prefect, mlflow, dvc, great_expectations) are imported
inside the commands, so ``mirrorinf --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from mirrorinf.errors import InputError

__all__ = ["build_parser", "main"]

logger = logging.getLogger("mirrorinf.cli")

DEFAULT_PARAMS = "params.yaml"


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return common


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        default=None,
        help=f"params file for the MLflow store and engine config (default: ./{DEFAULT_PARAMS} "
        "if present)",
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides params)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no heavy imports)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="mirrorinf",
        description="Mirrored influence (Forward-INF) as an MLOps step: which training data "
        "drives a model version, checked and logged to MLflow, with a release gate.",
    )
    parser.add_argument("--version", action="version", version="mirrorinf 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run the whole influence flow (on a fresh checkout: demo data + demo model first)",
        description="Prepare data, load (or train and register) the model, score influence, "
        "check it with Great Expectations, log to MLflow and tag the model version.",
    )
    run.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    run.add_argument("--verbose", "-v", action="store_true", help="progress logs and stage times")
    run.add_argument(
        "--fail-on-gate",
        action="store_true",
        help="exit 1 when the gate fails (default: exit 0 once the analysis is logged)",
    )
    run.set_defaults(func=_cmd_run)

    score = sub.add_parser(
        "score",
        parents=[common],
        help="score only: DIR/scores.npy [n_train, n_query] + DIR/manifest.json",
        description="Pairwise influence of every training example on every query, rows in "
        "training-file order, positive = proponent. No Prefect server, no MLflow run.",
    )
    score.add_argument("--model-uri", required=True, help="models:/NAME/VERSION, @ALIAS or a dir")
    score.add_argument("--train", required=True, help="training set (.npz or .parquet)")
    score.add_argument("--queries", required=True, help="query set (.npz or .parquet)")
    score.add_argument("--out", required=True, help="output directory")
    score.add_argument("--label-column", default=None, help="label column of parquet files")
    score.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load mlflow.pytorch models saved with pickle (runs code from the artifact: only "
        "for a store you trust)",
    )
    _store_args(score)
    score.set_defaults(func=_cmd_score)

    gate = sub.add_parser(
        "gate",
        parents=[common],
        help="exit 0 if a model version passed the influence gate, 1 failed, 2 no result",
    )
    gate.add_argument("--model", required=True, help="registered model name")
    gate.add_argument("--version", required=True, help="registered model version")
    _store_args(gate)
    gate.set_defaults(func=_cmd_gate)

    ui = sub.add_parser("ui", parents=[common], help="MLflow UI on 127.0.0.1 over the store")
    ui.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")
    _store_args(ui)
    ui.set_defaults(func=_cmd_ui)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="serve the influence deployment: runs it for each mirrorinf.model.registered event",
        description="Create a Prefect deployment of the influence flow with an event trigger on "
        "mirrorinf.model.registered (model name and version from the event) and run its flow "
        "runs here until interrupted. Needs PREFECT_API_URL (a `prefect server start`).",
    )
    serve.add_argument("--params", default=DEFAULT_PARAMS, help="params (default: %(default)s)")
    serve.add_argument("--name", default="mirrorinf", help="deployment (default: %(default)s)")
    serve.add_argument(
        "--model", default=None, help="react only to versions of this registered model"
    )
    serve.set_defaults(func=_cmd_serve)

    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="score every new version of the named models (polls the MLflow registry)",
        description="Poll the MLflow registry and run the influence flow for each version of "
        "the named models that has no verdict yet; restartable, each version scored once. A "
        "model (or version) tagged mirrorinf.params=FILE is scored with that params file.",
    )
    watch.add_argument("--model", action="append", required=True, help="model name (repeatable)")
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    watch.add_argument("--once", action="store_true", help="one pass, then exit")
    _store_args(watch)
    watch.set_defaults(func=_cmd_watch)
    return parser


def _project_importable(root: Path) -> None:
    """The project's folder (params.yaml's) importable, last on the path, so that user code
    named in params (``task.loss: "myloss:fn"``, ``data.factory``) can live beside params.yaml,
    as ``python -m`` (the DVC stages) already allows; exported in PYTHONPATH for worker
    processes. Last: an installed package or the standard library of the same name wins."""
    folder = str(root.resolve())
    if folder not in sys.path:
        sys.path.append(folder)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([*paths, folder])


def _setup(root: Path, verbose: bool, debug: bool) -> None:
    """Tool environment before the heavy imports, then logging (the CLI owns logging)."""
    from mirrorinf.tasks.env import set_tool_env

    if not (verbose or debug):
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    set_tool_env(root)
    _project_importable(root)
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    # third-party libraries stay at WARNING unless --debug; ours follow --verbose
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("mirrorinf").setLevel(level)  # mirrorinf.tasks / .flows too
    if not debug:  # the libraries' notices about their own APIs (torch.export's LeafSpec on
        # every pt2 load): nothing the user can act on; --debug shows them
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


class _FirstDeliveryFailure(logging.Filter):
    """Shows the first "Service 'EventsWorker' failed to process item Event(...)" of Prefect's
    queue services as one short line and drops the rest: when the API dies mid-run each queued
    event is a multi-kilobyte dump."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        """True to show the record: anything else, or the first delivery failure, shortened."""
        if not str(record.msg).startswith("Service %r failed to process"):
            return True
        if self.seen:
            return False
        self.seen = True
        service = record.args[0] if isinstance(record.args, tuple) and record.args else "service"
        record.msg = "Prefect's %s could not send to the Prefect API; later failures not shown"
        record.args = (service,)
        return True


def _quiet_prefect(verbose: bool, debug: bool) -> None:
    """Prefect logs task and flow failures with tracebacks; the CLI reports bad input itself."""
    if not (verbose or debug):
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        services = logging.getLogger("prefect._internal.concurrency")
        if not any(isinstance(f, _FirstDeliveryFailure) for f in services.filters):
            services.addFilter(_FirstDeliveryFailure())


def _find_params() -> Path | None:
    """params.yaml in this folder or the nearest parent (as git finds .git), so that gate, ui,
    score and watch use the project's store from any subfolder."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / DEFAULT_PARAMS).is_file():
            return folder / DEFAULT_PARAMS
    return None


def _load_store_params(args: argparse.Namespace) -> Any:
    """Params for score / gate / ui / watch: --params, else the project's params.yaml (this
    folder or a parent), else defaults (then MLFLOW_TRACKING_URI or the embedded store)."""
    from mirrorinf.params import load_params, params_from_dict

    if args.params is not None:
        return load_params(args.params)
    found = _find_params()
    if found is not None:
        return load_params(found)
    return params_from_dict({})


def _tracking_uri(args: argparse.Namespace, params: Any, *, must_exist: bool = False) -> str:
    """--tracking-uri, else the params' store (see Params.tracking_uri). With ``must_exist``, a
    local SQLite store that is not there is an error naming where it looked, not a new store."""
    uri = str(args.tracking_uri or params.tracking_uri())
    if must_exist and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        where = "no params.yaml here or in a parent folder"
        if args.params or _find_params():
            where = f"the params in {params.root}"
        raise InputError(
            f"no MLflow store at {uri} (from {where}, no --tracking-uri, no "
            "MLFLOW_TRACKING_URI): run in the project folder or pass --params / --tracking-uri"
        )
    return uri


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _print_summary(result: Any, wall: float, verbose: bool) -> None:
    from mirrorinf.text import printable

    s = result.summary
    m = result.model
    print(f"model:   {m['name']} v{m['version']} ({m.get('origin', 'registry')}; {m['uri']})")
    print(f"gate:    {result.verdict.upper()}")
    for reason in result.reasons:
        print(f"  - {reason}")
    counts = s.get("counts", {})
    n_flag = counts.get("n_flagged_mislabel", 0)
    noun = s.get("suspect_noun", "suspected mislabel")
    what = "target" if noun == "suspect target" else "label"
    rows = s.get("top_mislabels", []) if n_flag else s.get("top_self_influence", [])
    head = f"{noun}s: {n_flag} flagged of {counts.get('n_train', '?')} training examples"
    print(head + (f"; top {len(rows)}, each with the rule that flagged it:" if n_flag else
                  "; none flagged. Highest self-influence:"))  # fmt: skip
    for row in rows:
        rule = f"  flagged by: {row['flag_rule']}" if n_flag and row.get("flag_rule") else ""
        print(
            f"  id {printable(row['id'])}  {what} {_fmt(row['label'])}  self-influence "
            f"{_fmt(row['self_influence'])}{rule}"
        )
    print(f"suspected leaks: {counts.get('n_leaks', 0)} of {counts.get('n_query', '?')} queries")
    for row in s.get("leaks", []):
        extra = f"  cosine {_fmt(row['cosine'])}" if "cosine" in row else ""
        print(f"  query {printable(row['query_id'])} <- train {printable(row['train_id'])}{extra}")
    truth = s.get("truth") or {}
    if truth:
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in truth.items())
        print(f"planted ground truth: {shown}")
    print(f"MLflow run: {result.run_id}{'  (scores from cache)' if result.cache_hit else ''}")
    print("see: mirrorinf ui  (the run's report.md, plots/ and tables/ show what was found)")
    if verbose:
        body = sum(v for k, v in result.stage_seconds.items() if "." not in k)  # parts dotted
        stages = "  ".join(f"{k} {v:.2f}s" for k, v in result.stage_seconds.items())
        print(f"stages: {stages}")
        print(f"total {wall:.1f}s (flow stages {body:.1f}s; imports + Prefect start/stop the rest)")


def _check_name(name: str, what: str) -> None:
    """InputError (exit 2) for a registered model name MLflow would refuse with a traceback."""
    from mirrorinf.params import check_model_name

    try:
        check_model_name(name)
    except ValueError as err:
        raise InputError(f"{what}: {err}") from None


def _check_model_uri(uri: str) -> None:
    """The registered model name inside a models:/ URI, checked before anything loads."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :]
        name, at, _ = rest.partition("@")
        name = name if at else rest.rpartition("/")[0] or rest
        if not name.strip():
            raise InputError(
                f"bad model URI {uri[:200]!r}: use models:/NAME/VERSION or models:/NAME@ALIAS"
            )
        _check_name(name, "--model-uri")


def _cmd_run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    params_path = Path(args.params)
    root = params_path.resolve().parent if params_path.is_file() else Path.cwd()
    _setup(root, args.verbose, args.debug)
    from mirrorinf.params import load_params

    params = load_params(params_path)
    from mirrorinf.flows.influence import run_influence
    from mirrorinf.tasks.checks import preload_gx
    from mirrorinf.tasks.server import prefect_api

    _quiet_prefect(args.verbose, args.debug)
    # a temporary API, if none is configured, dies with this command; GX imports meanwhile
    with prefect_api(while_starting=preload_gx()):
        result = run_influence(params)
    _print_summary(result, time.perf_counter() - t0, args.verbose)
    return 1 if (args.fail_on_gate and not result.passed) else 0


def _cmd_score(args: argparse.Namespace) -> int:
    _check_model_uri(args.model_uri)
    _setup(Path.cwd(), False, args.debug)

    params = _load_store_params(args)
    label_column = args.label_column or params.data.label_column
    uri = _tracking_uri(args, params)
    out = Path(args.out)
    from mirrorinf.tasks.data import (
        ensure_writable,
        load_dataset,
        write_json,
    )

    ensure_writable({"--out": out}, create=False)  # now, not after the scoring
    from mirrorinf.tasks.model import check_fit, load_model_uri
    from mirrorinf.tasks.score import pairwise_scores, set_threads

    set_threads(params.threads)
    kind = params.task.kind
    # the paths given here are read with params' data options (format, image, columns)
    read = {**params.data.reader(), "label_column": label_column, "factory": None}
    train = load_dataset(args.train, name="train", kind=kind, **read)
    queries = load_dataset(args.queries, name="query", kind=kind, **read)
    allow_pickle = args.allow_pickle or params.model.allow_pickle
    model, ref = load_model_uri(args.model_uri, tracking_uri=uri, allow_pickle=allow_pickle)
    check_fit(model, [train, queries], params.task)
    cfg = params.influence
    out.mkdir(parents=True, exist_ok=True)
    # the engine writes the scores into out/scores.npy as it goes (renamed when complete)
    md5, report = pairwise_scores(
        out / "scores.npy", model, train, queries, cfg, params.device, params.task
    )
    shape = (len(train), len(queries))
    # the manifest goes last and names the scores' md5: after a crash between the two renames,
    # an old manifest does not match the new scores, and a reader can tell
    manifest = {
        "scores": "scores.npy",
        "scores_md5": md5,
        "shape": list(shape),
        "dtype": "float32",
        "rows": "training examples, in training-file order",
        "columns": "queries, in query-file order",
        "sign": "positive = proponent (fitting the query lowers the training example's loss)",
        "model_uri": args.model_uri,
        "model": ref.to_dict() if ref is not None else None,
        "train": {**train.provenance.to_dict(), "n": len(train)},
        "queries": {**queries.provenance.to_dict(), "n": len(queries)},
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "report": report,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "manifest.json", manifest)
    print(f"wrote {out / 'scores.npy'} {shape} and {out / 'manifest.json'}")
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from mirrorinf.params import shown

    _check_name(args.model, "--model")
    if not (args.version.isascii() and args.version.isdigit() and int(args.version) > 0):
        raise InputError(
            f"--version {shown(args.version)}: a registered model version is a positive integer "
            "(e.g. --version 3)"
        )
    _setup(Path.cwd(), False, args.debug)
    params = _load_store_params(args)
    from mirrorinf.tasks.verdict import gate_status

    # the version's verdict record only, accepted only if the run it names FINISHED with it
    status = gate_status(_tracking_uri(args, params, must_exist=True), args.model, args.version)
    if status.verdict is None:
        print(f"{args.model} v{args.version}: {status.reason}", file=sys.stderr)
        return 2
    print(f"{args.model} v{args.version}: {status.verdict} (influence run {status.run_id})")
    return 0 if status.verdict == "passed" else 1


def _cmd_ui(args: argparse.Namespace) -> int:

    _setup(Path.cwd(), False, args.debug)
    params = _load_store_params(args)
    uri = _tracking_uri(args, params, must_exist=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--host", "127.0.0.1",
        "--port", str(args.port),
        "--workers", "1",
    ]  # fmt: skip
    if params.artifact_location() is not None:
        cmd += ["--default-artifact-root", str(params.artifact_location())]
    print(f"MLflow UI on http://127.0.0.1:{args.port} over {uri} (Ctrl-C to stop)", flush=True)
    from mirrorinf import procs

    # its own process group under a supervisor: stopped with this command, even on kill -9
    server = procs.spawn(cmd, env=env)
    previous = _on_sigterm(_raise_terminated)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        procs.stop(server)
        _on_sigterm(previous)


class _Terminated(Exception):
    """SIGTERM arrived: stop the children, exit 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler (main thread only); the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def _cmd_serve(args: argparse.Namespace) -> int:
    params_path = Path(args.params)
    root = params_path.resolve().parent if params_path.is_file() else Path.cwd()
    _setup(root, True, args.debug)
    from mirrorinf.params import load_params

    params = load_params(params_path)
    from mirrorinf.flows.trigger import serve

    serve(params, name=args.name, model_name=args.model)
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    params_path = Path(args.params or DEFAULT_PARAMS)
    root = params_path.resolve().parent if params_path.is_file() else Path.cwd()
    _setup(root, False, args.debug)
    params = _load_store_params(args)
    uri = _tracking_uri(args, params, must_exist=True)
    params = params.replace(mlflow={**params.mlflow.model_dump(), "tracking_uri": uri})
    from mirrorinf.flows.watch import watch
    from mirrorinf.tasks.server import prefect_api

    _quiet_prefect(False, args.debug)
    print(f"watching {', '.join(args.model)} on {params.tracking_uri()}", file=sys.stderr)
    with prefect_api():  # a temporary API, if none is configured, dies with this command
        report = watch(params, args.model, interval=args.interval, once=args.once)
    for key, verdict in report.scored.items():
        print(f"{key}: gate {verdict}")
    for key, err in report.failed.items():
        print(f"{key}: failed: {err}", file=sys.stderr)
    return 2 if report.failed and not report.scored else 0


def _recorded() -> tuple[str, bool]:
    """What this process's influence runs left in MLflow, read back by the run ids they logged
    (the Prefect API can die after a run FINISHED and its version was published): a clause for
    the message, and whether every run's verdict was published."""
    if "mirrorinf.tasks.tracking" not in sys.modules:
        return "", False
    from mirrorinf.tasks.tracking import get_client, started_runs
    from mirrorinf.tasks.verdict import gate_status

    said, published = [], bool(started_runs())
    for uri, run_id in started_runs():
        try:
            run = get_client(uri).get_run(run_id)
            tags = run.data.tags
            name, version = tags.get("mirrorinf.model.name"), tags.get("mirrorinf.model.version")
            text = f"MLflow run {run_id} is {run.info.status}"
            got = gate_status(uri, name, version) if name and version else None
            if got is not None and got.verdict and got.run_id == run_id:
                text += f" and {name} v{version} was published with gate {got.verdict.upper()}"
            else:
                published = False
                text += f", its verdict not published for {name} v{version}"
        except Exception as err:  # the store may be down too: say so, keep the Prefect line
            published = False
            text = f"MLflow run {run_id}: state unknown ({type(err).__name__})"
        said.append(text)
    return "".join(f"; {t}" for t in said), published


def _unreachable(err: BaseException) -> str | None:
    """One line for an MLflow tracking server (after MLflow's retries) or a Prefect API that did
    not answer, or None: servers are input (params, MLFLOW_TRACKING_URI, PREFECT_API_URL), not a
    bug to show a traceback of."""
    text = str(err)
    prefect = os.environ.get("PREFECT_API_URL")
    httpx_down = type(err).__module__.startswith("httpx") and "Connect" in type(err).__name__
    if prefect and (httpx_down or text.startswith("Failed to reach API at")):
        recorded, published = _recorded()
        then = (
            "; nothing needs a rerun (mirrorinf gate reads the published verdict)"
            if published
            else ", then rerun"
        )
        return (
            f"cannot reach the Prefect API at {prefect} ({text[:120]}){recorded}; start it "
            f"(prefect server start) or unset PREFECT_API_URL to let mirrorinf start a temporary "
            f"one{then}"
        )
    if type(err).__name__ != "MlflowException" or "Max retries exceeded" not in text:
        return None
    found = re.search(r"API request to (\S+?)/(?:ajax-)?api/", text)
    url = found.group(1) if found else "the configured URI"
    why = re.search(
        r"(Connection refused|Read timed out|Name or service not known|timed out)", text
    )
    return (
        f"cannot reach the MLflow tracking server at {url} "
        f"({why.group(1) if why else 'no answer'}); check mlflow.tracking_uri (or "
        "MLFLOW_TRACKING_URI) and that the server is up, then rerun (a run it left RUNNING is "
        "marked FAILED by the next run)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok / passed, 1 gate failed, 2 bad input, 3 bug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args))
    except InputError as err:
        if debug:
            raise
        print(f"mirrorinf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        down = _unreachable(err)
        if down:
            if down.startswith("cannot reach the Prefect API"):
                from mirrorinf.tasks.server import abandon_prefect_queues

                abandon_prefect_queues()  # else retried against the dead API at exit
            print(f"mirrorinf {args.command}: error: {down}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        print(f"mirrorinf {args.command}: unexpected error (exit 3); see above", file=sys.stderr)
        return 3


def console_main() -> None:
    """The ``mirrorinf`` command: :func:`main`, then a prompt exit.

    Everything is written and every run ended when :func:`main` returns; the interpreter's own
    teardown of torch, MLflow, Prefect and GX modules then took 3-9 s of C-level finalization
    (measured) before the shell got its prompt back. So: flush, run the Python exit handlers
    (Prefect's and MLflow's flushes among them), then leave without that teardown.
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    console_main()
