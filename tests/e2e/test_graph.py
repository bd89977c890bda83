"""`meshgress lab graph` and `meshgress graph` on a lab of 3 worker nodes and 2 gateway
nodes: a real PNG, a dot text holding every node, peer pair and slot, a node whose
agent is stopped drawn as such, and a node whose published key is rewritten drawn with
dashed links wherever the keys configured for it no longer match."""

import json
import re
import secrets
import struct
import sys
import time
from pathlib import Path

import pytest

from meshgress.cluster import PUBLIC_KEY_ANNOTATION
from meshgress.datastore import Kind
from meshgress.datastore.file import FileDatastore
from meshgress.graph import render_image
from tests.conftest import keep_lab_logs, run_meshgress
from wireguard.keys import generate_private_key, public_key

pytestmark = pytest.mark.e2e

WORKERS = ("node1", "node2", "node3")
NODES = (*WORKERS, "gw1", "gw2")
PAIRS = {(a, b) for i, a in enumerate(sorted(NODES)) for b in sorted(NODES)[i + 1:]}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NODE_LINE = re.compile(r'^    "node:([\w-]+)" \[(.*)\];$')
LINK_LINE = re.compile(r'^  "node:([\w-]+)" -> "node:([\w-]+)" \[(.*)\];$')
SLOT_LINE = re.compile(r'^    "slot:([\w-]+)/(\d+)" \[(.*)\];$')
HOLDER_LINE = re.compile(r'^  "slot:([\w-]+)/(\d+)" -> "node:([\w-]+)" \[(.*)\];$')


def lab(name, *args, **kw):
    return run_meshgress("lab", "--name", name, *args, **kw)


@pytest.fixture(scope="module")
def graph_lab(request):
    name = "g" + secrets.token_hex(3)
    failed_before = request.session.testsfailed
    lab(name, "up", "--nodes", "3", "--gateway-nodes", "2", timeout=240)
    try:
        yield name
    finally:
        if request.session.testsfailed > failed_before:
            keep_lab_logs(name, request.node.nodeid)
        lab(name, "down", check=False)


def parsed(dot):
    """Nodes, links and slots of a dot text with their attribute text, and each slot's
    holder node."""
    nodes, links, slots, holders = {}, {}, {}, {}
    for line in dot.splitlines():
        if m := NODE_LINE.match(line):
            nodes[m[1]] = m[2]
        elif m := LINK_LINE.match(line):
            links[(m[1], m[2])] = m[3]
        elif m := SLOT_LINE.match(line):
            slots[(m[1], int(m[2]))] = m[3]
        elif m := HOLDER_LINE.match(line):
            holders[(m[1], int(m[2]))] = m[3]  # the holder's node
    return nodes, links, slots, holders


def lab_graph(name):
    return parsed(lab(name, "graph").stdout)


def scraped_graph(name):
    """`meshgress graph` as an operator runs it: from a host on the underlay that the
    agents let scrape them (the lab's monitoring host), reading every agent's /metrics at
    its node's InternalIP."""
    state = f"/run/meshgress-lab/{name}"
    return parsed(lab(name, "exec", "monitor", "--", sys.executable, "-m", "meshgress.cli",
                      "graph", "--datastore", f"{state}/datastore", "--cluster-config",
                      f"{state}/cluster.yaml", "--timeout", "5").stdout)


def pod_addresses(name):
    return {f"{p['namespace']}/{p['name']}": p["address"]
            for p in json.loads(lab(name, "status", "--json").stdout)["pods"]}


def test_lab_graph_renders_a_png_and_draws_every_node_pair_and_slot(graph_lab, tmp_path):
    name = graph_lab
    addresses = pod_addresses(name)
    # Every pair handshakes as it joins (one side kicks it); traffic keeps node1-node2 fresh.
    lab(name, "exec", "web/app-node1", "--", "ping", "-c", "3", "-i", "0.2", "-W", "2",
        addresses["web/app-node2"])
    png = tmp_path / "lab.png"
    started = time.monotonic()
    lab(name, "graph", "-o", "png", "--output", str(png))
    print(f"lab graph -o png: {time.monotonic() - started:.1f} s")
    data = png.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    assert len(data) > 20_000 and width > 800 and height > 200, (len(data), width, height)

    dot = lab(name, "graph").stdout
    nodes, links, slots, holders = parsed(dot)
    assert set(nodes) == set(NODES)
    for worker in WORKERS:
        index = worker[-1]
        assert f"192.0.2.1{index}\\npods 198.18.{index}.0/24" in nodes[worker]
    assert all("! " not in attrs for attrs in nodes.values()), nodes
    assert set(links) == PAIRS
    assert all('style="dashed"' not in attrs for attrs in links.values()), links
    assert 'color="#2e7d32"' in links[("node1", "node2")]  # handshake just now: fresh
    assert all('label="never' not in attrs for attrs in links.values()), links
    slots_now = {(s["gateway"], s["index"]): s
                 for s in json.loads(lab(name, "status", "--json").stdout)["slots"]}
    assert set(slots) == set(slots_now) == {("egress", 0), ("egress", 1)}
    for slot, attrs in slots.items():
        assert f"{slots_now[slot]['egressIP']}\\nheld by {slots_now[slot]['holder']}" in attrs
        assert holders[slot] == slots_now[slot]["node"]
    assert '"policy:payments" -> "gateway:egress";' in dot
    assert '"namespace:payments" -> "policy:payments";' in dot
    svg = render_image(dot, "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "<title>node:node3</title>" in svg


def test_graph_from_the_agents_metrics_and_a_stopped_agent(graph_lab):
    """The production path (`meshgress graph` scraping each agent) draws the same nodes
    and links as the lab's view from inside; a stopped agent is drawn as not reached by
    the scrape, while the lab, which reads the node's kernel, still sees its peers."""
    name = graph_lab
    nodes, links, _, holders = scraped_graph(name)
    lab_nodes, lab_links, _, lab_holders = lab_graph(name)
    assert set(nodes) == set(lab_nodes) == set(NODES)
    assert set(links) == set(lab_links) == PAIRS
    assert holders.keys() == lab_holders.keys()
    assert all("! " not in attrs for attrs in nodes.values()), nodes
    lab(name, "agent", "stop", "node3")
    try:
        nodes, links, _, _ = scraped_graph(name)
        assert "! not reached: http://192.0.2.13:9820/metrics:" in nodes["node3"]
        assert 'style="rounded,filled,dashed"' in nodes["node3"]
        assert set(links) == PAIRS  # its peers still come from the other ends
        assert all("! " not in attrs for n, attrs in nodes.items() if n != "node3")
        lab_nodes, _, _, _ = lab_graph(name)
        assert "! agent not running" in lab_nodes["node3"]
        assert "not reached" not in lab_nodes["node3"]
    finally:
        lab(name, "agent", "start", "node3")


def test_a_rewritten_published_key_is_drawn_as_a_mismatch(graph_lab):
    """node1's published key is rewritten in the datastore to another valid key while the
    agents of node1 (which would publish its real key again) and node2 are stopped: node2
    keeps node1's old key configured; node3 and the gateway nodes take the new key, which
    node1's interface does not have. Every link of node1 is dashed, no other is."""
    name = graph_lab
    store = FileDatastore(Path(f"/run/meshgress-lab/{name}/datastore"))
    original = store.get(Kind.NODE, "node1")["metadata"]["annotations"][PUBLIC_KEY_ANNOTATION]
    rewritten = public_key(generate_private_key())
    lab(name, "agent", "stop", "node1")
    lab(name, "agent", "stop", "node2")
    try:
        store.patch_annotations(Kind.NODE, "node1", {PUBLIC_KEY_ANNOTATION: rewritten})
        old, new = f"{original[:10]}…", f"{rewritten[:10]}…"
        expected = {("node1", "node2"): f"node2 has key {old} for node1, which publishes {new}"}
        for other in ("node3", "gw1", "gw2"):
            pair = tuple(sorted(("node1", other)))
            expected[pair] = f"{other} has key {new} for node1, whose interface has {old}"
        deadline = time.monotonic() + 60
        while True:  # until node3 and the gateway nodes' agents have taken the new key
            nodes, links, _, _ = lab_graph(name)
            if all(text in links[pair] for pair, text in expected.items()) \
                    or time.monotonic() > deadline:
                break
        for pair, attrs in links.items():
            if pair in expected:
                assert expected[pair] in attrs and 'style="dashed"' in attrs, (pair, attrs)
            else:
                assert 'style="dashed"' not in attrs, (pair, attrs)
        assert f"! its interface has key {old}, it publishes {new}" in nodes["node1"]
        assert "! agent not running" in nodes["node1"] and "! agent not running" in nodes["node2"]
    finally:
        store.patch_annotations(Kind.NODE, "node1", {PUBLIC_KEY_ANNOTATION: original})
        store.close()
        lab(name, "agent", "start", "node1")
        lab(name, "agent", "start", "node2")
