"""Programs of the product run as real processes, to be killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """One program (``python -m MODULE ARGS``) started, killed and restarted by a test.

    Output of every run goes to ``log`` (appended), so a failure shows all lives.
    """

    def __init__(self, name: str, args: Sequence[str], log: Path, *, cwd: Path = ROOT) -> None:
        self.name = name
        self.args = list(args)
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def start(self) -> None:
        assert not self.running(), f"{self.name} is already running"
        with self.log.open("ab") as out:
            out.write(f"--- {self.name} start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, *self.args],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                cwd=self.cwd,
            )
        self.starts += 1

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: the process does nothing more from this instant (a power cut's first half)."""
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL and reap: no clean-up of any kind."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        self.proc.wait(30)
        self.proc = None

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.name} did not stop within {timeout_s} s:\n{self.tail()}") from None
        self.proc = None
        return rc

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def edgegw(name: str, args: Sequence[str], log: Path) -> Proc:
    """The ``edgegw`` command (as ``python -m gateway.cli``, i.e. this source tree)."""
    return Proc(name, ["-m", "gateway.cli", "-v", *args], log)


def start_gateway(config: Path, log: Path, *, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
    """``edgegw -v run --config CONFIG`` in the background, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "-v", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=cwd,
        )
