"""The user's own code named in params ("package.module:function"): imported, never guessed.

Used for ``task.loss`` (and any later hook of the same form, e.g. a data factory). Importing a
module runs it: that is the point (the user's loss is the user's code), so only modules the
user names are imported, and a failure is an InputError naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from mirrorinf.errors import InputError

__all__ = ["load_callable", "source_digest"]


def load_callable(spec: str, key: str) -> Callable[..., Any]:
    """The function ``spec`` ("package.module:function") names; ``key``: the params key, for
    messages (e.g. "task.loss")."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f'{key}: {spec!r} is not of the form "package.module:function"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise InputError(
            f"{key}: cannot import module {module_name!r} ({err}); make it importable (install "
            "your package, or put its folder on PYTHONPATH)"
        ) from None
    except Exception as err:  # the user's module itself failed while it ran
        raise InputError(f"{key}: importing {module_name!r} failed: {err!r}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        have = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(
            f"{key}: module {module_name!r} has no function {attr!r} "
            f"(it has: {', '.join(have[:20]) or 'none'})"
        )
    return fn  # type: ignore[no-any-return]


def source_digest(fn: Callable[..., Any]) -> str:
    """A short digest of the source file of ``fn`` (so caches notice an edited loss)."""
    try:
        text = inspect.getsource(inspect.getmodule(fn) or fn)
    except (OSError, TypeError):
        text = getattr(fn, "__qualname__", repr(fn))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
