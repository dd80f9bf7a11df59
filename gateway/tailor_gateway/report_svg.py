"""The report's plots, drawn as inline SVG (the page has no scripts and fetches nothing, so it opens
from a file, offline): perplexity against size or latency with the Pareto front and the constraint
lines, and the training loss curve. Text placement avoids covering points and earlier labels."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tailor_gateway.report_text import esc, num

# A constraint line further than this many data spans from the points would squash them: say so instead.
_MAX_STRETCH = 1.5


@dataclass
class Point:
    name: str
    x: float
    y: float
    feasible: bool
    recommended: bool
    tip: str


def front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (both lower is better), left to right."""
    found: list[Point] = []
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        if not found or p.y < found[-1].y:
            found.append(p)
    return found


_W, _H, _L, _R, _T, _B = 600, 420, 64, 20, 40, 52


def scatter(
    plot_id: str,
    title: str,
    points: list[Point],
    x_title: str,
    hlines: list[tuple[float, str]],
    vlines: list[tuple[float, str]],
) -> str:
    parts = [
        f"<svg id={plot_id} class=plot viewBox='0 0 {_W} {_H}' role=img aria-label='{esc(title)}'>",
        f"<text x={_W / 2} y=24 class=ptitle>{esc(title)}</text>",
    ]
    if not points:
        parts.append(f"<text x={_W / 2} y={_H / 2} class=ptitle>no measurements to plot</text></svg>")
        return "".join(parts)
    xs, ys = [p.x for p in points], [p.y for p in points]
    x_ticks = _ticks(xs + _reachable([v for v, _ in vlines], xs), floor_zero=True)
    y_ticks = _ticks(ys + _reachable([v for v, _ in hlines], ys), floor_zero=False)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(v: float) -> float:
        return _L + (v - x0) / (x1 - x0) * (_W - _L - _R)

    def py(v: float) -> float:
        return _H - _B - (v - y0) / (y1 - y0) * (_H - _T - _B)

    step_x, step_y = x_ticks[1] - x_ticks[0], y_ticks[1] - y_ticks[0]
    for t in x_ticks:
        parts.append(f"<line x1={px(t):.1f} x2={px(t):.1f} y1={_T} y2={_H - _B} class=grid />")
        parts.append(f"<text x={px(t):.1f} y={_H - _B + 17} class=tick>{_tick(t, step_x)}</text>")
    for t in y_ticks:
        parts.append(f"<line x1={_L} x2={_W - _R} y1={py(t):.1f} y2={py(t):.1f} class=grid />")
        parts.append(f"<text x={_L - 8} y={py(t) + 4:.1f} class='tick end'>{_tick(t, step_y)}</text>")
    parts.append(f"<rect x={_L} y={_T} width={_W - _L - _R} height={_H - _T - _B} class=frame />")
    parts.append(f"<text x={(_L + _W - _R) / 2} y={_H - 12} class=atitle>{esc(x_title)}</text>")
    parts.append(
        f"<text transform='translate(18 {(_T + _H - _B) / 2}) rotate(-90)' class=atitle>"
        "Perplexity (lower is better)</text>"
    )
    # Every point is an obstacle for every label: no text is drawn across a marker.
    taken = [(px(p.x) - 9, py(p.y) - 9, px(p.x) + 9, py(p.y) + 9) for p in points]
    labels = []
    for value, text in hlines:
        text = f"{text} ({num(value, 3)})"
        if y0 <= value <= y1:
            y = py(value)
            parts.append(f"<line x1={_L} x2={_W - _R} y1={y:.1f} y2={y:.1f} class=limit />")
            spots = [(_W - _R - 6, y - 6, "end"), (_L + 6, y - 6, "start"), (_W - _R - 6, y + 15, "end")]
        else:
            text, spots = f"{text}: off the chart", [(_W - _R - 6, _T + 16, "end")]
        labels.append(_label_at(spots, text, taken, "limtext"))
    for value, text in vlines:
        text = f"{text} ({num(value)})"
        if x0 <= value <= x1:
            x = px(value)
            parts.append(f"<line x1={x:.1f} x2={x:.1f} y1={_T} y2={_H - _B} class=limit />")
            spots = [(x - 6, _T + 16, "end"), (x + 6, _T + 16, "start"), (x - 6, _H - _B - 8, "end")]
        else:
            text, spots = f"{text}: off the chart", [(_W - _R - 6, _H - _B - 8, "end")]
        labels.append(_label_at(spots, text, taken, "limtext"))
    pareto = front(points)
    if len(pareto) > 1:
        coords = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in pareto)
        parts.append(f"<polyline points='{coords}' class=front />")
    # Greyed points first, so the candidates that matter are drawn on top; labels last of all.
    for p in sorted(points, key=lambda p: (p.feasible, p in pareto, p.recommended)):
        cx, cy = px(p.x), py(p.y)
        kind = "rec" if p.recommended else "fail" if not p.feasible else "pareto" if p in pareto else "ok"
        if p.recommended:
            parts.append(f"<circle cx={cx:.1f} cy={cy:.1f} r=11 class=ring />")
        parts.append(
            f"<circle cx={cx:.1f} cy={cy:.1f} r=6 class='pt {kind}'><title>{esc(p.tip)}</title></circle>"
        )
        gap = 16 if p.recommended else 11
        spots = [(cx + gap, cy + 4, "start"), (cx - gap, cy + 4, "end"), (cx, cy - gap - 2, "middle")]
        spots += [(cx, cy + gap + 10, "middle")]
        spots += [(cx + gap, cy + 4 + k * 14 * sign, "start") for k in (1, 2, 3) for sign in (1, -1)]
        labels.append(_label_at(spots, p.name, taken, f"plabel {kind}"))
    parts.extend(labels)
    parts.append("</svg>")
    return "".join(parts)


def _label_at(spots: list[tuple[float, float, str]], text: str, taken: list, cls: str) -> str:
    """Text at the first spot where it stays in the plot and covers no point or earlier label."""
    width, height = 6.6 * len(text), 13.0
    chosen = spots[0]
    for x, y, anchor in spots:
        left = x if anchor == "start" else x - width if anchor == "end" else x - width / 2
        box = (left, y - 10, left + width, y - 10 + height)
        inside = box[0] >= _L and box[2] <= _W - _R and box[1] >= _T and box[3] <= _H - _B
        if inside and not any(_overlap(box, other) for other in taken):
            chosen = (x, y, anchor)
            taken.append(box)
            break
    x, y, anchor = chosen
    return f"<text x={x:.1f} y={y:.1f} class='{cls} {anchor}'>{esc(text)}</text>"


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _reachable(limits: list[float], data: list[float]) -> list[float]:
    """Constraint values close enough to the data to share the axis with it."""
    lo, hi = min(data), max(data)
    span = (hi - lo) or abs(hi) or 1.0
    return [v for v in limits if lo - _MAX_STRETCH * span <= v <= hi + _MAX_STRETCH * span]


def _ticks(values: list[float], floor_zero: bool) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) that frame the values with a margin."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    if floor_zero and min(values) >= 0:
        lo = max(lo, 0.0)
    raw = (hi - lo) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [k * step for k in range(first, last + 1)]


def _tick(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if round(step / 10 ** math.floor(math.log10(step)), 6) == 2.5:
        decimals += 1
    return f"{value:,.{decimals}f}"


def loss_plot(curve: list, evals: list[tuple[int, float]]) -> str:
    """Training loss per step (a line) and the held-out evaluations (points), on one pair of axes."""
    steps, losses = [p[0] for p in curve], [p[1] for p in curve]
    x_ticks = _ticks(steps, floor_zero=True)
    y_ticks = _ticks(losses + [v for _, v in evals], floor_zero=False)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(v: float) -> float:
        return _L + (v - x0) / (x1 - x0) * (_W - _L - _R)

    def py(v: float) -> float:
        return _H - _B - (v - y0) / (y1 - y0) * (_H - _T - _B)

    title = "Training loss" + (" and held-out loss" if evals else "")
    parts = [
        f"<svg id=plot-loss class=plot viewBox='0 0 {_W} {_H}' role=img aria-label='{esc(title)}'>",
        f"<text x={_W / 2} y=24 class=ptitle>{esc(title)}</text>",
    ]
    for t in x_ticks:
        parts.append(f"<line x1={px(t):.1f} x2={px(t):.1f} y1={_T} y2={_H - _B} class=grid />")
        parts.append(
            f"<text x={px(t):.1f} y={_H - _B + 17} class=tick>{_tick(t, x_ticks[1] - x_ticks[0])}</text>"
        )
    for t in y_ticks:
        parts.append(f"<line x1={_L} x2={_W - _R} y1={py(t):.1f} y2={py(t):.1f} class=grid />")
        parts.append(
            f"<text x={_L - 8} y={py(t) + 4:.1f} class='tick end'>{_tick(t, y_ticks[1] - y_ticks[0])}</text>"
        )
    parts.append(f"<rect x={_L} y={_T} width={_W - _L - _R} height={_H - _T - _B} class=frame />")
    parts.append(f"<text x={(_L + _W - _R) / 2} y={_H - 12} class=atitle>Step</text>")
    parts.append(
        f"<text transform='translate(18 {(_T + _H - _B) / 2}) rotate(-90)' class=atitle>Loss (nats/token)</text>"
    )
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in curve)
    parts.append(f"<polyline points='{coords}' class=front><title>training loss</title></polyline>")
    for step, loss in evals:
        parts.append(
            f"<circle cx={px(step):.1f} cy={py(loss):.1f} r=5 class='pt rec'>"
            f"<title>held-out loss {num(loss, 4)} at step {step}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
