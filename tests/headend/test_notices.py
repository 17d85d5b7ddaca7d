"""Caring reminders, the pure part: events to notices, quiet hours, rate limits,
supersession (property-tested, also over simulated weeks), the templates and
the notice file."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend.notices import (
    LEVELS,
    REMINDERS,
    Act,
    NoticeKind,
    Policy,
    Queued,
    QuietHours,
    QuietHoursError,
    Recipient,
    SentBefore,
    kind_of,
    notices_of,
    plan,
    quiet_until,
)
from headend.notify_config import NotifyConfigError, load_notify_config
from headend.notify_text import DEFAULT_TEMPLATES, LANGUAGES, render
from store_forward.wire import WireRecord

SH = ZoneInfo("Asia/Shanghai")
HOUR = 3600_000


def local_ms(y: int, mo: int, d: int, h: int, mi: int = 0, tz: ZoneInfo = SH) -> int:
    return int(dt.datetime(y, mo, d, h, mi, tzinfo=tz).timestamp() * 1000)


def change(frm: str, to: str, **kw: object) -> dict[str, object]:
    return {"type": "cutoff.state_change", "account": "a1", "from": frm, "to": to, "balance": "1.00", **kw}


def test_events_to_notices() -> None:
    assert kind_of(change("normal", "alarm1")) is NoticeKind.LOW_BALANCE
    assert kind_of(change("alarm1", "alarm2")) is NoticeKind.NEARLY_USED_UP
    assert kind_of(change("normal", "alarm2")) is NoticeKind.NEARLY_USED_UP
    assert kind_of(change("alarm2", "grace")) is NoticeKind.OVERDRAFT
    assert kind_of(change("alarm2", "cutoff")) is NoticeKind.CUTOFF
    assert kind_of(change("grace", "cutoff")) is NoticeKind.CUTOFF
    assert kind_of(change("cutoff", "normal")) is NoticeKind.RESTORED
    assert kind_of(change("cutoff", "alarm2")) is NoticeKind.RESTORED
    assert kind_of(change("alarm2", "alarm1")) is NoticeKind.CLEAR
    assert kind_of(change("alarm1", "normal")) is NoticeKind.CLEAR
    assert kind_of({"type": "cutoff.trip_pending", "account": "a1"}) is NoticeKind.CUT_PENDING
    for other in ("cutoff.restore_pending", "cutoff.action.trip", "relay.operation", "meter.offline"):
        assert kind_of({"type": other, "account": "a1", "from": "alarm2", "to": "cutoff"}) is None
    assert kind_of(change("alarm1", "alarm1")) is None
    assert kind_of(change("alarm1", "bogus")) is None
    assert kind_of({"type": "cutoff.state_change"}) is None


def test_notices_of_a_batch_keep_identity_time_and_facts() -> None:
    recs = [
        WireRecord(7, "event", 1000, change("normal", "alarm1", time_ms=900, reason="r", state="s")),
        WireRecord(8, "reading", 1001, {"m": "m1", "t": 1, "ts": "system", "v": {}}),
        WireRecord(9, "event", 1002, {"type": "cutoff.trip_pending", "account": "a1", "balance": "0.00"}),
        WireRecord(10, "event", 1003, change("alarm1", "alarm2", account="")),  # no account: none
        WireRecord(11, "charge", 1004, change("alarm1", "alarm2")),  # not an event
    ]
    ns = notices_of("gw-1", "0123456789abcdef", recs)
    assert [(n.notice_id, n.kind, n.event_ms) for n in ns] == [
        ("gw-1/0123456789abcdef/7", NoticeKind.LOW_BALANCE, 900),
        ("gw-1/0123456789abcdef/9", NoticeKind.CUT_PENDING, 1002),
    ]
    assert ns[0].facts == {"balance": "1.00", "from": "normal", "to": "alarm1", "reason": "r", "state": "s"}


def test_quiet_hours() -> None:
    q = QuietHours.parse("21:00-08:00")
    assert q is not None
    assert quiet_until(local_ms(2026, 3, 1, 20, 59), SH, q) is None
    assert quiet_until(local_ms(2026, 3, 1, 21, 0), SH, q) == local_ms(2026, 3, 2, 8)
    assert quiet_until(local_ms(2026, 3, 2, 3, 30), SH, q) == local_ms(2026, 3, 2, 8)
    assert quiet_until(local_ms(2026, 3, 2, 8, 0), SH, q) is None
    day = QuietHours.parse("12:00-14:00")
    assert quiet_until(local_ms(2026, 3, 1, 13), SH, day) == local_ms(2026, 3, 1, 14)
    assert quiet_until(local_ms(2026, 3, 1, 14), SH, day) is None
    assert QuietHours.parse("") is None and QuietHours.parse("none") is None
    assert quiet_until(local_ms(2026, 3, 1, 23), SH, None) is None
    for bad in ("21-08", "25:00-08:00", "21:00", "21:0-08:00", "a:b-c:d"):
        with pytest.raises(QuietHoursError):
            QuietHours.parse(bad)
    # across a change to summer time (Berlin: 02:00 -> 03:00 on 2026-03-29) the end is local 07:00
    berlin = ZoneInfo("Europe/Berlin")
    q2 = QuietHours.parse("22:00-07:00")
    end = quiet_until(local_ms(2026, 3, 28, 23, tz=berlin), berlin, q2)
    assert end == local_ms(2026, 3, 29, 7, tz=berlin)
    assert end is not None and end - local_ms(2026, 3, 28, 23, tz=berlin) == 7 * HOUR  # one hour less


@given(
    now=st.integers(1_700_000_000_000, 1_900_000_000_000),
    start=st.integers(0, 1439),
    end=st.integers(0, 1439),
    zone=st.sampled_from(["Asia/Shanghai", "Europe/Berlin", "America/New_York", "Asia/Kathmandu", "UTC"]),
)
def test_quiet_until_is_the_first_minute_outside(now: int, start: int, end: int, zone: str) -> None:
    tz = ZoneInfo(zone)
    q = QuietHours(start, end)
    until = quiet_until(now, tz, q)
    local = dt.datetime.fromtimestamp(now / 1000, tz)
    inside = q.contains(local.hour * 60 + local.minute)
    assert (until is None) == (not inside)
    if until is not None:
        assert now < until <= now + 25 * HOUR
        after = dt.datetime.fromtimestamp(until / 1000, tz)
        assert not q.contains(after.hour * 60 + after.minute)
        before = dt.datetime.fromtimestamp((until - 60_000) / 1000, tz)
        assert q.contains(before.hour * 60 + before.minute) or until - 60_000 < now


POLICY = Policy(reminder_interval_ms=6 * HOUR, urgent_max=2, urgent_window_ms=HOUR,
                reminder_max_age_ms=24 * HOUR, urgent_max_age_ms=72 * HOUR)  # fmt: skip
ME = Recipient("a1", "+8613800000001", "zh-CN", SH, QuietHours.parse("21:00-08:00"))


def q(i: int, kind: NoticeKind, event_ms: int, attempts: int = 0, next_ms: int = 0) -> Queued:
    return Queued(i, f"n{i}", kind, event_ms, attempts, next_ms)


def acts(decisions: list) -> dict[str, tuple[Act, int | None]]:  # type: ignore[type-arg]
    return {d.notice_id: (d.act, d.until_ms) for d in decisions}


def test_plan_examples() -> None:
    day = local_ms(2026, 3, 2, 10)
    night = local_ms(2026, 3, 2, 23)
    # a reminder by day goes; at night it waits for 08:00
    assert acts(plan([q(1, NoticeKind.LOW_BALANCE, day)], [], ME, day, POLICY)) == {"n1": (Act.SEND, None)}
    assert acts(plan([q(1, NoticeKind.LOW_BALANCE, night)], [], ME, night, POLICY)) == {
        "n1": (Act.WAIT, local_ms(2026, 3, 3, 8))
    }
    # a cut at night goes at once and makes the waiting reminder pointless
    got = acts(plan([q(1, NoticeKind.LOW_BALANCE, night), q(2, NoticeKind.CUTOFF, night + 1)], [], ME,
                    night + 2, POLICY))  # fmt: skip
    assert got == {"n1": (Act.SUPERSEDED, None), "n2": (Act.SEND, None)}
    # alarm 2 after alarm 1: only the newer one, and only after the interval since the last message
    got = acts(plan([q(1, NoticeKind.LOW_BALANCE, day), q(2, NoticeKind.NEARLY_USED_UP, day + 5)],
                    [SentBefore(day - HOUR, False)], ME, day + 10, POLICY))  # fmt: skip
    assert got == {"n1": (Act.SUPERSEDED, None), "n2": (Act.WAIT, day - HOUR + 6 * HOUR)}
    # balance back up: pending reminders withdrawn, nothing sent
    got = acts(plan([q(1, NoticeKind.OVERDRAFT, day), q(2, NoticeKind.CLEAR, day + 5)], [], ME, day + 9, POLICY))
    assert got == {"n1": (Act.SUPERSEDED, None), "n2": (Act.CLEARED, None)}
    # a cut restored before it was announced: only the restore
    got = acts(plan([q(1, NoticeKind.CUTOFF, day), q(2, NoticeKind.RESTORED, day + 5)], [], ME, day + 9, POLICY))
    assert got == {"n1": (Act.SUPERSEDED, None), "n2": (Act.SEND, None)}
    # urgent notices: at most 2 an hour
    sent = [SentBefore(day - 50 * 60_000, True), SentBefore(day - 10 * 60_000, True)]
    assert acts(plan([q(3, NoticeKind.CUTOFF, day)], sent, ME, day, POLICY)) == {
        "n3": (Act.WAIT, day + 10 * 60_000)
    }
    # old news expires; no customer on file: unaddressed
    assert acts(plan([q(1, NoticeKind.LOW_BALANCE, day - 25 * HOUR)], [], ME, day, POLICY))["n1"][0] is Act.EXPIRED
    assert acts(plan([q(1, NoticeKind.CUTOFF, day)], [], None, day, POLICY))["n1"][0] is Act.UNADDRESSED
    # in retry back-off
    assert acts(plan([q(1, NoticeKind.CUTOFF, day, 1, day + 5000)], [], ME, day, POLICY)) == {
        "n1": (Act.WAIT, day + 5000)
    }


kinds = st.sampled_from(list(NoticeKind))
zones = st.sampled_from(["Asia/Shanghai", "Europe/Berlin", "America/Los_Angeles"])


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[Queued], list[SentBefore], Recipient | None, int]:
    now = draw(st.integers(1_750_000_000_000, 1_800_000_000_000))
    n = draw(st.integers(0, 8))
    pending = [
        Queued(i, f"n{i}", draw(kinds), now - draw(st.integers(0, 30 * HOUR)), draw(st.integers(0, 2)),
               now + draw(st.integers(-HOUR, HOUR)))
        for i in range(n)
    ]
    sent = [SentBefore(now - draw(st.integers(0, 7 * HOUR)), draw(st.booleans())) for _ in range(draw(st.integers(0, 4)))]
    quiet = QuietHours(draw(st.integers(0, 1439)), draw(st.integers(0, 1439)))
    who = draw(st.one_of(st.none(), st.just(Recipient("a1", "1", "en", ZoneInfo(draw(zones)), quiet))))
    return pending, sent, who, now


@settings(max_examples=200)
@given(situations())
def test_plan_invariants(s: tuple[list[Queued], list[SentBefore], Recipient | None, int]) -> None:
    pending, sent, who, now = s
    ds = plan(pending, sent, who, now, POLICY)
    assert sorted(d.notice_id for d in ds) == sorted(p.notice_id for p in pending)  # one each
    by = {p.notice_id: p for p in pending}
    sends = [by[d.notice_id] for d in ds if d.act is Act.SEND]
    assert all(p.kind.sendable for p in sends)
    assert sum(not p.kind.urgent for p in sends) <= 1 and sum(p.kind.urgent for p in sends) <= 1
    for d in ds:
        if d.act is Act.WAIT:
            assert d.until_ms is not None and d.until_ms > now
    if pending:  # the newest notice is never superseded
        newest = max(pending, key=lambda p: (p.event_ms, p.id))
        assert next(d for d in ds if d.notice_id == newest.notice_id).act is not Act.SUPERSEDED
    for p in sends:
        assert who is not None
        assert not (p.attempts and p.next_attempt_ms > now)
        if p.kind.urgent:
            assert sum(s.urgent and s.sent_ms > now - POLICY.urgent_window_ms for s in sent) < POLICY.urgent_max
        else:
            assert quiet_until(now, who.tz, who.quiet) is None
            assert all(s.sent_ms + POLICY.reminder_interval_ms <= now for s in sent)
            assert not any(x.kind.urgent for x in sends)  # a reminder never right behind a message
    if who is None:
        assert not sends


@dataclass
class _Row:
    q: Queued
    state: str = "pending"
    sent_ms: int | None = None


event_kinds = st.sampled_from([NoticeKind.LOW_BALANCE, NoticeKind.NEARLY_USED_UP, NoticeKind.OVERDRAFT,
                               NoticeKind.CUT_PENDING, NoticeKind.CUTOFF, NoticeKind.RESTORED, NoticeKind.CLEAR])  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, 14 * 24 * 60), event_kinds), min_size=1, max_size=40),
    zone=zones,
    start=st.integers(0, 1439),
    end=st.integers(0, 1439),
)
def test_two_weeks_of_events(events: list[tuple[int, NoticeKind]], zone: str, start: int, end: int) -> None:
    """The notifier's loop, with the queue in memory and a clock that steps a minute at a
    time through two weeks of random events: no reminder in quiet hours, a reminder
    never sooner than the interval after any message, urgent ones within their cap,
    and the last urgent notice and a final reminder still due are sent."""
    tz = ZoneInfo(zone)
    who = Recipient("a1", "1", "en", tz, QuietHours(start, end))
    t0 = local_ms(2026, 6, 1, 0, tz=tz)
    arrivals = sorted((t0 + m * 60_000, k) for m, k in events)
    rows: list[_Row] = []
    i = 0
    now = t0
    for _ in range(10_000):  # as the notifier runs: at each arrival and each instant a wait ends
        while i < len(arrivals) and arrivals[i][0] <= now:
            rows.append(_Row(Queued(i, f"n{i}", arrivals[i][1], arrivals[i][0])))
            i += 1
        pending = [r for r in rows if r.state == "pending"]
        wake = [arrivals[i][0]] if i < len(arrivals) else []
        if pending:
            sent = [SentBefore(r.sent_ms, r.q.kind.urgent) for r in rows if r.sent_ms is not None]
            for d in plan([r.q for r in pending], sent, who, now, POLICY):
                row = next(r for r in pending if r.q.notice_id == d.notice_id)
                if d.act is Act.SEND:
                    row.state, row.sent_ms = "sent", now
                elif d.act is Act.WAIT:
                    assert d.until_ms is not None and d.until_ms > now
                    wake.append(d.until_ms)
                else:
                    row.state = d.act.value
        if not wake:
            break
        now = min(wake)
    else:
        raise AssertionError("the notices never settled")
    sent_rows = sorted((r for r in rows if r.sent_ms is not None), key=lambda r: r.sent_ms or 0)
    for k, r in enumerate(sent_rows):
        assert r.sent_ms is not None
        if r.q.kind in REMINDERS:
            local = dt.datetime.fromtimestamp(r.sent_ms / 1000, tz)
            assert not who.quiet or not who.quiet.contains(local.hour * 60 + local.minute)
            if k:
                prev = sent_rows[k - 1].sent_ms
                assert prev is not None and r.sent_ms - prev >= POLICY.reminder_interval_ms
        window = [x for x in sent_rows if x.q.kind.urgent and r.sent_ms - POLICY.urgent_window_ms < (x.sent_ms or 0) <= r.sent_ms]
        assert len(window) <= POLICY.urgent_max
    urgent = [r for r in rows if r.q.kind.urgent]
    if urgent:
        assert urgent[-1].state in ("sent", "expired")
    if rows and rows[-1].q.kind in REMINDERS:
        assert rows[-1].state in ("sent", "expired")
    assert all(r.state != "pending" for r in rows)


def test_templates_render_in_both_languages() -> None:
    assert set(DEFAULT_TEMPLATES) == set(LANGUAGES)
    facts = {"balance": "-0.01", "state": "cut pending: no-disconnect window until 08:00", "reason": "x"}
    t = local_ms(2026, 3, 1, 18, 5)
    for lang in LANGUAGES:
        for kind in NoticeKind:
            if not kind.sendable:
                with pytest.raises(ValueError):
                    render(DEFAULT_TEMPLATES, lang, kind, account="acct-9", name="", facts=facts, event_ms=t, tz=SH)
                continue
            text = render(DEFAULT_TEMPLATES, lang, kind, account="acct-9", name="王芳", facts=facts, event_ms=t, tz=SH)
            assert "acct-9" in text and "-0.01" in text
            if kind in (NoticeKind.CUTOFF, NoticeKind.RESTORED):
                assert "2026-03-01 18:05" in text
    assert "停止供电" in render(DEFAULT_TEMPLATES, "zh-CN", NoticeKind.CUTOFF, account="a", name="", facts=facts,
                               event_ms=t, tz=SH)  # fmt: skip
    assert "until 08:00" in render(DEFAULT_TEMPLATES, "en", NoticeKind.CUT_PENDING, account="a", name="",
                                   facts=facts, event_ms=t, tz=SH)  # fmt: skip


GOOD = """
customers_file = "customers.toml"

[webhook]
url = "http://127.0.0.1:9/sms"
secret_file = "hook.secret"
max_attempts = 3

[defaults]
language = "en"
timezone = "Asia/Shanghai"
quiet_hours = "21:00-08:00"

[limits]
reminder_interval_s = 60

[[customer]]
account = "acct-001"
phone = "+8613800000001"
language = "zh-CN"
name = "王芳"

[templates.en]
cutoff = "Cut {account} at {time}"
"""


def test_notice_file(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("0123456789abcdef0123\n")
    (tmp_path / "customers.toml").write_text(
        '[[customer]]\naccount = "acct-002"\nphone = "+8613800000002"\ntimezone = "Asia/Urumqi"\nquiet_hours = ""\n'
    )
    (tmp_path / "notify.toml").write_text(GOOD)
    c = load_notify_config(tmp_path / "notify.toml")
    assert c.webhook.url == "http://127.0.0.1:9/sms" and c.webhook.secret == b"0123456789abcdef0123"
    assert c.webhook.max_attempts == 3 and c.policy.reminder_interval_ms == 60_000
    a1, a2 = c.customers["acct-001"], c.customers["acct-002"]
    assert (a1.language, a1.name, str(a1.tz), a1.quiet) == ("zh-CN", "王芳", "Asia/Shanghai", QuietHours(1260, 480))
    assert (a2.language, str(a2.tz), a2.quiet) == ("en", "Asia/Urumqi", None)
    assert c.templates["en"][NoticeKind.CUTOFF] == "Cut {account} at {time}"
    assert c.templates["zh-CN"][NoticeKind.CUTOFF] == DEFAULT_TEMPLATES["zh-CN"][NoticeKind.CUTOFF]
    assert len(c.sources) == 2


def test_notice_file_problems_all_at_once(tmp_path: Path) -> None:
    (tmp_path / "notify.toml").write_text(
        """
bogus = 1
[webhook]
url = "ftp://x"
timeout_s = -1
[defaults]
language = "fr"
timezone = "Mars/Olympus"
quiet_hours = "9pm-8am"
[limits]
urgent_max = 0
[templates.en]
cutoff = "{account} {balance_micro}"
nonsense = "x"
[[customer]]
account = "acct-001"
[[customer]]
phone = "1"
[[customer]]
account = "acct-002"
phone = "2"
language = "de"
[[customer]]
account = "acct-002"
phone = "3"
"""
    )
    with pytest.raises(NotifyConfigError) as err:
        load_notify_config(tmp_path / "notify.toml")
    text = str(err.value)
    for want in ("bogus: unknown key", "webhook.url", "webhook.timeout_s", "defaults.language",
                 "Mars/Olympus", "defaults.quiet_hours", "limits.urgent_max", "{balance_micro}",
                 "templates.en.nonsense", "customer[0] (account acct-001).phone: missing",
                 "customer[1].account: missing", "customer[2] (account acct-002).language",
                 "customer[3] (account acct-002): the account is listed twice"):  # fmt: skip
        assert want in text, (want, text)
    assert LEVELS[0] == "normal"
