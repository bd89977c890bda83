"""A real container runtime (Debian's podman 4.3, CNI backend, runc) wires a container
through meshgress-cni.

Nothing global is touched: podman gets a private containers.conf and storage.conf (vfs
storage, file locks, events to a file, all under the test's directory); the CNI host side
lands in a throwaway node namespace because podman runs under `nsenter --net=` there, next
to the CNI server; and podman runs inside a private mount namespace with a tmpfs over
/var/lib, because libcni caches results in /var/lib/cni whatever podman is told. The
container's image is /bin/busybox (busybox-static) imported as a one-file rootfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni.install import compute_conflist, install_plugin
from tests.privileged.conftest import CniNode, ip_json, spawn, stop
from tests.run_owned import is_crashed_runs, owned

pytestmark = pytest.mark.privileged

IMAGE = "localhost/mgt-cni-busybox"
NETWORK = "mgtest"
BUSYBOX_APPLETS = ("sh", "ip", "ping", "cat", "sleep")


def build_rootfs_tar(directory: Path) -> Path:
    rootfs = directory / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for name in ("etc", "proc", "sys", "dev", "tmp"):
        (rootfs / name).mkdir()
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    tar_path = directory / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(rootfs, arcname=".")
    return tar_path


def write_podman_config(directory: Path, plugin_dir: Path, network_dir: Path) -> dict[str, str]:
    root, runroot = directory / "root", directory / "runroot"
    (directory / "tmp").mkdir()
    (directory / "containers.conf").write_text(f"""\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugin_dir}", "/usr/lib/cni"]
network_config_dir = "{network_dir}"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{directory}/events.log"
lock_type = "file"
tmp_dir = "{directory}/tmp"
static_dir = "{root}/libpod"
volume_path = "{root}/volumes"
""")
    (directory / "storage.conf").write_text(f"""\
[storage]
driver = "vfs"
runroot = "{runroot}"
graphroot = "{root}"
""")
    return {
        "CONTAINERS_CONF": str(directory / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(directory / "storage.conf"),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(directory),
    }


CGROUP_PREFIX = "mgt-cni-podman-"
WORK_PREFIX = "mgt-cni-pm-"


def remove_cgroup(name: str) -> None:
    """Remove the cgroup tree podman made under our private parent, in every hierarchy."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / name
        if not top.is_dir():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            path.rmdir()
        top.rmdir()


def remove_leftovers() -> None:
    """What crashed earlier runs of this test left: their containers' cgroups (killing the
    processes still in them, which those runs started) and their work directories."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for top in hierarchy.glob(f"{CGROUP_PREFIX}*"):
            if not is_crashed_runs(top.name, CGROUP_PREFIX):
                continue
            for procs in top.rglob("cgroup.procs"):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    time.sleep(0.2)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for top in hierarchy.glob(f"{CGROUP_PREFIX}*"):
            if is_crashed_runs(top.name, CGROUP_PREFIX):
                with contextlib.suppress(OSError):
                    remove_cgroup(top.name)
    for work in Path("/tmp").glob(f"{WORK_PREFIX}*"):
        if is_crashed_runs(work.name, WORK_PREFIX):
            subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.fixture
def podman(cni_node_factory) -> Iterator[tuple[Callable[..., str], CniNode, str]]:
    for tool in ("podman", "runc", "conmon", "unshare"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed")
    if not Path("/bin/busybox").exists():
        pytest.fail("/bin/busybox is missing (busybox-static)")
    remove_leftovers()
    node = cni_node_factory(pod_cidr="198.18.3.0/24")
    # podman refuses a runroot longer than 50 characters: a short directory of our own.
    work = Path(tempfile.mkdtemp(prefix=owned(WORK_PREFIX), dir="/tmp"))
    plugin_dir, network_dir = work / "cni-bin", work / "net.d"
    network_dir.mkdir()
    install_plugin(plugin_dir)
    conflist = compute_conflist(
        str(node.socket), name=NETWORK, delete_queue=str(node.delete_queue),
        chain=({"type": "tuning", "sysctl": {"net.core.somaxconn": "1111"}},
               {"type": "portmap", "capabilities": {"portMappings": True}}),
    )
    (network_dir / f"{NETWORK}.conflist").write_text(json.dumps(conflist))
    env = write_podman_config(work, plugin_dir, network_dir)
    tar = build_rootfs_tar(work)
    cgroup = f"{owned(CGROUP_PREFIX)}{secrets.token_hex(3)}"
    marker = f"mgt-cni-mnt-{secrets.token_hex(3)}"
    # A private mount namespace whose /var/lib is a tmpfs (for libcni's result cache).
    helper = spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    "mount -t tmpfs mgt-cni-varlib /var/lib && mkdir /var/lib/cni && "
                    "touch /var/lib/.ready && while :; do sleep 1; done", marker],
                   marker=marker)

    def podman_cmd(*args: str, check: bool = True) -> str:
        proc = subprocess.run(
            ["nsenter", f"--target={helper.pid}", "--mount",
             f"--net=/run/netns/{node.netns}", "podman", "--root", str(work / "root"),
             "--runroot", str(work / "runroot"), *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc.stdout

    try:
        ready = Path(f"/proc/{helper.pid}/root/var/lib/.ready")
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.02)
        assert ready.exists(), "private mount namespace did not come up"
        podman_cmd("import", str(tar), IMAGE)
        yield (lambda *args, **kw: podman_cmd(*args, **kw)), node, cgroup
    finally:
        podman_cmd("rm", "--all", "--force", "--time", "0", check=False)
        podman_cmd("rmi", "--all", "--force", check=False)
        stop(helper)
        remove_cgroup(cgroup)
        shutil.rmtree(work, ignore_errors=True)
        if (work / "root").exists():  # vfs layers may hold read-only directories
            subprocess.run(["rm", "-rf", str(work)], check=False)


def allocations(node: CniNode) -> list[str]:
    return sorted(p.name for p in (node.state_dir / "ipam").iterdir() if p.name[0].isdigit())


def test_podman_container_gets_an_address_and_reaches_its_gateway(podman):
    run_podman, node, cgroup = podman
    name = f"mgt-c-{secrets.token_hex(3)}"
    run_podman("run", "--detach", "--name", name, "--cgroup-parent", f"/{cgroup}",
               "--network", NETWORK, IMAGE, "sleep", "300")

    addr_out = run_podman("exec", name, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    match = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/32", addr_out)
    assert match, addr_out
    address = match.group(1)
    assert allocations(node) == [address]
    record = (node.state_dir / "ipam" / address).read_text()
    assert name in record  # podman's CNI_ARGS carry K8S_POD_NAME = the container name
    routes = run_podman("exec", name, "ip", "route")
    assert "default via 169.254.1.1 dev eth0" in routes
    ping = run_podman("exec", name, "ping", "-c", "1", "-W", "2", "169.254.1.1")
    assert "1 packets received" in ping
    assert run_podman("exec", name, "cat", "/proc/sys/net/core/somaxconn").strip() == "1111"
    host_links = [link["ifname"] for link in ip_json(node.netns, "link", "show")]
    assert any(link.startswith("mgc") for link in host_links)

    run_podman("rm", "--force", "--time", "0", name)
    assert allocations(node) == []
    assert not [link["ifname"] for link in ip_json(node.netns, "link", "show")
                if link["ifname"].startswith("mgc")]
