"""The CNI server half's Prometheus metrics, shown on the node agent's page: what became
of the DELs the plugin queued while the agent was away.

They are rendered from the service's counters by a function of their own so the metric
catalogue (tests/tools/metric_catalog.py), which feeds every renderer one of everything,
documents them without starting a CNI server. `render_deletion_queue_metrics` is purely
computational.
"""

from __future__ import annotations

from meshgress.prometheus import Exposition


def render_deletion_queue_metrics(page: Exposition, *, replayed: int, rejected: int,
                                  pending: int) -> None:
    page.metric("meshgress_cni_queued_deletes_replayed_total", "counter",
                "DELs the plugin queued while the agent was away, run since the agent "
                "started.", [("", replayed)])
    page.metric("meshgress_cni_queued_deletes_rejected_total", "counter",
                "Files of the CNI deletion queue removed because they were no "
                "well-formed entry (see the agent's log).", [("", rejected)])
    page.metric("meshgress_cni_queued_deletes_pending", "gauge",
                "Queued DELs that failed when last run and wait for the next try.",
                [("", pending)])
