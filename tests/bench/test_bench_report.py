"""The goodput benchmark's HTML/Markdown report (cluster.bench.html_report): on synthetic serve
and compare results (random but plausible, with failures, repeated trials and nulls) every plot
is drawn, the numbers and names show up escaped, the SVGs are well-formed XML, odd inputs do
not crash, placement deployments and emulated runs are shown and labelled, re-rendering gives
the same SVG text, and headless Chromium opens the HTML without console errors and paints the
plots (skipped only where no Chromium is installed; CI installs Debian's `chromium`)."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from cluster.bench import html_report
from cluster.bench.html_report import render_html, render_markdown, write_reports

pytestmark = pytest.mark.timeout(120)

SLO = {"ttft_s": 0.5, "tpot_s": 0.05, "attainment": 0.9}


# ---------------------------------------------------------------- synthetic results


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _latency_stats(name: str, values_s: list[float]) -> dict:
    ms = [1000 * v for v in values_s]
    return {
        f"mean_{name}_ms": float(np.mean(ms)) if ms else None,
        f"median_{name}_ms": _percentile(ms, 50),
        f"p90_{name}_ms": _percentile(ms, 90),
        f"p99_{name}_ms": _percentile(ms, 99),
    }


def make_run(
    rng: random.Random, rate: float, capacity: float, n: int, breakdown: bool, colocated: bool
) -> dict:
    """One offered rate: queueing grows like rho / (1 - rho), failures appear near capacity."""
    rho = min(rate / capacity, 0.97)
    queue_s, prefill_s = 0.02 * rho / (1 - rho), 0.03
    transfer_s, first_decode_s = (0.0 if colocated else 0.002), 0.004
    fail_p = 0.25 * max(0.0, rho - 0.7)
    ttfts, tpots, e2els, itls, errors, in_lens, out_lens = [], [], [], [], [], [], []
    for _ in range(n):
        in_len, out_len = rng.randint(20, 400), rng.randint(1, 100)
        in_lens.append(in_len)
        out_lens.append(out_len)
        if rng.random() < fail_p:
            for lst in (ttfts, tpots, e2els):
                lst.append(None)
            itls.append([])
            errors.append("StatusCode.UNAVAILABLE: <upstream> connect failed & retried")
            continue
        ttft = (
            (queue_s * rng.expovariate(1.0) + prefill_s * in_len / 189) * rng.lognormvariate(0, 0.2)
            + transfer_s
            + first_decode_s
        )
        tpot = 0.02 * (1 + rho) * rng.lognormvariate(0, 0.25)
        gaps = [tpot * rng.lognormvariate(0, 0.1) for _ in range(out_len - 1)]
        ttfts.append(ttft)
        # TPOT is undefined for a one-token output: null without an error.
        tpots.append(sum(gaps) / len(gaps) if gaps else None)
        e2els.append(ttft + sum(gaps))
        itls.append(gaps)
        errors.append("")
    ok = [i for i, e in enumerate(errors) if not e]
    met_ttft = [i for i in ok if ttfts[i] <= SLO["ttft_s"]]
    met_tpot = [i for i in ok if tpots[i] is None or tpots[i] <= SLO["tpot_s"]]
    good = set(met_ttft) & set(met_tpot)
    duration = n / rate
    run = {
        "request_rate": rate,
        "duration": duration,
        "num_prompts": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "request_throughput": len(ok) / duration,
        "request_goodput": len(good) / duration,
        "output_throughput": sum(out_lens[i] for i in ok) / duration,
        "attainment": len(good) / n,
        "ttft_attainment": len(met_ttft) / n,
        "tpot_attainment": len(met_tpot) / n,
        "breakdown_ms": None,
        "ttfts": ttfts,
        "tpots": tpots,
        "e2els": e2els,
        "itls": itls,
        "errors": errors,
        "input_lens": in_lens,
        "output_lens": out_lens,
    }
    run |= _latency_stats("ttft", [ttfts[i] for i in ok])
    run |= _latency_stats("tpot", [t for t in tpots if t is not None])
    run |= _latency_stats("itl", [g for gaps in itls for g in gaps])
    run |= _latency_stats("e2el", [e2els[i] for i in ok])
    if breakdown:
        run["breakdown_ms"] = {
            "queue": 1000 * queue_s,
            "prefill": 1000 * prefill_s,
            "transfer": 1000 * transfer_s,
            "first_decode": 1000 * first_decode_s,
        }
    return run


def make_serve(
    seed: int = 0,
    mode: str = "disaggregated",
    rates: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
    trials: int = 1,
    n: int = 60,
    breakdown: bool = True,
    prediction: bool = True,
    model_id: str = "tiny-llama-v1",
    capacity: float = 5.0,
) -> dict:
    rng = random.Random(seed)
    colocated = mode == "colocated"
    runs = [
        make_run(rng, r, capacity, n, breakdown, colocated) for r in rates for _ in range(trials)
    ]
    curve = []
    for rate in sorted(set(rates)):
        same = [r for r in runs if r["request_rate"] == rate]
        curve.append(
            {
                "rate": rate,
                "trials": len(same),
                **{
                    k: sum(r[k] for r in same) / len(same)
                    for k in ("attainment", "ttft_attainment", "tpot_attainment")
                },
            }
        )
    met = [p["rate"] for p in curve if p["attainment"] >= SLO["attainment"]]
    num_gpus = 2 if mode == "disaggregated" else 1
    goodput = max(met) if met else None
    return {
        "date": "2026-11-21T10:00:00",
        "backend": "grpc",
        "target": "127.0.0.1:50051",
        "model_id": model_id,
        "mode": mode,
        "num_gpus": num_gpus,
        "workload": {"name": "chatbot", "mean_input_len": 189, "mean_output_len": 50},
        "slo": dict(SLO),
        "runs": runs,
        "attainment_curve": curve,
        "goodput_rps": goodput,
        "goodput_per_gpu": None if goodput is None else goodput / num_gpus,
        "prediction": (
            [{"rate": p["rate"], "attainment": min(1.0, p["attainment"] + 0.03)} for p in curve]
            if prediction
            else None
        ),
    }


def make_deployments(names: tuple[str, ...] = ("2P1D", "1P1D")) -> list[dict]:
    """The `deployments` a placement check writes: measured vs the simulator's prediction."""
    deps = []
    for i, name in enumerate(names):
        capacity = 6.0 - 2 * i
        curve = [
            {
                "rate": rate,
                "attainment": min(1.0, max(0.0, 1.6 - rate / capacity)),
                "predicted_attainment": min(1.0, max(0.0, 1.7 - rate / capacity)),
            }
            for rate in (1.0, 2.0, 4.0, 6.0, 8.0)
        ]
        deps.append(
            {
                "name": name,
                "goodput_per_gpu": capacity / 3,
                "predicted_goodput_per_gpu": capacity / 2.7,
                "curve": curve,
            }
        )
    return deps


def make_compare(seed: int = 0, names: tuple[str, str] = ("disaggregated", "colocated")) -> dict:
    disagg = make_serve(seed, "disaggregated", capacity=6.0)
    coloc = make_serve(seed + 1, "colocated", capacity=3.5, prediction=False)
    ratio = disagg["goodput_per_gpu"] / coloc["goodput_per_gpu"]
    return {
        "compare": True,
        "date": "2026-11-21T10:00:00",
        "results": {names[0]: disagg, names[1]: coloc},
        "goodput_per_gpu_ratio": ratio,
    }


# ---------------------------------------------------------------- helpers


def svg_blocks(html_text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", html_text, flags=re.S)


def assert_well_formed(svgs: list[str]) -> None:
    """Parsing as XML proves every name and label was escaped (and the SVGs are valid)."""
    for svg in svgs:
        ET.fromstring(svg)


def render_all(result: dict, tmp_path: Path) -> tuple[str, str]:
    html_text = render_html(result)
    md_text = render_markdown(result, tmp_path / "svg", "svg/")
    assert_well_formed(svg_blocks(html_text))
    assert_well_formed([p.read_text() for p in (tmp_path / "svg").glob("*.svg")])
    return html_text, md_text


# ---------------------------------------------------------------- unit tests


def test_serve_report_has_header_summary_runs_and_four_plots(tmp_path: Path) -> None:
    result = make_serve(trials=2)
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.count("<svg") == 4
    for plot in ("attainment", "ttft_cdf", "tpot_cdf", "breakdown"):
        assert f'<figure id="{plot}">' in html_text
        assert f"svg/{plot}.svg" in md_text
    assert "<title>Goodput benchmark: tiny-llama-v1</title>" in html_text
    assert result["goodput_rps"] is not None
    for text in (html_text, md_text):
        assert f"{result['goodput_rps']:.2f}" in text
        assert f"{result['goodput_per_gpu']:.2f}" in text
        assert "chatbot" in text and "TTFT ≤ 500 ms" in text and "127.0.0.1:50051" in text
        for run in result["runs"]:  # the runs table: p90s and completed/failed of every trial
            assert f"{run['p90_ttft_ms']:.1f}" in text
            assert f"{run['completed']} / {run['failed']}" in text
    # The prediction (dashed) and the target line (dashed) are drawn.
    assert "disaggregated predicted" in html_text and "target 90%" in html_text


def test_numbers_are_laid_out_in_the_summary_table() -> None:
    result = make_serve()
    header, rows = html_report.summary_table(result)
    assert header == ["", "disaggregated"]
    assert rows[0] == ["Goodput (req/s)", f"{result['goodput_rps']:.2f}"]
    assert rows[1] == ["Goodput per GPU (req/s)", f"{result['goodput_per_gpu']:.2f}"]


def test_every_string_is_escaped(tmp_path: Path) -> None:
    result = make_compare(names=("dis<b>agg", 'co"lo&c'))
    for serve in result["results"].values():
        serve["model_id"] = "<script>alert('x')</script>"
        serve["workload"]["name"] = "chat & <i>bot</i>"
    html_text, md_text = render_all(result, tmp_path)
    assert "<script" not in html_text and "<script" not in md_text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text
    assert "chat &amp; &lt;i&gt;bot&lt;/i&gt;" in html_text
    assert "dis&lt;b&gt;agg" in html_text and "co&quot;lo&amp;c" in html_text
    # error messages from the runs (with < and &) are listed escaped
    assert "&lt;upstream&gt; connect failed &amp; retried" in html_text
    assert "<b>" not in html_text and "<i>" not in md_text


def test_html_is_self_contained() -> None:
    html_text = render_html(make_compare())
    assert "<script" not in html_text and "<link" not in html_text and "@import" not in html_text
    assert not re.search(r"\bsrc\s*=", html_text)
    # matplotlib reuses markers through xlink:href="#id": in-page references only
    assert re.findall(r"\bhref\s*=\s*\"(.)", html_text) and not re.search(
        r"\bhref\s*=\s*\"(?!#)", html_text
    )
    assert not re.search(r"url\((?!#)", html_text)  # only url(#clip-id) references
    assert "Content-Security-Policy" in html_text
    # the only http URLs are the SVG and XLink namespace names, which are never fetched
    assert set(re.findall(r"https?://[^\"' ]+", html_text)) == {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }


def test_compare_renders_both_deployments_and_the_ratio(tmp_path: Path) -> None:
    result = make_compare()
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.count("<svg") == 4
    assert "<h3>disaggregated</h3>" in html_text and "<h3>colocated</h3>" in html_text
    header, rows = html_report.summary_table(result)
    assert header == ["", "disaggregated", "colocated"]
    assert rows[-1][:2] == [
        "Goodput per GPU ratio (disaggregated ÷ colocated)",
        f"{result['goodput_per_gpu_ratio']:.2f}",
    ]
    for text in (html_text, md_text):
        assert f"{result['goodput_per_gpu_ratio']:.2f}" in text
        for serve in result["results"].values():
            assert f"{serve['goodput_per_gpu']:.2f}" in text
    attainment = html_report.attainment_svg(result)
    assert "disaggregated measured" in attainment and "colocated measured" in attainment
    # CDFs: one curve per deployment, at the rate nearest its goodput
    ttft = html_report.cdf_svg(result, "ttft")
    for name, serve in result["results"].items():
        assert f"{name} @ {html_report.goodput_rate(serve):g} req/s" in ttft


def _edge_cases() -> dict[str, dict]:
    base = make_serve(n=8, rates=(1.0, 2.0, 3.0))
    cases: dict[str, dict] = {"empty dict": {}, "compare of nothing": {"compare": True}}
    cases["no runs"] = base | {"runs": [], "attainment_curve": [], "goodput_rps": None}
    cases["single run"] = base | {"runs": base["runs"][:1], "attainment_curve": None}
    all_failed = copy.deepcopy(base)
    for run in all_failed["runs"]:
        run["ttfts"] = [None] * len(run["ttfts"])
        run["tpots"] = [None] * len(run["tpots"])
        run["errors"] = ["timeout"] * len(run["ttfts"])
        run["p90_ttft_ms"] = run["attainment"] = None
    all_failed["goodput_rps"] = all_failed["goodput_per_gpu"] = None
    cases["all failed"] = all_failed
    nulls = copy.deepcopy(base)
    nulls |= {"slo": None, "workload": None, "num_gpus": None, "prediction": None}
    for run in nulls["runs"]:
        run |= {"ttfts": None, "tpots": [], "errors": None, "breakdown_ms": None}
        run |= {"request_rate": run["request_rate"], "duration": float("nan")}
    cases["nulls and NaN"] = nulls
    partial = copy.deepcopy(base)
    partial["runs"][0]["breakdown_ms"] = None
    partial["runs"][1]["breakdown_ms"] = {"queue": None, "prefill": 3.0, "kv_wait": 1.0}
    cases["partial breakdown"] = partial
    cases["zero rates"] = base | {"runs": [r | {"request_rate": 0.0} for r in base["runs"]]}
    return cases


@pytest.mark.parametrize("case", list(_edge_cases()))
def test_odd_inputs_do_not_crash(case: str, tmp_path: Path) -> None:
    result = _edge_cases()[case]
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.startswith("<!DOCTYPE html>") and "<title>" in html_text
    assert html_text.count("<svg") >= 3  # attainment and the two CDFs are always drawn
    assert md_text.startswith("# Goodput")


def test_null_breakdown_is_omitted_with_a_note(tmp_path: Path) -> None:
    result = make_serve(breakdown=False)
    result["backend"] = "openai"
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.count("<svg") == 3 and 'id="breakdown"' not in html_text
    assert html_report.NO_BREAKDOWN in html_text and html_report.NO_BREAKDOWN in md_text
    assert "breakdown.svg" not in md_text


def test_failed_requests_cap_the_cdf_below_one() -> None:
    run = {"ttfts": [0.1, None, 0.2, 0.3], "errors": ["", "boom", "", ""], "tpots": [None] * 4}
    values, total = html_report.latency_samples([run], "ttfts")
    assert values == pytest.approx([100.0, 200.0, 300.0]) and total == 4
    points = html_report._cdf_points(values, total)
    assert points[-1][1] == pytest.approx(0.75)
    # a null TPOT without an error (one output token) is undefined, not a failure
    assert html_report.latency_samples([run], "tpots") == ([], 1)


def test_svgs_are_deterministic_and_their_ids_unique_in_the_page() -> None:
    result = make_compare() | {"deployments": make_deployments()}
    svgs = html_report.plot_svgs(result)
    assert len(svgs) == 6 and svgs == html_report.plot_svgs(result)
    for svg in svgs.values():  # no timestamp or version stamped into the file
        assert "<metadata" not in svg and "Matplotlib v" not in svg and "dc:date" not in svg
        assert "<text" in svg  # svg.fonttype none: text stays text, not glyph outlines
    ids = re.findall(r'\bid="([^"]+)"', render_html(result))
    assert len(ids) > 100 and len(ids) == len(set(ids))


def test_names_that_look_like_tex_or_hidden_labels_are_drawn_verbatim(tmp_path: Path) -> None:
    """Matplotlib would parse "$...$" as mathtext (and fail on bad TeX) and drops legend
    labels that start with "_"."""
    names = ("_under", r"$\frac{1}{$ & <x>")
    result = make_compare(names=names) | {"deployments": make_deployments(names)}
    render_all(result, tmp_path)
    attainment = html_report.attainment_svg(result)
    assert "_under measured" in attainment and r"$\frac{1}{$ &amp; &lt;x&gt; measured" in attainment
    assert r"$\frac{1}{$ &amp; &lt;x&gt; predicted" in html_report.deployment_attainment_svg(result)


def test_write_reports_links_resolve_and_leave_nothing_stale(tmp_path: Path) -> None:
    paths = write_reports(make_serve(), tmp_path, stem="run1")
    assert set(paths) == {"html", "md", "attainment", "ttft_cdf", "tpot_cdf", "breakdown"}
    md_text = paths["md"].read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md_text)
    assert len(links) == 4 and all((tmp_path / link).is_file() for link in links)
    # rewritten without a breakdown: the old breakdown.svg must not linger
    paths = write_reports(make_serve(breakdown=False), tmp_path, stem="run1")
    assert "breakdown" not in paths and not (tmp_path / "run1_svg" / "breakdown.svg").exists()


def test_cli_writes_reports(tmp_path: Path) -> None:
    src = tmp_path / "result.json"
    src.write_text(json.dumps(make_compare()))
    assert html_report.main([str(src), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()


# ---------------------------------------------------------------- headless Chromium


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROME_BIN"), "chromium", "chromium-browser", "google-chrome"):
        path = name and shutil.which(name)
        if path:
            return path
    return None


def screenshot(html_path: Path, png: Path, tmp_path: Path, size: str) -> list[str]:
    """Render html_path headless into png; return the page's console messages. Chromium logs
    them to stderr as `...:INFO:CONSOLE:<line>] "message", source: ...` (older versions:
    `CONSOLE(<line>)`), uncaught exceptions included."""
    binary = find_chromium()
    assert binary is not None
    cmd = [
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", f"--window-size={size}", f"--screenshot={png}",
        html_path.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.is_file(), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]


def decode_png(path: Path) -> np.ndarray:
    """(height, width, channels) uint8 pixels of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    rows = raw.reshape(height, width * bpp + 1)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    prev = np.zeros(width * bpp, dtype=np.uint8)
    for y in range(height):
        out[y] = _unfilter(rows[y, 0], rows[y, 1:], prev, bpp)
        prev = out[y]
    return out.reshape(height, width, bpp)


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one scanline's PNG filter (all arithmetic mod 256). None, Sub and Up vectorise;
    Average and Paeth depend on the byte just decoded, so they loop in plain Python (Chromium
    Paeth-filters about a third of a report's rows: ~1 s for 1280x2400)."""
    if kind == 0:
        return line
    if kind == 1:  # cumulative sum per channel along the row, wrapping in uint8
        return np.add.accumulate(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind == 2:
        return line + prev
    cur, up = list(line.tobytes()), prev.tobytes()
    for i in range(bpp):  # no left neighbour: both predictors reduce to Up (halved for Average)
        cur[i] = (cur[i] + (up[i] >> 1 if kind == 3 else up[i])) & 0xFF
    for i in range(bpp, len(cur)):
        a, b = cur[i - bpp], up[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 0xFF
            continue
        c = up[i - bpp]
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)  # |p-a|, |p-b|, |p-c|
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return np.array(cur, dtype=np.uint8)


def _pixels_near(rgb: np.ndarray, hex_colour: str, tol: int = 12) -> int:
    """Pixels within tol per channel of the colour (anti-aliased edges fall outside)."""
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    return int((np.abs(rgb.astype(np.int16, copy=False) - target).max(axis=-1) <= tol).sum())


needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no chromium/chromium-browser/google-chrome on PATH "
    "(CI: apt-get install -y --no-install-recommends chromium)",
)


@needs_chromium
def test_decoder_and_console_capture_on_a_page_with_a_js_error(tmp_path: Path) -> None:
    """The checks below are not vacuous: a page that throws is caught, its pixels decode."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><title>bad</title></head><body style="margin:0">'
        '<div style="width:100px;height:50px;background:#0072B2"></div>'
        "<script>undefinedFunction();</script></body></html>"
    )
    messages = screenshot(page, tmp_path / "bad.png", tmp_path, "320,200")
    assert any("Uncaught ReferenceError" in m for m in messages), messages
    rgb = decode_png(tmp_path / "bad.png")[..., :3]
    assert rgb.shape == (200, 320, 3)
    assert _pixels_near(rgb, "#0072B2", tol=2) == pytest.approx(100 * 50, rel=0.05)


@needs_chromium
@pytest.mark.parametrize("kind", ["serve", "compare"])
def test_chromium_renders_the_report(kind: str, tmp_path: Path) -> None:
    result = make_serve(trials=2) if kind == "serve" else make_compare()
    paths = write_reports(result, tmp_path / "out")
    png = tmp_path / "report.png"
    messages = screenshot(paths["html"], png, tmp_path, "1280,2400")
    assert messages == [], messages  # the page has no scripts: any console message is a bug
    rgb = decode_png(png)[..., :3]
    assert rgb.shape[:2] == (2400, 1280)
    non_white = float((rgb.min(axis=-1) < 245).mean())
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8)
    colours = len(np.unique(packed | rgb[..., 2]))
    assert non_white > 0.04 and colours > 300, (non_white, colours)
    # The plots are painted: series colours (curves, markers) and the breakdown's bars (queue
    # grey, prefill blue) each cover real area; a serve result has one CDF curve per rate.
    expected = ["#0072B2", "#E69F00", "#999999", "#C00000"]
    if kind == "serve":
        expected += ["#009E73", "#D55E00", "#CC79A7"]
    signed = rgb.astype(np.int16)
    counts = {c: _pixels_near(signed, c) for c in expected}
    assert min(counts.values()) > 120, counts  # measured: 180 (dashed SLO line) to 20,000


def test_slo_scale_goodputs_are_in_the_summary():
    result = {
        "mode": "disaggregated", "model_id": "m", "slo": {"ttft_s": 0.2, "tpot_s": 0.02},
        "runs": [], "goodput_rps": 3.0, "goodput_per_gpu": 1.5, "num_gpus": 2,
        "slo_scale": [{"scale": 0.5, "goodput_rps": 1.25}, {"scale": 2.0, "goodput_rps": 6.5}],
    }  # fmt: skip
    _, rows = html_report.summary_table(result)
    labels = {row[0]: row[1] for row in rows}
    assert labels["Goodput at 0.5x SLOs (req/s)"] == "1.25"
    assert labels["Goodput at 2x SLOs (req/s)"] == "6.50"
    assert "Goodput at 2x SLOs" in html_report.render_html(result)


# ---------------------------------------------------------------- placement deployments, emulation


def test_deployments_get_their_plots_and_table(tmp_path: Path) -> None:
    result = make_serve() | {"deployments": make_deployments()}
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.count("<svg") == 6
    for plot in ("deployment_attainment", "deployment_goodput"):
        assert f'<figure id="{plot}">' in html_text and f"svg/{plot}.svg" in md_text
    for text in (html_text, md_text):
        assert "Deployments: measured vs predicted" in text
        for dep in result["deployments"]:
            ratio = dep["goodput_per_gpu"] / dep["predicted_goodput_per_gpu"]
            for value in (dep["goodput_per_gpu"], dep["predicted_goodput_per_gpu"], ratio):
                assert f"{value:.2f}" in text
    attainment = html_report.deployment_attainment_svg(result)
    for name in ("2P1D", "1P1D"):
        assert f"{name} measured" in attainment and f"{name} predicted" in attainment
    # dashed: one predicted curve per deployment and the target, which is result["slo"]'s
    assert attainment.count("stroke-dasharray") >= 3 and "target 90%" in attainment
    goodput = html_report.deployment_goodput_svg(result)
    assert "measured" in goodput and "predicted" in goodput
    assert f"{result['deployments'][0]['goodput_per_gpu']:.2f}" in goodput  # bar labels


def test_deployments_alone_leave_out_the_serve_sections(tmp_path: Path) -> None:
    """A placement check without runs; its target defaults to 90%; missing numbers are dashes."""
    deps = make_deployments()
    deps[1] |= {"goodput_per_gpu": None, "curve": [{"rate": 1.0, "attainment": None}, "junk"]}
    result = {"model_id": "m", "deployments": deps + [{}, "junk"]}
    html_text, md_text = render_all(result, tmp_path)
    assert html_text.count("<svg") == 2 and "Runs" not in html_text and "Summary" not in md_text
    assert "target 90%" in html_report.deployment_attainment_svg(result)
    rows = html_report.deployment_rows(result)
    assert rows[1][1:] == ["—", f"{deps[1]['predicted_goodput_per_gpu']:.2f}", "—"]
    assert rows[2][0] == "deployment 3" and rows[3][1:] == ["—", "—", "—"]
    result["slo"] = {"attainment": 0.75}
    assert "target 75%" in html_report.deployment_attainment_svg(result)


def test_emulated_numbers_are_labelled_everywhere(tmp_path: Path) -> None:
    result = make_serve() | {"deployments": make_deployments()}
    result["emulated"] = {"hardware": "A100-80GB", "time_scale": 8, "note": None}
    label = "emulated A100-80GB, time scale 8"
    assert html_report.emulation(result) == label
    html_text, md_text = render_all(result, tmp_path)
    assert f"<title>Goodput benchmark: tiny-llama-v1 ({label})</title>" in html_text
    assert md_text.startswith(f"# Goodput benchmark: tiny-llama-v1 ({label})")
    for text in (html_text, md_text):
        for heading in ("Deployments: measured vs predicted", "Summary", "Runs"):
            assert f"{heading} ({label})" in text
        assert f"Not measured on real hardware: every number here is {label}." in text
    for svg in html_report.plot_svgs(result).values():
        assert label in svg
    assert html_report.emulation(make_serve()) is None
    assert "real hardware" not in render_html(make_serve())
