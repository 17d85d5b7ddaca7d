"""Line numbers of TOML keys and tables (gateway.toml_lines) against tomllib.

Documents are generated with every construct that could mislead a line scan
(multi-line strings holding header- and key-like lines, arrays over several
lines with comments, inline tables, quoted and dotted keys, CRLF line ends);
the generator knows where it put each key, and the scan must find exactly
that, and agree with tomllib's structure.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.toml_lines import Lines, ScanError, nesting_depth, scan

TRICKY_LINES = ["[[meter]]", "[gateway]", "id = 1", "# not a comment", "a.b = 'x'", "]", "{", '"', "'", ""]


def basic(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


bare_keys = st.from_regex(r"[A-Za-z0-9_-]{1,6}", fullmatch=True)
quoted_keys = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=5)


@st.composite
def keys(draw: st.DrawFn) -> tuple[str, str]:
    """(key, how it is written)."""
    if draw(st.booleans()):
        k = draw(bare_keys)
        return k, k
    k = draw(quoted_keys)
    if draw(st.booleans()) and "'" not in k and all(ord(c) >= 0x20 and c != "\x7f" for c in k):
        return k, f"'{k}'"
    return k, basic(k)


@st.composite
def values(draw: st.DrawFn) -> list[str]:
    """A value as the lines it is written on (the first continues the key's line)."""
    kind = draw(st.sampled_from(["int", "basic", "literal", "ml_basic", "ml_literal", "array", "inline"]))
    text_lines = draw(st.lists(st.sampled_from(TRICKY_LINES) | st.text(max_size=8), max_size=4))
    if kind == "int":
        return [str(draw(st.integers(-(2**63), 2**63 - 1)))]
    if kind == "basic":
        return [basic(draw(st.text(max_size=10)))]
    if kind == "literal":
        return ["'" + "".join(c for c in draw(st.text(max_size=10)) if c not in "'\r\n" and ord(c) >= 0x20 and c != "\x7f") + "'"]
    # up to two quotes right before the closing delimiter are content ('ab"' is """ab"""")
    end_quotes = draw(st.integers(0, 2))
    if kind == "ml_basic":
        body = [basic(t)[1:-1] for t in text_lines]
        return ['"""', *body[:-1], (body[-1] if body else "") + '"' * end_quotes + '"""']
    if kind == "ml_literal":
        body = ["".join(c for c in t if c != "'" and (ord(c) >= 0x20 or c == "\t") and c != "\x7f") for t in text_lines]
        return ["'''", *body[:-1], (body[-1] if body else "") + "'" * end_quotes + "'''"]
    if kind == "array":
        items = draw(st.lists(st.integers(0, 9).map(str) | st.just('"]["') | st.just("[1, [2]]"), max_size=3))
        notes = st.sampled_from(["# ] {", "# [", "# ]]", "# 'x", '# "'])
        return ["[  # [[meter]] ", *[f"  {x}, {draw(notes)}" for x in items], "]"]
    pairs = draw(st.lists(keys(), max_size=3, unique_by=lambda kv: kv[0]))
    return ["{ " + ", ".join(f"{w} = {i}" for i, (_, w) in enumerate(pairs)) + " }"]


@dataclass
class Doc:
    lines: list[str] = field(default_factory=list)
    expected: dict[tuple[str | int, ...], int] = field(default_factory=dict)

    def gap(self, draw: st.DrawFn) -> None:
        for _ in range(draw(st.integers(0, 2))):
            self.lines.append(draw(st.sampled_from(["", "# [[x]] = 1", "   ", "\t# comment"])))

    def body(self, draw: st.DrawFn, path: tuple[str | int, ...]) -> None:
        written = draw(st.lists(keys(), max_size=4, unique_by=lambda kv: kv[0]))
        for k, w in written:
            self.gap(draw)
            value = draw(values())
            line = len(self.lines) + 1
            if draw(st.booleans()):  # dotted: k.sub = v
                self.lines.append(f"{w} . inner = {value[0]}")
                self.expected[(*path, k, "inner")] = line
                self.expected[(*path, k)] = line
            else:
                self.lines.append(f"{w} = {value[0]}")
                self.expected[(*path, k)] = line
            self.lines.extend(value[1:])

    def header(self, draw: st.DrawFn, written: str, path: tuple[str | int, ...], aot: bool) -> None:
        self.gap(draw)
        pad = draw(st.sampled_from(["", " "]))
        o, c = ("[[", "]]") if aot else ("[", "]")
        self.expected[path] = len(self.lines) + 1
        self.lines.append(f"{o}{pad}{written}{pad}{c}  # header")


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, Doc]:
    doc = Doc()
    names = draw(st.lists(keys(), min_size=1, max_size=6, unique_by=lambda kv: kv[0]))
    n_top = draw(st.integers(0, len(names)))
    top, tables = names[:n_top], names[n_top:]
    for k, w in top:  # top-level keys come before any header
        doc.gap(draw)
        value = draw(values())
        doc.expected[(k,)] = len(doc.lines) + 1
        doc.lines.append(f"{w} = {value[0]}")
        doc.lines.extend(value[1:])
    for k, w in tables:
        if draw(st.booleans()):
            doc.header(draw, w, (k,), aot=False)
            doc.body(draw, (k,))
        else:
            for i in range(draw(st.integers(1, 3))):
                doc.header(draw, w, (k, i), aot=True)
                doc.body(draw, (k, i))
                if draw(st.booleans()):  # a sub-table of this entry, e.g. [meter.relay]
                    doc.header(draw, f"{w}.sub", (k, i, "sub"), aot=False)
                    doc.body(draw, (k, i, "sub"))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return eol.join(doc.lines) + eol, doc


@settings(max_examples=150, deadline=None)
@given(documents())
def test_every_key_and_header_is_found_on_its_line(case: tuple[str, Doc]) -> None:
    text, doc = case
    parsed = tomllib.loads(text)
    lines = scan(text)
    assert lines.agrees_with(parsed)
    for path, line in doc.expected.items():
        assert lines.line(path) == line, (path, text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_scanned_or_refused_never_crashes(text: str) -> None:
    try:
        lines = scan(text)
    except ScanError:
        return
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return
    lines.agrees_with(parsed)  # a bool either way; never an exception
    nesting_depth(text, 8)


def test_missing_key_falls_back_to_the_table_header_and_unknown_gives_none() -> None:
    text = "[gateway]\nid = 1\n\n[[meter]]\nid = 'a'\n\n[[meter]]\n\nid = 'b'\n[meter.relay]\nkind = 1\n"
    lines = scan(text)
    assert lines.line(("meter", 1, "unit_id")) == 7
    assert lines.line(("meter", 1, "id")) == 9
    assert lines.line(("meter", 1, "relay", "address")) == 10
    assert lines.line(("meter", 5, "id")) is None
    assert lines.line(("storage",)) is None
    assert Lines.unknown().line(("gateway", "id")) is None


def test_a_scan_that_disagrees_with_tomllib_is_not_trusted() -> None:
    lines = scan("[[meter]]\nid = 'a'\n")
    assert lines.agrees_with({"meter": [{"id": "a"}]})
    assert not lines.agrees_with({"meter": [{"id": "a"}, {"id": "b"}]})
    assert not lines.agrees_with({"meter": [{"id": "a", "bus": "x"}]})
    assert not Lines.unknown().agrees_with({})


def test_nesting_depth_skips_strings_and_comments_and_stops_at_the_limit() -> None:
    assert nesting_depth('a = "[[[[" # [[[[\nb = [[1], {x = [2]}]\n', 8) == 3
    assert nesting_depth("a = '''\n[[[[\n'''\n", 8) == 0
    assert nesting_depth("a = " + "[" * 10_000, 8) == 9
