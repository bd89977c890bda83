"""The agent's CNI server: a unix socket the `meshgress-cni` shim talks to.

Connections are served by a fixed set of worker threads that each block in accept() on the
listening socket (pod operations of different pods run concurrently; the kernel and the
IPAM lock serialise what must be serialised). No thread is started and no hand-off is
made per request: each costs ~0.1 ms of wake-ups on a pod's ADD path. One request and one
response per connection, in the binary framing of `cni.plugin`. Every request gets an
answer: the spec's error object for anything malformed, never a closed connection (which
the shim would report as "try again later").

For ADD and CHECK the container's network namespace and an rtnetlink socket the shim
created inside it arrive as file descriptors with the request (SCM_RIGHTS), and are closed
when the answer is sent; the service checks the socket before it uses it. Before it
listens, and once it listens, the server has the service replay the DELs the shim queued
while nobody listened (`CniService.replay_deletions`; every request does so too).

The connection is the service's `Caller`: the shim hanging up is how the agent learns
that it gave up (its timeout passed, or the runtime killed it), checked with a poll(2)
that costs microseconds; and a shim that acknowledges answers (`p.ACKNOWLEDGING_MAGICS`)
tells the agent that it holds a successful ADD's answer, without which the ADD is undone.

API for the agent (and the lab):

    service = CniService(pod_cidr, state_dir, pod_ready_hook=steer_pod)
    stop = threading.Event()
    serve("/run/meshgress/cni.sock", service, stop)   # blocks until stop is set

`serve` opens the service (netlink socket, gateway address) in the calling thread's
network namespace, which must be the node's. Standalone, for tests and benchmarks:

    python -m cni.server --socket PATH --pod-cidr CIDR --state-dir DIR
"""

from __future__ import annotations

import argparse
import array
import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from types import FrameType

from cni import protocol as p
from cni.model import PodAttachment, compute_pod_namespace
from cni.service import CniService, PodHook

__all__ = ["CniService", "PodAttachment", "PodHook", "main", "serve"]

log = logging.getLogger("meshgress.cni")
_CLIENT_TIMEOUT = 60
_CLIENT_TIMEVAL = struct.pack("@ll", _CLIENT_TIMEOUT, 0)
_MAX_FDS = 4
_WORKERS = 32
"""Requests served at once, each by a thread blocked in accept() (the kernel wakes exactly
one per connection); more wait in the listen backlog. A blocking pod-ready hook holds one."""
_BACKLOG = 256


class _NoRequest(Exception):
    """The client connected and left without a word (a liveness probe)."""


def _recv_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read one request frame and any file descriptors sent with it. When no frame comes,
    the descriptors that did come are closed: each may hold a pod's namespace alive."""
    fds: list[int] = []
    try:
        return _recv_frame_into(sock, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_frame_into(sock: socket.socket, fds: list[int]) -> tuple[bytes, list[int]]:
    buffer = bytearray()
    needed: int | None = None
    while needed is None or len(buffer) < needed:
        data, ancdata, _flags, _addr = sock.recvmsg(
            65536, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
        )
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(cdata[: len(cdata) - len(cdata) % received.itemsize])
                fds.extend(received)
        if not data:
            if not buffer:
                raise _NoRequest
            raise ConnectionError("client closed the connection mid-request")
        buffer += data
        if needed is None and len(buffer) >= 8:
            if buffer[:4] not in p.REQUEST_MAGICS:
                raise ValueError(f"not a meshgress-cni request: {bytes(buffer[:8])!r}")
            needed = 8 + p.frame_length(bytes(buffer[4:8]))
    if len(buffer) > needed:
        raise ValueError("more than one request on a connection")
    return bytes(buffer[:needed]), fds


def _parse_request(frame: bytes) -> dict[str, object]:
    fields, stdin = p.decode_request(frame[8:])
    try:
        text = stdin.decode()
    except UnicodeDecodeError as exc:
        raise p.CniError(p.ERR_DECODE, "network configuration is not UTF-8", str(exc)) from None
    return {**fields, "stdin": text}


_HUNG_UP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


class _ShimConnection:
    """The service's `Caller` on one connection."""

    def __init__(self, sock: socket.socket, acknowledges: bool) -> None:
        self._sock = sock
        self._acknowledges = acknowledges
        self.answered = False

    def gave_up(self) -> bool:
        """The shim hung up. It sends nothing between its request and the answer, so a
        readable end of stream is the only thing there is to see."""
        poller = select.poll()
        poller.register(self._sock, select.POLLRDHUP)
        return any(events & _HUNG_UP for _fd, events in poller.poll(0))

    def confirm(self, stdout: str) -> bool:
        if not self._acknowledges and self.gave_up():
            return False
        self.answered = True
        try:
            self._sock.sendall(p.encode_response(0, stdout))
            if not self._acknowledges:
                return True
            return self._sock.recv(1) == p.ACK  # b"": hung up without taking the answer
        except OSError:  # EPIPE/ECONNRESET: gone; EAGAIN: the client timeout passed
            return False

    def send(self, answer: tuple[int, str]) -> None:
        if not self.answered:
            self.answered = True
            with contextlib.suppress(OSError):
                self._sock.sendall(p.encode_response(*answer))


def _serve_connection(sock: socket.socket, service: CniService) -> None:
    """Answer the one request of a connection."""
    # Kernel timeouts on the blocking socket rather than settimeout(), which would poll()
    # before every call; an expired one raises BlockingIOError (EAGAIN), an OSError.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _CLIENT_TIMEVAL)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _CLIENT_TIMEVAL)
    fds: list[int] = []
    request: dict[str, object] = {}
    began = time.perf_counter()
    connection = _ShimConnection(sock, acknowledges=False)
    try:
        try:
            frame, fds = _recv_frame(sock)
            connection = _ShimConnection(sock, acknowledges=frame[:4] in p.ACKNOWLEDGING_MAGICS)
            request = _parse_request(frame)
        except _NoRequest:
            return
        except p.CniError as exc:
            answer = (1, exc.to_json(p.LATEST_VERSION))
        except (OSError, ValueError) as exc:
            log.warning("CNI server: bad request: %s", exc)
            answer = (1, p.CniError(p.ERR_DECODE, "bad request", str(exc)).to_json(
                p.LATEST_VERSION))
        else:
            try:
                answer = service.handle(request, compute_pod_namespace(frame[:4], fds),
                                        connection)
            except Exception as exc:  # handle() answers everything; this is a last resort
                log.exception("CNI server: request failed")
                answer = (1, p.CniError(p.ERR_INTERNAL, "request failed", repr(exc)).to_json(
                    p.LATEST_VERSION))
        connection.send(answer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("CNI %s %s answered (exit %d) in %.2f ms", request.get("command"),
                      request.get("containerID"), answer[0], (time.perf_counter() - began) * 1e3)
    finally:
        for fd in fds:
            os.close(fd)


def _accept_loop(listener: socket.socket, service: CniService) -> None:
    """One of the workers: block in accept(), serve, repeat, until the listener shuts."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # shutdown() of the listener wakes every worker with EINVAL
        with conn:
            try:
                _serve_connection(conn, service)
            except Exception:
                log.exception("CNI server: request failed")


def _remove_stale_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket")
        path.unlink()


def serve(socket_path: Path | str, service: CniService, stop: threading.Event,
          on_listening: Callable[[], None] | None = None, *,
          signal_wake: float | None = 0.5) -> None:
    """Serve CNI requests on `socket_path` until `stop` is set, then finish those in flight.

    `signal_wake`: seconds between wake-ups of the calling thread, which the main thread
    needs to run Python signal handlers; None when another thread calls (the agent's CNI
    thread): it then sleeps until `stop`.

    Opens `service` first (idempotent). The socket is created mode 0600: only root (the
    container runtime) may talk to the agent. `on_listening` runs once the socket accepts
    requests (the agent writes the runtime's conflist then). Do not set `stop` from a
    signal handler of the thread blocked here (Event.set would need a lock that thread may
    hold); set it from another thread.
    """
    path = Path(socket_path)
    service.open()
    service.replay_deletions()  # before any ADD: no queued pod's address is handed out
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    listener.listen(_BACKLOG)
    workers = [
        threading.Thread(target=_accept_loop, args=(listener, service),
                         name=f"cni-worker-{n}", daemon=True)
        for n in range(_WORKERS)
    ]
    for worker in workers:
        worker.start()
    log.info("CNI server listening on %s (pod CIDR %s)", path, service.pod_cidr)
    try:
        service.replay_deletions()  # what a shim queued while the socket was being made
        if on_listening is not None:
            on_listening()
        # Wake up now and then: a signal delivered to another thread does not interrupt a
        # plain wait, and the main thread runs Python signal handlers only when it wakes.
        while not stop.wait(signal_wake):
            pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                path.unlink()  # new clients fail fast (and retry) from here on
        listener.shutdown(socket.SHUT_RDWR)
        for worker in workers:
            worker.join()  # requests in flight finish
        listener.close()
        log.info("CNI server on %s stopped", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cni.server",
        description="Serve meshgress CNI requests in the current network namespace.",
    )
    parser.add_argument("--socket", required=True, help="unix socket path")
    parser.add_argument("--pod-cidr", required=True, type=IPv4Network,
                        help="this node's pod CIDR, e.g. 198.18.0.0/24")
    parser.add_argument("--state-dir", required=True, help="directory for allocations")
    parser.add_argument("--delete-queue", default=None,
                        help="where the shim queues DELs while the server is away "
                             "(default: STATE_DIR/delete-queue)")
    parser.add_argument("--mtu", type=int, default=None, help="default pod veth MTU")
    parser.add_argument("--no-gateway-address", action="store_true",
                        help="do not add 169.254.1.1/32 to the loopback (proxy ARP only)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = CniService(args.pod_cidr, args.state_dir, own_gateway=not args.no_gateway_address,
                         mtu=args.mtu, delete_queue=args.delete_queue)
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        # Not stop.set() here: the handler runs in the main thread, which may be inside
        # stop.wait() holding the Event's lock at that instant, and would deadlock.
        threading.Thread(target=stop.set, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: thread stacks to stderr
    try:
        serve(args.socket, service, stop)
    finally:
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
