"""The daemon's heartbeat: whether a gateway's daemon is running, for ``edgegw status``.

The daemon rewrites a small JSON file every few seconds (and at each change of its
life-cycle state: starting, running, stopping, stopped). Under systemd it lives in
``/run/edgegw`` (the unit's ``RuntimeDirectory``, a tmpfs): it costs the SD card
nothing and is gone after a reboot, as a running daemon is (:func:`path_for`). ``edgegw status`` reads it and tells:

- not running: no heartbeat, a clean stop recorded, or the recorded process is gone
  (a crash or a kill: the file still says running, the process does not exist);
- starting: the database is being opened (a recovery after a power cut can take
  minutes);
- running, since when;
- not responding: the process exists but has not written for three intervals;
- stopping.

The process is identified by its pid and its start time in clock ticks since boot
(``/proc/PID/stat``), so a recycled pid is not taken for the daemon. The pure part,
:func:`assess`, decides from the heartbeat, the current time and what is known of the
process.
"""

from __future__ import annotations

import enum
import os
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

RUNTIME_PATH = Path("/run/edgegw/heartbeat.json")  # the unit's RuntimeDirectory
INTERVAL_S = 5.0
LATE_INTERVALS = 3  # missed beats before a living process counts as not responding
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class Phase(enum.StrEnum):
    """What the daemon says of itself."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Run(enum.StrEnum):
    """What ``edgegw status`` concludes."""

    NOT_RUNNING = "not running"
    STARTING = "starting"
    RUNNING = "running"
    NOT_RESPONDING = "not responding"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Heartbeat:
    pid: int
    proc_start: int | None  # the process's start time, clock ticks since boot
    boot_id: str | None
    version: str
    started_ms: int  # when this run of the daemon started (wall clock)
    phase: Phase
    updated_ms: int  # when this beat was written (wall clock)
    interval_s: float
    link: str | None = None
    last_contact_ms: int | None = None
    detail: str = ""  # a stop's reason, a start's phase
    # the milestones the updater's health gate reads (gateway.update): buses,
    # poll_cycles and readings committed, acks from central
    health: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phase"] = self.phase.value
        d["health"] = dict(self.health)
        return d

    @classmethod
    def from_json(cls, d: Any) -> Heartbeat:
        """Raises ValueError/TypeError/KeyError on a file that is not a heartbeat."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return cls(
            pid=int(d["pid"]),
            proc_start=None if d.get("proc_start") is None else int(d["proc_start"]),
            boot_id=None if d.get("boot_id") is None else str(d["boot_id"]),
            version=str(d["version"]),
            started_ms=int(d["started_ms"]),
            phase=Phase(d["phase"]),
            updated_ms=int(d["updated_ms"]),
            interval_s=float(d["interval_s"]),
            link=None if d.get("link") is None else str(d["link"]),
            last_contact_ms=None if d.get("last_contact_ms") is None else int(d["last_contact_ms"]),
            detail=str(d.get("detail", "")),
            health={str(k): int(v) for k, v in dict(d.get("health") or {}).items()},
        )


@dataclass(frozen=True)
class Process:
    """What is known now of the process a heartbeat names."""

    exists: bool
    start: int | None = None  # its start time (None: /proc not readable)


@dataclass(frozen=True)
class Assessment:
    run: Run
    detail: str
    since_ms: int | None  # running/starting since, or stopped at (last beat)


def assess(hb: Heartbeat | None, proc: Process, now_ms: int, boot_id: str | None) -> Assessment:
    """The daemon's state from its last heartbeat and what is known of its process."""
    if hb is None:
        return Assessment(Run.NOT_RUNNING, "no heartbeat: not started since the last boot", None)
    if hb.boot_id is not None and boot_id is not None and hb.boot_id != boot_id:
        return Assessment(Run.NOT_RUNNING, "last ran before the current boot", hb.updated_ms)
    if hb.phase is Phase.STOPPED:
        why = f": {hb.detail}" if hb.detail else ""
        return Assessment(Run.NOT_RUNNING, f"stopped{why}", hb.updated_ms)
    same = proc.exists and (proc.start is None or hb.proc_start is None or proc.start == hb.proc_start)
    if not same:
        return Assessment(
            Run.NOT_RUNNING,
            f"ended without stopping cleanly (pid {hb.pid} is gone: crashed or killed)",
            hb.updated_ms,
        )
    silent_ms = now_ms - hb.updated_ms
    if silent_ms > LATE_INTERVALS * hb.interval_s * 1000:
        return Assessment(
            Run.NOT_RESPONDING,
            f"pid {hb.pid} exists but wrote no heartbeat for {silent_ms // 1000} s",
            hb.updated_ms,
        )
    if hb.phase is Phase.STARTING:
        return Assessment(Run.STARTING, hb.detail or "opening the database", hb.started_ms)
    if hb.phase is Phase.STOPPING:
        return Assessment(Run.STOPPING, hb.detail or "finishing polls", hb.started_ms)
    return Assessment(Run.RUNNING, f"pid {hb.pid}, version {hb.version}", hb.started_ms)


# -- I/O ----------------------------------------------------------------------------


def path_for(configured: Path | None, db_path: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon writes its heartbeat: ``gateway.heartbeat_file`` when given;
    under systemd the unit's runtime directory (``$RUNTIME_DIRECTORY``, /run/edgegw:
    tmpfs, nothing written to the SD card); otherwise (a development run) beside the
    database."""
    if configured is not None:
        return configured
    env = os.environ if env is None else env
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / RUNTIME_PATH.name
    return db_path.with_name(db_path.name + ".heartbeat")


def path_to_read(configured: Path | None, db_path: Path) -> Path:
    """Where ``edgegw status`` (outside the unit) finds the heartbeat: the configured
    file, the unit's /run/edgegw, or beside the database, the first that exists."""
    if configured is not None:
        return configured
    beside = db_path.with_name(db_path.name + ".heartbeat")
    if RUNTIME_PATH.exists() or not beside.exists():
        return RUNTIME_PATH
    return beside


def boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces
    try:
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def process(pid: int) -> Process:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return Process(False)
    except PermissionError:  # exists, another user's
        pass
    return Process(True, proc_start(pid))


def read(path: Path) -> Heartbeat | None:
    """The last heartbeat; None when there is none. A file that is not a heartbeat
    raises ValueError naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Heartbeat.from_json(orjson.loads(raw))
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a heartbeat file ({exc})") from exc


class Writer:
    """Writes the daemon's heartbeat (temp file and rename; no fsync: it lives in
    tmpfs, and a heartbeat lost in a power cut is correct, as the daemon is gone too).

    A directory that does not exist means no heartbeat (a development run without
    the unit's ``RuntimeDirectory``): said once, never an error."""

    def __init__(self, path: Path, *, version: str, started_ms: int, interval_s: float = INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.pid = os.getpid()
        self.proc_start = proc_start(self.pid)
        self.boot_id = boot_id()
        self.version = version
        self.started_ms = started_ms
        self.phase = Phase.STARTING
        self.detail = ""
        self.failed: str | None = None  # why the last write failed (said once per cause)

    def beat(
        self,
        now_ms: int,
        *,
        phase: Phase | None = None,
        detail: str | None = None,
        link: str | None = None,
        last_contact_ms: int | None = None,
        health: Mapping[str, int] | None = None,
    ) -> str | None:
        """Write one beat; returns the error text when a new cause of failure starts."""
        if phase is not None:
            self.phase = phase
        if detail is not None:
            self.detail = detail
        hb = Heartbeat(
            self.pid, self.proc_start, self.boot_id, self.version, self.started_ms, self.phase,
            now_ms, self.interval_s, link, last_contact_ms, self.detail, dict(health or {}),
        )
        tmp = self.path.with_name(f".{self.path.name}.{self.pid}")
        try:
            tmp.write_bytes(orjson.dumps(hb.to_json()))
            os.replace(tmp, self.path)
        except OSError as exc:
            cause = f"heartbeat {self.path} not written: {exc.strerror or exc}"
            new = cause != self.failed
            self.failed = cause
            return cause if new else None
        self.failed = None
        return None


# -- systemd ------------------------------------------------------------------------

UNIT = "edgegw.service"


def systemd_state(unit: str = UNIT) -> dict[str, str] | None:
    """The unit's ActiveState/SubState/MainPID as systemd sees it; None where systemd
    is not the service manager (a container, a development machine)."""
    if not Path("/run/systemd/system").is_dir():
        return None
    try:
        out = subprocess.run(
            ["systemctl", "show", unit, "--property=ActiveState,SubState,MainPID,ActiveEnterTimestamp"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return props or None
