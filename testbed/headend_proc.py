"""``edgegw headend run`` as its own OS process, with its ``/metrics`` on a free
loopback port: the scale-out test and ``bench/fleet.py`` run several of them."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from testbed.broker import free_port

ROOT = Path(__file__).resolve().parents[1]


class HeadendProcess:
    """One headend process; ``args`` follow ``edgegw headend run`` (``--dsn``,
    ``--share``, ``--key``, ...). Its log (stderr) goes to ``log``."""

    def __init__(self, log: Path, args: list[str], *, metrics_refresh_s: float = 86400) -> None:
        self.log = log
        self.metrics_port = free_port()
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "headend", "run", *args,
             "--metrics", f"127.0.0.1:{self.metrics_port}",
             "--metrics-refresh-s", f"{metrics_refresh_s:g}"],
            stdout=subprocess.DEVNULL, stderr=self._out, stdin=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip

    def subscribed(self) -> bool:
        return "headend subscribed on" in self.log.read_text(errors="replace")

    def metrics(self, timeout_s: float = 10) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return str(r.read().decode())

    def metric(self, name: str) -> float:
        """The sum of metric ``name`` over all its labels."""
        return sum(
            float(m[1])
            for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", self.metrics(), re.M)
        )

    def batches(self) -> dict[str, float]:
        """``edgegw_headend_batches_total`` by status."""
        return {
            m[1]: float(m[2])
            for m in re.finditer(
                r'^edgegw_headend_batches_total\{status="(\w+)"\} (\S+)$', self.metrics(), re.M
            )
        }

    def stop(self, timeout_s: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
