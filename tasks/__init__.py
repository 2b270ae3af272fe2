"""Prefect tasks: thin wrappers doing I/O with one tool each (DVC, MLflow, GX) around the engine.

Ships as ``mirrorinf.tasks`` (pyproject maps this folder there); importing it changes nothing in
the environment: entry points call :func:`mirrorinf.tasks.env.set_tool_env`.
"""

if __name__ != "mirrorinf.tasks":  # a stray `import tasks` from the repository root
    raise ImportError(
        f"this folder is the package mirrorinf.tasks, imported here as {__name__!r}: "
        "write `import mirrorinf.tasks` (after `pip install -e .`)"
    )
