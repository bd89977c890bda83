"""The gateway's own Prometheus metrics: per slot held/ready, traffic, flows and drops.

Loop figures (passes, their duration, failed steps) are the runtime's
(`meshgress.runtime.LoopMetrics`); lease figures are the lease keeper's; per-slot traffic
comes from the named counters of the gateway's nftables table, read when Prometheus
scrapes (so a scrape shows the kernel as it is).

`GatewayMetrics.render` is purely computational.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.leases import LeaseMetrics
from gateway.rules import COUNTER_STALE, counter_names
from meshgress.prometheus import Exposition, Sample
from meshgress.prometheus import labels as _labels


@dataclass(frozen=True)
class SlotSample:
    gateway: str
    index: int
    ip: str
    suffix: str
    held: bool
    ready: bool


@dataclass
class GatewayMetrics:
    leases: LeaseMetrics

    def render(self, page: Exposition, *, slots: Sequence[SlotSample],
               counters: Mapping[str, tuple[int, int]]) -> None:
        metric = page.metric
        metric("meshgress_gateway_lease_acquisitions_total", "counter",
               "Slot leases taken (not renewals).", [("", self.leases.acquisitions)])
        metric("meshgress_gateway_lease_releases_total", "counter",
               "Slot leases released (a standby can take them at once).",
               [("", self.leases.releases)])
        metric("meshgress_gateway_lease_renew_failures_total", "counter",
               "Lease renewals that failed.", [("", self.leases.renew_failures)])
        metric("meshgress_gateway_fenced_total", "counter",
               "Slots torn down because their lease was lost.", [("", self.leases.fenced)])
        held: list[Sample] = []
        ready: list[Sample] = []
        rows: dict[str, list[Sample]] = {
            key: [] for key in ("out_p", "out_b", "in_p", "in_b", "flows", "drop")}
        for s in sorted(slots, key=lambda s: (s.gateway, s.index)):
            lbl = _labels(gateway=s.gateway, slot=str(s.index), egress_ip=s.ip)
            held.append((lbl, 1 if s.held else 0))
            ready.append((lbl, 1 if s.ready else 0))
            if not s.held:
                continue
            names = counter_names(s.suffix)
            out_c = counters.get(names["out"], (0, 0))
            in_c = counters.get(names["in"], (0, 0))
            rows["out_p"].append((lbl, out_c[0]))
            rows["out_b"].append((lbl, out_c[1]))
            rows["in_p"].append((lbl, in_c[0]))
            rows["in_b"].append((lbl, in_c[1]))
            rows["flows"].append((lbl, counters.get(names["flows"], (0, 0))[0]))
            rows["drop"].append((lbl, counters.get(names["drop"], (0, 0))[0]))
        metric("meshgress_gateway_slot_held", "gauge",
               "1 when this process holds the slot's lease.", held)
        metric("meshgress_gateway_slot_ready", "gauge",
               "1 when this process serves the slot completely (dataplane applied, "
               "published).", ready)
        metric("meshgress_gateway_slot_tx_packets_total", "counter",
               "Packets from the slot's tunnel forwarded to the outside.", rows["out_p"])
        metric("meshgress_gateway_slot_tx_bytes_total", "counter",
               "Bytes from the slot's tunnel forwarded to the outside.", rows["out_b"])
        metric("meshgress_gateway_slot_rx_packets_total", "counter",
               "Reply packets sent back into the slot's tunnel.", rows["in_p"])
        metric("meshgress_gateway_slot_rx_bytes_total", "counter",
               "Reply bytes sent back into the slot's tunnel.", rows["in_b"])
        metric("meshgress_gateway_slot_flows_total", "counter",
               "New flows SNATed to the slot's egress IP.", rows["flows"])
        metric("meshgress_gateway_slot_dropped_packets_total", "counter",
               "Packets from the slot's tunnel dropped (source not allowed or not leaving "
               "to the outside).", rows["drop"])
        metric("meshgress_gateway_stale_interface_drops_total", "counter",
               "Packets dropped on slot interfaces of slots not held.",
               [("", counters.get(COUNTER_STALE, (0, 0))[0])])
