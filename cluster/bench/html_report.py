"""Reports for the goodput benchmark (`cluster bench serve` / `cluster bench compare`): its JSON
result becomes one self-contained HTML file (inline CSS and SVG, no scripts, nothing fetched) and
a Markdown file with the same SVG plots beside it, drawn here in plain Python: SLO attainment vs
offered rate, TTFT and TPOT CDFs, and the mean TTFT breakdown. Any field may be null or missing.

    python -m cluster.bench.html_report result.json -o out/ [--stem report]
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

# Okabe-Ito: distinguishable with the common colour-vision deficiencies (yellow left out: it
# vanishes on white).
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000"]
STAGES = [
    ("queue", "queue", "#999999"),
    ("prefill", "prefill", "#0072B2"),
    ("transfer", "KV transfer", "#E69F00"),
    ("first_decode", "first decode", "#009E73"),
]
EXTRA_STAGE_COLOURS = ["#CC79A7", "#D55E00", "#56B4E9", "#000000"]
MAX_CDF_CURVES = len(PALETTE)
CDF_POINTS = 300  # a CDF polyline is thinned to about this many steps: plenty at 440 px wide
DASH = "6 4"
PLOTS = [("attainment", "SLO attainment vs offered rate"), ("ttft_cdf", "TTFT CDF"),
         ("tpot_cdf", "TPOT CDF"), ("breakdown", "TTFT breakdown")]  # fmt: skip
NO_BREAKDOWN = (
    "No TTFT breakdown: the backend reported no per-stage timing (the OpenAI HTTP API has none)."
)


# ---------------------------------------------------------------- small helpers


def _esc(value: object) -> str:
    """Text for HTML and for SVG (XML): html.escape's entities are valid in both."""
    return html.escape(str(value), quote=True)


def _md_esc(value: object) -> str:
    """Text for a Markdown table cell: inline HTML and table/emphasis syntax neutralised."""
    text = html.escape(str(value), quote=False).replace("\n", " ")
    for ch in "\\|*_`[]":
        text = text.replace(ch, "\\" + ch)
    return text


def _num(value: object) -> float | None:
    """A finite float, else None: the producer may write null, NaN (json allows it) or junk."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: object, digits: int = 2) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(value: object) -> str:
    v = _num(value)
    return "—" if v is None else f"{100 * v:.1f}%"


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _truncate(text: str, limit: int = 26) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------- reading the result


def deployments(result: dict) -> list[tuple[str, dict]]:
    """(name, serve result) pairs: both sides of a compare, or the one deployment."""
    if result.get("compare"):
        return [(str(k), _dict(v)) for k, v in _dict(result.get("results")).items()]
    return [(str(result.get("mode") or "deployment"), result)]


def _first_serve(result: dict) -> dict:
    """Where the shared header fields (model, workload, SLO) live."""
    deps = deployments(result)
    return deps[0][1] if deps else {}


def _runs(serve: dict) -> list[dict]:
    return [r for r in _list(serve.get("runs")) if isinstance(r, dict)]


def _rate(run: dict) -> float | None:
    return _num(run.get("request_rate"))


def _runs_by_rate(serve: dict) -> dict[float, list[dict]]:
    """Runs grouped by offered rate, ascending: repeated trials of a rate are pooled."""
    groups: dict[float, list[dict]] = {}
    for run in _runs(serve):
        rate = _rate(run)
        if rate is not None:
            groups.setdefault(rate, []).append(run)
    return dict(sorted(groups.items()))


def attainment_points(serve: dict) -> list[tuple[float, float]]:
    """The measured curve: `attainment_curve` if given, else trial means computed from runs."""
    points = []
    for p in _list(serve.get("attainment_curve")):
        rate, att = _num(_dict(p).get("rate")), _num(_dict(p).get("attainment"))
        if rate is not None and att is not None:
            points.append((rate, att))
    if points:
        return sorted(points)
    for rate, runs in _runs_by_rate(serve).items():
        atts = [a for a in (_num(r.get("attainment")) for r in runs) if a is not None]
        if atts:
            points.append((rate, sum(atts) / len(atts)))
    return points


def prediction_points(serve: dict) -> list[tuple[float, float]]:
    points = []
    for p in _list(serve.get("prediction")):
        rate, att = _num(_dict(p).get("rate")), _num(_dict(p).get("attainment"))
        if rate is not None and att is not None:
            points.append((rate, att))
    return sorted(points)


def goodput_rate(serve: dict) -> float | None:
    """The offered rate nearest the goodput (the lowest rate when no rate met the target: it
    is the closest to meeting it)."""
    rates = list(_runs_by_rate(serve))
    if not rates:
        return None
    goodput = _num(serve.get("goodput_rps"))
    if goodput is None:
        return rates[0]
    return min(rates, key=lambda r: abs(r - goodput))


def latency_samples(runs: Sequence[dict], key: str) -> tuple[list[float], int]:
    """Per-request latencies in ms pooled over `runs`, and the number of requests the CDF is
    over. A failed request (non-empty error, or null latency without an errors list) counts in
    that number but has no latency, so the CDF tops out at the success share, matching how
    attainment treats it. A null latency of a request that did not fail (e.g. TPOT of a
    one-token output) is undefined, not a failure, and is left out altogether."""
    values: list[float] = []
    total = 0
    for run in runs:
        samples = _list(run.get(key))
        errors = _list(run.get("errors"))
        for i, s in enumerate(samples):
            v = _num(s)
            if v is not None:
                values.append(1000.0 * v)
                total += 1
            elif len(errors) != len(samples) or errors[i]:
                total += 1
    return sorted(values), total


def breakdown(runs: Sequence[dict]) -> dict[str, float] | None:
    """Mean per-stage TTFT (ms) over trials that reported one; None when none did."""
    reported = [
        _dict(r.get("breakdown_ms")) for r in runs if isinstance(r.get("breakdown_ms"), dict)
    ]
    if not reported:
        return None
    stages: dict[str, float] = {}
    for stage in {k for b in reported for k in b}:
        values = [v for v in (_num(b.get(stage)) for b in reported) if v is not None]
        if values:
            stages[stage] = sum(values) / len(values)
    return stages


def _stage_order(stage_names: Iterable[str]) -> list[tuple[str, str, str]]:
    """(key, label, colour) for the known stages in pipeline order, then any others the
    producer added, so a new stage shows up instead of silently vanishing."""
    names = set(stage_names)
    known = [s for s in STAGES if s[0] in names]
    extra = sorted(names - {s[0] for s in STAGES})
    colours = EXTRA_STAGE_COLOURS * (1 + len(extra) // len(EXTRA_STAGE_COLOURS))
    return known + [(k, k.replace("_", " "), c) for k, c in zip(extra, colours, strict=False)]


def error_counts(runs: Sequence[dict], limit: int = 8) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for run in runs:
        for e in _list(run.get("errors")):
            if e:
                counts[str(e)] = counts.get(str(e), 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:limit]


# ---------------------------------------------------------------- SVG primitives


def nice_ticks(hi: float, lo: float = 0.0, max_intervals: int = 7) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) from lo up to the first tick >= hi: the
    finest step that needs at most max_intervals, so the axis ends close to the data."""
    if not hi > lo:
        hi = lo + 1.0
    mag = 10 ** math.floor(math.log10((hi - lo) / max_intervals))
    for step in (m * mag for m in (1, 2, 2.5, 5, 10, 20)):
        first = math.floor(lo / step + 1e-9) * step
        count = math.ceil((hi - first) / step - 1e-9)
        if count <= max_intervals:
            break
    return [round(first + i * step, 12) for i in range(count + 1)]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = 0
    while digits < 6 and abs(step * 10**digits - round(step * 10**digits)) > 1e-6:
        digits += 1
    return f"{value:,.{digits}f}"


@dataclass
class Frame:
    """A plot area inside an SVG: data coordinates to pixels."""

    pid: str  # prefix for element ids: several SVGs share one HTML document
    x_ticks: list[float]
    y_ticks: list[float]
    width: int = 740
    height: int = 360
    left: int = 64
    right: int = 236  # room for the legend
    top: int = 36
    bottom: int = 52

    @property
    def x1(self) -> float:
        return float(self.width - self.right)

    @property
    def y1(self) -> float:
        return float(self.height - self.bottom)

    def sx(self, x: float) -> float:
        lo, hi = self.x_ticks[0], self.x_ticks[-1]
        return self.left + (x - lo) / (hi - lo) * (self.x1 - self.left)

    def sy(self, y: float) -> float:
        lo, hi = self.y_ticks[0], self.y_ticks[-1]
        return self.y1 - (y - lo) / (hi - lo) * (self.y1 - self.top)


def svg_document(frame: Frame, title: str, body: list[str]) -> str:
    """A standalone SVG (xmlns for the .svg files; harmless inline in HTML)."""
    w, h = frame.width, frame.height
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
            f'height="{h}" role="img" aria-label="{_esc(title)}" font-family="DejaVu Sans, '
            f'Helvetica, Arial, sans-serif" font-size="12">',
            f"<title>{_esc(title)}</title>",
            f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>',
            f'<text x="{w / 2:.1f}" y="20" text-anchor="middle" font-size="14" '
            f'font-weight="bold">{_esc(title)}</text>',
            *body,
            "</svg>",
        ]
    )


def axes(
    frame: Frame,
    x_label: str,
    y_label: str,
    y_fmt: Callable[[float], str] | None = None,
    x_categories: Sequence[str] | None = None,
) -> list[str]:
    """Grid, ticks, tick labels, axis labels and the clip path the data is drawn inside. With
    x_categories the x axis has one label per unit slot (bars) instead of numeric ticks."""
    f = frame
    out = [
        f'<clipPath id="{f.pid}-clip"><rect x="{f.left}" y="{f.top}" '
        f'width="{f.x1 - f.left:.1f}" height="{f.y1 - f.top:.1f}"/></clipPath>'
    ]
    for i, label in enumerate(x_categories or []):
        out.append(
            f'<text x="{f.sx(i + 0.5):.1f}" y="{f.y1 + 18}" text-anchor="middle">'
            f"{_esc(_truncate(label, 24))}</text>"
        )
    for x in f.x_ticks if x_categories is None else []:
        px = f.sx(x)
        out.append(f'<line x1="{px:.1f}" y1="{f.top}" x2="{px:.1f}" y2="{f.y1}" stroke="#e5e5e5"/>')
        out.append(f'<line x1="{px:.1f}" y1="{f.y1}" x2="{px:.1f}" y2="{f.y1 + 5}" stroke="#333"/>')
        out.append(
            f'<text x="{px:.1f}" y="{f.y1 + 18}" text-anchor="middle">'
            f"{_esc(_tick_label(x, f.x_ticks))}</text>"
        )
    for y in f.y_ticks:
        py = f.sy(y)
        label = y_fmt(y) if y_fmt else _tick_label(y, f.y_ticks)
        out.append(
            f'<line x1="{f.left}" y1="{py:.1f}" x2="{f.x1}" y2="{py:.1f}" stroke="#e5e5e5"/>'
        )
        out.append(
            f'<line x1="{f.left - 5}" y1="{py:.1f}" x2="{f.left}" y2="{py:.1f}" stroke="#333"/>'
        )
        out.append(
            f'<text x="{f.left - 8}" y="{py + 4:.1f}" text-anchor="end">{_esc(label)}</text>'
        )
    mid_x, mid_y = (f.left + f.x1) / 2, (f.top + f.y1) / 2
    out += [
        f'<rect x="{f.left}" y="{f.top}" width="{f.x1 - f.left:.1f}" height="{f.y1 - f.top:.1f}" '
        'fill="none" stroke="#333"/>',
        f'<text x="{mid_x:.1f}" y="{f.height - 12}" text-anchor="middle">{_esc(x_label)}</text>',
        f'<text x="16" y="{mid_y:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {mid_y:.1f})">{_esc(y_label)}</text>',
    ]
    return out


@dataclass
class LegendItem:
    label: str
    colour: str
    dash: str = ""
    kind: str = "line"  # line | box | marker


def legend(frame: Frame, items: Sequence[LegendItem]) -> list[str]:
    x, y = frame.x1 + 12, frame.top + 6
    out = []
    for i, item in enumerate(items):
        cy = y + 18 * i
        if item.kind == "box":
            out.append(
                f'<rect x="{x:.1f}" y="{cy - 5:.1f}" width="20" height="10" fill="{item.colour}"/>'
            )
        elif item.kind == "marker":
            out.append(_diamond(x + 10, cy, item.colour))
        else:
            dash = f' stroke-dasharray="{item.dash}"' if item.dash else ""
            out.append(
                f'<line x1="{x:.1f}" y1="{cy:.1f}" x2="{x + 20:.1f}" y2="{cy:.1f}" '
                f'stroke="{item.colour}" stroke-width="2"{dash}/>'
            )
        out.append(
            f'<text x="{x + 26:.1f}" y="{cy + 4:.1f}" font-size="11">'
            f"{_esc(_truncate(item.label, 30))}"
            f"<title>{_esc(item.label)}</title></text>"
        )
    return out


def polyline(
    frame: Frame, points: Sequence[tuple[float, float]], colour: str, dash: str = ""
) -> str:
    coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in points)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"'
        f'{dash_attr} clip-path="url(#{frame.pid}-clip)"/>'
    )


def _diamond(cx: float, cy: float, colour: str, r: float = 7) -> str:
    return (
        f'<polygon points="{cx:.1f},{cy - r:.1f} {cx + r:.1f},{cy:.1f} {cx:.1f},{cy + r:.1f} '
        f'{cx - r:.1f},{cy:.1f}" fill="{colour}" stroke="#000" stroke-width="1"/>'
    )


def _hline(frame: Frame, y: float, colour: str = "#555") -> str:
    py = frame.sy(y)
    return (
        f'<line x1="{frame.left}" y1="{py:.1f}" x2="{frame.x1}" y2="{py:.1f}" stroke="{colour}" '
        f'stroke-width="1.5" stroke-dasharray="{DASH}"/>'
    )


def _vline(frame: Frame, x: float, colour: str = "#555") -> str:
    px = frame.sx(x)
    return (
        f'<line x1="{px:.1f}" y1="{frame.top}" x2="{px:.1f}" y2="{frame.y1}" stroke="{colour}" '
        f'stroke-width="1.5" stroke-dasharray="{DASH}" clip-path="url(#{frame.pid}-clip)"/>'
    )


def _note(frame: Frame, text: str) -> str:
    """A message in the middle of an empty plot."""
    return (
        f'<text x="{(frame.left + frame.x1) / 2:.1f}" y="{(frame.top + frame.y1) / 2:.1f}" '
        f'text-anchor="middle" fill="#777">{_esc(text)}</text>'
    )


# ---------------------------------------------------------------- the four plots


def _colours(result: dict) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, (name, _) in enumerate(deployments(result))}


def _slo(result: dict) -> dict:
    return _dict(_first_serve(result).get("slo"))


def _interp(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation on a sorted curve; None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if points and abs(points[-1][0] - x) < 1e-12:
        return points[-1][1]
    return None


def attainment_svg(result: dict) -> str:
    colours, target = _colours(result), _num(_slo(result).get("attainment"))
    deps = deployments(result)
    curves = {name: attainment_points(s) for name, s in deps}
    preds = {name: prediction_points(s) for name, s in deps}
    goodputs = {name: _num(s.get("goodput_rps")) for name, s in deps}
    xs = [x for pts in (*curves.values(), *preds.values()) for x, _ in pts]
    xs += [g for g in goodputs.values() if g is not None]
    frame = Frame("attainment", nice_ticks(max(xs, default=1.0) * 1.05), nice_ticks(1.0))
    body = axes(frame, "offered rate (req/s)", "SLO attainment", lambda y: f"{100 * y:.0f}%")
    items = []
    if target is not None:
        body.append(_hline(frame, target))
        items.append(LegendItem(f"target {100 * target:.0f}%", "#555", DASH))
    for name, _ in deps:
        colour, points = colours[name], curves[name]
        if points:
            body.append(polyline(frame, points, colour))
            body += [
                f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="3.5" fill="{colour}"/>'
                for x, y in points
            ]
            items.append(LegendItem(f"{name} measured", colour))
        if preds[name]:
            body.append(polyline(frame, preds[name], colour, DASH))
            items.append(LegendItem(f"{name} predicted", colour, DASH))
        g = goodputs[name]
        if g is not None:
            y = _interp(points, g) if target is None else target
            body.append(_diamond(frame.sx(g), frame.sy(y if y is not None else 0.0), colour))
            items.append(LegendItem(f"{name} goodput {g:.2f}", colour, kind="marker"))
    if not any(curves.values()):
        body.append(_note(frame, "no runs"))
    return svg_document(frame, "SLO attainment vs offered rate", body + legend(frame, items))


def _cdf_series(result: dict, key: str) -> list[tuple[str, str, list[float], int]]:
    """(label, colour, sorted ms values, request count) per curve: every rate (thinned to the
    palette size, keeping the ends and the goodput rate) for one deployment; for a compare
    each deployment at its goodput-nearest rate, the fair point to compare latencies at."""
    series = []
    deps = deployments(result)
    if result.get("compare"):
        colours = _colours(result)
        for name, serve in deps:
            rate = goodput_rate(serve)
            if rate is None:
                continue
            values, total = latency_samples(_runs_by_rate(serve)[rate], key)
            series.append((f"{name} @ {rate:g} req/s", colours[name], values, total))
        return series
    serve = deps[0][1] if deps else {}
    groups = _runs_by_rate(serve)
    rates = _pick_rates(list(groups), goodput_rate(serve), MAX_CDF_CURVES)
    for i, rate in enumerate(rates):
        values, total = latency_samples(groups[rate], key)
        series.append((f"{rate:g} req/s", PALETTE[i % len(PALETTE)], values, total))
    return series


def _pick_rates(rates: list[float], keep: float | None, limit: int) -> list[float]:
    if len(rates) <= max(limit, 3):
        return rates
    picked = {rates[round(i * (len(rates) - 1) / (limit - 1))] for i in range(limit)}
    if keep is not None and keep not in picked:
        picked.discard(min(picked - {rates[0], rates[-1]}, key=lambda r: abs(r - keep)))
        picked.add(keep)
    return sorted(picked)


def _cdf_points(values: Sequence[float], total: int) -> list[tuple[float, float]]:
    """Step-function vertices of the empirical CDF, thinned to about CDF_POINTS steps."""
    if not values or total <= 0:
        return []
    stride = max(1, len(values) // CDF_POINTS)
    idx = list(range(0, len(values), stride))
    if idx[-1] != len(values) - 1:
        idx.append(len(values) - 1)
    points = [(values[0], 0.0)]
    prev = 0.0
    for i in idx:
        points += [(values[i], prev), (values[i], (i + 1) / total)]
        prev = (i + 1) / total
    return points


def _quantile(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def cdf_svg(result: dict, metric: str) -> str:
    """metric: "ttft" or "tpot"."""
    name = metric.upper()
    slo_ms = _num(_slo(result).get(f"{metric}_s"))
    slo_ms = None if slo_ms is None else 1000 * slo_ms
    series = _cdf_series(result, f"{metric}s")
    pooled = sorted(v for _, _, values, _ in series for v in values)
    # A heavy tail would squash every curve against the y axis: clip the x axis near the pooled
    # p99 (but always show the SLO line).
    x_hi = _quantile(pooled, 0.99) * 1.1 if pooled else 1.0
    x_hi = max(x_hi, 1.15 * slo_ms if slo_ms else 0.0)
    frame = Frame(f"{metric}-cdf", nice_ticks(x_hi), nice_ticks(1.0))
    body = axes(frame, f"{name} (ms)", "fraction of requests", lambda y: f"{y:g}")
    items = []
    for label, colour, values, total in series:
        points = _cdf_points(values, total)
        if points:
            # Carry the last step to the right edge so a curve that tops out below 1 (failed
            # requests) reads as a plateau, not as data that stops.
            points.append((frame.x_ticks[-1] * 2, points[-1][1]))
            body.append(polyline(frame, points, colour))
            items.append(LegendItem(label, colour))
    if slo_ms is not None:
        body.append(_vline(frame, slo_ms, "#C00000"))
        items.append(LegendItem(f"SLO {slo_ms:g} ms", "#C00000", DASH))
    if not pooled:
        body.append(_note(frame, f"no {name} samples"))
    return svg_document(frame, f"{name} CDF", body + legend(frame, items))


def _breakdown_bars(result: dict) -> list[tuple[str, dict[str, float] | None]]:
    """(bar label, stage means) per rate; per deployment (at its goodput-nearest rate) for a
    compare, like the CDFs."""
    deps = deployments(result)
    if result.get("compare"):
        bars = []
        for name, serve in deps:
            rate = goodput_rate(serve)
            if rate is not None:
                bars.append((f"{name} @ {rate:g}", breakdown(_runs_by_rate(serve)[rate])))
        return bars
    serve = deps[0][1] if deps else {}
    return [(f"{rate:g}", breakdown(runs)) for rate, runs in _runs_by_rate(serve).items()]


def breakdown_svg(result: dict) -> str | None:
    """Stacked bars of the mean TTFT stages; None when no run reported a breakdown."""
    bars = _breakdown_bars(result)
    if not any(b for _, b in bars):
        return None
    stages = _stage_order(k for _, b in bars if b for k in b)
    slo_ms = _num(_slo(result).get("ttft_s"))
    slo_ms = None if slo_ms is None else 1000 * slo_ms
    top = max(sum(max(v, 0.0) for v in b.values()) for _, b in bars if b)
    frame = Frame("breakdown", [0.0, float(len(bars))], nice_ticks(max(top, slo_ms or 0) * 1.05))
    compare = bool(result.get("compare"))
    x_label = "deployment @ rate (req/s)" if compare else "offered rate (req/s)"
    body = axes(frame, x_label, "mean TTFT (ms)", x_categories=[label for label, _ in bars])
    width = min((frame.x1 - frame.left) / len(bars) * 0.6, 90.0)  # one bar: not a slab
    for i, (_, stage_ms) in enumerate(bars):
        cx = frame.sx(i + 0.5)
        if not stage_ms:
            body.append(f'<text x="{cx:.1f}" y="{frame.y1 - 6}" text-anchor="middle">n/a</text>')
            continue
        base = 0.0
        for key, label, colour in stages:
            v = max(stage_ms.get(key, 0.0), 0.0)
            if v <= 0:
                continue
            y_top, y_bottom = frame.sy(base + v), frame.sy(base)
            body.append(
                f'<rect x="{cx - width / 2:.1f}" y="{y_top:.1f}" width="{width:.1f}" '
                f'height="{y_bottom - y_top:.1f}" fill="{colour}">'
                f"<title>{_esc(label)}: {v:.1f} ms</title></rect>"
            )
            base += v
    items = [LegendItem(label, colour, kind="box") for _, label, colour in stages]
    if slo_ms is not None:
        body.append(_hline(frame, slo_ms, "#C00000"))
        items.append(LegendItem(f"TTFT SLO {slo_ms:g} ms", "#C00000", DASH))
    return svg_document(frame, "Mean TTFT breakdown", body + legend(frame, items))


def plot_svgs(result: dict) -> dict[str, str]:
    """name -> SVG text for every plot this result can draw (breakdown may be missing)."""
    svgs = {
        "attainment": attainment_svg(result),
        "ttft_cdf": cdf_svg(result, "ttft"),
        "tpot_cdf": cdf_svg(result, "tpot"),
    }
    bd = breakdown_svg(result)
    if bd is not None:
        svgs["breakdown"] = bd
    return svgs


# ---------------------------------------------------------------- tables (format-neutral)


def header_rows(result: dict) -> list[tuple[str, str]]:
    serve = _first_serve(result)
    workload, slo = _dict(serve.get("workload")), _dict(serve.get("slo"))
    wl = str(workload.get("name") or "—")
    if workload.get("mean_input_len") is not None or workload.get("mean_output_len") is not None:
        wl += (
            f" (mean input {_fmt(workload.get('mean_input_len'), 0)} tokens, "
            f"mean output {_fmt(workload.get('mean_output_len'), 0)} tokens)"
        )
    slo_text = (
        f"TTFT ≤ {_fmt(_ms(slo.get('ttft_s')), 0)} ms, "
        f"TPOT ≤ {_fmt(_ms(slo.get('tpot_s')), 0)} ms, "
        f"attainment ≥ {_pct(slo.get('attainment'))}"
    )
    modes = ", ".join(f"{n} ({_gpus(s)})" for n, s in deployments(result))
    targets = _per_deployment(result, "target")
    return [
        ("Model", str(serve.get("model_id") or "—")),
        ("Mode" if not result.get("compare") else "Deployments", modes or "—"),
        ("Workload", wl),
        ("SLO", slo_text),
        ("Date", str(result.get("date") or serve.get("date") or "—")),
        ("Backend", _per_deployment(result, "backend")),
        ("Target", targets or "—"),
    ]


def _gpus(serve: dict) -> str:
    n = _num(serve.get("num_gpus"))
    return "? GPUs" if n is None else f"{n:g} GPU" + ("" if n == 1 else "s")


def _per_deployment(result: dict, key: str) -> str:
    """One value if the deployments agree, else "name: value" for each."""
    values = [(name, str(serve.get(key) or "—")) for name, serve in deployments(result)]
    if len({v for _, v in values}) <= 1:
        return values[0][1] if values else "—"
    return ", ".join(f"{name}: {v}" for name, v in values)


def _ms(seconds: object) -> float | None:
    v = _num(seconds)
    return None if v is None else 1000 * v


def _best_attainment(serve: dict) -> float | None:
    return max((a for _, a in attainment_points(serve)), default=None)


def summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one column per deployment, plus the ratio row for a compare."""
    deps = deployments(result)
    header = ["", *(name for name, _ in deps)]
    rows = [
        ["Goodput (req/s)", *(_fmt(s.get("goodput_rps")) for _, s in deps)],
        ["Goodput per GPU (req/s)", *(_fmt(s.get("goodput_per_gpu")) for _, s in deps)],
        ["GPUs", *(_fmt(s.get("num_gpus"), 0) for _, s in deps)],
        ["Rates measured", *(str(len(_runs_by_rate(s))) for _, s in deps)],
        ["Best attainment", *(_pct(_best_attainment(s)) for _, s in deps)],
    ]
    rows += _slo_scale_rows(deps)
    if result.get("compare"):
        names = " ÷ ".join(name for name, _ in deps)
        rows.append(
            [f"Goodput per GPU ratio ({names})", _fmt(result.get("goodput_per_gpu_ratio"))]
            + [""] * (len(deps) - 1)
        )
    return header, rows


def _slo_scale_rows(deps: list[tuple[str, dict]]) -> list[list[str]]:
    """Goodput at each --slo-scale multiple of the SLOs (the same runs, rescored)."""
    scales: dict[float, dict[str, object]] = {}
    for name, serve in deps:
        for entry in _list(serve.get("slo_scale")):
            scale = _num(_dict(entry).get("scale"))
            if scale is not None:
                scales.setdefault(scale, {})[name] = _dict(entry).get("goodput_rps")
    return [
        [f"Goodput at {scale:g}x SLOs (req/s)", *(_fmt(by.get(name)) for name, _ in deps)]
        for scale, by in sorted(scales.items())
    ]


RUN_COLUMNS = ["Rate (req/s)", "Completed / failed", "Attainment", "TTFT att.", "TPOT att.",
               "p90 TTFT (ms)", "p90 TPOT (ms)", "Throughput (req/s)", "Goodput (req/s)",
               "Output (tok/s)", "Duration (s)"]  # fmt: skip


def runs_rows(serve: dict) -> list[list[str]]:
    rows = []
    for run in sorted(_runs(serve), key=lambda r: _rate(r) or 0.0):
        rows.append([
            _fmt(run.get("request_rate")),
            f"{_fmt(run.get('completed'), 0)} / {_fmt(run.get('failed'), 0)}",
            _pct(run.get("attainment")), _pct(run.get("ttft_attainment")),
            _pct(run.get("tpot_attainment")),
            _fmt(run.get("p90_ttft_ms"), 1), _fmt(run.get("p90_tpot_ms"), 1),
            _fmt(run.get("request_throughput")), _fmt(run.get("request_goodput")),
            _fmt(run.get("output_throughput"), 1), _fmt(run.get("duration"), 1),
        ])  # fmt: skip
    return rows


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1320px; padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f0; }
table.meta th { background: #f7f7f7; text-align: left; }
table.meta td { text-align: left; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 16px; }
figure { margin: 0; border: 1px solid #ddd; padding: 8px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption, .note { color: #555; font-size: 13px; margin-top: 4px; }
"""

CAPTIONS = {
    "attainment": "Measured share of requests meeting both SLOs (trials averaged); dashed "
    "coloured lines: the simulator's prediction; diamond: the goodput.",
    "ttft_cdf": "Failed requests count as never finishing, so a curve tops out at the success "
    "share. The x axis is clipped near the pooled p99.",
    "tpot_cdf": "TPOT of requests with more than one output token; failed requests count as "
    "never finishing.",
    "breakdown": "Mean time per stage of the time to first token, averaged over trials.",
}


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_meta(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="meta"><tbody>{body}</tbody></table>'


def _title(result: dict) -> str:
    kind = "comparison" if result.get("compare") else "benchmark"
    model = _first_serve(result).get("model_id") or "unknown model"
    return f"Goodput {kind}: {model}"


def render_html(result: dict) -> str:
    """The whole report as one HTML document with nothing to fetch."""
    svgs = plot_svgs(result)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # The report must never reach out: forbid every fetch; inline styles only, no scripts.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(_title(result))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_esc(_title(result))}</h1>",
        _html_meta(header_rows(result)),
        "<h2>Summary</h2>",
        _html_table(*summary_table(result)),
        "<h2>Plots</h2>",
        '<div class="plots">',
    ]
    for name, _ in PLOTS:
        if name in svgs:
            parts.append(
                f'<figure id="{name}">{svgs[name]}<figcaption>{_esc(CAPTIONS[name])}'
                "</figcaption></figure>"
            )
    parts.append("</div>")
    if "breakdown" not in svgs:
        parts.append(f'<p class="note">{_esc(NO_BREAKDOWN)}</p>')
    parts += _html_runs(result)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_runs(result: dict) -> list[str]:
    parts = ["<h2>Runs</h2>"]
    compare = bool(result.get("compare"))
    for name, serve in deployments(result):
        if compare:
            parts.append(f"<h3>{_esc(name)}</h3>")
        rows = runs_rows(serve)
        parts.append(_html_table(RUN_COLUMNS, rows) if rows else '<p class="note">No runs.</p>')
        errors = error_counts(_runs(serve))
        if errors:
            items = "".join(f"<li>{n} × <code>{_esc(e)}</code></li>" for e, n in errors)
            parts.append(f'<p class="note">Most common errors:</p><ul>{items}</ul>')
    return parts


# ---------------------------------------------------------------- Markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """A GFM table; numeric right-aligns every column but the first."""
    lines = ["| " + " | ".join(_md_esc(h) for h in header) + " |"]
    align = " ---: " if numeric else " --- "
    lines.append("|" + "|".join([" --- "] + [align] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_md_esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_svgs(result: dict, svg_dir: Path) -> dict[str, Path]:
    """svg_dir/<plot>.svg for each plot drawn; a plot not drawn this time (no breakdown) loses
    its file from an earlier report so nothing stale is left to be mistaken for this one."""
    svg_dir.mkdir(parents=True, exist_ok=True)
    svgs = plot_svgs(result)
    paths = {}
    for name, _ in PLOTS:
        path = svg_dir / f"{name}.svg"
        if name in svgs:
            path.write_text(svgs[name] + "\n", encoding="utf-8")
            paths[name] = path
        else:
            path.unlink(missing_ok=True)
    return paths


def render_markdown(result: dict, svg_dir: Path, link_prefix: str = "") -> str:
    """The report as Markdown; writes the plots as svg_dir/<plot>.svg and links them as
    link_prefix + "<plot>.svg" (so link_prefix is svg_dir relative to the Markdown file)."""
    return _markdown(result, write_svgs(result, Path(svg_dir)), link_prefix)


def _markdown(result: dict, svgs: dict[str, Path], link_prefix: str) -> str:
    parts = [
        f"# {_md_esc(_title(result))}",
        "",
        _md_table(["", ""], header_rows(result), numeric=False),
        "",
    ]
    parts += ["## Summary", "", _md_table(*summary_table(result)), "", "## Plots", ""]
    for name, title in PLOTS:
        if name in svgs:
            parts += [f"![{title}]({quote(link_prefix + svgs[name].name)})", "", CAPTIONS[name], ""]
    if "breakdown" not in svgs:
        parts += [f"_{NO_BREAKDOWN}_", ""]
    parts += ["## Runs", ""]
    for name, serve in deployments(result):
        if result.get("compare"):
            parts += [f"### {_md_esc(name)}", ""]
        rows = runs_rows(serve)
        parts += [_md_table(RUN_COLUMNS, rows) if rows else "No runs.", ""]
        errors = error_counts(_runs(serve))
        if errors:
            parts += ["Most common errors:", ""]
            parts += [f"- {n} × {_md_esc(e)}" for e, n in errors] + [""]
    return "\n".join(parts)


def write_reports(result: dict, out_dir: Path, stem: str = "report") -> dict[str, Path]:
    """Write out_dir/stem.html, out_dir/stem.md and its plots in out_dir/stem_svg/. Returns
    {"html": .., "md": .., "<plot>": ..svg} (a per-stem SVG folder so reports can share a dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    svg_dir = out_dir / f"{stem}_svg"
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    html_path.write_text(render_html(result), encoding="utf-8")
    svgs = write_svgs(result, svg_dir)
    md_path.write_text(_markdown(result, svgs, f"{stem}_svg/"), encoding="utf-8")
    return {"html": html_path, "md": md_path, **svgs}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="JSON from cluster bench serve/compare")
    parser.add_argument("-o", "--out-dir", type=Path, default=Path("."))
    parser.add_argument("--stem", default="report")
    args = parser.parse_args(argv)
    paths = write_reports(json.loads(args.result.read_text()), args.out_dir, args.stem)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
