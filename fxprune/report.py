"""``--report out.html``: one self-contained page (inline CSS and SVG, no scripts, nothing
fetched) with the before/after summary, kept channels / heads / neurons per group, FLOPs and
bytes per layer, the latency comparison (flagged when the machine was noisy while timing) and
the estimate next to the measurement."""

from __future__ import annotations

import datetime
import html
from pathlib import Path

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;
padding-bottom:4px}.sub{color:#667}.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #dde;border-radius:8px;padding:10px 14px;min-width:170px}
.card b{display:block;font-size:20px}.ok{color:#17803d}.bad{color:#b42318}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #dde;
padding:3px 8px;text-align:right}th{background:#f4f5f9}td:first-child,th:first-child{text-align:left}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:-1px}
pre{background:#f6f7fa;padding:8px;white-space:pre-wrap;font-size:12px}
"""
_BEFORE, _AFTER = "#c9d3e6", "#2f6fdf"


def _e(v) -> str:
    return html.escape(str(v))


def _num(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def bar_chart(rows: list[tuple[str, float, float]], unit: str = "", width: int = 760) -> str:
    """Horizontal paired bars (before in grey, after in blue) as inline SVG."""
    if not rows:
        return "<p class='sub'>nothing to chart</p>"
    label_w, bar_h, gap = 230, 9, 6
    top = max(max(b, a) for _, b, a in rows) or 1.0
    span = width - label_w - 130
    h = len(rows) * (2 * bar_h + gap) + 10
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{h}' role='img'>"]
    for i, (label, before, after) in enumerate(rows):
        y = 5 + i * (2 * bar_h + gap)
        short = label if len(label) <= 34 else "..." + label[-31:]
        parts.append(
            f"<text x='{label_w - 6}' y='{y + bar_h + 3}' font-size='11' text-anchor='end'>"
            f"<title>{_e(label)}</title>{_e(short)}</text>"
        )
        for j, (v, color) in enumerate(((before, _BEFORE), (after, _AFTER))):
            w = max(span * v / top, 0.5)
            parts.append(
                f"<rect x='{label_w}' y='{y + j * bar_h}' width='{w:.1f}' height='{bar_h - 1}' "
                f"fill='{color}'><title>{_e(label)}: {_num(v)}{unit}</title></rect>"
            )
        parts.append(
            f"<text x='{label_w + span * max(before, after) / top + 4:.1f}' y='{y + bar_h + 3}' "
            f"font-size='10' fill='#556'>{_num(before)} &#8594; {_num(after)}{_e(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _legend(before: str, after: str) -> str:
    return (
        f"<p class='legend'><span style='background:{_BEFORE}'></span>{_e(before)}"
        f"<span style='background:{_AFTER}'></span>{_e(after)}</p>"
    )


def _table(head: list[str], rows: list[list]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def render(
    title: str,
    result=None,
    equivalence=None,
    latency=None,
    estimate=None,
    command: str | None = None,
    top: int = 40,
) -> str:
    """The report page as a string; every section is optional (one renderer per section)."""
    s = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='sub'>fxprune report, {datetime.datetime.now():%Y-%m-%d %H:%M}"
        + (f" &middot; <code>{_e(command)}</code>" if command else "")
        + "</p>",
    ]
    s += _cards(result, equivalence, latency)
    if result is not None:
        s += _pruning_section(result, top)
    if latency is not None:
        s += _latency_section(latency)
    if estimate is not None:
        s += _estimate_section(estimate)
    s.append("</body></html>")
    return "".join(s)


def _cards(result, equivalence, latency) -> list[str]:
    """The before / after, proof and speedup cards at the top."""
    s = ["<div class='cards'>"]
    if result is not None:
        sm = result.summary
        s.append(
            f"<div class='card'>parameters<b>{_num(sm.params_before)} &#8594; "
            f"{_num(sm.params_after)}</b>x{sm.params_ratio:.3f}</div>"
            f"<div class='card'>MACs<b>{_num(sm.macs_before)} &#8594; {_num(sm.macs_after)}</b>"
            f"x{sm.macs_ratio:.3f}</div>"
        )
    if equivalence is not None:
        cls = "ok" if equivalence.ok else "bad"
        s.append(
            f"<div class='card'>equivalence<b class='{cls}'>{'exact' if equivalence.ok else 'FAILED'}"
            f"</b>max rel err {equivalence.max_rel_err:.1e}</div>"
        )
    if latency is not None and latency.rows:
        r = latency.rows[-1]
        s.append(
            f"<div class='card'>speedup (batch {r.batch}, {_e(latency.backend)})"
            f"<b>{r.speedup:.2f}x</b>efficiency {r.efficiency:.2f}"
            + (" <span class='bad'>noisy</span>" if latency.noisy else "")
            + "</div>"
        )
    s.append("</div>")
    return s


def _pruning_section(result, top: int) -> list[str]:
    """Kept units per group, FLOPs and weight bytes per layer, the barriers."""
    s = []
    groups = []
    for p in result.passes:
        for name, (total, kept) in p.units.items():
            groups.append((f"{p.name}: {name}", float(total), float(kept)))
    if groups:
        s.append("<h2>Kept channels / heads / neurons per group</h2>")
        s.append(_legend("before", "kept"))
        s.append(bar_chart(groups[:top]))
        if len(groups) > top:
            s.append(f"<p class='sub'>... and {len(groups) - top} more groups</p>")
    layers = sorted(result.summary.layers, key=lambda r: -r.macs_before)
    s.append("<h2>FLOPs per layer (2 x MACs, per example batch)</h2>")
    s.append(_legend("dense", "pruned"))
    s.append(
        bar_chart(
            [
                (r.layer, 2.0 * r.macs_before, 2.0 * r.macs_after)
                for r in layers[:top]
                if r.macs_before
            ]
        )
    )
    s.append("<h2>Weight bytes per layer (fp32)</h2>")
    s.append(_legend("dense", "pruned"))
    by_p = [r for r in sorted(layers, key=lambda r: -r.params_before)[:top] if r.params_before]
    s.append(bar_chart([(r.layer, 4.0 * r.params_before, 4.0 * r.params_after) for r in by_p], "B"))
    if result.barriers:
        s.append("<h2>What kept channels (barriers)</h2>")
        s.append(
            _table(
                ["node", "op", "reason", "layers"],
                [
                    [b["node"], b["op"], b["reason"], ", ".join(b["layers"][:4])]
                    for b in result.barriers[:30]
                ],
            )
        )
    return s


def _latency_section(latency) -> list[str]:
    s = [
        f"<h2>Latency, {_e(latency.backend)} ({latency.threads} threads)</h2>",
        f"<p class='sub'>{latency.warmup} warm-up + {latency.repeats} timed calls per model "
        f"and batch, dense and pruned interleaved; {_e(latency.machine)}</p>",
    ]
    if latency.noisy:
        s.append(
            "<p class='bad'><b>Noisy run</b>: the machine was not quiet while timing, so the "
            "speedup may not repeat; re-run on a quiet machine before trusting it.</p>"
        )
    if latency.notes:
        s.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in latency.notes) + "</ul>")
    s.append(_legend("dense ms", "pruned ms"))
    s.append(
        bar_chart([(f"batch {r.batch}", r.dense_ms, r.pruned_ms) for r in latency.rows], " ms")
    )
    s.append(
        _table(
            ["batch", "dense ms [p10-p90]", "pruned ms [p10-p90]", "speedup [rounds p10-p90]"]
            + ["MAC ratio", "efficiency", "parity", "verdict", "noise"],
            [_latency_row(r) for r in latency.rows],
        )
    )
    s.append("<p class='sub'>" + "<br>".join(_e(n) for n in latency.noise_notes()) + "</p>")
    return s


def _latency_row(r) -> list:
    from fxprune.verify.latency_report import noise_cell

    rounds = "" if r.speedup_p10 is None else f" [{r.speedup_p10:.2f}-{r.speedup_p90:.2f}]"
    return [
        r.batch,
        f"{r.dense_ms:.3f} [{r.dense_p10:.3f}-{r.dense_p90:.3f}]",
        f"{r.pruned_ms:.3f} [{r.pruned_p10:.3f}-{r.pruned_p90:.3f}]",
        f"{r.speedup:.2f}x{rounds}",
        f"{r.mac_ratio:.3f}",
        f"{r.efficiency:.2f}",
        f"{r.parity:.1e}",
        r.verdict,
        noise_cell(r),
    ]


def _estimate_section(estimate) -> list[str]:
    s = ["<h2>Estimate: unstructured vs 2:4 vs structured</h2>"]
    cols = [(h, b) for h in estimate.hardware for b in estimate.batch_sizes]
    rows = []
    for sc in estimate.scenarios:
        if sc.skipped:
            rows.append([sc.name, f"skipped: {sc.skipped}"] + [""] * (2 + len(cols)))
            continue
        for fmt, by in sc.bytes.items():
            rows.append(
                [
                    sc.name if fmt == "dense" else f"{sc.name} ({fmt})",
                    f"{sc.params:,}",
                    f"{by['fp16'] / 1e6:.2f} MB",
                    f"{sc.flops / 1e9:.2f}",
                ]
                + [f"{sc.speedup[h][b]:.2f}x" for h, b in cols]
            )
    head = ["scenario", "params", "fp16 bytes", "GFLOPs run"]
    s.append(_table(head + [f"{h} b{b}" for h, b in cols], rows))
    if estimate.comparisons:
        s.append("<h3>Estimated vs measured speedup</h3>")
        s.append(
            _table(
                ["scenario", "hardware profile", "backend", "batch", "estimated", "measured"]
                + ["measured / estimated"],
                [
                    [
                        c["scenario"],
                        c["hardware"],
                        c["backend"],
                        c["batch"],
                        f"{c['estimated']:.2f}x",
                        f"{c['measured']:.2f}x",
                        f"{c['measured_over_estimated']:.2f}",
                    ]
                    for c in estimate.comparisons
                ],
            )
        )
    s.append("<h3>Formulas, with this model's numbers</h3><pre>")
    for sc in estimate.scenarios:
        for f in sc.formulas:
            s.append(_e(f"{sc.name}: {f}") + "\n")
    for n in estimate.notes:
        s.append(_e(f"note: {n}") + "\n")
    s.append("</pre>")
    return s


def write(path: str | Path, title: str, **sections) -> Path:
    """Write :func:`render` to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(title, **sections), encoding="utf-8")
    return path
