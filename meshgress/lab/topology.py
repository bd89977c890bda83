"""The lab's shape as a value: which namespaces, addresses and objects a lab of N nodes has.

`meshgress lab up` first computes this (purely, from the lab's name and sizes), then
applies it, and `lab status` and `lab down` read it back. Keeping the shape apart from
the code that builds it means the address plan is tested without root and the builder
never invents a name on the fly — every kernel object the lab makes is named here, under
one prefix, which is how `lab down` finds leftovers of a crashed run.

Address plan (documentation and benchmark ranges only):
- underlay 192.0.2.0/24: nodes from .11, gateway nodes from .101, the outside host .254,
  the monitoring host .250, egress IPs from .201;
- cluster pod range 198.18.0.0/16, one /24 per node (node k gets 198.18.k.0/24);
- service range 198.19.0.0/16.

Purely computational: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from meshgress.api import GATEWAY_NODE_LABEL
from meshgress.config import ClusterConfig

LAB_NAMESPACE_PREFIX = "mg-"
"""Every lab network namespace is named `mg-<lab>-<role>`."""

UNDERLAY_CIDR = ipaddress.IPv4Network("192.0.2.0/24")
CLUSTER_POD_CIDR = ipaddress.IPv4Network("198.18.0.0/16")
SERVICE_CIDR = ipaddress.IPv4Network("198.19.0.0/16")
OUTSIDE_ADDRESS = ipaddress.IPv4Address("192.0.2.254")
MONITOR_ADDRESS = ipaddress.IPv4Address("192.0.2.250")
"""A monitoring host on the underlay (outside the cluster, like a Prometheus server on the
platform team's network): the agents allow it through their endpoint guard with
--metrics-allow-from, while the outside host stays shut out."""
ECHO_PORT = 7777
"""The outside host's TCP and UDP echo port: it answers with the source it saw."""

FIRST_NODE_HOST = 11
FIRST_GATEWAY_NODE_HOST = 101
FIRST_EGRESS_IP_HOST = 201
MAX_NODES = 80
MAX_GATEWAY_NODES = 50

LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")

LAB_KUBE_NAMESPACES: tuple[tuple[str, dict[str, str]], ...] = (
    ("payments", {"team": "payments", "egress": "stable"}),
    ("web", {"team": "web"}),
)
"""The Kubernetes namespaces the lab creates, with their labels (besides the
`kubernetes.io/metadata.name` label Kubernetes puts on every namespace)."""


class LabSpecError(ValueError):
    """The requested lab cannot be built; the message says why."""


@dataclass(frozen=True)
class LabNode:
    name: str
    role: str  # "worker" or "gateway"
    netns: str
    underlay_ifname: str  # the node's port name inside the underlay namespace
    underlay_address: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network


@dataclass(frozen=True)
class LabTopology:
    name: str
    underlay_netns: str
    outside_netns: str
    monitor_netns: str
    bridge: str
    nodes: tuple[LabNode, ...]
    egress_ips: tuple[ipaddress.IPv4Address, ...]

    @property
    def prefix(self) -> str:
        return lab_prefix(self.name)

    @property
    def netns_names(self) -> tuple[str, ...]:
        return (self.underlay_netns, self.outside_netns, self.monitor_netns,
                *(n.netns for n in self.nodes))

    def node(self, name: str) -> LabNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def lab_prefix(name: str) -> str:
    return f"{LAB_NAMESPACE_PREFIX}{name}-"


def lab_cluster_config() -> ClusterConfig:
    return ClusterConfig(pod_cidrs=(CLUSTER_POD_CIDR,), service_cidrs=(SERVICE_CIDR,))


def compute_lab_topology(name: str, nodes: int, gateway_nodes: int) -> LabTopology:
    """The lab's namespaces and addresses; raises LabSpecError on an impossible request."""
    if not LAB_NAME_RE.match(name):
        raise LabSpecError(
            f"lab name {name!r}: use 1-8 lowercase letters or digits, starting with a letter"
        )
    if not 1 <= nodes <= MAX_NODES:
        raise LabSpecError(f"--nodes {nodes}: must be between 1 and {MAX_NODES}")
    if not 0 <= gateway_nodes <= MAX_GATEWAY_NODES:
        raise LabSpecError(f"--gateway-nodes {gateway_nodes}: must be between 0 and "
                           f"{MAX_GATEWAY_NODES}")
    prefix = lab_prefix(name)
    pod_subnets = list(CLUSTER_POD_CIDR.subnets(new_prefix=24))
    members: list[LabNode] = []
    for i in range(nodes):
        node_name = f"node{i + 1}"
        members.append(LabNode(
            name=node_name, role="worker", netns=f"{prefix}{node_name}",
            underlay_ifname=node_name,
            underlay_address=UNDERLAY_CIDR[FIRST_NODE_HOST + i],
            pod_cidr=pod_subnets[i + 1],
        ))
    for i in range(gateway_nodes):
        node_name = f"gw{i + 1}"
        members.append(LabNode(
            name=node_name, role="gateway", netns=f"{prefix}{node_name}",
            underlay_ifname=node_name,
            underlay_address=UNDERLAY_CIDR[FIRST_GATEWAY_NODE_HOST + i],
            pod_cidr=pod_subnets[MAX_NODES + 1 + i],
        ))
    return LabTopology(
        name=name,
        underlay_netns=f"{prefix}underlay",
        outside_netns=f"{prefix}outside",
        monitor_netns=f"{prefix}monitor",
        bridge="br0",
        nodes=tuple(members),
        egress_ips=(UNDERLAY_CIDR[FIRST_EGRESS_IP_HOST], UNDERLAY_CIDR[FIRST_EGRESS_IP_HOST + 1]),
    )


LAB_GATEWAY_NAME = "egress"
LAB_POLICY_NAME = "payments"


def compute_egress_objects(topology: LabTopology) -> list[dict[str, Any]]:
    """With gateway nodes: one EgressGateway holding the lab's egress IPs on the underlay,
    and one EgressPolicy sending the `payments` namespace through it."""
    if not any(n.role == "gateway" for n in topology.nodes):
        return []
    return [
        {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
         "metadata": {"name": LAB_GATEWAY_NAME},
         "spec": {"egressIPs": [str(ip) for ip in topology.egress_ips], "interface": "eth0",
                  "failurePolicy": "FailClosed"}},
        {"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
         "metadata": {"name": LAB_POLICY_NAME},
         "spec": {"gateway": LAB_GATEWAY_NAME,
                  "namespaceSelector": {"matchLabels": {"team": "payments"}}}},
    ]


def compute_cluster_objects(topology: LabTopology) -> list[dict[str, Any]]:
    """The Node and Namespace objects the lab writes into its datastore."""
    objects: list[dict[str, Any]] = []
    for node in topology.nodes:
        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
        if node.role == "gateway":
            labels[GATEWAY_NODE_LABEL] = "true"
        objects.append({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "spec": {"podCIDR": str(node.pod_cidr), "podCIDRs": [str(node.pod_cidr)]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": str(node.underlay_address)},
                {"type": "Hostname", "address": node.name},
            ]},
        })
    for ns_name, extra in LAB_KUBE_NAMESPACES:
        objects.append({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns_name,
                "labels": {"kubernetes.io/metadata.name": ns_name, **extra},
            },
        })
    return objects
