"""Software updates that cannot brick a gateway: side-by-side releases, an atomic
switch, a health gate, and a way back that needs nobody.

Layout under the releases root (``/opt/edgegw``; ``--root`` for tests)::

    releases/<VERSION>/          one virtualenv per release, made from a bundle's
                                 wheelhouse (pip --no-index --require-hashes)
        edgegw-release.json      written last (after a sync): the release is complete
    current   -> releases/V      what edgegw.service runs (bin/edgegw)
    committed -> releases/V      the last release that passed its health gate; the
                                 updater and the boot-time recovery run from here
    update-state.json            the trial marker and the version floor
    .lock                        flock(2): one updater at a time

The switch (:meth:`Updater.apply`), each step durable before the next::

    verify bundle, policy        refused: nothing changes
    install releases/NEW         a venv; complete only with its marker
    state: switching OLD->NEW    (the marker a power cut is judged by)
    current.tmp -> NEW, rename over current, fsync
    state: trial (boot id, deadline on CLOCK_BOOTTIME)
    restart the daemon           it runs NEW
    health gate                  the daemon's heartbeat (gateway.heartbeat): NEW's
                                 version, this boot, not the process of before the
                                 switch, running (database open), a poll cycle
                                 committed, progress; then it must stay up with the
                                 same process for the settle time
    healthy:   state: committing; committed -> NEW; floor raised to NEW's
               min_version; state: idle
    otherwise: state: rolling-back; current -> OLD; restart; state: idle

:meth:`Updater.recover` (run first by every updater, and at boot before the
daemon starts) finishes what an interruption left: ``switching`` and
``rolling-back`` go back to OLD; ``trial`` in the same boot goes on waiting for
health until its deadline, a ``trial`` of an earlier boot (a power cut during
the trial) goes back to OLD; ``committing`` finishes the commit. ``current``
always names a complete release: there is never no release. A bundle whose
trial failed is not tried again automatically; one that was interrupted is
tried again, at most ``max_attempts`` times.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from firmware_bridge.durable import append_durably, fsync_dir, write_atomic
from firmware_bridge.errors import EdgeGwError, ErrorKind
from gateway import heartbeat
from gateway.heartbeat import Heartbeat, Phase, Process
from gateway.security.envelope import CommandResult, check_signature, parse_envelope
from gateway.security.roles import CommandType, TrustStore
from provisioning.bundle import BundleError, VerifyKey, format_time
from provisioning.software_bundle import (
    DEFAULT_MAX_BYTES,
    REQUIREMENTS,
    SUFFIX,
    WHEELS,
    InstalledSoftware,
    SoftwarePolicyError,
    Version,
    decide,
    open_bundle,
)

STATE_FILE = "update-state.json"
MARKER = "edgegw-release.json"
AUDIT_KIND = "software.update"
MILESTONES = ("ready", "poll", "progress", "uplink")
DEFAULT_REQUIRE = frozenset({"ready", "poll", "progress"})
IDLE, SWITCHING, TRIAL, COMMITTING, ROLLING_BACK = (
    "idle",
    "switching",
    "trial",
    "committing",
    "rolling-back",
)
StepFn = Callable[[str], None]


class UpdateError(EdgeGwError):
    """The releases root itself is unusable (not a bundle problem)."""

    kind = ErrorKind.STORAGE


# ---------------------------------------------------------------------------
# The health verdict (pure)


def health_verdict(
    hb: Heartbeat | None,
    *,
    version: str,
    boot: str | None,
    before: tuple[int, int | None] | None = None,
    require: frozenset[str] = DEFAULT_REQUIRE,
    process: Callable[[int], Process] = heartbeat.process,
) -> str | None:
    """None when heartbeat ``hb`` shows a healthy daemon of ``version`` in this boot,
    not the process ``before`` (pid, start) that ran at the switch; otherwise what
    is still missing (for the log and the record)."""
    if hb is None:
        return "no heartbeat yet"
    if hb.version != version:
        return f"the daemon runs version {hb.version!r}, not {version}"
    if hb.boot_id != boot:
        return "the heartbeat is from another boot"
    if before is not None and (hb.pid, hb.proc_start) == tuple(before):
        return "still the daemon process of before the switch"
    proc = process(hb.pid)
    if not proc.exists or (None not in (proc.start, hb.proc_start) and proc.start != hb.proc_start):
        return f"the daemon (pid {hb.pid}) is not running"
    if hb.phase is not Phase.RUNNING:
        if "ready" in require or hb.phase is Phase.STOPPED:
            return f"the daemon is {hb.phase.value} ({hb.detail or 'database not open yet'})"
    h = hb.health
    buses, cycles = h.get("buses", 0), h.get("poll_cycles", 0)
    if "poll" in require and buses and cycles < 1:
        return "no poll cycle committed yet"
    if "uplink" in require and h.get("acks", 0) < 1:
        return "no batch acknowledged by central yet"
    progressed = max(h.get("acks", 0), h.get("readings", 0), cycles) >= 1
    if "progress" in require and buses and not progressed:
        return "no outbox or uplink progress yet"
    return None


def read_heartbeat(path: Path) -> Heartbeat | None:
    try:
        return heartbeat.read(path)
    except ValueError:
        return None


def read_boot_id() -> str:
    return heartbeat.boot_id() or "unknown"


def boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# ---------------------------------------------------------------------------
# Settings and records


@dataclass
class UpdateSettings:
    root: Path
    heartbeat_file: Path  # /run/edgegw/heartbeat.json
    restart: Callable[[], None]
    verify_key: VerifyKey
    python: str = field(default_factory=lambda: getattr(sys, "_base_executable", sys.executable))
    health_timeout_s: float = 300.0
    settle_s: float = 30.0
    poll_s: float = 0.5
    require: frozenset[str] = DEFAULT_REQUIRE
    audit_spool: Path | None = None
    trust: TrustStore | None = None  # operations keys for downgrade permits
    gateway_id: str | None = None
    boot_id: str = field(default_factory=read_boot_id)
    max_attempts: int = 3
    max_bytes: int = DEFAULT_MAX_BYTES
    keep_releases: int = 2  # complete releases kept besides current and committed


@dataclass(frozen=True)
class UpdateResult:
    outcome: str  # "committed" | "noop" | "refused" | "rolled-back" | "interrupted" | "failed"
    code: str
    reason: str
    source: str
    version: str | None = None
    digest: str | None = None
    running: str | None = None  # the version current names afterwards
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "code": self.code,
            "reason": self.reason,
            "source": self.source,
            "version": self.version,
            "bundle_sha256": self.digest,
            "running": self.running,
            "at": format_time(self.at),
        }


# ---------------------------------------------------------------------------
# Downgrade permits: a signed software.offer with allow_downgrade


def permit_problem(
    raw: bytes, trust: TrustStore | None, gateway_id: str | None, digest: str, now_ms: int
) -> str | None:
    """None when ``raw`` is a signed operations-role ``software.offer`` for this
    gateway, not expired, allowing the downgrade to exactly the bundle ``digest``.

    The daemon has applied the command through the command path (counter,
    replay, trusted time); the updater, which runs as root and does not open
    the daemon's database, checks the signature again so that the service
    user alone cannot allow a downgrade."""
    if trust is None or gateway_id is None:
        return "no trust store or gateway id to check a downgrade permit with"
    parsed = parse_envelope(raw)
    if isinstance(parsed, CommandResult):
        return f"permit: {parsed.message}"
    auth = check_signature(parsed, trust, revoked=frozenset())
    if isinstance(auth, CommandResult):
        return f"permit: {auth.message}"
    env = auth
    if env.type is not CommandType.SOFTWARE_OFFER:
        return f"permit: a {env.type}, not a software.offer"
    if env.target != gateway_id:
        return f"permit: for gateway {env.target!r}"
    if env.expires_at_ms <= now_ms:
        return "permit: expired"
    if env.body.get("sha256") != digest or env.body.get("allow_downgrade") is not True:
        return "permit: does not allow a downgrade to this bundle"
    return None


# ---------------------------------------------------------------------------
# The updater


class Updater:
    """One releases root; see the module docstring. ``step`` is called with a label
    at every point where an interruption is possible (the crash tests stop there)."""

    def __init__(self, settings: UpdateSettings, *, step: StepFn | None = None) -> None:
        self.s = settings
        self.root = settings.root
        self.releases = settings.root / "releases"
        self.step = step or (lambda label: None)

    # -- state ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        try:
            doc = json.loads((self.root / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return {"phase": IDLE}
        except ValueError as exc:
            raise UpdateError(f"{self.root / STATE_FILE}: not JSON ({exc})") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("phase"), str):
            raise UpdateError(f"{self.root / STATE_FILE}: not an update state")
        return doc

    def _save(self, doc: dict[str, Any]) -> None:
        write_atomic(self.root / STATE_FILE, json.dumps(doc, sort_keys=True).encode(), 0o644)

    def link(self, name: str) -> str | None:
        """The version a link names (``releases/<V>``), or None."""
        try:
            target = os.readlink(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UpdateError(f"{self.root / name} is not a symlink") from exc
        parts = Path(target).parts
        if len(parts) != 2 or parts[0] != "releases":
            raise UpdateError(f"{self.root / name} points outside releases/: {target!r}")
        return parts[1]

    def _swap(self, name: str, version: str) -> None:
        link = self.root / name
        tmp = self.root / f"{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(f"releases/{version}", tmp)
        self.step(f"{name}-link-made")
        os.rename(tmp, link)
        fsync_dir(self.root)

    def info(self, version: str | None) -> dict[str, Any] | None:
        """A complete release's marker (None: not there or not complete)."""
        if version is None:
            return None
        try:
            doc = json.loads((self.releases / version / MARKER).read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def installed(self) -> InstalledSoftware | None:
        """The committed release and the version floor (the policy's view)."""
        name = self.link("committed") or self.link("current")
        info = self.info(name)
        if name is None or info is None:
            return None
        version = Version.parse(info["version"])
        floor_text = self.state().get("floor")
        floor = Version.parse(floor_text) if floor_text else Version.parse(info["min_version"])
        return InstalledSoftware(version, info.get("digest"), floor)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.releases.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- records ---------------------------------------------------------------

    def _record(self, result: UpdateResult) -> UpdateResult:
        """One line for the daemon's audit log and central (the provisioning audit
        spool, which the daemon imports), owned like its directory so that the
        service user can take it."""
        spool = self.s.audit_spool
        if spool is not None:
            line = json.dumps({"kind": AUDIT_KIND, "detail": result.to_json()}, sort_keys=True)
            spool.parent.mkdir(parents=True, exist_ok=True)
            append_durably(spool, line.encode() + b"\n")
            st = spool.parent.stat()
            if os.geteuid() == 0 and spool.stat().st_uid != st.st_uid:
                os.chown(spool, st.st_uid, st.st_gid)
        print(
            f"update {result.source}: {result.outcome} ({result.code}): {result.reason}",
            file=sys.stderr,
        )
        return result

    # -- installing a release ------------------------------------------------

    def install_release(self, bundle: Path) -> tuple[dict[str, Any], bool]:
        """Verify ``bundle`` and make its release (a venv) under releases/; returns
        the release's marker and whether it was there already. Caller holds the lock."""
        unpack = self.releases / f".unpack-{os.getpid()}-{secrets.token_hex(4)}"
        shutil.rmtree(unpack, ignore_errors=True)
        vs = open_bundle(bundle, self.s.verify_key, extract_to=unpack, max_bytes=self.s.max_bytes)
        try:
            version = vs.manifest.version.text
            have = self.info(version)
            if have is not None and have.get("digest") == vs.digest:
                return have, True
            target = self.releases / version
            if version in (self.link("current"), self.link("committed")):
                # only reached for a conflicting bundle, which decide() refuses first
                raise UpdateError(f"release {version} is in use")
            shutil.rmtree(target, ignore_errors=True)
            self.step("install-started")
            self._make_venv(target, unpack)
            self.step("venv-made")
            marker = {
                "version": version,
                "min_version": vs.manifest.min_version.text,
                "digest": vs.digest,
                "bundle_id": vs.manifest.bundle_id,
                "installed_at": format_time(datetime.now(UTC)),
            }
            os.sync()  # every file of the venv on disk before the marker says "complete"
            write_atomic(target / MARKER, json.dumps(marker, sort_keys=True).encode(), 0o644)
            self.step("installed")
            return marker, False
        finally:
            shutil.rmtree(unpack, ignore_errors=True)

    def _make_venv(self, target: Path, wheelhouse: Path) -> None:
        pips = sorted((wheelhouse / WHEELS).glob("pip-*.whl"))
        if not pips:
            raise BundleError("the bundle carries no pip wheel to install with", code="no-pip")
        r = subprocess.run(
            [self.s.python, "-m", "venv", "--without-pip", str(target)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise UpdateError(f"venv {target}: {r.stderr.strip() or r.stdout.strip()}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
        r = subprocess.run(
            [
                str(target / "bin" / "python"), f"{pips[-1]}/pip", "install", "--isolated",
                "--no-index", "--find-links", str(wheelhouse / WHEELS), "--require-hashes",
                "--only-binary", ":all:", "--no-cache-dir", "--disable-pip-version-check",
                "--quiet", "-r", str(wheelhouse / REQUIREMENTS),
            ],
            capture_output=True, text=True, timeout=1800, env=env, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
            raise BundleError(
                "installing the wheelhouse failed: " + " | ".join(tail), code="install-failed"
            )

    # -- the switch --------------------------------------------------------------

    def apply(self, bundle: Path, *, source: str = "", permit: bytes | None = None) -> UpdateResult:
        """Verify, install, switch to and judge one bundle; never raises for a bad bundle."""
        source = source or bundle.name
        with self._locked():
            self._recover_locked()
            digest = version = None
            try:
                from_version = self.link("current")
                vs = open_bundle(bundle, self.s.verify_key, max_bytes=self.s.max_bytes)
                digest, version = vs.digest, vs.manifest.version.text
                allowed = False
                if permit is not None:
                    problem = permit_problem(
                        permit, self.s.trust, self.s.gateway_id, vs.digest, int(time.time() * 1000)
                    )
                    allowed = problem is None
                    if problem:
                        print(f"update {source}: {problem}", file=sys.stderr)
                state = self.state()
                if vs.digest in state.get("failed", []):
                    raise SoftwarePolicyError(
                        f"version {version} failed its health gate here before; "
                        "it is not tried again",
                        code="failed-before",
                    )
                if not decide(
                    vs.manifest,
                    vs.digest,
                    self.installed(),
                    python=f"{sys.version_info[0]}.{sys.version_info[1]}",
                    machine=platform.machine(),
                    downgrade_allowed=allowed,
                ):
                    return self._record(
                        UpdateResult(
                            "noop", "already-installed", f"version {version} is in force",
                            source, version, digest, from_version,
                        )
                    )  # fmt: skip
                attempts = dict(state.get("attempts", {}))
                attempts[vs.digest] = int(attempts.get(vs.digest, 0)) + 1
                if attempts[vs.digest] > self.s.max_attempts:
                    raise SoftwarePolicyError(
                        f"version {version} was interrupted {self.s.max_attempts} times; "
                        "not tried again",
                        code="too-many-attempts",
                    )
                self._save({**state, "attempts": attempts})
                marker, _ = self.install_release(bundle)
            except (BundleError, UpdateError, OSError, subprocess.SubprocessError) as exc:
                code = exc.code if isinstance(exc, BundleError) else "io-error"
                return self._record(
                    UpdateResult(
                        "refused", code, str(exc), source, version, digest, self.link("current")
                    )
                )
            if from_version is None:
                raise UpdateError("no release is current: install one with install.sh first")
            trial = {
                "from": from_version,
                "to": marker["version"],
                "digest": marker["digest"],
                "source": source,
                "downgrade": allowed,
            }
            old = read_heartbeat(self.s.heartbeat_file)
            if old is not None:
                trial["before"] = [old.pid, old.proc_start]
            state = self.state()
            self._save({**state, "phase": SWITCHING, "trial": trial})
            self.step("switching")
            self._swap("current", marker["version"])
            self.step("current-swapped")
            now = boottime_ns()
            trial.update(
                boot_id=self.s.boot_id,
                switched_ns=now,
                deadline_ns=now + int(self.s.health_timeout_s * 1e9),
            )
            self._save({**state, "phase": TRIAL, "trial": trial})
            self.step("trial")
            self._restart()
            self.step("restarted")
            return self._judge(trial)

    def _restart(self) -> None:
        try:
            self.s.restart()
        except Exception as exc:  # the health gate decides; a failed restart shows there
            print(f"update: restarting the daemon failed: {exc}", file=sys.stderr)

    def _judge(self, trial: dict[str, Any]) -> UpdateResult:
        """Wait for the health gate of ``trial`` (until its deadline), then commit or
        roll back. Caller holds the lock."""
        why = self._wait_healthy(trial)
        if why is None:
            return self._commit(trial)
        return self._roll_back(trial, "rolled-back", "unhealthy", f"not healthy in time: {why}")

    def _wait_healthy(self, trial: dict[str, Any]) -> str | None:
        why: str | None = "not checked"
        healthy_since: float | None = None
        pid: int | None = None
        while True:
            hb = read_heartbeat(self.s.heartbeat_file)
            before = trial.get("before")
            why = health_verdict(
                hb,
                version=trial["to"],
                boot=self.s.boot_id,
                before=(before[0], before[1]) if isinstance(before, list) else None,
                require=self.s.require,
            )
            now = time.monotonic()
            if why is None:
                assert hb is not None
                if pid != hb.pid:
                    pid, healthy_since = hb.pid, now  # a new process starts settling anew
                elif healthy_since is not None and now - healthy_since >= self.s.settle_s:
                    return None
            else:
                healthy_since = pid = None
            if boottime_ns() >= int(trial["deadline_ns"]):
                return why or "did not stay up for the settle time"
            time.sleep(self.s.poll_s)

    def _commit(self, trial: dict[str, Any]) -> UpdateResult:
        state = self.state()
        self._save({**state, "phase": COMMITTING, "trial": trial})
        self.step("committing")
        self._swap("committed", trial["to"])
        self.step("committed-swapped")
        info = self.info(trial["to"]) or {}
        floor = Version.parse(info.get("min_version", trial["to"]))
        old = state.get("floor")
        if old and not trial.get("downgrade") and Version.parse(old) > floor:
            floor = Version.parse(old)
        attempts = {k: v for k, v in state.get("attempts", {}).items() if k != trial["digest"]}
        self._save(
            {"phase": IDLE, "floor": floor.text, "failed": state.get("failed", []),
             "attempts": attempts, "last": {"outcome": "committed", **trial}}
        )  # fmt: skip
        self.step("idle")
        self._prune()
        return self._record(
            UpdateResult(
                "committed", "ok",
                f"version {trial['to']} is healthy and committed (floor {floor})",
                trial.get("source", ""), trial["to"], trial.get("digest"), trial["to"],
            )
        )  # fmt: skip

    def _roll_back(
        self, trial: dict[str, Any], outcome: str, code: str, reason: str, *, restart: bool = True
    ) -> UpdateResult:
        state = self.state()
        self._save({**state, "phase": ROLLING_BACK, "trial": trial})
        self.step("rolling-back")
        if self.link("current") != trial["from"]:
            self._swap("current", trial["from"])
            self.step("rolled-back-swapped")
        if restart:
            self._restart()
        failed = list(state.get("failed", []))
        if outcome == "rolled-back" and trial.get("digest") not in failed:
            failed.append(trial["digest"])
        self._save(
            {"phase": IDLE, "floor": state.get("floor"), "failed": failed,
             "attempts": state.get("attempts", {}), "last": {"outcome": outcome, **trial}}
        )  # fmt: skip
        self.step("idle")
        return self._record(
            UpdateResult(
                outcome, code, f"{reason}; version {trial['from']} is running again",
                trial.get("source", ""), trial.get("to"), trial.get("digest"), trial["from"],
            )
        )  # fmt: skip

    def _prune(self) -> None:
        keep = {self.link("current"), self.link("committed")}
        complete = []
        for entry in self.releases.iterdir():
            if entry.name in keep:
                continue
            info = self.info(entry.name)
            if info is None or entry.is_symlink():
                _remove(entry)
            else:
                complete.append((Version.parse(info["version"]), entry))
        complete.sort(key=lambda t: t[0], reverse=True)
        for _, entry in complete[self.s.keep_releases :]:
            _remove(entry)
        fsync_dir(self.releases)

    # -- recovery ------------------------------------------------------------------

    def recover(self, *, restart: bool = True) -> UpdateResult | None:
        """Finish or undo what an interruption left (see the module docstring)."""
        with self._locked():
            return self._recover_locked(restart=restart)

    def _recover_locked(self, *, restart: bool = True) -> UpdateResult | None:
        for name in ("current.tmp", "committed.tmp"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
        for entry in self.releases.glob(".unpack-*"):
            _remove(entry)
        state = self.state()
        phase, raw_trial = state["phase"], state.get("trial")
        result: UpdateResult | None = None
        if phase != IDLE and not isinstance(raw_trial, dict):
            raise UpdateError(f"{STATE_FILE}: phase {phase} without a trial")
        trial: dict[str, Any] = raw_trial if isinstance(raw_trial, dict) else {}
        if phase == COMMITTING:
            result = self._commit(trial)  # the health gate had passed
        elif phase in (SWITCHING, ROLLING_BACK):
            result = self._roll_back(
                trial, "interrupted", "interrupted",
                f"the switch to {trial['to']} was interrupted", restart=restart,
            )  # fmt: skip
        elif phase == TRIAL:
            if trial.get("boot_id") == self.s.boot_id:
                # the updater stopped during the trial: the daemon may not have been
                # restarted onto the new release yet; then judge it as before
                if restart:
                    self._restart()
                result = self._judge(trial)
            else:
                result = self._roll_back(
                    trial, "interrupted", "interrupted",
                    f"the gateway restarted during the trial of {trial['to']}", restart=False,
                )  # fmt: skip
        cur = self.link("current")
        if self.info(cur) is None:
            good = self.link("committed")
            if good is None or self.info(good) is None:
                raise UpdateError("neither current nor committed names a complete release")
            self._swap("current", good)
            if restart:
                self._restart()
        return result

    # -- the spool -------------------------------------------------------------------

    def apply_spool(self, spool: Path) -> list[UpdateResult]:
        """Apply every bundle in ``<spool>/ready`` (oldest first), then remove it.

        A bundle stays while its attempt was interrupted (so it is tried again);
        one below the version floor goes to ``<spool>/held/`` until a signed offer
        allows it; ``<spool>/permits/<sha256>.json`` is that permit."""
        ready = spool / "ready"
        results: list[UpdateResult] = []
        if not ready.is_dir():
            return results
        bundles = sorted(
            (p for p in ready.iterdir() if p.name.endswith(SUFFIX) and p.is_file()),
            key=lambda p: (p.stat().st_mtime_ns, p.name),
        )
        for bundle in bundles:
            permit = None
            stem = bundle.name[: -len(SUFFIX)]
            with contextlib.suppress(OSError):
                permit = (spool / "permits" / f"{stem}.json").read_bytes()
            result = self.apply(bundle, source=bundle.name, permit=permit)
            results.append(result)
            if result.code == "below-floor" and result.digest is not None:
                # kept until a signed offer allows it (the daemon moves it back to ready/)
                held = spool / "held"
                held.mkdir(mode=0o700, exist_ok=True)
                os.replace(bundle, held / f"{result.digest}{SUFFIX}")
                fsync_dir(held)
                fsync_dir(ready)
            elif result.outcome != "interrupted":
                with contextlib.suppress(FileNotFoundError):
                    bundle.unlink()
                fsync_dir(ready)
        return results

    def status(self) -> dict[str, Any]:
        releases = sorted(
            p.name for p in self.releases.iterdir() if self.info(p.name) is not None
        ) if self.releases.is_dir() else []  # fmt: skip
        return {
            "current": self.link("current"),
            "committed": self.link("committed"),
            "releases": releases,
            **self.state(),
        }


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def restart_command(argv: Sequence[str]) -> Callable[[], None]:
    """A ``restart`` callable running ``argv`` (``systemctl --no-block restart edgegw``)."""

    def restart() -> None:
        subprocess.run(list(argv), check=True, timeout=60, capture_output=True)

    return restart
