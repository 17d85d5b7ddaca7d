"""Gateway presence: the retained birth/death message on ``{prefix}/{gw}/state``.

The gateway publishes, retained, QoS 1:

* at each connection, ``online`` (birth) with its software version, the boot id
  of the board, when the daemon started and when this MQTT session started;
* at a clean stop, ``offline`` with reason ``stopped``, *before* disconnecting
  (the broker publishes a last will only for a connection that dies);
* as its last will, set at connect, ``offline`` with reason ``lost``: the broker
  publishes it when the connection dies (crash, power cut, link loss past the
  keepalive).

The payload is a small JSON object::

    {"state": "online", "gateway": "gw-0001", "version": "0.1.0",
     "boot_id": "3f0c…", "started_ms": 1767225600000, "session_ms": 1767225612000}

A bare ``online``/``offline`` (older gateways) is understood too. Presence is
not signed: it says what the broker saw, not what central may act on; money
and relay decisions never depend on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

MAX_PAYLOAD = 1024


class PresenceState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class OfflineReason(enum.StrEnum):
    STOPPED = "stopped"  # a clean stop said so before disconnecting
    LOST = "lost"  # the last will: the connection died


@dataclass(frozen=True)
class Identity:
    """What a gateway says of itself in its presence."""

    gateway: str
    version: str
    boot_id: str | None
    started_ms: int  # when this run of the daemon started


@dataclass(frozen=True)
class Presence:
    state: PresenceState
    gateway: str | None = None
    version: str | None = None
    boot_id: str | None = None
    started_ms: int | None = None
    session_ms: int | None = None
    reason: OfflineReason | None = None

    @property
    def online(self) -> bool:
        return self.state is PresenceState.ONLINE

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": self.state.value}
        for k in ("gateway", "version", "boot_id", "started_ms", "session_ms"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.reason is not None:
            d["reason"] = self.reason.value
        return d


def birth(who: Identity, session_ms: int) -> bytes:
    return encode(
        Presence(PresenceState.ONLINE, who.gateway, who.version, who.boot_id, who.started_ms, session_ms)
    )


def death(who: Identity, reason: OfflineReason, session_ms: int | None = None) -> bytes:
    return encode(
        Presence(
            PresenceState.OFFLINE, who.gateway, who.version, who.boot_id, who.started_ms, session_ms, reason
        )
    )


def encode(p: Presence) -> bytes:
    return orjson.dumps(p.to_json())


def _opt_int(d: dict[str, Any], k: str) -> int | None:
    v = d.get(k)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _opt_str(d: dict[str, Any], k: str) -> str | None:
    v = d.get(k)
    return v[:200] if isinstance(v, str) else None


def parse(payload: bytes) -> Presence | None:
    """A presence message; None for anything else (an empty retained message clears
    the topic; junk is not a state). Unknown fields are ignored, wrong-typed ones
    dropped: presence is information, never a reason to fail."""
    text = payload.strip()
    if len(text) > MAX_PAYLOAD:
        return None
    if text in (b"online", b"offline"):
        return Presence(PresenceState(text.decode()))
    if not text.startswith(b"{"):
        return None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    state = doc.get("state", doc.get("status"))
    if state not in ("online", "offline"):
        return None
    reason = doc.get("reason")
    return Presence(
        PresenceState(state),
        _opt_str(doc, "gateway"),
        _opt_str(doc, "version"),
        _opt_str(doc, "boot_id"),
        _opt_int(doc, "started_ms"),
        _opt_int(doc, "session_ms"),
        OfflineReason(reason) if reason in ("stopped", "lost") else None,
    )
