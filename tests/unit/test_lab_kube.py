"""The kube lab's pure parts and the chart's RBAC as rendered by the pinned helm."""

import ipaddress

import pytest

from meshgress.datastore import LEASE_NAMESPACE
from meshgress.lab.kube import (
    SERVICE_ACCOUNTS,
    SYSTEM_NAMESPACE,
    compute_component_pod,
    compute_kubeconfig,
    control_plane_netns,
    render_chart_rbac,
)
from meshgress.lab.topology import lab_prefix


@pytest.fixture(scope="module")
def rendered():
    return render_chart_rbac()


def test_the_control_plane_namespace_carries_the_labs_prefix():
    # `lab down` finds what to remove by that prefix, crashed runs included.
    assert control_plane_netns("abc").startswith(lab_prefix("abc"))


def test_a_component_pod_is_a_host_network_pod_bound_to_its_node():
    pod = compute_component_pod("gateway", "gw1", ipaddress.IPv4Address("192.0.2.101"))
    assert pod["metadata"] == {"name": "meshgress-gateway-gw1", "namespace": SYSTEM_NAMESPACE,
                               "labels": {"app.kubernetes.io/name": "meshgress",
                                          "app.kubernetes.io/component": "gateway"}}
    assert pod["spec"]["nodeName"] == "gw1" and pod["spec"]["hostNetwork"] is True
    assert pod["spec"]["serviceAccountName"] == "meshgress-gateway"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["status"]["podIP"] == pod["status"]["hostIP"] == "192.0.2.101"


def test_a_components_kubeconfig_has_its_token_and_no_client_certificate():
    config = compute_kubeconfig("https://192.0.2.2:6443", b"PEM", "agent", "tok")
    assert config["users"] == [{"name": "agent", "user": {"token": "tok"}}]
    assert config["clusters"][0]["cluster"] == {"server": "https://192.0.2.2:6443",
                                                "certificate-authority-data": "UEVN"}


def test_the_chart_grants_leases_where_the_datastore_keeps_them(rendered):
    roles = [o for o in rendered if o["kind"] in ("Role", "RoleBinding")
             and "leases" in o["metadata"]["name"]]
    assert len(roles) == 4
    assert {o["metadata"]["namespace"] for o in roles} == {LEASE_NAMESPACE}


def test_the_charts_service_accounts_are_the_ones_the_lab_binds_tokens_to(rendered):
    accounts = {o["metadata"]["name"] for o in rendered if o["kind"] == "ServiceAccount"}
    assert accounts == set(SERVICE_ACCOUNTS.values())
    subjects = {s["name"] for o in rendered if o["kind"] in ("RoleBinding", "ClusterRoleBinding")
                for s in o["subjects"]}
    assert subjects == accounts


def test_no_rule_is_a_wildcard_or_touches_secrets(rendered):
    rules = [rule for o in rendered if o["kind"] in ("Role", "ClusterRole")
             for rule in o["rules"]]
    assert rules
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], rule
        assert not {"delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
            rule["verbs"]), rule
