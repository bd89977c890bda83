"""Control-plane reliability on the lab: a typo never fails open, a newcomer never steals a
live egress IP, one unreadable object never stops a node.

One lab for the module (gateway `egress` with 192.0.2.201 and .202, FailClosed; policy
`payments`); each test puts back what it changes.
"""

import json
import subprocess
import sys

import pytest

from meshgress.datastore import Kind
from tests.conftest import eventually, observe_for, run_meshgress
from tests.e2e.test_egress import (
    EGRESS_IPS,
    OUTSIDE,
    _egress_lab,
    condition,
    lab,
    largest_gap,
    pod_netns,
    run_streams,
    seen_from,
    store,
    update,
)

pytestmark = pytest.mark.e2e

egress_lab = pytest.fixture(scope="module")(_egress_lab)

NEW_FLOWS = """
import json, socket, sys, time
outside, seconds = sys.argv[1], float(sys.argv[2])
end, seen = time.time() + seconds, []
while time.time() < end:
    t = time.time()
    try:
        with socket.create_connection((outside, 7777), timeout=2) as c:
            c.settimeout(2)
            seen.append((t, c.makefile().readline().split()[0]))
    except (OSError, IndexError):
        seen.append((t, None))
    time.sleep(max(0, t + 0.05 - time.time()))
print(json.dumps(seen))
"""


def new_flows(name, pod, seconds):
    """A new TCP connection every 50 ms from `pod`: the source the outside saw for each."""
    return subprocess.Popen(["nsenter", f"--net={pod_netns(name, pod)}", sys.executable, "-c",
                             NEW_FLOWS, OUTSIDE, str(seconds)], stdout=subprocess.PIPE, text=True)


def events_about(s, name, reason):
    return [e for e in s.list(Kind.EVENT, namespace="default").items
            if e["regarding"]["name"] == name and e["reason"] == reason]


def holders(name):
    return {(slot["gateway"], slot["egressIP"]): slot["holder"]
            for slot in json.loads(lab(name, "status", "--json").stdout)["slots"]}


def explain(name, pod):
    return run_meshgress("lab", "--name", name, "exec", "node1", "--", "meshgress", "explain",
                         pod, "--to", OUTSIDE).stdout


def metrics(name, node):
    scrape = ("import urllib.request as u; "
              "print(u.urlopen('http://127.0.0.1:9820/metrics', timeout=2).read().decode())")
    text = run_meshgress("lab", "--name", name, "exec", node, "--", sys.executable, "-c",
                         scrape).stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


TYPO = ["0.0.0.0/0", "10.0.0.0/33"]


def test_a_typo_in_a_live_policy_keeps_its_last_valid_generation_applied(egress_lab):
    """payments is replaced by a spec with an invalid CIDR while its pod opens a new flow
    every 50 ms and keeps four long-lived TCP flows; node1's agent is restarted while the
    typo is there. Every new flow leaves with an egress IP (never the node's 192.0.2.11,
    never dropped), no established flow breaks, and the policy says why in status, in an
    Event and in `meshgress explain`."""
    name = egress_lab
    s = store(name)
    pod = "payments/app-node1"
    before = s.get(Kind.EGRESS_POLICY, "payments")
    generation = before["metadata"]["generation"]
    assert eventually(lambda: (s.get(Kind.EGRESS_POLICY, "payments").get("status") or {})
                      .get("observedGeneration") == generation, timeout=20)
    flows = new_flows(name, pod, 25)
    streams = run_streams(name, pod, 25)
    try:
        observe_for(2)  # the streams' baseline before the change
        update(s, Kind.EGRESS_POLICY, "payments",
               lambda spec: spec.update(destinationCIDRs=TYPO))

        def reported():
            got = condition(s.get(Kind.EGRESS_POLICY, "payments"), "InvalidSpec")
            return got if got and got["status"] == "True" else None

        invalid = eventually(reported, timeout=20)
        assert invalid["message"] == (
            f"generation {generation + 1} is invalid: spec.destinationCIDRs[1]: "
            f'"10.0.0.0/33" is not a CIDR; generation {generation}, the last valid one, '
            "still applies")
        stored = s.get(Kind.EGRESS_POLICY, "payments")
        assert stored["status"]["observedGeneration"] == generation
        accepted = condition(stored, "Accepted")
        assert (accepted["status"], accepted["reason"]) == ("True", "LastValidGeneration")
        [event] = eventually(lambda: events_about(s, "payments", "InvalidSpec"), timeout=10)
        assert event["type"] == "Warning" and event["note"] == invalid["message"]
        assert f"runs on generation {generation}, its last valid one: generation " \
               f"{generation + 1} is invalid" in explain(name, pod)
        lab(name, "agent", "restart", "node1")  # it has only the stored objects to go by
        results = json.loads(flows.communicate(timeout=60)[0])
        established = json.loads(streams.communicate(timeout=60)[0])
    finally:
        if flows.poll() is None:
            flows.kill()
        if streams.poll() is None:
            streams.kill()
        update(s, Kind.EGRESS_POLICY, "payments", lambda spec: spec.pop("destinationCIDRs"))
    sources = [seen for _, seen in results]
    assert len(sources) > 100
    assert set(sources) <= EGRESS_IPS, {x for x in sources if x not in EGRESS_IPS}
    for flow in established["tcp"]:
        assert not [v for k, v in flow if k == "error"], "an established flow was disturbed"
    for udp in established["udp"]:
        assert {seen for _, seen in udp if seen} <= EGRESS_IPS
    # Fixed: the new generation applies and the condition clears.
    assert eventually(lambda: condition(s.get(Kind.EGRESS_POLICY, "payments"),
                                        "InvalidSpec")["status"] == "False", timeout=20)
    assert s.get(Kind.EGRESS_POLICY, "payments")["status"]["observedGeneration"] == \
        generation + 2
    s.close()


def test_a_second_gateway_listing_a_live_egress_ip_never_takes_it(egress_lab):
    """A newer EgressGateway (named to sort first) lists 192.0.2.202, which `egress` serves,
    and one IP of its own, while payments pods keep probe streams and TCP flows. The
    holder keeps the IP, no flow moves or breaks, and the newcomer is told who serves it."""
    name = egress_lab
    s = store(name)
    held = holders(name)
    assert all(held.values())
    streams = {pod: run_streams(name, pod, 12) for pod in
               ("payments/app-node1", "payments/app-node2")}
    try:
        observe_for(2)  # the streams' baseline before the change
        s.create({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                  "metadata": {"name": "aa-copycat"},
                  "spec": {"egressIPs": ["192.0.2.202", "192.0.2.205"]}})

        def told():
            got = condition(s.get(Kind.EGRESS_GATEWAY, "aa-copycat"), "EgressIPConflict")
            return got if got and got["status"] == "True" else None

        conflict = eventually(told, timeout=20)
        assert conflict["message"].startswith(
            "egress IP 192.0.2.202 is served by EgressGateway egress, created first")
        assert eventually(lambda: events_about(s, "aa-copycat", "EgressIPConflict"),
                          timeout=10)
        owner = s.get(Kind.EGRESS_GATEWAY, "egress")
        assert condition(owner, "EgressIPConflict")["status"] == "False"
        assert condition(owner, "Degraded")["status"] == "False"
        results = {pod: json.loads(p.communicate(timeout=60)[0]) for pod, p in streams.items()}
        now = holders(name)
        assert now[("egress", "192.0.2.202")] == held[("egress", "192.0.2.202")]
        assert now[("egress", "192.0.2.201")] == held[("egress", "192.0.2.201")]
    finally:
        for p in streams.values():
            if p.poll() is None:
                p.kill()
        if any(o["metadata"]["name"] == "aa-copycat" for o in s.list(Kind.EGRESS_GATEWAY).items):
            s.delete(Kind.EGRESS_GATEWAY, "aa-copycat")
        s.close()
    for pod, result in results.items():
        for udp in result["udp"]:
            sources = {seen for _, seen in udp if seen}
            assert len(sources) == 1 and sources <= EGRESS_IPS, (pod, sources)
            # A stolen IP moves its flows (a new source, above) after a failover gap; what
            # is left is the machine's own hiccups (the new gateway starts a tunnel).
            assert largest_gap(udp) < 1.0, (pod, largest_gap(udp))
        for flow in result["tcp"]:
            errors = [v for k, v in flow if k == "error"]
            assert not errors, f"{pod}: a flow was disturbed: {errors}"
            assert sum(1 for k, _ in flow if k == "echo") > 150


def test_a_restarted_agent_becomes_ready_with_an_unreadable_object_in_the_datastore(
        egress_lab):
    """One garbage YAML file among the policies: node1's agent restarts and becomes ready,
    a new pod on node1 is wired (CNI ADD) and leaves with an egress IP, and the file is
    reported by `meshgress status` and the agent's metrics until it is removed."""
    name = egress_lab
    s = store(name)
    garbage = s.root / "objects" / "EgressPolicy" / "garbage.yaml"
    garbage.write_text("spec: {gateway: [unclosed\n")
    try:
        lab(name, "agent", "restart", "node1")
        ip = lab(name, "add-pod", "payments/after-garbage", "--node", "node1").stdout.strip()
        assert ip.startswith("198.18.1.")
        assert seen_from(name, "payments/after-garbage") in EGRESS_IPS
        status = run_meshgress("lab", "--name", name, "exec", "node1", "--", "meshgress",
                               "status", "--json", check=False)
        assert status.returncode == 1
        report = json.loads(status.stdout)
        assert report["meshHealthy"] is True
        [rejected] = report["rejectedObjects"]
        assert (rejected["kind"], rejected["name"], rejected["source"]) == (
            "EgressPolicy", "garbage", str(garbage))
        assert rejected["reason"].startswith("not valid YAML")
        assert metrics(name, "node1")[
            'meshgress_datastore_rejected_objects{kind="EgressPolicy"}'] == 1
        s.delete(Kind.EGRESS_POLICY, "garbage")
        assert eventually(lambda: metrics(name, "node1")[
            'meshgress_datastore_rejected_objects{kind="EgressPolicy"}'] == 0)
    finally:
        garbage.unlink(missing_ok=True)
        s.close()
