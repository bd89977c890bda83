"""The metrics reference: every metric the node agent and the egress gateway export, with
its type, labels and help text, grouped by process. The metrics come from
tests/tools/metric_catalog.py, which renders the processes' own exporters.

Purely computational.
"""

from __future__ import annotations

from collections.abc import Sequence

from tests.tools.metric_catalog import MetricFamily
from tests.tools.reference.markdown import code, inline, wrap


def render_metric(metric: MetricFamily) -> list[str]:
    facts = [metric.kind]
    if metric.labels:
        facts.append(("labels " if len(metric.labels) > 1 else "label ")
                     + ", ".join(code(label) for label in metric.labels))
    if metric.buckets:
        facts.append("buckets " + ", ".join(metric.buckets))
    return wrap(inline(f"{'; '.join(facts)}. {metric.help}"),
                first=f"- {code(metric.name)}: ", indent="  ")


def render_metrics_reference(processes: Sequence[tuple[str, str, Sequence[MetricFamily]]]
                             ) -> str:
    """`processes`: (heading, introduction, its metrics in the order it exports them)."""
    lines: list[str] = []
    for heading, introduction, metrics in processes:
        if lines:
            lines.append("")
        lines += [f"#### {heading}", "", *wrap(inline(introduction)), ""]
        for metric in metrics:
            lines += render_metric(metric)
    return "\n".join(lines) + "\n"
