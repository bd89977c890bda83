"""The alerting rules (charts/meshgress/files/alerts): promtool accepts them and their unit
tests pass, every alert is tested firing and silent, and every rule names only metrics
and labels the agent and gateway really export.

promtool comes from Debian's `prometheus` package, which `make test` installs
(APT_PACKAGES); without it these tests fail, they never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tools.metric_catalog import exported_metrics
from tests.tools.promql_lint import problems, unknown_metrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "meshgress"
ALERTS = CHART / "files" / "alerts"
RULES = ALERTS / "meshgress.rules.yaml"
RULE_TESTS = ALERTS / "meshgress.rules.test.yaml"
TEMPLATE = CHART / "templates" / "prometheusrule.yaml"

JOBS = {"meshgress-agent", "meshgress-gateway"}
"""The scrape job names the rules expect (the chart's template rewrites exactly these)."""

SEVERITIES = {"critical", "warning"}


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, ("promtool not found: install Debian's prometheus package "
                  "(`make test` does: APT_PACKAGES)")
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120,
                          cwd=ALERTS)


def _alerts() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_checks_the_rules():
    proc = _run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout


def test_promtool_unit_tests_pass():
    proc = _run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_firing_and_silent():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"
    assert (fired | silent) - names == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_can_be_acted_on(rule):
    assert re.fullmatch(r"Meshgress[A-Z][A-Za-z]+", rule["alert"])
    assert rule["labels"]["severity"] in SEVERITIES
    assert set(rule["annotations"]) == {"summary", "description"}
    description = rule["annotations"]["description"]
    # a person can look somewhere: a command, a metric, a log line or a page to open
    assert "`" in description or "Look:" in description
    if "for" not in rule:
        # only a leak drop fires at once: every drop matters
        assert rule["alert"] == "MeshgressLeakDrops"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_rules_name_only_exported_metrics_and_labels(rule):
    exported = exported_metrics()
    assert problems(rule["expr"], exported) == []
    for text in rule["annotations"].values():
        assert unknown_metrics(text, exported) == []


def test_rules_use_only_the_documented_job_names():
    text = RULES.read_text()
    jobs = set(re.findall(r'job="([^"]*)"', text))
    assert jobs == JOBS
    assert not re.search(r"job\s*(=~|!=|!~)", text), "the template rewrites job=\"...\" only"
    template = TEMPLATE.read_text()
    for job in JOBS:
        assert f'job=\\"{job}\\"' in template, f"the chart template does not rewrite {job}"
    assert '.Files.Get "files/alerts/meshgress.rules.yaml"' in template
