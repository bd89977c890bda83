"""The agent's Prometheus text: loop, mesh, leak guard and egress slot samples, as
rendered."""

from meshgress.prometheus import Exposition
from meshgress.runtime import LoopMetrics
from nodeagent.metrics import AgentMetrics, SlotSample
from wireguard.model import PeerStats

KEY = "HIHa7PoKGz7TGrtCjMK9oL5xyjbg4FiSoDzGSb6WBHs="


def render(**extra):
    loop = LoopMetrics("meshgress_", "meshgress_reconcile_errors_total")
    loop.observe(0.02, True)
    loop.observe(0.3, False)
    page = Exposition()
    loop.render(page)
    AgentMetrics(started_at=1_700_000_000.5).render(
        page, counters={"leak_out": (3, 252)},
        peer_stats=(PeerStats(KEY, last_handshake_sec=90, rx_bytes=10, tx_bytes=20),),
        peer_names={KEY: "node2"}, now=100.0, **extra)
    return page.render()


def lines(text):
    return {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
            for line in text.splitlines() if line and not line.startswith("#")}


def test_mesh_and_guard_samples():
    got = lines(render())
    assert got["meshgress_agent_started_timestamp_seconds"] == "1700000000.5"
    assert got["meshgress_reconcile_total"] == "2"
    assert got["meshgress_reconcile_failures_total"] == "1"
    assert got['meshgress_reconcile_duration_seconds_bucket{le="0.05"}'] == "1"
    assert got['meshgress_reconcile_duration_seconds_bucket{le="+Inf"}'] == "2"
    assert got["meshgress_leak_drops_packets_total"] == "3"
    peer = f'{{peer="node2",public_key="{KEY}"}}'
    assert got[f"meshgress_wireguard_peer_handshake_age_seconds{peer}"] == "10"
    assert got[f"meshgress_wireguard_peer_rx_bytes_total{peer}"] == "10"


def test_egress_slot_and_policy_samples():
    text = render(slots=[SlotSample("egress", 1, healthy=False, probes_sent=50,
                                    probes_answered=47, failovers=1, flows=12,
                                    tx_bytes=4096, rx_bytes=2048)],
                  selected_pods={"payments": 2, "idle": 0})
    got = lines(text)
    slot = '{gateway="egress",slot="1"}'
    assert got[f"meshgress_egress_slot_healthy{slot}"] == "0"
    assert got[f"meshgress_egress_slot_probes_sent_total{slot}"] == "50"
    assert got[f"meshgress_egress_slot_probes_answered_total{slot}"] == "47"
    assert got[f"meshgress_egress_slot_failovers_total{slot}"] == "1"
    assert got[f"meshgress_egress_slot_flows_total{slot}"] == "12"
    assert got[f"meshgress_egress_slot_tx_bytes_total{slot}"] == "4096"
    assert got[f"meshgress_egress_slot_rx_bytes_total{slot}"] == "2048"
    assert got['meshgress_egress_policy_selected_pods{policy="payments"}'] == "2"
    assert got['meshgress_egress_policy_selected_pods{policy="idle"}'] == "0"
    assert "# TYPE meshgress_egress_slot_failovers_total counter" in text
