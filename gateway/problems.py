"""Problems found in what the gateway reads, each with where it is.

One collector for every file and body the gateway validates: the
configuration, tariff and account files, command bodies. A technician fixes a
broken file in one pass, so a reader never stops at the first problem: it
adds each one to a :class:`Problems` and raises the reader's own
:class:`~firmware_bridge.errors.ProblemsError` with all of them at the end.
Every problem is one line::

    FILE[:LINE]: PATH: what is wrong
    site.toml:14: meter[m-0002].unit_id: must be a Modbus unit id 1..247, got 300
    tariffs/flat.toml: tou.workday[0]: the first period must start at 00:00
    topup.amount_micro: must be an integer >= 1, got '7'

FILE is left out for a body that came in a message; LINE is there when the
reader knows where the key is (the configuration: :mod:`gateway.toml_lines`);
PATH is the key path, rendered by the reader's ``label`` (the configuration
names ``[[meter]]`` entries by their id).

:func:`read_toml` reads a TOML file within bounds (a regular file, at most
:data:`MAX_FILE_BYTES`, UTF-8, nested at most :data:`MAX_NESTING` deep), so a
device, a huge file or a hostile one is a problem, never a hang or a crash.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_bridge.errors import ProblemsError
from gateway.toml_lines import Lines, ScanError, nesting_depth, scan

KeyPath = tuple[str | int, ...]

MAX_FILE_BYTES = 4 * 1024 * 1024  # a 2,000-meter site's configuration is ~300 KB
MAX_NESTING = 8  # tables and arrays; the deepest real use is profiles.NAME.fields.Q.key (5)


def dotted(path: KeyPath) -> str:
    """``("tou", "workday", 0)`` as ``tou.workday[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out


_SEGMENT = re.compile(r"([^.\[\]]*)((?:\[\d+\])*)")


def key_path(written: str) -> KeyPath:
    """The key path of a path written out (``"tier.thresholds_kwh[1]"`` →
    ``("tier", "thresholds_kwh", 1)``), for finding its line; () when it is not
    one (a quoted key with a dot): no line then, never a wrong one."""
    out: list[str | int] = []
    for segment in written.split(".") if written else ():
        m = _SEGMENT.fullmatch(segment)
        if m is None:
            return ()
        if m.group(1):
            out.append(m.group(1))
        out += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    return tuple(out)


class Problems:
    """The problems of one document, in the order found; see the module documentation.

    ``path`` is a key path (a tuple, rendered by ``label``) or a path already
    written out (``"tier.thresholds_kwh[1]"``); ``prefix`` goes before every
    path (``topup`` for a top-up body).
    """

    def __init__(
        self,
        source: str | Path | None = None,
        *,
        prefix: KeyPath = (),
        line: Callable[[KeyPath], int | None] | None = None,
        label: Callable[[KeyPath], str] = dotted,
    ) -> None:
        self.source = None if source is None else str(source)
        self.prefix = prefix
        self.line = line
        self.label = label
        self.problems: list[str] = []

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path`` in the file, where the reader knows it."""
        return self.line(path) if self.line is not None and path else None

    def render(self, path: KeyPath | str, problem: str, *, at: KeyPath | None = None) -> str:
        """The problem line; its line number is the one of ``at`` when given, else of ``path``."""
        if isinstance(path, tuple):
            key = (*self.prefix, *path)
            where = self.label(key)
        else:
            key = (*self.prefix, *key_path(path))
            where = ".".join(part for part in (dotted(self.prefix), path) if part)
        head: list[str] = []
        if self.source is not None:
            line = self.line_of(key if at is None else at)
            head.append(f"{self.source}:{line}" if line else self.source)
        if where:
            head.append(where)
        return ": ".join([*head, problem])

    def add(self, path: KeyPath | str, problem: str, *, at: KeyPath | None = None) -> None:
        self.problems.append(self.render(path, problem, at=at))

    def unknown(self, path: KeyPath | str, raw: Mapping[str, Any], allowed: Iterable[str]) -> None:
        """One problem per key of ``raw`` that is not in ``allowed``."""
        allowed = set(allowed)
        for k in raw:
            if k not in allowed:
                at: KeyPath | str = (*path, k) if isinstance(path, tuple) else (f"{path}.{k}" if path else k)
                self.add(at, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def extend(self, lines: Iterable[str]) -> None:
        """Problems already written out (another file's, or a lower layer's)."""
        self.problems.extend(lines)

    def check(self, error: Callable[[list[str]], ProblemsError]) -> None:
        """Raise ``error`` with every problem, if there is any."""
        if self.problems:
            raise error(list(self.problems))

    def __len__(self) -> int:
        return len(self.problems)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def __iter__(self) -> Iterator[str]:
        return iter(self.problems)


@dataclass(frozen=True)
class TomlDocument:
    """A TOML file as read: its values and its text (for :meth:`lines`)."""

    raw: dict[str, Any]
    text: str

    def lines(self) -> Lines:
        """Where each table and key is; no lines where the scan and tomllib disagree."""
        try:
            lines = scan(self.text)
        except ScanError:
            return Lines.unknown()
        return lines if lines.agrees_with(self.raw) else Lines.unknown()


def not_a_regular_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a TOML file (a device, a FIFO or a huge file
    would hang or exhaust the reader), or None. A missing file is left to the
    reader, which names it."""
    try:
        st = path.stat()
    except (OSError, ValueError):  # missing, unreachable, or a NUL in the name: the reader says
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not a configuration file"
    return None


def read_toml(path: Path, problems: Problems) -> TomlDocument | None:
    """The TOML file at ``path``, or None with the reason added to ``problems`` (at the file)."""
    if (why := not_a_regular_file(path)) is not None:
        problems.add((), why)
        return None
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        problems.add((), f"cannot read file: {exc.strerror or exc}")
        return None
    except ValueError as exc:  # e.g. an embedded NUL in the path
        problems.add((), f"cannot read file: {exc}")
        return None
    if len(data) > MAX_FILE_BYTES:
        problems.add((), f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; not a configuration file")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add((), f"not UTF-8 text: {exc.reason} at byte {exc.start}")
        return None
    if nesting_depth(text, MAX_NESTING) > MAX_NESTING:
        problems.add((), f"arrays or inline tables nest deeper than {MAX_NESTING} levels")
        return None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.add((), f"TOML syntax error: {exc}")
        return None
    except RecursionError:
        problems.add((), f"nested deeper than {MAX_NESTING} levels")
        return None
    if _depth(raw, MAX_NESTING) > MAX_NESTING:
        problems.add((), f"tables or arrays nest deeper than {MAX_NESTING} levels")
        return None
    return TomlDocument(raw, text)


def _depth(doc: Any, limit: int) -> int:
    """How deeply tables and arrays nest in a parsed document (iterative); stops
    looking past ``limit + 1``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest
