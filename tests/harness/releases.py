"""Real software releases for the update tests, built once per test session.

* the project's wheel, built from a copy of this tree (no index, no isolation);
* the same wheel *respun* under other versions (its dist-info renamed and its
  RECORD rewritten), one of them with an entry point that exits 3 at once;
* the locked wheels from ``.wheelhouse/`` (``./dev test`` downloads them once
  per lock file: the tests themselves never use the network);
* signed software bundles of each, made by the product's builder;
* a template releases root in which each release was installed once by the
  product's installer (a virtualenv each: the slow part, done once).

Tests copy the template's releases into their own root with hard links
(releases are never written after their install), and run the daemon the way
systemd does (:class:`Supervisor`). With pytest-xdist the workers share one
build (a file lock); the cache is keyed by a hash of the source tree.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.update import MARKER, Updater, UpdateSettings
from gateway.update_cli import requirements_for
from provisioning.software_bundle import write_bundle

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = REPO / ".wheelhouse"
PACKAGES = ("gateway", "firmware_bridge", "store_forward", "provisioning", "headend")
BROKEN_CLI = b'''"""A release broken on purpose: its entry point fails at once."""
import sys


def main(argv=None):
    print("edgegw: this release is broken on purpose", file=sys.stderr)
    return 3
'''
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def tree_hash() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "requirements.lock", "README.md"):
        h.update((REPO / name).read_bytes())
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".toml", ".json"):
                h.update(p.relative_to(REPO).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def build_wheel(out: Path) -> Path:
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.rmtree(src)
    (built,) = out.glob("edge_gateway-*.whl")
    return built


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def respin(wheel: Path, version: str, out_dir: Path, replace: dict[str, bytes] | None = None) -> Path:
    """The same wheel under another version (and with ``replace``'d files): its
    dist-info directory, METADATA and RECORD rewritten, as a build would make them."""
    old_version = wheel.name.split("-")[1]
    old_info, new_info = f"edge_gateway-{old_version}.dist-info", f"edge_gateway-{version}.dist-info"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            data = z.read(name)
            if name.startswith(old_info + "/"):
                name = new_info + name[len(old_info) :]
                if name.endswith("/METADATA"):
                    data = data.replace(
                        f"\nVersion: {old_version}\n".encode(), f"\nVersion: {version}\n".encode()
                    )
            files[name] = (replace or {}).get(name, data)
    record = f"{new_info}/RECORD"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for name, data in files.items():
        if name != record:
            w.writerow([name, _record_hash(data), len(data)])
    w.writerow([record, "", ""])
    files[record] = buf.getvalue().encode()
    out = out_dir / wheel.name.replace(f"-{old_version}-", f"-{version}-")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out


def wheelhouse(dest: Path, project_wheel: Path) -> Path:
    """A wheelhouse as install.sh takes it: the locked wheels, the project's wheel, the lock."""
    if not (WHEELHOUSE / ".lock.sha256").is_file():
        pytest.fail(
            f"{WHEELHOUSE} is missing: `./dev test` (or `./dev wheelhouse DIR`) downloads the "
            "locked wheels once",
            pytrace=False,
        )
    dest.mkdir(parents=True)
    for w in WHEELHOUSE.glob("*.whl"):
        os.link(w, dest / w.name)
    shutil.copy2(project_wheel, dest / project_wheel.name)
    shutil.copy2(REPO / "requirements.lock", dest / "requirements.lock")
    return dest


@dataclass(frozen=True)
class Kit:
    """Everything built once: the key, the versions, the bundles, the template root."""

    dir: Path
    key: Path  # provisioning private key (PEM)
    pubkey: Path
    old: str  # the tree's own version
    new: str  # a later release of the same code
    broken: str  # a later release whose entry point exits 3
    template: Path  # releases root with old, new and broken installed

    def bundle(self, version: str) -> Path:
        return self.dir / f"edgegw-{version}.egws"

    def wheelhouse(self, version: str) -> Path:
        return self.dir / f"wheelhouse-{version}"

    def private_key(self) -> Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey)
        return key

    def root(self, dest: Path, *versions: str, current: str | None = None) -> Path:
        """A releases root with ``versions`` installed (hard-linked from the template),
        ``current`` and ``committed`` naming ``current`` (default: the first)."""
        (dest / "releases").mkdir(parents=True)
        for v in versions:
            subprocess.run(
                ["cp", "-al", str(self.template / "releases" / v), str(dest / "releases" / v)],
                check=True,
            )
        name = current or versions[0]
        for link in ("current", "committed"):
            os.symlink(f"releases/{name}", dest / link)
        return dest


def _build(d: Path) -> None:
    wheels = d / "wheels"
    wheels.mkdir()
    wheel = build_wheel(wheels)
    old = wheel.name.split("-")[1]
    new, broken = f"{old}.1", f"{old}.2"
    respun = {
        old: wheel,
        new: respin(wheel, new, wheels),
        broken: respin(wheel, broken, wheels, {"gateway/cli.py": BROKEN_CLI}),
    }
    key = Ed25519PrivateKey.generate()
    (d / "provisioning.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "provisioning.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    lock = (REPO / "requirements.lock").read_text()
    for version, w in respun.items():
        wh = wheelhouse(d / f"wheelhouse-{version}", w)
        req, files, _ = requirements_for(lock, wh)
        write_bundle(
            d / f"edgegw-{version}.egws",
            version=version,
            min_version=None,
            requirements=req,
            wheels=files,
            key=key,
            python=PYTHON,
            machine=os.uname().machine,
        )
    template = d / "template"
    up = Updater(
        UpdateSettings(
            root=template,
            heartbeat_file=d / "unused-heartbeat.json",
            restart=lambda: None,
            verify_key=key.public_key(),
        )
    )
    template.joinpath("releases").mkdir(parents=True)
    threads = []
    errors: list[BaseException] = []

    def install(version: str) -> None:
        try:
            up.install_release(d / f"edgegw-{version}.egws")
        except BaseException as exc:
            errors.append(exc)

    for version in respun:  # the installer's lock is per call; these are separate releases
        t = threading.Thread(target=install, args=(version,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for version in respun:
        assert (template / "releases" / version / MARKER).is_file()
    (d / "versions").write_text(f"{old} {new} {broken}\n")


def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this run
    d = base / f"edgegw-releases-{tree_hash()}"
    d.mkdir(exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not (d / "versions").exists():
            for p in d.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            _build(d)
    finally:
        os.close(fd)
    old, new, broken = (d / "versions").read_text().split()
    return Kit(d, d / "provisioning.key", d / "provisioning.pub", old, new, broken, d / "template")


# ---------------------------------------------------------------------------
# What systemd does for edgegw.service


class Supervisor:
    """Runs ``<root>/current/bin/edgegw run`` and starts it again whenever it exits
    (``Restart=always``), resolving ``current`` at every start; ``restart`` is
    ``systemctl restart`` (SIGTERM; the loop starts the release ``current`` names)."""

    def __init__(self, root: Path, config: Path, health: Path, log: Path, delay_s: float = 0.3):
        self.root = root
        self.config = config
        self.health = health
        self.log = log
        self.delay_s = delay_s
        self.pidfile = log.with_suffix(".pid")
        self.exits: list[int] = []
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
        # systemd's RuntimeDirectory=edgegw: the daemon's heartbeat goes there
        env["RUNTIME_DIRECTORY"] = str(self.health.parent)
        self.health.parent.mkdir(parents=True, exist_ok=True)
        return env

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock, self.log.open("ab") as out:
                out.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
                out.flush()
                self._proc = subprocess.Popen(
                    [str(self.root / "current" / "bin" / "edgegw"), "run", "--config",
                     str(self.config)],
                    stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=self._env(),
                    cwd=self.config.parent,
                )  # fmt: skip
                self.starts += 1
                self.pidfile.write_text(f"{self._proc.pid}\n")
            rc = self._proc.wait()
            self.exits.append(rc)
            self._stop.wait(self.delay_s)

    def start(self) -> None:
        self._thread.start()

    def restart(self) -> None:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)

    def restart_argv(self) -> list[str]:
        """The restart as a command, for an updater in another process."""
        return ["sh", "-c", f"kill -TERM $(cat {self.pidfile})"]

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@pytest.fixture
def supervisor_factory() -> Iterator[list[Supervisor]]:
    made: list[Supervisor] = []
    yield made
    for s in made:
        s.stop()
