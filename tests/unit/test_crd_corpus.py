"""The parser's side of the CRD corpus (tests/crd_corpus.py), and the CRDs' bounds and
enums checked against the parser's constants, so the two cannot drift apart unnoticed.
The API server's side runs in tests/privileged/test_crds.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from meshgress import api, selectors
from meshgress.api import FailurePolicy, ValidationError, parse_egress_gateway, parse_egress_policy
from meshgress.config import DEFAULT_CLUSTER_CONFIG
from meshgress.datastore import API_VERSIONS, Kind
from tests.crd_corpus import CORPUS, Case, cases
from tests.tools.reference.crds import fields

CRDS = Path(__file__).resolve().parents[2] / "charts" / "meshgress" / "crds"


def parse(doc: dict[str, Any]) -> object:
    if doc["kind"] == "EgressGateway":
        return parse_egress_gateway(doc, DEFAULT_CLUSTER_CONFIG)
    return parse_egress_policy(doc)


@pytest.mark.parametrize("case", cases())
def test_parser_judges_the_corpus_as_recorded(case: Case) -> None:
    if case.parser is None:
        parse(case.doc)
        return
    with pytest.raises(ValidationError) as caught:
        parse(case.doc)
    assert str(caught.value) == case.parser


def test_corpus_has_both_kinds_and_enough_rejections() -> None:
    rejected = [c for c in CORPUS if c.parser is not None]
    assert {c.kind for c in rejected} == {"EgressGateway", "EgressPolicy"}
    assert len(rejected) >= 10
    assert len({c.id for c in CORPUS}) == len(CORPUS)
    assert len({c.doc["metadata"]["name"] for c in CORPUS}) == len(CORPUS)


def crd(kind: str) -> dict[str, Any]:
    plural = {"EgressGateway": "egressgateways", "EgressPolicy": "egresspolicies"}[kind]
    doc: dict[str, Any] = yaml.safe_load((CRDS / f"{plural}.meshgress.io.yaml").read_text())
    return doc


def version_schema(kind: str) -> dict[str, Any]:
    (version,) = crd(kind)["spec"]["versions"]
    assert f"{crd(kind)['spec']['group']}/{version['name']}" == API_VERSIONS[Kind(kind)]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("kind", ["EgressGateway", "EgressPolicy"])
def test_crd_names_scope_and_subresources(kind: str) -> None:
    spec = crd(kind)["spec"]
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == kind
    assert spec["names"]["categories"] == ["meshgress"]
    assert spec["names"]["shortNames"] == [{"EgressGateway": "egw",
                                             "EgressPolicy": "egp"}[kind]]
    (version,) = spec["versions"]
    assert version["subresources"] == {"status": {}}
    assert "status" in version["schema"]["openAPIV3Schema"]["properties"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert "Age" in columns


def test_gateway_crd_bounds_match_the_parser() -> None:
    spec = version_schema("EgressGateway")["properties"]["spec"]["properties"]
    assert spec["failurePolicy"]["enum"] == [p.value for p in FailurePolicy]
    assert spec["egressIPs"]["maxItems"] == api.MAX_EGRESS_IPS
    health = spec["healthCheck"]["properties"]
    interval = health["intervalMilliseconds"]
    assert (interval["minimum"], interval["maximum"]) == api.HEALTH_INTERVAL_MS_RANGE
    threshold = health["failureThreshold"]
    assert (threshold["minimum"], threshold["maximum"]) == api.FAILURE_THRESHOLD_RANGE
    assert spec["interface"]["maxLength"] == api.INTERFACE_NAME_MAX_LENGTH
    defaults = api.HealthCheck()
    rule = spec["healthCheck"]["x-kubernetes-validations"][0]["rule"]
    assert f": {defaults.timeout_ms})" in rule
    assert f": {defaults.interval_ms})" in rule
    labels = spec["nodeSelector"]["properties"]["matchLabels"]
    assert labels["maxProperties"] == selectors.MAX_MATCH_LABELS


def test_policy_crd_bounds_match_the_parser() -> None:
    spec = version_schema("EgressPolicy")["properties"]["spec"]["properties"]
    assert spec["priority"]["minimum"] == 0
    assert spec["priority"]["maximum"] == api.MAX_PRIORITY
    for field in ("destinationCIDRs", "excludedCIDRs"):
        assert spec[field]["maxItems"] == api.MAX_CIDRS
    assert spec["destinationCIDRs"]["minItems"] == 1
    for selector in ("namespaceSelector", "podSelector"):
        props = spec[selector]["properties"]
        assert props["matchLabels"]["maxProperties"] == selectors.MAX_MATCH_LABELS
        expressions = props["matchExpressions"]
        assert expressions["maxItems"] == selectors.MAX_MATCH_EXPRESSIONS
        assert expressions["items"]["properties"]["values"]["maxItems"] == \
            selectors.MAX_EXPRESSION_VALUES
        assert expressions["items"]["properties"]["operator"]["enum"] == [
            op.value for op in selectors.Operator]


def _documented_defaults(kind: str) -> dict[str, str | None]:
    return {field.path: field.default for field in fields(version_schema(kind))}


def test_the_crds_document_the_parsers_defaults() -> None:
    """The CRDs carry no `default:` (the parser applies defaults); their descriptions say
    them, for `kubectl explain` and the field reference, and must say what the parser does."""
    gateway = parse_egress_gateway(
        {"apiVersion": api.API_VERSION, "kind": "EgressGateway", "metadata": {"name": "g"},
         "spec": {"egressIPs": ["203.0.113.10"]}}, DEFAULT_CLUSTER_CONFIG)
    documented = _documented_defaults("EgressGateway")
    assert documented["spec.failurePolicy"] == gateway.failure_policy.value
    health = "spec.healthCheck."
    assert documented[health + "intervalMilliseconds"] == str(gateway.health_check.interval_ms)
    assert documented[health + "timeoutMilliseconds"] == str(gateway.health_check.timeout_ms)
    assert documented[health + "failureThreshold"] == \
        str(gateway.health_check.failure_threshold)
    ((label, value),) = gateway.node_selector.match_labels
    assert documented["spec.nodeSelector"] == f"nodes labelled {label}={value}"
    assert gateway.interface is None and documented["spec.interface"] is not None

    policy = parse_egress_policy(
        {"apiVersion": api.API_VERSION, "kind": "EgressPolicy", "metadata": {"name": "p"},
         "spec": {"gateway": "g", "namespaceSelector": {}}})
    documented = _documented_defaults("EgressPolicy")
    assert documented["spec.priority"] == str(policy.priority)
    assert policy.destination_cidrs == api.ALL_DESTINATIONS
    assert documented["spec.destinationCIDRs"] == "every destination"
    assert policy.excluded_cidrs == () and documented["spec.excludedCIDRs"] == "none"
    assert policy.pod_selector == selectors.MATCH_EVERYTHING
    assert documented["spec.podSelector"] == "every pod"
