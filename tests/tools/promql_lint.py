"""Checks of PromQL text against what meshgress really exports, shared by the tests of the
alert rules and of the dashboard: a rule or panel naming a metric or label that the code
does not export would stay silent or empty forever, and nobody would notice.

These are textual checks, not a parser: metric names are meshgress's own prefix, selectors
are `name{...}` written out in full, and counters must sit directly inside a range
function. PromQL syntax itself is left to promtool. Purely computational.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tests.tools.metric_catalog import ExportedMetric

TARGET_LABELS = frozenset({"job", "instance", "node", "namespace", "pod"})
"""Labels a scrape adds to every series (the last three only with the relabelling the
rules file describes)."""

_METRIC = re.compile(r"\bmeshgress_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b(meshgress_[a-z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')
_RANGE_FUNCTIONS = ("rate", "increase", "irate", "changes", "resets")
_SERIES_FUNCTIONS = ("count", "absent", "group")
"""Functions that look at which series exist, not at their values: any type goes."""


def unknown_metrics(text: str, exported: Mapping[str, ExportedMetric]) -> list[str]:
    """meshgress metric names in `text` (an expression, or prose) that nothing exports."""
    return [f"{name} is not exported by the agent or the gateway"
            for name in sorted(set(_METRIC.findall(text))) if name not in exported]


def problems(expr: str, exported: Mapping[str, ExportedMetric]) -> list[str]:
    """What is wrong in `expr` as far as the exported metrics tell: unknown metric names,
    label matchers on labels the metric lacks, counters outside rate()/increase(), and
    gauges inside them."""
    found = unknown_metrics(expr, exported)
    allowed = "|".join(_RANGE_FUNCTIONS + _SERIES_FUNCTIONS)
    for name in sorted(set(_METRIC.findall(expr))):
        metric = exported.get(name)
        if metric is None:
            continue
        wrapped = re.search(rf"\b(?:{'|'.join(_RANGE_FUNCTIONS)})\(\s*{name}\b", expr)
        bare = [m for m in re.finditer(rf"\b{name}\b", expr)
                if not re.search(rf"\b(?:{allowed})\(\s*$", expr[:m.start()])]
        if metric.kind == "counter" and bare:
            found.append(f"counter {name} used outside {', '.join(_RANGE_FUNCTIONS)}")
        if metric.kind == "gauge" and wrapped and not re.search(
                rf"\bchanges\(\s*{name}\b", expr):
            found.append(f"gauge {name} used inside a counter's range function")
    for name, inner in _SELECTOR.findall(expr):
        metric = exported.get(name)
        if metric is None:
            continue
        for label in _MATCHER.findall(inner):
            if label not in metric.labels | TARGET_LABELS:
                found.append(f"{name} has no label {label!r} (it has "
                             f"{sorted(metric.labels) or 'none'})")
    return found
