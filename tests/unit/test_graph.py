"""`meshgress graph`: observations parsed from the agent's real /metrics page and from the
real `meshgress status` report, compute_graph table-driven, render_dot sorted and
byte-stable, the scrape edge with a fake fetch, and the command end to end against a
local HTTP server standing in for the agents (no root)."""

import dataclasses
import http.server
import ipaddress
import json
import threading
from datetime import UTC, datetime

import pytest

from meshgress.cli import main
from meshgress.cluster import (
    EGRESS_IP_ANNOTATION,
    ENDPOINT_ANNOTATION,
    HOLDER_ANNOTATION,
    HOLDER_NODE_ANNOTATION,
    PUBLIC_KEY_ANNOTATION,
    parse_node,
)
from meshgress.datastore import LEASE_NAMESPACE
from meshgress.datastore.file import FileDatastore
from meshgress.graph import (
    ClusterObjects,
    GraphError,
    NodeObservation,
    PeerObservation,
    compute_graph,
    metrics_url,
    not_reached,
    parse_agent_metrics,
    parse_cluster,
    parse_status_observation,
    render_dot,
    render_image,
    scrape_agents,
)
from meshgress.lab.topology import lab_cluster_config
from meshgress.prometheus import Exposition, parse_samples
from meshgress.slots import SlotId
from nodeagent.metrics import AgentMetrics
from nodeagent.status import compute_status_report
from wireguard.keys import generate_private_key, public_key
from wireguard.model import Device, Peer, PeerStats

CLUSTER = lab_cluster_config()
NOW = 1_000_000.0
NAMES = ("node1", "node2", "node3")
PRIVATE = {name: generate_private_key() for name in NAMES}
KEY = {name: public_key(k) for name, k in PRIVATE.items()}
STALE = public_key(generate_private_key())
"""A valid key no node publishes."""


def node(name, key="default", ip="default"):
    index = int(name[-1])
    annotations = {}
    if key is not None:
        annotations[PUBLIC_KEY_ANNOTATION] = KEY[name] if key == "default" else key
        annotations[ENDPOINT_ANNOTATION] = f"192.0.2.{10 + index}:51820"
    addresses = [] if ip is None else [
        {"type": "InternalIP", "address": f"192.0.2.{10 + index}" if ip == "default" else ip}]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDRs": [f"198.18.{index}.0/24"]},
            "status": {"addresses": addresses}}


def peer(target, age=5.0, key=None, named=True):
    """A peer configured for `target` (its published key unless `key` is given)."""
    return PeerObservation(public_key=key or KEY[target], node=target if named else None,
                           handshake_age=age)


def seen(*peers, device=None, running=None):
    return NodeObservation(reached=True, peers=tuple(sorted(peers, key=lambda p: p.public_key)),
                           device_key=device, agent_running=running)


def healthy_views(age=5.0):
    return {me: seen(*(peer(other, age) for other in NAMES if other != me)) for me in NAMES}


def graph(observations, nodes=None, **objects):
    snapshot = parse_cluster(ClusterObjects(
        nodes=tuple(nodes if nodes is not None else (node(n) for n in NAMES)),
        **{k: tuple(v) for k, v in objects.items()}), CLUSTER, NOW)
    return compute_graph(snapshot, observations)


def links(result):
    return {(link.a, link.b): link for link in result.links}


# --- observations from the real producers ---------------------------------------------------


def agent_page(peer_stats, peer_names):
    page = Exposition()
    AgentMetrics(started_at=NOW - 100).render(page, counters={}, peer_stats=peer_stats,
                                              peer_names=peer_names, now=NOW)
    return page.render()


def test_an_agent_page_gives_each_configured_key_its_handshake_age_and_name():
    page = agent_page((PeerStats(KEY["node2"], last_handshake_sec=int(NOW) - 7),
                       PeerStats(STALE)),
                      {KEY["node2"]: "node2"})
    observed = parse_agent_metrics(page)
    assert observed.reached and observed.device_key is None
    assert set(observed.peers) == {PeerObservation(KEY["node2"], "node2", 7.0),
                                   PeerObservation(STALE, None, None)}  # "unknown", never


@pytest.mark.parametrize("page, reason", [
    ("<html>hello</html>\n", "unreadable /metrics page"),
    ("# HELP x y\nsome_other_metric 1\n", "not a meshgress agent's /metrics page"),
], ids=["garbage", "another-program"])
def test_a_page_that_is_not_an_agents_makes_the_node_not_reached(page, reason):
    observed = parse_agent_metrics(page)
    assert not observed.reached and observed.error.startswith(reason)


def test_the_status_report_gives_configured_keys_and_the_interfaces_own_key():
    nodes = [parse_node(node(n)) for n in NAMES]
    device = Device("meshgress0", private_key=PRIVATE["node1"], listen_port=51820, mtu=1440,
                    peers=[Peer(KEY["node2"], allowed_ips=["198.18.2.0/24"]),
                           Peer(STALE, allowed_ips=["198.18.3.0/24"])])
    stats = (PeerStats(KEY["node2"], last_handshake_sec=int(NOW) - 3),)
    report = compute_status_report("node1", nodes, device, stats=stats, underlay_mtu=1500,
                                   now=NOW)
    observed = parse_status_observation(json.loads(json.dumps(report.as_dict())))
    assert observed.reached and observed.device_key == KEY["node1"]
    # status attributes the stale key to node3 by its allowed-ips
    assert set(observed.peers) == {PeerObservation(KEY["node2"], "node2", 3.0),
                                   PeerObservation(STALE, "node3", None)}
    missing = compute_status_report("node1", nodes, None, stats=(), underlay_mtu=1500, now=NOW)
    observed = parse_status_observation(missing.as_dict())
    assert observed.reached and observed.notes == ("its mesh interface does not exist",)
    assert not parse_status_observation("no json").reached


@pytest.mark.parametrize("text, expected", [
    ('a{x="1",y="q\\"uote\\\\d\\nz"} 2.5\n', [("a", {"x": "1", "y": 'q"uote\\d\nz'}, 2.5)]),
    ("b 3 1700000000000\n# TYPE c gauge\n\nc{} -1\n", [("b", {}, 3.0), ("c", {}, -1.0)]),
    ('d{le="+Inf"} +Inf\n', [("d", {"le": "+Inf"}, float("inf"))]),
], ids=["escapes", "timestamp-comment-empty-labels", "infinity"])
def test_parse_samples_reads_the_exposition_format(text, expected):
    assert parse_samples(text) == expected


@pytest.mark.parametrize("text", ["a{x=1} 2\n", "a 2 3 4\n", "a{x=\"1\" 2\n", "a one\n"],
                         ids=["unquoted", "extra-field", "unclosed", "not-a-number"])
def test_parse_samples_refuses_what_is_not_a_sample(text):
    with pytest.raises(ValueError, match="line 1"):
        parse_samples(text)


# --- compute_graph: the mesh ----------------------------------------------------------------

LINK_CASES = [
    ("all-fresh", None, healthy_views(5.0),
     {("node1", "node2"): ("fresh", 5.0, False, False, ()),
      ("node1", "node3"): ("fresh", 5.0, False, False, ()),
      ("node2", "node3"): ("fresh", 5.0, False, False, ())}),
    ("stale-and-never",
     None,
     {"node1": seen(peer("node2", 400.0), peer("node3", None)),
      "node2": seen(peer("node1", 390.0), peer("node3", None)),
      "node3": seen(peer("node1", None), peer("node2", None))},
     {("node1", "node2"): ("stale", 390.0, False, False, ()),
      ("node1", "node3"): ("never", None, False, False, ()),
      ("node2", "node3"): ("never", None, False, False, ())}),
    ("freshest-end-wins",
     None,
     {"node1": seen(peer("node2", 500.0)), "node2": seen(peer("node1", 20.0))},
     {("node1", "node2"): ("fresh", 20.0, False, False, ()),
      ("node1", "node3"): ("never", None, True, False, ("node1 has no peer for node3",)),
      ("node2", "node3"): ("never", None, True, False, ("node2 has no peer for node3",))}),
    ("old-key-still-configured",
     None,
     {**healthy_views(), "node2": seen(peer("node1", 9.0, key=STALE), peer("node3"))},
     {("node1", "node2"): ("fresh", 5.0, False, True, (
         f"node2 has key {STALE[:10]}… for node1, which publishes {KEY['node1'][:10]}…",)),
      ("node1", "node3"): ("fresh", 5.0, False, False, ()),
      ("node2", "node3"): ("fresh", 5.0, False, False, ())}),
    ("published-key-is-not-the-interfaces",
     None,
     {**healthy_views(), "node1": seen(peer("node2"), peer("node3"), device=STALE)},
     {("node1", "node2"): ("fresh", 5.0, False, True, (
         f"node2 has key {KEY['node1'][:10]}… for node1, whose interface has {STALE[:10]}…",)),
      ("node1", "node3"): ("fresh", 5.0, False, True, (
         f"node3 has key {KEY['node1'][:10]}… for node1, whose interface has {STALE[:10]}…",)),
      ("node2", "node3"): ("fresh", 5.0, False, False, ())}),
    ("one-node-not-reached",
     None,
     {**healthy_views(), "node3": not_reached("connection refused")},
     {("node1", "node2"): ("fresh", 5.0, False, False, ()),
      ("node1", "node3"): ("fresh", 5.0, False, False, ()),
      ("node2", "node3"): ("fresh", 5.0, False, False, ())}),
    ("nothing-observed",
     None, {},
     {("node1", "node2"): ("unknown", None, False, False, ()),
      ("node1", "node3"): ("unknown", None, False, False, ()),
      ("node2", "node3"): ("unknown", None, False, False, ())}),
    ("a-node-without-key-still-configured-somewhere",
     [node("node1"), node("node2"), node("node3", key=None)],
     {"node1": seen(peer("node2"), peer("node3", 300.0, key=STALE)),
      "node2": seen(peer("node1"))},
     {("node1", "node2"): ("fresh", 5.0, False, False, ()),
      ("node1", "node3"): ("stale", 300.0, False, True, (
          f"node1 has key {STALE[:10]}… for node3, which publishes none",))}),
]


@pytest.mark.parametrize("nodes, observations, expected",
                         [case[1:] for case in LINK_CASES], ids=[c[0] for c in LINK_CASES])
def test_mesh_links(nodes, observations, expected):
    got = {pair: (link.state, link.handshake_age, link.missing, link.mismatch, link.problems)
           for pair, link in links(graph(observations, nodes)).items()}
    assert got == expected


def test_a_link_keeps_what_each_observed_end_has_configured():
    observations = {**healthy_views(), "node3": not_reached("timed out")}
    link = links(graph(observations))[("node1", "node3")]
    assert [(v.observer, v.configured_key) for v in link.views] == [("node1", KEY["node3"])]


@pytest.mark.parametrize("observation, reach, problems", [
    (seen(peer("node2"), peer("node3")), "reached", ()),
    (None, "not-observed", ("not observed",)),
    (not_reached("http://192.0.2.11:9820/metrics: timed out"), "not-reached",
     ("not reached: http://192.0.2.11:9820/metrics: timed out",)),
    (seen(peer("node2"), peer("node3"), running=False), "reached", ("agent not running",)),
    (seen(peer("node2"), peer("node3"), device=STALE), "reached",
     (f"its interface has key {STALE[:10]}…, it publishes {KEY['node1'][:10]}…",)),
    (seen(peer("node2"), peer("node3"), PeerObservation(STALE, None, None)), "reached",
     (f"peer keys no node publishes: {STALE[:10]}…",)),
], ids=["healthy", "not-observed", "not-reached", "agent-stopped", "own-key-differs",
        "stray-peer"])
def test_node_reach_and_problems(observation, reach, problems):
    observations = healthy_views()
    if observation is None:
        del observations["node1"]
    else:
        observations["node1"] = observation
    node1 = graph(observations).nodes[0]
    assert (node1.name, node1.reach, node1.problems) == ("node1", reach, problems)


def test_node_facts_come_from_the_core_parser():
    result = graph({}, [node("node1"), node("node2", key="not a key", ip=None)])
    node1, node2 = result.nodes
    assert (node1.internal_ip, node1.pod_cidrs, node1.public_key) == (
        "192.0.2.11", ("198.18.1.0/24",), KEY["node1"])
    assert node2.internal_ip is None and node2.public_key is None
    assert node2.problems[:2] == (f"{PUBLIC_KEY_ANNOTATION}: not a WireGuard public key",
                                  "publishes no WireGuard key")
    assert result.links == ()  # node2 publishes no key and nobody has a peer for it


# --- compute_graph: gateways and policies ---------------------------------------------------


def gateway(name, ips, **spec):
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
            "metadata": {"name": name}, "spec": {"egressIPs": list(ips), **spec}}


def policy(name, gw, team, priority=None):
    spec = {"gateway": gw, "namespaceSelector": {"matchLabels": {"team": team}}}
    if priority is not None:
        spec["priority"] = priority
    return {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
            "metadata": {"name": name}, "spec": spec}


def namespace(name, team):
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"team": team}}}


def pod(ns, name, node_name):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name},
            "spec": {"nodeName": node_name}, "status": {"podIP": "198.18.1.7"}}


def slot_lease(gw, index, *, holder, holder_node, egress_ip, renewed=NOW - 1):
    stamp = datetime.fromtimestamp(renewed, UTC).isoformat()
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": SlotId(gw, index).lease_name, "namespace": LEASE_NAMESPACE,
                         "annotations": {PUBLIC_KEY_ANNOTATION: KEY["node3"],
                                         ENDPOINT_ANNOTATION: "192.0.2.13:51900",
                                         EGRESS_IP_ANNOTATION: egress_ip,
                                         HOLDER_NODE_ANNOTATION: holder_node,
                                         HOLDER_ANNOTATION: holder}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3,
                     "acquireTime": stamp, "renewTime": stamp}}


EGRESS = dict(
    gateways=[gateway("egress", ["192.0.2.201", "192.0.2.202"]),
              gateway("other", ["192.0.2.202", "192.0.2.203"], failurePolicy="FailOpen")],
    policies=[policy("payments", "egress", "payments"),
              policy("audit", "egress", "payments", priority=5),
              policy("web-a", "other", "web", priority=7), policy("web-b", "other", "web",
                                                                   priority=7),
              policy("ghost", "nowhere", "web", priority=9)],
    namespaces=[namespace("payments", "payments"), namespace("web", "web")],
    pods=[pod("payments", "app", "node1")],
    leases=[slot_lease("egress", 0, holder="node3/77", holder_node="node3",
                       egress_ip="192.0.2.201"),
            slot_lease("other", 1, holder="node3/78", holder_node="node3",
                       egress_ip="192.0.2.203", renewed=NOW - 60)])


def test_gateways_with_their_slots_holders_and_unserved_ips():
    result = graph({}, **EGRESS)
    egress, other = result.gateways
    assert (egress.name, egress.failure_policy) == ("egress", "FailClosed")
    assert [(s.index, s.egress_ip, s.holder, s.holder_node) for s in egress.slots] == [
        (0, "192.0.2.201", "node3/77", "node3"), (1, "192.0.2.202", None, None)]
    assert egress.disabled_ips == ()
    assert other.failure_policy == "FailOpen"
    # Both list .202: the older gateway (here, equally old: the name that sorts first)
    # keeps serving it.
    assert other.disabled_ips == (("192.0.2.202",
                                   "egress serves it (the older gateway listing it)"),)
    # the lease of other/1 expired a minute ago: not held
    assert [(s.index, s.holder) for s in other.slots] == [(1, None)]


def test_policies_with_their_namespaces_and_verdicts():
    result = graph({}, **EGRESS)
    got = {p.name: (p.gateway, p.accepted, p.reason, p.namespaces, p.selected_pods)
           for p in result.policies}
    assert got == {
        "audit": ("egress", True, "Accepted", ("payments",), 1),
        "ghost": ("nowhere", False, "GatewayNotFound", ("web",), 0),
        "payments": ("egress", True, "Accepted", ("payments",), 1),
        "web-a": ("other", False, "Conflict", ("web",), 0),
        "web-b": ("other", False, "Conflict", ("web",), 0),
    }
    assert [p.name for p in result.policies] == sorted(got)


# --- render_dot -----------------------------------------------------------------------------


def full_graph(reverse=False):
    order = (lambda items: list(reversed(list(items)))) if reverse else list
    observations = {**healthy_views(), "node2": seen(peer("node1", key=STALE), peer("node3")),
                    "node3": not_reached("connection refused")}
    if reverse:
        observations = dict(reversed(list(observations.items())))
        observations = {k: dataclasses.replace(v, peers=tuple(reversed(v.peers)))
                        for k, v in observations.items()}
    return graph(observations, order(node(n) for n in NAMES),
                 **{k: order(v) for k, v in EGRESS.items()})


def test_render_dot_is_byte_identical_whatever_order_the_inputs_come_in():
    first = render_dot(full_graph())
    assert render_dot(full_graph()) == first
    assert render_dot(full_graph(reverse=True)) == first


def test_render_dot_draws_every_node_link_slot_and_policy():
    dot = render_dot(full_graph())
    lines = dot.splitlines()
    assert lines[0] == "digraph meshgress {" and lines[-1] == "}"
    assert ('label="meshgress: 3 nodes (2 observed), 3 WireGuard links (1 with key '
            'problems), 2 egress gateways, 5 egress policies\\n') in lines[1]
    for name in NAMES:
        assert sum(line.startswith(f'    "node:{name}" [') for line in lines) == 1
    mesh_edges = [line for line in lines if '"node:' in line.split("->")[0] and "->" in line
                  and '-> "node:' in line]
    assert [e.split(" [")[0].strip() for e in mesh_edges] == [
        '"node:node1" -> "node:node2"', '"node:node1" -> "node:node3"',
        '"node:node2" -> "node:node3"']
    mismatched = next(e for e in mesh_edges if e.strip().startswith('"node:node1" -> "node:node2"'))
    assert 'style="dashed"' in mismatched and "which publishes" in mismatched
    assert (f'tooltip="node1 has {KEY["node2"][:10]}… for node2 (handshake 5s ago); '
            f'node2 has {STALE[:10]}… for node1 (handshake 5s ago)"') in mismatched
    assert all('style="dashed"' not in e for e in mesh_edges if e is not mismatched)
    node3 = next(line for line in lines if line.startswith('    "node:node3" ['))
    assert "not reached: connection refused" in node3 and "dashed" in node3
    assert '"slot:egress/0" -> "node:node3" [' in dot and "held by node3/77" in dot
    assert "192.0.2.202\\nnot served: egress serves it (the older gateway listing it)" in dot
    assert '"namespace:payments" -> "policy:payments";' in dot
    assert '"policy:payments" -> "gateway:egress";' in dot
    assert '"policy:ghost" -> "missing-gateway:nowhere" [color="#c62828", style="dashed"];' in dot
    # sorted: nodes, then policies, by name
    node_lines = [line for line in lines if line.startswith('    "node:')]
    assert node_lines == sorted(node_lines)
    policy_lines = [line for line in lines if line.startswith('  "policy:') and "->" not in line]
    assert [line.split('"')[1] for line in policy_lines] == [
        "policy:audit", "policy:ghost", "policy:payments", "policy:web-a", "policy:web-b"]


def test_render_dot_escapes_what_would_break_a_dot_string():
    observations = {"node1": not_reached('answered "nope" \\ with a backslash\nand a newline')}
    dot = render_dot(graph(observations, [node("node1")]))
    assert 'not reached: answered \\"nope\\" \\\\ with a backslash and a newline' in dot


def test_render_image_refuses_unknown_formats_and_passes_dot_through():
    assert render_image("digraph {}\n", "dot") == b"digraph {}\n"
    with pytest.raises(GraphError, match="use one of dot, svg, png"):
        render_image("digraph {}\n", "gif")


# --- the scrape edge ------------------------------------------------------------------------


def test_metrics_url_brackets_ipv6_and_needs_an_internal_ip():
    template = "http://{address}:9820/metrics?n={node}"
    v6 = dataclasses.replace(parse_node(node("node1")),
                             internal_ip=ipaddress.ip_address("2001:db8::1"))
    assert metrics_url(template, v6) == "http://[2001:db8::1]:9820/metrics?n=node1"
    assert metrics_url(template, parse_node(node("node2", ip=None))) is None


@pytest.mark.parametrize("template, message", [
    ("http://{address}:{port}/metrics", "use only {address} and {node}"),
    ("file:///etc/{node}", "must be an http:// or https:// URL"),
], ids=["unknown-placeholder", "not-http"])
def test_a_bad_metrics_url_template_is_refused_before_anything_is_fetched(template, message):
    fetched = []
    with pytest.raises(GraphError, match=message):
        scrape_agents([parse_node(node("node1"))], url_template=template,
                      fetch=lambda url, timeout: fetched.append(url) or "")
    assert fetched == []


def test_scrape_agents_observes_every_node_and_says_why_one_was_not_reached():
    pages = {"http://192.0.2.11:9820/metrics": agent_page(
        (PeerStats(KEY["node2"], last_handshake_sec=int(NOW) - 4),), {KEY["node2"]: "node2"})}

    def fetch(url, timeout):
        assert timeout == 1.5
        if url not in pages:
            raise ConnectionRefusedError(111, "Connection refused")
        return pages[url]

    nodes = [parse_node(node("node1")), parse_node(node("node2")),
             parse_node(node("node3", ip=None))]
    got = scrape_agents(nodes, url_template="http://{address}:9820/metrics", timeout=1.5,
                        fetch=fetch)
    assert got["node1"].reached and got["node1"].peers[0].node == "node2"
    assert got["node2"] == not_reached(
        "http://192.0.2.12:9820/metrics: [Errno 111] Connection refused")
    assert got["node3"] == not_reached("no InternalIP to reach its agent at")


# --- the command ----------------------------------------------------------------------------


class AgentPages(http.server.BaseHTTPRequestHandler):
    pages: dict[str, str] = {}

    def do_GET(self):
        body = self.pages.get(self.path)
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def agents():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AgentPages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_meshgress_graph_scrapes_the_agents_and_prints_sorted_dot(tmp_path, agents, capsysbinary):
    store = FileDatastore(tmp_path / "datastore")
    for name in NAMES:
        store.apply(node(name))
    store.close()
    AgentPages.pages = {
        "/node1/metrics": agent_page((PeerStats(KEY["node2"], last_handshake_sec=int(NOW)),
                                      PeerStats(KEY["node3"])), {KEY["node2"]: "node2",
                                                                 KEY["node3"]: "node3"}),
        "/node2/metrics": agent_page((PeerStats(STALE, last_handshake_sec=int(NOW)),
                                      PeerStats(KEY["node3"])), {KEY["node3"]: "node3"}),
    }
    argv = ["graph", "--datastore", str(tmp_path / "datastore"), "--timeout", "2",
            "--metrics-url", f"http://127.0.0.1:{agents.server_port}/{{node}}/metrics"]
    assert main(argv) == 0
    dot = capsysbinary.readouterr().out.decode()
    node3 = next(line for line in dot.splitlines() if '"node:node3" [' in line)
    assert "not reached: http://127.0.0.1" in node3 and "Not Found" in node3
    link = next(line for line in dot.splitlines() if '"node:node1" -> "node:node2"' in line)
    assert 'style="dashed"' in link and "node2 has no peer for node1" in link
    assert "peer keys no node publishes" in dot
    output = tmp_path / "cluster.dot"
    assert main([*argv, "--output", str(output)]) == 0
    assert output.read_text().splitlines()[:4] == dot.splitlines()[:4]


@pytest.mark.parametrize("argv, message", [
    (["graph"], "graph: give --datastore"),
    (["graph", "--datastore", "{tmp}", "--metrics-url", "http://{address}:{port}/"],
     "use only {address} and {node}"),
    (["graph", "--datastore", "{tmp}", "--timeout", "0"], "--timeout must be positive"),
], ids=["no-datastore", "bad-template", "bad-timeout"])
def test_meshgress_graph_refuses_bad_arguments_with_a_message(argv, message, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.delenv("MESHGRESS_DATASTORE", raising=False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was created
