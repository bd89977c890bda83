"""The Grafana dashboard (charts/meshgress/files/dashboards/meshgress.json): the committed
JSON is exactly what tests/tools/grafana_dashboard.py generates, its panels run the
queries that module exports, and every query is valid PromQL (promtool) naming only
metrics and labels the agent and gateway export.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools import grafana_dashboard as gd
from tests.tools.metric_catalog import exported_metrics, sample_series
from tests.tools.promql_lint import problems

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshgress"
TEMPLATE = CHART / "templates" / "dashboard-configmap.yaml"


def _committed() -> dict:
    return json.loads(gd.OUTPUT.read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_committed_json_is_the_generated_one():
    assert gd.OUTPUT.read_text() == gd.render_dashboard(), (
        "the dashboard JSON is stale: run .venv/bin/python -m tests.tools.grafana_dashboard")
    assert gd.main(["--check"]) == 0


def test_check_mode_reports_a_stale_file(tmp_path):
    stale = tmp_path / "meshgress.json"
    stale.write_text("{}\n")
    assert gd.main(["--check", "--output", str(stale)]) == 1
    assert gd.main(["--output", str(stale)]) == 0
    assert gd.main(["--check", "--output", str(stale)]) == 0


def test_panels_run_exactly_the_exported_queries():
    dashboard = _committed()
    in_json = [(panel["title"], target["refId"], target["expr"], target.get("instant", False))
               for panel in _panels(dashboard) for target in panel.get("targets", [])]
    exported = [(q.panel, q.ref_id, q.expr, q.instant) for q in gd.dashboard_queries()]
    assert in_json == exported
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_the_dashboard_covers_what_a_person_looks_for():
    titles = {panel["title"] for panel in _panels(_committed())}
    for wanted in ("WireGuard handshake age per peer", "Mesh traffic received per peer",
                   "Mesh traffic sent per peer", "Leak-guard and spoof drops",
                   "Slot health as each node sees it", "Slot failovers", "New flows per slot",
                   "Bytes per slot (node tunnels)", "New flows per policy",
                   "Gateway slots: held", "Gateway slots: ready",
                   "Reconcile duration p50 and p99", "Reconcile errors by step",
                   "Full dataplane reads"):
        assert wanted in titles
    exprs = " ".join(q.expr for q in gd.dashboard_queries())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def test_variables_and_datasources():
    dashboard = _committed()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "gateway"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "gateway"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["description"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    assert dashboard["uid"] == gd.UID


@pytest.mark.parametrize("query", gd.dashboard_queries(),
                         ids=lambda q: f"{q.panel}/{q.ref_id}")
def test_queries_name_only_exported_metrics_and_labels(query):
    assert problems(query.expr, exported_metrics()) == []
    assert query.needs and set(query.needs) <= set(gd.NEEDS)


def test_resolved_queries_are_valid_promql(tmp_path):
    """promtool parses every query, with the variables as Grafana substitutes them."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make test` installs Debian's prometheus package"
    queries = gd.dashboard_queries()
    for query in queries:
        resolved = gd.resolve_query(query.expr)
        assert "$" not in resolved, resolved
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": gd.resolve_query(q.expr)}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_query_returns_data_from_a_scrape_of_everything(tmp_path):
    """promtool evaluates every query over what one agent and one gateway export when
    they have one of everything to count (a peer, a slot, a policy, an error, a skipped
    node): each must return a series. A lab test repeats this on a real Prometheus."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make test` installs Debian's prometheus package"
    queries = gd.dashboard_queries()
    kinds = exported_metrics()
    series = [{"series": f"{name}{{{labels}}}",
               "values": (f"{value:g}+{value:g}x40" if kinds[name].kind != "gauge"
                          else f"{value:g}x40")}
              for name, labels, value in sample_series()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"alert": f"DashboardQuery{i}",
         "expr": f"count({gd.resolve_query(q.expr, rate_interval='2m', time_range='10m')})"
                 " >= 0"}
        for i, q in enumerate(queries)]}]}
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["dashboard.rules.yaml"], "evaluation_interval": "30s",
             "tests": [{"interval": "30s", "input_series": series, "alert_rule_test": [
                 {"eval_time": "15m", "alertname": f"DashboardQuery{i}",
                  "exp_alerts": [{"exp_labels": {}}]} for i in range(len(queries))]}]}
    (tmp_path / "dashboard.test.yaml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", "dashboard.test.yaml"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    names = "\n".join(f"DashboardQuery{i}: {q.panel}/{q.ref_id}" for i, q in enumerate(queries))
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{names}"


def test_resolve_query_substitutes_grafana_variables():
    expr = ('sum(rate(meshgress_egress_slot_flows_total{instance=~"$instance",'
            'gateway=~"$gateway"}[$__rate_interval])) + 0 * sum(increase(x[$__range]))')
    assert gd.resolve_query(expr, rate_interval="30s", time_range="1h",
                            instance="192.0.2.11:9820", gateway="egw") == (
        'sum(rate(meshgress_egress_slot_flows_total{instance=~"192.0.2.11:9820",'
        'gateway=~"egw"}[30s])) + 0 * sum(increase(x[1h]))')


def test_the_chart_template_ships_the_generated_file():
    template = TEMPLATE.read_text()
    assert '.Files.Get "files/dashboards/meshgress.json"' in template
    assert gd.OUTPUT.is_relative_to(CHART / "files")
    assert 'default "grafana_dashboard"' in template and 'default "1"' in template
