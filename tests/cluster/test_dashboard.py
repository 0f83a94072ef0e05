"""The Grafana dashboard (deploy/grafana/pd-cluster.json): its panels and template variables
are well formed, and every metric, label and bucket boundary its PromQL names exists in a live
`/metrics` scrape of a real `cluster serve` (tiny model, 1 prefill + 1 decode) that has served
a few disaggregated requests. No Prometheus runs here: what is checked is the names, not the
query results."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "pd-cluster.json"
ROUTER_METRICS = REPO_ROOT / "cluster" / "router" / "metrics.py"
# Shown before the code exports it: allowed to be missing from the scrape only while the code
# does not define it.
EXPECTED_SOON = {"pdcluster:requests_failed_total": ROUTER_METRICS}
# Labels Prometheus or the PodMonitor add at scrape time. Not `instance`: the PodMonitor honors
# the exposition's (the pd-cluster instance id), so a metric without one gets the pod address.
TARGET_LABELS = {"job", "namespace", "pod", "container", "endpoint"}

PROMQL_FUNCTIONS = {
    *("sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk"),
    *("quantile", "count_values", "rate", "irate", "increase", "delta", "idelta", "deriv"),
    *("histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction"),
    *("clamp", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "sqrt", "exp", "ln"),
    *("log2", "log10", "scalar", "vector", "time", "timestamp", "label_replace", "label_join"),
    *("sort", "sort_desc", "absent", "absent_over_time", "changes", "resets", "predict_linear"),
    *("avg_over_time", "min_over_time", "max_over_time", "sum_over_time", "count_over_time"),
    *("quantile_over_time", "last_over_time", "start", "end"),
}
PROMQL_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"),
    *("and", "or", "unless", "atan2", "inf", "nan"),
}
_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`'
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SELECTOR = re.compile(rf"({_NAME})\s*\{{((?:{_STRING}|[^}}\"'`])*)\}}")
_MATCHER = re.compile(rf"(\w+)\s*(=~|!~|!=|=)\s*({_STRING})")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")


# --- reading PromQL ------------------------------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not inside a string, a
    label matcher, a range or a grouping list, and are neither a keyword nor a function."""
    text = re.sub(_STRING, '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in re.finditer(rf"\$\{{?\w+\}}?|\d[\w.]*|{_NAME}", text):
        token = match.group()
        if token[0] == "$" or token[0].isdigit() or token.lower() in PROMQL_KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            assert token in PROMQL_FUNCTIONS, f"unknown PromQL function {token!r} in {expr!r}"
            continue
        names.add(token)
    return names


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, op, value)]) for every `metric{...}` of an expression."""
    found = []
    for name, body in _SELECTOR.findall(expr):
        matchers = [(label, op, value[1:-1]) for label, op, value in _MATCHER.findall(body)]
        found.append((name, matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    lists = _GROUPING.findall(re.sub(_STRING, '""', expr))
    return {label.strip() for labels in lists for label in labels.split(",") if label.strip()}


def test_reading_promql_skips_strings_matchers_functions_and_keywords():
    expr = (
        'sum by (le, role) (rate(vllm:a_bucket{role="x{y}", le="$t", q=~"rate(b)"}[5m]))\n'
        "/ on (job) group_left (instance) b:c_total offset 1h > 0.5 and count(d) or vector(1)"
    )
    assert metric_names(expr) == {"vllm:a_bucket", "b:c_total", "d"}
    assert selectors(expr) == [
        ("vllm:a_bucket", [("role", "=", "x{y}"), ("le", "=", "$t"), ("q", "=~", "rate(b)")])
    ]
    assert grouping_labels(expr) == {"le", "role", "job", "instance"}
    with pytest.raises(AssertionError, match="unknown PromQL function 'rat'"):
        metric_names("rat(x[5m])")


# --- the dashboard by itself ---------------------------------------------------------------------


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return panels


def all_targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in all_panels(dashboard) for t in p.get("targets", [])]


def variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for item in items for s in _strings(item)]


def test_panels_have_titles_and_queries():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = all_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel.get("title", "").strip(), panel
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), f"{panel['title']}: a target without expr"
            assert metric_names(target["expr"]), f"{panel['title']}: no metric in {target}"


def test_every_variable_used_is_defined():
    dashboard = load_dashboard()
    defined = variables(dashboard)
    assert defined["datasource"]["type"] == "datasource"
    assert defined["datasource"]["query"] == "prometheus"
    used = set()
    for text in _strings(dashboard):
        used |= {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}
    builtins = {name for name in used if name.startswith("__")}  # $__rate_interval, $__range...
    assert used - builtins <= set(defined), used - builtins - set(defined)
    assert {"ttft_target", "itl_target", "e2e_target", "instance", "role"} <= used
    for var in defined.values():
        if var["type"] == "custom":
            values = [o["value"] for o in var["options"]]
            assert var["query"].split(",") == values and var["current"]["value"] in values


def test_every_query_parses():
    parser = pytest.importorskip(
        "promql_parser", reason="PromQL syntax check: pip install promql-parser"
    )
    dashboard = load_dashboard()
    samples = {"__rate_interval": "1m", "__range": "1h", "slo_window": "5m"}
    for name, var in variables(dashboard).items():
        samples.setdefault(name, var["current"].get("value") or ".*")
    for title, target in all_targets(dashboard):
        expr = _VARIABLE.sub(
            lambda m: str(samples[next(g for g in m.groups() if g)]), target["expr"]
        )
        try:
            parser.parse(expr)
        except Exception as e:  # noqa: BLE001 - the parser's error type is internal
            pytest.fail(f"{title}: {expr!r}: {e}")


# --- against a live scrape -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scrape() -> dict[str, dict[str, list[dict]]]:
    """sample name -> the label sets of its samples, from a cluster that served 3 requests
    (disaggregated: each moved its KV over NIXL). A family with no sample yet (a counter with
    labels, before its first increment) maps its sample names to []."""
    from cluster.bench.local_cluster import LocalCluster

    config = {"mode": "disaggregated", "engine": {"num_blocks": 128}}
    with LocalCluster(config) as cluster:
        model = _get_json(f"{cluster.http_url}/models")["data"][0]["id"]
        for i in range(3):
            body = {"model": model, "prompt": f"Once upon a time {i}", "max_tokens": 8}
            assert _post_json(f"{cluster.http_url}/completions", body)["choices"]
        url = cluster.http_url.removesuffix("/v1") + "/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    return _sample_table(text)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def _sample_table(text: str) -> dict[str, list[dict]]:
    table: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            table.setdefault(family.name + suffix, [])
        for sample in family.samples:
            table.setdefault(sample.name, []).append(sample.labels)
    return table


def _expected_missing(name: str) -> bool:
    """A metric the dashboard shows ahead of the code: missing is fine while no code defines
    it; once the code does, it must be scraped like any other."""
    source = EXPECTED_SOON.get(name)
    return source is not None and name.removesuffix("_total") not in source.read_text()


def test_every_metric_is_exported(scrape):
    missing = {}
    for title, target in all_targets(load_dashboard()):
        for name in metric_names(target["expr"]):
            if name not in scrape and not _expected_missing(name):
                missing.setdefault(name, []).append(title)
    assert not missing, f"metrics no served cluster exports: {missing}"


def test_every_label_matched_exists(scrape):
    problems = []
    for title, target in all_targets(load_dashboard()):
        expr = target["expr"]
        names = metric_names(expr)
        if all(scrape.get(n) for n in names):  # else some labels are unknown until a sample
            known = TARGET_LABELS | {k for n in names for labels in scrape[n] for k in labels}
            problems += [f"{title}: by ({label})" for label in grouping_labels(expr) - known]
        for name, matchers in selectors(expr):
            problems += _matcher_problems(title, name, matchers, scrape.get(name))
    assert not problems, "\n".join(problems)


def _matcher_problems(title: str, name: str, matchers: list, samples: list | None) -> list[str]:
    if not samples:  # expected-missing, or a labelled counter with no sample yet
        return []
    problems = []
    for label, op, value in matchers:
        values = {labels.get(label) for labels in samples}
        if label not in TARGET_LABELS and values == {None}:
            problems.append(f"{title}: {name} has no label {label!r}")
        elif op == "=" and "$" not in value and label not in TARGET_LABELS and value not in values:
            problems.append(f"{title}: {name}{{{label}={value!r}}} matches nothing")
    return problems


def test_slo_targets_are_bucket_boundaries(scrape):
    """`le="$ttft_target"` selects one bucket: every option must be a boundary of that
    histogram, written as the exposition writes it ("1.0", not "1")."""
    dashboard, checked = load_dashboard(), set()
    options = {name: [o["value"] for o in v.get("options", [])]
               for name, v in variables(dashboard).items()}  # fmt: skip
    for title, target in all_targets(dashboard):
        for name, matchers in selectors(target["expr"]):
            for label, _, value in matchers:
                var = re.fullmatch(r"\$(\w+)", value)
                if label != "le" or var is None:
                    continue
                boundaries = {labels["le"] for labels in scrape[name]}
                assert set(options[var.group(1)]) <= boundaries, (title, name, var.group(1))
                checked.add(var.group(1))
    assert checked == {"ttft_target", "itl_target", "e2e_target"}
