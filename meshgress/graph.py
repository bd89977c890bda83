"""`meshgress graph`: the cluster as a picture a person can look at (Graphviz).

What it draws: every node with its InternalIP, pod CIDRs and published WireGuard key; one
WireGuard edge per pair of nodes, coloured by the latest handshake either end has seen and
dashed where one end has configured a key for the other that is not the key the other
publishes (or the key its interface really has), or has no peer for it at all; every
EgressGateway with its slots, their egress IPs and holders; and which EgressPolicy sends
which namespaces through which gateway.

The cluster's objects say what should be; what a node really has configured only that
node knows. So the picture joins two inputs:
- the cluster objects, parsed by the core once (`parse_cluster`: `meshgress.cluster` for
  Nodes and slot Leases, `meshgress.egress.compute_egress` for gateways and policies);
- one `NodeObservation` per node: the peer keys it has configured and the age of each
  peer's latest handshake. `meshgress graph` reads them from each agent's /metrics
  (`scrape_agents`, `parse_agent_metrics`); `meshgress lab graph` from
  `meshgress status --json` run inside each lab node (`parse_status_observation`), which
  also tells the key the node's own interface has. A node that could not be observed is
  drawn as such, never left out.

Layers: `parse_cluster`, `compute_graph` and `render_dot` are purely computational (the
same input always gives byte-identical dot: everything is sorted); the I/O sits at the
edges: `read_cluster` (the datastore), `scrape_agents` (HTTP) and `render_image`
(Graphviz's `dot`).
"""

from __future__ import annotations

import http.client
import ipaddress
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Literal

from meshgress.cluster import NodeInfo, SlotHolder, parse_node, parse_slot_holder
from meshgress.config import ClusterConfig
from meshgress.datastore import Datastore, Kind
from meshgress.egress import EgressModel, compute_egress, namespace_labels, pod_view
from meshgress.prometheus import parse_samples
from meshgress.slots import SlotId

HANDSHAKE_FRESH_SECONDS: Final = 180.0
"""WireGuard re-handshakes every 2 minutes while traffic flows and keys expire at 3: a
handshake younger than this means the tunnel works now."""
PEER_HANDSHAKE_METRIC: Final = "meshgress_wireguard_peer_handshake_age_seconds"
"""The agent's per-peer gauge: labels `peer` (the node it believes the key belongs to,
`unknown` otherwise) and `public_key` (the key configured for that peer); -1: never."""
AGENT_MARKER_METRIC: Final = "meshgress_agent_started_timestamp_seconds"
"""Present on every agent's page: tells an agent's /metrics from any other."""
OUTPUT_FORMATS: Final = ("dot", "svg", "png")
KEY_SHOWN: Final = 10
"""Characters of a WireGuard key shown in the picture (as `meshgress status` shows them)."""

Object = Mapping[str, Any]


class GraphError(RuntimeError):
    """The graph cannot be produced as asked; the message says what to change."""


# --- observations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerObservation:
    """One peer configured on a node's mesh interface."""

    public_key: str
    node: str | None
    """The node the observer attributes this peer to (None: none it knows)."""
    handshake_age: float | None
    """Seconds since the latest handshake; None: never."""


@dataclass(frozen=True)
class NodeObservation:
    """What could be learned from one node about its mesh interface."""

    reached: bool
    error: str | None = None
    """Why the node was not reached."""
    peers: tuple[PeerObservation, ...] = ()
    device_key: str | None = None
    """The public key the node's own interface has, when the source tells it."""
    agent_running: bool | None = None
    """Whether the node's agent runs, when that is known apart from `reached`."""
    notes: tuple[str, ...] = ()


def not_reached(error: str) -> NodeObservation:
    return NodeObservation(reached=False, error=error)


def _age(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return None if math.isnan(number) or number < 0 else number


def parse_agent_metrics(text: str) -> NodeObservation:
    """An agent's /metrics page as an observation. Never raises: a page that is not an
    agent's, or cannot be read, makes the node not reached, with the reason."""
    try:
        samples = parse_samples(text)
    except ValueError as exc:
        return not_reached(f"unreadable /metrics page: {exc}")
    if not any(name == AGENT_MARKER_METRIC for name, _, _ in samples):
        return not_reached(f"not a meshgress agent's /metrics page (no {AGENT_MARKER_METRIC})")
    peers = []
    for name, labels, value in samples:
        key = labels.get("public_key")
        if name != PEER_HANDSHAKE_METRIC or not key:
            continue
        peer = labels.get("peer")
        peers.append(PeerObservation(public_key=key,
                                     node=peer if peer and peer != "unknown" else None,
                                     handshake_age=_age(value)))
    return NodeObservation(reached=True, peers=tuple(sorted(peers, key=_peer_order)))


def parse_status_observation(doc: object) -> NodeObservation:
    """The JSON of `meshgress status --json` as an observation. Never raises."""
    if not isinstance(doc, Mapping) or not isinstance(doc.get("peers"), list):
        return not_reached("meshgress status printed no report")
    peers = []
    for row in doc["peers"]:
        if not isinstance(row, Mapping) or not isinstance(row.get("configuredKey"), str):
            continue  # a node with no peer configured here: nothing was observed for it
        node = row.get("node")
        peers.append(PeerObservation(
            public_key=row["configuredKey"],
            node=node if isinstance(node, str) and node not in ("", "?") else None,
            handshake_age=_age(row.get("handshakeAgeSeconds"))))
    device_key = doc.get("ownKeyConfigured")
    notes = () if doc.get("interfacePresent") else ("its mesh interface does not exist",)
    return NodeObservation(reached=True, peers=tuple(sorted(peers, key=_peer_order)),
                           device_key=device_key if isinstance(device_key, str) else None,
                           notes=notes)


def _peer_order(peer: PeerObservation) -> tuple[str, str]:
    return (peer.public_key, peer.node or "")


# --- the cluster, parsed once ---------------------------------------------------------------


@dataclass(frozen=True)
class ClusterObjects:
    """The objects the picture is drawn from, as the datastore holds them."""

    nodes: tuple[Object, ...] = ()
    gateways: tuple[Object, ...] = ()
    policies: tuple[Object, ...] = ()
    namespaces: tuple[Object, ...] = ()
    pods: tuple[Object, ...] = ()
    leases: tuple[Object, ...] = ()


@dataclass(frozen=True)
class ClusterSnapshot:
    """The cluster objects parsed by the core: nodes in name order, the egress model and
    the current slot holders."""

    nodes: tuple[NodeInfo, ...]
    egress: EgressModel
    holders: Mapping[SlotId, SlotHolder]


def parse_cluster(objects: ClusterObjects, cluster: ClusterConfig, now: float) -> ClusterSnapshot:
    """Purely computational."""
    nodes = tuple(sorted((parse_node(o) for o in objects.nodes), key=lambda n: n.name))
    egress = compute_egress(
        gateways=objects.gateways, policies=objects.policies,
        namespaces=namespace_labels(objects.namespaces),
        pods=[pod_view(p) for p in objects.pods],
        node_addresses=[n.internal_ip for n in nodes if n.internal_ip is not None],
        cluster=cluster)
    holders = {h.slot: h for h in (parse_slot_holder(o, now) for o in objects.leases) if h}
    return ClusterSnapshot(nodes=nodes, egress=egress, holders=holders)


# --- the graph as a value -------------------------------------------------------------------

Reach = Literal["reached", "not-reached", "not-observed"]
LinkState = Literal["fresh", "stale", "never", "unknown"]


@dataclass(frozen=True)
class GraphNode:
    name: str
    internal_ip: str | None
    pod_cidrs: tuple[str, ...]
    public_key: str | None
    """The key it publishes."""
    reach: Reach
    problems: tuple[str, ...]


@dataclass(frozen=True)
class EndView:
    """What one end of a link (`observer`) has configured for the other end."""

    observer: str
    configured_key: str | None
    handshake_age: float | None


@dataclass(frozen=True)
class MeshLink:
    """A pair of nodes, `a` < `b` by name."""

    a: str
    b: str
    views: tuple[EndView, ...]
    """The ends that were observed, `a`'s first."""
    state: LinkState
    handshake_age: float | None
    """The most recent handshake either end has seen (a handshake is a shared event)."""
    mismatch: bool
    """A key one end configured for the other is not the key the other publishes, or not
    the key its interface has."""
    missing: bool
    """An observed end has no peer at all for the other, which publishes a key."""
    problems: tuple[str, ...]


@dataclass(frozen=True)
class SlotBox:
    index: int
    egress_ip: str
    holder: str | None
    holder_node: str | None


@dataclass(frozen=True)
class GatewayBox:
    name: str
    failure_policy: str | None
    error: str | None
    slots: tuple[SlotBox, ...]
    disabled_ips: tuple[tuple[str, str], ...]
    """(egress IP, why it is not served)."""


@dataclass(frozen=True)
class PolicyArrow:
    name: str
    gateway: str | None
    priority: int | None
    accepted: bool
    reason: str
    namespaces: tuple[str, ...]
    selected_pods: int


@dataclass(frozen=True)
class ClusterGraph:
    nodes: tuple[GraphNode, ...]
    links: tuple[MeshLink, ...]
    gateways: tuple[GatewayBox, ...]
    policies: tuple[PolicyArrow, ...]


def short_key(key: str | None) -> str:
    return f"{key[:KEY_SHOWN]}…" if key else "-"


def compute_graph(snapshot: ClusterSnapshot,
                  observations: Mapping[str, NodeObservation]) -> ClusterGraph:
    """The picture's content from the parsed cluster and the nodes' observations.
    Purely computational; everything comes out sorted by name."""
    nodes = snapshot.nodes
    links = _links(nodes, observations)
    matched: dict[str, set[str]] = {}
    for link in links:
        for view in link.views:
            if view.configured_key:
                matched.setdefault(view.observer, set()).add(view.configured_key)
    return ClusterGraph(
        nodes=tuple(_graph_node(n, observations.get(n.name), matched.get(n.name, set()))
                    for n in nodes),
        links=links, gateways=_gateways(snapshot), policies=_policies(snapshot.egress))


def _graph_node(info: NodeInfo, seen: NodeObservation | None,
                matched_keys: set[str]) -> GraphNode:
    problems = list(info.problems)
    if info.public_key is None:
        problems.append("publishes no WireGuard key")
    if seen is None:
        reach: Reach = "not-observed"
        problems.append("not observed")
    elif not seen.reached:
        reach = "not-reached"
        problems.append(f"not reached: {seen.error or 'no answer'}")
    else:
        reach = "reached"
        if seen.agent_running is False:
            problems.append("agent not running")
        problems.extend(seen.notes)
        if seen.device_key and info.public_key and seen.device_key != info.public_key:
            problems.append(f"its interface has key {short_key(seen.device_key)}, "
                            f"it publishes {short_key(info.public_key)}")
        stray = sorted({p.public_key for p in seen.peers} - matched_keys)
        if stray:
            shown = ", ".join(short_key(k) for k in stray[:3])
            more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
            problems.append(f"peer keys no node publishes: {shown}{more}")
    return GraphNode(name=info.name,
                     internal_ip=str(info.internal_ip) if info.internal_ip else None,
                     pod_cidrs=tuple(str(c) for c in info.pod_cidrs),
                     public_key=info.public_key, reach=reach, problems=tuple(problems))


@dataclass(frozen=True)
class _Configured:
    """One observer's peers, looked up by key and by the node it names them after (the
    first in key order wins, whatever order the observation came in)."""

    by_key: Mapping[str, PeerObservation]
    by_node: Mapping[str, PeerObservation]

    @classmethod
    def of(cls, seen: NodeObservation) -> _Configured:
        by_key: dict[str, PeerObservation] = {}
        by_node: dict[str, PeerObservation] = {}
        for peer in sorted(seen.peers, key=_peer_order):
            by_key.setdefault(peer.public_key, peer)
            if peer.node:
                by_node.setdefault(peer.node, peer)
        return cls(by_key, by_node)

    def view(self, observer: str, target: NodeInfo) -> EndView:
        """The peer configured for `target`: the one with the key `target` publishes,
        else the one the observer attributes to `target` by name."""
        peer = self.by_key.get(target.public_key) if target.public_key else None
        peer = peer or self.by_node.get(target.name)
        return EndView(observer=observer, configured_key=peer.public_key if peer else None,
                       handshake_age=peer.handshake_age if peer else None)


def _links(nodes: Sequence[NodeInfo],
           observations: Mapping[str, NodeObservation]) -> tuple[MeshLink, ...]:
    configured = {name: _Configured.of(seen) for name, seen in observations.items()
                  if seen.reached}
    links = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            views: list[EndView] = []
            problems: list[str] = []
            mismatch = missing = False
            for observer, target in ((a, b), (b, a)):
                if observer.name not in configured:
                    continue
                view = configured[observer.name].view(observer.name, target)
                views.append(view)
                verdict = _judge(view, target, observations.get(target.name))
                if verdict is not None:
                    kind, text = verdict
                    mismatch |= kind == "mismatch"
                    missing |= kind == "missing"
                    problems.append(text)
            with_peer = [v for v in views if v.configured_key]
            if not (a.public_key and b.public_key) and not with_peer:
                continue  # not meant to be peers, and neither end has the other
            ages = [v.handshake_age for v in with_peer if v.handshake_age is not None]
            freshest = min(ages) if ages else None
            state: LinkState
            if not views:
                state = "unknown"
            elif freshest is None:
                state = "never"
            else:
                state = "fresh" if freshest <= HANDSHAKE_FRESH_SECONDS else "stale"
            links.append(MeshLink(a=a.name, b=b.name, views=tuple(views), state=state,
                                  handshake_age=freshest, mismatch=mismatch, missing=missing,
                                  problems=tuple(problems)))
    return tuple(links)


def _judge(view: EndView, target: NodeInfo,
           target_seen: NodeObservation | None) -> tuple[str, str] | None:
    """("mismatch" | "missing", what a person should read), or None when all is well."""
    observer, configured = view.observer, view.configured_key
    if configured is None:
        if target.public_key is None:
            return None
        return "missing", f"{observer} has no peer for {target.name}"
    if target.public_key is None:
        return "mismatch", (f"{observer} has key {short_key(configured)} for {target.name}, "
                            f"which publishes none")
    if configured != target.public_key:
        return "mismatch", (f"{observer} has key {short_key(configured)} for {target.name}, "
                            f"which publishes {short_key(target.public_key)}")
    device = target_seen.device_key if target_seen and target_seen.reached else None
    if device and configured != device:
        return "mismatch", (f"{observer} has key {short_key(configured)} for {target.name}, "
                            f"whose interface has {short_key(device)}")
    return None


def _gateways(snapshot: ClusterSnapshot) -> tuple[GatewayBox, ...]:
    boxes = []
    for name, view in sorted(snapshot.egress.gateways.items()):
        slots = []
        for slot, ip in view.slots:
            holder = snapshot.holders.get(slot)
            slots.append(SlotBox(index=slot.index, egress_ip=str(ip),
                                 holder=holder.holder if holder else None,
                                 holder_node=holder.node if holder else None))
        boxes.append(GatewayBox(
            name=name,
            failure_policy=view.gateway.failure_policy.value if view.gateway else None,
            error=view.error, slots=tuple(sorted(slots, key=lambda s: s.index)),
            disabled_ips=tuple(sorted({
                **view.disabled_ips,
                **{ip: f"{owner} serves it (the older gateway listing it)"
                   for ip, owner in view.ip_conflicts.items()}}.items()))))
    return tuple(boxes)


def _policies(model: EgressModel) -> tuple[PolicyArrow, ...]:
    return tuple(PolicyArrow(
        name=name, gateway=view.policy.gateway if view.policy else None,
        priority=view.policy.priority if view.policy else None, accepted=view.accepted,
        reason=view.reason, namespaces=tuple(sorted(view.namespaces)),
        selected_pods=len(view.selected)) for name, view in sorted(model.policies.items()))


# --- dot ------------------------------------------------------------------------------------

FONT: Final = "Helvetica"
LINK_COLOURS: Final[Mapping[LinkState, str]] = {
    "fresh": "#2e7d32", "stale": "#ef6c00", "never": "#9e9e9e", "unknown": "#bdbdbd"}
NOT_REACHED_FILL: Final = "#ffebee"
NODE_FILLS: Final[Mapping[Reach, str]] = {
    "reached": "#e8f5e9", "not-reached": NOT_REACHED_FILL, "not-observed": "#f5f5f5"}
TROUBLED_FILL: Final = "#fff3e0"
GATEWAY_FILL: Final = "#e3f2fd"
POLICY_FILL: Final = "#fffde7"
NAMESPACE_FILL: Final = "#f3e5f5"
PROBLEM_COLOUR: Final = "#c62828"
HOLDER_COLOUR: Final = "#1565c0"
QUIET_COLOUR: Final = "#90a4ae"
LEGEND: Final = (f"edge colour: latest WireGuard handshake ≤ {HANDSHAKE_FRESH_SECONDS:.0f} s "
                 "green, older orange, never grey (idle peers never handshake); dotted: "
                 "neither end observed; dashed red: a configured key differs from the "
                 "published one, or a peer is missing")


def _quote(text: str) -> str:
    """A dot string: quotes and backslashes escaped, line breaks as spaces."""
    flat = " ".join(text.splitlines())
    return '"' + flat.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(lines: Iterable[str]) -> str:
    """A multi-line dot label (each line escaped, joined by dot's own `\\n`)."""
    return "\\n".join(_quote(line)[1:-1] for line in lines)


def _attrs(**values: str) -> str:
    """` [a="1", b="2"]` in name order ("" without attributes); every value quoted,
    labels and tooltips as `_label` escaped them."""
    parts = []
    for key, value in sorted(values.items()):
        rendered = f'"{value}"' if key in ("label", "tooltip") else _quote(value)
        parts.append(f"{key}={rendered}")
    return " [" + ", ".join(parts) + "]" if parts else ""


def _statement(indent: str, subject: str, **values: str) -> str:
    return f"{indent}{subject}{_attrs(**values)};"


def _age_text(age: float | None) -> str:
    if age is None:
        return "never"
    seconds = int(age)
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _node_id(name: str) -> str:
    return _quote(f"node:{name}")


def _node_lines(node: GraphNode) -> list[str]:
    lines = [node.name, node.internal_ip or "no InternalIP"]
    lines += [f"pods {cidr}" for cidr in node.pod_cidrs] or ["no pod CIDR"]
    lines.append(f"key {short_key(node.public_key)}")
    lines += [f"! {problem}" for problem in node.problems]
    return lines


def _render_node(node: GraphNode) -> str:
    attrs = {"label": _label(_node_lines(node)), "fillcolor": NODE_FILLS[node.reach]}
    if node.reach != "reached":
        attrs |= {"color": PROBLEM_COLOUR, "style": "rounded,filled,dashed"}
    elif node.problems:
        attrs |= {"color": PROBLEM_COLOUR, "fillcolor": TROUBLED_FILL}
    return _statement("    ", _node_id(node.name), **attrs)


def _render_link(link: MeshLink) -> str:
    lines = [_age_text(link.handshake_age) if link.state != "unknown" else "not observed"]
    lines += link.problems
    def told(view: EndView) -> str:
        other = link.b if view.observer == link.a else link.a
        if view.configured_key is None:
            return f"{view.observer} has no peer for {other}"
        return (f"{view.observer} has {short_key(view.configured_key)} for {other} "
                f"(handshake {_age_text(view.handshake_age)})")

    tooltip = "; ".join(told(view) for view in link.views)
    attrs = {"dir": "none", "color": LINK_COLOURS[link.state], "label": _label(lines),
             "tooltip": _label([tooltip or "neither end observed"])}
    if link.mismatch or link.missing:
        attrs |= {"style": "dashed", "penwidth": "2", "fontcolor": PROBLEM_COLOUR}
    elif link.state == "unknown":
        attrs |= {"style": "dotted"}
    return _statement("  ", f"{_node_id(link.a)} -> {_node_id(link.b)}", **attrs)


def _render_gateway(box: GatewayBox, node_names: set[str]) -> list[str]:
    gateway_id = _quote(f"gateway:{box.name}")
    head = [f"EgressGateway {box.name}",
            box.failure_policy if box.failure_policy else f"invalid: {box.error}"]
    out = [f"  subgraph {_quote(f'cluster_gateway:{box.name}')} {{",
           f'    label="{_label(head)}";', '    style="rounded";',
           _statement("    ", gateway_id, label=_label([box.name]), shape="hexagon",
                      fillcolor=GATEWAY_FILL)]
    edges = []
    for slot in box.slots:
        slot_id = _quote(f"slot:{box.name}/{slot.index}")
        held = f"held by {slot.holder}" if slot.holder else "NOT HELD"
        out.append(_statement("    ", slot_id,
                              label=_label([f"slot {slot.index}", slot.egress_ip, held]),
                              fillcolor=GATEWAY_FILL if slot.holder else NOT_REACHED_FILL))
        edges.append(_statement("  ", f"{gateway_id} -> {slot_id}", arrowhead="none",
                                color=QUIET_COLOUR))
        if slot.holder_node and slot.holder_node in node_names:
            edges.append(_statement("  ", f"{slot_id} -> {_node_id(slot.holder_node)}",
                                    label="holder", color=HOLDER_COLOUR,
                                    fontcolor=HOLDER_COLOUR))
    for index, (ip, why) in enumerate(box.disabled_ips):
        out.append(_statement("    ", _quote(f"disabled:{box.name}/{index}"),
                              label=_label([ip, f"not served: {why}"]),
                              fillcolor=NOT_REACHED_FILL, color=PROBLEM_COLOUR))
    out.append("  }")
    return out + edges


def _render_policy(policy: PolicyArrow, gateways: set[str]) -> list[str]:
    policy_id = _quote(f"policy:{policy.name}")
    head = [f"EgressPolicy {policy.name}"]
    if policy.priority is not None:
        head.append(f"priority {policy.priority}")
    head.append(f"{policy.selected_pods} pods selected")
    if not policy.accepted:
        head.append(f"NOT applied: {policy.reason}")
    edge_style = {} if policy.accepted else {"style": "dashed", "color": PROBLEM_COLOUR}
    out = [_statement("  ", policy_id, label=_label(head), shape="note",
                      fillcolor=POLICY_FILL if policy.accepted else NOT_REACHED_FILL)]
    out += [_statement("  ", f"{_quote(f'namespace:{namespace}')} -> {policy_id}",
                       **edge_style) for namespace in policy.namespaces]
    if policy.gateway is not None:
        prefix = "gateway" if policy.gateway in gateways else "missing-gateway"
        out.append(_statement("  ", f"{policy_id} -> {_quote(f'{prefix}:{policy.gateway}')}",
                              **edge_style))
    return out


def _title(graph: ClusterGraph) -> list[str]:
    observed = sum(n.reach == "reached" for n in graph.nodes)
    troubled = sum(link.mismatch or link.missing for link in graph.links)
    return [f"meshgress: {_count(len(graph.nodes), 'node')} ({observed} observed), "
            f"{_count(len(graph.links), 'WireGuard link')} ({troubled} with key problems), "
            f"{_count(len(graph.gateways), 'egress gateway')}, "
            f"{_count(len(graph.policies), 'egress policy', 'egress policies')}",
            LEGEND]


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def render_dot(graph: ClusterGraph) -> str:
    """The graph as Graphviz dot. Purely computational and sorted: the same graph always
    renders to the same bytes."""
    out = ["digraph meshgress {",
           _statement("  ", "graph", rankdir="LR", fontname=FONT, fontsize="11",
                      labelloc="t", label=_label(_title(graph)), nodesep="0.3",
                      ranksep="0.9"),
           _statement("  ", "node", fontname=FONT, fontsize="10", shape="box",
                      style="rounded,filled", fillcolor="#ffffff"),
           _statement("  ", "edge", fontname=FONT, fontsize="9"),
           '  subgraph "cluster_mesh" {', '    label="nodes (WireGuard mesh)";',
           '    style="rounded";']
    out += [_render_node(node) for node in graph.nodes]
    out.append("  }")
    out += [_render_link(link) for link in graph.links]
    names = {n.name for n in graph.nodes}
    for box in graph.gateways:
        out += _render_gateway(box, names)
    gateway_names = {box.name for box in graph.gateways}
    for missing in sorted({p.gateway for p in graph.policies
                           if p.gateway is not None and p.gateway not in gateway_names}):
        out.append(_statement("  ", _quote(f"missing-gateway:{missing}"),
                              label=_label([f"EgressGateway {missing}", "does not exist"]),
                              shape="hexagon", fillcolor=NOT_REACHED_FILL,
                              color=PROBLEM_COLOUR))
    for namespace in sorted({ns for p in graph.policies for ns in p.namespaces}):
        out.append(_statement("  ", _quote(f"namespace:{namespace}"),
                              label=_label([f"namespace {namespace}"]), shape="folder",
                              fillcolor=NAMESPACE_FILL))
    for policy in graph.policies:
        out += _render_policy(policy, gateway_names)
    out.append("}")
    return "\n".join(out) + "\n"


# --- the edges: datastore, agents, Graphviz -------------------------------------------------


def read_cluster(store: Datastore) -> ClusterObjects:
    return ClusterObjects(
        nodes=tuple(store.list(Kind.NODE).items),
        gateways=tuple(store.list(Kind.EGRESS_GATEWAY).items),
        policies=tuple(store.list(Kind.EGRESS_POLICY).items),
        namespaces=tuple(store.list(Kind.NAMESPACE).items),
        pods=tuple(store.list(Kind.POD).items),
        leases=tuple(store.list(Kind.LEASE).items))


def metrics_url(template: str, node: NodeInfo) -> str | None:
    """The node's agent /metrics URL from `template` ({address}: the node's InternalIP,
    bracketed when IPv6; {node}: its name); None without an InternalIP."""
    if node.internal_ip is None:
        return None
    address = (f"[{node.internal_ip}]" if isinstance(node.internal_ip, ipaddress.IPv6Address)
               else str(node.internal_ip))
    return template.format(address=address, node=node.name)


def check_metrics_url(template: str) -> None:
    """GraphError when `template` is not an http(s) URL using only {address} and {node}."""
    try:
        example = template.format(address="192.0.2.1", node="node")
    except (KeyError, IndexError, ValueError) as exc:
        raise GraphError(f"--metrics-url {template!r}: use only {{address}} and {{node}} "
                         f"({exc!r})") from None
    if not example.startswith(("http://", "https://")):
        raise GraphError(f"--metrics-url {template!r}: must be an http:// or https:// URL")


def http_get(url: str, timeout: float) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{url}: not an http(s) URL")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - checked
        return str(response.read().decode("utf-8"))


Fetch = Callable[[str, float], str]


def scrape_agents(nodes: Sequence[NodeInfo], *, url_template: str, timeout: float = 3.0,
                  fetch: Fetch = http_get, parallel: int = 16) -> dict[str, NodeObservation]:
    """Every node's agent /metrics, scraped at once (up to `parallel` at a time)."""
    check_metrics_url(url_template)

    def observe(node: NodeInfo) -> NodeObservation:
        url = metrics_url(url_template, node)
        if url is None:
            return not_reached("no InternalIP to reach its agent at")
        try:
            return parse_agent_metrics(fetch(url, timeout))
        except urllib.error.URLError as exc:
            return not_reached(f"{url}: {exc.reason}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return not_reached(f"{url}: {exc}")

    if not nodes:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(nodes)))) as pool:
        return dict(zip((n.name for n in nodes), pool.map(observe, nodes), strict=True))


Observe = Callable[[tuple[NodeInfo, ...]], Mapping[str, NodeObservation]]


def collect_graph(store: Datastore, cluster: ClusterConfig, observe: Observe,
                  now: float | None = None) -> ClusterGraph:
    """Read the cluster, observe its nodes with `observe`, and compute the graph."""
    snapshot = parse_cluster(read_cluster(store), cluster, time.time() if now is None else now)
    return compute_graph(snapshot, observe(snapshot.nodes))


def render_image(dot_text: str, fmt: str, timeout: float = 60) -> bytes:
    """`dot_text` as `fmt` (dot, svg or png); svg and png through Graphviz's `dot`."""
    if fmt not in OUTPUT_FORMATS:
        raise GraphError(f"output format {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "dot":
        return dot_text.encode()
    binary = shutil.which("dot")
    if binary is None:
        raise GraphError("Graphviz's `dot` is not installed (Debian: apt-get install "
                         "graphviz); `-o dot` prints the graph without it")
    try:
        proc = subprocess.run([binary, f"-T{fmt}"], input=dot_text.encode(),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise GraphError(f"dot -T{fmt} did not finish within {timeout:.0f}s") from None
    if proc.returncode != 0 or not proc.stdout:
        raise GraphError(f"dot -T{fmt} failed (exit {proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout
