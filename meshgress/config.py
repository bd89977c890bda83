"""Cluster-wide settings every component must agree on, loaded from one YAML file.

The cluster pod range and the service range are facts about the cluster that meshgress
cannot discover from a Node object, yet they decide what is always excluded from egress
steering, what the fail-closed rules protect and which egress IPs are invalid. They live
here, parsed and validated once, as a frozen value.

Purely computational apart from `load_cluster_config`, which reads a file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshgress import kube_yaml

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """The configuration file is malformed; the message names the field."""


@dataclass(frozen=True)
class ClusterConfig:
    pod_cidrs: tuple[IPNetwork, ...]
    service_cidrs: tuple[IPNetwork, ...]

    def in_cluster_ranges(self, net: IPNetwork) -> str | None:
        """Name the cluster range that overlaps `net`, or None."""
        for cidr in self.pod_cidrs:
            if cidr.version == net.version and cidr.overlaps(net):
                return f"the cluster pod range {cidr}"
        for cidr in self.service_cidrs:
            if cidr.version == net.version and cidr.overlaps(net):
                return f"the service range {cidr}"
        return None


DEFAULT_CLUSTER_CONFIG = ClusterConfig(
    pod_cidrs=(ipaddress.ip_network("10.244.0.0/16"),),
    service_cidrs=(ipaddress.ip_network("10.96.0.0/12"),),
)
"""kubeadm's defaults, used when no configuration names the ranges."""


def _parse_cidr_list(doc: Mapping[str, Any], field: str) -> tuple[IPNetwork, ...]:
    raw = doc.get(field)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{field}: must be a non-empty list of CIDRs")
    out: list[IPNetwork] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ConfigError(f"{field}[{i}]: must be a CIDR string, got {item!r}")
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            raise ConfigError(f"{field}[{i}]: {item!r} is not a canonical CIDR ({exc})") from None
    return tuple(out)


def parse_cluster_config(doc: Mapping[str, Any]) -> ClusterConfig:
    """Turn `{clusterPodCIDRs: [...], serviceCIDRs: [...]}` into a ClusterConfig."""
    unknown = sorted(set(doc) - {"clusterPodCIDRs", "serviceCIDRs"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field")
    return ClusterConfig(
        pod_cidrs=_parse_cidr_list(doc, "clusterPodCIDRs"),
        service_cidrs=_parse_cidr_list(doc, "serviceCIDRs"),
    )


def load_cluster_config(path: Path) -> ClusterConfig:
    try:
        doc = kube_yaml.load(path.read_text())
    except (OSError, UnicodeDecodeError, kube_yaml.KubeYamlError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must be a mapping")
    return parse_cluster_config(doc)


def dump_cluster_config(config: ClusterConfig) -> dict[str, Any]:
    return {
        "clusterPodCIDRs": [str(c) for c in config.pod_cidrs],
        "serviceCIDRs": [str(c) for c in config.service_cidrs],
    }
