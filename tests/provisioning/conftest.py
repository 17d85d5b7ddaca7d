"""Fixtures for provisioning tests: role keys, a valid bundle source tree, a bundle factory."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.bundle import CarryBack, DeviceIdentity, Target, encode_bundle

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bundle"
NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
GATEWAY = "gw-0001"
SITE = "site-hilltop"


def example_files() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in sorted(EXAMPLE.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            out[p.relative_to(EXAMPLE).as_posix()] = p.read_bytes()
    return out


def config_text(gateway: str = GATEWAY, site: str = SITE, extra: str = "") -> bytes:
    text = (EXAMPLE / "gateway.toml").read_text()
    text = text.replace('id = "gw-0001"', f'id = "{gateway}"').replace(
        'site = "site-hilltop"', f'site = "{site}"'
    )
    return (text + extra).encode()


MakeBundle = Callable[..., bytes]


@pytest.fixture
def role_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def identity() -> DeviceIdentity:
    return DeviceIdentity(GATEWAY, SITE)


@pytest.fixture
def make_bundle(role_key: Ed25519PrivateKey) -> MakeBundle:
    def make(
        *,
        version: int = 1,
        target: str = GATEWAY,
        files: dict[str, bytes] | None = None,
        expires: datetime | None = None,
        key: Ed25519PrivateKey | None = None,
        backlog: bool = False,
    ) -> bytes:
        return encode_bundle(
            bundle_id=uuid.uuid4().hex,
            version=version,
            target=Target.parse(target),
            created=NOW - timedelta(days=1),
            expires=expires or NOW + timedelta(days=30),
            technician="tech-07",
            files=example_files() if files is None else files,
            key=key or role_key,
            carry_back=CarryBack(backlog_export=backlog),
        )

    return make
