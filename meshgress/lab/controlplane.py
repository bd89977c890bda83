"""A real Kubernetes control plane (etcd + kube-apiserver) for the lab and the tests.

Why: the `kube` datastore backend, RBAC rules, ValidatingAdmissionPolicies, watches that
must survive an API server restart or a 410 after compaction, and tokens that name the pod
and node they were issued for can only be tested honestly against the real programs. Fakes
drift from what a cluster does; a real API server in a throwaway network namespace costs a
few seconds. The binaries are built once from pinned sources by `make binaries`
(tests/infra/build-binaries) into a cache keyed by version; this module only runs them.

Everything it starts runs inside the caller's network namespace (via `nsenter --net=`), in
a session of its own, with its PID recorded in the state folder; it stops those PIDs and
nothing else, and removes the state folder. A crashed earlier run with the same state
folder is cleaned up first: recorded PIDs are killed only if their command line still
names that folder, so a recycled PID is never hit. This process never leaves the host
namespace: HTTP calls into the namespace are made by a short-lived thread that entered it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as kube
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from meshgress.binaries import WIREGUARD_GO_VERSION, cached_binary
from meshgress.lab import netns

_T = TypeVar("_T")

# The versions tests/infra builds (the wrapper modules' go.mod and build-binaries' wheel
# pins); tests/unit/test_controlplane_pins.py keeps the two in step.
PINNED_VERSIONS: Mapping[str, str] = {
    "kube-apiserver": "v1.35.4",
    "etcd": "v3.6.17",
    "kubectl": "v1.35.2",
    "helm": "v4.1.4",
    "wireguard-go": WIREGUARD_GO_VERSION,
}

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "meshgress-admin"
FRONT_PROXY_CLIENT = "front-proxy-client"
CLUSTER_DNS_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                     "kubernetes.default.svc.cluster.local", "localhost")
CERT_LIFETIME = datetime.timedelta(days=2)  # a lab lives hours; nothing should outlive it


class ControlPlaneError(RuntimeError):
    """The control plane could not be started, reached or stopped."""


class BinariesMissing(ControlPlaneError):
    """A cached program is absent: `make binaries` builds it."""


def binary_path(tool: str, binary: str | None = None) -> Path:
    """Where `make binaries` put the pinned `tool` (e.g. "kube-apiserver", "kubectl")."""
    version = PINNED_VERSIONS[tool]
    path = cached_binary(tool, version, binary)
    if not os.access(path, os.X_OK):
        raise BinariesMissing(
            f"{tool} {version} is not built: {path} is missing; run `make binaries` "
            f"(tests/infra/build-binaries) first")
    return path


# --- certificates and keys ---------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Where the control plane's PKI files are (PEM, all in one folder)."""

    directory: Path

    def _file(self, name: str) -> Path:
        return self.directory / name

    ca_crt = property(lambda self: self._file("ca.crt"))
    ca_key = property(lambda self: self._file("ca.key"))
    apiserver_crt = property(lambda self: self._file("apiserver.crt"))
    apiserver_key = property(lambda self: self._file("apiserver.key"))
    admin_crt = property(lambda self: self._file("admin.crt"))
    admin_key = property(lambda self: self._file("admin.key"))
    front_proxy_ca_crt = property(lambda self: self._file("front-proxy-ca.crt"))
    front_proxy_client_crt = property(lambda self: self._file("front-proxy-client.crt"))
    front_proxy_client_key = property(lambda self: self._file("front-proxy-client.key"))
    sa_key = property(lambda self: self._file("sa.key"))
    sa_pub = property(lambda self: self._file("sa.pub"))


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _certificate(
    subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    signing_key: ec.EllipticCurvePrivateKey, *, is_ca: bool = False,
    usages: Sequence[x509.ObjectIdentifier] = (),
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=not is_ca, key_cert_sign=is_ca,
            crl_sign=is_ca, content_commitment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def _issue(pki: Pki, stem: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
           subject: x509.Name, *, usages: Sequence[x509.ObjectIdentifier],
           sans: Sequence[x509.GeneralName] = ()) -> None:
    key = _new_key()
    cert = _certificate(subject, key.public_key(), ca, ca[1], usages=usages, sans=sans)
    _write_key(pki.directory / f"{stem}.key", key)
    _write_cert(pki.directory / f"{stem}.crt", cert)


def _new_ca(pki: Pki, stem: str, common_name: str
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    cert = _certificate(_name(common_name), key.public_key(), None, key, is_ca=True)
    _write_key(pki.directory / f"{stem}.key", key)
    _write_cert(pki.directory / f"{stem}.crt", cert)
    return cert, key


def generate_pki(directory: Path, *, addresses: Sequence[str],
                 dns_names: Sequence[str] = CLUSTER_DNS_NAMES) -> Pki:
    """A fresh PKI for one control plane:

    - ca.crt/key: the cluster CA; signs the API server's serving cert and client certs;
    - apiserver.crt/key: serving cert for `addresses` (+127.0.0.1, ::1) and `dns_names`;
    - admin.crt/key: a client cert for ADMIN_USER in `system:masters`;
    - front-proxy-ca.crt/key, front-proxy-client.crt/key: the request-header (aggregation)
      CA and the API server's proxy client, as a kubeadm cluster has;
    - sa.key/sa.pub: the service-account token signing key pair (RSA: every verifier of
      Kubernetes tokens supports RS256).
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory)
    ca = _new_ca(pki, "ca", "meshgress-lab-ca")
    ips = dict.fromkeys([*addresses, "127.0.0.1", "::1"])
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    _issue(pki, "apiserver", ca, _name("kube-apiserver"),
           usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    _issue(pki, "admin", ca, _name(ADMIN_USER, "system:masters"),
           usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    front_proxy_ca = _new_ca(pki, "front-proxy-ca", "meshgress-lab-front-proxy-ca")
    _issue(pki, "front-proxy-client", front_proxy_ca, _name(FRONT_PROXY_CLIENT),
           usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, signing_key)
    pki.sa_pub.write_bytes(signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki


# --- the control plane ----------------------------------------------------------------------


@dataclass
class ControlPlaneConfig:
    """What the caller decides; the rest are fixed lab choices (see ControlPlane)."""

    state_dir: Path
    service_cluster_ip_range: str
    netns: str | None = None       # None: the caller's own namespace (tests always give one)
    address: str = "127.0.0.1"     # the API server binds and advertises this
    secure_port: int = 6443
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    feature_gates: Mapping[str, bool] = field(default_factory=dict)
    watch_cache: bool = True       # False: lists and watches go to etcd (exact 410s)
    extra_apiserver_args: Sequence[str] = ()
    ready_timeout: float = 90.0


class ControlPlane:
    """etcd and kube-apiserver of the pinned release, for one lab or test.

    Use as a context manager, or call start() and stop(). API calls from this process must
    go through `call()` (or the helpers here), which runs them inside the namespace.
    """

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.pki = Pki(self.state_dir / "pki")
        self.kubeconfig = self.state_dir / "admin.kubeconfig"
        self.log_dir = self.state_dir / "logs"
        self._pid_dir = self.state_dir / "pids"
        self._apiserver_client: Any = None
        # PIDs this object spawned. Another ControlPlane on the same state folder (say, a
        # `lab down` in a later process) finds them through the pid files instead.
        self._spawned: dict[str, int] = {}

    # -- life cycle

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ fails
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def server_url(self) -> str:
        host = self.config.address
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
        return f"https://{host}:{self.config.secure_port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.config.etcd_client_port}"

    def start(self) -> ControlPlane:
        """Start etcd, then the API server, and wait until it is ready. When this fails,
        what it started is stopped again and the state folder (with the logs) is left for
        the caller's stop() to copy and remove."""
        etcd = binary_path("etcd")
        apiserver = binary_path("kube-apiserver")
        cleanup_state_dir(self.state_dir)
        for folder in (self.state_dir, self.log_dir, self._pid_dir, self.state_dir / "etcd"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            generate_pki(self.pki.directory, addresses=[self.config.address,
                                                        str(self.service_ip)])
            self._write_kubeconfig()
            self._spawn("etcd", [str(etcd), *self._etcd_args()])
            self._wait_for_etcd()
            self._spawn("kube-apiserver", [str(apiserver), *self._apiserver_args()])
            self.wait_ready()
        except BaseException:
            self.stop(remove_state=False)
            raise
        return self

    def stop(self, *, remove_state: bool = True, keep_logs_in: Path | None = None) -> None:
        """Stop the API server, then etcd (by recorded PID); copy the logs if asked; remove
        the state folder."""
        self._apiserver_client = None
        for name in ("kube-apiserver", "etcd"):
            self._stop_recorded(name)
        if keep_logs_in is not None and self.log_dir.is_dir():
            shutil.copytree(self.log_dir, keep_logs_in, dirs_exist_ok=True)
        if remove_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop the API server (gracefully) and start it again on the same etcd."""
        self._apiserver_client = None
        self._stop_recorded("kube-apiserver")
        self._spawn("kube-apiserver", [str(binary_path("kube-apiserver")),
                                       *self._apiserver_args()])
        self.wait_ready()

    def pids(self) -> dict[str, int]:
        """The running processes this control plane started, by name."""
        found = {}
        for name in ("etcd", "kube-apiserver"):
            pid = self._pid_of(name)
            if pid is not None:
                found[name] = pid
        return found

    def _pid_of(self, name: str) -> int | None:
        if name in self._spawned:
            pid = self._spawned[name]
            return pid if netns.pid_alive(pid) else None
        return _recorded_pid(self._pid_dir / f"{name}.pid", self.state_dir)

    # -- processes

    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        if self.config.netns is None:
            return list(argv)
        return ["nsenter", f"--net={netns.netns_path(self.config.netns)}", "--", *argv]

    def _spawn(self, name: str, argv: Sequence[str]) -> int:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("a") as log:
            log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n")
        # nsenter execs the program, so this PID is the program's own.
        pid = netns.spawn_detached(self._in_netns(argv), log_path)
        (self._pid_dir / f"{name}.pid").write_text(f"{pid}\n")
        self._spawned[name] = pid
        return pid

    def _stop_recorded(self, name: str) -> None:
        pid_file = self._pid_dir / f"{name}.pid"
        pid = self._pid_of(name)
        self._spawned.pop(name, None)
        if pid is not None:
            # etcd and the API server shut down cleanly on SIGTERM within seconds.
            netns.stop_pids([pid], grace=15.0)
        pid_file.unlink(missing_ok=True)

    def _log_tail(self, name: str, lines: int = 25) -> str:
        try:
            text = (self.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _etcd_args(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.config.etcd_peer_port}"
        return [
            "--name=meshgress-lab",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=meshgress-lab={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",            # a lab's data is thrown away; fsync only costs
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        gates = ",".join(f"{gate}={str(on).lower()}"
                         for gate, on in sorted(self.config.feature_gates.items()))
        args = [
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={self.config.address}",
            f"--advertise-address={self.config.address}",
            f"--secure-port={self.config.secure_port}",
            f"--cert-dir={pki.directory}",
            f"--tls-cert-file={pki.apiserver_crt}",
            f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_crt}",
            # Node first: node agents will authenticate as system:node:<name>, and the Node
            # authorizer plus NodeRestriction give them exactly a kubelet's reach.
            "--authorization-mode=Node,RBAC",
            # On top of the release's default set (which already has ServiceAccount,
            # NamespaceLifecycle, ValidatingAdmissionPolicy, the webhooks, ...).
            "--enable-admission-plugins=NodeRestriction",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={self.config.service_cluster_ip_range}",
            f"--requestheader-client-ca-file={pki.front_proxy_ca_crt}",
            f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client_crt}",
            f"--proxy-client-key-file={pki.front_proxy_client_key}",
            "--allow-privileged=true",
            "--profiling=false",
            f"--watch-cache={str(self.config.watch_cache).lower()}",
            "--v=1",
        ]
        if ipaddress.ip_address(self.config.address).is_loopback:
            # EndpointSlices may not hold a loopback address: publish no endpoints for the
            # `kubernetes` Service rather than log a rejected write every few seconds.
            args.append("--endpoint-reconciler-type=none")
        if gates:
            args.append(f"--feature-gates={gates}")
        return [*args, *self.config.extra_apiserver_args]

    # -- reaching it

    @property
    def service_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The `kubernetes` Service's ClusterIP: the first address of the service range."""
        first_range = self.config.service_cluster_ip_range.split(",")[0]
        return ipaddress.ip_network(first_range, strict=True)[1]

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` where the control plane's addresses are reachable (its namespace)."""
        if self.config.netns is None:
            return fn()
        return netns.call_in_netns(netns.netns_path(self.config.netns), fn)

    def _wait_for_etcd(self) -> None:
        def healthy() -> bool:
            connection = http.client.HTTPConnection("127.0.0.1", self.config.etcd_client_port,
                                                    timeout=2)
            try:
                connection.request("GET", "/health")
                return bool(json.loads(connection.getresponse().read()).get("health") == "true")
            except (OSError, ValueError):
                return False
            finally:
                connection.close()

        self._wait_until("etcd", lambda: self.call(healthy),
                         deadline=time.monotonic() + 30)

    def _admin_ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        context.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return context

    def _get(self, path: str) -> tuple[int, bytes]:
        context = self._admin_ssl_context()

        def request() -> tuple[int, bytes]:
            connection = http.client.HTTPSConnection(self.config.address,
                                                     self.config.secure_port,
                                                     context=context, timeout=5)
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        return self.call(request)

    def wait_ready(self) -> None:
        """Wait until /readyz answers 200 (all post-start hooks done), or fail with the log."""
        def ready() -> bool:
            with contextlib.suppress(OSError):
                return self._get("/readyz")[0] == 200
            return False

        self._wait_until("kube-apiserver", ready,
                         deadline=time.monotonic() + self.config.ready_timeout)

    def _wait_until(self, name: str, condition: Callable[[], bool], deadline: float) -> None:
        while True:
            if condition():
                return
            if name not in self.pids():
                raise ControlPlaneError(f"{name} exited while starting:\n{self._log_tail(name)}")
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} was not ready in time:\n{self._log_tail(name)}")
            time.sleep(0.25)

    def version(self) -> dict[str, str]:
        """The API server's /version (gitVersion, goVersion, ...)."""
        status, body = self._get("/version")
        if status != 200:
            raise ControlPlaneError(f"/version answered {status}: {body[:200]!r}")
        result: dict[str, str] = json.loads(body)
        return result

    def _write_kubeconfig(self) -> None:
        def data(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "meshgress-lab", "cluster": {
                "server": self.server_url,
                "certificate-authority-data": data(self.pki.ca_crt)}}],
            "users": [{"name": ADMIN_USER, "user": {
                "client-certificate-data": data(self.pki.admin_crt),
                "client-key-data": data(self.pki.admin_key)}}],
            "contexts": [{"name": "meshgress-lab", "context": {
                "cluster": "meshgress-lab", "user": ADMIN_USER}}],
            "current-context": "meshgress-lab",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The pinned kubectl with the admin kubeconfig, run inside the namespace."""
        argv = [str(binary_path("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        return netns.run(self._in_netns(argv), input_text=input_text, check=check,
                         timeout=timeout)

    def api_client(self) -> Any:
        """An admin `kubernetes.client.ApiClient`; use it only inside `call()`."""
        if self._apiserver_client is None:
            self._apiserver_client = kube_config.new_client_from_config(
                config_file=str(self.kubeconfig))
        return self._apiserver_client

    def token_client(self, token: str) -> Any:
        """A `kubernetes.client.ApiClient` that authenticates with a bearer token."""
        configuration = kube.Configuration()
        configuration.host = self.server_url
        configuration.ssl_ca_cert = str(self.pki.ca_crt)
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
        return kube.ApiClient(configuration)

    # -- etcd

    def _etcd_post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        def request() -> dict[str, Any]:
            connection = http.client.HTTPConnection("127.0.0.1", self.config.etcd_client_port,
                                                    timeout=10)
            try:
                connection.request("POST", path, body=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload: dict[str, Any] = json.loads(response.read() or b"{}")
                if response.status != 200:
                    raise ControlPlaneError(f"etcd {path}: {response.status} {payload}")
                return payload
            finally:
                connection.close()

        return self.call(request)

    def etcd_revision(self) -> int:
        """etcd's current revision (what every resourceVersion is drawn from)."""
        # A range over one key nobody writes: the answer's header has the store revision.
        response = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
        return int(response["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision, so a watch or list from any
        older resourceVersion that reaches etcd gets 410 Gone. Returns that revision."""
        revision = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # -- service account tokens

    def create_pod_on_node(self, namespace: str, pod_name: str, node_name: str,
                           service_account: str = "default") -> dict[str, str]:
        """A Node, a ServiceAccount and a Pod bound to that node, as a scheduler and the
        control plane's controllers would leave them (neither runs here). No kubelet runs,
        so the pod never starts; it exists to bind tokens to. Returns the pod's uid and
        the node's uid."""
        def create() -> dict[str, str]:
            core = kube.CoreV1Api(self.api_client())

            def ensure(create_call: Callable[[], Any], read_call: Callable[[], Any]) -> Any:
                try:
                    return create_call()
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    return read_call()

            node = ensure(
                lambda: core.create_node(kube.V1Node(
                    metadata=kube.V1ObjectMeta(name=node_name))),
                lambda: core.read_node(node_name))
            ensure(lambda: core.create_namespace(kube.V1Namespace(
                       metadata=kube.V1ObjectMeta(name=namespace))),
                   lambda: core.read_namespace(namespace))
            ensure(lambda: core.create_namespaced_service_account(
                       namespace, kube.V1ServiceAccount(
                           metadata=kube.V1ObjectMeta(name=service_account))),
                   lambda: core.read_namespaced_service_account(service_account, namespace))
            pod = core.create_namespaced_pod(namespace, kube.V1Pod(
                metadata=kube.V1ObjectMeta(name=pod_name),
                spec=kube.V1PodSpec(
                    node_name=node_name, service_account_name=service_account,
                    automount_service_account_token=False,
                    containers=[kube.V1Container(name="placeholder",
                                                   image="registry.invalid/placeholder")])))
            return {"pod_uid": str(_present(pod.metadata, "metadata").uid),
                    "node_uid": str(node.metadata.uid)}

        return self.call(create)

    def pod_bound_token(self, namespace: str, pod_name: str,
                        audiences: Sequence[str] = (), expiration_seconds: int = 3600) -> str:
        """A TokenRequest for the pod's service account bound to the Pod object, as the
        kubelet requests for a projected token: valid only while that pod exists, and
        carrying its name and uid (and its node's, when the pod has spec.nodeName)."""
        def request() -> str:
            core = kube.CoreV1Api(self.api_client())
            pod = core.read_namespaced_pod(pod_name, namespace)
            service_account = _present(pod.spec, "pod spec").service_account_name
            review = core.create_namespaced_service_account_token(
                service_account or "default", namespace,
                kube.AuthenticationV1TokenRequest(spec=kube.V1TokenRequestSpec(
                    audiences=list(audiences) or [SERVICE_ACCOUNT_ISSUER],
                    expiration_seconds=expiration_seconds,
                    bound_object_ref=kube.V1BoundObjectReference(
                        api_version="v1", kind="Pod", name=pod_name,
                        uid=_present(pod.metadata, "metadata").uid))))
            return str(_present(review.status, "TokenRequest status").token)

        return self.call(request)

    def whoami(self, token: str) -> dict[str, Any]:
        """The user a token authenticates as (a SelfSubjectReview made with the token):
        {"username", "uid", "groups", "extra"}."""
        def review() -> dict[str, Any]:
            api_client = self.token_client(token)
            try:
                result = kube.AuthenticationV1Api(api_client).create_self_subject_review(
                    kube.V1SelfSubjectReview())
            finally:
                api_client.close()
            user = _present(_present(result.status, "review status").user_info, "user info")
            return {"username": user.username, "uid": user.uid,
                    "groups": list(user.groups or []), "extra": dict(user.extra or {})}

        return self.call(review)


def _present(value: _T | None, what: str) -> _T:
    if value is None:
        raise ControlPlaneError(f"the API server's answer has no {what}")
    return value


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (for looking, never for trusting)."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return claims


def _recorded_pid(pid_file: Path, state_dir: Path) -> int | None:
    """The PID in `pid_file` if that process is alive and still ours: its command line
    names `state_dir` (every program here gets a path inside it)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    for _attempt in range(20):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # Empty while the process is between nsenter and the program (execve); else final.
        if cmdline:
            break
        time.sleep(0.01)
    if str(state_dir).encode() not in cmdline or not netns.pid_alive(pid):
        return None
    return pid


def cleanup_state_dir(state_dir: Path) -> list[int]:
    """Stop what a crashed run recorded in `state_dir`, then remove the folder. Returns
    the PIDs it stopped."""
    pids = [pid for pid_file in sorted((state_dir / "pids").glob("*.pid"))
            if (pid := _recorded_pid(pid_file, state_dir)) is not None]
    stopped = netns.stop_pids(pids, grace=10.0) if pids else []
    shutil.rmtree(state_dir, ignore_errors=True)
    return stopped
