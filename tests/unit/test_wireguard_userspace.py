"""The userspace backend without root: the UAPI client against a fake socket server, and
how wireguard-go is started (and what happens when it does not come up)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wireguard.errors import DeviceStartError, UapiError
from wireguard.userspace import UserspaceBackend, private_socket_dir_command


class FakeUapiServer:
    """Answers each connection's request with a canned answer and records the request."""

    def __init__(self, path: Path, answer: str) -> None:
        self.path = path
        self.answer = answer
        self.received: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.fspath(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data.decode())
                # answer in two pieces, as a slow server would
                raw = self.answer.encode()
                conn.sendall(raw[: len(raw) // 2])
                time.sleep(0.01)
                conn.sendall(raw[len(raw) // 2:])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short folder: unix socket paths are limited to 107 bytes."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mgt-wg-unit-"))
    yield folder
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


def test_request_round_trip(short_tmp: Path) -> None:
    server = FakeUapiServer(short_tmp / "wg0.sock", "listen_port=51820\nerrno=0\n\n")
    try:
        backend = UserspaceBackend(short_tmp)
        answer = backend.request("wg0", "get=1\n\n")
    finally:
        server.close()
    assert answer == "listen_port=51820\nerrno=0\n\n"
    assert server.received == ["get=1\n\n"]


def test_request_with_errno_raises(short_tmp: Path) -> None:
    server = FakeUapiServer(short_tmp / "wg0.sock", "errno=-98\n\n")
    try:
        with pytest.raises(UapiError) as info:
            UserspaceBackend(short_tmp).request("wg0", "set=1\nlisten_port=51820\n\n")
    finally:
        server.close()
    assert info.value.errno == 98
    assert "EADDRINUSE" in str(info.value)
    assert "listen_port" not in str(info.value)  # the request is never echoed


def test_request_without_socket(short_tmp: Path) -> None:
    with pytest.raises(UapiError) as info:
        UserspaceBackend(short_tmp).request("wg0", "get=1\n\n")
    assert info.value.errno == 2


def test_request_to_a_stale_socket(short_tmp: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(short_tmp / "wg0.sock"))  # bound, never listening
    try:
        with pytest.raises(UapiError) as info:
            UserspaceBackend(short_tmp).request("wg0", "get=1\n\n")
    finally:
        stale.close()
    assert info.value.errno == 111


def test_invalid_interface_name_never_reaches_the_file_system(short_tmp: Path) -> None:
    with pytest.raises(ValueError, match="not valid"):
        UserspaceBackend(short_tmp).socket_path("../etc")


def test_private_socket_dir_command_execs_down_to_wireguard_go() -> None:
    command = private_socket_dir_command("/tmp/mgt-wg-x", "/usr/bin/wireguard-go")
    assert command[:4] == ("unshare", "--mount", "--propagation", "slave")
    assert command[4:6] == ("sh", "-c")
    script = command[6]
    assert 'mount --bind "$1" /var/run/wireguard' in script
    assert script.rstrip().endswith('exec "$2" "$3"')
    assert command[-2:] == ("/tmp/mgt-wg-x", "/usr/bin/wireguard-go")


def test_argv_enters_the_network_namespace() -> None:
    backend = UserspaceBackend("/tmp/x", netns="mgt-wg-a", command=("wireguard-go",))
    assert backend._argv("wg0") == ["nsenter", "--net=/run/netns/mgt-wg-a", "wireguard-go", "wg0"]
    by_path = UserspaceBackend("/tmp/x", netns="/proc/1/ns/net")
    assert by_path._argv("wg0")[:2] == ["nsenter", "--net=/proc/1/ns/net"]
    assert UserspaceBackend()._argv("wg0") == ["wireguard-go", "wg0"]


def test_start_failure_reports_the_output(short_tmp: Path) -> None:
    backend = UserspaceBackend(short_tmp, command=("sh", "-c", "echo 'TUN says no' >&2; exit 3"))
    with pytest.raises(DeviceStartError, match=r"exited with status 3.*TUN says no"):
        backend._start("wg0")
    assert backend.pid("wg0") is None


def test_wireguard_go_log_is_appended_to_the_log_path_with_its_level(short_tmp: Path) -> None:
    log = short_tmp / "wg.log"
    log.write_text("an earlier run\n")
    backend = UserspaceBackend(short_tmp, command=("sh", "-c", 'echo "level=$LOG_LEVEL"; exit 3'),
                               log_path=log, log_level="verbose")
    with pytest.raises(DeviceStartError, match=r"level=verbose") as failed:
        backend._start("wg0")
    assert log.read_text() == "an earlier run\nlevel=verbose\n"
    # The default level, when none is given and the environment sets none, is `error`.
    quiet = UserspaceBackend(short_tmp, command=("sh", "-c", 'echo "level=$LOG_LEVEL"; exit 3'),
                             log_path=log)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("LOG_LEVEL", raising=False)
        with pytest.raises(DeviceStartError, match=r"level=error"):
            quiet._start("wg0")
    assert log.read_text().splitlines() == ["an earlier run", "level=verbose", "level=error"]
    assert "exited with status 3" in str(failed.value)


def test_start_timeout_stops_the_process(short_tmp: Path) -> None:
    script = 'echo $$ > "$0.pid"; exec sleep 30'
    backend = UserspaceBackend(short_tmp, command=("sh", "-c", script,
                                                   os.fspath(short_tmp / "child")),
                               start_timeout=0.3, stop_timeout=1)
    with pytest.raises(DeviceStartError, match="did not open"):
        backend._start("wg0")
    pid = int((short_tmp / "child.pid").read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed by PID and reaped
