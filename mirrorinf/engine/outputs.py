"""Which part of a model's output is the prediction the loss is taken on.

Models return a tensor, a tuple, a dict, or an object such as a HuggingFace ``ModelOutput``;
``task.output`` names the prediction: an attribute or key (``"logits"``), a tuple index (``0``),
or a callable. With none given, the output must be a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

OutputSpec = str | int | Callable[[Any], torch.Tensor] | None


def _keys(raw: Any) -> list[str]:
    if isinstance(raw, Mapping):
        return [str(k) for k in raw]
    return [k for k in vars(raw) if not k.startswith("_")] if hasattr(raw, "__dict__") else []


def select_output(raw: Any, spec: OutputSpec) -> torch.Tensor:
    """The prediction tensor in ``raw`` (see the module docstring); ValueError naming the fix."""
    if spec is None:
        out = raw
    elif callable(spec):
        out = spec(raw)
    elif isinstance(spec, int) and not isinstance(spec, bool):
        if not isinstance(raw, (tuple, list)):
            raise ValueError(
                f"task.output is {spec} (a tuple index) but the model returns a "
                f"{type(raw).__name__}; set task.output to null or to its attribute/key"
            )
        if not -len(raw) <= spec < len(raw):
            raise ValueError(f"task.output {spec} is out of range: the model returns {len(raw)}")
        out = raw[spec]
    elif isinstance(raw, Mapping) and spec in raw:
        out = raw[spec]
    elif not isinstance(raw, Mapping) and isinstance(spec, str) and hasattr(raw, spec):
        out = getattr(raw, spec)
    else:
        have = ", ".join(_keys(raw)) or "none"
        raise ValueError(
            f"task.output is {spec!r} but the model's {type(raw).__name__} output has no such "
            f"attribute or key (it has: {have})"
        )
    if isinstance(out, torch.Tensor):
        return out
    hint = ""
    keys = _keys(out)
    if "logits" in keys:
        hint = "; set task.output: logits"
    elif isinstance(out, (tuple, list)):
        hint = "; set task.output to the index of the prediction (e.g. 0)"
    elif keys:
        hint = f"; set task.output to the attribute/key holding the prediction ({', '.join(keys)})"
    where = "the model" if spec is None else f"task.output {spec!r}"
    raise ValueError(f"{where} returns a {type(out).__name__}, not a tensor{hint}")
