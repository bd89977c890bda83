"""A `kubernetes` ApiClient whose connections are made inside a network namespace.

The test control plane listens on 127.0.0.1 inside a throwaway namespace, and the test
process never leaves the host namespace. A socket belongs to the namespace it was created
in, so each connection's socket is created by a short-lived thread that entered the
namespace (`meshgress.lab.netns.call_in_netns`), and is then used from any thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from urllib3.connection import HTTPSConnection
from urllib3.connectionpool import HTTPSConnectionPool

from meshgress.datastore.kube import kube_api_client, load_configuration
from meshgress.lab.netns import call_in_netns, netns_path


def api_client_in_netns(kubeconfig: Path, netns: str) -> Any:
    ns_file = netns_path(netns)

    class NetnsHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> Any:
            return call_in_netns(ns_file, super()._new_conn)

    class NetnsHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = NetnsHTTPSConnection

    api_client = kube_api_client(load_configuration(kubeconfig))
    pool_manager = api_client.rest_client.pool_manager
    pool_manager.pool_classes_by_scheme = {**pool_manager.pool_classes_by_scheme,
                                           "https": NetnsHTTPSConnectionPool}
    return api_client
