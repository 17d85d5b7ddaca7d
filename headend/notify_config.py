"""The notice file: where reminders go, the rules they follow, and the customers.

``edgegw headend run --notify notify.toml`` reads it (docs/integration.md,
"Caring reminders", has the whole reference)::

    customers_file = "customers.toml"           # optional: more [[customer]] entries

    [webhook]
    url = "https://sms-gateway.example/send"   # POST JSON, one message per request
    secret_file = "webhook.secret"             # optional: HMAC-SHA256 of the body in a header
    timeout_s = 10
    max_attempts = 12                           # then the notice is failed
    retry_min_s = 5                             # back-off between attempts (jittered, doubling)
    retry_max_s = 900

    [defaults]                                  # for customers who do not say
    language = "zh-CN"                          # zh-CN or en
    timezone = "Asia/Shanghai"
    quiet_hours = "21:00-08:00"                 # local; "" for none

    [limits]
    reminder_interval_s = 21600                 # at most one reminder per customer per 6 h
    urgent_max = 4                              # cut / restore notices per customer ...
    urgent_window_s = 3600                      # ... per hour
    reminder_max_age_s = 86400                  # older reminders expire unsent
    urgent_max_age_s = 259200

    [[customer]]
    account = "acct-001"
    phone = "+8613800000001"
    language = "en"                             # optional, else [defaults]
    timezone = "Asia/Urumqi"                    # optional
    quiet_hours = "22:00-07:00"                 # optional
    name = "王芳"                               # optional, for the templates

    [templates.en]                              # optional: replace any template
    cutoff = "Supply of {account} cut at {time}."

Every problem in the file is reported at once (:class:`NotifyConfigError`),
each with the key it is about.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from firmware_bridge.errors import ProblemsError
from headend.notices import SENDABLE, NoticeKind, Policy, QuietHours, QuietHoursError, Recipient
from headend.notify_text import DEFAULT_TEMPLATES, LANGUAGES, TemplateError, check_template

MAX_FILE_BYTES = 16 << 20
MAX_TEXT = 500


class NotifyConfigError(ProblemsError):
    """The notice file breaks the rules; ``problems`` has one line per problem."""


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: bytes | None = None
    timeout_s: float = 10.0
    max_attempts: int = 12
    retry_min_s: float = 5.0
    retry_max_s: float = 900.0


@dataclass(frozen=True)
class NotifyConfig:
    webhook: WebhookSettings
    policy: Policy
    customers: Mapping[str, Recipient]
    templates: Mapping[str, Mapping[NoticeKind, str]]
    default_language: str = "zh-CN"
    sources: tuple[Path, ...] = field(default=())  # the files read (watched for changes)


class _Problems:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{self.source}: {where}: {what}")


def _read(path: Path, p: _Problems) -> dict[str, Any] | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        p.add("file", f"cannot read: {exc.strerror or exc}")
        return None
    if len(raw) > MAX_FILE_BYTES:
        p.add("file", f"larger than {MAX_FILE_BYTES} bytes")
        return None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        p.add("file", f"not TOML: {exc}")
        return None


def _table(doc: Mapping[str, Any], key: str, p: _Problems, allowed: set[str]) -> dict[str, Any]:
    t = doc.get(key, {})
    if not isinstance(t, dict):
        p.add(key, "must be a table")
        return {}
    for extra in sorted(set(t) - allowed):
        p.add(f"{key}.{extra}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return t


def _text(t: Mapping[str, Any], key: str, where: str, p: _Problems, default: str | None = None) -> str | None:
    v = t.get(key, default)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > MAX_TEXT or any(ord(c) < 32 for c in v):
        p.add(f"{where}.{key}", f"must be a line of text of at most {MAX_TEXT} characters")
        return None
    return v


def _number(t: Mapping[str, Any], key: str, where: str, p: _Problems, default: float, lo: float,
            hi: float) -> float:  # fmt: skip
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        p.add(f"{where}.{key}", f"must be a number in {lo:g}..{hi:g}, got {v!r}")
        return default
    return float(v)


def _zone(text: str | None, where: str, p: _Problems) -> ZoneInfo | None:
    if text is None:
        return None
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        p.add(where, f"unknown time zone {text!r} (an IANA name such as Asia/Shanghai)")
        return None


def _quiet(text: str | None, where: str, p: _Problems) -> QuietHours | None:
    if text is None:
        return None
    try:
        return QuietHours.parse(text)
    except QuietHoursError as exc:
        p.add(where, str(exc))
        return None


def _language(text: str | None, where: str, p: _Problems) -> str | None:
    if text is not None and text not in LANGUAGES:
        p.add(where, f"language must be one of {', '.join(LANGUAGES)}, got {text!r}")
        return None
    return text


_CUSTOMER_KEYS = {"account", "phone", "language", "timezone", "quiet_hours", "name"}


def _customers(entries: Any, where: str, p: _Problems, *, language: str, tz: ZoneInfo,
               quiet: QuietHours | None, into: dict[str, Recipient]) -> None:  # fmt: skip
    if entries is None:
        return
    if not isinstance(entries, list):
        p.add(where, "must be an array of tables ([[customer]])")
        return
    for i, c in enumerate(entries):
        w = f"{where}[{i}]"
        if not isinstance(c, dict):
            p.add(w, "must be a table")
            continue
        for extra in sorted(set(c) - _CUSTOMER_KEYS):
            p.add(f"{w}.{extra}", f"unknown key (allowed: {', '.join(sorted(_CUSTOMER_KEYS))})")
        account = _text(c, "account", w, p)
        phone = _text(c, "phone", w, p)
        if not account:
            p.add(f"{w}.account", "missing")
            continue
        w = f"{where}[{i}] (account {account})"
        if not phone:
            p.add(f"{w}.phone", "missing")
            continue
        if account in into:
            p.add(w, "the account is listed twice")
            continue
        lang = _language(_text(c, "language", w, p), f"{w}.language", p) or language
        ctz = _zone(_text(c, "timezone", w, p), f"{w}.timezone", p) or tz
        cq = quiet
        if "quiet_hours" in c:
            cq = _quiet(_text(c, "quiet_hours", w, p), f"{w}.quiet_hours", p)
        into[account] = Recipient(account, phone, lang, ctz, cq, _text(c, "name", w, p) or "")


def load_notify_config(path: str | Path) -> NotifyConfig:
    """Read and check the notice file (and its customers file). Raises
    :class:`NotifyConfigError` with every problem found."""
    source = Path(path)
    p = _Problems(source)
    doc = _read(source, p)
    if doc is None:
        raise NotifyConfigError(p.items)
    top = {"webhook", "defaults", "limits", "customer", "customers_file", "templates"}
    for extra in sorted(set(doc) - top):
        p.add(extra, f"unknown key (allowed: {', '.join(sorted(top))})")

    wh = _table(doc, "webhook", p, {"url", "secret_file", "timeout_s", "max_attempts", "retry_min_s",
                                    "retry_max_s"})  # fmt: skip
    url = _text(wh, "url", "webhook", p)
    if not url or not url.startswith(("http://", "https://")):
        p.add("webhook.url", "an http:// or https:// URL is required")
    secret = None
    secret_file = _text(wh, "secret_file", "webhook", p)
    if secret_file:
        sp = (source.parent / secret_file) if not Path(secret_file).is_absolute() else Path(secret_file)
        try:
            secret = sp.read_bytes().strip()
        except OSError as exc:
            p.add("webhook.secret_file", f"{sp}: cannot read: {exc.strerror or exc}")
        else:
            if len(secret) < 16:
                p.add("webhook.secret_file", f"{sp}: the secret must be at least 16 bytes")
    retry_min = _number(wh, "retry_min_s", "webhook", p, 5.0, 0.01, 86400)
    webhook = WebhookSettings(
        url or "",
        secret,
        _number(wh, "timeout_s", "webhook", p, 10.0, 0.1, 300),
        int(_number(wh, "max_attempts", "webhook", p, 12, 1, 1000)),
        retry_min,
        max(retry_min, _number(wh, "retry_max_s", "webhook", p, 900.0, 0.01, 86400)),
    )

    d = _table(doc, "defaults", p, {"language", "timezone", "quiet_hours"})
    language = _language(_text(d, "language", "defaults", p, "zh-CN"), "defaults.language", p) or "zh-CN"
    tz = _zone(_text(d, "timezone", "defaults", p, "Asia/Shanghai"), "defaults.timezone", p)
    quiet = _quiet(_text(d, "quiet_hours", "defaults", p, "21:00-08:00"), "defaults.quiet_hours", p)

    lim = _table(doc, "limits", p, {"reminder_interval_s", "urgent_max", "urgent_window_s",
                                    "reminder_max_age_s", "urgent_max_age_s"})  # fmt: skip
    day = 86400.0
    policy = Policy(
        reminder_interval_ms=int(_number(lim, "reminder_interval_s", "limits", p, 21600, 0, 30 * day) * 1000),
        urgent_max=int(_number(lim, "urgent_max", "limits", p, 4, 1, 1000)),
        urgent_window_ms=int(_number(lim, "urgent_window_s", "limits", p, 3600, 0, 30 * day) * 1000),
        reminder_max_age_ms=int(_number(lim, "reminder_max_age_s", "limits", p, day, 1, 365 * day) * 1000),
        urgent_max_age_ms=int(_number(lim, "urgent_max_age_s", "limits", p, 3 * day, 1, 365 * day) * 1000),
    )

    templates: dict[str, dict[NoticeKind, str]] = {k: dict(v) for k, v in DEFAULT_TEMPLATES.items()}
    tt = _table(doc, "templates", p, set(LANGUAGES))
    names = {k.value for k in SENDABLE}
    for lang, table in tt.items():
        if lang not in LANGUAGES:
            continue
        if not isinstance(table, dict):
            p.add(f"templates.{lang}", "must be a table")
            continue
        for key, text in table.items():
            w = f"templates.{lang}.{key}"
            if key not in names:
                p.add(w, f"no such notice (notices: {', '.join(sorted(names))})")
            elif not isinstance(text, str) or not text.strip() or len(text) > 1000:
                p.add(w, "must be non-empty text of at most 1000 characters")
            else:
                try:
                    templates[lang][NoticeKind(key)] = check_template(text)
                except TemplateError as exc:
                    p.add(w, str(exc))

    customers: dict[str, Recipient] = {}
    fallback_tz = tz or ZoneInfo("Asia/Shanghai")
    _customers(doc.get("customer"), "customer", p, language=language, tz=fallback_tz, quiet=quiet,
               into=customers)  # fmt: skip
    sources = [source]
    cf = _text(doc, "customers_file", "customers_file", p)
    if cf:
        cpath = (source.parent / cf) if not Path(cf).is_absolute() else Path(cf)
        sources.append(cpath)
        cp = _Problems(cpath)
        cdoc = _read(cpath, cp)
        if cdoc is not None:
            for extra in sorted(set(cdoc) - {"customer"}):
                cp.add(extra, "unknown key (a customers file holds [[customer]] entries only)")
            _customers(cdoc.get("customer"), "customer", cp, language=language, tz=fallback_tz,
                       quiet=quiet, into=customers)  # fmt: skip
        p.items += cp.items
    if p.items:
        raise NotifyConfigError(p.items)
    return NotifyConfig(webhook, policy, customers, templates, language, tuple(sources))
