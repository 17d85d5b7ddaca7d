"""The relay vocabulary: what the gateway asks of a meter's supply relay, and the intent to do it.

:class:`RelayOp` is the one set of words for every part that decides, asks
for, carries out or reports a relay operation: the cutoff policy's actions,
the signed ``relay.operate`` command, the relay controller and the DL/T 645
actuator, the relay worker and the events central gets.

* ``trip``, ``close``, ``close_allowed`` move the relay (``close_allowed``
  arms it: the customer closes at the meter, DL/T 645 1BH);
* ``alarm_on``/``alarm_off`` and ``protect_on``/``protect_off`` are signals to
  the meter (its alarm, DL/T 645 2AH/2BH, and power-protect 保电, 3AH/3BH): they
  move nothing.

Central's ``relay.operate`` names the signals ``alarm``, ``alarm_off``,
``protect``, ``unprotect`` (docs/security.md): :attr:`RelayOp.command_word`
is an operation's word there, and ``RelayOp(word)`` takes those words too.

:class:`RelayIntent` is one operation decided in a transaction, carried out
after its commit (the cutoff policy's and a command's alike).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RelayOp(enum.StrEnum):
    TRIP = "trip"  # open the supply relay
    CLOSE = "close"  # close directly
    CLOSE_ALLOWED = "close_allowed"  # arm: the customer closes at the meter
    ALARM_ON = "alarm_on"  # the meter warns the customer (buzzer, display)
    ALARM_OFF = "alarm_off"
    PROTECT_ON = "protect_on"  # power-protect: the meter refuses trips while set
    PROTECT_OFF = "protect_off"
    # The same operations under central's relay.operate words.
    ALARM = "alarm_on"
    PROTECT = "protect_on"
    UNPROTECT = "protect_off"

    @classmethod
    def _missing_(cls, value: object) -> RelayOp | None:
        return _BY_COMMAND_WORD.get(value) if isinstance(value, str) else None

    @property
    def is_signal(self) -> bool:
        """A signal to the meter: nothing moves, the meter's acknowledgement is the evidence."""
        return self in _SIGNALS

    @property
    def opens(self) -> bool:
        """The relay state the operation drives to: open for a trip, closed otherwise."""
        return self is RelayOp.TRIP

    @property
    def command_word(self) -> str:
        """The operation's word in central's ``relay.operate`` command."""
        return _COMMAND_WORD.get(self, self.value)


_SIGNALS = frozenset({RelayOp.ALARM_ON, RelayOp.ALARM_OFF, RelayOp.PROTECT_ON, RelayOp.PROTECT_OFF})
_COMMAND_WORD = {RelayOp.ALARM_ON: "alarm", RelayOp.PROTECT_ON: "protect", RelayOp.PROTECT_OFF: "unprotect"}
_BY_COMMAND_WORD = {word: op for op, word in _COMMAND_WORD.items()}


@dataclass(frozen=True)
class RelayIntent:
    """A relay operation decided in a transaction, to carry out after its commit.

    ``account`` is the account whose cutoff policy decided it ("" when none);
    ``command_id`` the signed command that asked for it (None: the policy
    decided it), which stops being carried out at ``expires_ms``.
    """

    meter: str
    op: RelayOp
    reason: str
    account: str = ""
    command_id: str | None = None
    expires_ms: int | None = None

    @property
    def open(self) -> bool:
        """The relay state wanted (meaningful when the operation is not a signal)."""
        return self.op.opens

    @property
    def commanded(self) -> bool:
        """Asked for by a signed command (not by the cutoff policy)."""
        return self.command_id is not None
