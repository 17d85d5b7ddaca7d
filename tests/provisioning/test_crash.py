"""SIGKILL during apply leaves exactly the old or the new configuration.

A child process installs a bundle and is killed (a real SIGKILL) at every
labelled step of the install, then at random moments. After each kill the
provisioning root must show one complete release, old or new, both before and
after recover(), and a later apply must still work.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.release_check import check_release
from provisioning.apply import current_release, install_bundle, recover
from provisioning.bundle import DeviceIdentity, verify_bundle
from tests.provisioning.conftest import GATEWAY, REPO, SITE, MakeBundle, example_files
from tests.provisioning.test_apply import snapshot

CHILD = """
import os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from gateway.release_check import check_release
from provisioning.apply import install_bundle
from provisioning.bundle import DeviceIdentity, verify_bundle

root, bundle, pub, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
count = 0

def step(label):
    global count
    count += 1
    if count == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    print(label, flush=True)

vb = verify_bundle(Path(bundle).read_bytes(), load_pem_public_key(Path(pub).read_bytes()))
print("start", flush=True)
install_bundle(Path(root), vb, DeviceIdentity(sys.argv[5], sys.argv[6]), check=check_release, step=step)
print("done", flush=True)
"""


def spawn(root: Path, bundle: Path, pub: Path, kill_at: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(root),
            str(bundle),
            str(pub),
            str(kill_at),
            GATEWAY,
            SITE,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.fixture
def setup(tmp_path: Path, make_bundle: MakeBundle, role_key: Ed25519PrivateKey):  # type: ignore[no-untyped-def]
    base = tmp_path / "base"
    old_bundle = make_bundle(version=1)
    install_bundle(
        base,
        verify_bundle(old_bundle, role_key.public_key()),
        DeviceIdentity(GATEWAY, SITE),
        check=check_release,
    )
    new_files = {
        **example_files(),
        **{f"tariffs/t{i:03d}.toml": f"n = {i}\n".encode() * 50 for i in range(12)},
    }
    new_files["gateway.toml"] = new_files["gateway.toml"] + b"\n# v2\n"
    bundle = tmp_path / "new.egwb"
    bundle.write_bytes(make_bundle(version=2, files=new_files))
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        role_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    old = snapshot(base)["files"]
    return base, bundle, pub, old, new_files


def check_old_or_new(root: Path, old: dict[str, bytes], new: dict[str, bytes]) -> str:
    snap = snapshot(root)
    assert snap["files"] in (old, new), "state is neither the old nor the new configuration"
    state = "old" if snap["files"] == old else "new"
    rel = current_release(root)
    assert rel is not None and rel.version == (1 if state == "old" else 2)
    recover(root)
    after = snapshot(root)
    assert after["files"] == snap["files"] and after["current"] == snap["current"]
    links = {Path(after[k]).name for k in ("current", "previous") if after[k]}
    assert set(after["releases"]) == links, "recover() left orphans behind"
    return state


def test_kill_at_every_step(tmp_path: Path, setup, role_key: Ed25519PrivateKey) -> None:  # type: ignore[no-untyped-def]
    base, bundle, pub, old, new = setup
    probe = tmp_path / "probe"
    shutil.copytree(base, probe, symlinks=True)
    out, _ = spawn(probe, bundle, pub, 0).communicate(timeout=60)
    labels = out.split()[1:-1]
    assert labels[0] == "staging-created" and labels[-1] == "pruned"
    assert snapshot(probe)["files"] == new
    # Every step label is a kill point; cap the count so the run stays bounded.
    points = list(range(1, len(labels) + 1))
    if len(points) > 16:
        points = points[:3] + random.Random(7).sample(points[3:-8], 5) + points[-8:]
    seen = set()
    for k in points:
        root = tmp_path / f"k{k}"
        shutil.copytree(base, root, symlinks=True)
        proc = spawn(root, bundle, pub, k)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"child not killed at step {k}"
        state = check_old_or_new(root, old, new)
        expected = "new" if labels[k - 1] in ("current-swapped", "pruned") else "old"
        assert state == expected, f"killed after {labels[k - 1]!r}: got {state}"
        seen.add(state)
        # The next attempt completes normally.
        vb = verify_bundle(bundle.read_bytes(), role_key.public_key())
        install_bundle(root, vb, DeviceIdentity(GATEWAY, SITE), check=check_release)
        assert snapshot(root)["files"] == new
        shutil.rmtree(root)
    assert seen == {"old", "new"}


def _kill_at_random_times(tmp_path: Path, setup, rounds: int) -> set[str]:  # type: ignore[no-untyped-def]
    base, bundle, pub, old, new = setup
    rng = random.Random(11)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe, symlinks=True)
    proc = spawn(probe, bundle, pub, 0)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "start"
    t0 = time.monotonic()
    proc.communicate(timeout=60)
    duration = max(time.monotonic() - t0, 0.005)
    states = set()
    for i in range(rounds):
        root = tmp_path / f"r{i}"
        shutil.copytree(base, root, symlinks=True)
        proc = spawn(root, bundle, pub, 0)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "start"
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        states.add(check_old_or_new(root, old, new))
        shutil.rmtree(root)
    return states


def test_kill_at_random_times(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    states = _kill_at_random_times(tmp_path, setup, rounds=6)
    assert states <= {"old", "new"}


@pytest.mark.long
def test_kill_at_random_times_long(tmp_path: Path, setup) -> None:  # type: ignore[no-untyped-def]
    states = _kill_at_random_times(tmp_path, setup, rounds=200)
    assert states == {"old", "new"}
