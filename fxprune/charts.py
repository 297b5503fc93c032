"""Inline SVG charts for reports (no scripts, nothing fetched)."""

from __future__ import annotations

COLORS = ["#2f6fdf", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285"]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    ticks: list[float],
    x_label: str,
    y_label: str,
    start: tuple[float, float] | None = None,
) -> str:
    """One polyline per named series of ``(x, y)`` points (each drawn from ``start`` when given;
    the y range is the series' own), x from 0 to ``max(ticks)`` (ticks labelled), the series'
    names as a legend on the right; returns the SVG."""
    w, h, left, bottom = 720, 360, 60, 40
    ys = [y for pts in series.values() for _, y in pts] or [0.0]
    lo, hi = min(0.0, min(ys)), max(ys) or 1.0
    span = hi - lo or 1.0
    xmax = max(ticks)

    def xy(x, y):
        px = left + (w - left - 180) * x / xmax
        py = h - bottom - (h - bottom - 20) * (y - lo) / span
        return f"{px:.1f},{py:.1f}"

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-size='11'>",
        f"<line x1='{left}' y1='{h - bottom}' x2='{w - 180}' y2='{h - bottom}' stroke='#888'/>",
        f"<line x1='{left}' y1='20' x2='{left}' y2='{h - bottom}' stroke='#888'/>",
        f"<text x='{(w - 180 + left) / 2}' y='{h - 8}' text-anchor='middle'>{x_label}</text>",
        f"<text x='14' y='{h / 2}' transform='rotate(-90 14 {h / 2})' text-anchor='middle'>"
        f"{y_label}</text>",
        f"<text x='{left - 4}' y='24' text-anchor='end'>{hi:.3g}</text>",
        f"<text x='{left - 4}' y='{h - bottom}' text-anchor='end'>{lo:.3g}</text>",
    ]
    for t in ticks:
        x = xy(t, lo).split(",")[0]
        parts.append(f"<text x='{x}' y='{h - bottom + 14}' text-anchor='middle'>{t:g}</text>")
    for i, (name, pts) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        parts.append(
            f"<polyline fill='none' stroke='{c}' stroke-width='1.6' "
            f"points='{' '.join(xy(a, b) for a, b in ([start] if start else []) + pts)}'/>"
        )
        parts.append(f"<text x='{w - 175}' y='{24 + 14 * i}' fill='{c}'>{name[-28:]}</text>")
    parts.append("</svg>")
    return "".join(parts)
