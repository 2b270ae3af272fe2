"""Error types for bad input (params, data files, model references).

Every user-facing "your input is wrong" problem derives from :class:`InputError`, so the CLI can
answer it with one clear message and exit code 2 while real bugs still show a traceback.
"""

from __future__ import annotations

__all__ = ["DataError", "InputError", "ModelError", "ParamsError", "ResourceError"]


class InputError(ValueError):
    """Bad input from the user: the message says what and where; no traceback needed."""


class ParamsError(InputError):
    """params.yaml (or a params mapping) is invalid; the message names the key path."""


class DataError(InputError):
    """A dataset file is missing, unreadable, corrupt or has invalid contents."""


class ModelError(InputError):
    """A model reference (name, version, alias, URI) cannot be resolved or loaded."""


class ResourceError(InputError):
    """The job does not fit the machine (out of memory even at the smallest batch sizes)."""
