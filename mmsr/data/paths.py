"""Files a config names. Relative paths resolve against the working directory (run ``mmsr`` from the
repository root for the shipped configs); a missing file is an error that says which directory that was."""

from __future__ import annotations

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
