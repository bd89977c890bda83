"""Table tests for parsing EgressGateway and EgressPolicy documents into the model."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from typing import Any

import pytest
import yaml

from meshgress import api, validation
from meshgress.api import (
    ALL_DESTINATIONS,
    DEFAULT_GATEWAY_NODE_SELECTOR,
    EgressGateway,
    EgressPolicy,
    FailurePolicy,
    HealthCheck,
    ValidationError,
    parse_egress_gateway,
    parse_egress_policy,
)
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig
from meshgress.selectors import MATCH_EVERYTHING, LabelSelector, Operator, Requirement

# kubeadm's defaults: pods in 10.244.0.0/16, services in 10.96.0.0/12.
CLUSTER = DEFAULT_CLUSTER_CONFIG

LABEL_CHARS_RULE = (
    "alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character"
)
DNS_SUBDOMAIN_RULE = (
    "must be a lowercase RFC 1123 subdomain: lowercase alphanumeric characters, "
    "'-' or '.', starting and ending with an alphanumeric character"
)


def gateway_doc(**spec: Any) -> dict[str, Any]:
    """A minimal valid EgressGateway; keyword arguments replace spec fields."""
    return {
        "apiVersion": "meshgress.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": "partner-a"},
        "spec": {"egressIPs": ["192.0.2.10"], **spec},
    }


def policy_doc(**spec: Any) -> dict[str, Any]:
    """A minimal valid EgressPolicy; keyword arguments replace spec fields."""
    return {
        "apiVersion": "meshgress.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "billing-to-partner-a"},
        "spec": {
            "gateway": "partner-a",
            "namespaceSelector": {"matchLabels": {"team": "billing"}},
            **spec,
        },
    }


def with_changes(doc: dict[str, Any], **top: Any) -> dict[str, Any]:
    """`doc` with top-level fields replaced; a value of `...` removes the field."""
    changed = copy.deepcopy(doc)
    for key, value in top.items():
        if value is ...:
            del changed[key]
        else:
            changed[key] = value
    return changed


def expect_error(parse: Any, doc: object, message: str) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        parse(doc)
    assert str(caught.value) == message
    return caught.value


def parse_gateway(doc: object) -> EgressGateway:
    return parse_egress_gateway(doc, CLUSTER)


# --- EgressGateway -----------------------------------------------------------------------


def test_minimal_gateway_gets_every_default() -> None:
    assert parse_gateway(gateway_doc()) == EgressGateway(
        name="partner-a",
        egress_ips=(ipaddress.IPv4Address("192.0.2.10"),),
        interface=None,
        failure_policy=FailurePolicy.FAIL_CLOSED,
        health_check=HealthCheck(interval_ms=100, timeout_ms=80, failure_threshold=3),
        node_selector=LabelSelector(match_labels=(("meshgress.io/gateway", "true"),)),
        generation=1,
        resource_version=None,
    )


def test_full_gateway() -> None:
    doc = gateway_doc(
        egressIPs=["198.51.100.7", "2001:DB8:0:0::10", "192.0.2.10"],
        interface="ens5",
        failurePolicy="FailOpen",
        healthCheck={
            "intervalMilliseconds": 500,
            "timeoutMilliseconds": 400,
            "failureThreshold": 5,
        },
        nodeSelector={"matchLabels": {"zone": "a", "egress": "yes"}},
    )
    doc["metadata"].update(
        generation=7,
        resourceVersion="12345",
        uid="0f4c9a2e-0000-4000-8000-000000000000",
        labels={"owner": "net"},
        namespace="",
    )
    doc["status"] = {"slots": "whatever the controller wrote", "conditions": [1, 2]}

    gateway = parse_gateway(doc)

    # The user's order is kept: an IP's position is its slot number.
    assert gateway.egress_ips == (
        ipaddress.IPv4Address("198.51.100.7"),
        ipaddress.IPv6Address("2001:db8::10"),
        ipaddress.IPv4Address("192.0.2.10"),
    )
    assert gateway.interface == "ens5"
    assert gateway.failure_policy is FailurePolicy.FAIL_OPEN
    assert gateway.health_check == HealthCheck(interval_ms=500, timeout_ms=400, failure_threshold=5)
    assert gateway.node_selector == LabelSelector(match_labels=(("egress", "yes"), ("zone", "a")))
    assert (gateway.generation, gateway.resource_version) == (7, "12345")


def test_gateway_null_fields_mean_defaults() -> None:
    doc = gateway_doc(interface=None, failurePolicy=None, healthCheck=None, nodeSelector=None)
    assert parse_gateway(doc) == parse_gateway(gateway_doc())


def test_gateway_health_check_fields_default_individually() -> None:
    gateway = parse_gateway(gateway_doc(healthCheck={"intervalMilliseconds": 1000}))
    assert gateway.health_check == HealthCheck(
        interval_ms=1000, timeout_ms=80, failure_threshold=3
    )


def test_gateway_empty_node_selector_means_every_node() -> None:
    assert parse_gateway(gateway_doc(nodeSelector={})).node_selector == MATCH_EVERYTHING
    assert DEFAULT_GATEWAY_NODE_SELECTOR != MATCH_EVERYTHING


def test_gateway_egress_ips_are_checked_against_the_given_cluster() -> None:
    cluster = ClusterConfig(
        pod_cidrs=(ipaddress.ip_network("192.0.2.0/24"),),
        service_cidrs=(ipaddress.ip_network("fd00:96::/108"),),
    )
    with pytest.raises(ValidationError) as caught:
        parse_egress_gateway(gateway_doc(egressIPs=["192.0.2.10"]), cluster)
    assert str(caught.value) == (
        "spec.egressIPs[0]: 192.0.2.10 is inside the cluster pod range 192.0.2.0/24"
    )
    # The default cluster's pod range is fine for this cluster.
    parsed = parse_egress_gateway(gateway_doc(egressIPs=["10.244.3.4"]), cluster)
    assert parsed.egress_ips == (ipaddress.IPv4Address("10.244.3.4"),)


def test_gateway_from_yaml() -> None:
    doc = yaml.safe_load(
        """
        apiVersion: meshgress.io/v1alpha1
        kind: EgressGateway
        metadata:
          name: partner-b
        spec:
          egressIPs: [203.0.113.5, 2001:db8:1::5]
          failurePolicy: FailClosed
          healthCheck:
            intervalMilliseconds: 100
            timeoutMilliseconds: 80
        """
    )
    gateway = parse_gateway(doc)
    assert [str(ip) for ip in gateway.egress_ips] == ["203.0.113.5", "2001:db8:1::5"]
    assert gateway.health_check == HealthCheck(interval_ms=100, timeout_ms=80)


BAD_GATEWAYS = [
    pytest.param([], "<document>: must be an object, got list", id="document-is-a-list"),
    pytest.param(None, "<document>: must be an object, got null", id="document-is-null"),
    pytest.param(
        with_changes(gateway_doc(), kind="EgressPolicy"),
        'kind: must be EgressGateway, got "EgressPolicy"',
        id="wrong-kind",
    ),
    pytest.param(
        with_changes(gateway_doc(), apiVersion="meshgress.io/v1"),
        'apiVersion: must be meshgress.io/v1alpha1, got "meshgress.io/v1"',
        id="wrong-api-version",
    ),
    pytest.param(
        with_changes(gateway_doc(), apiVersion=...),
        "apiVersion: required",
        id="missing-api-version",
    ),
    pytest.param(
        with_changes(gateway_doc(), specs={}),
        "specs: unknown field",
        id="unknown-top-level-field",
    ),
    pytest.param(
        with_changes(gateway_doc(), metadata={"generation": 2}),
        "metadata.name: required",
        id="missing-name",
    ),
    pytest.param(
        with_changes(gateway_doc(), metadata={"name": "Partner_A"}),
        f'metadata.name: "Partner_A" is not a valid name: {DNS_SUBDOMAIN_RULE}',
        id="name-not-dns-1123",
    ),
    pytest.param(
        with_changes(gateway_doc(), metadata={"name": "a" * 254}),
        'metadata.name: "' + "a" * 80 + '..." is not a valid name: '
        "must be no more than 253 characters",
        id="name-too-long",
    ),
    pytest.param(
        with_changes(gateway_doc(), metadata={"name": "partner-a", "namespace": "default"}),
        "metadata.namespace: must not be set: EgressGateway is cluster-scoped",
        id="namespaced",
    ),
    pytest.param(
        with_changes(gateway_doc(), metadata={"name": "partner-a", "generation": True}),
        "metadata.generation: must be an integer, got boolean true",
        id="generation-is-a-bool",
    ),
    pytest.param(
        with_changes(gateway_doc(), spec=...),
        "spec: required",
        id="missing-spec",
    ),
    pytest.param(
        with_changes(gateway_doc(), spec=["egressIPs"]),
        "spec: must be an object, got list",
        id="spec-is-a-list",
    ),
    pytest.param(gateway_doc(foo=1), "spec.foo: unknown field", id="unknown-spec-field"),
    pytest.param(
        gateway_doc(**{"egress IPs\n": []}),
        'spec["egress IPs\\n"]: unknown field',
        id="unknown-spec-field-quoted",
    ),
    pytest.param(
        gateway_doc(nodeSelector={"meshgress.io/gateway": "true"}),
        'spec.nodeSelector["meshgress.io/gateway"]: unknown field',
        id="node-selector-written-as-plain-map",
    ),
    pytest.param(
        with_changes(gateway_doc(), spec={}),
        "spec.egressIPs: required",
        id="missing-egress-ips",
    ),
    pytest.param(
        gateway_doc(egressIPs=[]),
        "spec.egressIPs: must list at least one IP address",
        id="no-egress-ips",
    ),
    pytest.param(
        gateway_doc(egressIPs="192.0.2.10"),
        'spec.egressIPs: must be a list, got string "192.0.2.10"',
        id="egress-ips-is-a-string",
    ),
    pytest.param(
        gateway_doc(egressIPs=[3221225994]),
        "spec.egressIPs[0]: must be a string, got integer 3221225994",
        id="egress-ip-is-an-int",
    ),
    pytest.param(
        gateway_doc(egressIPs=["192.0.2.10", "10.0.0.300"]),
        'spec.egressIPs[1]: "10.0.0.300" is not an IP address',
        id="egress-ip-malformed",
    ),
    pytest.param(
        gateway_doc(egressIPs=["192.0.2.10/32"]),
        'spec.egressIPs[0]: "192.0.2.10/32" must be a single IP address, not a CIDR',
        id="egress-ip-is-a-cidr",
    ),
    pytest.param(
        gateway_doc(egressIPs=["2001:db8::1%eth0"]),
        'spec.egressIPs[0]: "2001:db8::1%eth0" must not carry a zone index (%...)',
        id="egress-ip-with-zone",
    ),
    pytest.param(
        gateway_doc(egressIPs=["192.0.2.10", "10.244.3.4"]),
        "spec.egressIPs[1]: 10.244.3.4 is inside the cluster pod range 10.244.0.0/16",
        id="egress-ip-in-pod-range",
    ),
    pytest.param(
        gateway_doc(egressIPs=["10.96.0.10"]),
        "spec.egressIPs[0]: 10.96.0.10 is inside the service range 10.96.0.0/12",
        id="egress-ip-in-service-range",
    ),
    pytest.param(
        gateway_doc(egressIPs=["192.0.2.10", "198.51.100.7", "192.0.2.10"]),
        "spec.egressIPs[2]: 192.0.2.10 is a duplicate of spec.egressIPs[0]",
        id="duplicate-egress-ip",
    ),
    pytest.param(
        gateway_doc(egressIPs=["2001:db8::1", "2001:DB8:0:0::1"]),
        "spec.egressIPs[1]: 2001:db8::1 is a duplicate of spec.egressIPs[0]",
        id="duplicate-egress-ip-spelled-differently",
    ),
    pytest.param(
        gateway_doc(egressIPs=["0.0.0.0"]),
        "spec.egressIPs[0]: 0.0.0.0 is the unspecified address",
        id="egress-ip-unspecified",
    ),
    pytest.param(
        gateway_doc(egressIPs=["::"]),
        "spec.egressIPs[0]: :: is the unspecified address",
        id="egress-ip-unspecified-v6",
    ),
    pytest.param(
        gateway_doc(egressIPs=["0.1.2.3"]),
        'spec.egressIPs[0]: 0.1.2.3 is in 0.0.0.0/8, which means "this network"',
        id="egress-ip-this-network",
    ),
    pytest.param(
        gateway_doc(egressIPs=["127.0.0.2"]),
        "spec.egressIPs[0]: 127.0.0.2 is a loopback address",
        id="egress-ip-loopback",
    ),
    pytest.param(
        gateway_doc(egressIPs=["::1"]),
        "spec.egressIPs[0]: ::1 is a loopback address",
        id="egress-ip-loopback-v6",
    ),
    pytest.param(
        gateway_doc(egressIPs=["224.0.0.251"]),
        "spec.egressIPs[0]: 224.0.0.251 is a multicast address",
        id="egress-ip-multicast",
    ),
    pytest.param(
        gateway_doc(egressIPs=["169.254.10.1"]),
        "spec.egressIPs[0]: 169.254.10.1 is a link-local address",
        id="egress-ip-link-local",
    ),
    pytest.param(
        gateway_doc(egressIPs=["fe80::1"]),
        "spec.egressIPs[0]: fe80::1 is a link-local address",
        id="egress-ip-link-local-v6",
    ),
    pytest.param(
        gateway_doc(egressIPs=["255.255.255.255"]),
        "spec.egressIPs[0]: 255.255.255.255 is the limited broadcast address",
        id="egress-ip-broadcast",
    ),
    pytest.param(
        gateway_doc(egressIPs=["240.0.0.1"]),
        "spec.egressIPs[0]: 240.0.0.1 is in a reserved range",
        id="egress-ip-reserved",
    ),
    pytest.param(
        gateway_doc(egressIPs=["::ffff:10.244.3.4"]),
        "spec.egressIPs[0]: ::ffff:af4:304 is an IPv4-mapped IPv6 address; "
        "write 10.244.3.4 instead",
        id="egress-ip-v4-mapped",
    ),
    pytest.param(
        gateway_doc(failurePolicy="FailSometimes"),
        'spec.failurePolicy: "FailSometimes" is not one of FailClosed, FailOpen',
        id="unknown-failure-policy",
    ),
    pytest.param(
        gateway_doc(failurePolicy="failclosed"),
        'spec.failurePolicy: "failclosed" is not one of FailClosed, FailOpen',
        id="failure-policy-wrong-case",
    ),
    pytest.param(
        gateway_doc(interface="eth 0"),
        'spec.interface: "eth 0" is not a valid Linux interface name: must not contain whitespace',
        id="interface-with-space",
    ),
    pytest.param(
        gateway_doc(interface="ens5/1"),
        "spec.interface: \"ens5/1\" is not a valid Linux interface name: must not contain '/'",
        id="interface-with-slash",
    ),
    pytest.param(
        gateway_doc(interface="eth0:1"),
        "spec.interface: \"eth0:1\" is not a valid Linux interface name: must not contain ':'",
        id="interface-alias-syntax",
    ),
    pytest.param(
        gateway_doc(interface=".."),
        "spec.interface: \"..\" is not a valid Linux interface name: must not be '.' or '..'",
        id="interface-dot-dot",
    ),
    pytest.param(
        gateway_doc(interface=""),
        'spec.interface: "" is not a valid Linux interface name: must not be empty',
        id="interface-empty",
    ),
    pytest.param(
        gateway_doc(interface="enp0s31f6-uplink"),
        'spec.interface: "enp0s31f6-uplink" is not a valid Linux interface name: '
        "must be at most 15 characters",
        id="interface-too-long",
    ),
    pytest.param(
        gateway_doc(interface="éth0"),
        'spec.interface: "\\u00e9th0" is not a valid Linux interface name: must be printable ASCII',
        id="interface-not-ascii",
    ),
    pytest.param(
        gateway_doc(interface=0),
        "spec.interface: must be a string, got integer 0",
        id="interface-is-an-int",
    ),
    pytest.param(
        gateway_doc(healthCheck=[200]),
        "spec.healthCheck: must be an object, got list",
        id="health-check-is-a-list",
    ),
    pytest.param(
        gateway_doc(healthCheck={"retries": 3}),
        "spec.healthCheck.retries: unknown field",
        id="unknown-health-check-field",
    ),
    pytest.param(
        gateway_doc(healthCheck={"intervalMilliseconds": 20}),
        "spec.healthCheck.intervalMilliseconds: must be between 50 and 10000, got 20",
        id="interval-too-short",
    ),
    pytest.param(
        gateway_doc(healthCheck={"intervalMilliseconds": 200.0}),
        "spec.healthCheck.intervalMilliseconds: must be an integer, got number 200.0",
        id="interval-is-a-float",
    ),
    pytest.param(
        gateway_doc(healthCheck={"intervalMilliseconds": 200, "timeoutMilliseconds": 200}),
        "spec.healthCheck.timeoutMilliseconds: 200 must be less than intervalMilliseconds (200)",
        id="timeout-not-below-interval",
    ),
    pytest.param(
        gateway_doc(healthCheck={"intervalMilliseconds": 60}),
        "spec.healthCheck.timeoutMilliseconds: 80 (the default) must be less than "
        "intervalMilliseconds (60)",
        id="default-timeout-not-below-interval",
    ),
    pytest.param(
        gateway_doc(healthCheck={"timeoutMilliseconds": 0}),
        "spec.healthCheck.timeoutMilliseconds: must be at least 1, got 0",
        id="timeout-zero",
    ),
    pytest.param(
        gateway_doc(healthCheck={"failureThreshold": 0}),
        "spec.healthCheck.failureThreshold: must be between 1 and 10, got 0",
        id="failure-threshold-zero",
    ),
    pytest.param(
        gateway_doc(nodeSelector={"matchExpressions": []}),
        "spec.nodeSelector.matchExpressions: not supported here; use matchLabels",
        id="node-selector-with-expressions",
    ),
    pytest.param(
        gateway_doc(nodeSelector={"matchLabels": {"meshgress.io/gateway": True}}),
        'spec.nodeSelector.matchLabels["meshgress.io/gateway"]: must be a string, got boolean true',
        id="node-selector-unquoted-true",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_GATEWAYS)
def test_bad_gateway_is_rejected(doc: object, message: str) -> None:
    expect_error(parse_gateway, doc, message)


# --- EgressPolicy ------------------------------------------------------------------------


def test_minimal_policy_gets_every_default() -> None:
    assert parse_egress_policy(policy_doc()) == EgressPolicy(
        name="billing-to-partner-a",
        gateway="partner-a",
        namespace_selector=LabelSelector(match_labels=(("team", "billing"),)),
        pod_selector=MATCH_EVERYTHING,
        destination_cidrs=(
            ipaddress.IPv4Network("0.0.0.0/0"),
            ipaddress.IPv6Network("::/0"),
        ),
        excluded_cidrs=(),
        priority=1000,
        generation=1,
        resource_version=None,
    )
    assert parse_egress_policy(policy_doc()).destination_cidrs == ALL_DESTINATIONS


def test_full_policy_is_sorted() -> None:
    doc = policy_doc(
        namespaceSelector={},
        podSelector={
            "matchLabels": {"tier": "api", "app": "billing"},
            "matchExpressions": [
                {"key": "track", "operator": "NotIn", "values": ["canary", "beta", "canary"]},
                {"key": "egress.example.com/opt-out", "operator": "DoesNotExist"},
            ],
        },
        destinationCIDRs=["2001:db8::/32", "203.0.113.0/24", "198.51.100.0/24", "10.0.0.0/8"],
        excludedCIDRs=["10.1.0.0/16", "10.0.5.0/24"],
        priority=0,
    )
    doc["metadata"]["generation"] = 3
    doc["metadata"]["resourceVersion"] = "999"

    policy = parse_egress_policy(doc)

    assert policy.namespace_selector == MATCH_EVERYTHING
    assert policy.pod_selector == LabelSelector(
        match_labels=(("app", "billing"), ("tier", "api")),
        match_expressions=(
            Requirement("egress.example.com/opt-out", Operator.DOES_NOT_EXIST),
            Requirement("track", Operator.NOT_IN, ("beta", "canary")),
        ),
    )
    assert [str(c) for c in policy.destination_cidrs] == [
        "10.0.0.0/8",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "2001:db8::/32",
    ]
    assert [str(c) for c in policy.excluded_cidrs] == ["10.0.5.0/24", "10.1.0.0/16"]
    assert (policy.priority, policy.generation, policy.resource_version) == (0, 3, "999")


def test_policy_parse_does_not_depend_on_list_order() -> None:
    a = policy_doc(
        destinationCIDRs=["10.0.0.0/8", "2001:db8::/32"],
        podSelector={
            "matchExpressions": [
                {"key": "a", "operator": "Exists"},
                {"key": "b", "operator": "In", "values": ["x", "y"]},
            ]
        },
    )
    b = policy_doc(
        destinationCIDRs=["2001:db8::/32", "10.0.0.0/8"],
        podSelector={
            "matchExpressions": [
                {"key": "b", "operator": "In", "values": ["y", "x"]},
                {"key": "a", "operator": "Exists"},
            ]
        },
    )
    assert parse_egress_policy(a) == parse_egress_policy(b)


def test_policy_null_fields_mean_defaults() -> None:
    doc = policy_doc(podSelector=None, destinationCIDRs=None, excludedCIDRs=None, priority=None)
    assert parse_egress_policy(doc) == parse_egress_policy(policy_doc())


def test_policy_empty_excluded_cidrs_are_allowed() -> None:
    assert parse_egress_policy(policy_doc(excludedCIDRs=[])).excluded_cidrs == ()


def test_policy_priority_bounds_are_inclusive() -> None:
    assert parse_egress_policy(policy_doc(priority=0)).priority == 0
    assert parse_egress_policy(policy_doc(priority=65535)).priority == 65535


BAD_POLICIES = [
    pytest.param(
        with_changes(policy_doc(), kind="EgressGateway"),
        'kind: must be EgressPolicy, got "EgressGateway"',
        id="wrong-kind",
    ),
    pytest.param(
        with_changes(policy_doc(), metadata={}),
        "metadata.name: required",
        id="missing-name",
    ),
    pytest.param(
        with_changes(policy_doc(), metadata="billing"),
        'metadata: must be an object, got string "billing"',
        id="metadata-is-a-string",
    ),
    pytest.param(policy_doc(gatway="x"), "spec.gatway: unknown field", id="unknown-spec-field"),
    pytest.param(
        with_changes(policy_doc(), spec={"namespaceSelector": {}}),
        "spec.gateway: required",
        id="missing-gateway",
    ),
    pytest.param(
        policy_doc(gateway="Partner A"),
        f'spec.gateway: "Partner A" is not a valid name: {DNS_SUBDOMAIN_RULE}',
        id="gateway-not-dns-1123",
    ),
    pytest.param(
        with_changes(policy_doc(), spec={"gateway": "partner-a"}),
        "spec.namespaceSelector: required; use {} to select every namespace",
        id="missing-namespace-selector",
    ),
    pytest.param(
        policy_doc(namespaceSelector="billing"),
        'spec.namespaceSelector: must be an object, got string "billing"',
        id="namespace-selector-is-a-string",
    ),
    pytest.param(
        policy_doc(podSelector={"matchLabel": {"app": "web"}}),
        "spec.podSelector.matchLabel: unknown field",
        id="unknown-selector-field",
    ),
    pytest.param(
        policy_doc(podSelector={"matchLabels": ["app=web"]}),
        "spec.podSelector.matchLabels: must be an object, got list",
        id="match-labels-is-a-list",
    ),
    pytest.param(
        policy_doc(podSelector={"matchLabels": {"app": "web app"}}),
        'spec.podSelector.matchLabels["app"]: "web app" is not a valid label value: '
        f"must be empty or consist of {LABEL_CHARS_RULE}",
        id="match-labels-bad-value",
    ),
    pytest.param(
        policy_doc(namespaceSelector={"matchLabels": {"-team": "billing"}}),
        'spec.namespaceSelector.matchLabels: "-team" is not a valid label key: '
        f"name part must consist of {LABEL_CHARS_RULE}",
        id="match-labels-bad-key",
    ),
    pytest.param(
        policy_doc(podSelector={"matchLabels": {"tier": 3}}),
        'spec.podSelector.matchLabels["tier"]: must be a string, got integer 3',
        id="match-labels-value-is-an-int",
    ),
    pytest.param(
        policy_doc(namespaceSelector={"matchExpressions": [{"key": "team", "operator": "In"}]}),
        "spec.namespaceSelector.matchExpressions[0].values: "
        "must be a non-empty list when operator is In",
        id="in-without-values",
    ),
    pytest.param(
        policy_doc(
            podSelector={"matchExpressions": [{"key": "team", "operator": "NotIn", "values": []}]}
        ),
        "spec.podSelector.matchExpressions[0].values: "
        "must be a non-empty list when operator is NotIn",
        id="not-in-with-empty-values",
    ),
    pytest.param(
        policy_doc(
            podSelector={
                "matchExpressions": [
                    {"key": "app", "operator": "Exists"},
                    {"key": "team", "operator": "Exists", "values": ["billing"]},
                ]
            }
        ),
        "spec.podSelector.matchExpressions[1].values: must be empty when operator is Exists",
        id="exists-with-values",
    ),
    pytest.param(
        policy_doc(
            podSelector={"matchExpressions": [{"key": "team", "operator": "Equals", "values": []}]}
        ),
        'spec.podSelector.matchExpressions[0].operator: "Equals" is not one of '
        "In, NotIn, Exists, DoesNotExist",
        id="unknown-operator",
    ),
    pytest.param(
        policy_doc(
            podSelector={"matchExpressions": [{"key": "team", "operator": "Exists", "value": "x"}]}
        ),
        "spec.podSelector.matchExpressions[0].value: unknown field",
        id="unknown-field-in-expression",
    ),
    pytest.param(
        policy_doc(podSelector={"matchExpressions": [{"operator": "Exists"}]}),
        "spec.podSelector.matchExpressions[0].key: required",
        id="expression-without-key",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=["10.0.0.0/33"]),
        'spec.destinationCIDRs[0]: "10.0.0.0/33" is not a CIDR',
        id="bad-cidr",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=["203.0.113.0/24", "10.0.0.1/8"]),
        "spec.destinationCIDRs[1]: 10.0.0.1/8 has host bits set; "
        "the canonical form would be 10.0.0.0/8",
        id="non-canonical-cidr",
    ),
    pytest.param(
        policy_doc(excludedCIDRs=["2001:db8::1/32"]),
        "spec.excludedCIDRs[0]: 2001:db8::1/32 has host bits set; "
        "the canonical form would be 2001:db8::/32",
        id="non-canonical-cidr-v6",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=["203.0.113.7"]),
        'spec.destinationCIDRs[0]: "203.0.113.7" is not a CIDR: '
        "it needs a prefix length, like 10.0.0.0/8",
        id="cidr-without-prefix",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=["10.0.0.0/255.0.0.0"]),
        'spec.destinationCIDRs[0]: "10.0.0.0/255.0.0.0" is not a CIDR: '
        "write the prefix length as a plain number, like /8",
        id="cidr-with-netmask",
    ),
    pytest.param(
        policy_doc(excludedCIDRs=[167772160]),
        "spec.excludedCIDRs[0]: must be a string, got integer 167772160",
        id="cidr-is-an-int",
    ),
    pytest.param(
        policy_doc(excludedCIDRs="10.0.0.0/8"),
        'spec.excludedCIDRs: must be a list, got string "10.0.0.0/8"',
        id="cidrs-is-a-string",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=["10.0.0.0/8", "192.0.2.0/24", "10.0.0.0/8"]),
        "spec.destinationCIDRs[2]: 10.0.0.0/8 is a duplicate of spec.destinationCIDRs[0]",
        id="duplicate-cidr",
    ),
    pytest.param(
        policy_doc(destinationCIDRs=[]),
        "spec.destinationCIDRs: must not be empty; omit the field to mean every destination",
        id="no-destinations",
    ),
    pytest.param(
        policy_doc(priority=70000),
        "spec.priority: must be between 0 and 65535, got 70000",
        id="priority-too-high",
    ),
    pytest.param(
        policy_doc(priority=-1),
        "spec.priority: must be between 0 and 65535, got -1",
        id="priority-negative",
    ),
    pytest.param(
        policy_doc(priority=True),
        "spec.priority: must be an integer, got boolean true",
        id="priority-is-a-bool",
    ),
    pytest.param(
        policy_doc(priority="100"),
        'spec.priority: must be an integer, got string "100"',
        id="priority-is-a-string",
    ),
    pytest.param(
        policy_doc(priority=10**5000),
        "spec.priority: must be between 0 and 65535, got (a very large number)",
        id="priority-astronomical",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_POLICIES)
def test_bad_policy_is_rejected(doc: object, message: str) -> None:
    expect_error(parse_egress_policy, doc, message)


# --- The error and the model -------------------------------------------------------------


def test_validation_error_carries_field_and_problem() -> None:
    error = expect_error(
        parse_egress_policy,
        policy_doc(priority=True),
        "spec.priority: must be an integer, got boolean true",
    )
    assert error.field == "spec.priority"
    assert error.problem == "must be an integer, got boolean true"
    assert isinstance(error, ValueError)
    assert api.ValidationError is validation.ValidationError


def test_messages_are_ascii_and_short_whatever_the_input() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_gateway(gateway_doc(interface="\ud800" + "x" * 500))
    message = str(caught.value)
    assert message.isascii()
    assert len(message) < 200


def test_models_are_frozen_and_hashable() -> None:
    gateway = parse_gateway(gateway_doc())
    policy = parse_egress_policy(policy_doc())
    with pytest.raises(dataclasses.FrozenInstanceError):
        gateway.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.priority = 1  # type: ignore[misc]
    assert len({gateway, parse_gateway(gateway_doc())}) == 1
    assert len({policy, parse_egress_policy(policy_doc())}) == 1


def test_parsing_does_not_modify_the_document() -> None:
    doc = policy_doc(destinationCIDRs=["2001:db8::/32", "10.0.0.0/8"])
    before = copy.deepcopy(doc)
    parse_egress_policy(doc)
    assert doc == before
