"""Fuzzing the CNI request path: whatever a runtime (or anything else) sends, the answer is
the spec's, and a failed ADD leaves nothing behind.

Four entry points, each with hypothesis (derandomized, no example database: the same
examples on every run, a few seconds each):

- the shim (`cni.plugin.run`: environment bytes + stdin bytes), with the agent away;
- the shim against the real server and service (kernel faked by `FakeWiring`);
- the server's frame decoding (`_serve_connection`), raw bytes on a unix socket;
- `CniService.handle` with request fields of any JSON type.

What is generated: environments from the CNI variables with valid, hostile (not UTF-8,
too long, separators, spaces) and absent values (never a NUL byte: an environment cannot
hold one); network configurations that are valid, of the wrong types in the keys
meshgress reads (mtu, dns, prevResult, socket, timeout, cni.dev/valid-attachments),
deeply nested, cut short, byte-flipped or not JSON at all.

What is checked: no exception escapes; exit 0 comes with nothing or a JSON object, any
other exit with exactly the spec's error object (cniVersion, code, msg, details) and a code
the spec or meshgress defines; after a failed ADD (and once successful ones are deleted),
no veth, route or address (`FakeWiring.is_empty`) and no allocation remain.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cni import plugin
from cni import protocol as p

FUZZ = settings(
    derandomize=True, database=None, deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CODES = frozenset(p.ERROR_NAMES)


# --- what is generated -------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False) | st.text(max_size=12))
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=6,
)


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` three times in four, else any JSON value."""
    return st.one_of(valid, valid, valid, json_values)


# Each example starts from a valid invocation and breaks a few things in it (often none):
# most examples then get far enough to allocate and wire, where a failure has something to
# undo, and every part is still of every type and shape now and then.

_string_lists = st.lists(st.text(max_size=12), max_size=3)
_dns = st.fixed_dictionaries({}, optional={
    "nameservers": _mostly(_string_lists), "domain": _mostly(st.text(max_size=8)),
    "search": _mostly(_string_lists), "options": _mostly(_string_lists)})
_interfaces = st.lists(st.fixed_dictionaries(
    {"name": st.text(max_size=8)}, optional={"sandbox": st.text(max_size=8)}), max_size=3)
_prev_result = st.fixed_dictionaries({}, optional={
    "cniVersion": st.sampled_from(["1.0.0", "0.4.0"]),
    "interfaces": _mostly(_interfaces),
    "ips": _mostly(st.lists(st.fixed_dictionaries({"address": st.text(max_size=18)}),
                            max_size=2)),
    "routes": _mostly(st.lists(st.fixed_dictionaries({"dst": st.text(max_size=18)}),
                               max_size=2)),
    "dns": _mostly(_dns),
})
_CONFIG_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "mtu": st.integers(68, 65535),
    "dns": _dns,
    "prevResult": _prev_result,
    "timeout": st.floats(2, 10),
    "cni.dev/valid-attachments": st.lists(st.fixed_dictionaries({
        "containerID": st.sampled_from(["ctr1", "x"]), "ifname": st.just("eth0")}),
        max_size=2),
    "runtimeConfig": json_values,
}
def _faults(names: list[Any]) -> st.SearchStrategy[list[Any]]:
    """Which of `names` to break: none in half the examples, else one or two."""
    return st.sampled_from([0, 0, 1, 2]).flatmap(
        lambda n: st.lists(st.sampled_from(names), min_size=n, max_size=n, unique=True))


_BAD_VERSIONS = st.sampled_from(["0.3.1", "", "2.0.0", "1.0", "1.1.0 "])


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    config: dict[str, Any] = {
        "cniVersion": draw(st.sampled_from(["1.1.0", "1.0.0", "0.4.0"])),
        "name": "fuzz", "type": "meshgress-cni"}
    for key, valid in _CONFIG_KEYS.items():
        if draw(st.booleans()):
            config[key] = draw(valid)
    for key in draw(_faults(["cniVersion", *_CONFIG_KEYS])):
        config[key] = draw(json_values | _BAD_VERSIONS)
    return config


@st.composite
def stdins(draw: st.DrawFn, socket_path: str | None = None) -> bytes:
    config = draw(configs())
    if socket_path is not None and draw(st.booleans()):
        config["socket"] = socket_path
    text = json.dumps(config, indent=draw(st.sampled_from([None, 2])))
    if draw(st.integers(0, 7)) == 0:  # a deeply nested value, written out
        depth = draw(st.integers(2, 3000))  # (json.dumps would recurse)
        nested = '{"k": ' * (depth // 2) + "[" * (depth - depth // 2) + "0"
        nested += "]" * (depth - depth // 2) + "}" * (depth // 2)
        text = text[:-1].rstrip() + f', "deep": {nested}}}'
    data = text.encode()
    how = draw(st.sampled_from(["as is"] * 15 + ["cut", "flip", "wrap", "garbage", "not utf-8"]))
    if how == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif how == "wrap":
        depth = draw(st.integers(1, 5000))
        data = b"[" * depth + data + b"]" * depth
    elif how == "garbage":
        data = draw(st.binary(max_size=64))
    elif how == "not utf-8":
        data = data.replace(b"{", b"{\xff", 1)
    return data


_COMMANDS = st.sampled_from(p.COMMANDS + ("ADD",) * 4)
"""ADD, the command with the most to undo, half the time."""
_env_bytes = st.binary(max_size=24).filter(lambda v: b"\0" not in v)
_HOSTILE = _env_bytes | st.sampled_from(
    [b"\xff\xfe", b"a/b", b"a b", b"..", b"x:y", b"\xc3\xa4", b"-lead", b"=;=", b"a\nb"])


@st.composite
def environments(draw: st.DrawFn, pod_netns: str) -> dict[bytes, bytes]:
    env = {
        b"CNI_COMMAND": draw(_COMMANDS).encode(),
        b"CNI_CONTAINERID": draw(st.sampled_from([b"ctr1", b"0a_b.c-d", b"x" * 64])),
        b"CNI_IFNAME": draw(st.sampled_from([b"eth0", b"net1", b"a" * 15])),
        b"CNI_NETNS": pod_netns.encode(),
        b"CNI_ARGS": draw(st.sampled_from(
            [b"K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", b"IgnoreUnknown=1;K8S_POD_NAME=q", b""])),
        b"CNI_PATH": b"/usr/lib/cni",
    }
    for name in draw(_faults(sorted(env))):
        how = draw(st.sampled_from(["absent", "empty", "hostile", "long", "other netns"]))
        if how == "absent":
            del env[name]
        elif how == "empty":
            env[name] = b""
        elif how == "hostile":
            env[name] = draw(_HOSTILE)
        elif how == "long":
            env[name] = draw(st.sampled_from([b"a" * 16, b"b" * 1025, b"c" * 5000]))
        else:  # the node's own, one that is gone, files that are no namespace
            env[name] = draw(st.sampled_from(
                [b"/proc/self/ns/net", b"/run/netns/mgt-none", b"/dev/null", b"/"]))
    return env


# --- what is checked ---------------------------------------------------------------------


def assert_spec_answer(code: int, stdout: bytes) -> dict[str, Any] | None:
    """Exit 0: nothing or a JSON object; otherwise exactly the spec's error object.
    (The outcome is reported as a hypothesis event: --hypothesis-show-statistics.)"""
    text = stdout.decode()
    if code == 0:
        event("exit 0")
        if not text.strip():
            return None
        answer = json.loads(text)
        assert isinstance(answer, dict) and isinstance(answer.get("cniVersion"), str), text
        return answer
    error = json.loads(text)
    event(f"error {error.get('code')}")
    assert set(error) == {"cniVersion", "code", "msg", "details"}, text
    assert isinstance(error["cniVersion"], str) and error["cniVersion"], text
    assert error["code"] in CODES, text
    assert isinstance(error["msg"], str) and error["msg"], text
    assert isinstance(error["details"], str), text
    return error


# --- the shim alone ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod_netns(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("fuzz") / "pod-netns"
    path.touch()
    return str(path)


@pytest.fixture(scope="module")
def agent_away(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shim's default socket pointed at a path where nobody listens."""
    path = str(tmp_path_factory.mktemp("away") / "nobody.sock")
    saved = plugin.DEFAULT_SOCKET
    plugin.DEFAULT_SOCKET = path
    yield path
    plugin.DEFAULT_SOCKET = saved


@settings(FUZZ, max_examples=250)
@given(data=st.data())
def test_the_shim_answers_anything_with_the_spec_s_json(pod_netns, agent_away, data):
    env = data.draw(environments(pod_netns))
    stdin = data.draw(stdins(agent_away))
    code, stdout = plugin.run(env, stdin)
    answer = assert_spec_answer(code, stdout)
    if env.get(b"CNI_COMMAND") == b"VERSION":
        assert code == 0 and answer is not None and "supportedVersions" in answer
    else:
        assert code != 0  # nobody to answer but the shim itself


# --- the shim, the server and the service ---------------------------------------------------


@dataclass
class FuzzedNode:
    socket: str
    service: Any
    wiring: Any

    def clean_up(self, env: dict[bytes, bytes]) -> None:
        """Delete what a successful ADD made, so every example starts from nothing."""
        raw = {name: env.get(key, b"").decode("utf-8", "surrogateescape")
               for name, key in zip(p.REQUEST_FIELDS, plugin.REQUEST_ENV, strict=True)}
        raw["command"] = "DEL"
        raw["stdin"] = '{"cniVersion": "1.0.0"}'
        code, out = self.service.handle(raw)
        assert code == 0, out

    def assert_nothing_left(self) -> None:
        # A shim that timed out has left the agent mid-ADD: wait until it has undone it.
        deadline = time.monotonic() + 30
        while self.service.in_flight:
            assert time.monotonic() < deadline, "a request never finished"
            time.sleep(0.001)
        assert self.wiring.is_empty(), (self.wiring.links, self.wiring.namespaces)
        assert self.service._ipam.allocations() == []


@pytest.fixture(scope="module")
def fuzzed_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedNode]:
    from ipaddress import IPv4Network

    from cni.server import serve
    from cni.service import CniService
    from cni.wiring import FakeWiring

    class CountingService(CniService):
        """Counts the requests being handled, so a check can wait for the agent."""

        in_flight = 0
        _counting = threading.Lock()

        def handle(self, *args: Any, **kwargs: Any) -> tuple[int, str]:
            with self._counting:
                self.in_flight += 1
            try:
                return super().handle(*args, **kwargs)
            finally:
                with self._counting:
                    self.in_flight -= 1

    directory = tmp_path_factory.mktemp("node")
    wiring = FakeWiring()
    service = CountingService(IPv4Network("198.18.0.0/24"), directory / "state", wiring=wiring,
                              pod_ready_hook=_fuzzed_ready_hook)
    path = str(directory / "cni.sock")
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(path, service, stop), daemon=True)
    thread.start()
    while not os.path.exists(path):
        thread.join(0.01)
    saved = plugin.DEFAULT_SOCKET, plugin.DEFAULT_TIMEOUT
    plugin.DEFAULT_SOCKET, plugin.DEFAULT_TIMEOUT = path, 10.0  # even without "socket"
    yield FuzzedNode(path, service, wiring)
    plugin.DEFAULT_SOCKET, plugin.DEFAULT_TIMEOUT = saved
    stop.set()
    thread.join(10)


def _fuzzed_ready_hook(attachment: Any) -> None:
    """Fails for some pods, as the agent's does when it cannot steer one."""
    if attachment.name and attachment.name.endswith("p") and attachment.ip.packed[-1] % 3 == 0:
        raise RuntimeError("no steering for this one")


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_the_request_path_answers_anything_and_a_failed_add_leaves_nothing(
        pod_netns, fuzzed_node, data):
    env = data.draw(environments(pod_netns))
    stdin = data.draw(stdins(fuzzed_node.socket))
    failure = data.draw(st.sampled_from(
        [None, None, OSError(5, "Input/output error"), ZeroDivisionError("a bug")]))
    fuzzed_node.wiring.fail_add = failure  # raised once the veth exists
    try:
        code, stdout = plugin.run(env, stdin)
    finally:
        fuzzed_node.wiring.fail_add = None
    answer = assert_spec_answer(code, stdout)
    if code == 0 and env.get(b"CNI_COMMAND") == b"ADD":
        assert failure is None
        assert answer is not None and answer["ips"][-1]["address"].startswith("198.18.0.")
        fuzzed_node.clean_up(env)
    fuzzed_node.assert_nothing_left()


# --- the server's frame decoding -------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn, pod_netns: str) -> bytes:
    env = draw(environments(pod_netns))
    values = [env.get(name, b"") for name in plugin.REQUEST_ENV]
    frame = p.encode_request(values, draw(stdins()))
    how = draw(st.sampled_from(["as is"] * 4 + ["legacy", "magic", "length", "cut", "fields",
                                               "empty"]))
    if how == "legacy":
        frame = p.LEGACY_REQUEST_MAGIC + frame[4:]
    elif how == "magic":
        frame = draw(st.binary(min_size=4, max_size=4)) + frame[4:]
    elif how == "length":
        frame = frame[:4] + draw(st.integers(0, 2**32 - 1)).to_bytes(4, "big") + frame[8:]
    elif how == "cut":
        frame = frame[:draw(st.integers(1, len(frame) - 1))]
    elif how == "fields":
        body = b"\0".join(draw(st.lists(_env_bytes, max_size=9)))
        frame = frame[:4] + len(body).to_bytes(4, "big") + body
    elif how == "empty":
        frame = frame[:4] + bytes(4)
    return frame


def _complete(frame: bytes) -> bool:
    """Whether the server has all it waits for (else the client ends its side)."""
    return (len(frame) >= 8 and frame[:4] in (p.REQUEST_MAGIC, p.LEGACY_REQUEST_MAGIC)
            and 8 + int.from_bytes(frame[4:8], "big") <= len(frame))


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_the_server_answers_any_frame(pod_netns, fuzzed_node, data):
    from cni.server import _serve_connection

    frame = data.draw(frames(pod_netns))
    send_fd = data.draw(st.booleans())
    client, server = socket.socketpair()
    worker = threading.Thread(target=_serve_connection, args=(server, fuzzed_node.service))
    with client, server, open(pod_netns, "rb") as netns:
        worker.start()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      netns.fileno().to_bytes(4, "little"))] if send_fd else []
        client.sendmsg([frame], ancillary)
        if not _complete(frame):
            client.shutdown(socket.SHUT_WR)
        header = b""
        while len(header) < 12 and (chunk := client.recv(12 - len(header))):
            header += chunk
        exit_code, length = p.decode_response_header(header)
        stdout = b""
        while len(stdout) < length and (chunk := client.recv(length - len(stdout))):
            stdout += chunk
        if _complete(frame):
            client.send(p.ACK)
        worker.join(30)
    assert not worker.is_alive()
    answer = assert_spec_answer(exit_code, stdout)
    if exit_code == 0 and answer is not None and "ips" in answer:
        fields, _ = p.decode_request(frame[8:])
        fuzzed_node.clean_up({key: fields[name].encode("utf-8", "surrogateescape")
                              for name, key in zip(p.REQUEST_FIELDS, plugin.REQUEST_ENV,
                                                   strict=True)})
    fuzzed_node.assert_nothing_left()


# --- the service, fields of any type ---------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(raw=st.fixed_dictionaries({
    "command": _mostly(_COMMANDS),
    "containerID": _mostly(st.sampled_from(["ctr1", "ctr2"])),
    "ifname": _mostly(st.sampled_from(["eth0", "net1"])),
    "netns": _mostly(st.just("/run/netns/x")),
    "args": _mostly(st.just("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")),
    "stdin": _mostly(st.builds(json.dumps, configs())),
}, optional={"path": json_values}), with_fd=st.booleans())
def test_the_service_answers_fields_of_any_type(fuzzed_node, pod_netns, raw, with_fd):
    fd = os.open(pod_netns, os.O_RDONLY) if with_fd else None
    try:
        code, stdout = fuzzed_node.service.handle(raw, fd)
    finally:
        if fd is not None:
            os.close(fd)
    answer = assert_spec_answer(code, stdout.encode())
    if code == 0 and answer is not None and "ips" in answer:
        fuzzed_node.service.handle({**raw, "command": "DEL"})
    fuzzed_node.assert_nothing_left()
