"""A real Prometheus server (Debian's `prometheus` binary) on the egress lab: it scrapes
every agent and gateway under the job names the alert rules expect, loads the rules, runs
every query of every dashboard panel against the lab's real series, and fires the
slot-unhealthy alert when the gateway holding a slot is killed, then resolves it once a
standby has taken the slot over.

The server runs on the lab's monitoring host, which sits on the underlay outside the
cluster and is let through the agents' endpoint guard by --metrics-allow-from (the outside
host is not), with its own config and data folder, and is stopped by its PID (`lab down`
would stop it too, as it stops every process in the lab's namespaces). Scrapes and rule
evaluations run every second. The rules are the shipped file except one test-only change,
made in a copy: `MeshgressEgressSlotUnhealthy` waits `for: 1s` instead of 2 minutes,
because a standby takes a dead holder's slot over within seconds (the shipped 2 minutes is
there so that such a failover never pages anyone).
"""

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from meshgress.datastore import Kind
from meshgress.lab.netns import call_in_netns
from tests.conftest import eventually, run_meshgress
from tests.e2e.test_egress import _egress_lab, store
from tests.tools.grafana_dashboard import NEEDS, dashboard_queries, resolve_query

pytestmark = pytest.mark.e2e

RULES = (Path(__file__).resolve().parents[2] / "charts" / "meshgress" / "files" / "alerts"
         / "meshgress.rules.yaml")
AGENT_JOB, GATEWAY_JOB = "meshgress-agent", "meshgress-gateway"
AGENT_PORT, GATEWAY_PORT = 9820, 9821
LISTEN = "127.0.0.1:9090"
SLOT_ALERT = "MeshgressEgressSlotUnhealthy"
TEST_FOR = {SLOT_ALERT: "1s"}
"""Test-only `for:` overrides, applied to a copy of the rules (see the module docstring)."""

prom_lab = pytest.fixture(scope="module", params=["file"])(_egress_lab)
"""What Prometheus sees does not depend on the datastore: the file lab is enough."""


def lab(name, *args, **kw):
    return run_meshgress("lab", "--name", name, *args, **kw)


def rules_for_test(overrides):
    """The shipped rules file with the given alerts' `for:` replaced, as YAML text."""
    doc = yaml.safe_load(RULES.read_text())
    changed = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in overrides:
                rule["for"] = overrides[rule["alert"]]
                changed.add(rule["alert"])
    assert changed == set(overrides), f"no such alerts in {RULES.name}: {set(overrides) - changed}"
    return yaml.safe_dump(doc, sort_keys=False)


class Prometheus:
    """Debian's prometheus in a network namespace, with its own config and data folder."""

    def __init__(self, netns, folder, targets, rules_text):
        self.netns = netns
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rules.yaml").write_text(rules_text)
        (folder / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                               for job, addresses in sorted(targets.items())]}))
        self.log = folder / "prometheus.log"
        self.proc = None

    def start(self):
        with self.log.open("ab") as log:
            # nsenter execs prometheus: the PID is the server's own.
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "prometheus",
                 f"--config.file={self.folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.folder / 'data'}",
                 f"--web.listen-address={LISTEN}", "--log.level=warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()}"
            try:
                self.get("/-/ready", raw=True)
                return
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready in 60 s"
                time.sleep(0.2)

    def stop(self):
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def get(self, path, raw=False, **params):
        url = f"http://{LISTEN}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")

        def fetch():
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()

        body = call_in_netns(f"/run/netns/{self.netns}", fetch)
        if raw:
            return body
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr):
        return self.get("/api/v1/query", query=expr)["result"]

    def query_range(self, expr, seconds, step=1):
        now = time.time()
        return self.get("/api/v1/query_range", query=expr, start=now - seconds, end=now,
                        step=step)["result"]

    def alerts(self, name):
        return [a for a in self.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == name]


def lab_status(name):
    return json.loads(lab(name, "status", "--json").stdout)


@pytest.fixture(scope="module")
def prometheus(prom_lab, tmp_path_factory):
    name = prom_lab
    nodes = lab_status(name)["nodes"]
    targets = {
        AGENT_JOB: [f"{n['underlayAddress']}:{AGENT_PORT}" for n in nodes],
        GATEWAY_JOB: [f"{n['underlayAddress']}:{GATEWAY_PORT}" for n in nodes
                      if n["role"] == "gateway"]}
    server = Prometheus(f"mg-{name}-monitor", tmp_path_factory.mktemp("prometheus"), targets,
                        rules_for_test(TEST_FOR))
    started = time.monotonic()
    server.start()
    try:
        expected = {(job, t) for job, ts in targets.items() for t in ts}

        def all_up():
            return {(s["metric"]["job"], s["metric"]["instance"])
                    for s in server.query("up == 1")} == expected

        assert eventually(all_up, timeout=60), server.query("up")
        print(f"prometheus scraping every target {time.monotonic() - started:.1f} s "
              "after start")
        yield server, targets
    finally:
        server.stop()


def test_every_agent_and_gateway_is_scraped_and_every_rule_loaded(prometheus):
    server, targets = prometheus
    up = {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1]
          for s in server.query("up")}
    assert up == {(job, t): "1" for job, ts in targets.items() for t in ts}
    loaded = {r["name"]: r for g in server.get("/api/v1/rules")["groups"] for r in g["rules"]}
    shipped = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
               for r in g["rules"]]
    assert sorted(loaded) == sorted(shipped)
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    assert loaded[SLOT_ALERT]["duration"] == 1  # the test's override, and only there
    assert loaded["MeshgressEgressGatewayUnreachable"]["duration"] == 60


def test_every_dashboard_query_returns_data_from_the_labs_series(prom_lab, prometheus, tmp_path):
    """Three panels need something wrong before they show anything (NEEDS), provoked
    here and undone afterwards:
    - skipped-node: a Node object whose agent never ran (no key published): every agent
      reports it in meshgress_mesh_nodes_skipped;
    - agent-error: in node1's mount namespace, a read-only file reading 0 is bound over
      /proc/sys/net/ipv4/ip_forward; the agent sees forwarding off, its write fails
      (EROFS), and its `forwarding` step is counted as failed. The kernel's setting is
      not touched, so no traffic is disturbed;
    - gateway-error: an EgressGateway naming an interface the gateway nodes do not have;
      every gateway counts `external-interface` errors for its slot and serves it nowhere.
    """
    name = prom_lab
    server, _ = prometheus
    s = store(name)
    forwarding_off = tmp_path / "ip_forward"
    forwarding_off.write_text("0\n")
    proc_file = "/proc/sys/net/ipv4/ip_forward"
    try:
        s.apply({"apiVersion": "v1", "kind": "Node",
                 "metadata": {"name": "node9", "labels": {"kubernetes.io/os": "linux"}},
                 "spec": {"podCIDR": "198.18.9.0/24", "podCIDRs": ["198.18.9.0/24"]},
                 "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.19"}]}})
        s.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                 "metadata": {"name": "unservable"},
                 "spec": {"egressIPs": ["192.0.2.203"], "interface": "mgnone0"}})
        lab(name, "exec", "node1", "--", "mount", "--bind", "-o", "ro", str(forwarding_off),
            proc_file)
        provoked = {
            "skipped-node": 'meshgress_mesh_nodes_skipped{node="node9"}',
            "agent-error": 'meshgress_reconcile_errors_total{op="forwarding"}',
            "gateway-error": 'meshgress_gateway_errors_total{op="external-interface"}'}
        for need, expr in provoked.items():
            # a few samples, so that rates over the series have something to work on
            assert eventually(lambda expr=expr: server.query(
                f"count_over_time({expr}[10s]) >= 3"), timeout=60), need
        queries = dashboard_queries()
        assert {n for q in queries for n in q.needs} <= set(NEEDS)
        empty = []
        for q in queries:
            expr = resolve_query(q.expr, rate_interval="10s", time_range="1m")
            result = server.query(expr) if q.instant else server.query_range(expr, 20)
            if not result:
                empty.append(f"{q.row} / {q.panel} / {q.ref_id}: {expr}")
        assert empty == [], "panel queries without data:\n" + "\n".join(empty)
        print(f"{len(queries)} panel queries, every one with data")
    finally:
        lab(name, "exec", "node1", "--", "umount", proc_file, check=False)
        for kind, obj_name in ((Kind.NODE, "node9"), (Kind.EGRESS_GATEWAY, "unservable")):
            if any(o["metadata"]["name"] == obj_name for o in s.list(kind).items):
                s.delete(kind, obj_name)
        s.close()


def test_killing_a_slots_holder_fires_the_slot_alert_and_the_failover_resolves_it(
        prom_lab, prometheus):
    """Every node's agent, the gateway nodes' included: no slot alert while every holder
    serves (a gateway node's own agent checks a slot held beside it where it lives, since
    a probe through the tunnel would be delivered locally there); the killed holder's slot
    fires on the workers and the failover resolves it everywhere."""
    name = prom_lab
    server, _ = prometheus
    status = lab_status(name)
    agents = {f"{n['underlayAddress']}:{AGENT_PORT}" for n in status["nodes"]}
    workers = {f"{n['underlayAddress']}:{AGENT_PORT}" for n in status["nodes"]
               if n["role"] == "worker"}
    victim = next(s for s in status["slots"] if s["node"] == "gw1")
    slot = str(victim["index"])

    def worker_alerts():
        return [a for a in server.alerts(SLOT_ALERT) if a["labels"]["instance"] in workers]

    def agent_alerts():
        return [a for a in server.alerts(SLOT_ALERT) if a["labels"]["instance"] in agents]

    assert eventually(lambda: not agent_alerts(), timeout=30), agent_alerts()
    killed = time.monotonic()
    lab(name, "gateway", "kill", "gw1")
    fired = eventually(lambda: [a for a in worker_alerts() if a["state"] == "firing"
                                and a["labels"]["slot"] == slot
                                and a["labels"]["gateway"] == "egress"], timeout=30,
                       interval=0.1)
    fired_after = time.monotonic() - killed
    assert fired, f"no firing {SLOT_ALERT} for slot {slot} from {sorted(workers)}"
    assert {a["labels"]["instance"] for a in fired} <= workers
    assert eventually(lambda: not agent_alerts(), timeout=60, interval=0.1), agent_alerts()
    resolved_after = time.monotonic() - killed
    taken = next(s for s in lab_status(name)["slots"] if s["index"] == victim["index"])
    assert taken["holder"] and taken["node"] == "gw2", taken
    history = server.query(f'count_over_time(ALERTS{{alertname="{SLOT_ALERT}",'
                           f'alertstate="firing",slot="{slot}"}}[2m])')
    assert {h["metric"]["instance"] for h in history} & workers
    print(f"{SLOT_ALERT} for slot {slot}: firing {fired_after:.1f} s after the kill, "
          f"resolved {resolved_after:.1f} s after it")
