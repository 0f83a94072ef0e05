"""Reports for the goodput benchmark (`cluster bench serve` / `cluster bench compare`): its JSON
result becomes one self-contained HTML file (inline CSS and SVG, no scripts, nothing fetched) and
a Markdown file with the same SVG plots beside it, drawn with matplotlib's SVG backend: SLO
attainment vs offered rate, TTFT and TPOT CDFs, the mean TTFT breakdown and, when the result
lists placement `deployments`, their measured vs predicted attainment and goodput per GPU.
Numbers from an emulated run (`"emulated": {...}`) are labelled so. Any field may be null or
missing.

    python -m cluster.bench.html_report result.json -o out/ [--stem report]
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

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
SLO_COLOUR, TARGET_COLOUR = "#C00000", "#555555"
MAX_CDF_CURVES = len(PALETTE)
CDF_POINTS = 300  # a CDF polyline is thinned to about this many steps: plenty at 800 px wide
DEFAULT_ATTAINMENT_TARGET = 0.9
PLOTS = {"deployment_attainment": "Attainment per deployment: measured vs predicted",
         "deployment_goodput": "Goodput per GPU: measured vs predicted",
         "attainment": "SLO attainment vs offered rate", "ttft_cdf": "TTFT CDF",
         "tpot_cdf": "TPOT CDF", "breakdown": "Mean TTFT breakdown"}  # fmt: skip
NO_BREAKDOWN = (
    "No TTFT breakdown: the backend reported no per-stage timing (the OpenAI HTTP API has none)."
)
RC = {
    "svg.fonttype": "none",  # text as <text>, not glyph outlines: a fraction of the bytes
    "text.parse_math": False,  # a "$" in a deployment name is text, not TeX
    "font.size": 10,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e5e5e5",
    "legend.fontsize": 9,
    "legend.frameon": False,
    "lines.linewidth": 2,
}
# No date, creator or RDF block: the same result renders to the same SVG text.
SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


# ---------------------------------------------------------------- small helpers


def _esc(value: object) -> str:
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


def _ms(seconds: object) -> float | None:
    v = _num(seconds)
    return None if v is None else 1000 * v


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _label(text: str, limit: int = 30) -> str:
    """A legend/tick label: truncated, and a leading "_" guarded (matplotlib hides those)."""
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return "\u200b" + text if text.startswith("_") else text


def _points(entries: object, y_key: str) -> list[tuple[float, float]]:
    """Sorted (rate, y) of the entries with both numbers."""
    pairs = ((_num(_dict(p).get("rate")), _num(_dict(p).get(y_key))) for p in _list(entries))
    return sorted((x, y) for x, y in pairs if x is not None and y is not None)


# ---------------------------------------------------------------- reading the result


def serves(result: dict) -> list[tuple[str, dict]]:
    """(name, serve result) pairs: both sides of a compare, or the one deployment."""
    if result.get("compare"):
        return [(str(k), _dict(v)) for k, v in _dict(result.get("results")).items()]
    return [(str(result.get("mode") or "deployment"), result)]


def _first_serve(result: dict) -> dict:
    """Where the shared header fields (model, workload, SLO) live."""
    pairs = serves(result)
    return pairs[0][1] if pairs else {}


def _slo(result: dict) -> dict:
    return _dict(_first_serve(result).get("slo"))


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
    points = _points(serve.get("attainment_curve"), "attainment")
    if points:
        return points
    for rate, runs in _runs_by_rate(serve).items():
        atts = [a for a in (_num(r.get("attainment")) for r in runs) if a is not None]
        if atts:
            points.append((rate, sum(atts) / len(atts)))
    return points


def prediction_points(serve: dict) -> list[tuple[float, float]]:
    return _points(serve.get("prediction"), "attainment")


def has_serve_data(result: dict) -> bool:
    """Whether the serve sections (summary, serve plots, runs) have anything to show; a result
    that only lists placement deployments leaves them out."""
    if not _list(result.get("deployments")):
        return True
    return any(_runs(s) or attainment_points(s) for _, s in serves(result))


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


@dataclass(frozen=True, slots=True)
class Deployment:
    """One entry of the result's `deployments`: a placement measured against the simulator's
    prediction. Rates are real-world req/s (an emulated run's are scaled back)."""

    name: str
    goodput_per_gpu: float | None
    predicted_goodput_per_gpu: float | None
    measured: list[tuple[float, float]]  # (rate, attainment)
    predicted: list[tuple[float, float]]


def planned_deployments(result: dict) -> list[Deployment]:
    entries = [_dict(d) for d in _list(result.get("deployments"))]
    return [
        Deployment(
            name=str(d.get("name") or f"deployment {i + 1}"),
            goodput_per_gpu=_num(d.get("goodput_per_gpu")),
            predicted_goodput_per_gpu=_num(d.get("predicted_goodput_per_gpu")),
            measured=_points(d.get("curve"), "attainment"),
            predicted=_points(d.get("curve"), "predicted_attainment"),
        )
        for i, d in enumerate(entries)
    ]


def attainment_target(result: dict) -> float:
    """The placement plots' target: result["slo"]["attainment"], else the serve SLO's, else
    the planner's default."""
    for slo in (_dict(result.get("slo")), _slo(result)):
        if (target := _num(slo.get("attainment"))) is not None:
            return target
    return DEFAULT_ATTAINMENT_TARGET


def emulation(result: dict) -> str | None:
    """E.g. "emulated A100-80GB, time scale 8" when the numbers come from an emulated run."""
    emulated = result.get("emulated") or _first_serve(result).get("emulated")
    if not emulated:
        return None
    info = _dict(emulated)
    head = " ".join(["emulated", *([str(info["hardware"])] if info.get("hardware") else [])])
    details = [
        f"{key.replace('_', ' ')} {value if isinstance(value, str) else format(value, 'g')}"
        for key, value in info.items()
        if key != "hardware" and (isinstance(value, str) or _num(value) is not None)
    ]
    return ", ".join([head, *details])


def _tagged(text: str, result: dict) -> str:
    note = emulation(result)
    return f"{text} ({note})" if note else text


# ---------------------------------------------------------------- plots


def _svg(name: str, result: dict, draw: Callable[[Axes], None]) -> str:
    """Plot `name` drawn by `draw` with matplotlib's SVG backend (no pyplot), as an <svg>
    element. The per-plot hash salt makes the clip/marker ids deterministic and unique among
    the SVGs inlined in one page; group ids ("axes_1", ...) get the plot name for the same
    reason ("<g id=" cannot occur in text: matplotlib escapes "<")."""
    with mpl.rc_context(RC | {"svg.hashsalt": name}):
        fig = Figure(figsize=(8, 4), layout="constrained")
        note = emulation(result)
        fig.suptitle(PLOTS[name] + (f"\n({note})" if note else ""), fontweight="bold")
        ax = fig.add_subplot()
        draw(ax)
        if ax.get_legend_handles_labels()[0]:
            fig.legend(loc="outside right upper")
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata=SVG_METADATA)
    text = buf.getvalue()
    return text[text.index("<svg") :].replace('<g id="', f'<g id="{name}-')


def _note(ax: Axes, text: str) -> None:
    """A message in the middle of an empty plot."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777")


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _attainment_axes(ax: Axes, target: float | None) -> None:
    if target is not None:
        ax.axhline(target, color=TARGET_COLOUR, ls="--", label=f"target {100 * target:g}%")
    ax.set(xlabel="offered rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.05))
    ax.set_xlim(left=0)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _curve(ax: Axes, points: Sequence[tuple[float, float]], colour: str, label: str, **kw) -> None:
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, color=colour, label=_label(label), **kw)


def attainment_svg(result: dict) -> str:
    """Measured attainment per serve deployment (dashed: the simulator's prediction), the
    target, and the goodput as a diamond."""
    target = _num(_slo(result).get("attainment"))

    def draw(ax: Axes) -> None:
        for i, (name, serve) in enumerate(serves(result)):
            points = attainment_points(serve)
            _curve(ax, points, _colour(i), f"{name} measured", marker="o", ms=4)
            _curve(ax, prediction_points(serve), _colour(i), f"{name} predicted", ls="--")
            g = _num(serve.get("goodput_rps"))
            if g is not None:
                y = target
                if y is None and points:  # no target: on the measured curve
                    y = float(np.interp(g, *np.transpose(points)))
                label = _label(f"{name} goodput {g:.2f}")
                ax.plot([g], [y or 0.0], "D", color=_colour(i), mec="k", ms=8, label=label)
        if not any(attainment_points(s) for _, s in serves(result)):
            _note(ax, "no runs")
        _attainment_axes(ax, target)

    return _svg("attainment", result, draw)


def run_groups(result: dict) -> list[tuple[str, str, list[dict]]]:
    """(label, colour, runs) per CDF curve and breakdown bar: every rate (thinned to the
    palette size, keeping the ends and the goodput rate) for one deployment; for a compare
    each deployment at its goodput-nearest rate, the fair point to compare latencies at."""
    if result.get("compare"):
        groups = []
        for i, (name, serve) in enumerate(serves(result)):
            if (rate := goodput_rate(serve)) is not None:
                groups.append((f"{name} @ {rate:g} req/s", _colour(i), _runs_by_rate(serve)[rate]))
        return groups
    serve = _first_serve(result)
    by_rate = _runs_by_rate(serve)
    rates = _pick_rates(list(by_rate), goodput_rate(serve), MAX_CDF_CURVES)
    return [(f"{rate:g} req/s", _colour(i), by_rate[rate]) for i, rate in enumerate(rates)]


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


def cdf_svg(result: dict, metric: str) -> str:
    """metric: "ttft" or "tpot"."""
    name, slo_ms = metric.upper(), _ms(_slo(result).get(f"{metric}_s"))
    series = [
        (label, c, *latency_samples(runs, f"{metric}s")) for label, c, runs in run_groups(result)
    ]
    pooled = sorted(v for *_, values, _ in series for v in values)
    # A heavy tail would squash every curve against the y axis: clip the x axis near the pooled
    # p99 (but always show the SLO line).
    p99 = pooled[min(len(pooled) - 1, int(0.99 * len(pooled)))] if pooled else 0.0
    x_hi = max(1.1 * p99, 1.15 * (slo_ms or 0.0)) or 1.0

    def draw(ax: Axes) -> None:
        for label, colour, values, total in series:
            points = _cdf_points(values, total)
            # Carried past the right edge so a curve that tops out below 1 (failed requests)
            # reads as a plateau, not as data that stops.
            points += [(2 * x_hi, points[-1][1])] if points else []
            _curve(ax, points, colour, label, lw=1.5)
        if slo_ms is not None:
            ax.axvline(slo_ms, color=SLO_COLOUR, ls="--", label=f"SLO {slo_ms:g} ms")
        if not pooled:
            _note(ax, f"no {name} samples")
        ax.set(xlim=(0, x_hi), ylim=(0, 1.02), xlabel=f"{name} (ms)")
        ax.set_ylabel("fraction of requests")

    return _svg(f"{metric}_cdf", result, draw)


def _categories(ax: Axes, labels: Sequence[str]) -> None:
    """One x slot per label; a few bars keep a bar's width instead of filling the plot."""
    n, slots, labels = len(labels), max(len(labels), 4), [_label(s, 24) for s in labels]
    crowded = n * max(map(len, labels), default=0) > 60  # would overlap side by side
    ax.set_xticks(
        range(n), labels, rotation=20 if crowded else 0, ha="right" if crowded else "center"
    )
    ax.set_xlim((n - 1 - slots) / 2, (n - 1 + slots) / 2)
    ax.grid(axis="x", visible=False)


def breakdown_svg(result: dict) -> str | None:
    """Stacked bars of the mean TTFT stages; None when no run reported a breakdown."""
    bars = [(label, breakdown(runs)) for label, _, runs in run_groups(result)]
    if not any(b for _, b in bars):
        return None
    stages = _stage_order(k for _, b in bars if b for k in b)
    slo_ms = _ms(_slo(result).get("ttft_s"))

    def draw(ax: Axes) -> None:
        base = [0.0] * len(bars)
        for key, label, colour in stages:
            heights = [max((b or {}).get(key, 0.0), 0.0) for _, b in bars]
            ax.bar(range(len(bars)), heights, 0.6, bottom=base, color=colour, label=label)
            base = [b + h for b, h in zip(base, heights, strict=True)]
        for i, (_, b) in enumerate(bars):
            if not b:
                ax.text(i, 0, "n/a", ha="center", va="bottom", color="#777")
        if slo_ms is not None:
            ax.axhline(slo_ms, color=SLO_COLOUR, ls="--", label=f"TTFT SLO {slo_ms:g} ms")
        _categories(ax, [label for label, _ in bars])
        ax.set_ylabel("mean TTFT (ms)")

    return _svg("breakdown", result, draw)


def deployment_attainment_svg(result: dict) -> str | None:
    """Measured (solid) vs predicted (dashed) attainment of each placement deployment."""
    deps = planned_deployments(result)
    if not deps:
        return None

    def draw(ax: Axes) -> None:
        for i, d in enumerate(deps):
            _curve(ax, d.measured, _colour(i), f"{d.name} measured", marker="o", ms=4)
            _curve(ax, d.predicted, _colour(i), f"{d.name} predicted", ls="--")
        if not any(d.measured or d.predicted for d in deps):
            _note(ax, "no attainment curves")
        _attainment_axes(ax, attainment_target(result))

    return _svg("deployment_attainment", result, draw)


def deployment_goodput_svg(result: dict) -> str | None:
    """Goodput per GPU of each placement deployment, measured beside predicted."""
    deps = planned_deployments(result)
    if not deps:
        return None

    def draw(ax: Axes) -> None:
        pairs = [("measured", [d.goodput_per_gpu for d in deps], PALETTE[0], "")]
        pairs.append(("predicted", [d.predicted_goodput_per_gpu for d in deps], PALETTE[1], "//"))
        for j, (label, values, colour, hatch) in enumerate(pairs):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(deps))]
            heights = [v or 0.0 for v in values]
            bars = ax.bar(xs, heights, 0.38, color=colour, hatch=hatch, label=label)
            ax.bar_label(bars, labels=[_fmt(v) for v in values], padding=2, fontsize=8)
        _categories(ax, [d.name for d in deps])
        ax.set_ylabel("goodput per GPU (req/s)")
        ax.margins(y=0.12)

    return _svg("deployment_goodput", result, draw)


def plot_svgs(result: dict) -> dict[str, str]:
    """name -> SVG text for every plot this result can draw (breakdown may be missing)."""
    svgs = {
        "deployment_attainment": deployment_attainment_svg(result),
        "deployment_goodput": deployment_goodput_svg(result),
    }
    if has_serve_data(result):
        svgs |= {
            "attainment": attainment_svg(result),
            "ttft_cdf": cdf_svg(result, "ttft"),
            "tpot_cdf": cdf_svg(result, "tpot"),
            "breakdown": breakdown_svg(result),
        }
    return {name: svg for name, svg in svgs.items() if svg is not None}


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
    modes = ", ".join(f"{n} ({_gpus(s)})" for n, s in serves(result))
    rows = [
        ("Model", str(serve.get("model_id") or "—")),
        ("Mode" if not result.get("compare") else "Deployments", modes or "—"),
        ("Workload", wl),
        ("SLO", slo_text),
        ("Date", str(result.get("date") or serve.get("date") or "—")),
        ("Backend", _per_serve(result, "backend")),
        ("Target", _per_serve(result, "target") or "—"),
    ]
    return rows if has_serve_data(result) else [r for r in rows if r[0] not in ("Mode", "Target")]


def _gpus(serve: dict) -> str:
    n = _num(serve.get("num_gpus"))
    return "? GPUs" if n is None else f"{n:g} GPU" + ("" if n == 1 else "s")


def _per_serve(result: dict, key: str) -> str:
    """One value if the deployments agree, else "name: value" for each."""
    values = [(name, str(serve.get(key) or "—")) for name, serve in serves(result)]
    if len({v for _, v in values}) <= 1:
        return values[0][1] if values else "—"
    return ", ".join(f"{name}: {v}" for name, v in values)


def _best_attainment(serve: dict) -> float | None:
    return max((a for _, a in attainment_points(serve)), default=None)


def summary_table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one column per deployment, plus the ratio row for a compare."""
    pairs = serves(result)
    header = ["", *(name for name, _ in pairs)]
    rows = [
        ["Goodput (req/s)", *(_fmt(s.get("goodput_rps")) for _, s in pairs)],
        ["Goodput per GPU (req/s)", *(_fmt(s.get("goodput_per_gpu")) for _, s in pairs)],
        ["GPUs", *(_fmt(s.get("num_gpus"), 0) for _, s in pairs)],
        ["Rates measured", *(str(len(_runs_by_rate(s))) for _, s in pairs)],
        ["Best attainment", *(_pct(_best_attainment(s)) for _, s in pairs)],
    ]
    rows += _slo_scale_rows(pairs)
    if result.get("compare"):
        names = " ÷ ".join(name for name, _ in pairs)
        rows.append(
            [f"Goodput per GPU ratio ({names})", _fmt(result.get("goodput_per_gpu_ratio"))]
            + [""] * (len(pairs) - 1)
        )
    return header, rows


def _slo_scale_rows(pairs: list[tuple[str, dict]]) -> list[list[str]]:
    """Goodput at each --slo-scale multiple of the SLOs (the same runs, rescored)."""
    scales: dict[float, dict[str, object]] = {}
    for name, serve in pairs:
        for entry in _list(serve.get("slo_scale")):
            scale = _num(_dict(entry).get("scale"))
            if scale is not None:
                scales.setdefault(scale, {})[name] = _dict(entry).get("goodput_rps")
    return [
        [f"Goodput at {scale:g}x SLOs (req/s)", *(_fmt(by.get(name)) for name, _ in pairs)]
        for scale, by in sorted(scales.items())
    ]


DEPLOYMENT_COLUMNS = ["Deployment", "Goodput per GPU (req/s)", "Predicted (req/s)",
                      "Measured ÷ predicted"]  # fmt: skip


def deployment_rows(result: dict) -> list[list[str]]:
    rows = []
    for d in planned_deployments(result):
        measured, predicted = d.goodput_per_gpu, d.predicted_goodput_per_gpu
        ratio = measured / predicted if measured is not None and predicted else None
        rows.append([d.name, _fmt(measured), _fmt(predicted), _fmt(ratio)])
    return rows


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


def _title(result: dict) -> str:
    kind = "comparison" if result.get("compare") else "benchmark"
    model = _first_serve(result).get("model_id") or "unknown model"
    return _tagged(f"Goodput {kind}: {model}", result)


def report_blocks(result: dict, plots: Iterable[str]) -> list[tuple]:
    """The report's content, format-neutral: (kind, ...) blocks that _html and _markdown
    render, so the two reports cannot drift apart. `plots` names the plots drawn."""
    serve = has_serve_data(result)
    blocks: list[tuple] = [("title", _title(result))]
    if note := emulation(result):
        blocks.append(("banner", f"Not measured on real hardware: every number here is {note}."))
    blocks.append(("meta", header_rows(result)))
    if planned_deployments(result):
        heading = _tagged("Deployments: measured vs predicted", result)
        blocks += [("h2", heading), ("table", DEPLOYMENT_COLUMNS, deployment_rows(result))]
    if serve:
        blocks += [("h2", _tagged("Summary", result)), ("table", *summary_table(result))]
    drawn = [(name, _tagged(title, result)) for name, title in PLOTS.items() if name in plots]
    blocks += [("h2", "Plots"), ("plots", drawn)]
    if serve and "breakdown" not in plots:
        blocks.append(("note", NO_BREAKDOWN))
    if serve:
        blocks.append(("h2", _tagged("Runs", result)))
        for name, s in serves(result):
            blocks += [("h3", name)] if result.get("compare") else []
            rows = runs_rows(s)
            blocks.append(("table", RUN_COLUMNS, rows) if rows else ("note", "No runs."))
            blocks += [("errors", errors)] if (errors := error_counts(_runs(s))) else []
    return blocks


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
.emulated { border-left: 4px solid #E69F00; padding: 4px 8px; background: #fff8e6; }
"""

CAPTIONS = {
    "deployment_attainment": "Per placement deployment: measured attainment (solid) and the "
    "simulator's prediction (dashed, same colour); grey dashed line: the attainment target. "
    "Rates in real-world req/s.",
    "deployment_goodput": "Goodput per GPU of each placement deployment: measured beside the "
    "simulator's prediction (hatched).",
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


def _html_block(block: tuple, svgs: dict[str, str]) -> str:
    match block:
        case ("title", text):
            return f"<h1>{_esc(text)}</h1>"
        case ("h2" | "h3" as tag, text):
            return f"<{tag}>{_esc(text)}</{tag}>"
        case ("banner" | "note" as kind, text):
            return f'<p class="{"emulated" if kind == "banner" else "note"}">{_esc(text)}</p>'
        case ("meta", rows):
            body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
            return f'<table class="meta"><tbody>{body}</tbody></table>'
        case ("table", header, rows):
            return _html_table(header, rows)
        case ("errors", errors):
            items = "".join(f"<li>{n} × <code>{_esc(e)}</code></li>" for e, n in errors)
            return f'<p class="note">Most common errors:</p><ul>{items}</ul>'
        case ("plots", drawn):
            figures = [
                f'<figure id="{name}">{svgs[name]}<figcaption>{_esc(CAPTIONS[name])}'
                "</figcaption></figure>"
                for name, _ in drawn
            ]
            return '<div class="plots">\n' + "\n".join(figures) + "\n</div>"
    raise ValueError(f"unknown report block {block[0]!r}")


def render_html(result: dict) -> str:
    """The whole report as one HTML document with nothing to fetch."""
    return _html(result, plot_svgs(result))


def _html(result: dict, svgs: dict[str, str]) -> str:
    head = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # The report must never reach out: forbid every fetch; inline styles only, no scripts.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(_title(result))}</title>",
        f"<style>{CSS}</style></head><body>",
    ]
    body = [_html_block(b, svgs) for b in report_blocks(result, svgs)]
    return "\n".join([*head, *body, "</body></html>"]) + "\n"


# ---------------------------------------------------------------- Markdown


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """A GFM table; numeric right-aligns every column but the first."""
    lines = ["| " + " | ".join(_md_esc(h) for h in header) + " |"]
    align = " ---: " if numeric else " --- "
    lines.append("|" + "|".join([" --- "] + [align] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(_md_esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


HEADING_MARKS = {"title": "#", "h2": "##", "h3": "###"}


def _md_block(block: tuple, svg_paths: dict[str, Path], link_prefix: str) -> str:
    match block:
        case ("title" | "h2" | "h3" as kind, text):
            return f"{HEADING_MARKS[kind]} {_md_esc(text)}"
        case ("banner", text):
            return f"> **{_md_esc(text)}**"
        case ("note", text):
            return f"_{_md_esc(text)}_"
        case ("meta", rows):
            return _md_table(["", ""], rows, numeric=False)
        case ("table", header, rows):
            return _md_table(header, rows)
        case ("errors", errors):
            return "Most common errors:\n\n" + "\n".join(f"- {n} × {_md_esc(e)}" for e, n in errors)
        case ("plots", drawn):
            return "\n\n".join(
                f"![{_md_esc(title)}]({quote(link_prefix + svg_paths[name].name)})\n\n"
                + CAPTIONS[name]
                for name, title in drawn
            )
    raise ValueError(f"unknown report block {block[0]!r}")


def write_svgs(svgs: dict[str, str], svg_dir: Path) -> dict[str, Path]:
    """svg_dir/<plot>.svg for each plot drawn; a plot not drawn this time (no breakdown) loses
    its file from an earlier report so nothing stale is left to be mistaken for this one."""
    svg_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in PLOTS:
        path = svg_dir / f"{name}.svg"
        if name in svgs:
            path.write_text(svgs[name], encoding="utf-8")
            paths[name] = path
        else:
            path.unlink(missing_ok=True)
    return paths


def render_markdown(result: dict, svg_dir: Path, link_prefix: str = "") -> str:
    """The report as Markdown; writes the plots as svg_dir/<plot>.svg and links them as
    link_prefix + "<plot>.svg" (so link_prefix is svg_dir relative to the Markdown file)."""
    return _markdown(result, write_svgs(plot_svgs(result), Path(svg_dir)), link_prefix)


def _markdown(result: dict, svg_paths: dict[str, Path], link_prefix: str) -> str:
    blocks = report_blocks(result, svg_paths)
    return "\n\n".join(_md_block(b, svg_paths, link_prefix) for b in blocks) + "\n"


def write_reports(result: dict, out_dir: Path, stem: str = "report") -> dict[str, Path]:
    """Write out_dir/stem.html, out_dir/stem.md and its plots in out_dir/stem_svg/. Returns
    {"html": .., "md": .., "<plot>": ..svg} (a per-stem SVG folder so reports can share a dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out_dir / f"{stem}.html", out_dir / f"{stem}.md"
    svgs = plot_svgs(result)  # drawn once for both reports
    html_path.write_text(_html(result, svgs), encoding="utf-8")
    svg_paths = write_svgs(svgs, out_dir / f"{stem}_svg")
    md_path.write_text(_markdown(result, svg_paths, f"{stem}_svg/"), encoding="utf-8")
    return {"html": html_path, "md": md_path, **svg_paths}


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
