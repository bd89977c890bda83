"""The lab's address plan, computed without root."""

import ipaddress

import pytest

from meshgress.lab.topology import (
    CLUSTER_POD_CIDR,
    OUTSIDE_ADDRESS,
    UNDERLAY_CIDR,
    LabSpecError,
    compute_cluster_objects,
    compute_lab_topology,
)


def test_names_addresses_and_pod_cidrs_are_distinct_and_in_range():
    topo = compute_lab_topology("lab", nodes=3, gateway_nodes=2)
    assert [n.name for n in topo.nodes] == ["node1", "node2", "node3", "gw1", "gw2"]
    assert all(ns.startswith("mg-lab-") for ns in topo.netns_names)
    assert len(set(topo.netns_names)) == len(topo.netns_names)
    addresses = [n.underlay_address for n in topo.nodes]
    assert len(set(addresses)) == len(addresses)
    assert all(a in UNDERLAY_CIDR for a in addresses)
    assert OUTSIDE_ADDRESS not in addresses
    assert not set(topo.egress_ips) & set(addresses)
    cidrs = [n.pod_cidr for n in topo.nodes]
    assert all(c.subnet_of(CLUSTER_POD_CIDR) for c in cidrs)
    assert all(not a.overlaps(b) for i, a in enumerate(cidrs) for b in cidrs[i + 1:])


def test_largest_lab_still_fits():
    topo = compute_lab_topology("big", nodes=80, gateway_nodes=50)
    assert len({n.underlay_address for n in topo.nodes}) == 130
    assert len({n.pod_cidr for n in topo.nodes}) == 130


@pytest.mark.parametrize(
    ("name", "nodes", "gateways", "message"),
    [
        ("Lab", 2, 2,
         "lab name 'Lab': use 1-8 lowercase letters or digits, starting with a letter"),
        ("toolongname", 2, 2, "lab name 'toolongname': use 1-8 lowercase letters or digits, "
                              "starting with a letter"),
        ("lab", 0, 2, "--nodes 0: must be between 1 and 80"),
        ("lab", 81, 2, "--nodes 81: must be between 1 and 80"),
        ("lab", 2, -1, "--gateway-nodes -1: must be between 0 and 50"),
    ],
    ids=["uppercase-name", "long-name", "no-nodes", "too-many-nodes", "negative-gateways"],
)
def test_impossible_labs_are_refused(name, nodes, gateways, message):
    with pytest.raises(LabSpecError) as err:
        compute_lab_topology(name, nodes, gateways)
    assert str(err.value) == message


def test_cluster_objects_are_kubernetes_shaped():
    topo = compute_lab_topology("lab", nodes=1, gateway_nodes=1)
    objs = compute_cluster_objects(topo)
    nodes = [o for o in objs if o["kind"] == "Node"]
    namespaces = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Namespace"}
    assert [n["spec"]["podCIDRs"] for n in nodes] == [["198.18.1.0/24"], ["198.18.81.0/24"]]
    assert nodes[1]["metadata"]["labels"]["meshgress.io/gateway"] == "true"
    assert "meshgress.io/gateway" not in nodes[0]["metadata"]["labels"]
    assert nodes[0]["status"]["addresses"][0] == {"type": "InternalIP", "address": "192.0.2.11"}
    assert set(namespaces) == {"payments", "web"}
    assert namespaces["payments"]["metadata"]["labels"]["kubernetes.io/metadata.name"] == "payments"
    ipaddress.ip_network(nodes[0]["spec"]["podCIDR"])
