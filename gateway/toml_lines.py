"""Line numbers for a TOML document: where each table header and key is.

:mod:`tomllib` returns values only. Configuration messages name the line of
the key (or of the table's header) they are about, so this module scans the
source text once and records, for every table, array-of-tables entry and key,
the line it starts on. It is not a second TOML parser: it knows just enough
(comments, the four string forms, brackets, headers, dotted and quoted keys)
to follow the document's structure, and it is trusted only when that
structure is exactly the one tomllib parsed (:meth:`Lines.agrees_with`);
otherwise no line is given, never a wrong one.

:func:`nesting_depth` measures how deeply brackets nest, so a hostile file
is refused before the recursive parser sees it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from firmware_bridge.errors import EdgeGwError, ErrorKind

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class ScanError(EdgeGwError, ValueError):
    """The text is not TOML as far as the scan can tell (tomllib says why)."""

    kind = ErrorKind.INVALID


class _Table:
    __slots__ = ("children", "line")

    def __init__(self, line: int) -> None:
        self.line = line
        self.children: dict[str, _Table | list[_Table] | int] = {}


_Node = _Table | list[_Table] | int


class Lines:
    """Where the parts of one document are. ``line(path)`` for a path such as
    ``("meter", 2, "unit_id")``: the key's line, else the nearest enclosing
    table's header line, else None."""

    def __init__(self, root: _Table | None) -> None:
        self._root = root

    def line(self, path: Sequence[str | int]) -> int | None:
        node: _Node | None = self._root
        best: int | None = None
        for part in path:
            child: _Node | None = None
            if isinstance(node, _Table) and isinstance(part, str):
                child = node.children.get(part)
            elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
                child = node[part]
            if child is None:
                break
            if isinstance(child, int):
                return child
            if isinstance(child, _Table) and child.line:
                best = child.line
            node = child
        return best

    def agrees_with(self, doc: Mapping[str, Any]) -> bool:
        """True when every table the scan saw has exactly the keys tomllib parsed,
        and every array of tables has as many entries."""
        if self._root is None:
            return False
        stack: list[tuple[_Table, Any]] = [(self._root, doc)]
        while stack:
            node, value = stack.pop()
            if not isinstance(value, Mapping) or set(node.children) != set(value):
                return False
            for key, child in node.children.items():
                sub = value[key]
                if isinstance(child, _Table):
                    stack.append((child, sub))
                elif isinstance(child, list):
                    if not isinstance(sub, list) or len(sub) != len(child):
                        return False
                    stack.extend(zip(child, sub, strict=True))
        return True

    @classmethod
    def unknown(cls) -> Lines:
        return cls(None)


def scan(text: str) -> Lines:
    """Scan ``text``; raises :class:`ScanError` when it cannot follow it."""
    return Lines(_Scanner(text).run())


def nesting_depth(text: str, limit: int) -> int:
    """How deeply arrays and inline tables nest in ``text`` (strings and comments
    skipped); stops counting at ``limit + 1``. Never raises for any text."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            quote = c
            if text.startswith(quote * 3, i):
                end = text.find(quote * 3, i + 3)
                i = n if end < 0 else end + 3
                continue
            i += 1
            while i < n and text[i] != quote and text[i] != "\n":
                i += 2 if (quote == '"' and text[i] == "\\") else 1
            i += 1
            continue
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if c in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return deepest


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.line = 1
        self.root = _Table(0)

    def fail(self, what: str) -> ScanError:
        return ScanError(f"line {self.line}: {what}")

    def run(self) -> _Table:
        current = self.root
        while True:
            self.skip_blank()
            if self.i >= self.n:
                return self.root
            if self.s[self.i] == "[":
                current = self.header()
            else:
                self.keyval(current)
            self.end_of_line()

    # -- lexical helpers -----------------------------------------------------

    def skip_blank(self) -> None:
        s, n = self.s, self.n
        while self.i < n:
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "\n":
                self.i += 1
                self.line += 1
            elif c == "#":
                self.skip_comment()
            else:
                return

    def skip_spaces(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t":
            self.i += 1

    def skip_comment(self) -> None:
        end = self.s.find("\n", self.i)
        self.i = self.n if end < 0 else end

    def end_of_line(self) -> None:
        self.skip_spaces()
        if self.i < self.n and self.s[self.i] == "#":
            self.skip_comment()
        if self.i < self.n and self.s[self.i] == "\r":
            self.i += 1
        if self.i < self.n:
            if self.s[self.i] != "\n":
                raise self.fail("expected the end of the line")
            self.i += 1
            self.line += 1

    def string(self) -> None:
        """Skip one string of any of the four forms, counting its newlines."""
        s, n = self.s, self.n
        quote = s[self.i]
        if s.startswith(quote * 3, self.i):
            self.i += 3
            while self.i < n:
                c = s[self.i]
                if c == "\\" and quote == '"':
                    if self.i + 1 < n and s[self.i + 1] == "\n":
                        self.line += 1
                    self.i += 2
                    continue
                if c == "\n":
                    self.line += 1
                elif c == quote:
                    run = 1
                    while self.i + run < n and s[self.i + run] == quote:
                        run += 1
                    if run >= 3:  # the closing delimiter; up to two quotes before it are content
                        if run > 5:
                            raise self.fail("too many quotes")
                        self.i += run
                        return
                    self.i += run
                    continue
                self.i += 1
            raise self.fail("unterminated multi-line string")
        self.i += 1
        while self.i < n:
            c = s[self.i]
            if c == "\\" and quote == '"':
                self.i += 2
                continue
            if c == "\n":
                break
            self.i += 1
            if c == quote:
                return
        raise self.fail("unterminated string")

    def key(self) -> list[str]:
        """A dotted key: its simple keys, decoded."""
        s, n = self.s, self.n
        keys: list[str] = []
        while True:
            self.skip_spaces()
            if self.i >= n:
                raise self.fail("expected a key")
            c = s[self.i]
            start = self.i
            if c in "\"'":
                if s.startswith(c * 3, self.i):
                    raise self.fail("a key cannot be a multi-line string")
                self.string()
                try:
                    keys.append(str(tomllib.loads("k = " + s[start : self.i])["k"]))
                except tomllib.TOMLDecodeError:
                    raise self.fail("bad quoted key") from None
            elif c in _BARE:
                while self.i < n and s[self.i] in _BARE:
                    self.i += 1
                keys.append(s[start : self.i])
            else:
                raise self.fail("expected a key")
            self.skip_spaces()
            if self.i < n and s[self.i] == ".":
                self.i += 1
                continue
            return keys

    def value(self) -> None:
        """Skip one value: strings, nested arrays and inline tables, scalars."""
        s, n = self.s, self.n
        depth = 0
        while self.i < n:
            c = s[self.i]
            if c in "\"'":
                self.string()
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
                if depth < 0:
                    raise self.fail("unbalanced bracket")
            elif c == "#":
                if depth == 0:
                    return
                self.skip_comment()
                continue
            elif c == "\n":
                if depth == 0:
                    return
                self.line += 1
            self.i += 1
        if depth:
            raise self.fail("unterminated array or inline table")

    # -- structure -----------------------------------------------------------

    def descend(self, table: _Table, key: str, line: int) -> _Table:
        child = table.children.get(key)
        if child is None:
            new = _Table(line)
            table.children[key] = new
            return new
        if isinstance(child, list):
            if not child:
                raise self.fail("empty array of tables")
            return child[-1]
        if isinstance(child, int):
            raise self.fail(f"{key!r} is a value, not a table")
        return child

    def header(self) -> _Table:
        line = self.line
        aot = self.s.startswith("[[", self.i)
        self.i += 2 if aot else 1
        keys = self.key()
        close = "]]" if aot else "]"
        if not self.s.startswith(close, self.i):
            raise self.fail(f"expected {close!r}")
        self.i += len(close)
        table = self.root
        for k in keys[:-1]:
            table = self.descend(table, k, line)
        last = keys[-1]
        existing = table.children.get(last)
        if aot:
            if existing is None:
                existing = []
                table.children[last] = existing
            if not isinstance(existing, list):
                raise self.fail(f"{last!r} is not an array of tables")
            entry = _Table(line)
            existing.append(entry)
            return entry
        if existing is None:
            new = _Table(line)
            table.children[last] = new
            return new
        if isinstance(existing, _Table):  # created implicitly by an earlier dotted header
            existing.line = line
            return existing
        raise self.fail(f"{last!r} is defined twice")

    def keyval(self, table: _Table) -> None:
        line = self.line
        keys = self.key()
        if self.i >= self.n or self.s[self.i] != "=":
            raise self.fail("expected '='")
        self.i += 1
        self.skip_spaces()
        self.value()
        for k in keys[:-1]:
            table = self.descend(table, k, line)
        if keys[-1] in table.children:
            raise self.fail(f"{keys[-1]!r} is defined twice")
        table.children[keys[-1]] = line
