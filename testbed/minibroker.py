"""A small asyncio MQTT 3.1.1 broker for the demo and for tests.

It lets the gateway and the headend talk to each other on one machine without a
system broker package. It speaks MQTT 3.1.1 (protocol level 4; level 3
``MQIsdp`` is accepted too) as used by paho-mqtt / aiomqtt and the
``mosquitto_pub`` / ``mosquitto_sub`` tools.

What it does:

* CONNECT/CONNACK with clean and persistent sessions. A persistent session
  (clean session = 0) keeps its subscriptions, its unacknowledged QoS 1
  messages and the QoS 1 messages queued while it was offline, in memory, for
  the broker's lifetime. On reconnect, unacknowledged messages are sent again
  with the DUP flag and their original packet identifiers.
* Optional username/password check (``users={"name": "password"}``).
* Keepalive enforcement: a client silent for 1.5 × its keepalive is dropped.
* PUBLISH QoS 0 and 1 (PUBACK); QoS 2 from clients is answered with the full
  PUBREC/PUBREL/PUBCOMP exchange and delivered once. Subscriptions are granted
  at most QoS 1, so the broker never sends QoS 2.
* SUBSCRIBE/UNSUBSCRIBE with ``+`` and ``#`` wildcards, and shared
  subscriptions ``$share/GROUP/FILTER``: each message goes to one member of the
  group, round-robin, preferring connected members.
* Last will (on any close not preceded by DISCONNECT, including keepalive
  expiry, protocol errors and session takeover) and retained messages.

Transport security and access control (all optional, off by default):

* TLS: ``MiniBroker(tls=ctx)`` with a server-side :class:`ssl.SSLContext`,
  usually from :func:`server_tls_context` (TLS >= 1.2). With a CA given there,
  the context requires a client certificate signed by that CA (mutual TLS).
  The broker performs each handshake itself, bounded by ``connect_timeout``; a
  failed or stalled handshake is logged (peer address and OpenSSL's reason) and
  closes that connection only. A plaintext client on the TLS port gets no
  session.
* ``identity_as_username=True`` (requires a TLS context with
  ``verify_mode = CERT_REQUIRED``): the client certificate's subject CN is the
  client's MQTT username, like mosquitto's ``use_identity_as_username``; a
  username or password in CONNECT is ignored. Cannot be combined with ``users``.
* ``acl=Acl(...)``: topic access control with mosquitto's ``acl_file``
  semantics, parsed by :meth:`Acl.parse` (``user``, ``topic [read|write|
  readwrite|deny] T``, ``pattern [...] T`` with ``%u`` = username and ``%c`` =
  client id; ``topic`` lines before any ``user`` line apply to clients without
  a username), so the demo can load ``examples/mosquitto/edgegw.acl``
  unchanged. :meth:`Acl.own_subtree` builds the simple rule "each client only
  under ``{prefix}/{username}/``" (``pattern readwrite {prefix}/%u/#``).
  Named ``superusers`` (the headend) may publish and subscribe everywhere.
  Enforcement:

  - PUBLISH to a topic without write access is dropped and logged; QoS 1/2 is
    still acknowledged (MQTT 3.1.1 cannot say "denied"; mosquitto does the same).
  - SUBSCRIBE is granted only for a filter every topic of which the client may
    read (``edgegw/v1/gw-a/#`` yes for gw-a; ``edgegw/v1/+/cmd`` or ``#`` no):
    the SUBACK carries 0x80 for a refused filter. Each delivery (retained
    messages too) is checked again against read access.
  - The will topic needs write access, or CONNECT is refused (code 5).
  - A pattern rule does not apply to an empty username or client id, nor to
    one containing ``/``, ``+`` or ``#`` (it could otherwise widen the pattern).
  - Deny rules win over any allowing rule.

  With an ACL or ``identity_as_username``, a CONNECT whose client id names a
  session (connected or persistent) of another username is refused (code 2),
  so one client cannot take over, or resume, another identity's session.

Limits (it is a demo/test broker, not a production one):

* Everything is in memory; a restart forgets sessions and retained messages.
* No ``$SYS`` topics, no MQTT 5 (CONNACK refuses level 5), no bridge, no
  persistence of QoS 0 messages for offline clients, no certificate
  revocation lists (a demo PKI is short-lived instead).
* Delivery matches every subscription linearly: fine for tens of clients.
* Bounded everywhere: packet size (``max_packet_size``), QoS 1 messages in
  flight and queued per client (``max_inflight``, ``max_queued``; excess is
  dropped with a log line), QoS 0 to a client whose socket buffer is full is
  dropped, retained messages, subscriptions per client and sessions.
* A malformed packet closes the connection that sent it (with a log line);
  other clients are not affected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import ssl
import sys
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# Wire format (pure functions, no I/O)
# --------------------------------------------------------------------------- #

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3)
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL = 1
CONNACK_ID_REJECTED = 2
CONNACK_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455

# Packets a client may send, with the fixed-header flags they must carry
# (PUBLISH flags are checked separately).
_CLIENT_FLAGS: dict[int, int] = {
    CONNECT: 0,
    PUBACK: 0,
    PUBREC: 0,
    PUBREL: 0b0010,
    PUBCOMP: 0,
    SUBSCRIBE: 0b0010,
    UNSUBSCRIBE: 0b0010,
    PINGREQ: 0,
    DISCONNECT: 0,
}


class ProtocolError(Exception):
    """A client broke an MQTT 3.1.1 rule; its connection is closed."""


class PacketTooLarge(ProtocolError):
    """A packet is larger than the broker's ``max_packet_size``."""


class UnacceptableProtocol(ProtocolError):
    """CONNECT asked for a protocol level this broker does not speak."""


@dataclass(frozen=True, slots=True)
class Message:
    """An application message as routed by the broker."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class RawPacket:
    """One framed packet: type, fixed-header flags and variable header + payload."""

    type: int
    flags: int
    body: bytes


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    client_id: str
    clean_session: bool
    keepalive: int
    will: Message | None
    username: str | None
    password: bytes | None


def encode_remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_packet(ptype: int, flags: int, body: bytes = b"") -> bytes:
    return bytes([(ptype << 4) | flags]) + encode_remaining_length(len(body)) + body


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _u16(len(raw)) + raw


def encode_publish(msg: Message, packet_id: int | None = None, dup: bool = False) -> bytes:
    if (msg.qos > 0) != (packet_id is not None):
        raise ValueError("a packet identifier is required exactly when QoS > 0")
    flags = (0b1000 if dup else 0) | (msg.qos << 1) | (1 if msg.retain else 0)
    body = _string(msg.topic) + (_u16(packet_id) if packet_id is not None else b"") + msg.payload
    return encode_packet(PUBLISH, flags, body)


def encode_connack(session_present: bool, return_code: int) -> bytes:
    return encode_packet(CONNACK, 0, bytes([1 if session_present else 0, return_code]))


def encode_ack(ptype: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBCOMP or UNSUBACK (PUBREL carries flags 0b0010)."""
    return encode_packet(ptype, 0b0010 if ptype == PUBREL else 0, _u16(packet_id))


def encode_suback(packet_id: int, return_codes: Sequence[int]) -> bytes:
    return encode_packet(SUBACK, 0, _u16(packet_id) + bytes(return_codes))


class PacketReader:
    """Incremental framer: feed it bytes, get whole packets back.

    Checks the fixed header as soon as it is complete, so a huge or nonsensical
    packet is refused before its body is buffered.
    """

    def __init__(self, max_packet_size: int) -> None:
        self.max_packet_size = max_packet_size
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RawPacket]:
        self._buf += data
        packets: list[RawPacket] = []
        while True:
            pkt = self._next()
            if pkt is None:
                return packets
            packets.append(pkt)

    def _next(self) -> RawPacket | None:
        buf = self._buf
        if not buf:
            return None
        ptype, flags = buf[0] >> 4, buf[0] & 0x0F
        if ptype == PUBLISH:
            if (flags >> 1) & 0b11 == 0b11:
                raise ProtocolError("PUBLISH with QoS 3")
        elif ptype not in _CLIENT_FLAGS:
            raise ProtocolError(f"packet type {ptype} may not be sent by a client")
        elif flags != _CLIENT_FLAGS[ptype]:
            raise ProtocolError(f"packet type {ptype} with reserved flags {flags:#06b}")
        length = 0
        for i in range(1, 5):
            if i >= len(buf):
                return None
            length |= (buf[i] & 0x7F) << (7 * (i - 1))
            if not buf[i] & 0x80:
                header_len = i + 1
                break
        else:
            raise ProtocolError("remaining length longer than 4 bytes")
        if header_len + length > self.max_packet_size:
            raise PacketTooLarge(
                f"packet of {header_len + length} bytes exceeds limit {self.max_packet_size}"
            )
        if len(buf) < header_len + length:
            return None
        body = bytes(buf[header_len : header_len + length])
        del buf[: header_len + length]
        return RawPacket(ptype, flags, body)


class _Cursor:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError(f"{self.what} truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self._take(2), "big")

    def binary(self) -> bytes:
        return self._take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: string is not UTF-8") from None
        if "\x00" in text:
            raise ProtocolError(f"{self.what}: string contains U+0000")
        return text

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    @property
    def at_end(self) -> bool:
        return self.pos >= len(self.data)


def parse_connect(body: bytes) -> ConnectRequest:
    c = _Cursor(body, "CONNECT")
    name, level = c.string(), c.u8()
    if name not in ("MQTT", "MQIsdp"):
        raise ProtocolError(f"unknown protocol name {name!r}")
    if (name, level) not in (("MQTT", 4), ("MQIsdp", 3)):
        raise UnacceptableProtocol(f"protocol {name!r} level {level} not supported")
    flags = c.u8()
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")
    clean = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0b11
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise ProtocolError("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise ProtocolError("will QoS/retain set without will flag")
    if has_password and not has_username:
        raise ProtocolError("password flag without username flag")
    keepalive = c.u16()
    client_id = c.string()
    will = None
    if will_flag:
        topic = c.string()
        if not valid_topic_name(topic):
            raise ProtocolError(f"invalid will topic {topic!r}")
        will = Message(topic, c.binary(), will_qos, will_retain)
    username = c.string() if has_username else None
    password = c.binary() if has_password else None
    if not c.at_end:
        raise ProtocolError("CONNECT has trailing bytes")
    return ConnectRequest(client_id, clean, keepalive, will, username, password)


def parse_publish(flags: int, body: bytes) -> tuple[Message, int | None, bool]:
    """Return (message, packet id or None, dup flag)."""
    qos = (flags >> 1) & 0b11
    dup = bool(flags & 0b1000)
    if qos == 0 and dup:
        raise ProtocolError("PUBLISH QoS 0 with DUP flag")
    c = _Cursor(body, "PUBLISH")
    topic = c.string()
    if not valid_topic_name(topic):
        raise ProtocolError(f"invalid topic name {topic!r}")
    packet_id = None
    if qos:
        packet_id = c.u16()
        if packet_id == 0:
            raise ProtocolError("packet identifier 0")
    return Message(topic, c.rest(), qos, bool(flags & 1)), packet_id, dup


def parse_packet_id(ptype: int, body: bytes) -> int:
    if len(body) != 2:
        raise ProtocolError(f"packet type {ptype}: expected 2 bytes, got {len(body)}")
    return int.from_bytes(body, "big")


def parse_subscribe(body: bytes) -> tuple[int, list[tuple[str, int]]]:
    c = _Cursor(body, "SUBSCRIBE")
    packet_id = c.u16()
    topics: list[tuple[str, int]] = []
    while not c.at_end:
        filt = c.string()
        qos = c.u8()
        if qos > 2:
            raise ProtocolError(f"SUBSCRIBE requested QoS byte {qos:#04x}")
        topics.append((filt, qos))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return packet_id, topics


def parse_unsubscribe(body: bytes) -> tuple[int, list[str]]:
    c = _Cursor(body, "UNSUBSCRIBE")
    packet_id = c.u16()
    filters: list[str] = []
    while not c.at_end:
        filters.append(c.string())
    if not filters:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    return packet_id, filters


# --------------------------------------------------------------------------- #
# Topics (pure)
# --------------------------------------------------------------------------- #


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(filt: str) -> bool:
    if not filt:
        return False
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def split_shared(filt: str) -> tuple[str | None, str]:
    """``$share/GROUP/FILTER`` -> (GROUP, FILTER); other filters -> (None, filter).

    Raises ValueError for a malformed shared subscription.
    """
    if not filt.startswith("$share/"):
        return None, filt
    parts = filt.split("/", 2)
    if len(parts) != 3 or not parts[1] or "+" in parts[1] or "#" in parts[1]:
        raise ValueError(f"malformed shared subscription {filt!r}")
    return parts[1], parts[2]


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 matching; wildcards first do not match ``$`` topics."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    flevels = filt.split("/")
    tlevels = topic.split("/")
    for i, level in enumerate(flevels):
        if level == "#":
            return True
        if i >= len(tlevels) or (level != "+" and level != tlevels[i]):
            return False
    return len(flevels) == len(tlevels)


def filter_covers(outer: str, inner: str) -> bool:
    """True if every topic matched by filter ``inner`` is matched by filter ``outer``."""
    olevels, ilevels = outer.split("/"), inner.split("/")
    if inner.startswith("$") and olevels[0] in ("+", "#"):
        return False
    for i, level in enumerate(ilevels):
        if i >= len(olevels):
            return False
        o = olevels[i]
        if o == "#":
            return True
        if level == "#":
            return False
        if o != "+" and o != level:
            return False
    # "a/#" also matches "a" itself
    return len(olevels) == len(ilevels) or (len(olevels) == len(ilevels) + 1 and olevels[-1] == "#")


# --------------------------------------------------------------------------- #
# Access control (pure)
# --------------------------------------------------------------------------- #

Access = Literal["read", "write", "readwrite", "deny"]
_ACCESS: tuple[Access, ...] = ("read", "write", "readwrite", "deny")
_UNSAFE_IN_PATTERN = ("/", "+", "#")


class AclError(ValueError):
    """An ACL rule or file that cannot be used."""


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ``topic``/``pattern`` line: an access kind and a topic filter."""

    access: Access
    topic: str

    def __post_init__(self) -> None:
        if self.access not in _ACCESS:
            raise AclError(f"access must be one of {_ACCESS}, got {self.access!r}")
        if not valid_topic_filter(self.topic) or self.topic.startswith("$share/"):
            raise AclError(f"invalid topic filter in ACL: {self.topic!r}")


@dataclass(frozen=True)
class Acl:
    """Who may publish and subscribe where; see the module docstring for the rules.

    ``patterns`` apply to every client with ``%u``/``%c`` substituted;
    ``users`` maps a username to its ``topic`` rules; ``anonymous`` holds the
    rules for clients without a username; ``superusers`` bypass every rule.
    """

    patterns: tuple[AclRule, ...] = ()
    users: Mapping[str, tuple[AclRule, ...]] = field(default_factory=dict)
    anonymous: tuple[AclRule, ...] = ()
    superusers: frozenset[str] = frozenset()

    @classmethod
    def own_subtree(cls, prefix: str, superusers: Iterable[str] = ()) -> Acl:
        """Each client may publish/subscribe only under ``{prefix}/{username}/``."""
        prefix = prefix.rstrip("/")
        return cls(
            patterns=(AclRule("readwrite", f"{prefix}/%u/#"),), superusers=frozenset(superusers)
        )

    @classmethod
    def parse(cls, text: str, superusers: Iterable[str] = ()) -> Acl:
        """Parse mosquitto ``acl_file`` syntax (``user``, ``topic``, ``pattern``, comments)."""
        patterns: list[AclRule] = []
        anonymous: list[AclRule] = []
        users: dict[str, list[AclRule]] = {}
        current: list[AclRule] = anonymous
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            try:
                if keyword == "user":
                    if not rest:
                        raise AclError("user without a name")
                    current = users.setdefault(rest, [])
                elif keyword in ("topic", "pattern"):
                    access: Access = "readwrite"
                    first, _, after = rest.partition(" ")
                    if first in _ACCESS and after.strip():
                        access, rest = first, after.strip()
                    rule = AclRule(access, rest)
                    (patterns if keyword == "pattern" else current).append(rule)
                else:
                    raise AclError(f"unknown keyword {keyword!r}")
            except AclError as exc:
                raise AclError(f"ACL line {n}: {exc}") from None
        return cls(
            patterns=tuple(patterns),
            users={u: tuple(r) for u, r in users.items()},
            anonymous=tuple(anonymous),
            superusers=frozenset(superusers),
        )

    @classmethod
    def load(cls, path: Path, superusers: Iterable[str] = ()) -> Acl:
        return cls.parse(path.read_text(encoding="utf-8"), superusers)

    def rules_for(self, username: str | None, client_id: str) -> list[AclRule]:
        """The concrete rules of one client (patterns substituted)."""
        rules = list(self.anonymous if username is None else self.users.get(username, ()))
        for rule in self.patterns:
            topic = rule.topic
            if "%u" in topic:
                if not username or any(c in username for c in _UNSAFE_IN_PATTERN):
                    continue
                topic = topic.replace("%u", username)
            if "%c" in topic:
                if not client_id or any(c in client_id for c in _UNSAFE_IN_PATTERN):
                    continue
                topic = topic.replace("%c", client_id)
            rules.append(AclRule(rule.access, topic))
        return rules

    def is_superuser(self, username: str | None) -> bool:
        return username is not None and username in self.superusers

    def may_write(self, username: str | None, client_id: str, topic: str) -> bool:
        return self._may(username, client_id, topic, "write")

    def may_read(self, username: str | None, client_id: str, topic: str) -> bool:
        return self._may(username, client_id, topic, "read")

    def may_subscribe(self, username: str | None, client_id: str, filt: str) -> bool:
        """Every topic the filter can match must be readable by some rule."""
        if self.is_superuser(username):
            return True
        rules = self.rules_for(username, client_id)
        return any(
            r.access in ("read", "readwrite") and filter_covers(r.topic, filt) for r in rules
        )

    def _may(self, username: str | None, client_id: str, topic: str, want: str) -> bool:
        if self.is_superuser(username):
            return True
        allowed = False
        for rule in self.rules_for(username, client_id):
            if not topic_matches(rule.topic, topic):
                continue
            if rule.access == "deny":
                return False
            allowed = allowed or rule.access in (want, "readwrite")
        return allowed


# --------------------------------------------------------------------------- #
# TLS
# --------------------------------------------------------------------------- #


def server_tls_context(
    cert: Path | str, key: Path | str, ca: Path | str | None = None
) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, the broker's certificate chain.

    With ``ca``, every client must present a certificate that chains to it
    (mutual TLS; ``verify_mode = CERT_REQUIRED``). Without, clients are not
    asked for one.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def certificate_cn(peercert: object) -> str | None:
    """The subject CN of a certificate as returned by ``SSLSocket.getpeercert()``.

    None if there is no certificate, no CN, or more than one CN (ambiguous).
    """
    if not isinstance(peercert, dict):
        return None
    cns = [
        attr[1]
        for rdn in peercert.get("subject", ())
        for attr in rdn
        if len(attr) == 2 and attr[0] == "commonName"
    ]
    return cns[0] if len(cns) == 1 and isinstance(cns[0], str) and cns[0] else None


# --------------------------------------------------------------------------- #
# Broker
# --------------------------------------------------------------------------- #


@dataclass(eq=False)
class _Session:
    client_id: str
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    inflight: OrderedDict[int, Message] = field(default_factory=OrderedDict)
    pending: deque[Message] = field(default_factory=deque)
    qos2_awaiting_rel: set[int] = field(default_factory=set)
    conn: _Connection | None = None
    username: str | None = None  # of the connection that made it (ACL subject)
    last_packet_id: int = 0
    dropped: int = 0

    def next_packet_id(self) -> int:
        for _ in range(65535):
            self.last_packet_id = self.last_packet_id % 65535 + 1
            if self.last_packet_id not in self.inflight:
                return self.last_packet_id
        raise RuntimeError("no free packet identifier")  # inflight is bounded far below


@dataclass(eq=False)
class _ShareGroup:
    members: list[str] = field(default_factory=list)  # client ids, in joining order
    next: int = 0


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session: _Session | None = None
        self.tls_cn: str | None = None  # verified client certificate's CN, if any
        self.keepalive = 0
        self.will: Message | None = None
        self.disconnected_cleanly = False
        self.closed = False

    @property
    def name(self) -> str:
        cid = self.session.client_id if self.session else "?"
        return f"{cid}@{self.peer}"

    def send(self, data: bytes) -> None:
        if not self.closed and not self.writer.is_closing():
            self.writer.write(data)

    def buffered(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()


class MiniBroker:
    """In-memory MQTT 3.1.1 broker. See the module docstring for scope and limits.

    Use ``async with MiniBroker() as broker:`` (listens on 127.0.0.1, a free
    port, available as ``broker.port``), or ``await start()`` / ``await stop()``.
    ``stop()`` then ``start()`` on the same object keeps sessions and retained
    messages, like a restart of a broker with persistence; a new object starts
    empty, like one without.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        max_packet_size: int = 1 << 20,
        max_inflight: int = 20,
        max_queued: int = 1000,
        max_retained: int = 10_000,
        max_subscriptions: int = 1000,
        max_sessions: int = 10_000,
        connect_timeout: float = 10.0,
        max_write_buffer: int = 1 << 20,
        tls: ssl.SSLContext | None = None,
        identity_as_username: bool = False,
        acl: Acl | None = None,
    ) -> None:
        """``tls``: a server-side context (see :func:`server_tls_context`); the
        listener then speaks TLS only. ``identity_as_username`` and ``acl``: see
        the module docstring."""
        if tls is not None and tls.check_hostname:
            raise ValueError("tls must be a server-side context (see server_tls_context)")
        if identity_as_username:
            if tls is None or tls.verify_mode is not ssl.CERT_REQUIRED:
                raise ValueError(
                    "identity_as_username needs a TLS context that requires client "
                    "certificates (server_tls_context(..., ca=...))"
                )
            if users is not None:
                raise ValueError("identity_as_username and users cannot be combined")
        self.tls = tls
        self.identity_as_username = identity_as_username
        self.acl = acl
        self.users = dict(users) if users is not None else None
        self.max_packet_size = max_packet_size
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.max_retained = max_retained
        self.max_subscriptions = max_subscriptions
        self.max_sessions = max_sessions
        self.connect_timeout = connect_timeout
        self.max_write_buffer = max_write_buffer
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._sessions: dict[str, _Session] = {}
        self._shared: dict[tuple[str, str], _ShareGroup] = {}
        self._retained: dict[str, Message] = {}
        self._handlers: set[asyncio.Task[None]] = set()
        self._conns: set[_Connection] = set()
        self._auto_ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------- #

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("broker already started")
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]
        mode = "plain MQTT" if self.tls is None else "TLS"
        if self.tls is not None and self.tls.verify_mode is ssl.CERT_REQUIRED:
            mode = "mutual TLS"
        log.info("minibroker listening on %s:%d (%s)", self.host, self.port, mode)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.abort()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()
        log.info("minibroker on %s:%d stopped", self.host, self.port)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- introspection (for tests and the demo) ----------------------------- #

    def connected_clients(self) -> list[str]:
        return sorted(cid for cid, s in self._sessions.items() if s.conn is not None)

    def session_subscriptions(self, client_id: str) -> dict[str, int]:
        """Topic filter -> granted QoS of a session (empty if there is none)."""
        s = self._sessions.get(client_id)
        return dict(s.subscriptions) if s else {}

    def session_username(self, client_id: str) -> str | None:
        """The username a session acts as (the certificate CN with identity_as_username)."""
        s = self._sessions.get(client_id)
        return s.username if s else None

    def dropped_messages(self, client_id: str) -> int:
        """Messages for this session dropped because its queue or socket was full."""
        s = self._sessions.get(client_id)
        return s.dropped if s else 0

    def session_queue_length(self, client_id: str) -> int:
        """Unacknowledged + queued QoS 1 messages of a session (0 if none)."""
        s = self._sessions.get(client_id)
        return len(s.inflight) + len(s.pending) if s else 0

    # -- connection handling ------------------------------------------------ #

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        if self.tls is not None and not await self._handshake(writer):
            self._handlers.discard(task)
            return
        conn = _Connection(reader, writer)
        if self.tls is not None:
            conn.tls_cn = certificate_cn(writer.get_extra_info("peercert"))
        self._conns.add(conn)
        try:
            await self._serve(conn)
        except ProtocolError as exc:
            log.warning("minibroker: closing %s: protocol error: %s", conn.name, exc)
        except TimeoutError:
            if conn.session is None:
                log.warning("minibroker: closing %s: no CONNECT in time", conn.name)
            else:
                log.warning(
                    "minibroker: closing %s: keepalive %d s expired", conn.name, conn.keepalive
                )
        except (ConnectionError, OSError) as exc:
            log.info("minibroker: connection %s lost: %s", conn.name, exc)
        except asyncio.CancelledError:
            # stop(): end normally, since asyncio.start_server reports a handler
            # task that ends cancelled as an error (Python 3.11)
            pass
        finally:
            self._conns.discard(conn)
            self._detach(conn)
            if conn.closed or conn.buffered() > self.max_write_buffer:
                conn.abort()
            else:
                writer.close()  # flushes what is still buffered (e.g. a refusing CONNACK)
            self._handlers.discard(task)

    async def _handshake(self, writer: asyncio.StreamWriter) -> bool:
        """TLS server handshake on a fresh connection; False (logged, closed) on failure."""
        assert self.tls is not None
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await writer.start_tls(self.tls, ssl_handshake_timeout=self.connect_timeout)
        except ssl.SSLError as exc:
            reason = exc.reason or exc.strerror or str(exc)
            log.warning("minibroker: TLS handshake with %s failed: %s", where, reason)
        except TimeoutError:
            log.warning("minibroker: TLS handshake with %s timed out", where)
        except (ConnectionError, OSError) as exc:
            log.warning("minibroker: TLS handshake with %s failed: %s", where, exc)
        except asyncio.CancelledError:
            pass  # stop() during the handshake
        else:
            return True
        writer.transport.abort()
        return False

    async def _serve(self, conn: _Connection) -> None:
        framer = PacketReader(self.max_packet_size)
        queue: deque[RawPacket] = deque()
        while not conn.closed:
            while not queue:
                if conn.session is None:
                    timeout: float | None = self.connect_timeout
                else:
                    timeout = 1.5 * conn.keepalive if conn.keepalive else None
                async with asyncio.timeout(timeout):
                    data = await conn.reader.read(65536)
                if not data or conn.closed:
                    if conn.session is not None:
                        log.info("minibroker: %s closed the connection", conn.name)
                    return
                queue.extend(framer.feed(data))
            if not self._dispatch(conn, queue.popleft()):
                return

    def _dispatch(self, conn: _Connection, pkt: RawPacket) -> bool:
        """Handle one packet; False means: close this connection now."""
        if conn.session is None:
            if pkt.type != CONNECT:
                raise ProtocolError(f"first packet is type {pkt.type}, not CONNECT")
            return self._on_connect(conn, pkt.body)
        session = conn.session
        if pkt.type == PUBLISH:
            msg, packet_id, _dup = parse_publish(pkt.flags, pkt.body)
            allowed = self.acl is None or self.acl.may_write(
                session.username, session.client_id, msg.topic
            )
            if not allowed:
                log.warning(
                    "minibroker: %s (user %r) may not publish to %r; dropped",
                    conn.name,
                    session.username,
                    msg.topic,
                )
            if msg.qos == 2:
                assert packet_id is not None
                if packet_id not in session.qos2_awaiting_rel:
                    session.qos2_awaiting_rel.add(packet_id)
                    if allowed:
                        self._publish(msg)
                conn.send(encode_ack(PUBREC, packet_id))
            else:
                if allowed:
                    self._publish(msg)
                if packet_id is not None:
                    conn.send(encode_ack(PUBACK, packet_id))
        elif pkt.type == PUBACK:
            packet_id = parse_packet_id(pkt.type, pkt.body)
            if session.inflight.pop(packet_id, None) is None:
                log.debug("minibroker: %s acked unknown packet id %d", conn.name, packet_id)
            self._pump(session)
        elif pkt.type == PUBREL:
            packet_id = parse_packet_id(pkt.type, pkt.body)
            session.qos2_awaiting_rel.discard(packet_id)
            conn.send(encode_ack(PUBCOMP, packet_id))
        elif pkt.type == SUBSCRIBE:
            self._on_subscribe(conn, session, pkt.body)
        elif pkt.type == UNSUBSCRIBE:
            packet_id, filters = parse_unsubscribe(pkt.body)
            for filt in filters:
                self._unsubscribe(session, filt)
            conn.send(encode_ack(UNSUBACK, packet_id))
        elif pkt.type == PINGREQ:
            if pkt.body:
                raise ProtocolError("PINGREQ with a body")
            conn.send(encode_packet(PINGRESP, 0))
        elif pkt.type == DISCONNECT:
            if pkt.body:
                raise ProtocolError("DISCONNECT with a body")
            conn.disconnected_cleanly = True
            return False
        elif pkt.type == CONNECT:
            raise ProtocolError("second CONNECT on one connection")
        else:  # PUBREC / PUBCOMP: the broker never sends QoS 2
            raise ProtocolError(f"unexpected packet type {pkt.type}")
        return True

    def _on_connect(self, conn: _Connection, body: bytes) -> bool:
        try:
            req = parse_connect(body)
        except UnacceptableProtocol as exc:
            log.warning("minibroker: refusing %s: %s", conn.peer, exc)
            conn.send(encode_connack(False, CONNACK_BAD_PROTOCOL))
            return False
        client_id = req.client_id or f"minibroker-auto-{next(self._auto_ids)}"
        username = conn.tls_cn if self.identity_as_username else req.username
        refusal = self._check_connect(req, client_id, username)
        if refusal is not None:
            log.warning(
                "minibroker: refusing %s (%r, user %r): code %d",
                conn.peer,
                req.client_id,
                username,
                refusal,
            )
            conn.send(encode_connack(False, refusal))
            conn.disconnected_cleanly = True  # no session, no will
            return False
        old = self._sessions.get(client_id)
        if old is not None and old.conn is not None:
            log.info("minibroker: %s takes over session %r", conn.peer, client_id)
            taken = old.conn
            old.conn = None
            taken.abort()  # its handler publishes its will
        resumed = old is not None and not old.clean and not req.clean_session
        if resumed:
            assert old is not None
            session = old
        else:
            if old is not None:
                self._drop_session(old)
            session = _Session(client_id, clean=req.clean_session, username=username)
            self._sessions[client_id] = session
        session.conn = conn
        conn.session = session
        conn.keepalive = req.keepalive
        conn.will = req.will
        conn.send(encode_connack(resumed, CONNACK_ACCEPTED))
        log.info(
            "minibroker: %s connected (user %r, clean=%s, keepalive=%d, session present=%s)",
            conn.name,
            username,
            req.clean_session,
            req.keepalive,
            resumed,
        )
        if resumed:
            for packet_id, msg in session.inflight.items():
                conn.send(encode_publish(msg, packet_id, dup=True))
            self._pump(session)
        return True

    def _check_connect(
        self, req: ConnectRequest, client_id: str, username: str | None
    ) -> int | None:
        if not req.client_id and not req.clean_session:
            return CONNACK_ID_REJECTED
        if self.identity_as_username and username is None:
            return CONNACK_NOT_AUTHORIZED  # no usable CN in the client certificate
        if self.acl is not None or self.identity_as_username:
            old = self._sessions.get(client_id)
            if old is not None and old.username != username:
                return CONNACK_ID_REJECTED  # another identity's session
        if self.acl is not None:
            if req.will is not None and not self.acl.may_write(username, client_id, req.will.topic):
                return CONNACK_NOT_AUTHORIZED
        if self.users is not None:
            if req.username is None:
                return CONNACK_NOT_AUTHORIZED
            expected = self.users.get(req.username)
            if expected is None or req.password != expected.encode("utf-8"):
                return CONNACK_BAD_CREDENTIALS
        if req.client_id not in self._sessions and len(self._sessions) >= self.max_sessions:
            return CONNACK_UNAVAILABLE
        return None

    def _detach(self, conn: _Connection) -> None:
        session = conn.session
        if session is None:
            return
        if not conn.disconnected_cleanly and conn.will is not None:
            log.info("minibroker: publishing will of %s", conn.name)
            self._publish(conn.will)
        conn.will = None
        if session.conn is conn:
            session.conn = None
            if session.clean:
                self._drop_session(session)

    def _drop_session(self, session: _Session) -> None:
        for filt in list(session.subscriptions):
            self._unsubscribe(session, filt)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    # -- subscriptions ------------------------------------------------------ #

    def _on_subscribe(self, conn: _Connection, session: _Session, body: bytes) -> None:
        packet_id, requests = parse_subscribe(body)
        codes: list[int] = []
        to_send: list[tuple[Message, int]] = []
        for filt, qos in requests:
            try:
                group, inner = split_shared(filt)
            except ValueError:
                group, inner = None, ""
            full = (
                filt not in session.subscriptions
                and len(session.subscriptions) >= self.max_subscriptions
            )
            if full or not valid_topic_filter(inner):
                log.warning("minibroker: %s: refusing subscription %r", conn.name, filt)
                codes.append(SUBACK_FAILURE)
                continue
            if self.acl is not None and not self.acl.may_subscribe(
                session.username, session.client_id, inner
            ):
                log.warning(
                    "minibroker: %s (user %r) may not subscribe to %r",
                    conn.name,
                    session.username,
                    filt,
                )
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(qos, 1)
            session.subscriptions[filt] = granted
            codes.append(granted)
            if group is not None:
                members = self._shared.setdefault((group, inner), _ShareGroup()).members
                if session.client_id not in members:
                    members.append(session.client_id)
            else:
                to_send.extend(
                    (m, granted)
                    for t, m in self._retained.items()
                    if topic_matches(inner, t) and self._may_read(session, t)
                )
        conn.send(encode_suback(packet_id, codes))
        for msg, granted in to_send:
            self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, granted), True))

    def _unsubscribe(self, session: _Session, filt: str) -> None:
        if session.subscriptions.pop(filt, None) is None:
            return
        try:
            group, inner = split_shared(filt)
        except ValueError:
            return
        if group is None:
            return
        share = self._shared.get((group, inner))
        if share is not None and session.client_id in share.members:
            share.members.remove(session.client_id)
            if not share.members:
                del self._shared[(group, inner)]

    # -- routing ------------------------------------------------------------ #

    def _publish(self, msg: Message) -> None:
        if msg.retain:
            if not msg.payload:
                self._retained.pop(msg.topic, None)
            elif msg.topic in self._retained or len(self._retained) < self.max_retained:
                self._retained[msg.topic] = msg
            else:
                log.warning("minibroker: retained store full, not retaining %r", msg.topic)
        for session in list(self._sessions.values()):
            if not self._may_read(session, msg.topic):
                continue
            best = -1
            for filt, granted in session.subscriptions.items():
                if not filt.startswith("$share/") and topic_matches(filt, msg.topic):
                    best = max(best, granted)
            if best >= 0:
                self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, best)))
        for (_group, inner), share in list(self._shared.items()):
            if topic_matches(inner, msg.topic):
                self._deliver_shared(share, _group, inner, msg)

    def _may_read(self, session: _Session, topic: str) -> bool:
        return self.acl is None or self.acl.may_read(session.username, session.client_id, topic)

    def _deliver_shared(self, share: _ShareGroup, group: str, inner: str, msg: Message) -> None:
        n = len(share.members)
        order = [
            (share.next + i) % n
            for i in range(n)
            if self._may_read(self._sessions[share.members[(share.next + i) % n]], msg.topic)
        ]
        if not order:
            return
        online = [i for i in order if self._sessions[share.members[i]].conn is not None]
        chosen = (online or order)[0]
        share.next = (chosen + 1) % n
        session = self._sessions[share.members[chosen]]
        granted = session.subscriptions[f"$share/{group}/{inner}"]
        self._deliver(session, Message(msg.topic, msg.payload, min(msg.qos, granted)))

    def _deliver(self, session: _Session, msg: Message) -> None:
        conn = session.conn
        if msg.qos == 0:
            if conn is None:
                return
            if conn.buffered() > self.max_write_buffer:
                session.dropped += 1
                log.warning("minibroker: %s is not reading; QoS 0 message dropped", conn.name)
                return
            conn.send(encode_publish(msg))
            return
        if len(session.pending) >= self.max_queued:
            session.dropped += 1
            log.warning(
                "minibroker: queue of %r full (%d); QoS 1 message on %r dropped",
                session.client_id,
                self.max_queued,
                msg.topic,
            )
            return
        session.pending.append(msg)
        self._pump(session)

    def _pump(self, session: _Session) -> None:
        """Move queued QoS 1 messages in flight while the window allows."""
        conn = session.conn
        if conn is None:
            return
        while session.pending and len(session.inflight) < self.max_inflight:
            msg = session.pending.popleft()
            packet_id = session.next_packet_id()
            session.inflight[packet_id] = msg
            conn.send(encode_publish(msg, packet_id))


# --------------------------------------------------------------------------- #
# Command line: python -m testbed.minibroker --port N
#   [--cert broker.pem --key broker.key [--ca ca.pem [--identity-as-username]]]
#   [--acl-file edgegw.acl [--superuser NAME ...]]
# --------------------------------------------------------------------------- #


def _parse_user(text: str) -> tuple[str, str]:
    name, sep, password = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME:PASSWORD")
    return name, password


def _broker_from_args(args: argparse.Namespace) -> MiniBroker:
    users = dict(args.user) if args.user else None
    tls = None
    if args.cert or args.key or args.ca:
        if not (args.cert and args.key):
            raise ValueError("--cert and --key go together (and --ca needs both)")
        tls = server_tls_context(args.cert, args.key, args.ca)
    acl = Acl.load(args.acl_file, args.superuser or ()) if args.acl_file else None
    if args.superuser and acl is None:
        raise ValueError("--superuser needs --acl-file")
    return MiniBroker(
        users=users,
        max_packet_size=args.max_packet_size,
        tls=tls,
        identity_as_username=args.identity_as_username,
        acl=acl,
    )


async def _run(args: argparse.Namespace) -> None:
    broker = _broker_from_args(args)
    await broker.start(args.host, args.port)
    print(f"minibroker listening on {broker.host}:{broker.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.minibroker",
        description="Small in-memory MQTT 3.1.1 broker for the demo and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=1883, help="port (0 = any free port)")
    parser.add_argument(
        "--user",
        action="append",
        type=_parse_user,
        metavar="NAME:PASSWORD",
        help="require this login (repeatable); without it, anyone may connect",
    )
    parser.add_argument("--cert", type=Path, help="server certificate (PEM): listen with TLS")
    parser.add_argument("--key", type=Path, help="private key of --cert (PEM)")
    parser.add_argument(
        "--ca", type=Path, help="require client certificates signed by this CA (mutual TLS)"
    )
    parser.add_argument(
        "--identity-as-username",
        action="store_true",
        help="the client certificate's CN is the MQTT username (needs --ca)",
    )
    parser.add_argument(
        "--acl-file", type=Path, help="topic access rules in mosquitto acl_file syntax"
    )
    parser.add_argument(
        "--superuser",
        action="append",
        metavar="NAME",
        help="username exempt from --acl-file (repeatable)",
    )
    parser.add_argument("--max-packet-size", type=int, default=1 << 20)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        asyncio.run(_run(args))
    except (OSError, ValueError) as exc:
        print(f"minibroker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
