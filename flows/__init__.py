"""Prefect flows: compose the tasks in ``mirrorinf.tasks``; no math here.

Ships as ``mirrorinf.flows`` (pyproject maps this folder there); importing it changes nothing in
the environment: entry points call :func:`mirrorinf.tasks.env.set_tool_env`.
"""

if __name__ != "mirrorinf.flows":  # a stray `import flows` from the repository root
    raise ImportError(
        f"this folder is the package mirrorinf.flows, imported here as {__name__!r}: "
        "write `import mirrorinf.flows` (after `pip install -e .`)"
    )
