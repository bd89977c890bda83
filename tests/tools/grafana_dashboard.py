"""The meshgress Grafana dashboard, generated: panels are declared here as data, built
with Grafana Labs' Foundation SDK (`grafana-foundation-sdk`, builders for Grafana 11.6) and
written to charts/meshgress/files/dashboards/meshgress.json, which the chart ships in a
ConfigMap for Grafana's dashboard sidecar. Nobody edits that JSON by hand:

    .venv/bin/python -m tests.tools.grafana_dashboard          # rewrite it
    .venv/bin/python -m tests.tools.grafana_dashboard --check  # exit 1 if it is stale

`dashboard_queries()` lists every PromQL expression the panels run, with what must exist
in the cluster for it to return data (`needs`), so a lab test can run each against a real
Prometheus; `resolve_query` substitutes the dashboard's variables the way Grafana does
with "All" selected. Everything here but `main` is purely computational.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import statetimeline as state_b
from grafana_foundation_sdk.builders import table as table_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "charts" / "meshgress" / "files" / "dashboards" / "meshgress.json"
UID = "meshgress"

NEEDS = {
    "agent": "a node agent is scraped",
    "peer": "the mesh has a peer (two nodes or more)",
    "slot": "a node steers into an egress slot that a gateway holds",
    "policy": "an EgressPolicy selects pods on a node",
    "gateway": "a gateway process is scraped and holds a slot",
    "skipped-node": "a node is left out of the mesh (no key published, a collision...)",
    "agent-error": "an agent reconcile step has failed since the agent started",
    "gateway-error": "a gateway operation has failed since the gateway started",
}
"""What a query's `needs` name: the conditions under which it returns data."""

PanelKind = Literal["timeseries", "bars", "stat", "state", "table"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    needs: tuple[str, ...] = ("agent",)


@dataclass(frozen=True)
class Panel:
    kind: PanelKind
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    height: int = 8
    no_value: str | None = None
    red_from: float | None = None
    """Thresholds: green below this value, red from it (stats; a dashed line on graphs)."""
    mappings: tuple[tuple[str, str, str], ...] = ()
    """Value mappings (value, text, colour)."""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class PanelQuery:
    """One expression a panel runs, as exported for tests."""

    row: str
    panel: str
    ref_id: str
    expr: str
    legend: str
    instant: bool
    needs: tuple[str, ...]


NODE = 'instance=~"$instance"'
GW = 'gateway=~"$gateway"'
RATE = "$__rate_interval"

HEALTHY = (("1", "healthy", "green"), ("0", "unhealthy", "red"))

ROWS: tuple[Row, ...] = (
    Row("Overview", (
        Panel("stat", "Agents reporting",
              "Node agents whose /metrics Prometheus scrapes now (one per node).",
              (Query("count(meshgress_agent_started_timestamp_seconds)"),), width=4, height=4),
        Panel("stat", "Gateway processes reporting",
              "Egress gateway processes whose /metrics Prometheus scrapes now.",
              (Query("count(meshgress_gateway_reconcile_total)", needs=("gateway",)),),
              width=4, height=4),
        Panel("stat", "Agent restarts",
              "Times an agent started over the dashboard's time range.",
              (Query("sum(changes(meshgress_agent_started_timestamp_seconds"
                     f"{{{NODE}}}[$__range]))"),), width=4, height=4, red_from=1),
        Panel("stat", "Leak-guard drops",
              "Pod packets the leak guard dropped over the time range because they would "
              "have left a node unencrypted. Anything but 0 needs a look "
              "(alert MeshgressLeakDrops).",
              (Query(f"sum(increase(meshgress_leak_drops_packets_total{{{NODE}}}[$__range]))"),),
              width=4, height=4, red_from=1),
        Panel("stat", "Stale peers",
              "Mesh peers this node sends to whose latest handshake is older than 3 minutes "
              "or never happened (alert MeshgressPeerHandshakeStale).",
              (Query("count(("
                     f"meshgress_wireguard_peer_handshake_age_seconds{{{NODE}}} > 180 or "
                     f"meshgress_wireguard_peer_handshake_age_seconds{{{NODE}}} < 0) and "
                     f"rate(meshgress_wireguard_peer_tx_bytes_total{{{NODE}}}[2m]) > 0)"
                     " or vector(0)"),), width=4, height=4, red_from=1),
        Panel("stat", "Unhealthy egress slots",
              "(node, slot) pairs where the node's probes through the slot fail "
              "(alert MeshgressEgressSlotUnhealthy).",
              (Query(f"count(meshgress_egress_slot_healthy{{{NODE},{GW}}} == 0) or vector(0)"),),
              width=4, height=4, red_from=1),
    )),
    Row("Mesh health", (
        Panel("timeseries", "WireGuard handshake age per peer",
              "Seconds since the latest handshake with each peer, as each node sees it "
              "(-1: never). Mesh peers have no keepalive: an idle peer's age grows and is "
              "no fault; a peer the node sends to re-handshakes every 2 minutes, so above "
              "180 s while sending means it is not answering.",
              (Query(f"meshgress_wireguard_peer_handshake_age_seconds{{{NODE}}}",
                     "{{instance}} → {{peer}}", ("peer",)),),
              unit="s", red_from=180, mappings=(("-1", "never", "red"),)),
        Panel("timeseries", "Leak-guard and spoof drops",
              "Leak: pod packets dropped because they would have left the node in "
              "plaintext. Spoof: packets with a cluster pod source that arrived outside the "
              "mesh.",
              (Query("sum by (instance) (rate(meshgress_leak_drops_packets_total"
                     f"{{{NODE}}}[{RATE}]))", "leak {{instance}}"),
               Query("sum by (instance) (rate(meshgress_spoof_drops_packets_total"
                     f"{{{NODE}}}[{RATE}]))", "spoof {{instance}}")),
              unit="pps"),
        Panel("timeseries", "Mesh traffic received per peer",
              "Bytes per second each node receives from each peer (decrypted on "
              "meshgress0).",
              (Query(f"rate(meshgress_wireguard_peer_rx_bytes_total{{{NODE}}}[{RATE}])",
                     "{{instance}} ← {{peer}}", ("peer",)),),
              unit="Bps"),
        Panel("timeseries", "Mesh traffic sent per peer",
              "Bytes per second each node sends to each peer, handshakes included.",
              (Query(f"rate(meshgress_wireguard_peer_tx_bytes_total{{{NODE}}}[{RATE}])",
                     "{{instance}} → {{peer}}", ("peer",)),),
              unit="Bps"),
        Panel("timeseries", "Mesh peers: expected and configured",
              "Expected: other nodes publishing a usable key and endpoint. Configured: "
              "peers on meshgress0 now. They differ for long only when the agent cannot "
              "program its interface (alert MeshgressMeshPeersMismatch).",
              (Query(f"meshgress_mesh_peers_expected{{{NODE}}}", "expected {{instance}}"),
               Query(f"meshgress_mesh_peers_configured{{{NODE}}}",
                     "configured {{instance}}"))),
        Panel("table", "Nodes left out of the mesh",
              "Nodes an agent keeps out of its mesh, with the reason (no key or endpoint "
              "published yet, a pod CIDR collision, a duplicated key). A scrape config "
              "that adds a `node` target label renames this metric's own `node` label to "
              "`exported_node`.",
              (Query(f"meshgress_mesh_nodes_skipped{{{NODE}}}", needs=("skipped-node",)),),
              no_value="none"),
    )),
    Row("Egress", (
        Panel("state", "Slot health as each node sees it",
              "1 while the node's probes through the slot's tunnel are answered (its "
              "buckets are in use); a slot with no holder has no row.",
              (Query(f"meshgress_egress_slot_healthy{{{NODE},{GW}}}",
                     "{{gateway}}/{{slot}} @ {{instance}}", ("slot",)),),
              width=24, mappings=HEALTHY),
        Panel("bars", "Slot failovers",
              "Times a slot turned unhealthy on a node and its flows moved to other slots.",
              (Query("sum by (gateway, slot) (increase(meshgress_egress_slot_failovers_total"
                     f"{{{NODE},{GW}}}[{RATE}]))", "{{gateway}}/{{slot}}", ("slot",)),)),
        Panel("timeseries", "Probe answer ratio per slot",
              "Share of probe rounds answered (an echo, or traffic from the holder).",
              (Query("sum by (gateway, slot) (rate(meshgress_egress_slot_probes_answered_total"
                     f"{{{NODE},{GW}}}[{RATE}])) / sum by (gateway, slot) "
                     "(rate(meshgress_egress_slot_probes_sent_total"
                     f"{{{NODE},{GW}}}[{RATE}]))", "{{gateway}}/{{slot}}", ("slot",)),),
              unit="percentunit"),
        Panel("timeseries", "New flows per slot",
              "Flows per second the nodes' pods start through each slot.",
              (Query("sum by (gateway, slot) (rate(meshgress_egress_slot_flows_total"
                     f"{{{NODE},{GW}}}[{RATE}]))", "{{gateway}}/{{slot}}", ("slot",)),),
              unit="cps"),
        Panel("timeseries", "Bytes per slot (node tunnels)",
              "Bytes per second the nodes send into each slot's tunnel (out) and receive "
              "from it (replies).",
              (Query("sum by (gateway, slot) (rate(meshgress_egress_slot_tx_bytes_total"
                     f"{{{NODE},{GW}}}[{RATE}]))", "out {{gateway}}/{{slot}}", ("slot",)),
               Query("sum by (gateway, slot) (rate(meshgress_egress_slot_rx_bytes_total"
                     f"{{{NODE},{GW}}}[{RATE}]))", "in {{gateway}}/{{slot}}", ("slot",))),
              unit="Bps"),
        Panel("timeseries", "New flows per policy",
              "Flows per second each EgressPolicy steered (new, or re-picked after their "
              "slot failed).",
              (Query("sum by (policy) (rate(meshgress_egress_policy_flows_total"
                     f"{{{NODE}}}[{RATE}]))", "{{policy}}", ("policy",)),),
              unit="cps"),
        Panel("timeseries", "Pods selected per policy",
              "Pods each EgressPolicy selects, summed over the nodes.",
              (Query("sum by (policy) (meshgress_egress_policy_selected_pods"
                     f"{{{NODE}}})", "{{policy}}", ("policy",)),)),
        Panel("state", "Gateway slots: held",
              "Per gateway process, 1 where it holds the slot's lease. Exactly one process "
              "should hold each slot (alert MeshgressEgressSlotNotHeld).",
              (Query(f"meshgress_gateway_slot_held{{{GW}}}",
                     "{{gateway}}/{{slot}} {{egress_ip}} @ {{instance}}", ("gateway",)),),
              mappings=(("1", "held", "green"), ("0", "standby", "transparent"))),
        Panel("state", "Gateway slots: ready",
              "Per gateway process, 1 where it serves the slot completely (dataplane "
              "applied, key and endpoint published).",
              (Query(f"meshgress_gateway_slot_ready{{{GW}}}",
                     "{{gateway}}/{{slot}} {{egress_ip}} @ {{instance}}", ("gateway",)),),
              mappings=(("1", "ready", "green"), ("0", "not ready", "transparent"))),
        Panel("timeseries", "SNAT flows per egress IP",
              "New flows per second each gateway SNATs to a slot's egress IP.",
              (Query("sum by (gateway, slot, egress_ip) (rate(meshgress_gateway_slot_flows_total"
                     f"{{{GW}}}[{RATE}]))", "{{egress_ip}} ({{gateway}}/{{slot}})",
                     ("gateway",)),),
              unit="cps"),
        Panel("timeseries", "Gateway traffic per egress IP",
              "Bytes per second forwarded to the outside (out) and replies sent back into "
              "the slot's tunnel (in).",
              (Query("sum by (gateway, slot, egress_ip) (rate(meshgress_gateway_slot_tx_bytes_total"
                     f"{{{GW}}}[{RATE}]))", "out {{egress_ip}}", ("gateway",)),
               Query("sum by (gateway, slot, egress_ip) (rate(meshgress_gateway_slot_rx_bytes_total"
                     f"{{{GW}}}[{RATE}]))", "in {{egress_ip}}", ("gateway",))),
              unit="Bps"),
        Panel("timeseries", "Gateway drops",
              "Packets from a slot's tunnel dropped (source not selected, or not leaving to "
              "the outside), and packets on interfaces of slots not held.",
              (Query("sum by (gateway, slot) (rate(meshgress_gateway_slot_dropped_packets_total"
                     f"{{{GW}}}[{RATE}]))", "{{gateway}}/{{slot}}", ("gateway",)),
               Query("sum by (instance) (rate(meshgress_gateway_stale_interface_drops_total"
                     f"[{RATE}]))", "stale interfaces @ {{instance}}", ("gateway",))),
              unit="pps"),
        Panel("bars", "Gateway lease events",
              "Slot leases taken, released, failed renewals, and slots torn down because "
              "their lease was lost (fenced), per gateway process.",
              (Query("sum by (instance) (increase(meshgress_gateway_lease_acquisitions_total"
                     f"[{RATE}]))", "acquired @ {{instance}}", ("gateway",)),
               Query("sum by (instance) (increase(meshgress_gateway_lease_releases_total"
                     f"[{RATE}]))", "released @ {{instance}}", ("gateway",)),
               Query("sum by (instance) (increase(meshgress_gateway_lease_renew_failures_total"
                     f"[{RATE}]))", "renew failed @ {{instance}}", ("gateway",)),
               Query("sum by (instance) (increase(meshgress_gateway_fenced_total"
                     f"[{RATE}]))", "fenced @ {{instance}}", ("gateway",)))),
    )),
    Row("Agent internals", (
        Panel("timeseries", "Reconcile duration p50 and p99",
              "Time of one reconcile pass (compute, plan, apply), from the agent's "
              "histogram. Its buckets end at 5 s.",
              (Query("histogram_quantile(0.5, sum by (instance, le) "
                     "(rate(meshgress_reconcile_duration_seconds_bucket"
                     f"{{{NODE}}}[{RATE}])))", "p50 {{instance}}"),
               Query("histogram_quantile(0.99, sum by (instance, le) "
                     "(rate(meshgress_reconcile_duration_seconds_bucket"
                     f"{{{NODE}}}[{RATE}])))", "p99 {{instance}}")),
              unit="s"),
        Panel("timeseries", "Reconcile passes and failed passes",
              "Passes per second, and those where some step failed (retried).",
              (Query(f"sum by (instance) (rate(meshgress_reconcile_total{{{NODE}}}[{RATE}]))",
                     "passes {{instance}}"),
               Query("sum by (instance) (rate(meshgress_reconcile_failures_total"
                     f"{{{NODE}}}[{RATE}]))", "failed {{instance}}")),
              unit="ops"),
        Panel("timeseries", "Reconcile errors by step",
              "Failed apply steps per second by operation (nftables, egress, wireguard, "
              "routes, publish, ...); the agent logs each as `reconcile <op> failed`.",
              (Query("sum by (op) (rate(meshgress_reconcile_errors_total"
                     f"{{{NODE}}}[{RATE}]))", "{{op}}", ("agent-error",)),),
              unit="ops", no_value="no errors"),
        Panel("timeseries", "Full dataplane reads",
              "Passes per second that read the whole dataplane from the kernel (at start, "
              "every resync, after an error); the others plan against the tracked state.",
              (Query("sum by (instance, subsystem) (rate(meshgress_dataplane_full_reads_total"
                     f"{{{NODE}}}[{RATE}]))", "{{subsystem}} @ {{instance}}"),),
              unit="ops"),
        Panel("timeseries", "Gateway reconcile passes and failed passes",
              "Per gateway process.",
              (Query(f"sum by (instance) (rate(meshgress_gateway_reconcile_total[{RATE}]))",
                     "passes {{instance}}", ("gateway",)),
               Query("sum by (instance) (rate(meshgress_gateway_reconcile_failures_total"
                     f"[{RATE}]))", "failed {{instance}}", ("gateway",))),
              unit="ops"),
        Panel("timeseries", "Gateway errors by operation",
              "Failed gateway operations per second (acquire, renew, release, add-ip, "
              "read-kernel, ...).",
              (Query(f"sum by (op) (rate(meshgress_gateway_errors_total[{RATE}]))", "{{op}}",
                     ("gateway-error",)),),
              unit="ops", no_value="no errors"),
    )),
)


def dashboard_queries() -> tuple[PanelQuery, ...]:
    """Every PromQL expression the dashboard's panels run, in panel order."""
    return tuple(
        PanelQuery(row=row.title, panel=panel.title, ref_id=_ref_id(i), expr=q.expr,
                   legend=q.legend, instant=panel.kind in ("stat", "table"), needs=q.needs)
        for row in ROWS for panel in row.panels for i, q in enumerate(panel.queries))


def resolve_query(expr: str, *, rate_interval: str = "1m", time_range: str = "5m",
                  instance: str = ".*", gateway: str = ".*") -> str:
    """The expression as Grafana sends it, with "All" (`.*`) or the given regexes for
    the variables, and the given durations for $__rate_interval and $__range."""
    for name, value in (("$__rate_interval", rate_interval), ("$__range", time_range),
                        ("$instance", instance), ("$gateway", gateway)):
        expr = expr.replace(name, value)
    return expr


def _ref_id(index: int) -> str:
    return chr(ord("A") + index)


def _datasource() -> dash_m.DataSourceRef:
    return dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")


def _thresholds(red_from: float | None) -> dash_b.ThresholdsConfig:
    steps = [dash_m.Threshold(value=None, color="green")]
    if red_from is not None:
        steps.append(dash_m.Threshold(value=red_from, color="red"))
    return dash_b.ThresholdsConfig().mode(dash_m.ThresholdsMode.ABSOLUTE).steps(steps)


def _mappings(mappings: Sequence[tuple[str, str, str]]) -> list[dash_m.ValueMapping]:
    if not mappings:
        return []
    return [dash_m.ValueMap(options={
        value: dash_m.ValueMappingResult(text=text, color=color, index=i)
        for i, (value, text, color) in enumerate(mappings)})]


def _legend() -> common_b.VizLegendOptions:
    return (common_b.VizLegendOptions().show_legend(True)
            .display_mode(common_m.LegendDisplayMode.TABLE)
            .placement(common_m.LegendPlacement.BOTTOM).calcs(["lastNotNull", "max"]))


def _panel(spec: Panel, panel_id: int) -> Any:
    builder: Any
    if spec.kind in ("timeseries", "bars"):
        builder = (ts_b.Panel().legend(_legend())
                   .tooltip(common_b.VizTooltipOptions()
                            .mode(common_m.TooltipDisplayMode.MULTI)
                            .sort(common_m.SortOrder.DESCENDING))
                   .fill_opacity(10).line_width(1).span_nulls(False))
        if spec.kind == "bars":
            builder = (builder.draw_style(common_m.GraphDrawStyle.BARS).fill_opacity(80)
                       .stacking(common_b.StackingConfig().mode(common_m.StackingMode.NORMAL)))
        if spec.red_from is not None:
            builder = builder.thresholds_style(common_b.GraphThresholdsStyleConfig().mode(
                common_m.GraphThresholdsStyleMode.DASHED))
    elif spec.kind == "stat":
        builder = (stat_b.Panel().graph_mode(common_m.BigValueGraphMode.NONE)
                   .color_mode(common_m.BigValueColorMode.BACKGROUND)
                   .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"])))
    elif spec.kind == "state":
        builder = (state_b.Panel().show_value(common_m.VisibilityMode.NEVER)
                   .merge_values(True).row_height(0.8))
    else:
        # one row per series, its labels as columns: the sample's time and value say nothing
        builder = (table_b.Panel().filterable(True).with_transformation(
            dash_m.DataTransformerConfig(id_val="organize", options={"excludeByName": {
                "Time": True, "Value": True, "__name__": True}})))
    builder = (builder.id(panel_id).title(spec.title).description(spec.description)
               .datasource(_datasource()).unit(spec.unit).span(spec.width)
               .height(spec.height).thresholds(_thresholds(spec.red_from)))
    if spec.mappings:
        builder = builder.mappings(_mappings(spec.mappings))
    if spec.no_value is not None:
        builder = builder.no_value(spec.no_value)
    instant = spec.kind in ("stat", "table")
    for i, query in enumerate(spec.queries):
        target = (prom_b.Dataquery().ref_id(_ref_id(i)).expr(query.expr)
                  .datasource(_datasource()))
        if query.legend:
            target = target.legend_format(query.legend)
        if instant:
            target = target.instant().format(PromQueryFormat.TABLE if spec.kind == "table"
                                             else PromQueryFormat.TIME_SERIES)
        else:
            target = target.range()
        builder = builder.with_target(target)
    return builder


def _variables() -> list[Any]:
    all_option = dash_m.VariableOption(selected=True, text="All", value="$__all")
    return [
        dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        (dash_b.QueryVariable("instance").label("Node (agent instance)")
         .description("The agents to show, by scrape instance.")
         .datasource(_datasource())
         .query("label_values(meshgress_agent_started_timestamp_seconds, instance)")
         .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dash_m.VariableSort.NATURAL_ASC)
         .multi(True).include_all(True).all_value(".*").current(all_option)),
        (dash_b.QueryVariable("gateway").label("Egress gateway")
         .description("The EgressGateways to show in the egress panels.")
         .datasource(_datasource())
         .query('label_values({__name__=~"meshgress_egress_slot_healthy|'
                'meshgress_gateway_slot_held"}, gateway)')
         .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
         .sort(dash_m.VariableSort.NATURAL_ASC)
         .multi(True).include_all(True).all_value(".*").current(all_option)),
    ]


def build_dashboard() -> dash_m.Dashboard:
    """The dashboard as the SDK's model."""
    builder = (dash_b.Dashboard("meshgress").uid(UID)
               .description("WireGuard mesh health, egress gateways and slots, and the "
                            "node agents' own loop. Generated by "
                            "tests/tools/grafana_dashboard.py: do not edit by hand.")
               .tags(["meshgress", "wireguard", "egress"])
               .editable().tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
               .time("now-3h", "now").refresh("30s").timezone("browser")
               .variables(_variables()))
    panel_id = 0
    for row in ROWS:
        panel_id += 1
        builder = builder.with_row(dash_b.Row(row.title).id(panel_id))
        for spec in row.panels:
            panel_id += 1
            builder = builder.with_panel(_panel(spec, panel_id))
    return builder.build()


def render_dashboard() -> str:
    """The dashboard JSON exactly as committed (sorted keys: stable diffs)."""
    return json.dumps(build_dashboard(), cls=JSONEncoder, indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed JSON differs from the generated one")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render_dashboard()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m tests.tools.grafana_dashboard",
                  file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
