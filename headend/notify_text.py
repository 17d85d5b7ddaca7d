"""The words of caring reminders: one template per notice and language (zh-CN, en).

A template is a :meth:`str.format` string over these fields:

==============  ===========================================================
``{account}``   the account id
``{name}``      the customer's name from the customer file ("" if none)
``{balance}``   the balance the gateway reported, yuan (``"8.48"``)
``{time}``      when it happened, the customer's local time (``2026-03-01 18:05``)
``{state}``     the gateway's words for the supply state (English; docs/billing.md)
``{reason}``    the cutoff policy's reason (English)
==============  ===========================================================

The notice file may replace any of them (``[templates.en]``, ``[templates."zh-CN"]``);
:func:`check_template` refuses an unknown field or a broken format string when
the file is loaded, not when a message is due.
"""

from __future__ import annotations

import datetime as dt
import string
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from firmware_bridge.errors import EdgeGwError, ErrorKind
from headend.notices import SENDABLE, NoticeKind

LANGUAGES = ("zh-CN", "en")
FIELDS = frozenset({"account", "name", "balance", "time", "state", "reason"})

DEFAULT_TEMPLATES: Mapping[str, Mapping[NoticeKind, str]] = {
    "zh-CN": {
        NoticeKind.LOW_BALANCE: "【供电提醒】尊敬的用户{name}，您的电费账户{account}余额为{balance}元，"
        "已低于提醒金额，请及时充值。",
        NoticeKind.NEARLY_USED_UP: "【供电提醒】尊敬的用户{name}，您的电费账户{account}余额仅剩{balance}元，"
        "即将用完，余额用完后将停止供电，请尽快充值。",
        NoticeKind.OVERDRAFT: "【供电提醒】尊敬的用户{name}，您的电费账户{account}已欠费（余额{balance}元），"
        "超过透支额度后将停止供电，请尽快充值。",
        NoticeKind.CUT_PENDING: "【停电预告】尊敬的用户{name}，您的电费账户{account}余额已用完（{balance}元），"
        "将在保电时段结束后停止供电，请尽快充值。",
        NoticeKind.CUTOFF: "【停电通知】尊敬的用户{name}，您的电费账户{account}因余额不足（{balance}元），"
        "已于{time}停止供电。充值后将自动恢复供电。",
        NoticeKind.RESTORED: "【复电通知】尊敬的用户{name}，您的电费账户{account}已于{time}恢复供电，"
        "当前余额{balance}元。",
    },
    "en": {
        NoticeKind.LOW_BALANCE: "Power account {account}: your balance is {balance} yuan, below the "
        "reminder level. Please top up soon.",
        NoticeKind.NEARLY_USED_UP: "Power account {account}: only {balance} yuan left. Your supply will "
        "be cut when it is used up. Please top up now.",
        NoticeKind.OVERDRAFT: "Power account {account}: you are in overdraft ({balance} yuan). Your "
        "supply will be cut at the overdraft limit. Please top up now.",
        NoticeKind.CUT_PENDING: "Power account {account}: your credit is used up ({balance} yuan); "
        "{state}. Please top up to keep your supply on.",
        NoticeKind.CUTOFF: "Power account {account}: your supply was cut at {time} because the "
        "balance ran out ({balance} yuan). A top-up restores it.",
        NoticeKind.RESTORED: "Power account {account}: your supply was restored at {time}. Balance: "
        "{balance} yuan.",
    },
}


class TemplateError(EdgeGwError, ValueError):
    """A template with an unknown field or a broken format string."""

    kind = ErrorKind.INVALID


def check_template(text: str) -> str:
    """``text`` if it formats with the known fields only; else :class:`TemplateError`."""
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise TemplateError(f"not a format string: {exc}") from None
    unknown = sorted(n for n in names if n not in FIELDS)
    if unknown:
        raise TemplateError(
            f"unknown field(s) {', '.join('{' + n + '}' for n in unknown)}"
            f" (known: {', '.join('{' + f + '}' for f in sorted(FIELDS))})"
        )
    return text


def render(
    templates: Mapping[str, Mapping[NoticeKind, str]],
    language: str,
    kind: NoticeKind,
    *,
    account: str,
    name: str,
    facts: Mapping[str, Any],
    event_ms: int,
    tz: ZoneInfo,
) -> str:
    """The message text in ``language`` (``en`` where that language has no template)."""
    if kind not in SENDABLE:
        raise ValueError(f"{kind} is never sent")
    table = templates.get(language) or templates["en"]
    text = table.get(kind) or templates["en"][kind]
    local = dt.datetime.fromtimestamp(event_ms / 1000, tz)
    return text.format(
        account=account,
        name=name,
        balance=str(facts.get("balance", "?")),
        time=local.strftime("%Y-%m-%d %H:%M"),
        state=str(facts.get("state", "")),
        reason=str(facts.get("reason", "")),
    )
