"""Line charts as inline SVG, drawn on the server (pure: values in, markup out).

No script and no style sheet is needed to see them: colours and strokes are
SVG presentation attributes (the console's Content-Security-Policy allows no
inline style), and each series is one ``<polyline class="series">`` whose
``points`` are the data mapped into the plot area. Long series are thinned to
:data:`MAX_POINTS` (evenly, always keeping the first and the last point).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from html import escape

from markupsafe import Markup

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
MAX_POINTS = 600

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 30


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[int, float]]  # (time in ms, value), in time order
    step: bool = False  # a value holds until the next point (a balance), not a slope


@dataclass(frozen=True)
class Marker:
    time_ms: int
    value: float
    label: str
    color: str = "#2ca02c"


@dataclass(frozen=True)
class Chart:
    svg: Markup
    legend: tuple[tuple[str, str], ...]  # (label, colour)
    points: int  # points drawn, over all series
    empty: bool = False
    series: tuple[Series, ...] = field(default=(), repr=False)


def thin(points: Sequence[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    """At most ``limit`` (>= 2) points, evenly spaced in the list, first and last kept."""
    n = len(points)
    if n <= limit:
        return list(points)
    step = (n - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks: list[float] = []
    v = first
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt_value(v: float, step: float) -> str:
    decimals = 0 if step >= 1 else min(6, math.ceil(-math.log10(step)))
    return f"{v:.{decimals}f}"


def _time_ticks(t0: int, t1: int, tz: tzinfo) -> list[tuple[int, str]]:
    span = t1 - t0
    steps_min = (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080, 43200)
    step_min = next((s for s in steps_min if s * 60_000 * 6 >= span), steps_min[-1])
    step = step_min * 60_000
    offset = int(datetime.fromtimestamp(t0 / 1000, tz).utcoffset().total_seconds() * 1000)  # type: ignore[union-attr]
    first = ((t0 + offset) // step + 1) * step - offset
    fmt = "%H:%M" if span <= 36 * 3_600_000 else "%m-%d %H:%M" if span <= 4 * 86_400_000 else "%m-%d"
    ticks: list[tuple[int, str]] = []
    t = first
    while t <= t1 and len(ticks) < 12:
        ticks.append((t, datetime.fromtimestamp(t / 1000, tz).strftime(fmt)))
        t += step
    return ticks


def line_chart(
    series: Sequence[Series],
    *,
    tz: tzinfo,
    title: str,
    unit: str = "",
    zero_line: bool = False,
    markers: Sequence[Marker] = (),
    width: int = WIDTH,
    height: int = HEIGHT,
) -> Chart:
    """An SVG line chart of ``series`` against time (labels in ``tz``)."""
    drawn = [Series(s.label, thin(s.points), s.step) for s in series if s.points]
    legend = tuple((s.label, PALETTE[i % len(PALETTE)]) for i, s in enumerate(drawn))
    pw, ph = width - LEFT - RIGHT, height - TOP - BOTTOM
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}"'
        f' aria-label="{escape(title)}"><title>{escape(title)}</title>'
    )
    if not drawn:
        return Chart(Markup(head + "</svg>"), (), 0, empty=True)
    times = [t for s in drawn for t, _ in s.points] + [m.time_ms for m in markers]
    values = [v for s in drawn for _, v in s.points] + [m.value for m in markers]
    t0, t1 = min(times), max(times)
    if t1 == t0:
        t0, t1 = t0 - 60_000, t1 + 60_000
    lo, hi = min(values), max(values)
    if zero_line:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    # a flat (or all but flat) series gets a band around it; else 6 % above and below
    pad = (hi - lo) * 0.06 if hi - lo > 1e-6 else max(abs(hi) * 0.1, 1.0)
    lo, hi = lo - pad, hi + pad

    def x(t: int) -> float:
        return round(LEFT + (t - t0) / (t1 - t0) * pw, 1)

    def y(v: float) -> float:
        return round(TOP + (hi - v) / (hi - lo) * ph, 1)

    parts = [head, f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>']
    yt = nice_ticks(lo, hi)
    ystep = yt[1] - yt[0] if len(yt) > 1 else 1.0
    for v in yt:
        parts.append(
            f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v)}" y2="{y(v)}" stroke="#eee"/>'
            f'<text x="{LEFT - 6}" y="{y(v) + 4}" text-anchor="end" font-size="11" fill="#555">'
            f"{escape(_fmt_value(v, ystep))}</text>"
        )
    for t, label in _time_ticks(t0, t1, tz):
        parts.append(
            f'<line x1="{x(t)}" x2="{x(t)}" y1="{TOP}" y2="{TOP + ph}" stroke="#f2f2f2"/>'
            f'<text x="{x(t)}" y="{height - 10}" text-anchor="middle" font-size="11" fill="#555">'
            f"{escape(label)}</text>"
        )
    if unit:
        parts.append(f'<text x="6" y="{TOP + 10}" font-size="11" fill="#555">{escape(unit)}</text>')
    if zero_line:
        parts.append(
            f'<line class="zero" x1="{LEFT}" x2="{LEFT + pw}" y1="{y(0)}" y2="{y(0)}"'
            ' stroke="#888" stroke-dasharray="4 3"/>'
        )
    n = 0
    for s, (label, color) in zip(drawn, legend, strict=True):
        pts: list[str] = []
        for i, (t, v) in enumerate(s.points):
            if s.step and i:
                pts.append(f"{x(t)},{y(s.points[i - 1][1])}")
            pts.append(f"{x(t)},{y(v)}")
        n += len(s.points)
        parts.append(
            f'<polyline class="series" data-series="{escape(label)}" data-points="{len(s.points)}"'
            f' fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round" points="{" ".join(pts)}"/>'
        )
    for m in markers:
        parts.append(
            f'<circle class="marker" cx="{x(m.time_ms)}" cy="{y(m.value)}" r="4.5" fill="{m.color}"'
            f' stroke="#fff"><title>{escape(m.label)}</title></circle>'
        )
    parts.append("</svg>")
    return Chart(Markup("".join(parts)), legend, n, series=tuple(drawn))
