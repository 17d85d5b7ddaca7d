"""The console's pure parts: the balance path against the gateway's own fold,
the SVG charts, the language choice and the catalogs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.billing.ledger import Entry, EntryKind, fold
from headend.console import charts
from headend.console.app import fmt_yuan, parse_yuan
from headend.console.balance import LedgerEntry, balance_path
from headend.console.i18n import LANGUAGES, catalog, choose, from_accept_language

CONSOLE = Path(__file__).resolve().parents[3] / "headend" / "console"
KINDS = [EntryKind.DEBIT, EntryKind.FIXED, EntryKind.CREDIT, EntryKind.ADJUSTMENT, EntryKind.SNAPSHOT]


@st.composite
def ledgers(draw: st.DrawFn) -> list[Entry]:
    n = draw(st.integers(0, 30))
    entries: list[Entry] = []
    central = 0
    for seq in range(1, n + 1):
        kind = draw(st.sampled_from(KINDS))
        amount = draw(st.integers(-5_000_000, 5_000_000))
        if kind is EntryKind.SNAPSHOT:
            central += draw(st.integers(-1, 2))  # sometimes an older snapshot, ignored
            earlier = [e.entry_id for e in entries if e.kind is not EntryKind.SNAPSHOT]
            body = {
                "snapshot_id": f"s{seq}",
                "central_seq": central,
                "as_of_seq": draw(st.integers(0, seq - 1)),
                "included_ids": draw(st.lists(st.sampled_from(earlier), unique=True)) if earlier else [],
            }
        else:
            body = {}
        entries.append(Entry(f"e{seq}", "acc", kind, amount, 1_000 * seq, body, seq))
    return entries


@given(ledgers(), st.randoms())
@settings(max_examples=300, deadline=None)
def test_the_balance_path_ends_where_the_gateways_fold_does(entries: list[Entry], rnd) -> None:  # type: ignore[no-untyped-def]
    records = [e.to_json() for e in entries]
    rnd.shuffle(records)  # central stores them in arrival order
    path = balance_path(LedgerEntry.from_record(r) for r in records)
    assert path.balance_micro == (fold("acc", entries).balance_micro if entries else None)
    # every point is the fold of the entries up to it
    for i, p in enumerate(path.points):
        assert p.balance_micro == fold("acc", entries[: i + 1]).balance_micro
    assert path.missing == 0


def test_entries_not_received_are_counted() -> None:
    path = balance_path(
        [LedgerEntry("a", 2, "debit", -10, 1, {}), LedgerEntry("b", 5, "debit", -10, 2, {})]
    )
    assert path.missing == 3 and path.balance_micro == -20


@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 10**13), st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=900),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_charts_draw_every_point_inside_the_plot(series: list[list[tuple[int, float]]], step: bool) -> None:
    data = [charts.Series(f"s{i}", sorted(pts)) for i, pts in enumerate(series)]
    chart = charts.line_chart(
        [charts.Series(s.label, s.points, step) for s in data], tz=UTC, title="t <&>", zero_line=True
    )
    root = ET.fromstring(str(chart.svg))  # well-formed, title escaped
    ns = {"s": "http://www.w3.org/2000/svg"}
    lines = root.findall("s:polyline", ns)
    assert len(lines) == len(series)
    total = 0
    for line, s in zip(lines, data, strict=True):
        n = int(line.get("data-points", "0"))
        assert n == min(len(s.points), charts.MAX_POINTS)
        total += n
        xs, ys = [], []
        for pair in line.get("points", "").split():
            x, y = (float(v) for v in pair.split(","))
            xs.append(x)
            ys.append(y)
        assert len(xs) == (2 * n - 1 if step else n)
        assert xs == sorted(xs)  # time runs left to right
        assert all(charts.LEFT - 0.1 <= x <= charts.WIDTH - charts.RIGHT + 0.1 for x in xs)
        assert all(charts.TOP - 0.1 <= y <= charts.HEIGHT - charts.BOTTOM + 0.1 for y in ys)
    assert chart.points == total


def test_an_empty_chart_says_so() -> None:
    chart = charts.line_chart([charts.Series("a", [])], tz=UTC, title="x")
    assert chart.empty and "polyline" not in chart.svg


@given(st.integers(-(10**15), 10**15))
def test_money_is_shown_truncated_as_the_gateway_reports_it(micro: int) -> None:
    from gateway.billing.money import report_yuan

    assert fmt_yuan(micro) == str(report_yuan(micro))


def test_amounts_are_whole_fen_and_bounded() -> None:
    assert parse_yuan("10", 10**10) == 10_000_000
    assert parse_yuan(" 0.01 ", 10**10) == 10_000
    for bad in ("", "0", "-5", "1.001", "1e3x", "NaN", "Infinity", "abc"):
        try:
            parse_yuan(bad, 10**10)
        except ValueError as exc:
            assert str(exc) == "amount"
        else:
            raise AssertionError(bad)
    try:
        parse_yuan("10001", 10**10)
    except ValueError as exc:
        assert str(exc) == "amount_too_large"


def test_the_language_follows_the_cookie_then_the_browser() -> None:
    assert from_accept_language("zh-CN,zh;q=0.9,en;q=0.8") == "zh-CN"
    assert from_accept_language("en-US,en;q=0.9,zh;q=0.8") == "en"
    assert from_accept_language("fr-FR, zh-Hans;q=0.5") == "zh-CN"
    assert from_accept_language("de, fr") is None
    assert from_accept_language("en;q=0.2, zh-TW;q=0.1, zh;q=0.5") == "zh-CN"
    assert choose("en", "zh-CN") == "en"
    assert choose(None, "zh") == "zh-CN"
    assert choose("xx", None) == "en"


def test_catalogs_have_the_same_keys_and_every_key_the_templates_use() -> None:
    keys = {lang: set(catalog(lang)) for lang in LANGUAGES}
    assert keys["en"] == keys["zh-CN"]
    used: set[str] = set()
    for f in (CONSOLE / "templates").glob("*.html"):
        used |= set(re.findall(r"""\bt\(\s*["']([a-z0-9_.-]+)["']\s*[,)]""", f.read_text()))
    used |= set(re.findall(r"""\bt\(\s*["']([a-z0-9_.-]+)["']\s*[,)]""", (CONSOLE / "app.py").read_text()))
    missing = {k for k in used if k not in keys["en"]}
    assert not missing
    # the Chinese catalog is Chinese where it is not a name or a unit
    zh = catalog("zh-CN")
    assert re.search(r"[\u4e00-\u9fff]", zh["fleet.title"]) and re.search(r"[\u4e00-\u9fff]", zh["login.title"])
