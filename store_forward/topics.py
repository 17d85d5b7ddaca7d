"""MQTT topic names of protocol v1 (see docs/protocol.md).

All topics of one gateway live under ``{prefix}/{gateway_id}/``, so a broker
ACL can confine each gateway to its own subtree.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "edgegw/v1"


@dataclass(frozen=True)
class Topics:
    prefix: str
    gateway_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.gateway_id}"

    @property
    def up(self) -> str:
        """Gateway → headend: sealed batches (QoS 1)."""
        return f"{self.base}/up"

    @property
    def ack(self) -> str:
        """Headend → gateway: application-level acks (QoS 1)."""
        return f"{self.base}/ack"

    @property
    def state(self) -> str:
        """Gateway presence, retained; the broker publishes "offline" as last will."""
        return f"{self.base}/state"

    @property
    def cmd(self) -> str:
        """Central → gateway: signed commands (QoS 1)."""
        return f"{self.base}/cmd"


def up_filter(prefix: str = DEFAULT_PREFIX, share_group: str | None = None) -> str:
    """The headend's subscription to every gateway's batches."""
    f = f"{prefix}/+/up"
    return f"$share/{share_group}/{f}" if share_group else f


def gateway_of(topic: str, prefix: str = DEFAULT_PREFIX) -> str | None:
    """Gateway id from ``{prefix}/{gw}/up``; None if the topic is not a batch topic."""
    head = prefix + "/"
    if not topic.startswith(head) or not topic.endswith("/up"):
        return None
    gw = topic[len(head) : -len("/up")]
    return gw if gw and "/" not in gw else None
