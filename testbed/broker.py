"""The test bench's MQTT broker: a real mosquitto per demo run or test, on a free loopback port.

Two configurations, one starter (:class:`Mosquitto`):

* **The shipped one** (:meth:`Mosquitto.shipped`): ``examples/mosquitto/mosquitto.conf``
  and ``edgegw.acl``, the files a deployment installs, rendered into the broker's
  working directory with only paths and the port substituted
  (:func:`render_shipped_config`): mutual TLS with certificates of one CA, the
  certificate's CN as MQTT username (``use_identity_as_username``), the CRL, the
  per-gateway ACL, persistence. Every directive the renderer substitutes must
  occur exactly once, so a change of the shipped file's shape fails loudly
  instead of silently testing something else. The demo and every test of link
  security run this.
* **A plain one** (:meth:`Mosquitto.plain`, the default constructor): one
  anonymous plaintext listener, for tests of what lies above the transport
  (store-and-forward, ingest, chaos) that do not need certificates.

The broker runs as a child process. :meth:`Mosquitto.start` waits until the port
accepts connections; :meth:`Mosquitto.stop` (SIGTERM), :meth:`Mosquitto.kill`
(SIGKILL, as on a power cut) and :meth:`Mosquitto.restart` follow. It logs to a
file in its working directory; :meth:`Mosquitto.sessions` reads from that log
which clients are connected and the username each was given (the certificate's
CN under the shipped configuration).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from firmware_bridge.errors import EdgeGwError, ErrorKind

__all__ = [
    "SHIPPED_DIR",
    "BrokerError",
    "Mosquitto",
    "TlsFiles",
    "free_port",
    "mosquitto_binary",
    "render_shipped_config",
    "wait_port",
]

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0  # until the port accepts; mosquitto itself needs milliseconds
RUNNING = b" running\n"  # the end of "mosquitto version X running", its last start-up line
# examples/ beside testbed/ in the source checkout (the test bench runs from there)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "examples" / "mosquitto"
SHIPPED_CONF = "mosquitto.conf"
SHIPPED_ACL = "edgegw.acl"


class BrokerError(EdgeGwError, RuntimeError):
    """mosquitto is missing, or did not start with the given configuration."""

    kind = ErrorKind.TRANSPORT


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The PKI files the shipped configuration names (all PEM)."""

    ca: Path  # the fleet CA: the only issuer of client certificates
    crl: Path  # that CA's certificate revocation list
    cert: Path  # the broker's server certificate (SAN 127.0.0.1 for the test bench)
    key: Path  # its private key


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, up: bool, timeout_s: float = 10.0) -> None:
    """Until 127.0.0.1:``port`` accepts connections (``up``) or refuses them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not come {'up' if up else 'down'} in {timeout_s}s")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if found is None:
        raise BrokerError(
            "mosquitto is not installed; ./dev test and ./dev demo install it"
            " (apt-get install mosquitto)"
        )
    return found


# Directive -> its rendered line; each must occur exactly once in the shipped file.
def _substitutions(port: int, workdir: Path, files: TlsFiles) -> dict[str, str]:
    return {
        "acl_file": f"acl_file {workdir / SHIPPED_ACL}",
        "persistence_location": f"persistence_location {workdir}/",
        "log_dest": f"log_dest file {workdir / 'mosquitto.log'}",
        "listener": f"listener {port} {HOST}",
        "certfile": f"certfile {files.cert}",
        "keyfile": f"keyfile {files.key}",
        "cafile": f"cafile {files.ca}",
        "crlfile": f"crlfile {files.crl}",
    }


def render_shipped_config(
    conf: str,
    *,
    port: int,
    workdir: Path,
    files: TlsFiles,
    overrides: Mapping[str, str | None] | None = None,
) -> str:
    """The shipped ``mosquitto.conf`` text with paths and port for ``workdir`` and ``port``.

    Only the directives naming files, the log destination and the listener
    change; comments and every other line stay as shipped. ``overrides``
    (directive -> new value, or None to drop the line) exists for tests that
    need a deliberately weakened broker to show that a check can fail; each
    overridden directive must occur in the file. Raises :class:`BrokerError`
    when a directive to substitute is missing or repeated.
    """
    subst = _substitutions(port, workdir, files)
    extra = dict(overrides or {})
    found = dict.fromkeys([*subst, *extra], 0)
    out = []
    for line in conf.splitlines():
        directive = line.split(None, 1)[0] if line.strip() and not line.startswith("#") else ""
        if directive in extra:
            found[directive] += 1
            value = extra[directive]
            if value is None:
                continue
            line = f"{directive} {value}"
        elif directive in subst:
            found[directive] += 1
            line = subst[directive]
        out.append(line)
    wrong = {d: n for d, n in found.items() if n != 1}
    if wrong:
        raise BrokerError(f"the shipped mosquitto.conf changed shape (directive: count): {wrong}")
    if os.geteuid() == 0:
        # started as root, mosquitto drops to the 'mosquitto' user, which cannot read
        # the private temporary directory holding the keys; it keeps the caller's user
        out.append("user root")
    return "\n".join(out) + "\n"


_CONNECTED = re.compile(r"New client connected from \S+ as (\S+) \(.*?u'(.*?)'\)")
_CONNECTED_ANON = re.compile(r"New client connected from \S+ as (\S+) \((?!.*u').*\)")
_GONE = re.compile(
    r"Client (\S+) (?:disconnected|closed its connection|has exceeded timeout)"
    r"|Socket error on client (\S+), disconnecting"
)


class Mosquitto:
    """One mosquitto process; ``with Mosquitto(...) as b:`` (or ``async with``) starts
    and stops it.

    The constructor makes the plain broker (anonymous, plaintext);
    :meth:`shipped` the one with the deployment's configuration.
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_conf: str = "",
        *,
        persistence: bool = False,
    ) -> None:
        self.workdir = workdir
        self.host = HOST
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.persistence = persistence
        self.tls: TlsFiles | None = None
        self.overrides: dict[str, str | None] = {}
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @classmethod
    def plain(
        cls, workdir: Path, *, port: int | None = None, extra_conf: str = "", persistence: bool = False
    ) -> Mosquitto:
        """One anonymous plaintext listener (``extra_conf`` appended to its configuration)."""
        return cls(workdir, port, extra_conf, persistence=persistence)

    @classmethod
    def shipped(
        cls,
        workdir: Path,
        tls: TlsFiles,
        *,
        port: int | None = None,
        overrides: Mapping[str, str | None] | None = None,
    ) -> Mosquitto:
        """The shipped configuration (``examples/mosquitto``) with these PKI files.

        ``workdir`` is the broker's own directory (config, ACL copy, log,
        persistence); it is created if missing."""
        b = cls(workdir, port)
        b.tls = tls
        b.overrides = dict(overrides or {})
        b.conf = workdir / SHIPPED_CONF
        b.log = workdir / "mosquitto.log"
        return b

    # -- configuration ---------------------------------------------------------------

    def _write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            shutil.copy(SHIPPED_DIR / SHIPPED_ACL, self.workdir / SHIPPED_ACL)
            text = render_shipped_config(
                (SHIPPED_DIR / SHIPPED_CONF).read_text(),
                port=self.port,
                workdir=self.workdir,
                files=self.tls,
                overrides=self.overrides,
            )
        else:
            persistence = (
                f"persistence true\npersistence_location {self.workdir}/\n"
                if self.persistence
                else "persistence false\n"
            )
            text = (
                f"listener {self.port} {HOST}\n"
                "allow_anonymous true\n"
                f"{persistence}"
                f"log_dest file {self.log}\n"
                "log_type error\nlog_type warning\nlog_type notice\n"
                "max_queued_messages 100000\n" + self.extra_conf
            )
            if os.geteuid() == 0:
                text += "\nuser root\n"
        # mosquitto listens before it loads the TLS files; its "running" line (an
        # information message) says it got past them (see start)
        text += "\nlog_type information\n"
        self.conf.write_text(text)

    def _running_lines(self) -> int:
        try:
            return self.log.read_bytes().count(RUNNING)
        except OSError:
            return 0

    # -- process ---------------------------------------------------------------------

    def _listens(self) -> bool:
        """Whether our mosquitto process holds the listening socket on our port (the
        port accepting is not enough: another process may have taken the free port)."""
        assert self.proc is not None
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                f = line.split()
                if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == self.port:
                    inodes.add(f"socket:[{f[9]}]")
        try:
            fds = list(Path(f"/proc/{self.proc.pid}/fd").iterdir())
        except OSError:
            return True  # no /proc to ask: the accepting port has to do
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return True
            except OSError:
                continue
        return False

    def start(self) -> None:
        """Start mosquitto and return once it has started: it holds the listening
        socket on our port and has logged that it runs (it opens its listeners
        before it loads certificates, and exits if they cannot be loaded)."""
        self._write_config()
        before = self._running_lines()
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                wait_port(self.port, up=True, timeout_s=0.1)
            except TimeoutError:
                continue
            if self.proc.poll() is None and self._listens() and self._running_lines() > before:
                return
            time.sleep(0.02)
        err = b""
        if self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()
        self.kill()
        raise BrokerError(
            f"mosquitto did not start with {self.conf}:\n"
            f"{err.decode(errors='replace')}{self.log_text()[-2000:]}"
        )

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without a goodbye, as on a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._reap()

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reap()

    def restart(self) -> None:
        self.kill()
        self.start()

    def _reap(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Mosquitto:
        """``async with``: started and stopped in a worker thread, off the event loop."""
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- what the broker saw ---------------------------------------------------------

    def settings(self) -> dict[str, list[str]]:
        """The configuration the broker was started with: directive -> its values in order."""
        out: dict[str, list[str]] = {}
        if not self.conf.exists():
            return out
        for line in self.conf.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                directive, _, value = line.strip().partition(" ")
                out.setdefault(directive, []).append(value.strip())
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def sessions(self) -> dict[str, str | None]:
        """Client id -> username (None: anonymous) of every session the log shows open."""
        open_: dict[str, str | None] = {}
        for line in self.log_text().splitlines():
            if m := _CONNECTED.search(line):
                open_[m.group(1)] = m.group(2)
            elif m := _CONNECTED_ANON.search(line):
                open_[m.group(1)] = None
            elif m := _GONE.search(line):
                open_.pop(m.group(1) or m.group(2), None)
        return open_
