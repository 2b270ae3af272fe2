"""Nothing grows without bound in the Prefect store: repeated influence runs keep only the newest
``prefect.keep_runs`` flow runs (task runs, states and logs go with the rest), the temporary API
persists no events, and its SQLite write-ahead log is truncated when it stops.

Real components: the Prefect test harness (and, for ``.prefect/`` itself, the real ``mirrorinf
run`` entry point in a subprocess with its own temporary API), a SQLite MLflow store in tmp_path
and a small demo.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorinf.flows.influence import influence_flow, run_influence
from mirrorinf.params import params_from_dict

pytestmark = pytest.mark.slow

TINY_DEMO = {"n_train": 100, "n_val": 20, "n_query": 10, "flip_fraction": 0.1, "n_leaks": 2,
             "seed": 0}  # fmt: skip
RUNS = 3  # influence runs in one harness
KEEP = 1
CLI_RUNS = 3  # `mirrorinf run`s, each with its own temporary API


def _tiny(project: Path, keep: int | None) -> dict[str, Any]:
    return {
        "demo": dict(TINY_DEMO),
        "model": {"name": "store-demo", "train": {"epochs": 30}},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "store"},
        "prefect": {"keep_runs": keep},
        "threads": 1,
    }


def _rows(db: Path, tables: list[str]) -> dict[str, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def _our_runs() -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[influence_flow.name]))
        )


def _task_runs_of(run_ids: list[Any]) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )


def test_repeated_runs_keep_only_the_newest_flow_runs(
    prefect_harness: Path, tmp_path: Path
) -> None:
    """RUNS influence runs with keep_runs=KEEP leave KEEP flow runs of the flow, none of the
    deleted runs' task runs, and the store's flow and task run rows no larger than after KEEP."""
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    assert url is not None
    db = Path(url.get_secret_value().split(":///", 1)[1])  # the harness's own SQLite store
    params = params_from_dict(_tiny(tmp_path, KEEP), root=tmp_path)
    seen, rows = [], []
    for _ in range(RUNS):
        run_influence(params)
        runs = _our_runs()
        seen.extend(r.id for r in runs if r.id not in seen)
        assert len(runs) <= KEEP, f"{len(runs)} influence flow runs kept, expected <= {KEEP}"
        rows.append(_rows(db, ["flow_run", "task_run", "task_run_state", "flow_run_state"]))
    kept = {r.id for r in _our_runs()}
    gone = [i for i in seen if i not in kept]
    assert len(gone) == RUNS - KEEP
    assert _task_runs_of(gone) == []  # deleted with their flow runs
    grew = {t: n for t, n in rows[-1].items() if n > rows[KEEP - 1][t]}
    assert not grew, f"store rows grew after {KEEP} runs: {rows}"


SCRIPT = """
import json, os, sys
from pathlib import Path
from mirrorinf.cli import main
params, runs, home = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
sizes = []
for _ in range(runs):
    assert main(["run", "--params", params]) in (0, 1)
    sizes.append({p.name: p.stat().st_size for p in home.glob("prefect.db*")})
print("SIZES " + json.dumps(sizes))
"""


def test_mirrorinf_run_leaves_prefect_home_bounded(tmp_path: Path) -> None:
    """The real entry point, each run with its own temporary API: after CLI_RUNS runs with
    keep_runs=1, .prefect/ holds one flow run, no events, an empty write-ahead log, and a
    database no larger than after the second run (freed pages are reused)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_tiny(tmp_path, 1)))
    home = tmp_path / ".prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "params.yaml"), str(CLI_RUNS), str(home)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    sizes = json.loads(proc.stdout.split("SIZES ", 1)[1])
    rows = _rows(home / "prefect.db", ["flow_run", "task_run", "events", "event_resources"])
    assert rows["events"] == rows["event_resources"] == 0, rows
    assert all(s.get("prefect.db-wal", 0) == 0 for s in sizes), sizes
    assert rows["flow_run"] == 1, rows
    assert sizes[-1]["prefect.db"] <= sizes[1]["prefect.db"], sizes
