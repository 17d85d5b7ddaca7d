"""One log line per change of cause, not one per retry.

A gateway retries for ever: a broker that refuses, a missing CA file, an
unplugged serial adapter. Logging every attempt floods the journal (and the
SD card) with the same line and buries the one that changed.
:class:`CauseLog` logs a recurring failure when its cause first appears or
changes, with how many times the previous cause repeated, and once more when
it clears::

    link = CauseLog(log, "uplink")
    while True:
        try:
            await connect()
        except OSError as exc:
            link.failed(str(exc))     # logged on the 1st time and on a new cause
        else:
            link.ok("connected")      # logged once, with the count, if it had failed
    # when the loop ends for good (a clean stop) while it still fails:
    link.stopped()                    # logged once, with the count

``fields`` go on every line it writes as ``key=value`` fields
(:mod:`firmware_bridge.logfmt`), with ``repeats`` and ``failures`` where a
line reports counts.

Pure bookkeeping with an injectable clock; no I/O besides the logger, no
dependency on any layer above, so every layer may use it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any


class CauseLog:
    """Log a recurring failure of ``subject`` once per change of cause."""

    def __init__(
        self,
        logger: logging.Logger,
        subject: str,
        *,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        self.logger = logger
        self.fields = dict(fields or {})
        self.subject = subject
        self.level = level
        self.clock = clock
        self.cause: str | None = None  # the current cause; None while all is well
        self.repeats = 0  # failures with the current cause, the logged one included
        self.failures = 0  # failures since the last success, all causes
        self._since = 0.0

    def failed(self, cause: str, *, exc_info: Any = None) -> bool:
        """Count one failure; log it (and return True) if its cause is new."""
        self.failures += 1
        if cause == self.cause:
            self.repeats += 1
            return False
        previous, times = self.cause, self.repeats
        if previous is None:
            self._since = self.clock()
            self.logger.log(
                self.level, "%s: %s", self.subject, cause, exc_info=exc_info, extra=self.fields, stacklevel=2
            )
        else:
            self.logger.log(
                self.level,
                "%s: %s (the previous cause repeated %d time%s: %s)",
                self.subject,
                cause,
                times,
                "" if times == 1 else "s",
                previous,
                exc_info=exc_info,
                extra={**self.fields, "repeats": times},
                stacklevel=2,
            )
        self.cause, self.repeats = cause, 1
        return True

    def ok(self, what: str = "recovered") -> bool:
        """The condition cleared; log it (and return True) if there were failures."""
        if self.cause is None:
            return False
        self.logger.info(
            "%s: %s after %d failure%s in %.0f s (last cause, %d time%s: %s)",
            self.subject,
            what,
            self.failures,
            "" if self.failures == 1 else "s",
            self.clock() - self._since,
            self.repeats,
            "" if self.repeats == 1 else "s",
            self.cause,
            extra={**self.fields, "repeats": self.repeats, "failures": self.failures},
            stacklevel=2,
        )
        self.cause, self.repeats, self.failures = None, 0, 0
        return True

    def stopped(self) -> bool:
        """The loop ends (a clean stop) while the condition holds: log (and return
        True) how often the current cause repeated since its line, if it did."""
        if self.cause is None or self.repeats < 2:
            return False
        self.logger.log(
            self.level,
            "%s: still failing at stop after %d failure%s in %.0f s (last cause, %d time%s: %s)",
            self.subject,
            self.failures,
            "" if self.failures == 1 else "s",
            self.clock() - self._since,
            self.repeats,
            "" if self.repeats == 1 else "s",
            self.cause,
            extra={**self.fields, "repeats": self.repeats, "failures": self.failures},
            stacklevel=2,
        )
        self.cause, self.repeats, self.failures = None, 0, 0
        return True
