"""The systemd units: verified by systemd-analyze, exposure score, hardening checklist, MDWE."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.security.trusted_time import SyncProbe
from tests.systemd._tools import require_tool

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
MAX_EXPOSURE = 2.0


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def exposure(unit: Path) -> float:
    tool = require_tool("systemd-analyze")
    r = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout)
    assert m, f"no 'Overall exposure level' line in systemd-analyze output:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1))


@pytest.mark.parametrize("unit", ["edgegw.service", "edgegw-usb@.service"])
def test_exposure_score(unit: str) -> None:
    score = exposure(UNITS / unit)
    assert score <= MAX_EXPOSURE, f"{unit}: exposure {score} > {MAX_EXPOSURE}"


def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """The parser sees a bad score when the sandbox is removed."""
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/usr/bin/true\n")
    assert exposure(bare) > MAX_EXPOSURE


def _verify(tmp_path: Path, names: list[str]) -> subprocess.CompletedProcess[str]:
    """Copy the units with the virtualenv paths pointed at an existing interpreter.

    systemd-analyze verify checks that ExecStart binaries exist; /opt/edgegw is
    only there on an installed gateway, so the copies use this test's Python.
    Everything else in the units is verified unchanged.
    """
    tool = require_tool("systemd-analyze")
    for unit in ("edgegw.service", "edgegw-usb@.service", "edgegw-update.service",
                 "edgegw-update.path", "edgegw-update-recover.service"):  # fmt: skip
        text = (UNITS / unit).read_text()
        for release in ("current", "committed"):
            for program in ("edgegw", "python"):
                text = text.replace(f"/opt/edgegw/{release}/bin/{program}", sys.executable)
        (tmp_path / unit).write_text(text)
    return subprocess.run(
        [tool, "verify", "--man=no", *[str(tmp_path / n) for n in names]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_units_verify_cleanly(tmp_path: Path) -> None:
    r = _verify(tmp_path, ["edgegw.service", "edgegw-usb@sdb1.service", "edgegw-update.service",
                           "edgegw-update.path", "edgegw-update-recover.service"])  # fmt: skip
    # verify exits 0 on unknown keys and bad values, printing warnings: any output fails.
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", (
        r.stderr + r.stdout
    )


def test_verify_catches_mistakes(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    bad = tmp_path / "typo.service"
    bad.write_text("[Service]\nExecStart=/usr/bin/true\nRestart=sometimes\nProtectSytem=strict\n")
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown key" in r.stderr and "restart specifier" in r.stderr


def test_daemon_unit_checklist() -> None:
    u = parse_unit(UNITS / "edgegw.service")
    one = {k: v[-1] for k, v in u.items()}
    expected = {
        "Unit.StartLimitIntervalSec": "0",
        "Service.Type": "notify",
        "Service.Restart": "always",
        "Service.User": "edgegw",
        "Service.StateDirectory": "edgegw",
        "Service.ProtectSystem": "strict",
        "Service.NoNewPrivileges": "yes",
        "Service.PrivateTmp": "yes",
        "Service.ProtectHome": "yes",
        "Service.CapabilityBoundingSet": "",
        "Service.AmbientCapabilities": "",
        "Service.DevicePolicy": "closed",
        "Service.RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Service.SystemCallArchitectures": "native",
        "Service.ProtectKernelTunables": "yes",
        "Service.ProtectKernelModules": "yes",
        "Service.ProtectKernelLogs": "yes",
        "Service.ProtectControlGroups": "yes",
        "Service.ProtectClock": "yes",
        "Service.ProtectHostname": "yes",
        "Service.RestrictNamespaces": "yes",
        "Service.LockPersonality": "yes",
        "Service.MemoryDenyWriteExecute": "yes",
        "Service.RestrictRealtime": "yes",
        "Service.RestrictSUIDSGID": "yes",
        "Service.UMask": "0077",
    }
    for key, value in expected.items():
        assert one.get(key) == value, f"{key}={one.get(key)!r}, expected {value!r}"
    assert re.fullmatch(r"\d+s", one["Service.WatchdogSec"])
    assert u["Service.SystemCallFilter"][0] == "@system-service"
    assert set(u["Service.DeviceAllow"]) >= {"char-ttyUSB rw", "char-ttyAMA rw", "char-ttyS rw"}
    assert "Service.PrivateDevices" not in u, "PrivateDevices= hides the serial ports"
    assert "Service.PrivateUsers" not in u, (
        "PrivateUsers= maps group dialout away: serial ports break"
    )


def test_unit_keeps_the_ntp_status_files_readable() -> None:
    """ProtectClock= and ~@clock refuse adjtimex; the files the probe reads instead must
    stay visible inside the unit's sandbox."""
    u = parse_unit(UNITS / "edgegw.service")
    hidden = [*u.get("Service.InaccessiblePaths", []), *u.get("Service.TemporaryFileSystem", [])]
    for path in (SyncProbe().timesyncd_file, SyncProbe().chrony_tracking_log):
        assert path is not None and path.is_absolute()
        for h in " ".join(hidden).split():
            h = h.lstrip("-").split(":")[0]
            assert not str(path).startswith(h.rstrip("/") + "/"), f"{h} hides {path}"
    assert u["Service.ProtectClock"] == ["yes"]  # the clock itself stays out of reach
    assert u["Service.ProtectSystem"] == ["strict"]  # read-only, still readable


def test_usb_unit_and_udev_rule() -> None:
    u = parse_unit(UNITS / "edgegw-usb@.service")
    assert u["Service.User"] == ["edgegw"] and u["Service.Type"] == ["oneshot"]
    pre = u["Service.ExecStartPre"][0]
    post = u["Service.ExecStopPost"][0]
    for cmd in (pre, post):
        assert cmd.startswith("+/usr/bin/unshare --mount --propagation private -- ")
    assert not u["Service.ExecStart"][0].startswith("+"), "the apply step must run unprivileged"
    assert u["Unit.BindsTo"] == ["dev-%i.device"]
    rule = [
        ln
        for ln in (UNITS / "99-edgegw-usb.rules").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert len(rule) == 1
    assert 'ENV{SYSTEMD_WANTS}+="edgegw-usb@%k.service"' in rule[0]
    assert 'TAG+="systemd"' in rule[0] and 'ACTION=="add"' in rule[0]
    assert "RUN" not in rule[0] and "mount" not in rule[0].lower()


def test_usb_mount_options() -> None:
    from provisioning.usb import MOUNT_OPTS_RO, MOUNT_OPTS_RW

    for opts in (MOUNT_OPTS_RO, MOUNT_OPTS_RW):
        assert {"nosuid", "nodev", "noexec"} <= set(opts.split(","))
    assert MOUNT_OPTS_RO.split(",")[0] == "ro"


def test_usb_unit_steps_are_commands_that_accept_their_options() -> None:
    """Each step's ``python -m MODULE STEP ...`` runs, and its parser takes the unit's options."""
    import importlib
    import shlex

    u = parse_unit(UNITS / "edgegw-usb@.service")
    lines = [u["Service.ExecStartPre"][0], u["Service.ExecStart"][0], u["Service.ExecStopPost"][0]]
    steps = []
    for line in lines:
        argv = shlex.split(line.replace("%I", "sdb1").replace("%i", "sdb1"))
        module, step, *options = argv[argv.index("-m") + 1 :]
        steps.append(step)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        r = subprocess.run(
            [sys.executable, "-m", module, step, "--help"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, f"{module} {step}: {r.stderr}"
        args = importlib.import_module(module).build_parser().parse_args([step, *options])
        assert args.step == step and callable(args.func)
    assert steps == ["import", "process", "export"]


MDWE_CHILD = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("UNSUPPORTED", ctypes.get_errno()); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        print("NOT ENFORCED"); sys.exit(3)
    # What the daemon loads and does, now under W^X.
    import asyncio, sqlite3, ssl, json, hashlib, zlib
    import orjson, aiosqlite, aiomqtt, pymodbus.client, serial_asyncio_fast
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    from cryptography.hazmat.primitives import hashes
    k = Ed25519PrivateKey.generate(); k.public_key().verify(k.sign(b"m"), b"m")
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    s = a.exchange(b.public_key())
    key = HKDF(hashes.SHA256(), 32, None, b"i").derive(s)
    AESGCM(key).decrypt(b"n" * 12, AESGCM(key).encrypt(b"n" * 12, b"x", b""), b"")
    ssl.create_default_context()
    async def db():
        async with aiosqlite.connect(":memory:") as c:
            await c.execute("create table t(x)"); await c.execute("insert into t values (1)")
            await c.commit()
    asyncio.run(db())
    import gateway.config, gateway.sdnotify, gateway.provision_usb, provisioning.apply, provisioning.usb
    try:
        import gateway.daemon
    except ImportError as exc:
        print("daemon import skipped:", exc)
    print("OK")
    """
)


def test_python_runs_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes: the kernel's MDWE prctl applies the same W^X rule."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD], capture_output=True, text=True, env=env, timeout=120
    )
    if r.stdout.startswith("UNSUPPORTED"):
        pytest.skip(f"kernel has no PR_SET_MDWE: {r.stdout.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_update_units_run_commands_the_cli_accepts() -> None:
    """The updater's ExecStart lines parse with `edgegw`'s own parser; the recovery
    runs before the daemon, from the committed release."""
    import shlex

    from gateway.cli import build_parser

    for unit, action in [("edgegw-update.service", "apply"),
                         ("edgegw-update-recover.service", "recover")]:  # fmt: skip
        u = parse_unit(UNITS / unit)
        argv = shlex.split(u["Service.ExecStart"][0])
        assert argv[0] == "/opt/edgegw/committed/bin/edgegw"
        args = build_parser().parse_args(argv[1:])
        assert args.update_command == action and callable(args.func)
    rec = parse_unit(UNITS / "edgegw-update-recover.service")
    assert "edgegw.service" in rec["Unit.Before"][0].split()
    path = parse_unit(UNITS / "edgegw-update.path")
    assert path["Path.DirectoryNotEmpty"] == ["/var/lib/edgegw/updates/ready"]
    daemon = parse_unit(UNITS / "edgegw.service")
    assert daemon["Service.ExecStart"][0].startswith("/opt/edgegw/current/bin/edgegw run ")
