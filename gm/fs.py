"""Files that appear whole, survive a crash and carry the user's permissions.

Every writer here fills a temporary file in the target's folder, then ``publish`` syncs it to
disk, gives it the mode a plain ``open`` would under the current umask (safetensors writes 0600
and MindSpore's ``save_checkpoint`` 0400 whatever the umask), renames it over the target and
syncs the folder: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk; folders that refuse fsync are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def publish(tmp: str | os.PathLike, final: str | os.PathLike, mode: int = 0o666) -> None:
    """Sync ``tmp``, set ``mode & ~umask``, rename it to ``final`` (atomic), sync the folder."""
    tmp, final = Path(tmp), Path(final)
    fsync_path(tmp)
    os.chmod(tmp, mode & ~current_umask())
    os.replace(tmp, final)
    fsync_path(final.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``publish``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    publish(tmp, path)
