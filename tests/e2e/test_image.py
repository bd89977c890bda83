"""The container image: built offline (tests/infra/build-image, cached), what it holds, its
licence inventory, and its agent running a lab node in place of the lab's own process.

The image is built into the build script's own podman store (never the host's); every
container here is named `mgt-image-<pid>-...` (tests/run_owned.py), removed by that name at
the end, and a crashed run's containers are removed by the next run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from meshgress.kernel_ids import WIREGUARD_INTERFACE
from meshgress.lab.lab import AGENT_METRICS_PORT, Lab
from meshgress.lab.netns import call_in_netns
from meshgress.licences import PythonDistribution, canonical_name, compute_violations
from tests.conftest import lab
from tests.run_owned import is_crashed_runs, owned

BUILD_IMAGE = Path(__file__).resolve().parents[1] / "infra" / "build-image"
CONTAINER_PREFIX = "mgt-image-"
VENV_SITE = "/opt/meshgress/venv/lib/python3.11/site-packages/"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
BUILD_TIMEOUT = 1500


class Podman:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, check: bool = True, input_text: str | None = None,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              input=input_text, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {proc.returncode}\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def remove_crashed_runs(self) -> None:
        names = self("ps", "--all", "--format", "{{.Names}}").stdout.split()
        crashed = [n for n in names if is_crashed_runs(n, CONTAINER_PREFIX)]
        if crashed:
            self("rm", "--force", "--time", "0", *crashed, check=False)


@pytest.fixture(scope="module")
def image():
    """The image, built (or found cached) by the same script as `make image`."""
    proc = subprocess.run([sys.executable, str(BUILD_IMAGE), "--json"], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        pytest.fail(f"build-image failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    built = json.loads(proc.stdout)
    podman = Podman(built["env"])
    podman.remove_crashed_runs()
    return built, podman


def run_in_image(image, script: str, *podman_args: str) -> str:
    built, podman = image
    return podman("run", "--rm", "--network", "none", *podman_args, built["id"],
                  "sh", "-c", script).stdout


@pytest.mark.privileged
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_image_holds_meshgress_installed_wireguard_go_nftables_iproute2_and_the_cni_shim(image):
    built, podman = image
    config = json.loads(podman("image", "inspect", built["id"]).stdout)[0]["Config"]
    assert config.get("User") == "0:0"

    facts = json.loads(run_in_image(image, """
        python - <<'EOF'
import importlib.metadata, json, subprocess, meshgress, nftables
dist = importlib.metadata.distribution("meshgress")
nftables.Nftables()  # loads Debian's libnftables.so.1 through ctypes
def out(*argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "module": meshgress.__file__,
    "direct_url": json.loads(dist.read_text("direct_url.json") or "{}"),
    "pip": subprocess.run(["python", "-m", "pip", "--version"],
                          capture_output=True).returncode,
    "wireguard_go": out("wireguard-go", "--version"),
    "nft": out("nft", "--version"),
    "ip": out("ip", "-V"),
    "cni": subprocess.run(["/opt/cni/bin/meshgress-cni"], input='{"cniVersion": "1.0.0"}',
                          env={"CNI_COMMAND": "VERSION"}, capture_output=True,
                          text=True).stdout,
}))
EOF
    """))
    assert facts["module"].startswith(VENV_SITE), facts["module"]
    # Installed from the source tree, not editable: the code lives in the virtualenv.
    assert facts["direct_url"].get("dir_info", {}).get("editable", False) is False
    assert facts["pip"] != 0, "pip is still in the image"
    assert facts["wireguard_go"].startswith("wireguard-go v0.0.2025"), facts["wireguard_go"]
    assert facts["nft"].startswith("nftables v"), facts["nft"]
    assert "iproute2" in facts["ip"], facts["ip"]
    assert "1.0.0" in json.loads(facts["cni"])["supportedVersions"]


@pytest.mark.privileged
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_licence_inventory_covers_everything_installed_and_no_python_code_is_agpl(image):
    facts = json.loads(run_in_image(image, """
        python - <<'EOF'
import importlib.metadata, json, os, subprocess
paths = __import__("sys").path + ["/usr/lib/python3/dist-packages"]
listing = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\\n"],
                         capture_output=True, text=True, check=True).stdout
print(json.dumps({
    "inventory": json.load(open("/usr/share/meshgress/licences.json")),
    "text": open("/usr/share/meshgress/licences.txt").read(),
    "python": sorted({d.metadata["Name"] for d in importlib.metadata.distributions(path=paths)}),
    "debian": sorted(line.split()[1] for line in listing.splitlines() if line.startswith("ii")),
    "programs": sorted("/usr/local/bin/" + n for n in os.listdir("/usr/local/bin")),
}))
EOF
    """))
    inventory = facts["inventory"]
    listed_python = {canonical_name(d["name"]) for d in inventory["python"]}
    assert listed_python == {canonical_name(n) for n in facts["python"]}
    assert {p["name"] for p in inventory["debian"]} == set(facts["debian"])
    assert [p["path"] for p in inventory["programs"]] == facts["programs"]
    # Every entry names a licence a person can check.
    assert [d["name"] for d in inventory["python"] if d["licence"] == "UNKNOWN"] == []
    assert [p["name"] for p in inventory["debian"] if not p["licences"]] == []
    for program in inventory["programs"]:
        assert program["kind"] == "go", program
        assert [m for m in program["modules"] if m["licence"] == "UNKNOWN"] == [], program
    # No AGPL/GPL-3 Python code, and nothing allowed by exception in the default build.
    assert inventory["policy"]["allowed"] == []
    violations = compute_violations(PythonDistribution(**d) for d in inventory["python"])
    assert violations == []
    assert "wgconfig" not in listed_python
    assert {"meshgress", "pyroute2", "pip-nftables"} <= listed_python
    for entry in inventory["python"] + inventory["debian"]:
        assert entry["name"] in facts["text"]


# --- the agent of a lab node, run from the image -------------------------------------------


def in_lab(name, target, *command, check=True, timeout=60):
    return lab(name, "exec", target, "--", *command, check=check, timeout=timeout)


def pod_ip(name, pod):
    status = json.loads(lab(name, "status", "--json").stdout)
    return next(p["address"] for p in status["pods"] if f"{p['namespace']}/{p['name']}" == pod)


def agent_ready(netns_name: str) -> bool:
    def probe() -> bool:
        try:
            url = f"http://127.0.0.1:{AGENT_METRICS_PORT}/readyz"
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
    return call_in_netns(f"/run/netns/{netns_name}", probe)


def run_agent_container(image, lab_obj: Lab, node: str, netns_name: str,
                        capabilities: tuple[str, ...]) -> str:
    """`meshgress agent` for `node` from the image, as the DaemonSet runs it: the node's
    network namespace, its state and run folders, a private /var/run/wireguard, private
    PID and IPC namespaces, only `capabilities`, no privilege escalation, read-only root."""
    built, podman = image
    state, run = lab_obj.node_dir(node) / "state", lab_obj.node_run_dir(node)
    cluster = lab_obj.cluster_config_path
    record = lab_obj.load_record()
    assert record is not None
    # How the lab's own agent reaches the datastore: the file datastore's folder (bound at
    # the same path), or the API server with a kubeconfig in the node's state folder.
    datastore_args = lab_obj._datastore_args(record, "agent")
    datastore_volumes = [] if record.datastore == "kube" else [
        "--volume", f"{lab_obj.datastore_dir}:{lab_obj.datastore_dir}"]
    name = f"{owned(CONTAINER_PREFIX)}{secrets.token_hex(3)}"
    podman("run", "--detach", "--name", name,
           "--network", f"ns:/run/netns/{netns_name}", "--pid", "private", "--ipc", "private",
           "--cap-drop", "ALL", "--cap-add", ",".join(capabilities),
           "--security-opt", "no-new-privileges", "--read-only",
           "--device", "/dev/net/tun", "--tmpfs", "/var/run/wireguard",
           "--volume", f"{state}:/var/lib/meshgress", "--volume", f"{run}:/run/meshgress",
           # Pods' network namespaces, as the CNI plugin names them (new ones appear too).
           "--volume", "/run/netns:/run/netns:rslave",
           *datastore_volumes, "--volume", f"{cluster}:{cluster}:ro",
           built["id"], "meshgress", "agent", "--node", node, *datastore_args,
           "--cluster-config", str(cluster), "--node-grace", "5", "--resync-interval", "5")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent_ready(netns_name):
            return name
        state_json = json.loads(podman("inspect", name).stdout)[0]["State"]
        if not state_json["Running"]:
            break
        time.sleep(0.1)
    logs = podman("logs", name, check=False)
    raise AssertionError(f"the containerised agent was not ready:\n{logs.stdout}{logs.stderr}")


def capabilities_of_pid_1(image, container: str) -> int:
    _, podman = image
    status = podman("exec", container, "cat", "/proc/1/status").stdout
    return int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)


def remove_container(image, name: str) -> None:
    _, podman = image
    podman("rm", "--force", "--time", "10", name, check=False)


def wait_until_gone(netns_name: str, ifname: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = subprocess.run(["ip", "-n", netns_name, "link", "show", ifname],
                               capture_output=True, check=False)
        if shown.returncode != 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{ifname} in {netns_name} still exists after {timeout} s")


def wait_for_route_through(netns_name: str, address: str, device: str,
                           timeout: float = 30) -> None:
    """Until `address` is routed through `device` (a peer's pods are unreachable, not
    routed elsewhere, until the agent has its handshake under way)."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        proc = subprocess.run(["ip", "-n", netns_name, "-j", "route", "get", address],
                              capture_output=True, text=True, check=False)
        seen = proc.stdout + proc.stderr
        if proc.returncode == 0 and json.loads(proc.stdout)[0].get("dev") == device:
            return
        time.sleep(0.05)
    raise AssertionError(f"{address} not routed through {device} in {netns_name}: {seen}")


@pytest.mark.e2e
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_agent_from_the_image_meshes_a_lab_node_and_wires_its_pods(image, lab_name):
    """The image's agent replaces a lab node's agent. With NET_ADMIN and NET_RAW only it
    builds the node's mesh (the node's pods reach the other node's pods through the
    container's wireguard-go), but cannot wire a new pod: the CNI half enters the pod's
    network namespace (setns), which needs CAP_SYS_ADMIN. With SYS_ADMIN added it does."""
    _, podman = image
    lab(lab_name, "up", "--nodes", "2", "--gateway-nodes", "0")
    lab_obj = Lab(lab_name)
    node1 = lab_obj.topology().node("node1").netns
    # The lab's own agent goes, and with it its wireguard-go (deleting the interface ends
    # it): from here on node1's mesh exists only if the container builds it.
    lab(lab_name, "agent", "stop", "node1")
    subprocess.run(["ip", "-n", node1, "link", "del", WIREGUARD_INTERFACE], check=True)
    a, b = pod_ip(lab_name, "payments/app-node1"), pod_ip(lab_name, "payments/app-node2")
    containers = []
    try:
        container = run_agent_container(image, lab_obj, "node1", node1,
                                        ("NET_ADMIN", "NET_RAW"))
        containers.append(container)
        assert capabilities_of_pid_1(image, container) == \
            (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
        # The mesh interface is served by the container's wireguard-go (its UAPI socket
        # is in the container's private /var/run/wireguard), and carries node2's pods.
        sockets = podman("exec", container, "ls", "/var/run/wireguard").stdout.split()
        assert sockets == [f"{WIREGUARD_INTERFACE}.sock"]
        wait_for_route_through(node1, b, WIREGUARD_INTERFACE)
        in_lab(lab_name, "payments/app-node1", "ping", "-c", "2", "-W", "2", b)
        in_lab(lab_name, "web/app-node2", "ping", "-c", "2", "-W", "2", a)

        denied = lab(lab_name, "add-pod", "payments/denied-node1", "--node", "node1",
                     check=False)
        assert denied.returncode != 0
        assert "Operation not permitted" in denied.stdout + denied.stderr

        remove_container(image, container)
        wait_until_gone(node1, WIREGUARD_INTERFACE)
        container = run_agent_container(image, lab_obj, "node1", node1,
                                        ("NET_ADMIN", "NET_RAW", "SYS_ADMIN"))
        containers.append(container)
        wait_for_route_through(node1, b, WIREGUARD_INTERFACE)
        lab(lab_name, "add-pod", "payments/late-node1", "--node", "node1")
        late = pod_ip(lab_name, "payments/late-node1")
        in_lab(lab_name, "payments/late-node1", "ping", "-c", "2", "-W", "2", b)
        in_lab(lab_name, "payments/app-node2", "ping", "-c", "2", "-W", "2", late)
    finally:
        for name in containers:
            remove_container(image, name)
