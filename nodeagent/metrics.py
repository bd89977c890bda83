"""The agent's Prometheus endpoint and its liveness and readiness probes.

Counters are kept in memory by the loop; kernel-side figures (WireGuard peer stats, the
leak-guard counters of the nftables table) are read only when Prometheus scrapes, so a
scrape always shows the kernel as it is. Served by the standard library's HTTP server on
its own thread: /metrics, /healthz (the loop is turning), /readyz (synced, applied,
published and serving CNI).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from wireguard.model import PeerStats

log = logging.getLogger("meshgress.metrics")

RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def _number(value: float) -> str:
    """Full precision (timestamps need it); integers without a decimal point."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}" if inner else ""


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
    reconciles: int = 0
    reconcile_failures: int = 0
    reconcile_seconds_sum: float = 0.0
    reconcile_buckets: list[int] = field(default_factory=lambda: [0] * len(RECONCILE_BUCKETS))
    errors: dict[str, int] = field(default_factory=dict)
    peers_expected: int = 0
    started_at: float = 0.0
    """Wall-clock time the agent began running (its modules loaded)."""
    skipped_nodes: dict[str, str] = field(default_factory=dict)
    dataplane_reads: dict[str, int] = field(default_factory=dict)
    """Full kernel reads per subsystem (the rest of the passes planned against the
    tracked state; see nodeagent.tracker)."""

    def observe_reconcile(self, seconds: float, ok: bool) -> None:
        self.reconciles += 1
        self.reconcile_failures += not ok
        self.reconcile_seconds_sum += seconds
        for i, bound in enumerate(RECONCILE_BUCKETS):
            if seconds <= bound:
                self.reconcile_buckets[i] += 1

    def render(self, *, counters: Mapping[str, tuple[int, int]], peer_stats: tuple[PeerStats, ...],
               peer_names: Mapping[str, str], now: float,
               slots: Sequence[SlotSample] = (),
               selected_pods: Mapping[str, int] | None = None,
               policy_flows: Mapping[str, int] | None = None) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str,
                   samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric("meshgress_agent_started_timestamp_seconds", "gauge",
               "When the agent began running, after loading its modules.",
               [("", self.started_at)])
        metric("meshgress_reconcile_total", "counter", "Reconcile passes.",
               [("", self.reconciles)])
        metric("meshgress_reconcile_failures_total", "counter",
               "Reconcile passes where some step failed (retried).",
               [("", self.reconcile_failures)])
        cumulative = [(_labels(le=f"{b:g}"), float(c))
                      for b, c in zip(RECONCILE_BUCKETS, self.reconcile_buckets, strict=True)]
        out.append("# HELP meshgress_reconcile_duration_seconds Time of one reconcile pass.")
        out.append("# TYPE meshgress_reconcile_duration_seconds histogram")
        out.extend(f"meshgress_reconcile_duration_seconds_bucket{lbl} {_number(v)}"
                   for lbl, v in cumulative)
        out.append(f'meshgress_reconcile_duration_seconds_bucket{{le="+Inf"}} {self.reconciles}')
        out.append("meshgress_reconcile_duration_seconds_sum "
                   f"{_number(self.reconcile_seconds_sum)}")
        out.append(f"meshgress_reconcile_duration_seconds_count {self.reconciles}")
        metric("meshgress_reconcile_errors_total", "counter",
               "Failed apply steps by operation.",
               [(_labels(op=op), n) for op, n in sorted(self.errors.items())])
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
               "Bytes of those packets.", [("", leak[1])])
        metric("meshgress_spoof_drops_packets_total", "counter",
               "Packets with a cluster pod source that arrived outside the mesh.",
               [("", spoof[0])])
        hs: list[tuple[str, float]] = []
        rx: list[tuple[str, float]] = []
        tx: list[tuple[str, float]] = []
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

        def per_slot(value: Callable[[SlotSample], float]) -> list[tuple[str, float]]:
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
        return "\n".join(out) + "\n"


def serve_metrics(address: str, collect: Callable[[], str],
                  health: Callable[[], dict[str, bool]], stop: threading.Event) -> None:
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, code = collect().encode(), 200
                ctype = "text/plain; version=0.0.4"
            elif self.path in ("/healthz", "/readyz"):
                state = health()
                good = state["live"] if self.path == "/healthz" else state["ready"]
                body, code, ctype = (b"ok\n" if good else b"not ok\n"), (200 if good else 503), \
                    "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)  # noqa: S104
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def shutdown_on_stop() -> None:
        stop.wait()
        server.shutdown()

    threading.Thread(target=shutdown_on_stop, daemon=True).start()
