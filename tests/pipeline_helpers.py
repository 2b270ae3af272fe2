"""Params of the small digits demo shared by the end-to-end pipeline tests (test_pipeline_e2e,
test_shards, test_integrity, test_ui_browser): the demo's size, the base params and a merge of
sections over them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mirrorinf.params import Params, params_from_dict

MODEL = "e2e-demo"
SMALL_DEMO = {"n_train": 400, "n_val": 100, "n_query": 30, "flip_fraction": 0.1, "n_leaks": 5,
              "seed": 0}  # fmt: skip


def base_params(project: Path) -> dict[str, Any]:
    """The small demo's params as a dict (paths relative to ``project``)."""
    return {
        "demo": dict(SMALL_DEMO),
        "model": {"name": MODEL},
        "mlflow": {"tracking_uri": "sqlite:///mlruns/mlflow.db", "experiment": "e2e"},
        "threads": 1,
    }


def merge(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A copy of ``base`` with each section updated (dicts) or replaced (other values)."""
    out = json.loads(json.dumps(base))
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def make(project: Path, **sections: Any) -> Params:
    """Typed params of the small demo in ``project``, with ``sections`` merged over it."""
    return params_from_dict(merge(base_params(project), **sections), root=project)
