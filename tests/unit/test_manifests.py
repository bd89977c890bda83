"""`meshgress apply/get/delete` on the file datastore: kubectl's behaviour and words."""

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from meshgress.cli import main
from meshgress.datastore import Kind
from meshgress.datastore.file import FileDatastore
from meshgress.manifests import PRINTER_COLUMNS, RESOURCES, format_age, resolve_resource

REPO = Path(__file__).resolve().parents[2]

GATEWAY = """
apiVersion: meshgress.io/v1alpha1
kind: EgressGateway
metadata: {name: egress}
spec: {egressIPs: [192.0.2.201, 192.0.2.202]}
"""
POLICY = """
apiVersion: meshgress.io/v1alpha1
kind: EgressPolicy
metadata: {name: web}
spec:
  gateway: egress
  namespaceSelector: {matchLabels: {team: web}}
"""


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    path = tmp_path / "datastore"
    FileDatastore(path).close()
    monkeypatch.setenv("MESHGRESS_DATASTORE", str(path))
    monkeypatch.delenv("MESHGRESS_CLUSTER_CONFIG", raising=False)
    return path


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def names(store_dir, kind):
    store = FileDatastore(store_dir)
    try:
        return [o["metadata"]["name"] for o in store.list(kind).items]
    finally:
        store.close()


def test_apply_creates_then_leaves_unchanged_then_configures(store_dir, tmp_path, capsys):
    manifest = tmp_path / "egress.yaml"
    manifest.write_text(GATEWAY + "---\n" + POLICY)
    assert run(capsys, "apply", "-f", str(manifest))[:2] == (0, (
        "egressgateway.meshgress.io/egress created\n"
        "egresspolicy.meshgress.io/web created\n"))
    assert run(capsys, "apply", "-f", str(manifest))[1] == (
        "egressgateway.meshgress.io/egress unchanged\n"
        "egresspolicy.meshgress.io/web unchanged\n")
    manifest.write_text(POLICY.replace("team: web", "team: shop"))
    assert run(capsys, "apply", "-f", str(manifest))[1] == \
        "egresspolicy.meshgress.io/web configured\n"
    store = FileDatastore(store_dir)
    policy = store.get(Kind.EGRESS_POLICY, "web")
    store.close()
    assert policy["spec"]["namespaceSelector"] == {"matchLabels": {"team": "shop"}}
    assert policy["metadata"]["generation"] == 2


def test_apply_reads_stdin(store_dir, capsys, monkeypatch):
    code, out, _ = run(capsys, "apply", "-f", "-", stdin=POLICY, monkeypatch=monkeypatch)
    assert (code, out) == (0, "egresspolicy.meshgress.io/web created\n")
    assert names(store_dir, Kind.EGRESS_POLICY) == ["web"]


def test_one_invalid_document_writes_nothing_and_says_why(store_dir, capsys, monkeypatch):
    bad = POLICY.replace("name: web", "name: bad").replace(
        "gateway: egress", "gateway: egress\n  destinationCIDRs: [203.0.113.7/24]")
    code, out, err = run(capsys, "apply", "-f", "-", stdin=GATEWAY + "---\n" + bad,
                         monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert err.startswith('Error from server (Invalid): error when applying "STDIN": '
                          'The EgressPolicy "bad" is invalid: spec.destinationCIDRs[0]: ')
    assert names(store_dir, Kind.EGRESS_GATEWAY) == []
    assert names(store_dir, Kind.EGRESS_POLICY) == []


def test_yaml_is_read_as_kubernetes_reads_it(store_dir, capsys, monkeypatch):
    """A date-like label value is the string the API server sees; a document a safe
    loader fails on with something other than a YAML error is still a clear error."""
    dated = GATEWAY.replace("metadata: {name: egress}",
                            "metadata: {name: egress, labels: {since: 2024-02-28}}")
    code, out, _ = run(capsys, "apply", "-f", "-", stdin=dated, monkeypatch=monkeypatch)
    assert (code, out) == (0, "egressgateway.meshgress.io/egress created\n")
    stored = FileDatastore(store_dir).get(Kind.EGRESS_GATEWAY, "egress")
    assert stored["metadata"]["labels"] == {"since": "2024-02-28"}
    code, out, err = run(capsys, "apply", "-f", "-",
                         stdin=POLICY + "  priority: !!int high\n", monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert err.startswith("error: error parsing STDIN: invalid literal for int()")
    assert names(store_dir, Kind.EGRESS_POLICY) == []


def test_egress_ips_are_checked_against_the_clusters_ranges(store_dir, tmp_path, capsys,
                                                             monkeypatch):
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"clusterPodCIDRs": ["192.0.2.128/25"],
                                      "serviceCIDRs": ["198.19.0.0/16"]}))
    code, _, err = run(capsys, "apply", "--cluster-config", str(config), "-f", "-",
                       stdin=GATEWAY, monkeypatch=monkeypatch)
    assert code == 1 and "spec.egressIPs[0]" in err and "192.0.2.128/25" in err


@pytest.mark.parametrize("doc,expected", [
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
     'no matches for kind "ConfigMap" in version "v1"\nensure CRDs are installed first'),
    ("apiVersion: meshgress.io/v2\nkind: EgressPolicy\nmetadata: {name: x}\n",
     'no matches for kind "EgressPolicy" in version "meshgress.io/v2"'),
    ("apiVersion: v1\nkind: Node\nmetadata: {name: x}\n",
     "Node objects belong to the cluster, not to `meshgress apply`"),
    ("kind: EgressPolicy\nmetadata: {name: x}\n", "apiVersion not set"),
    ("- just\n- a list\n", "a document is list, not an object"),
    ("a: [unclosed\n", 'error: error parsing STDIN'),
], ids=["unknown-kind", "unknown-version", "cluster-kind", "no-apiversion", "not-an-object",
        "bad-yaml"])
def test_apply_refuses_what_the_store_does_not_serve(store_dir, capsys, monkeypatch, doc,
                                                     expected):
    code, out, err = run(capsys, "apply", "-f", "-", stdin=doc, monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert expected in err


def test_get_prints_tables_yaml_json_and_names(store_dir, capsys, monkeypatch):
    run(capsys, "apply", "-f", "-", stdin=GATEWAY + "---\n" + POLICY, monkeypatch=monkeypatch)
    code, out, _ = run(capsys, "get", "egp")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["NAME", "GATEWAY", "PRIORITY", "ACCEPTED", "SELECTED", "PODS",
                              "AGE"]
    # As kubectl: the spec as written (no priority: an empty cell), columns aligned.
    assert row[:header.index("ACCEPTED")].split() == ["web", "egress"]
    egw = run(capsys, "get", "egw")[1].splitlines()
    assert egw[0].split() == ["NAME", "EGRESS", "IPS", "READY", "AGE"]
    assert egw[1].split()[:2] == ["egress", '["192.0.2.201","192.0.2.202"]']
    wide = run(capsys, "get", "egw", "-o", "wide")[1].splitlines()[0]
    assert wide.split() == ["NAME", "EGRESS", "IPS", "FAILURE", "POLICY", "READY", "REASON",
                            "AGE"]
    assert run(capsys, "get", "egressgateways.meshgress.io", "egress", "-o", "name")[1] == \
        "egressgateway.meshgress.io/egress\n"
    as_yaml = yaml.safe_load(run(capsys, "get", "EgressGateway", "egress", "-o", "yaml")[1])
    assert as_yaml["spec"]["egressIPs"] == ["192.0.2.201", "192.0.2.202"]
    as_json = json.loads(run(capsys, "get", "egresspolicies", "-o", "json")[1])
    assert as_json["kind"] == "List" and [i["metadata"]["name"] for i in
                                          as_json["items"]] == ["web"]


@pytest.mark.parametrize("kind, crd", [(Kind.EGRESS_GATEWAY, "egressgateways"),
                                       (Kind.EGRESS_POLICY, "egresspolicies")])
def test_the_table_has_the_crds_printer_columns(kind, crd):
    """`meshgress get` on a file datastore prints what kubectl prints from the CRD."""
    path = REPO / "charts" / "meshgress" / "crds" / f"{crd}.meshgress.io.yaml"
    [version] = yaml.safe_load(path.read_text())["spec"]["versions"]
    expected = [(c["name"].upper(), c.get("priority", 0) == 1)
                for c in version["additionalPrinterColumns"] if c["name"] != "Age"]
    assert [(c.header, c.wide) for c in PRINTER_COLUMNS[kind]] == expected


def test_get_and_delete_answer_in_kubectls_words(store_dir, capsys, monkeypatch):
    assert run(capsys, "get", "egp", "nope")[::2] == (
        1, 'Error from server (NotFound): egresspolicies.meshgress.io "nope" not found\n')
    assert run(capsys, "get", "widgets")[::2] == (
        1, 'error: the server doesn\'t have a resource type "widgets"\n')
    assert run(capsys, "get", "pods")[::2] == (0, "No resources found in default namespace.\n")
    run(capsys, "apply", "-f", "-", stdin=POLICY, monkeypatch=monkeypatch)
    assert run(capsys, "delete", "egresspolicy", "web")[:2] == (
        0, 'egresspolicy.meshgress.io "web" deleted\n')
    assert run(capsys, "delete", "egresspolicy", "web")[::2] == (
        1, 'Error from server (NotFound): egresspolicies.meshgress.io "web" not found\n')
    code, _, err = run(capsys, "delete", "node", "node1")
    assert code == 1 and "belong to the cluster" in err


def test_without_a_datastore_the_commands_say_what_to_give(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("MESHGRESS_DATASTORE", raising=False)
    code, _, err = run(capsys, "get", "egp")
    assert code == 2 and "give --datastore (or set $MESHGRESS_DATASTORE)" in err
    code, _, err = run(capsys, "get", "egp", "--datastore", str(tmp_path / "none"))
    assert code == 2 and "no datastore at" in err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("text", ["egresspolicies", "egresspolicy", "egp", "EgressPolicy",
                                  "egresspolicies.meshgress.io", "EGP"])
def test_resource_names_resolve_as_kubectl_resolves_them(text):
    assert resolve_resource(text).kind == Kind.EGRESS_POLICY


def test_every_kind_has_one_resource():
    assert sorted(r.kind for r in RESOURCES) == sorted(Kind)


@pytest.mark.parametrize("seconds,age", [(5, "5s"), (119, "119s"), (125, "2m5s"),
                                         (600, "10m"), (3 * 3600 + 60, "3h1m"),
                                         (9 * 3600, "9h"), (50 * 3600, "2d2h")])
def test_age_reads_as_kubectls(seconds, age):
    assert format_age("2026-01-01T00:00:00+00:00", 1767225600 + seconds) == age


def test_under_lab_the_objects_name_does_not_replace_the_labs():
    from meshgress.cli import build_parser

    args = build_parser().parse_args(["lab", "--name", "mine", "get", "egp", "payments"])
    assert (args.name, args.resource, args.object_name) == ("mine", "egp", "payments")
    args = build_parser().parse_args(["lab", "--name", "mine", "delete", "egp", "web"])
    assert (args.name, args.object_name) == ("mine", "web")
