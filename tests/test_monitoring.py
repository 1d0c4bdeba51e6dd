"""The monitoring pack: monitoring/grafana-dashboard.json and monitoring/alerts.yml.

Every PromQL expression is parsed (``promql-parser``, the Rust parser's Python binding)
and every metric it names must be one a live :class:`~fs_cc360.metrics.Metrics`
exports, read back from its ``render()`` with prometheus_client's own parser; every
label it filters or groups on must be one that metric has (or a target label Prometheus
adds). A renamed metric therefore breaks this test, not a dashboard in production.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fs_cc360.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "monitoring" / "grafana-dashboard.json"
ALERTS = REPO / "monitoring" / "alerts.yml"
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"instance", "job"}
#: Grafana's variables, as a value the parser accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$instance": ".*"}


def exported() -> dict[str, set[str]]:
    """Series name -> its label names, from a live Metrics with every verb exercised."""
    metrics = Metrics()
    metrics.esl_state(True)
    metrics.esl_event()
    metrics.crm_event("ringing")
    metrics.delivered("summary", 200, 0.05)
    metrics.failed("ringing", "retry", 503, 0.2)
    metrics.failed("ringing", "dead", 404)
    metrics.makecall("failed", "USER_BUSY")
    metrics.clock(0.5, False)
    metrics.set_outbox({"counts": {"pending": 1, "dead": 1}, "oldest_pending_at": None,
                        "oldest_summary_at": None})
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector in ``expr``."""
    found: list[tuple[str, set[str]]] = []
    grouped: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers} - {"__name__"}
            found.append((node.name, labels))
            return
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouped.update(node.modifier.labels)
        for attribute in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attribute, None)
            if child is not None:
                visit(child)
        for child in getattr(node, "args", None) or ():
            visit(child)

    visit(promql_parser.parse(expr))
    # a grouping label must exist on every metric below it (checked per selector)
    return [(name, labels | grouped) for name, labels in found]


def check_expr(expr: str, where: str, names: dict[str, set[str]]) -> list[str]:
    problems = []
    metrics = selectors(expr)
    if not metrics:
        problems.append(f"{where}: names no metric: {expr}")
    for name, labels in metrics:
        if name not in names:
            problems.append(f"{where}: {name} is not exported")
            continue
        unknown = labels - names[name] - TARGET_LABELS - {"le"}
        if unknown:
            problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    return problems


def grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


# --------------------------------------------------------------------------- dashboard


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def test_dashboard_is_importable_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "fs-cc360" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard  # an id would make Grafana overwrite another dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        position = panel["gridPos"]
        assert 0 <= position["x"] and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            # every query goes to the data source chosen at import
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_dashboard_queries_name_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    names = exported()
    problems = []
    for where, expr in dashboard_targets(dashboard):
        problems += check_expr(grafana_expr(expr), where, names)
    query = next(v for v in dashboard["templating"]["list"] if v["name"] == "instance")
    metric = re.fullmatch(r"label_values\((\w+), instance\)", query["definition"])
    assert metric and metric.group(1) in names
    assert problems == []


def test_dashboard_covers_what_the_issue_asks() -> None:
    exprs = " ".join(expr for _, expr in dashboard_targets(
        json.loads(DASHBOARD.read_text(encoding="utf-8"))))
    for metric in ("fs_cc360_esl_events_total", "fs_cc360_crm_events_total",
                   "fs_cc360_crm_requests_total", "fs_cc360_outbox_rows",
                   "fs_cc360_outbox_oldest_pending_seconds", "fs_cc360_esl_connected",
                   "fs_cc360_crm_up", "fs_cc360_delivery_seconds_bucket",
                   "fs_cc360_deliveries_total"):
        assert metric in exprs, metric
    assert "by (endpoint, status)" in exprs


# --------------------------------------------------------------------------- alerts


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_rules_parse_and_name_only_exported_metrics() -> None:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(document) == {"groups"}
    names = exported()
    problems = []
    seen = set()
    for group in document["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"] not in seen
            seen.add(rule["alert"])
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning")
            assert rule["annotations"]["summary"].strip()
            assert "What to do" in rule["annotations"]["description"], rule["alert"]
            problems += check_expr(rule["expr"], rule["alert"], names)
    assert problems == []


@pytest.mark.parametrize("alert, metric, threshold, wait", [
    ("FsCc360EslDown", "fs_cc360_esl_connected", "== 0", "1m"),
    ("FsCc360CrmDown", "fs_cc360_crm_up", "== 0", "5m"),
    ("FsCc360SummaryWaiting", "fs_cc360_outbox_oldest_pending_summary_seconds", "> 600", None),
    ("FsCc360DeadRows", 'fs_cc360_outbox_rows{status="dead"}', "> 0", None),
    ("FsCc360ClockOffset", "fs_cc360_freeswitch_clock_offset_seconds", "> 5", None),
])
def test_the_alerts_the_issue_asks_for(alert: str, metric: str, threshold: str,
                                       wait: str | None) -> None:
    rule = next(r for r in alert_rules() if r["alert"] == alert)
    assert metric in rule["expr"] and rule["expr"].endswith(threshold)
    if wait is not None:
        assert rule["for"] == wait


def test_a_renamed_metric_is_caught() -> None:
    """The check itself: an unknown name or label is reported."""
    names = exported()
    assert check_expr("fs_cc360_esl_conected == 0", "x", names) == [
        "x: fs_cc360_esl_conected is not exported"]
    assert check_expr('sum by (kind) (fs_cc360_outbox_rows{status="dead"})', "y", names) == [
        "y: fs_cc360_outbox_rows has no label ['kind']"]
