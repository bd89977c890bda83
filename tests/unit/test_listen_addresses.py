"""Where the agent and the gateway serve /metrics, /healthz and /readyz: the address list
(`meshgress.prometheus.parse_listen_addresses`) and the runtime that binds the `node-ip`
ones once the Node object names the address (`ReconcileLoop.serve_on_node_ip`). The
listening itself is replaced by a recorder: nothing binds a socket here."""

from __future__ import annotations

import ipaddress
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from meshgress import prometheus
from meshgress.datastore.file import FileDatastore
from meshgress.prometheus import NODE_IP, ListenAddress, parse_listen_addresses
from meshgress.runtime import LoopMetrics, ReconcileLoop


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:9820,node-ip:9820", (ListenAddress("127.0.0.1", 9820),
                                     ListenAddress(NODE_IP, 9820))),
    (" 192.0.2.11:9820 , ", (ListenAddress("192.0.2.11", 9820),)),
    ("[::1]:9821", (ListenAddress("::1", 9821),)),
    ("0.0.0.0:9820", (ListenAddress("0.0.0.0", 9820),)),
    ("", ()),
], ids=["the default", "spaces and a trailing comma", "IPv6", "every interface", "off"])
def test_listen_addresses_parse(text, parsed):
    assert parse_listen_addresses(text) == parsed


@pytest.mark.parametrize(("text", "message"), [
    ("localhost:9820", "the host must be an IP address or 'node-ip'"),
    ("node:9820", "the host must be an IP address or 'node-ip'"),
    ("127.0.0.1", "is not HOST:PORT"),
    ("127.0.0.1:0", "the port must be 1-65535"),
    ("127.0.0.1:70000", "is not HOST:PORT"),
    ("node-ip:9820,node-ip:9820", "listed twice"),
], ids=["a name", "a node name", "no port", "port 0", "port too large", "twice"])
def test_bad_listen_addresses_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_listen_addresses(text)


def test_an_ipv6_listen_address_prints_with_brackets():
    assert str(ListenAddress("::1", 9820)) == "[::1]:9820"
    assert str(ListenAddress("192.0.2.11", 9820)) == "192.0.2.11:9820"


class FakeServer:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False

    def shutdown(self) -> None:
        self.closed = True

    def server_close(self) -> None:
        self.closed = True


@pytest.fixture
def served(monkeypatch, tmp_path: Path):
    """A loop whose listeners are recorded; `refuse` lists addresses that cannot bind."""
    servers: list[FakeServer] = []
    refuse: set[str] = set()

    def serve(address: str, collect: Any, health: Any, stop: threading.Event) -> FakeServer:
        if address in refuse:
            raise OSError(99, "Cannot assign requested address")
        servers.append(FakeServer(address))
        return servers[-1]

    monkeypatch.setattr(prometheus, "serve", serve)
    store = FileDatastore(tmp_path / "store")
    loop = ReconcileLoop(store, {}, log=logging.getLogger("test"),
                         metrics=LoopMetrics("t_", "t_errors_total"))
    yield loop, servers, refuse
    store.close()


def test_node_ip_listeners_wait_for_the_address_and_follow_it(served):
    loop, servers, refuse = served
    loop.serve_metrics("127.0.0.1:9820,node-ip:9820,node-ip:9900", lambda page: None,
                       lambda: True)
    assert [s.address for s in servers] == ["127.0.0.1:9820"]  # the rest waits
    loop.serve_on_node_ip(None)  # the Node has no InternalIP yet
    assert len(servers) == 1
    ip = ipaddress.IPv4Address
    loop.serve_on_node_ip(ip("192.0.2.11"))
    assert [s.address for s in servers[1:]] == ["192.0.2.11:9820", "192.0.2.11:9900"]
    loop.serve_on_node_ip(ip("192.0.2.11"))  # every pass says it again: nothing changes
    assert len(servers) == 3
    # The node's address changes: the node-ip listeners move, loopback stays.
    loop.serve_on_node_ip(ip("192.0.2.21"))
    assert [s.closed for s in servers] == [False, True, True, False, False]
    assert [s.address for s in servers[3:]] == ["192.0.2.21:9820", "192.0.2.21:9900"]
    # One that cannot bind (the address is not on this node yet) is tried again next pass.
    refuse.add("192.0.2.31:9900")
    loop.serve_on_node_ip(ip("192.0.2.31"))
    assert [s.address for s in servers[5:]] == ["192.0.2.31:9820"]
    assert loop.metrics.errors == {"metrics-listen": 1}
    refuse.clear()
    loop.serve_on_node_ip(ip("192.0.2.31"))
    assert [s.address for s in servers[6:]] == ["192.0.2.31:9900"]  # the other one stays
    assert not servers[5].closed


def test_without_node_ip_listeners_the_node_address_is_ignored(served):
    loop, servers, _ = served
    loop.serve_metrics("127.0.0.1:9820", lambda page: None, lambda: True)
    loop.serve_on_node_ip(ipaddress.IPv4Address("192.0.2.11"))
    assert [s.address for s in servers] == ["127.0.0.1:9820"]


def test_a_client_that_hangs_up_is_a_debug_line_not_a_traceback(capfd, caplog):
    stop = threading.Event()
    server = prometheus.serve("127.0.0.1:0", lambda: "", lambda: {"live": True, "ready": True},
                              stop)
    try:
        with caplog.at_level(logging.DEBUG, logger="meshgress.metrics"):
            for hung_up in (ConnectionResetError(104, "reset"), BrokenPipeError(32, "pipe")):
                try:
                    raise hung_up
                except OSError:
                    server.handle_error(None, ("192.0.2.11", 54800))
        assert capfd.readouterr().err == ""
        assert [r.getMessage() for r in caplog.records] == [
            "client ('192.0.2.11', 54800) hung up: [Errno 104] reset",
            "client ('192.0.2.11', 54800) hung up: [Errno 32] pipe"]
        try:
            raise ValueError("a bug")
        except ValueError:
            server.handle_error(None, ("192.0.2.11", 54800))
        assert "ValueError: a bug" in capfd.readouterr().err
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
