"""Files a config names. Relative paths resolve against the working directory (run ``mmsr`` from the
repository root for the shipped configs); a missing file is an error that says which directory that was."""

from __future__ import annotations

import os
from pathlib import Path


def missing(path: str | Path, what: str = "file") -> FileNotFoundError:
    """The error for a ``what`` at ``path`` that does not exist, naming the directory a relative path
    was resolved against."""
    path = Path(path)
    where = "" if path.is_absolute() else f" (a relative path: resolved against the working directory {Path.cwd()})"
    return FileNotFoundError(f"{what} {path} not found{where}")


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` as a ``Path`` if it is an existing file, else ``missing(path, what)``."""
    path = Path(path)
    if not path.is_file():
        raise missing(path, what)
    return path


def shared_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under 022), for files written
    otherwise (``mkstemp``, safetensors: 0600) that other users' jobs must read. The umask is read by setting
    it, so it is set back at once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask
