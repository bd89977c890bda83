"""The lab's "outside world": a TCP and UDP echo service that says which source it saw.

Everything meshgress promises about egress is a claim about the source address a host
outside the cluster sees. This service is that host's witness: for every TCP connection
it first writes `<source ip> <source port>\\n`, then answers each line it receives with
`<source ip> <source port> <line>`; every UDP datagram is answered with
`<source ip> <source port> <payload>`. With `--log` it also appends one JSON line per
connection or datagram, so tests can ask afterwards what arrived.

The client half (`tcp`, `udp`) is what the demo and tests run inside a node or pod.
Standard library only: it runs in namespaces where nothing else is set up.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time
from pathlib import Path


class _Log:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def record(self, proto: str, addr: tuple[str, int], payload: str = "") -> None:
        if self._path is None:
            return
        line = json.dumps({"t": time.time(), "proto": proto, "src": addr[0],
                           "port": addr[1], "payload": payload[:200]}) + "\n"
        with self._lock, self._path.open("a") as fh:
            fh.write(line)


def _serve_tcp_client(conn: socket.socket, addr: tuple[str, int], log: _Log) -> None:
    seen = f"{addr[0]} {addr[1]}"
    log.record("tcp", addr)
    try:
        with conn:
            conn.sendall(f"{seen}\n".encode())
            buf = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    conn.sendall(f"{seen} {line.decode(errors='replace')}\n".encode())
    except OSError:
        return


def serve(address: str, port: int, log_path: Path | None) -> None:
    """Serve TCP and UDP on (address, port) until killed."""
    log = _Log(log_path)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, port))
    tcp.listen(128)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, port))
    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ)
    sel.register(udp, selectors.EVENT_READ)
    print(f"echo: serving tcp and udp on {address}:{port}", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is tcp:
                conn, addr = tcp.accept()
                threading.Thread(target=_serve_tcp_client, args=(conn, addr, log),
                                 daemon=True).start()
            else:
                data, addr = udp.recvfrom(65536)
                payload = data.decode(errors="replace").strip()
                log.record("udp", addr, payload)
                udp.sendto(f"{addr[0]} {addr[1]} {payload}".encode(), addr)


def ask_tcp(host: str, port: int, timeout: float) -> str:
    """The source address the echo service saw for one TCP connection."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.settimeout(timeout)
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode().split("\n", 1)[0].split(" ")[0]


def ask_udp(host: str, port: int, timeout: float, payload: str = "probe") -> str:
    """The source address the echo service saw for one UDP datagram."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload.encode(), (host, port))
        data, _ = sock.recvfrom(4096)
    return data.decode().split(" ")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshgress.lab.echo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="run the echo service")
    p_serve.add_argument("--address", default="0.0.0.0")  # noqa: S104 - the lab's outside host
    p_serve.add_argument("--port", type=int, required=True)
    p_serve.add_argument("--log", type=Path)
    for proto in ("tcp", "udp"):
        p = sub.add_parser(proto, help=f"print the source the service saw over {proto}")
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.address, args.port, args.log)
        return 0
    try:
        seen = (ask_tcp if args.cmd == "tcp" else ask_udp)(args.host, args.port, args.timeout)
    except OSError as exc:
        print(f"echo {args.cmd} {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(seen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
