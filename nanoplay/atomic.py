"""
Files and directories written whole or not at all, with the permissions any other new file gets.

Everything nanoplay writes for the user to keep (checkpoints, exports, sessions, tokenised data) goes
through these two functions: the content is written to a hidden temporary sibling, flushed to disk and
renamed into place, so a crash mid-write never leaves half a file behind. The temporary files of
`tempfile` are private (0600 files, 0700 directories); the finished ones get 0644 / 0755 under the
usual umask 022, as `open()` and `mkdir()` would give them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (other threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, and set it back
    os.umask(mask)
    return mask


def write_dir_atomically(final: Path, write) -> Path:
    """Call write(tmp_dir) and move the finished directory to `final`, replacing any old one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        write(tmp)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            if f.is_file():
                os.chmod(f, 0o666 & ~current_umask())  # some writers make private files (safetensors: 0600)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_file_atomically(path: Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """
    Write `data` (text as UTF-8) to `path` through a temporary sibling renamed into place. `data` may
    instead be a function that writes the file at the path it is given (a library's own file writer).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data.encode() if isinstance(data, str) else data)
        if callable(data):
            data(Path(tmp))
            os.chmod(tmp, 0o666 & ~current_umask())  # in case the writer replaced the file with its own
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
