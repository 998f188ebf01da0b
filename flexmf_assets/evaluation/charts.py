"""Small SVG charts as Markdown images, short enough that the Dagster UI draws them in place.

The UI renders a Markdown metadata value inline only when it is under 1,000 characters (longer ones
hide behind "[Show Markdown]"), so a chart here is an SVG data URI written with integer coordinates,
and the number of points is thinned until the whole Markdown fits :data:`MAX_MARKDOWN`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: the UI's limit for drawing Markdown in place is 1,000 characters; stay under it
MAX_MARKDOWN = 990
WIDTH, HEIGHT = 300, 130
#: the drawn size over the viewBox size. Without width and height the UI lays the image out at 0 x 0
#: (a metadata cell shrinks to its content, and an SVG with only a viewBox has no size of its own)
SCALE = 1.5
LEFT, RIGHT, TOP, BOTTOM = 34, 294, 16, 112
COLORS = ("#d9480f", "#1c7ed6", "#868e96", "#2b8a3e")


@dataclass(frozen=True)
class Series:
    label: str
    y: Sequence[float | None]
    dashed: bool = False


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _fitting(title: str, parts: list[str], suffix: str = "") -> str | None:
    """The Markdown image of the SVG ``parts`` (and ``suffix``), or None when over :data:`MAX_MARKDOWN`."""
    markdown = f"![{title}](<data:image/svg+xml,{_encode(''.join(parts))}>){suffix}"
    return markdown if len(markdown) <= MAX_MARKDOWN else None


def _size(width: int, height: int) -> str:
    return f"width='{round(width * SCALE)}' height='{round(height * SCALE)}' viewBox='0 0 {width} {height}'"


def _encode(svg: str) -> str:
    return svg.replace("%", "%25").replace("#", "%23").replace("<", "%3C").replace(">", "%3E").replace('"', "'")


def line_chart(title: str, x: Sequence[float], series: Sequence[Series], *, x_label: str = "",
               y_range: tuple[float, float] | None = None, diagonal: bool = False, y_labels: bool = True,
               x_ends: tuple[str, str] | None = None) -> str:
    """A Markdown image of ``series`` over ``x`` (shared y axis, zoomed to the data), under the UI's
    inline limit. ``None`` values are gaps; ``diagonal`` draws y = x (predicted vs actual)."""
    n = len(x)
    values = [v for s in series for v in s.y if v is not None and math.isfinite(v)]
    if n == 0 or not values:
        return f"_{title}: no data_"
    lo, hi = y_range or (min(values), max(values))
    if diagonal:
        lo, hi = min(lo, min(x)), max(hi, max(x))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = min(x), max(x)
    x_span = (x_hi - x_lo) or 1.0

    def px(v: float) -> int:
        return round(LEFT + (v - x_lo) / x_span * (RIGHT - LEFT))

    def py(v: float) -> int:
        return round(BOTTOM - (v - lo) / (hi - lo) * (BOTTOM - TOP))

    for step in range(1, n + 1):  # thin the points until the Markdown fits
        idx = list(range(0, n, step))
        if idx[-1] != n - 1:
            idx.append(n - 1)
        parts = [
            f"<svg xmlns='http://www.w3.org/2000/svg' {_size(WIDTH, HEIGHT)} font-size='9' "
            "font-family='sans-serif'>",
            f"<path d='M{LEFT},{TOP}V{BOTTOM}H{RIGHT}' stroke='#adb5bd' fill='none'/>",
            f"<text y='{TOP + 3}'>{_fmt(hi)}</text><text y='{BOTTOM}'>{_fmt(lo)}</text>" if y_labels else "",
            f"<text x='{LEFT}' y='{HEIGHT - 6}'>{x_ends[0] if x_ends else _fmt(x_lo)}</text>"
            f"<text x='{RIGHT}' y='{HEIGHT - 6}' text-anchor='end'>{x_ends[1] if x_ends else _fmt(x_hi)}</text>",
        ]
        if x_label:
            parts.append(f"<text x='{(LEFT + RIGHT) // 2}' y='{HEIGHT - 6}' text-anchor='middle'>{x_label}</text>")
        if diagonal:
            d_lo, d_hi = max(lo, x_lo), min(hi, x_hi)
            parts.append(f"<path d='M{px(d_lo)},{py(d_lo)}L{px(d_hi)},{py(d_hi)}' stroke='#ced4da'/>")
        for i, s in enumerate(series):
            color = COLORS[i % len(COLORS)]
            pts = [f"{px(x[j])},{py(s.y[j])}" for j in idx if s.y[j] is not None and math.isfinite(s.y[j])]
            dash = " stroke-dasharray='4'" if s.dashed else ""
            parts.append(f"<polyline points='{' '.join(pts)}' fill='none' stroke='{color}'{dash}/>")
            parts.append(f"<text x='{LEFT + 6 + 100 * i}' y='9' fill='{color}'>{s.label}</text>")
        parts.append("</svg>")
        if markdown := _fitting(title, parts):
            return markdown
    return f"_{title}: too many series to draw_"


def bar_chart(title: str, labels: Sequence[str], values: Sequence[float | None], *,
              reference: float | None = None, reference_label: str = "baseline",
              highlight: int | None = None) -> str:
    """Horizontal bars zoomed to the data range (so 0.846 and 0.870 look different), with an optional
    reference line; labels are shortened, and only the first bars kept, to stay under the inline limit."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return f"_{title}: no data_"
    span_values = finite + ([reference] if reference is not None else [])
    lo, hi = min(span_values), max(span_values)
    pad = 0.08 * ((hi - lo) or abs(hi) or 1.0)
    lo, hi = lo - pad, hi + pad
    left, right = 110, 294

    def px(v: float) -> int:
        return round(left + (v - lo) / (hi - lo) * (right - left))

    for limit in range(len(values), 0, -1):
        for cut in (20, 14, 9):
            bar_h = max(6, min(14, 100 // limit))
            height = 30 + bar_h * limit
            paths = {False: "", True: ""}
            texts = ""
            for r in range(limit):
                y = 14 + r * bar_h
                v = values[r]
                if v is not None and math.isfinite(v):
                    paths[r == highlight] += f"M{left},{y}h{max(1, px(v) - left)}v{bar_h - 2}h-{max(1, px(v) - left)}z"
                label = labels[r] if len(labels[r]) <= cut else labels[r][: cut - 1] + "~"
                texts += f"<text y='{y + bar_h - 3}'>{label}</text>"
            parts = [f"<svg xmlns='http://www.w3.org/2000/svg' {_size(WIDTH, height)} font-size='9' "
                     f"font-family='sans-serif'><g text-anchor='end' transform='translate({left - 3})'>{texts}</g>"]
            for hot, d in paths.items():
                if d:
                    parts.append(f"<path d='{d}' fill='{COLORS[0] if hot else COLORS[1]}'/>")
            if reference is not None:
                x = px(reference)
                anchor = "end" if x > right - 40 else "middle"
                parts.append(f"<path d='M{x},10V{height - 12}' stroke='#495057' stroke-dasharray='3'/>"
                             f"<text x='{x}' y='8' text-anchor='{anchor}'>{reference_label} {_fmt(reference)}</text>")
            parts.append(f"<text x='{left}' y='{height - 2}'>{_fmt(lo)}</text>"
                         f"<text x='{right}' y='{height - 2}' text-anchor='end'>{_fmt(hi)}</text></svg>")
            suffix = f" _first {limit} of {len(values)}_" if limit < len(values) else ""
            if markdown := _fitting(title, parts, suffix):
                return markdown
    return f"_{title}: too many bars to draw_"
