"""The UDP ports of one node, on real sockets: no socket meshgress opens there takes a port
an agent or a gateway on the same node binds.

A socket left to pick its port (port 0) draws from the kernel's ephemeral range, and
every fixed port of meshgress lies in the default one (32768-60999). A node's own socket
that drew, say, PROBE_PORT kept the gateway on that node from answering probes for as
long as the socket lived: the slot was never healthy on any other node. Here a throwaway
namespace narrows the ephemeral range to 51898-51900 (one free port, PROBE_PORT and the
first gateway port), so any draw that may land on a fixed port does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from meshgress.slots import FIXED_UDP_PORTS, PROBE_PORT, gateway_port
from tests.privileged.conftest import nsexec, require_root, run

REPO = Path(__file__).resolve().parents[2]
PROBE_SOURCE = "198.18.5.0"
EGRESS_IP = "192.0.2.77"

ON_THE_NODE = """
import ipaddress, json, socket, sys
sys.path.insert(0, sys.argv[1])
from gateway.probe import ProbeResponder, ProbeSocket
from nodeagent.prober import open_probe_socket
source, egress_ip = sys.argv[2], sys.argv[3]
# The agent's prober: one socket per slot tunnel.
agent = [open_probe_socket(name, source) for name in ("mge00000001", "mge00000002")]
# A one-off look beside it (`meshgress status`): two sockets at once.
one_off = [open_probe_socket("mge00000001", source, port=None) for _ in range(2)]
# Then a gateway on the same node takes a slot: its responder and its tunnel's port
# (wireguard-go binds every address, on no device).
responder = ProbeResponder()
index = socket.if_nametoindex("mgeg0000001")
responder.ensure({"mgeg0000001": ProbeSocket(index, 0, ipaddress.IPv4Address(egress_ip))})
tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tunnel.bind(("0.0.0.0", int(sys.argv[4])))
print(json.dumps({"agent": [s.getsockname()[1] for s in agent if s is not None],
                  "one_off": [s.getsockname()[1] if s is not None else None
                              for s in one_off]}))
"""


def test_no_probe_socket_takes_a_port_a_gateway_needs(
        netns_factory: Callable[[str], str]) -> None:
    require_root()
    assert 51898 not in FIXED_UDP_PORTS
    node = netns_factory("ports")
    for name in ("mge00000001", "mge00000002", "mgeg0000001"):
        run(["ip", "-n", node, "link", "add", name, "type", "veth", "peer", "name",
             f"p{name[3:]}"])
    nsexec(node, "sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=51898 51900")
    out = nsexec(node, sys.executable, "-c", ON_THE_NODE, str(REPO), PROBE_SOURCE,
                 EGRESS_IP, str(gateway_port(0)))
    got = json.loads(out.stdout)
    assert got["agent"] == [PROBE_PORT, PROBE_PORT]
    # The one free port goes to the first one-off socket; the second finds none left
    # but fixed ones, and is not made.
    assert got["one_off"] == [51898, None]
