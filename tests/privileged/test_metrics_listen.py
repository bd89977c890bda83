"""The endpoints' listeners on real sockets, in a throwaway namespace: the `node-ip`
listener binds the node's address as soon as it is known, without asking a resolver for
its name (a PTR query would leave the node and could stall the loop for seconds), and the
fixed ones bind at once."""

from __future__ import annotations

import ipaddress
import logging
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from meshgress.datastore.file import FileDatastore
from meshgress.runtime import LoopMetrics, ReconcileLoop
from tests.privileged.conftest import call_in_netns, nsexec

pytestmark = pytest.mark.privileged

NODE_IP = ipaddress.IPv4Address("192.0.2.1")


def test_the_node_ip_listener_binds_without_a_resolver(netns_factory: Callable[[str], str],
                                                       tmp_path: Path, monkeypatch) -> None:
    ns = netns_factory("listen")
    nsexec(ns, "ip", "address", "add", f"{NODE_IP}/32", "dev", "lo")

    def no_resolver(*args: object) -> str:
        raise AssertionError(f"a resolver lookup: {args}")

    monkeypatch.setattr(socket, "getfqdn", no_resolver)
    store = FileDatastore(tmp_path / "store")
    loop = ReconcileLoop(store, {}, log=logging.getLogger("test"),
                         metrics=LoopMetrics("t_", "t_errors_total"))

    def get(url: str) -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    try:
        call_in_netns(ns, lambda: loop.serve_metrics("127.0.0.1:9820,node-ip:9820",
                                                     lambda page: None, lambda: True))
        assert call_in_netns(ns, lambda: get("http://127.0.0.1:9820/readyz")) == "ok\n"
        with pytest.raises(OSError):
            call_in_netns(ns, lambda: get(f"http://{NODE_IP}:9820/readyz"))
        call_in_netns(ns, lambda: loop.serve_on_node_ip(NODE_IP))
        assert call_in_netns(ns, lambda: get(f"http://{NODE_IP}:9820/readyz")) == "ok\n"
        assert "t_reconcile_total" in call_in_netns(
            ns, lambda: get(f"http://{NODE_IP}:9820/metrics"))
    finally:
        loop.stop.set()
        store.close()
