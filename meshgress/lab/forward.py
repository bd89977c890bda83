"""A TCP forwarder from the host's loopback into a lab network namespace.

The lab's API server listens on its underlay address inside the lab, which the host's own
network namespace cannot reach (the lab never configures the host's namespace). So that a
person can `export KUBECONFIG=...` and use kubectl, k9s or a test client from the host,
`lab up --datastore kube` starts this forwarder: it binds 127.0.0.1 on a free port in the
host's namespace, writes the port to a file, and only then moves itself into the lab's
control-plane namespace, so every connection it makes goes to the API server inside. A
socket keeps the namespace it was made in, so the listening socket stays on the host's
loopback. Living in the control-plane namespace also makes it one of the lab's processes:
`lab down` finds and stops it with the rest.

Bytes are copied as they are (TLS stays end to end: the API server's certificate names
127.0.0.1).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
BUFFER = 65536


def _enter_netns(path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(BUFFER):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _serve_one(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def serve(listener: socket.socket, netns: Path, target: tuple[str, int]) -> None:
    """Move this process into `netns` and forward every connection `listener` accepts,
    until the namespace's name is gone (a `lab down` that raced with the start, and so
    could not find this process in it yet). Single-threaded until now: threads started
    below inherit the namespace."""
    _enter_netns(netns)
    listener.settimeout(1.0)
    while netns.exists():
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        client.settimeout(None)
        threading.Thread(target=_serve_one, args=(client, target), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m meshgress.lab.forward")
    parser.add_argument("--netns", type=Path, required=True,
                        help="the network namespace to connect from (/run/netns/NAME)")
    parser.add_argument("--to", required=True, metavar="IP:PORT")
    parser.add_argument("--port-file", type=Path, required=True,
                        help="where the chosen loopback port is written once listening")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(f"{listener.getsockname()[1]}\n")
    tmp.replace(args.port_file)
    serve(listener, args.netns, (host, int(port)))


if __name__ == "__main__":
    main()
