"""Helpers for tests that need a real git + DVC repository in a temp folder (no remote)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` with a fixed identity; returns stdout."""
    out = subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True,
        env={**os.environ, **GIT_ENV},
    )  # fmt: skip
    return out.stdout.strip()


def make_dvc_repo(path: Path) -> Path:
    """``git init`` + ``dvc init`` (analytics off) in ``path``, committed; data stays in the
    local DVC cache, so no remote is needed."""
    from dvc.repo import Repo

    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q")
    repo = Repo.init(str(path))
    with repo.config.edit() as conf:
        conf["core"]["analytics"] = False
    repo.close()
    git(path, "add", "-A")
    git(path, "commit", "-qm", "init dvc")
    return path


def dvc_add_commit(repo_path: Path, files: list[str], message: str, tag: str | None = None) -> str:
    """``dvc add`` the files (paths relative to the repo), commit, optionally tag; returns sha."""
    from dvc.repo import Repo

    with Repo(str(repo_path)) as repo:
        repo.add([str(repo_path / f) for f in files])
    git(repo_path, "add", "-A")
    git(repo_path, "commit", "-qm", message)
    if tag:
        git(repo_path, "tag", tag)
    return git(repo_path, "rev-parse", "HEAD")
