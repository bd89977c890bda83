"""The composition root: each long-running process built from its parts.

Components never import one another (an import contract checks it), yet the node agent
hosts the CNI plugin's server half: a pod's steering must be in place before its ADD
answers. This module, above the components, joins them — `CniPodNetwork` gives the agent
the `nodeagent.agent.PodNetwork` it needs, made of `cni.service` and `cni.server` — and
turns the command line into each process's configuration, datastore and kernel ports.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from cni.install import write_conflist
from cni.ipam import Ipam
from cni.metrics import render_deletion_queue_metrics
from cni.model import PodAttachment
from cni.server import serve as serve_cni
from cni.service import CniService
from gateway.process import Gateway, GatewayConfig, GatewayPorts
from meshgress.binaries import default_wireguard_go
from meshgress.config import DEFAULT_CLUSTER_CONFIG, ClusterConfig, load_cluster_config
from meshgress.datastore import Datastore, DatastoreError
from meshgress.datastore.file import FileDatastore
from meshgress.datastore.options import KUBE
from meshgress.prometheus import Exposition, parse_listen_addresses
from nodeagent.agent import Agent, AgentConfig, AgentPorts, PodHook
from nodeagent.steering import LocalPod
from wireguard.errors import WireGuardError

log = logging.getLogger("meshgress")


class StartError(RuntimeError):
    """A process cannot start; the message says what to fix."""


class CniPodNetwork:
    """The agent's PodNetwork: CNI requests on a unix socket, allocations and the deletion
    queue under the agent's state folder. With `conf_dir`, the runtime's conflist is
    written there once the socket listens (the runtime then sees the network ready) and
    left in place when the agent stops: a restarting agent keeps the node's pods and their
    network, an ADD in the gap is retried by the kubelet, and a DEL in the gap is queued by
    the plugin and run when the agent is back."""

    def __init__(self, socket_path: Path, state_dir: Path, conf_dir: Path | None = None
                 ) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.conf_dir = conf_dir
        self.delete_queue = state_dir / "delete-queue"
        self._service: CniService | None = None

    def _write_conflist(self) -> None:
        if self.conf_dir is not None:
            written = write_conflist(self.conf_dir, str(self.socket_path),
                                     str(self.delete_queue))
            log.info("CNI configuration %s", written or "is current")

    def render_metrics(self, page: Exposition) -> None:
        service = self._service
        if service is None:
            return
        render_deletion_queue_metrics(page, replayed=service.queued_deletes_replayed,
                                      rejected=service.queued_deletes_rejected,
                                      pending=service.queued_deletes_pending)

    def local_pods(self, pod_cidr: ipaddress.IPv4Network) -> list[LocalPod]:
        ipam = Ipam(pod_cidr, self.state_dir / "ipam")
        try:
            return [LocalPod(a.namespace or "", a.name or "", a.ip) for a in ipam.allocations()
                    if a.namespace and a.name]
        finally:
            ipam.close()

    def serve(self, pod_cidr: ipaddress.IPv4Network, mtu: int, *, on_ready: PodHook,
              on_removed: PodHook, stop: threading.Event,
              on_listening: Callable[[], None] = lambda: None) -> None:
        def pod(attachment: PodAttachment) -> LocalPod:
            return LocalPod(attachment.namespace or "", attachment.name or "", attachment.ip)

        service = CniService(pod_cidr, self.state_dir,
                             pod_ready_hook=lambda a: on_ready(pod(a)),
                             pod_removed_hook=lambda a: on_removed(pod(a)), mtu=mtu,
                             delete_queue=self.delete_queue)
        self._service = service
        # The agent's CNI thread: no timed wake-ups for signals (the main thread has them).
        def listening() -> None:
            self._write_conflist()
            on_listening()

        serve_cni(self.socket_path, service, stop, on_listening=listening, signal_wake=None)


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    return load_cluster_config(args.cluster_config) if args.cluster_config \
        else DEFAULT_CLUSTER_CONFIG


def _open_datastore(args: argparse.Namespace) -> Datastore:
    """The store `--datastore` names: the Kubernetes API (`kube`, with `--kubeconfig` or
    the pod's ServiceAccount) or a file datastore directory."""
    kubeconfig = getattr(args, "kubeconfig", None)
    if args.datastore == KUBE:
        # Imported here: the Kubernetes client is loaded only by processes that use it.
        from meshgress.datastore.kube import KubeDatastore  # noqa: PLC0415

        try:
            return KubeDatastore.from_kubeconfig(kubeconfig)
        except DatastoreError as exc:
            raise StartError(f"cannot reach the Kubernetes API: {exc}") from exc
    if kubeconfig is not None:
        raise StartError("--kubeconfig goes with --datastore kube")
    try:
        return FileDatastore(args.datastore)
    except (OSError, DatastoreError) as exc:
        raise StartError(f"cannot open the datastore at {args.datastore}: {exc}") from exc


def _listen(text: str) -> str | None:
    """A --metrics-address value, checked before anything starts."""
    try:
        parse_listen_addresses(text)
    except ValueError as exc:
        raise StartError(f"--metrics-address: {exc}") from exc
    return text or None


def run_agent(args: argparse.Namespace) -> int:
    """`meshgress agent`."""
    config = AgentConfig(
        node_name=args.node, cluster=_cluster(args), state_dir=args.state_dir,
        wireguard_backend=args.wireguard_backend, wireguard_log=args.wireguard_log,
        wireguard_log_level=args.wireguard_log_level,
        wireguard_go=args.wireguard_go or default_wireguard_go(), mtu=args.mtu,
        metrics_address=_listen(args.metrics_address), resync_interval=args.resync_interval,
        node_grace=args.node_grace, endpoint_ports=args.endpoint_ports,
        metrics_allow_from=args.metrics_allow_from,
        metrics_allow_namespaces=args.metrics_allow_namespaces)
    store = _open_datastore(args)
    try:
        pods = CniPodNetwork(args.cni_socket, config.state_dir / "cni", args.cni_conf_dir)
        agent = Agent(config, store, AgentPorts.real(config, pods))
    except WireGuardError as exc:
        store.close()
        raise StartError(str(exc)) from exc
    agent.loop.stop_on_signals()
    log.info("meshgress agent on node %s, public key %s", config.node_name, agent.public_key)
    try:
        return agent.run()
    finally:
        store.close()


def run_gateway(args: argparse.Namespace) -> int:
    """`meshgress gateway`."""
    config = GatewayConfig(
        node_name=args.node, cluster=_cluster(args), state_dir=args.state_dir,
        max_slots=args.max_slots, wireguard_backend=args.wireguard_backend,
        wireguard_log=args.wireguard_log, wireguard_log_level=args.wireguard_log_level,
        wireguard_go=args.wireguard_go or default_wireguard_go(), identity=args.identity,
        metrics_address=_listen(args.metrics_address), flow_log=args.flow_log,
        resync_interval=args.resync_interval)
    store = _open_datastore(args)
    try:
        gateway = Gateway(config, store, GatewayPorts.real(config))
    except WireGuardError as exc:
        store.close()
        raise StartError(str(exc)) from exc
    gateway.loop.stop_on_signals()
    try:
        return gateway.run()
    finally:
        store.close()
