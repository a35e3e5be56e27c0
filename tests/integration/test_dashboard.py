"""The Grafana dashboard (k8s/components/monitoring/dashboard.json) uses only metrics a real
pod exports: every expression's metric names against the suite's pod's /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Pod

pytestmark = pytest.mark.integration

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "k8s" / "components" / "monitoring" / "dashboard.json"
)
# PromQL's functions, aggregations and keywords: every other bare name is a metric.
PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "histogram_quantile",
    "time",
    "vector",
    "scalar",
    "abs",
    "clamp_min",
    "clamp_max",
    "label_values",
    "absent",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "sum_over_time",
    "predict_linear",
    "deriv",
    "round",
    "ceil",
    "floor",
    "e",
    "inf",
    "nan",
}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names of a PromQL expression, without a parser: label matchers, grouping
    label lists, ranges and strings removed, then every identifier that is no PromQL word."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"label_values\(([a-zA-Z_:][\w:]*)\s*,\s*\w+\)", r"\1", text)
    names = set(re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", text))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("$")}


def exported(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_every_dashboard_expression_uses_exported_metrics(pod: Pod) -> None:
    resp = await pod.http.get("/metrics")
    assert resp.status_code == 200
    real = exported(resp.text)
    assert "threadgate_runs_in_flight" in real
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= real, (expr, names - real)
    # Every panel filters by the namespace variable, fed by an exported metric.
    for expr in exprs:
        if not expr.startswith("label_values"):
            assert 'namespace="$namespace"' in expr, expr


def test_the_name_check_sees_a_foreign_metric() -> None:
    assert metric_names('sum by (pod) (rate(kube_pod_info{namespace="$namespace"}[5m]))') == {
        "kube_pod_info"
    }
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))") == {
        "x_bucket"
    }
    assert metric_names("label_values(threadgate_runs_in_flight, namespace)") == {
        "threadgate_runs_in_flight"
    }
