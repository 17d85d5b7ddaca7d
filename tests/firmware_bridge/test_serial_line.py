"""Serial device errors in one line, and the line lock shared by daemon and commands."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from firmware_bridge.serial_line import (
    LOCK_DIR_ENV,
    LineBusy,
    LineLock,
    check_device,
    lock_dir,
    lock_path,
    open_problem,
)


@pytest.fixture
def pty() -> Iterator[str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.ENOENT, "does not exist: is the USB-RS485 adapter plugged in?"),
        (errno.EACCES, "permission denied on /dev/ttyUSB7: run as a user in"),
        (errno.EBUSY, "is busy: another program holds it open exclusively"),
        (errno.ENODEV, "unplugged or its driver failed"),
        (errno.ENOTTY, "is not a serial port"),
    ],
)
def test_open_problems_name_the_device_and_what_to_do(code: int, says: str) -> None:
    for exc in (OSError(code, os.strerror(code)), serial.SerialException(code, os.strerror(code))):
        text = open_problem("/dev/ttyUSB7", exc)
        assert says in text and "/dev/ttyUSB7" in text
        assert "\n" not in text and "meter" not in text and "Traceback" not in text


def test_pyserial_message_without_errno_is_still_understood() -> None:
    exc = serial.SerialException(
        "could not open port /dev/ttyUSB7: [Errno 13] Permission denied: '/dev/ttyUSB7'"
    )
    assert "permission denied" in open_problem("/dev/ttyUSB7", exc)


def test_check_device(pty: str, tmp_path: Path) -> None:
    assert check_device(pty) is None
    missing = check_device(str(tmp_path / "ttyUSB9"))
    assert missing is not None and "does not exist" in missing


def test_lock_is_exclusive_and_says_who_holds_it(pty: str, tmp_path: Path) -> None:
    daemon = LineLock(pty, "edgegw daemon (gateway gw-1)", tmp_path)
    daemon.acquire()
    with pytest.raises(LineBusy) as info:
        LineLock(pty, "edgegw meters read", tmp_path).acquire()
    assert "edgegw daemon (gateway gw-1), pid" in str(info.value)
    daemon.release()
    with LineLock(pty, "edgegw meters read", tmp_path) as lock:
        assert lock.held
    assert not lock.held


def test_two_names_of_one_device_share_a_lock(pty: str, tmp_path: Path) -> None:
    alias = tmp_path / "usb-FTDI_by-id"
    alias.symlink_to(pty)
    assert lock_path(str(alias), tmp_path) == lock_path(pty, tmp_path)
    with LineLock(pty, "daemon", tmp_path), pytest.raises(LineBusy):
        LineLock(str(alias), "cli", tmp_path).acquire()


def test_the_kernel_drops_the_lock_of_a_process_that_died(pty: str, tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from firmware_bridge.serial_line import LineLock;"
        f"LineLock({pty!r}, 'edgegw daemon', Path({str(tmp_path)!r})).acquire();"
        "print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(LineBusy, match=r"in use by edgegw daemon, pid \d+"):
            LineLock(pty, "cli", tmp_path).acquire()
        proc.kill()
        proc.wait(10)
        with LineLock(pty, "cli", tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait(10)


def test_lock_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path))
    assert lock_dir() == tmp_path
    assert lock_path("/dev/ttyUSB0").name in ("edgegw-ttyUSB0.lock",)
    monkeypatch.delenv(LOCK_DIR_ENV)
    assert lock_dir().is_dir()
