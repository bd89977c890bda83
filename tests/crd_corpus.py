"""One corpus of EgressGateway and EgressPolicy documents, judged by meshgress's parser and
by the API server with the CRDs of charts/meshgress/crds.

Each case says what both must do: accept, or reject with a message. `parser` is the
parser's whole message; `api` is what the API server's message must contain. Where a CRD
rule could give the parser's words, `api` is the parser's problem text, so a reworded
message on either side shows up here. Cases where the two legitimately differ in wording
(OpenAPI bounds and enums, which the API server words itself) name the API server's own.

tests/unit/test_crd_corpus.py runs the parser side (no root); the API server side runs in
tests/privileged/test_crds.py against a real kube-apiserver.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass
from typing import Any

import pytest

API_VERSION = "meshgress.io/v1alpha1"


@dataclass(frozen=True)
class Case:
    id: str
    doc: dict[str, Any]
    parser: str | None
    """The parser's message, None when it accepts the document."""
    api: str | None
    """A part of the API server's message, None when it accepts the document."""

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])


def gateway(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "EgressGateway", "metadata": {"name": name},
            "spec": {"egressIPs": ["203.0.113.10"], **spec}}


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "EgressPolicy", "metadata": {"name": name},
            "spec": {"gateway": "partner-a", "namespaceSelector": {}, **spec}}


def without(doc: dict[str, Any], field: str) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    del doc["spec"][field]
    return doc


def same(field: str, problem: str) -> tuple[str, str]:
    """The parser's message, and the part the API server's message must share with it."""
    return f"{field}: {problem}", problem


def case(id_: str, doc: dict[str, Any], expected: tuple[str, str] | None = None, *,
         api: str | None = None) -> Case:
    if expected is None:
        return Case(id_, doc, None, None)
    parser, shared = expected
    return Case(id_, doc, parser, api if api is not None else shared)


SUBDOMAIN = ("must be a lowercase RFC 1123 subdomain: lowercase alphanumeric characters, "
             "'-' or '.', starting and ending with an alphanumeric character")

GATEWAYS = [
    case("gw-minimal", gateway("gw-minimal")),
    case("gw-full", gateway("gw-full", egressIPs=["203.0.113.11", "2001:db8::11"],
                            interface="eth1", failurePolicy="FailOpen",
                            healthCheck={"intervalMilliseconds": 200,
                                         "timeoutMilliseconds": 150, "failureThreshold": 5},
                            nodeSelector={"matchLabels": {"meshgress.io/gateway": "true"}})),
    case("gw-no-ips", gateway("gw-no-ips", egressIPs=[]),
         ("spec.egressIPs: must list at least one IP address", "should have at least 1 items")),
    case("gw-ips-missing", without(gateway("gw-ips-missing"), "egressIPs"),
         ("spec.egressIPs: required", "spec.egressIPs: Required value")),
    case("gw-too-many-ips", gateway("gw-too-many-ips",
                                    egressIPs=[f"203.0.113.{i}" for i in range(1, 128)]),
         ("spec.egressIPs: must list at most 126 IP addresses, got 127",
          "must have at most 126 items")),
    case("gw-cidr", gateway("gw-cidr", egressIPs=["203.0.113.0/24"]),
         same("spec.egressIPs[0]", '"203.0.113.0/24" must be a single IP address, not a CIDR')),
    case("gw-zone", gateway("gw-zone", egressIPs=["fe80::1%eth0"]),
         same("spec.egressIPs[0]", '"fe80::1%eth0" must not carry a zone index (%...)')),
    case("gw-not-an-ip", gateway("gw-not-an-ip", egressIPs=["203.0.113.300"]),
         same("spec.egressIPs[0]", '"203.0.113.300" is not an IP address')),
    case("gw-unspecified", gateway("gw-unspecified", egressIPs=["0.0.0.0"]),
         same("spec.egressIPs[0]", "0.0.0.0 is the unspecified address")),
    case("gw-loopback", gateway("gw-loopback", egressIPs=["::1"]),
         same("spec.egressIPs[0]", "::1 is a loopback address")),
    case("gw-multicast", gateway("gw-multicast", egressIPs=["203.0.113.1", "239.1.2.3"]),
         same("spec.egressIPs[1]", "239.1.2.3 is a multicast address")),
    case("gw-link-local", gateway("gw-link-local", egressIPs=["169.254.10.1"]),
         same("spec.egressIPs[0]", "169.254.10.1 is a link-local address")),
    case("gw-this-network", gateway("gw-this-network", egressIPs=["0.1.2.3"]),
         same("spec.egressIPs[0]", '0.1.2.3 is in 0.0.0.0/8, which means "this network"')),
    case("gw-broadcast", gateway("gw-broadcast", egressIPs=["255.255.255.255"]),
         same("spec.egressIPs[0]", "255.255.255.255 is the limited broadcast address")),
    case("gw-v4-mapped", gateway("gw-v4-mapped", egressIPs=["::ffff:203.0.113.7"]),
         # Python before 3.13 prints a mapped address in hex (::ffff:cb00:7107).
         (f"spec.egressIPs[0]: {ipaddress.ip_address('::ffff:203.0.113.7')} is an IPv4-mapped "
          "IPv6 address; write 203.0.113.7 instead",
          "::ffff:203.0.113.7 is an IPv4-mapped IPv6 address; write 203.0.113.7 instead")),
    case("gw-reserved-v4", gateway("gw-reserved-v4", egressIPs=["240.0.0.1"]),
         same("spec.egressIPs[0]", "240.0.0.1 is in a reserved range")),
    case("gw-reserved-v6", gateway("gw-reserved-v6", egressIPs=["4000::1"]),
         same("spec.egressIPs[0]", "4000::1 is in a reserved range")),
    case("gw-duplicate-ip", gateway("gw-duplicate-ip",
                                    egressIPs=["203.0.113.5", "203.0.113.6", "203.0.113.5"]),
         ("spec.egressIPs[2]: 203.0.113.5 is a duplicate of spec.egressIPs[0]",
          "203.0.113.5 is listed more than once")),
    case("gw-duplicate-spelling", gateway("gw-duplicate-spelling",
                                          egressIPs=["2001:db8::5", "2001:DB8:0::5"]),
         ("spec.egressIPs[1]: 2001:db8::5 is a duplicate of spec.egressIPs[0]",
          "2001:db8::5 is listed more than once")),
    case("gw-unknown-policy", gateway("gw-unknown-policy", failurePolicy="FailSometimes"),
         ('spec.failurePolicy: "FailSometimes" is not one of FailClosed, FailOpen',
          'Unsupported value: "FailSometimes": supported values: "FailClosed", "FailOpen"')),
    case("gw-interval-low", gateway("gw-interval-low", healthCheck={"intervalMilliseconds": 20}),
         ("spec.healthCheck.intervalMilliseconds: must be between 50 and 10000, got 20",
          "spec.healthCheck.intervalMilliseconds in body should be greater than or equal to 50")),
    case("gw-timeout-default", gateway("gw-timeout-default",
                                       healthCheck={"intervalMilliseconds": 60}),
         ("spec.healthCheck.timeoutMilliseconds: 80 (the default) must be less than "
          "intervalMilliseconds (60)",
          "spec.healthCheck.timeoutMilliseconds: Invalid value: must be less than "
          "intervalMilliseconds")),
    case("gw-threshold-high", gateway("gw-threshold-high", healthCheck={"failureThreshold": 11}),
         ("spec.healthCheck.failureThreshold: must be between 1 and 10, got 11",
          "should be less than or equal to 10")),
    case("gw-interface-colon", gateway("gw-interface-colon", interface="eth0:1"),
         same("spec.interface",
              '"eth0:1" is not a valid Linux interface name: must not contain \':\'')),
    case("gw-interface-space", gateway("gw-interface-space", interface="eth 0"),
         same("spec.interface",
              '"eth 0" is not a valid Linux interface name: must not contain whitespace')),
    case("gw-interface-dots", gateway("gw-interface-dots", interface=".."),
         same("spec.interface",
              '".." is not a valid Linux interface name: must not be \'.\' or \'..\'')),
    case("gw-interface-long", gateway("gw-interface-long", interface="a-very-long-name0"),
         ('spec.interface: "a-very-long-name0" is not a valid Linux interface name: must be '
          "at most 15 characters", "spec.interface: Too long: may not be more than 15")),
    case("gw-node-expressions", gateway("gw-node-expressions", nodeSelector={
        "matchExpressions": [{"key": "zone", "operator": "Exists"}]}),
         same("spec.nodeSelector.matchExpressions", "not supported here; use matchLabels")),
    case("gw-unknown-field", gateway("gw-unknown-field", egressIP="203.0.113.10"),
         ("spec.egressIP: unknown field", 'unknown field "spec.egressIP"')),
]

POLICIES = [
    case("egp-minimal", policy("egp-minimal")),
    case("egp-full", policy("egp-full", namespaceSelector={"matchLabels": {"team": "billing"}},
                            podSelector={"matchExpressions": [
                                {"key": "app", "operator": "In", "values": ["api", "web"]},
                                {"key": "canary", "operator": "DoesNotExist"}]},
                            destinationCIDRs=["198.51.100.0/24", "2001:db8::/32"],
                            excludedCIDRs=["198.51.100.128/25"], priority=10)),
    case("egp-no-gateway", without(policy("egp-no-gateway"), "gateway"),
         ("spec.gateway: required", "spec.gateway: Required value")),
    case("egp-bad-gateway", policy("egp-bad-gateway", gateway="Partner_A"),
         same("spec.gateway", f'"Partner_A" is not a valid name: {SUBDOMAIN}')),
    case("egp-no-namespaces", without(policy("egp-no-namespaces"), "namespaceSelector"),
         ("spec.namespaceSelector: required; use {} to select every namespace",
          "spec.namespaceSelector: Required value")),
    case("egp-priority-high", policy("egp-priority-high", priority=70000),
         ("spec.priority: must be between 0 and 65535, got 70000",
          "spec.priority in body should be less than or equal to 65535")),
    case("egp-priority-negative", policy("egp-priority-negative", priority=-1),
         ("spec.priority: must be between 0 and 65535, got -1",
          "spec.priority in body should be greater than or equal to 0")),
    case("egp-empty-destinations", policy("egp-empty-destinations", destinationCIDRs=[]),
         ("spec.destinationCIDRs: must not be empty; omit the field to mean every destination",
          "spec.destinationCIDRs in body should have at least 1 items")),
    case("egp-too-many-cidrs", policy("egp-too-many-cidrs", excludedCIDRs=[
        f"198.18.{i}.0/24" for i in range(257)]),
         ("spec.excludedCIDRs: must list at most 256 CIDRs, got 257",
          "must have at most 256 items")),
    case("egp-bare-address", policy("egp-bare-address", destinationCIDRs=["198.51.100.7"]),
         same("spec.destinationCIDRs[0]",
              '"198.51.100.7" is not a CIDR: it needs a prefix length, like 10.0.0.0/8')),
    case("egp-bad-cidr", policy("egp-bad-cidr", destinationCIDRs=["198.51.100.0/33"]),
         same("spec.destinationCIDRs[0]", '"198.51.100.0/33" is not a CIDR')),
    case("egp-host-bits", policy("egp-host-bits", excludedCIDRs=["198.51.100.7/24"]),
         ("spec.excludedCIDRs[0]: 198.51.100.7/24 has host bits set; the canonical form "
          "would be 198.51.100.0/24", "198.51.100.7/24 has host bits set")),
    case("egp-cidr-zone", policy("egp-cidr-zone", destinationCIDRs=["fe80::%2/64"]),
         same("spec.destinationCIDRs[0]", '"fe80::%2/64" must not carry a zone index (%...)')),
    case("egp-duplicate-cidr", policy("egp-duplicate-cidr",
                                      destinationCIDRs=["198.51.100.0/24", "198.51.100.0/24"]),
         ("spec.destinationCIDRs[1]: 198.51.100.0/24 is a duplicate of "
          "spec.destinationCIDRs[0]", "198.51.100.0/24 is listed more than once")),
    case("egp-bad-label-key", policy("egp-bad-label-key",
                                     namespaceSelector={"matchLabels": {"bad key": "x"}}),
         ('spec.namespaceSelector.matchLabels: "bad key" is not a valid label key: name part '
          "must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
          "with an alphanumeric character", '"bad key" is not a valid label key')),
    case("egp-bad-label-value", policy("egp-bad-label-value",
                                       podSelector={"matchLabels": {"app": "web!"}}),
         ('spec.podSelector.matchLabels["app"]: "web!" is not a valid label value: must be '
          "empty or consist of alphanumeric characters, '-', '_' or '.', and must start and "
          "end with an alphanumeric character", '"web!" is not a valid label value')),
    case("egp-in-without-values", policy("egp-in-without-values", podSelector={
        "matchExpressions": [{"key": "app", "operator": "In"}]}),
         same("spec.podSelector.matchExpressions[0].values",
              "must be a non-empty list when operator is In")),
    case("egp-exists-with-values", policy("egp-exists-with-values", podSelector={
        "matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]}),
         same("spec.podSelector.matchExpressions[0].values",
              "must be empty when operator is Exists")),
    case("egp-unknown-operator", policy("egp-unknown-operator", podSelector={
        "matchExpressions": [{"key": "app", "operator": "Like"}]}),
         ('spec.podSelector.matchExpressions[0].operator: "Like" is not one of In, NotIn, '
          "Exists, DoesNotExist", 'Unsupported value: "Like": supported values: "In", '
          '"NotIn", "Exists", "DoesNotExist"')),
    case("egp-unknown-field", policy("egp-unknown-field", priorty=5),
         ("spec.priorty: unknown field", 'unknown field "spec.priorty"')),
]

CORPUS = GATEWAYS + POLICIES


def cases() -> list[Any]:
    return [pytest.param(c, id=c.id) for c in CORPUS]
