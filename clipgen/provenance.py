"""Where results came from: the commit of the clipgen checkout that produced them."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_sha() -> str | None:
    """Commit of the clipgen checkout (with '-dirty' if it has local changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
