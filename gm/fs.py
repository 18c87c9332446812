"""Files that appear whole, survive a crash and carry the user's permissions.

Every writer here fills a temporary file in the target's folder, then ``publish`` syncs it to
disk, gives it the mode a plain ``open`` would under the current umask (safetensors writes 0600
and MindSpore's ``save_checkpoint`` 0400 whatever the umask), renames it over the target and
syncs the folder: a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


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
    try:
        fsync_path(tmp)
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a multi-GB temporary behind
        raise
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write; ``publish`` it when the block ends,
    delete it when the block fails (a full disk never leaves a partial file behind)."""
    final = Path(final)
    # a name of its own per writer: ranks that write the same file (the compile cache's signature)
    # must not fill or rename each other's temporary
    tmp = final.with_name(f"{final.name}.{secrets.token_hex(6)}{suffix}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``publish``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """An output file name a tool may write: not a folder, and not an existing file unless
    ``overwrite`` (a tool never replaces a file it was not told to). Raises ConfigError."""
    from gm.errors import ConfigError

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path}: already exists; choose another name or pass --overwrite")
    if not path.parent.is_dir() and path.parent.exists():
        raise ConfigError(f"{flag} {path}: {path.parent} is not a folder")
    return path
