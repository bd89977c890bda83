"""Prometheus text exposition and the small HTTP server agents and gateways answer on.

Why it exists: both long-running processes export metrics and probes the same way — a
`/metrics` page rendered on demand (so a scrape shows the kernel as it is), `/healthz`
(the loop is turning) and `/readyz` (the process does its job) — and must escape label
values the one way the exposition format defines. `Exposition` builds a page; `serve`
runs the standard library's threaded HTTP server on its own thread until a stop event.

Where they listen is a list of HOST:PORT (`parse_listen_addresses`): an IP address, or
`node-ip` — this node's InternalIP, which the process learns from its Node object. The
endpoints have no authentication, so they are meant for loopback (kubelet probes) and the
node's internal address (Prometheus), never for every interface.

Rendering and parsing (`parse_samples`, for tools that read a page back, such as
`meshgress graph`) are purely computational; `serve` is the only I/O here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import selectors
import socket
import socketserver
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("meshgress.metrics")

Sample = tuple[str, float]
"""(rendered labels, value) of one series."""


def escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline
    escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**values: str) -> str:
    """`{a="1",b="2"}` (sorted by name), or "" without labels."""
    inner = ",".join(f'{k}="{escape(v)}"' for k, v in sorted(values.items()))
    return "{" + inner + "}" if inner else ""


def number(value: float) -> str:
    """Full precision (timestamps need it); integers without a decimal point."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Exposition:
    """One /metrics page, metric by metric, in the order added."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        self._lines.extend(f"{name}{lbl} {number(value)}" for lbl, value in samples)

    def histogram(self, name: str, help_text: str, buckets: Sequence[tuple[float, int]],
                  count: int, total: float) -> None:
        """`buckets`: (upper bound, cumulative count) pairs, +Inf excluded."""
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        self._lines.extend(f"{name}_bucket{labels(le=f'{bound:g}')} {count_}"
                           for bound, count_ in buckets)
        self._lines.append(f'{name}_bucket{{le="+Inf"}} {count}')
        self._lines.append(f"{name}_sum {number(total)}")
        self._lines.append(f"{name}_count {count}")

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(value: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], value)


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a text exposition page as (metric name, labels, value), in page
    order. Comments and blank lines are skipped; a line that is not a sample raises
    ValueError naming it (a page that cannot be read must not pass for an empty one)."""
    samples: list[tuple[str, dict[str, str], float]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if match is None:
            raise ValueError(f"line {line_number} is not a sample: {line[:120]!r}")
        name, raw_labels, raw_value = match.groups()
        found: dict[str, str] = {}
        position = 0
        raw_labels = (raw_labels or "").strip()
        while position < len(raw_labels):
            label = _LABEL.match(raw_labels, position)
            if label is None:
                raise ValueError(f"line {line_number}: malformed labels: {raw_labels[:120]!r}")
            found[label.group(1)] = _unescape(label.group(2))
            position = label.end()
        try:
            value = float(raw_value)
        except ValueError:
            raise ValueError(f"line {line_number}: {raw_value!r} is not a number") from None
        samples.append((name, found, value))
    return samples


Health = Callable[[], dict[str, bool]]
"""{"live": ..., "ready": ...}"""


def split_address(address: str) -> tuple[str, int]:
    """"host:port" (IPv6 in brackets) as (host, port); ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


NODE_IP = "node-ip"
"""The host of a listen address that stands for this node's InternalIP."""


@dataclass(frozen=True)
class ListenAddress:
    host: str
    """An IP address, or NODE_IP."""
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen_addresses(text: str) -> tuple[ListenAddress, ...]:
    """"HOST:PORT,HOST:PORT,...", HOST an IP address (IPv6 in brackets) or `node-ip`;
    "" means none. Raises ValueError saying what is wrong. Purely computational."""
    found: list[ListenAddress] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, port = split_address(item)
        if port == 0:
            raise ValueError(f"{item!r}: the port must be 1-65535")
        if host != NODE_IP:
            try:
                host = str(ipaddress.ip_address(host))
            except ValueError:
                raise ValueError(f"{item!r}: the host must be an IP address or {NODE_IP!r} "
                                 "(this node's InternalIP)") from None
        address = ListenAddress(host, port)
        if address in found:
            raise ValueError(f"{item!r} is listed twice")
        found.append(address)
    return tuple(found)


class _Server(ThreadingHTTPServer):
    """The standard threaded HTTP server, but asleep while nobody asks: its own
    `serve_forever` wakes every `poll_interval` to look for a shutdown request, this one
    blocks in select(2) on the listening socket and a pipe that `shutdown` writes to."""

    daemon_threads = True
    timeout = 0  # handle_request takes the connection select just reported, or none

    def server_activate(self) -> None:
        super().server_activate()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lifecycle = threading.Lock()
        self._shutting_down = False
        self._serving: threading.Event | None = None

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        with self._lifecycle:
            if self._shutting_down:
                return
            done = self._serving = threading.Event()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.socket, selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                while True:
                    ready = selector.select()
                    if any(key.fd == self._wake_read for key, _ in ready):
                        return
                    self.handle_request()
        finally:
            done.set()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it returned; idempotent."""
        with self._lifecycle:
            first = not self._shutting_down
            self._shutting_down = True
            serving = self._serving
            if first and self._wake_write >= 0:
                os.write(self._wake_write, b"x")
        if serving is not None:
            serving.wait()

    def server_close(self) -> None:
        with self._lifecycle:
            closed = self._wake_read < 0
            if not closed:
                os.close(self._wake_read)
                os.close(self._wake_write)
                self._wake_read = self._wake_write = -1
        if not closed:
            super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up before its answer is written (a health check that reads
        only the status line, a scrape that timed out) is routine: a debug line, not a
        traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            log.debug("client %s hung up: %s", client_address, exc)
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks the resolver for the address's name (a PTR lookup
        # that can block for seconds and sends DNS queries from the node); it is only
        # used to fill a CGI variable.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(address: str, collect: Callable[[], str], health: Health,
          stop: threading.Event) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `address` (an IP address and port) until
    `stop` is set (or the returned server is shut down). Raises OSError when it cannot
    listen there."""
    host, port = split_address(address)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, code = collect().encode(), 200
                ctype = "text/plain; version=0.0.4"
            elif self.path in ("/healthz", "/readyz"):
                state = health()
                good = state["live"] if self.path == "/healthz" else state["ready"]
                body, code, ctype = (b"ok\n" if good else b"not ok\n"), (200 if good else 503), \
                    "text/plain"
            else:
                body, code, ctype = b"not found\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            log.debug(format, *args)

    server = (_Server6 if ":" in host else _Server)((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()

    def shutdown_on_stop() -> None:
        stop.wait()
        server.shutdown()
        server.server_close()

    threading.Thread(target=shutdown_on_stop, name="metrics-stop", daemon=True).start()
    return server
