"""`meshgress lab demo`: bring the lab up and show, with real packets, what it proves.

Each claim printed here is measured while the demo runs — pings, TCP and UDP exchanges
with the outside host (which reports the source address it saw), a capture on the
underlay bridge — nothing is assumed. The lab is left up afterwards so a person can look
around; `meshgress lab down` removes it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from meshgress.lab import netns
from meshgress.lab.lab import Lab
from meshgress.lab.topology import (
    CLUSTER_POD_CIDR,
    ECHO_PORT,
    OUTSIDE_ADDRESS,
    LabNode,
    LabTopology,
)


def _in(lab: Lab, target: str, *command: str, timeout: float = 15) -> tuple[bool, str]:
    proc = netns.run(lab.exec_argv(target, list(command)), check=False, timeout=timeout)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _ping(lab: Lab, source: str, address: str, count: int = 3) -> str:
    ok, out = _in(lab, source, "ping", "-c", str(count), "-i", "0.2", "-W", "2", "-q", address)
    if not ok:
        return f"FAILED ({out.splitlines()[-1] if out else 'no output'})"
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    return f"ok, {count}/{count} replies, avg rtt {match.group(1) if match else '?'} ms"


def _seen_by_outside(lab: Lab, source: str, proto: str) -> str:
    ok, out = _in(lab, source, sys.executable, "-m", "meshgress.lab.echo", proto,
                  str(OUTSIDE_ADDRESS), str(ECHO_PORT))
    return out if ok else f"FAILED ({out})"


def _count(pcap: Path, bpf: str) -> int:
    out = subprocess.run(["tcpdump", "-r", str(pcap), "-n", bpf], capture_output=True,
                         text=True, check=False).stdout
    return len([line for line in out.splitlines() if line.strip()])


class _Report:
    """What the demo prints, and the tally of checks that did not hold."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failures = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def check(self, ok: bool, text: str) -> None:
        self.failures += not ok
        self.say(f"  {'ok  ' if ok else 'FAIL'} {text}")

    def indented(self, text: str) -> None:
        for line in text.splitlines():
            self.say(f"       {line}")


def run_demo(lab: Lab, nodes: int, gateway_nodes: int, out: TextIO = sys.stdout,
             datastore: str = "file") -> int:
    """Returns the number of failed checks (0 when everything shown held)."""
    report = _Report(out)
    report.say(f"meshgress lab demo: {nodes} nodes + {gateway_nodes} gateway nodes, "
               f"datastore {datastore}")
    topology, pods = _bring_up(lab, nodes, gateway_nodes, datastore, report)
    workers = [n for n in topology.nodes if n.role == "worker"]
    first = workers[0]
    near = f"payments/app-{first.name}"
    _show_mesh(lab, topology, pods, workers, report)
    report.say()
    ok, status = _in(lab, first.name, "meshgress", "status")
    report.check(ok, f"`meshgress status` on {first.name} cross-checks both ends of every "
                     "peer:")
    report.indented(status)
    slots = lab.slots()
    _show_egress(lab, topology, pods, slots, report)
    if slots:
        report.say()
        ok, explained = _in(lab, first.name, "meshgress", "explain", near, "--to",
                            str(OUTSIDE_ADDRESS))
        report.check(ok, f"`meshgress explain {near} --to {OUTSIDE_ADDRESS}`:")
        report.indented(explained)
    report.say()
    cli = ".venv/bin/meshgress lab" + ("" if lab.name == "lab" else f" --name {lab.name}")
    verdict = ("all checks held" if report.failures == 0
               else f"{report.failures} check(s) FAILED")
    report.say(f"{verdict}. The lab is still up: look around with")
    report.say(f"  {cli} status    {cli} exec {first.name} -- meshgress status    "
               f"{cli} exec {near} -- ip addr")
    report.say("and remove every trace of it with")
    report.say(f"  {cli} down")
    return report.failures


def _bring_up(lab: Lab, nodes: int, gateway_nodes: int, datastore: str,
              report: _Report) -> tuple[LabTopology, dict[str, dict[str, Any]]]:
    lab.down()
    started = time.monotonic()
    topology = lab.up(nodes=nodes, gateway_nodes=gateway_nodes, datastore=datastore)
    report.say(f"lab up in {time.monotonic() - started:.1f} s: underlay 192.0.2.0/24 on a "
               f"bridge, outside host {OUTSIDE_ADDRESS} (echo on tcp/udp {ECHO_PORT}), a node "
               "agent on every node, pods wired by the meshgress CNI plugin")
    for node in topology.nodes:
        report.say(f"  {node.name:<6} {node.role:<8} underlay {node.underlay_address!s:<12} "
                   f"pod CIDR {node.pod_cidr}")
    pods = {f"{p['namespace']}/{p['name']}": p for p in lab.pods()}
    for key, pod in sorted(pods.items()):
        report.say(f"  pod {key:<22} on {pod['node']:<6} {pod['address']}")
    return topology, pods


def _show_mesh(lab: Lab, topology: LabTopology, pods: dict[str, dict[str, Any]],
               workers: list[LabNode], report: _Report) -> None:
    """Pings between pods while a capture on the underlay proves none of it is plaintext."""
    first = workers[0]
    near = f"payments/app-{first.name}"
    report.say()
    report.say("pods reach each other (same node, and across nodes through the WireGuard "
               "mesh),")
    report.say("while a capture on the underlay bridge watches every packet:")
    targets = [("web", first)] + [(namespace, other) for other in workers[1:]
                                  for namespace in ("payments", "web")]
    pcap = Path(tempfile.mkdtemp(prefix="meshgress-demo-")) / "underlay.pcap"
    capture = subprocess.Popen(
        ["nsenter", f"--net={netns.netns_path(topology.underlay_netns)}", "tcpdump", "-i",
         topology.bridge, "-n", "--immediate-mode", "-U", "-w", str(pcap)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (not pcap.exists() or not pcap.stat().st_size):
            time.sleep(0.05)
        for namespace, node in targets:
            address = pods[f"{namespace}/app-{node.name}"]["address"]
            result = _ping(lab, near, address)
            report.check(not result.startswith("FAILED"),
                         f"{near} -> {namespace}/app-{node.name} ({address}): {result}")
    finally:
        capture.terminate()
        capture.wait(timeout=10)
    plaintext = _count(pcap, f"net {CLUSTER_POD_CIDR}")
    encrypted = _count(pcap, "udp port 51820")
    report.check(plaintext == 0 and encrypted > 0,
                 f"on the underlay: {encrypted} WireGuard packets, {plaintext} packets with a "
                 "pod address in plaintext")
    pcap.unlink(missing_ok=True)
    pcap.parent.rmdir()


def _show_egress(lab: Lab, topology: LabTopology, pods: dict[str, dict[str, Any]],
                 slots: list[dict[str, Any]], report: _Report) -> None:
    """Every pod talks to the outside host, which says which source address it saw."""
    egress_ips = {s["egressIP"] for s in slots}
    if slots:
        report.say()
        report.say("egress gateway slots (one lease per egress IP):")
        for slot in slots:
            report.check(bool(slot["holder"]), f"{slot['gateway']}/{slot['index']} "
                         f"{slot['egressIP']}: held by {slot['holder']} on {slot['node']}")
    report.say()
    report.say("pods reach the outside host, which reports the source address it saw"
               + (" (policy `payments` sends that namespace through the egress gateway):"
                  if slots else ":"))
    for pod_name, pod in sorted(pods.items()):
        node = topology.node(pod["node"])
        steered = bool(slots) and pod_name.startswith("payments/")
        for proto in ("tcp", "udp"):
            seen = _seen_by_outside(lab, pod_name, proto)
            if steered:
                report.check(seen in egress_ips, f"{pod_name:<22} {proto}: outside saw {seen} "
                                                 "(a stable egress IP)")
            else:
                report.check(seen == str(node.underlay_address),
                             f"{pod_name:<22} {proto}: outside saw {seen} (its node's address)")
