"""The console's languages: English and Simplified Chinese.

Catalogs are JSON files under ``locale/`` (one per language, the same keys in
each: a test checks it). The language is the ``edgegw_lang`` cookie set by the
language switch, else the best match of the browser's ``Accept-Language``,
else English. Placeholders use ``str.format`` names (``{n}``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

LANGUAGES = ("en", "zh-CN")
DEFAULT = "en"
LOCALE_DIR = Path(__file__).parent / "locale"


@functools.cache
def catalog(lang: str) -> dict[str, str]:
    data = json.loads((LOCALE_DIR / f"{lang}.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"locale/{lang}.json: not an object")
    return {str(k): str(v) for k, v in data.items()}


def normalize(tag: str) -> str | None:
    """The supported language for a language tag (zh, zh-CN, zh-Hans… → zh-CN; en-* → en)."""
    t = tag.strip().lower().replace("_", "-")
    if t == "zh" or t.startswith(("zh-cn", "zh-hans", "zh-sg")):
        return "zh-CN"
    if t == "en" or t.startswith("en-"):
        return "en"
    return None


def from_accept_language(header: str | None) -> str | None:
    """The supported language the browser prefers most (q-values respected)."""
    if not header:
        return None
    best: tuple[float, int, str] | None = None
    for i, part in enumerate(header.split(",")[:20]):
        tag, _, params = part.partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        lang = normalize(tag)
        if lang is not None and q > 0 and (best is None or (q, -i) > (best[0], best[1])):
            best = (q, -i, lang)
    return best[2] if best else None


def choose(cookie: str | None, accept_language: str | None) -> str:
    if cookie in LANGUAGES:
        return str(cookie)
    return from_accept_language(accept_language) or DEFAULT


class Translator:
    def __init__(self, lang: str) -> None:
        self.lang = lang if lang in LANGUAGES else DEFAULT
        self._cat = catalog(self.lang)
        self._fallback = catalog(DEFAULT)

    def __call__(self, key: str, **kw: object) -> str:
        text = self._cat.get(key) or self._fallback.get(key) or key
        return text.format(**kw) if kw else text

    def has(self, key: str) -> bool:
        return key in self._cat
