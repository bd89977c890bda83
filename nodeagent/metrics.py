"""The agent's own Prometheus metrics: the mesh, the leak guard and egress steering.

Loop figures (passes, their duration and failed steps) are the runtime's
(`meshgress.runtime.LoopMetrics`); these are the agent's. Kernel-side figures (WireGuard
peer stats, the leak-guard counters of the nftables table) are read only when Prometheus
scrapes, so a scrape always shows the kernel as it is.

`AgentMetrics.render` is purely computational.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from meshgress.prometheus import Exposition, Sample
from meshgress.prometheus import labels as _labels
from wireguard.model import PeerStats


@dataclass(frozen=True)
class SlotSample:
    """One egress slot as this node sees it, for a scrape."""

    gateway: str
    index: int
    healthy: bool
    probes_sent: int
    probes_answered: int
    failovers: int
    flows: int
    tx_bytes: int
    rx_bytes: int


@dataclass
class AgentMetrics:
    peers_expected: int = 0
    started_at: float = 0.0
    """Wall-clock time the agent began running (its modules loaded)."""
    skipped_nodes: dict[str, str] = field(default_factory=dict)
    dataplane_reads: dict[str, int] = field(default_factory=dict)
    """Full kernel reads per subsystem (the rest of the passes planned against the
    tracked state; see nodeagent.tracker)."""

    def render(self, page: Exposition, *, counters: Mapping[str, tuple[int, int]],
               peer_stats: tuple[PeerStats, ...], peer_names: Mapping[str, str], now: float,
               slots: Sequence[SlotSample] = (),
               selected_pods: Mapping[str, int] | None = None,
               policy_flows: Mapping[str, int] | None = None) -> None:
        metric = page.metric
        metric("meshgress_agent_started_timestamp_seconds", "gauge",
               "When the agent began running, after loading its modules.",
               [("", self.started_at)])
        metric("meshgress_dataplane_full_reads_total", "counter",
               "Passes that read the whole dataplane from the kernel (at start, every "
               "resync, after an error); the others planned against the tracked state.",
               [(_labels(subsystem=k), n) for k, n in sorted(self.dataplane_reads.items())])
        metric("meshgress_mesh_peers_expected", "gauge",
               "Other nodes that publish a usable key and endpoint.",
               [("", self.peers_expected)])
        metric("meshgress_mesh_peers_configured", "gauge",
               "Peers configured on the mesh interface now.", [("", len(peer_stats))])
        metric("meshgress_mesh_nodes_skipped", "gauge",
               "Nodes left out of the mesh, with the reason.",
               [(_labels(node=n, reason=r), 1) for n, r in sorted(self.skipped_nodes.items())])
        leak = counters.get("leak_out", (0, 0))
        spoof = counters.get("spoof_in", (0, 0))
        metric("meshgress_leak_drops_packets_total", "counter",
               "Pod packets dropped because they would have left the node unencrypted.",
               [("", leak[0])])
        metric("meshgress_leak_drops_bytes_total", "counter",
               "Bytes of the pod packets dropped because they would have left the node "
               "unencrypted.", [("", leak[1])])
        metric("meshgress_spoof_drops_packets_total", "counter",
               "Packets with a cluster pod source that arrived outside the mesh.",
               [("", spoof[0])])
        metric("meshgress_endpoint_guard_drops_packets_total", "counter",
               "Packets to meshgress's metrics and health endpoints dropped: from pods "
               "(source=\"pod\", to this or another node), or to this node from outside the "
               "cluster's nodes and the allowed sources (source=\"other\").",
               [(_labels(source="pod"), counters.get("endpoint_pods", (0, 0))[0]),
                (_labels(source="other"), counters.get("endpoint_other", (0, 0))[0])])
        hs: list[Sample] = []
        rx: list[Sample] = []
        tx: list[Sample] = []
        for stat in sorted(peer_stats, key=lambda s: s.public_key):
            lbl = _labels(peer=peer_names.get(stat.public_key, "unknown"),
                          public_key=stat.public_key)
            last = stat.last_handshake
            hs.append((lbl, now - last if last else -1))
            rx.append((lbl, stat.rx_bytes))
            tx.append((lbl, stat.tx_bytes))
        metric("meshgress_wireguard_peer_handshake_age_seconds", "gauge",
               "Seconds since the latest handshake with the peer (-1: never).", hs)
        metric("meshgress_wireguard_peer_rx_bytes_total", "counter", "Bytes from the peer.", rx)
        metric("meshgress_wireguard_peer_tx_bytes_total", "counter", "Bytes to the peer.", tx)

        def per_slot(value: Callable[[SlotSample], float]) -> list[Sample]:
            return [(_labels(gateway=s.gateway, slot=str(s.index)), value(s)) for s in slots]

        metric("meshgress_egress_slot_healthy", "gauge",
               "1 while the slot answers this node's probes (its buckets are in use).",
               per_slot(lambda s: int(s.healthy)))
        metric("meshgress_egress_slot_probes_sent_total", "counter",
               "Health probes sent through the slot's tunnel.", per_slot(lambda s: s.probes_sent))
        metric("meshgress_egress_slot_probes_answered_total", "counter",
               "Probe rounds answered (an echo, or traffic from the holder).",
               per_slot(lambda s: s.probes_answered))
        metric("meshgress_egress_slot_failovers_total", "counter",
               "Times the slot turned unhealthy and its flows moved to other slots.",
               per_slot(lambda s: s.failovers))
        metric("meshgress_egress_slot_flows_total", "counter",
               "New flows of this node's pods steered into the slot.",
               per_slot(lambda s: s.flows))
        metric("meshgress_egress_slot_tx_bytes_total", "counter",
               "Bytes this node sent into the slot's tunnel.", per_slot(lambda s: s.tx_bytes))
        metric("meshgress_egress_slot_rx_bytes_total", "counter",
               "Bytes this node received from the slot's tunnel.",
               per_slot(lambda s: s.rx_bytes))
        metric("meshgress_egress_policy_selected_pods", "gauge",
               "Pods on this node the policy selects.",
               [(_labels(policy=name), n) for name, n in sorted((selected_pods or {}).items())])
        metric("meshgress_egress_policy_flows_total", "counter",
               "Flows of this node's pods the policy steered (new, or re-picked after their "
               "slot failed).",
               [(_labels(policy=name), n) for name, n in sorted((policy_flows or {}).items())])
