"""Log lines the journal reads well: priorities, ``key=value`` fields, runs folded.

Three small parts, used by the gateway daemon and the headend (and by any
command of ``edgegw``), set up once by :func:`configure`:

* **Priority prefixes.** When stderr is the journal (systemd sets
  ``JOURNAL_STREAM`` to the device and inode of that stream; the check
  compares them with stderr's own), every line starts with its syslog
  priority as sd-daemon(3) defines it — ``<2>`` critical, ``<3>`` error,
  ``<4>`` warning, ``<5>`` notice, ``<6>`` info, ``<7>`` debug — and journald
  stores it as the entry's PRIORITY, so ``journalctl -p warning`` works. Every
  line of a multi-line entry (a traceback) carries the prefix: journald takes
  each line as an entry of its own. journald stamps the time, so the line
  carries none; elsewhere (a terminal, a file) the line starts with the time
  and the level name instead.
* **Fields.** ``log.warning("...", extra={"meter": "m-0002", "bus": "rs485-1"})``
  ends the line with ``meter=m-0002 bus=rs485-1``; values with spaces, quotes
  or ``=`` are quoted (``cause="no reply"``). Fields set once for the process
  (``gateway=gw-0001``) come from :func:`set_fields`.
* **Runs folded.** :class:`FoldingHandler` writes a line that repeats (the
  same call site, level, fields and text, each within ``window_s`` of the
  last) once, and the count when the run ends: at the next different line
  from that call site with those fields (a change of cause), when it has been
  quiet for ``window_s``, or at exit — ``... (repeated 41 more times in 1260
  s)``. A loop per entity (a bus, a meter) names it in a field, so loops
  logging from one call site for different entities fold separately. A retry loop that logs
  each attempt thus costs one line per change of cause; loops that know when
  they recover use :class:`firmware_bridge.cause_log.CauseLog`, which also
  says when the condition cleared.

No I/O besides the stream given; no dependency on any layer above.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

# syslog's NOTICE (5), between INFO and WARNING: a normal but significant condition
# (a link that came back, a configuration change put in force).
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# The attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
# Fields that differ on every repetition of the same condition and so do not make
# a line different for folding (they still appear on the line that is written).
VOLATILE_FIELDS = frozenset({"command", "batch", "attempt"})

ENV_FORMAT = "EDGEGW_LOG_FORMAT"  # "journal" or "plain": overrides the detection


def syslog_priority(levelno: int) -> int:
    """The sd-daemon(3) priority of a logging level (SD_CRIT 2 … SD_DEBUG 7)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= NOTICE:
        return 5
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is connected to the journal.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stdout or
    stderr goes to the journal; the stream is the journal's only if its own
    device and inode are those (a redirection in between gives other ones).
    ``EDGEGW_LOG_FORMAT=journal`` or ``plain`` decides instead of the check."""
    env = os.environ if env is None else env
    forced = env.get(ENV_FORMAT, "").strip().lower()
    if forced in ("journal", "plain"):
        return forced == "journal"
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of ``record``, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _needs_quotes(text: str) -> bool:
    return not text or any(c.isspace() or c in "\"'=\\" or not c.isprintable() for c in text)


def render_value(value: Any) -> str:
    """A field value as it goes on the line: bare when it can be, else quoted
    with ``\\``, ``"`` and control characters escaped (one line, always)."""
    text = value if isinstance(value, str) else str(value)
    if not _needs_quotes(text):
        return text
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif not c.isprintable():
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def render_fields(fields: Mapping[str, Any]) -> str:
    """``key=value`` pairs separated by spaces (keys as given, values by
    :func:`render_value`); fields whose value is None are left out."""
    return " ".join(f"{k}={render_value(v)}" for k, v in fields.items() if v is not None)


class JournalFormatter(logging.Formatter):
    """``<P>logger: message key=value ...`` for the journal, or
    ``TIME LEVEL logger: message key=value ...`` elsewhere."""

    def __init__(self, *, journal: bool, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.journal = journal
        self.fields: dict[str, Any] = dict(fields or {})

    def text(self, record: logging.LogRecord) -> str:
        """The line without prefix or exception: ``logger: message key=value ...``."""
        fields = {**self.fields, **fields_of(record)}
        line = f"{record.name}: {record.getMessage()}"
        rendered = render_fields(fields)
        return f"{line} {rendered}" if rendered else line

    def format(self, record: logging.LogRecord) -> str:
        text = self.text(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        if self.journal:
            prefix = f"<{syslog_priority(record.levelno)}>"
            return "\n".join(prefix + line for line in text.split("\n"))
        return f"{self.formatTime(record)} {record.levelname} {text}"


@dataclass
class _Run:
    """A line being repeated: the record written first, and what was folded since."""

    record: logging.LogRecord
    identity: str
    started: float
    last: float
    repeats: int = 0  # lines folded into it (not written)


class FoldingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes a run of the same line once, then its count.

    Lines are the same when they come from the same call site (logger, level,
    message template) with the same fields (:data:`VOLATILE_FIELDS` aside) and
    the same text, each within ``window_s`` of the one before; another text
    from that call site with those fields ends the run. The first is written;
    the others are counted, and the count is written, as the repeated line
    with ``(repeated N more times in S s)`` and a ``repeats=N`` field, when the
    call site logs something else, after ``window_s`` without a repetition
    (noticed at the next line written), and at :meth:`close` (logging's exit
    handler), so no count is lost on a clean stop.
    """

    MAX_RUNS = 256  # call sites tracked at once (oldest forgotten, its count written)

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stream)
        self.window_s = window_s
        self.clock = clock
        self._runs: dict[tuple[str, int, str, str], _Run] = {}

    @staticmethod
    def _key(record: logging.LogRecord) -> tuple[str, int, str, str]:
        fields = {k: v for k, v in fields_of(record).items() if k not in VOLATILE_FIELDS}
        return (record.name, record.levelno, str(record.msg), render_fields(fields))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = self.clock()
            self._end_quiet_runs(now)
            key = self._key(record)
            identity = record.getMessage()
            run = self._runs.get(key)
            if (
                run is not None
                and run.identity == identity
                and now - run.last <= self.window_s
                and not record.exc_info
            ):
                run.repeats += 1
                run.last = now
                return
            if run is not None:
                self._end(key, run)
            if len(self._runs) >= self.MAX_RUNS:
                oldest = min(self._runs, key=lambda k: self._runs[k].last)
                self._end(oldest, self._runs[oldest])
            self._runs[key] = _Run(record, identity, now, now)
        except Exception:
            self.handleError(record)
            return
        super().emit(record)

    def _end_quiet_runs(self, now: float) -> None:
        for key, run in list(self._runs.items()):
            if now - run.last > self.window_s:
                self._end(key, run)

    def _end(self, key: tuple[str, int, str, str], run: _Run) -> None:
        """Forget the run; write its count if anything was folded into it."""
        self._runs.pop(key, None)
        if run.repeats:
            super().emit(summary_record(run.record, run.repeats, run.last - run.started))

    def flush_runs(self) -> None:
        """Write the count of every run now (e.g. before the process ends)."""
        self.acquire()
        try:
            for key, run in list(self._runs.items()):
                self._end(key, run)
        finally:
            self.release()

    def close(self) -> None:
        self.flush_runs()
        super().close()


def summary_record(record: logging.LogRecord, repeats: int, seconds: float) -> logging.LogRecord:
    """The line that ends a run: ``record``'s text with how often it repeated."""
    text = record.getMessage()
    times = "time" if repeats == 1 else "times"
    out = logging.LogRecord(
        record.name,
        record.levelno,
        record.pathname,
        record.lineno,
        "%s (repeated %d more %s in %.0f s)",
        (text, repeats, times, seconds),
        None,
        record.funcName,
    )
    for k, v in fields_of(record).items():
        setattr(out, k, v)
    out.repeats = repeats
    return out


def configure(
    level: int,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
    fields: Mapping[str, Any] | None = None,
    window_s: float = 600.0,
    force: bool = False,
) -> FoldingHandler | None:
    """Send the root logger's output to ``stream`` (default stderr) through a
    :class:`FoldingHandler` and a :class:`JournalFormatter` (priority prefixes
    when the stream is the journal), and set the root logger's level. Replaces
    handlers an earlier call installed. Like :func:`logging.basicConfig`, it does
    nothing (and returns None) when the root logger already has handlers of
    another kind — a program that embeds the command (a test runner) keeps its
    own — unless ``force``."""
    root = logging.getLogger()
    if not force and any(not isinstance(h, FoldingHandler) for h in root.handlers):
        return None
    stream = sys.stderr if stream is None else stream
    handler = FoldingHandler(stream, window_s=window_s)
    handler.setFormatter(JournalFormatter(journal=stderr_is_journal(env, stream), fields=fields))
    for old in [h for h in root.handlers if isinstance(h, FoldingHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def set_fields(**fields: Any) -> None:
    """Fields every line of this process carries from now on (e.g. ``gateway``)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, FoldingHandler) and isinstance(h.formatter, JournalFormatter):
            h.formatter.fields.update(fields)
