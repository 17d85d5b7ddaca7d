"""Durable files: what is written here survives a power cut whole, or not at all.

Every package writes its files through these helpers (keys, the outbox's
reserve, the command spool, provisioning releases, exports to a USB stick):

* :func:`write_atomic` replaces (or, ``exclusive``, creates) a file so that a
  power cut leaves the old file or the new one, never a torn one: a temporary
  file with the final mode from the start, fsynced, renamed (or hard-linked)
  into place, and the directory fsynced so the name is durable too;
* :func:`write_new` creates a file that must not exist yet (never following a
  link) and fsyncs its contents; the caller fsyncs the directory once it has
  written all it creates there;
* :func:`append_durably` appends to a log and fsyncs it;
* :func:`fsync_dir` makes a new name, a rename or a removal in a directory
  durable.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["append_durably", "fsync_dir", "write_all", "write_atomic", "write_new"]

_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o600,
    *,
    exclusive: bool = False,
    sync_dir: bool = True,
    chmod: bool = True,
) -> None:
    """Write ``data`` to ``path`` so that a power cut leaves the old or the new file.

    The temporary file is created with ``mode`` from the start (never briefly
    readable by others), fsynced, renamed over ``path``, and the directory
    fsynced. ``exclusive``: hard-linked into place instead, so an existing
    ``path`` is never replaced (``FileExistsError``). ``sync_dir=False`` leaves
    the directory's fsync to a caller that writes several files into it.
    ``chmod=False`` leaves the mode to the umask, for filesystems without Unix
    modes (a FAT-formatted USB stick refuses a chmod).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, _CREATE_NEW, mode)
    try:
        try:
            if chmod:
                os.fchmod(fd, mode)  # umask may have narrowed it; make it exact
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_dir(target.parent)


def write_new(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o600, *, dir_fd: int | None = None
) -> None:
    """Create ``path`` (relative to ``dir_fd`` if given), write ``data`` and fsync it.

    Never follows a link and never replaces anything (``FileExistsError``).
    ``mode`` is subject to the umask, as for any new file."""
    fd = os.open(path, _CREATE_NEW, mode, dir_fd=dir_fd)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def append_durably(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Append ``data`` to ``path`` (created with ``mode`` if missing; never through
    a link) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
