"""Datapaths built by hand with `ip`, `wg` and `nft`, for the benchmarks to compare with.

A benchmark's baseline must be the same datapath without meshgress: the same namespaces
and veth pairs, the same routes and forwarding, the same wireguard-go program with the same
MTU, and the connection tracking every Kubernetes node has (kube-proxy). `HandBuilt` makes
such pieces in throwaway namespaces named `<prefix><name>` (the prefix carries the
benchmark's PID, so a crashed run's leftovers can be told from a live run's) and removes
all of them, and every process it started, on `close`. No meshgress code runs in them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from meshgress.lab.netns import netns_pids, pid_alive, stop_pids

NETNS_DIR = Path("/run/netns")

KUBE_PROXY = """table ip kube-proxy-standin {
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 198.19.0.10 . tcp . 443 : goto service-kubernetes }
	}
	chain service-kubernetes {
		meta mark set meta mark | 0x4000
		meta l4proto tcp dnat to 192.0.2.1:6443
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x4000 == 0x4000 masquerade
	}
	chain filter-forward {
		type filter hook forward priority filter; policy accept;
		ct state invalid drop
		ct state established,related accept
	}
}
"""
"""What kube-proxy's nftables mode puts on every node, reduced to what every packet meets:
NAT hooks (which switch connection tracking on for every packet) looking Services up in a
verdict map (one Service, 198.19.0.10:443, that no benchmark packet matches), the
masquerade of marked packets, and the forward filter on conntrack state."""


def run(argv: list[str], *, check: bool = True, timeout: float = 120,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                          input=input_text)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def in_netns(ns: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / ns}"]


def tables_of(ruleset: str) -> list[tuple[str, str]]:
    """(family, name) of every table a ruleset text defines."""
    return re.findall(r"^table (\w+) (\S+) \{", ruleset, re.MULTILINE)


def load_ruleset(ns: str, ruleset: str) -> None:
    run([*in_netns(ns), "nft", "-f", "-"], input_text=ruleset)


def delete_tables(ns: str, ruleset: str) -> None:
    for family, name in tables_of(ruleset):
        run([*in_netns(ns), "nft", "delete", "table", family, name], check=False)


def remove_namespaces(namespaces: list[str]) -> None:
    """Delete the namespaces' links (wireguard-go exits when its TUN goes), stop what is
    left in them by PID (only processes in namespaces this run created), delete them."""
    for ns in namespaces:
        out = run(["ip", "-n", ns, "-o", "link", "show"], check=False).stdout
        for line in out.splitlines():
            link = line.split(":")[1].strip().split("@")[0]
            if link != "lo":
                run(["ip", "-n", ns, "link", "del", link], check=False)
    for ns in namespaces:
        stop_pids(netns_pids(ns))
        run(["ip", "netns", "delete", ns], check=False)


def remove_leftovers(prefix: str) -> None:
    """Namespaces `<prefix><pid>-...` of runs whose PID is gone."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    for name in sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else []:
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            remove_namespaces([name])


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop processes this run started, by PID: SIGTERM, then SIGKILL; reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if all(p.poll() is not None for p in procs):
            return


class HandBuilt:
    """Namespaces, links, WireGuard tunnels and pods made by hand; `close` removes them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        self._anchors: dict[str, int] = {}

    def close(self) -> None:
        remove_namespaces(list(reversed(self.namespaces)))
        stop(self.procs)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> HandBuilt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, name: str) -> str:
        ns = f"{self.prefix}{name}"
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def bridge(self, name: str) -> str:
        """A namespace holding one bridge, br0: the switch of an underlay."""
        ns = self.netns(name)
        run(["ip", "-n", ns, "-batch", "-"], input_text="link add br0 type bridge\n"
                                                        "link set br0 up\n")
        return ns

    def attach(self, switch: str, ns: str, port: str, address: str) -> None:
        """`ns` on the switch's bridge, its side `eth0` with `address` (CIDR)."""
        run(["ip", "-n", switch, "-batch", "-"], input_text=(
            f"link add {port} type veth peer name eth0 netns {ns}\n"
            f"link set {port} master br0\nlink set {port} up\n"))
        run(["ip", "-n", ns, "-batch", "-"], input_text=(
            f"address add {address} dev eth0\nlink set eth0 up\n"))

    def sysctl(self, ns: str, *settings: str) -> None:
        run([*in_netns(ns), "sysctl", "-q", "-w", *settings])

    def _anchor(self, ns: str) -> int:
        """A process holding a private mount namespace for `ns` with its own
        /var/run/wireguard (as the lab's nodes have), so wireguard-go's socket is its own."""
        if ns in self._anchors:
            return self._anchors[ns]
        ready = self.workdir / f"{ns}.ready"
        script = ("set -e; mount -t tmpfs -o mode=0755,size=1m mgb /var/run/wireguard; "
                  f': > "{ready}"; exec sleep infinity')
        anchor = subprocess.Popen(
            [*in_netns(ns), "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(anchor)
        deadline = time.monotonic() + 10
        while not ready.exists():
            if anchor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{ns}: private mount namespace did not come up")
            time.sleep(0.02)
        self._anchors[ns] = anchor.pid
        return anchor.pid

    def keypair(self, label: str) -> tuple[Path, str]:
        """(private key file, public key) from `wg genkey`."""
        private = run(["wg", "genkey"]).stdout.strip()
        public = run(["wg", "pubkey"], input_text=private + "\n").stdout.strip()
        path = self.workdir / f"{label}.key"
        path.write_text(private + "\n")
        os.chmod(path, 0o600)
        return path, public

    def wireguard(self, ns: str, interface: str, program: str, *, key: Path, port: int,
                  mtu: int, address: str | None, peer: str, endpoint: str,
                  allowed_ips: str) -> None:
        """Start `program` (wireguard-go) for `interface` in `ns` the way the agent does
        (foreground, its own session), configure it with `wg set`, give it `address` (None:
        none) and `mtu`, and bring it up."""
        inside = ["nsenter", f"--target={self._anchor(ns)}", "--net", "--mount", "--"]
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "error"}
        log = self.workdir / f"{ns}-{interface}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([*inside, program, interface], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while run([*inside, "wg", "show", interface], check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{ns}: {program} did not start (exit {proc.poll()}): "
                                   f"{log.read_text(errors='replace')}")
            time.sleep(0.02)
        run([*inside, "wg", "set", interface, "private-key", str(key), "listen-port",
             str(port), "peer", peer, "endpoint", endpoint, "allowed-ips", allowed_ips])
        run(["ip", "-n", ns, "-batch", "-"], input_text=(
            (f"address add {address} dev {interface}\n" if address else "")
            + f"link set {interface} mtu {mtu}\nlink set {interface} up\n"))

    def pod(self, node: str, name: str, host_if: str, address: str, mtu: int) -> str:
        """A pod behind `node`, wired as the CNI plugin wires one (cni/wiring.py): a routed
        veth with `mtu`, the pod's /32 and a default route via 169.254.1.1, which the node
        owns (on its loopback) and answers by proxy ARP on the host side; a /32 route to
        the pod on the node; forwarding on, rp_filter strict on the host side."""
        pod = self.netns(name)
        run(["ip", "-n", node, "-batch", "-"], input_text=(
            "address replace 169.254.1.1/32 dev lo\n"
            f"link add {host_if} mtu {mtu} type veth peer name eth0 mtu {mtu} netns {pod}\n"
            f"link set {host_if} up\n"
            f"route add {address}/32 dev {host_if} scope link\n"))
        self.sysctl(node, "net.ipv4.ip_forward=1", f"net.ipv4.conf.{host_if}.proxy_arp=1",
                    f"net.ipv4.neigh.{host_if}.proxy_delay=0",
                    f"net.ipv4.conf.{host_if}.rp_filter=1")
        run(["ip", "-n", pod, "-batch", "-"], input_text=(
            f"address add {address}/32 dev eth0\nlink set eth0 up\n"
            "route add 169.254.1.1 dev eth0 scope link\n"
            "route add default via 169.254.1.1 dev eth0\n"))
        return pod
