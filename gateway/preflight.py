"""Pre-flight: will the daemon find what the configuration names on this machine?

The loader (:mod:`gateway.config`) checks what a file says. ``edgegw config
check`` also looks at the machine, so a file that would fail at run time is
refused before the service starts:

* every file it names exists and is readable **by the service user**: the
  ``edgegw`` user when it exists and the check runs as root (checked by a child
  process running as that user, so permissions, groups and ACLs count as they
  will for the service), otherwise the user running the check (said so);
* for the service user, what the installed unit's sandbox hides is a problem
  too (``ProtectHome=``, ``PrivateTmp=``, ``ProtectSystem=strict`` with only
  the state directory writable, ``DevicePolicy=closed`` with serial ports only;
  see systemd/edgegw.service);
* the broker CA parses, the client certificate and key parse, match and are
  within their validity; the trust file, the keystore and a storage key file
  load as the daemon loads them;
* serial devices exist and are character devices the user may open;
* the storage directory exists or can be created, and its file system has
  more free space than ``storage.reserve_bytes``.

Every problem names the key and the line of the file, like the loader's.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import os
import pwd
import shutil
import ssl
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import BrokerSection, ConfigReport, KeyPath
from gateway.security.roles import TrustError, TrustStore
from provisioning.keys import Keystore, KeystoreError
from store_forward.sealing import StorageKeyError, load_storage_key
from store_forward.uplink import tls_context

SERVICE_USER = "edgegw"
# What systemd/edgegw.service does to the daemon's view of the file system
# (tests/gateway/test_preflight.py checks these against the unit file).
STATE_DIRECTORY = Path("/var/lib/edgegw")  # StateDirectory=edgegw: the only writable place for data
HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # PrivateTmp=yes
# ReadWritePaths=: node_exporter's textfile collector directories (the usual one and
# Debian's prometheus-node-exporter's), where [metrics] textfile may be written.
TEXTFILE_DIRECTORIES = (Path("/var/lib/node_exporter/textfile_collector"), Path("/var/lib/prometheus/node-exporter"))
SERIAL_DRIVERS = ("ttyUSB", "ttyACM", "ttyAMA", "ttyS")  # DeviceAllow=char-<driver> rw
CERT_EXPIRY_WARNING = dt.timedelta(days=30)


@dataclass(frozen=True)
class Account:
    """Whose view of the machine is checked."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool  # checked by a child process running as this user (needs root)
    sandboxed: bool  # the service unit's sandbox applies

    def how(self) -> str:
        if self.switch:
            role = " (the service user)" if self.name == SERVICE_USER else ""
            return f"checked as user {self.name!r}{role}, by a process running as it"
        if os.geteuid() == 0:
            return (
                f"checked as {self.name!r}: no {SERVICE_USER!r} user on this machine, so what the"
                " service may read is not known"
            )
        return (
            f"checked as {self.name!r}, the user running this check; run it as root to check"
            f" as the service user {SERVICE_USER!r}"
        )


def account_for(requested: str | None) -> Account:
    """The service user when it exists and we are root (or ``requested``), else
    the current user. Raises KeyError for an unknown ``requested`` user and
    PermissionError when another user is asked for without root."""
    root = os.geteuid() == 0
    name = requested
    if name is None and root:
        try:
            pwd.getpwnam(SERVICE_USER)
            name = SERVICE_USER
        except KeyError:
            name = None
    if name is None:
        me = pwd.getpwuid(os.geteuid())
        return Account(me.pw_name, me.pw_uid, me.pw_gid, tuple(os.getgroups()), False, False)
    pw = pwd.getpwnam(name)
    if pw.pw_uid == os.geteuid():
        return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgroups()), False, name == SERVICE_USER)
    if not root:
        raise PermissionError(f"only root can check as another user ({name!r})")
    groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    if name == SERVICE_USER:
        groups = _with_dialout(groups)  # SupplementaryGroups=dialout in the unit
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, True, name == SERVICE_USER)


def _with_dialout(groups: tuple[int, ...]) -> tuple[int, ...]:
    try:
        dialout = grp.getgrnam("dialout").gr_gid
    except KeyError:
        return groups
    return groups if dialout in groups else (*groups, dialout)


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Need:
    """A path the daemon will use, and how."""

    key: KeyPath
    path: Path
    mode: str  # "r" file read, "d" directory read, "rw" device, "w" directory to create files in
    target: Path | None = None  # "w": the directory the daemon will write (path: its nearest existing part)


# ---------------------------------------------------------------------------
# Access as another user


_ACCESS = {"r": os.R_OK, "d": os.R_OK | os.X_OK, "rw": os.R_OK | os.W_OK, "w": os.W_OK | os.X_OK}


def _probe(needs: Sequence[tuple[str, str]]) -> list[str | None]:
    out: list[str | None] = []
    for path, mode in needs:
        try:
            os.stat(path)
        except PermissionError:
            out.append("permission denied (a directory on the way cannot be searched)")
            continue
        except OSError as exc:
            out.append(exc.strerror or str(exc))
            continue
        out.append(None if os.access(path, _ACCESS[mode]) else "permission denied")
    return out


def access_problems(account: Account, needs: Sequence[tuple[str, str]]) -> list[str | None]:
    """For each (path, mode): None if ``account`` may use it so, else why not.

    For another user a forked child drops to its uid, gid and groups and asks
    access(2), which uses the real ids: permissions, groups and ACLs count as
    they will for the service."""
    if not needs:
        return []
    if not account.switch:
        return _probe(needs)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            os.setgroups(list(account.groups))
            os.setgid(account.gid)
            os.setuid(account.uid)
            data = json.dumps(_probe(needs)).encode()
            while data:
                data = data[os.write(w, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return [f"could not check as user {account.name!r}"] * len(needs)
    result: list[str | None] = json.loads(b"".join(chunks))
    return result


# ---------------------------------------------------------------------------
# The checks


def preflight(
    report: ConfigReport,
    account: Account,
    *,
    now: dt.datetime | None = None,
    proc_devices: Path = Path("/proc/devices"),
) -> Findings:
    """Every machine-level problem of the file behind ``report`` (which may have
    problems of its own: whatever part of it is valid is checked)."""
    at = now or dt.datetime.now(dt.UTC)
    f = Findings()
    v = report.values
    needs: list[_Need] = []

    def problem(key: KeyPath, text: str) -> None:
        f.problems.append(report.problem(key, text))

    storage, broker, security = v.get("storage", {}), v.get("broker", {}), v.get("security", {})
    if broker.get("tls"):
        for k in ("ca_file", "cert_file", "key_file"):
            if k in broker:
                needs.append(_Need(("broker", k), broker[k], "r"))
    else:
        for k in ("ca_file", "cert_file", "key_file"):
            if k in broker:
                f.warnings.append(report.problem(("broker", k), "ignored: broker.tls is not true"))
    if "key_file" in storage:
        needs.append(_Need(("storage", "key_file"), storage["key_file"], "r"))
    if "trust_file" in security:
        needs.append(_Need(("security", "trust_file"), security["trust_file"], "r"))
    if "keystore" in security:
        needs.append(_Need(("security", "keystore"), security["keystore"], "d"))
    for i, a in report.accounts:
        needs.append(_Need(("account", i, "settings"), a.settings, "r"))
        needs += [_Need(("account", i, "tariffs"), t, "r") for t in a.tariffs]
    for i, bus in report.buses:
        if bus.type == "serial" and bus.device:
            needs.append(_Need(("bus", i, "device"), Path(bus.device), "rw"))
    textfile = v.get("metrics", {}).get("textfile")
    if textfile is not None:
        directory = Path(textfile).parent
        if not directory.is_dir():  # the daemon writes into it, it does not make it
            problem(("metrics", "textfile"), f"{directory}: no such directory (node_exporter's textfile directory)")
        else:
            needs.append(_Need(("metrics", "textfile"), directory, "w", directory))

    store_dir: Path | None = None
    if "path" in storage:
        db = Path(storage["path"])
        store_dir = db.parent
        existing = _nearest_existing(store_dir)
        if existing is None or not existing.is_dir():
            problem(("storage", "path"), f"{store_dir}: cannot be created ({existing} is not a directory)")
            store_dir = None
        elif not (
            account.sandboxed
            and _under(Path(os.path.abspath(store_dir)), (STATE_DIRECTORY,)) is not None
            and not STATE_DIRECTORY.exists()
        ):  # (systemd creates the service's state directory, owned by it, at its start)
            needs.append(_Need(("storage", "path"), existing, "w", store_dir))
            if db.exists():
                needs.append(_Need(("storage", "path"), db, "rw"))

    if account.sandboxed:
        needs = _sandbox(needs, problem, proc_devices)

    answers = access_problems(account, [(str(n.path), n.mode) for n in needs])
    usable: set[Path] = set()
    for need, why in zip(needs, answers, strict=True):
        if why is None:
            usable.add(need.path)
            continue
        if why == "No such file or directory":
            problem(need.key, f"{need.path}: does not exist")
        elif need.mode == "w" and need.target is not None and need.target != need.path:
            problem(need.key, f"{need.target}: cannot be created by user {account.name!r}: {need.path}: {why}")
        else:
            what = {"r": "cannot be read", "d": "cannot be read", "rw": "cannot be opened read-write",
                    "w": "is not writable"}[need.mode]
            problem(need.key, f"{need.path}: {what} by user {account.name!r}: {why}")

    if store_dir is not None and "path" in storage:
        _storage_space(store_dir, storage.get("reserve_bytes", 16 * 1024 * 1024), problem)
    for i, bus in report.buses:
        if bus.type == "serial" and bus.device and Path(bus.device) in usable:
            _serial(("bus", i, "device"), Path(bus.device), problem)
    _contents(report, usable, at, f)
    return f


def content_problems(report: ConfigReport, inside: Callable[[Path], bool], now: dt.datetime) -> Findings:
    """The checks of what files hold (broker CA, certificate and key, trust file,
    keystore, storage key), for the files ``inside`` accepts and that exist:
    a provisioning bundle's own files, whatever machine it is made on."""
    v = report.values
    candidates = [
        *(v.get("broker", {}).get(k) for k in ("ca_file", "cert_file", "key_file")),
        v.get("security", {}).get("trust_file"),
        v.get("security", {}).get("keystore"),
        v.get("storage", {}).get("key_file"),
    ]
    usable = {p for p in candidates if p is not None and inside(p) and p.exists()}
    f = Findings()
    _contents(report, usable, now, f)
    return f


def _contents(report: ConfigReport, usable: set[Path], now: dt.datetime, f: Findings) -> None:
    v = report.values
    storage, broker, security = v.get("storage", {}), v.get("broker", {}), v.get("security", {})

    def problem(key: KeyPath, text: str) -> None:
        f.problems.append(report.problem(key, text))

    if broker.get("tls"):
        _tls(broker, usable, now, problem, lambda k, t: f.warnings.append(report.problem(k, t)))
    if "trust_file" in security and security["trust_file"] in usable:
        _trust_file(security["trust_file"], problem)
    if "keystore" in security and security["keystore"] in usable:
        _keystore(security["keystore"], v.get("gateway", {}).get("id"), problem)
    if "key_file" in storage and storage["key_file"] in usable:
        _storage_key(storage["key_file"], problem)


def _nearest_existing(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if p.exists():
            return p
    return None


def _under(path: Path, roots: Iterable[Path]) -> Path | None:
    for root in roots:
        if path == root or root in path.parents:
            return root
    return None


def _sandbox(needs: list[_Need], problem: Callable[[KeyPath, str], None], proc_devices: Path) -> list[_Need]:
    """What the unit's sandbox hides from the service; returns the needs still to check."""
    kept: list[_Need] = []
    drivers = _char_drivers(proc_devices)
    for n in needs:
        p = Path(os.path.abspath(n.path))
        if (root := _under(p, HIDDEN_BY_PROTECT_HOME)) is not None:
            problem(n.key, f"{n.path}: the service cannot see {root} (ProtectHome=yes in edgegw.service)")
            continue
        if (root := _under(p, PRIVATE_TMP)) is not None:
            problem(n.key, f"{n.path}: the service has a private {root} (PrivateTmp=yes) and does not see this")
            continue
        if n.key == ("metrics", "textfile"):
            if _under(Path(os.path.abspath(n.path)), (STATE_DIRECTORY, *TEXTFILE_DIRECTORIES)) is None:
                problem(
                    n.key,
                    f"{n.path}: the service can write only under {STATE_DIRECTORY} and"
                    f" {', '.join(map(str, TEXTFILE_DIRECTORIES))} (ProtectSystem=strict, ReadWritePaths=)",
                )
                continue
        elif n.mode == "w" and _under(Path(os.path.abspath(n.target or n.path)), (STATE_DIRECTORY,)) is None:
            problem(
                n.key,
                f"{n.target or n.path}: the service can write only under {STATE_DIRECTORY}"
                " (ProtectSystem=strict, StateDirectory=edgegw); put the database there",
            )
            continue
        if n.mode == "rw":
            driver = _driver_of(n.path, drivers)
            if driver is not None and driver not in SERIAL_DRIVERS:
                problem(
                    n.key,
                    f"{n.path}: a {driver} device; the service may open only {', '.join(SERIAL_DRIVERS)}"
                    " devices (DevicePolicy=closed, DeviceAllow= in edgegw.service)",
                )
                continue
        kept.append(n)
    return kept


def _char_drivers(proc_devices: Path) -> dict[int, str]:
    """Character device majors to driver names, from /proc/devices."""
    out: dict[int, str] = {}
    try:
        text = proc_devices.read_text()
    except OSError:
        return out
    section = ""
    for line in text.splitlines():
        if line.endswith("devices:"):
            section = line
            continue
        parts = line.split()
        if section.startswith("Character") and len(parts) == 2 and parts[0].isdigit():
            out.setdefault(int(parts[0]), parts[1])
    return out


def _driver_of(path: Path, drivers: dict[int, str]) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    return drivers.get(os.major(st.st_rdev))  # e.g. 188 ttyUSB, 166 ttyACM, 204 ttyAMA, 136 pts


def _serial(key: KeyPath, device: Path, problem: Callable[[KeyPath, str], None]) -> None:
    try:
        st = os.stat(device)
    except OSError as exc:
        problem(key, f"{device}: {exc.strerror or exc}")
        return
    if not stat.S_ISCHR(st.st_mode):
        problem(key, f"{device}: not a serial device (not a character device)")


def _storage_space(store_dir: Path, reserve: int, problem: Callable[[KeyPath, str], None]) -> None:
    existing = _nearest_existing(store_dir)
    if existing is None:
        return
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        problem(("storage", "path"), f"{existing}: cannot read free space: {exc.strerror or exc}")
        return
    if free <= reserve:
        problem(
            ("storage", "path"),
            f"{existing}: {_mib(free)} free, not more than storage.reserve_bytes ({_mib(reserve)});"
            " the outbox would refuse new readings",
        )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _tls(
    broker: dict[str, Any],
    usable: set[Path],
    now: dt.datetime,
    problem: Callable[[KeyPath, str], None],
    warn: Callable[[KeyPath, str], None],
) -> None:
    ok = True
    ca = broker.get("ca_file")
    if ca is not None and ca in usable:
        try:
            cas = x509.load_pem_x509_certificates(Path(ca).read_bytes())
        except (ValueError, OSError) as exc:
            problem(("broker", "ca_file"), f"{ca}: not a PEM certificate: {_short(exc)}")
            ok = False
        else:
            for c in cas:
                _validity(("broker", "ca_file"), ca, c, now, problem, warn)
    elif ca is not None:
        ok = False
    cert_path, key_path = broker.get("cert_file"), broker.get("key_file")
    cert = key = None
    if cert_path is not None and cert_path in usable:
        try:
            cert = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())[0]
        except (ValueError, OSError) as exc:
            problem(("broker", "cert_file"), f"{cert_path}: not a PEM certificate: {_short(exc)}")
        else:
            _validity(("broker", "cert_file"), cert_path, cert, now, problem, warn)
    if key_path is not None and key_path in usable:
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except TypeError:
            problem(("broker", "key_file"), f"{key_path}: the key is encrypted; the daemon cannot enter a pass phrase")
        except (ValueError, OSError) as exc:
            problem(("broker", "key_file"), f"{key_path}: not a PEM private key: {_short(exc)}")
    if cert is not None and key is not None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            problem(("broker", "key_file"), f"{key_path}: does not match the certificate {cert_path} (another key pair)")
            return
    if not ok or (cert_path is not None and cert is None) or (key_path is not None and key is None):
        return
    # Last, the context exactly as the uplink builds it.
    try:
        tls_context(BrokerSection(tls=True, ca_file=ca, cert_file=cert_path, key_file=key_path))
    except (ssl.SSLError, OSError, ValueError) as exc:
        problem(("broker", "ca_file"), f"the TLS context cannot be built from these files: {_short(exc)}")


def _validity(
    key: KeyPath,
    path: Path,
    cert: Any,
    now: dt.datetime,
    problem: Callable[[KeyPath, str], None],
    warn: Callable[[KeyPath, str], None],
) -> None:
    subject = cert.subject.rfc4514_string() or "(no subject)"
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now > after:
        problem(key, f"{path}: certificate {subject} expired at {after:%Y-%m-%d %H:%M}Z")
    elif now < before:
        problem(
            key,
            f"{path}: certificate {subject} is valid only from {before:%Y-%m-%d %H:%M}Z"
            f" (this machine's clock says {now:%Y-%m-%d %H:%M}Z)",
        )
    elif after - now < CERT_EXPIRY_WARNING:
        warn(key, f"{path}: certificate {subject} expires at {after:%Y-%m-%d %H:%M}Z")


def _trust_file(path: Path, problem: Callable[[KeyPath, str], None]) -> None:
    try:
        TrustStore.load(path)
    except TrustError as exc:
        problem(("security", "trust_file"), _short(exc))


def _keystore(path: Path, gateway_id: str | None, problem: Callable[[KeyPath, str], None]) -> None:
    try:
        ks = Keystore.open(path)
    except (KeystoreError, OSError, ValueError) as exc:
        problem(("security", "keystore"), _short(exc))
        return
    if gateway_id is not None and ks.gateway_id != gateway_id:
        problem(
            ("security", "keystore"),
            f"{path}: belongs to gateway {ks.gateway_id!r}, not {gateway_id!r}",
        )


def _storage_key(path: Path, problem: Callable[[KeyPath, str], None]) -> None:
    try:
        load_storage_key(path)
    except (StorageKeyError, OSError) as exc:
        problem(("storage", "key_file"), _short(exc))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
