"""Serial lines: what went wrong opening one, and who may use it.

Two things every RS-485 line needs whichever protocol it carries:

* :func:`open_problem` turns the error of opening a serial device into one
  line that names the device and says what to do (adapter missing,
  permission denied, port busy...), instead of a traceback or ``[Errno 2]``.
* :class:`LineLock` is an advisory lock per device, shared by the daemon and
  the commissioning commands: RS-485 has one master, and a technician's
  ``edgegw meters read`` must not talk over the daemon's polls. It is an
  ``flock`` on a lock file named after the device's real path (so
  ``/dev/serial/by-id/...`` and ``/dev/ttyUSB0`` share one lock), in
  ``$EDGEGW_LOCK_DIR``, else ``/run/lock``, else the temporary directory. The
  kernel drops the lock when its holder exits, however it exits.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import tempfile
from pathlib import Path

from firmware_bridge.errors import EdgeGwError, ErrorKind

LOCK_DIR_ENV = "EDGEGW_LOCK_DIR"
DEFAULT_LOCK_DIR = Path("/run/lock")


def open_problem(device: str, exc: BaseException) -> str:
    """One line: what happened opening ``device`` and what to do about it."""
    code = getattr(exc, "errno", None)
    if code is None and exc.__cause__ is not None:
        code = getattr(exc.__cause__, "errno", None)
    if code is None:  # pyserial puts the OSError text in its message
        text = str(exc)
        for name in ("ENOENT", "EACCES", "EBUSY"):
            if os.strerror(getattr(errno, name)) in text:
                code = getattr(errno, name)
                break
    if code == errno.ENOENT:
        return (
            f"serial device {device} does not exist: is the USB-RS485 adapter plugged in?"
            " (ls -l /dev/serial/by-id/ lists the adapters; put its path in bus.device)"
        )
    if code in (errno.EACCES, errno.EPERM):
        group = _group_of(device)
        who = f"the {group!r} group" if group else "the group that owns it"
        return (
            f"permission denied on {device}: run as a user in {who}"
            f" (sudo usermod -aG {group or 'GROUP'} USER, then log in again)"
        )
    if code == errno.EBUSY:
        return (
            f"serial device {device} is busy: another program holds it open exclusively"
            f" (find it with: fuser -v {device})"
        )
    if code in (errno.ENODEV, errno.ENXIO, errno.EIO):
        return (
            f"serial device {device} is not usable ({os.strerror(code)}): the adapter was"
            " unplugged or its driver failed; plug it in again"
        )
    if code == errno.ENOTTY:
        return f"{device} is not a serial port: check bus.device"
    detail = os.strerror(code) if isinstance(code, int) else str(exc) or type(exc).__name__
    return f"cannot open serial device {device}: {detail}"


def _group_of(device: str) -> str | None:
    try:
        return grp.getgrgid(os.stat(device).st_gid).gr_name
    except (OSError, KeyError):
        return None


def check_device(device: str) -> str | None:
    """Open and close ``device`` once (non-blocking, no controlling tty): the
    problem as :func:`open_problem` words it, or None when it opens."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        return open_problem(device, exc)
    os.close(fd)
    return None


def lock_dir() -> Path:
    """Where line locks live (see the module documentation)."""
    env = os.environ.get(LOCK_DIR_ENV)
    if env:
        return Path(env)
    if DEFAULT_LOCK_DIR.is_dir() and os.access(DEFAULT_LOCK_DIR, os.W_OK | os.X_OK):
        return DEFAULT_LOCK_DIR
    return Path(tempfile.gettempdir())


def lock_path(device: str, directory: Path | None = None) -> Path:
    """The lock file of ``device``: ``edgegw-<real path under /dev, / as ->.lock``."""
    real = os.path.realpath(device)
    name = real.removeprefix("/dev/").strip("/").replace("/", "-") or "root"
    return (directory or lock_dir()) / f"edgegw-{name}.lock"


class LineBusy(EdgeGwError):
    """Another process uses the line (``holder`` says who, when it said)."""

    kind = ErrorKind.BUSY

    def __init__(self, device: str, holder: str) -> None:
        who = holder or "another process"
        super().__init__(f"{device} is in use by {who}")
        self.device = device
        self.holder = holder


class LineLock:
    """An advisory lock on one serial device; see the module documentation.

    ``owner`` is written into the lock file while held, so a refused process can
    say who holds the line (e.g. ``edgegw daemon (gateway gw-01)``).
    """

    def __init__(self, device: str, owner: str, directory: Path | None = None) -> None:
        self.device = device
        self.owner = owner
        self.path = lock_path(device, directory)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`LineBusy`; never waits."""
        if self._fd is not None:
            return
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            # created by another user (the daemon's): locking needs no write access
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LineBusy(self.device, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{self.owner}, pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> LineLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return os.pread(fd, 200, 0).decode().strip()
    return ""
