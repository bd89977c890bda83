"""Property tests: the parsers survive any input, and selectors match as Kubernetes does.

The parsers sit between people's YAML and every component, so the property that matters
most is that no document, however broken, makes them raise anything but ValidationError.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
from collections.abc import Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshgress.api import (
    ValidationError,
    parse_egress_gateway,
    parse_egress_gateway_in_effect,
    parse_egress_policy,
    parse_egress_policy_in_effect,
)
from meshgress.config import DEFAULT_CLUSTER_CONFIG
from meshgress.selectors import LabelSelector, matches, parse_label_selector

FAST = settings(max_examples=300, deadline=None)
QUICK = settings(max_examples=150, deadline=None)  # for properties with a small input space

# Field names the parsers know, so random objects often reach deep validation code.
KNOWN_KEYS = [
    "apiVersion",
    "kind",
    "metadata",
    "spec",
    "status",
    "name",
    "namespace",
    "generation",
    "resourceVersion",
    "egressIPs",
    "interface",
    "failurePolicy",
    "healthCheck",
    "intervalMilliseconds",
    "timeoutMilliseconds",
    "failureThreshold",
    "nodeSelector",
    "gateway",
    "namespaceSelector",
    "podSelector",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "destinationCIDRs",
    "excludedCIDRs",
    "priority",
]

# Values that break careless parsers: lone surrogates, lookalike IPs and CIDRs, and the
# non-JSON types YAML can produce. Ints past Python's 4300-digit str() limit are covered by
# test_api.py instead, because hypothesis itself cannot print them.
NASTY_LEAVES = st.sampled_from(
    [
        2**64,
        -(2**200),
        float("nan"),
        float("inf"),
        "\ud800",
        "\x00",
        "",
        "0.0.0.0",
        "::",
        "10.244.3.4",
        "fe80::1%eth0",
        "10.0.0.1/8",
        "10.0.0.0/255.0.0.0",
        "::ffff:1.2.3.4",
        "meshgress.io/v1alpha1",
        "EgressGateway",
        "EgressPolicy",
        "In",
        "NotIn",
        "Exists",
        "DoesNotExist",
        "FailOpen",
        b"bytes",
        datetime.date(2024, 1, 1),
        frozenset({1}),
        (1, 2),
    ]
)
LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | NASTY_LEAVES
)
KEYS = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10) | st.integers() | st.none()
JSON_LIKE = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=25,
)


def parse_any(doc: object) -> None:
    """Run both parsers; anything but success or ValidationError fails the test."""
    for parse in (
        lambda d: parse_egress_gateway(d, DEFAULT_CLUSTER_CONFIG),
        parse_egress_policy,
    ):
        try:
            parse(doc)
        except ValidationError as error:
            assert str(error) == f"{error.field}: {error.problem}"
            assert str(error).isascii()


@FAST
@given(JSON_LIKE)
def test_parsers_only_raise_validation_error_on_anything(doc: object) -> None:
    parse_any(doc)


@FAST
@given(
    kind=st.sampled_from(["EgressGateway", "EgressPolicy"]),
    metadata=JSON_LIKE,
    spec=st.dictionaries(st.sampled_from(KNOWN_KEYS), JSON_LIKE, max_size=4),
)
def test_parsers_only_raise_validation_error_on_random_specs(
    kind: str, metadata: object, spec: dict[str, Any]
) -> None:
    parse_any(
        {"apiVersion": "meshgress.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec}
    )


VALID_GATEWAY: dict[str, Any] = {
    "apiVersion": "meshgress.io/v1alpha1",
    "kind": "EgressGateway",
    "metadata": {"name": "partner-a", "generation": 4, "resourceVersion": "77"},
    "spec": {
        "egressIPs": ["192.0.2.10", "2001:db8::10"],
        "interface": "ens5",
        "failurePolicy": "FailClosed",
        "healthCheck": {
            "intervalMilliseconds": 200,
            "timeoutMilliseconds": 150,
            "failureThreshold": 3,
        },
        "nodeSelector": {"matchLabels": {"meshgress.io/gateway": "true"}},
    },
}

VALID_POLICY: dict[str, Any] = {
    "apiVersion": "meshgress.io/v1alpha1",
    "kind": "EgressPolicy",
    "metadata": {"name": "billing", "generation": 2},
    "spec": {
        "gateway": "partner-a",
        "namespaceSelector": {
            "matchLabels": {"team": "billing"},
            "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}],
        },
        "podSelector": {
            "matchExpressions": [
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "tier", "operator": "NotIn", "values": ["batch", "cron"]},
            ]
        },
        "destinationCIDRs": ["203.0.113.0/24", "2001:db8::/32"],
        "excludedCIDRs": ["203.0.113.128/25"],
        "priority": 100,
    },
}


def test_the_documents_being_mutated_are_valid() -> None:
    parse_egress_gateway(VALID_GATEWAY, DEFAULT_CLUSTER_CONFIG)
    parse_egress_policy(VALID_POLICY)


Path = tuple[Any, ...]


def all_paths(value: object, prefix: Path = ()) -> Iterator[Path]:
    """Every position in a document, the document itself (the empty path) included."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from all_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from all_paths(child, (*prefix, index))


def resolve(doc: Any, path: Path) -> Any:
    for step in path:
        doc = doc[step]
    return doc


@st.composite
def mutations_of(draw: st.DrawFn, base: dict[str, Any]) -> object:
    """`base` with one to three edits: a value replaced, a key or item dropped, one added."""
    doc: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(all_paths(doc))))
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        target = resolve(doc, path)
        if action == "replace" or (action == "drop" and not path):
            garbage = draw(JSON_LIKE)
            if path:
                resolve(doc, path[:-1])[path[-1]] = garbage
            else:
                doc = garbage
        elif action == "drop":
            del resolve(doc, path[:-1])[path[-1]]
        elif isinstance(target, dict):
            target[draw(KEYS)] = draw(JSON_LIKE)
        elif isinstance(target, list):
            target.append(draw(JSON_LIKE))
        if not isinstance(doc, dict | list):
            break
    return doc


@FAST
@given(mutations_of(VALID_GATEWAY))
def test_mutated_gateways_only_raise_validation_error(doc: object) -> None:
    parse_any(doc)


@FAST
@given(mutations_of(VALID_POLICY))
def test_mutated_policies_only_raise_validation_error(doc: object) -> None:
    parse_any(doc)


# --- Valid documents parse to what they say ----------------------------------------------

# Documentation ranges: routable-looking, outside the default cluster ranges, never special.
USABLE_EGRESS_IPS = st.one_of(
    st.integers(0, 255).map(lambda n: ipaddress.ip_address(f"192.0.2.{n}")),
    st.integers(0, 255).map(lambda n: ipaddress.ip_address(f"203.0.113.{n}")),
    st.integers(1, 2**96 - 1).map(
        lambda n: ipaddress.ip_address(int(ipaddress.ip_address("2001:db8::")) + n)
    ),
)


@FAST
@given(st.lists(USABLE_EGRESS_IPS, min_size=1, max_size=6, unique=True))
def test_egress_ips_keep_the_users_order(
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    doc = copy.deepcopy(VALID_GATEWAY)
    doc["spec"]["egressIPs"] = [str(ip) for ip in ips]
    assert list(parse_egress_gateway(doc, DEFAULT_CLUSTER_CONFIG).egress_ips) == ips


CANONICAL_CIDRS = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda pair: ipaddress.ip_network(f"{pair[0]}/{pair[1]}", strict=False))


@FAST
@given(st.lists(CANONICAL_CIDRS, min_size=1, max_size=8, unique=True))
def test_cidrs_come_out_sorted_and_complete(
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> None:
    doc = copy.deepcopy(VALID_POLICY)
    doc["spec"]["destinationCIDRs"] = [str(c) for c in cidrs]
    doc["spec"]["excludedCIDRs"] = [str(c) for c in reversed(cidrs)]
    policy = parse_egress_policy(doc)
    expected = sorted(cidrs, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    assert list(policy.destination_cidrs) == expected
    assert list(policy.excluded_cidrs) == expected


# --- Selector matching -------------------------------------------------------------------

# Built from a small alphabet rather than st.from_regex: much faster, and small pools make
# keys and values collide, which is where selector semantics get interesting.
LABEL_NAMES = st.builds(
    lambda head, tail: head + tail + ("9" if tail and not tail[-1].isalnum() else ""),
    st.sampled_from("abz09"),
    st.text(alphabet="abz09.-_", max_size=4),
)
LABEL_KEYS = LABEL_NAMES | st.builds(
    lambda prefix, name: f"{prefix}/{name}",
    st.sampled_from(["example.com", "app.kubernetes.io", "a"]),
    LABEL_NAMES,
)
LABEL_VALUES = st.just("") | LABEL_NAMES
LABELS = st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=5)


def expression(key: str, operator: str, values: list[str] | None = None) -> LabelSelector:
    requirement: dict[str, Any] = {"key": key, "operator": operator}
    if values is not None:
        requirement["values"] = values
    return parse_label_selector({"matchExpressions": [requirement]}, "selector")


@QUICK
@given(LABELS, LABELS)
def test_match_labels_select_their_own_labels_and_supersets(
    labels: dict[str, str], extra: dict[str, str]
) -> None:
    selector = parse_label_selector({"matchLabels": labels}, "selector")
    assert matches(selector, labels)
    assert matches(selector, {**extra, **labels})


@QUICK
@given(LABELS)
def test_empty_selector_selects_everything(labels: dict[str, str]) -> None:
    assert matches(parse_label_selector({}, "selector"), labels)


@QUICK
@given(LABELS, LABEL_KEYS)
def test_exists_on_a_missing_key_never_matches(labels: dict[str, str], key: str) -> None:
    labels.pop(key, None)
    with_exists = parse_label_selector(
        {"matchLabels": labels, "matchExpressions": [{"key": key, "operator": "Exists"}]},
        "selector",
    )
    assert not matches(with_exists, labels)


@QUICK
@given(LABELS, LABEL_KEYS)
def test_does_not_exist_is_the_opposite_of_exists(labels: dict[str, str], key: str) -> None:
    assert matches(expression(key, "DoesNotExist"), labels) != matches(
        expression(key, "Exists"), labels
    )


@QUICK
@given(LABELS, LABEL_KEYS, st.lists(LABEL_VALUES, min_size=1, max_size=3))
def test_not_in_is_the_opposite_of_in(labels: dict[str, str], key: str, values: list[str]) -> None:
    assert matches(expression(key, "NotIn", values), labels) != matches(
        expression(key, "In", values), labels
    )


@QUICK
@given(
    LABELS,
    st.lists(st.sampled_from(["Exists", "DoesNotExist", "In", "NotIn"]), max_size=4),
    st.randoms(),
)
def test_expression_order_does_not_change_the_selector(
    labels: dict[str, str], operators: list[str], random: Any
) -> None:
    requirements = [
        {"key": f"k{i}", "operator": op, **({"values": ["v"]} if op in ("In", "NotIn") else {})}
        for i, op in enumerate(operators)
    ]
    shuffled = list(requirements)
    random.shuffle(shuffled)
    a = parse_label_selector({"matchExpressions": requirements}, "selector")
    b = parse_label_selector({"matchExpressions": shuffled}, "selector")
    assert a == b
    assert matches(a, labels) == matches(b, labels)


@FAST
@given(doc=JSON_LIKE, spec=JSON_LIKE, accepted=JSON_LIKE,
       observed=st.integers(-2, 5) | JSON_LIKE, generation=st.integers(0, 5) | JSON_LIKE)
def test_what_is_in_effect_is_decided_for_anything_and_never_raises(
        doc: object, spec: object, accepted: object, observed: object, generation: object
) -> None:
    shaped = {"apiVersion": "meshgress.io/v1alpha1", "metadata": {
        "name": "x", "generation": generation}, "spec": spec,
        "status": {"observedGeneration": observed, "acceptedSpec": accepted}}
    for candidate in (doc, {**shaped, "kind": "EgressPolicy"},
                      {**shaped, "kind": "EgressGateway"}):
        for effect in (parse_egress_gateway_in_effect(candidate, DEFAULT_CLUSTER_CONFIG),
                       parse_egress_policy_in_effect(candidate)):
            # Either the current generation applies, or it is rejected and what applies
            # (if anything) is an older recorded one.
            assert (effect.rejected is None) == (effect.value is not None
                                                 and not effect.on_last_valid_generation)
            if effect.on_last_valid_generation:
                assert effect.value is not None
                assert 0 < effect.value.generation <= effect.generation


def test_a_valid_recorded_spec_applies_exactly_as_it_would_have_at_its_generation() -> None:
    current = copy.deepcopy(VALID_POLICY)
    current["metadata"]["generation"] = 9
    current["spec"]["priority"] = "high"
    current["status"] = {"observedGeneration": 8, "acceptedSpec": VALID_POLICY["spec"]}
    effect = parse_egress_policy_in_effect(current)
    recorded = copy.deepcopy(VALID_POLICY)
    recorded["metadata"]["generation"] = 8
    assert effect.value == parse_egress_policy(recorded)
    assert effect.spec == VALID_POLICY["spec"] and effect.generation == 9
    assert str(effect.rejected) == 'spec.priority: must be an integer, got string "high"'
