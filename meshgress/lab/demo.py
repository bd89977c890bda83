"""`meshgress lab demo`: bring the lab up and show, with real packets, what it proves.

Each claim printed here is measured while the demo runs (a ping, a TCP and a UDP exchange
with the outside host, which reports the source address it saw); nothing is assumed.
The lab is left up afterwards so a person can look around; `meshgress lab down` removes it.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

from meshgress.lab import netns
from meshgress.lab.lab import Lab
from meshgress.lab.topology import ECHO_PORT, OUTSIDE_ADDRESS, LabTopology

NOT_BUILT_YET = (
    "pods (the CNI plugin), the WireGuard mesh between nodes, and egress gateways are not "
    "built yet: the lab has nodes, the underlay and the outside host, and traffic between "
    "them is plain underlay traffic."
)


def _in(lab: Lab, target: str, *command: str, timeout: float = 15) -> tuple[bool, str]:
    proc = netns.run(lab.exec_argv(target, list(command)), check=False, timeout=timeout)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def _ping(lab: Lab, source: str, address: str) -> str:
    ok, out = _in(lab, source, "ping", "-c", "3", "-i", "0.2", "-W", "1", "-q", address)
    if not ok:
        return f"FAILED ({out.splitlines()[-1] if out else 'no output'})"
    match = re.search(r"= [\d.]+/([\d.]+)/", out)
    return f"ok, 3/3 replies, avg rtt {match.group(1) if match else '?'} ms"


def _seen_by_outside(lab: Lab, source: str, proto: str) -> str:
    ok, out = _in(lab, source, sys.executable, "-m", "meshgress.lab.echo", proto,
                  str(OUTSIDE_ADDRESS), str(ECHO_PORT))
    return out if ok else f"FAILED ({out})"


def run_demo(lab: Lab, nodes: int, gateway_nodes: int, out: TextIO = sys.stdout) -> int:
    """Returns the number of failed checks (0 when everything shown held)."""
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"meshgress lab demo: {nodes} nodes + {gateway_nodes} gateway nodes")
    lab.down()
    started = time.monotonic()
    topology: LabTopology = lab.up(nodes=nodes, gateway_nodes=gateway_nodes)
    say(f"lab up in {time.monotonic() - started:.1f} s: underlay 192.0.2.0/24 on a bridge in "
        f"{topology.underlay_netns}, outside host {OUTSIDE_ADDRESS} "
        f"(echo on tcp/udp {ECHO_PORT})")
    for node in topology.nodes:
        say(f"  {node.name:<6} {node.role:<8} underlay {node.underlay_address!s:<12} "
            f"pod CIDR {node.pod_cidr}   netns {node.netns}")
    failures = 0
    say()
    say("node-to-node over the underlay:")
    first = topology.nodes[0]
    for other in topology.nodes[1:]:
        result = _ping(lab, first.name, str(other.underlay_address))
        failures += result.startswith("FAILED")
        say(f"  {first.name} -> {other.name} ({other.underlay_address}): {result}")
    say()
    say("node-to-outside, and the source address the outside host saw:")
    for node in topology.nodes:
        for proto in ("tcp", "udp"):
            seen = _seen_by_outside(lab, node.name, proto)
            ok = seen == str(node.underlay_address)
            failures += not ok
            say(f"  {node.name:<6} {proto}: outside saw {seen}"
                f"{'' if ok else f'  <-- expected {node.underlay_address}'}")
    say()
    say(f"not built yet: {NOT_BUILT_YET}")
    say()
    cli = ".venv/bin/meshgress lab" + ("" if lab.name == "lab" else f" --name {lab.name}")
    say(f"{'all checks held' if failures == 0 else f'{failures} check(s) FAILED'}. "
        "The lab is still up: look around with")
    say(f"  {cli} status    {cli} exec {first.name} -- ip addr")
    say("and remove every trace of it with")
    say(f"  {cli} down")
    return failures
