"""The plugin binary as a runtime runs it: a subprocess with CNI env vars and stdin.

The agent is faked by a unix socket served from a thread of the test, so these tests need
no root; what the shim sends (including the namespace file descriptor) is recorded.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import plugin as plugin_module
from cni import protocol as p
from cni.install import install_plugin


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    return install_plugin(tmp_path_factory.mktemp("bin"))


@dataclass
class FakeAgent:
    """Answers each connection with `answer(request)`: bytes to send, or None to hang up."""

    path: Path
    answer: Callable[[dict[str, Any]], bytes | None]
    requests: list[dict[str, Any]] = field(default_factory=list)
    fd_inodes: list[list[int]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    after_reply: Callable[[bytes], None] | None = None
    """Given what the shim sends after the reply (its acknowledgement), if set."""

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(16))
                fds = array.array("i")
                for level, kind, cdata in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(cdata)
                inodes = [os.fstat(fd).st_ino for fd in fds]
                for fd in fds:
                    os.close(fd)
                while len(data) < 8 or len(data) < 8 + int.from_bytes(data[4:8], "big"):
                    data += conn.recv(1 << 20)
                assert data[:4] == p.REQUEST_MAGIC
                fields, stdin = p.decode_request(data[8:])
                request = {**fields, "stdin": stdin.decode()}
                self.requests.append(request)
                self.fd_inodes.append(inodes)
                reply = self.answer(request)
                if reply is None:
                    self.release.wait(10)
                    continue
                conn.sendall(reply)
                if self.after_reply is not None:
                    self.after_reply(conn.recv(16))


@pytest.fixture
def fake_agent(tmp_path) -> Iterator[Callable[..., FakeAgent]]:
    listeners: list[socket.socket] = []
    agents: list[FakeAgent] = []

    def start(answer: Callable[[dict[str, Any]], bytes | None]) -> FakeAgent:
        agent = FakeAgent(tmp_path / f"agent{len(agents)}.sock", answer)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(agent.path))
        listener.listen(8)
        listeners.append(listener)
        agents.append(agent)
        threading.Thread(target=agent.serve, args=(listener,), daemon=True).start()
        return agent

    yield start
    for agent in agents:
        agent.release.set()
    for listener in listeners:
        listener.close()


def ok(stdout: str, exit_code: int = 0) -> Callable[[dict[str, Any]], bytes]:
    return lambda request: p.encode_response(exit_code, stdout)


def call(plugin: Path, env: dict[str, str], stdin: bytes | str) -> tuple[int, dict | None, str]:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run([str(plugin)], input=data, env=env, capture_output=True, timeout=30)
    out = proc.stdout.decode()
    return proc.returncode, (json.loads(out) if out.strip() else None), out


def conf(socket_path: Path | str = "/run/mgt-cni-nonexistent.sock", version: str = "1.0.0",
         **extra: Any) -> str:
    return json.dumps({"cniVersion": version, "name": "n", "type": "meshgress-cni",
                       "socket": str(socket_path), **extra})


def env(command: str = "ADD", **overrides: str) -> dict[str, str]:
    base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/proc/self/ns/net",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# --- answered by the shim itself ------------------------------------------------------


def test_version_is_answered_locally(plugin):
    code, out, _ = call(plugin, {"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert code == 0
    assert out == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize(
    ("environment", "stdin", "code"),
    [
        ({"CNI_CONTAINERID": "c"}, conf(), p.ERR_INVALID_ENV),
        (env("FLY"), conf(), p.ERR_INVALID_ENV),
        (env(CNI_CONTAINERID=None), conf(), p.ERR_INVALID_ENV),
        (env(CNI_NETNS=""), conf(), p.ERR_INVALID_ENV),
        (env(CNI_IFNAME="way-too-long-ifname"), conf(), p.ERR_INVALID_ENV),
        (env(CNI_CONTAINERID="-bad"), conf(), p.ERR_INVALID_ENV),
        (env(CNI_ARGS="K8S_POD_NAME"), conf(), p.ERR_INVALID_ENV),
        (env(), "{not json", p.ERR_DECODE),
        (env(), b"\xff\xfe", p.ERR_DECODE),
        (env(), "", p.ERR_DECODE),
        (env(), "[1, 2]", p.ERR_INVALID_CONFIG),
        (env(), '{"name": "n"}', p.ERR_INVALID_CONFIG),
        (env(), conf(socket_path="relative.sock"), p.ERR_INVALID_CONFIG),
        (env(), conf(timeout=-1), p.ERR_INVALID_CONFIG),
        (env(), conf(version="0.3.1"), p.ERR_INCOMPATIBLE_VERSION),
        (env("GC"), conf(version="1.0.0"), p.ERR_INCOMPATIBLE_VERSION),
        (env(CNI_NETNS="/run/netns/mgt-cni-no-such-ns"), conf(), p.ERR_UNKNOWN_CONTAINER),
        (env(), conf(), p.ERR_TRY_AGAIN_LATER),
        (env("DEL", CNI_NETNS=""), conf(), p.ERR_TRY_AGAIN_LATER),
        (env("STATUS"), conf(version="1.1.0"), p.ERR_NOT_AVAILABLE),
    ],
    ids=["no CNI_COMMAND", "unknown command", "no container id", "ADD without netns",
         "ifname too long", "bad container id", "bad CNI_ARGS", "bad json", "not utf-8",
         "empty stdin", "config not an object", "no cniVersion", "relative socket",
         "negative timeout", "version too old", "GC needs 1.1", "netns gone",
         "agent unreachable", "DEL with agent unreachable", "STATUS with agent unreachable"],
)
def test_error_codes(plugin, environment, stdin, code):
    exit_code, out, raw = call(plugin, environment, stdin)
    assert exit_code != 0
    assert out is not None, raw
    assert out["code"] == code
    assert set(out) == {"cniVersion", "code", "msg", "details"}
    assert out["msg"]


def test_errors_echo_the_requested_version(plugin):
    _, out, _ = call(plugin, env(), conf(version="0.3.1"))
    assert out["cniVersion"] == "0.3.1"
    _, out, _ = call(plugin, env(), conf(version="0.4.0"))
    assert (out["cniVersion"], out["code"]) == ("0.4.0", p.ERR_TRY_AGAIN_LATER)


# --- talking to the agent ---------------------------------------------------------------


def test_request_carries_env_config_and_the_namespace_fd(plugin, fake_agent, tmp_path):
    netns_file = tmp_path / "fake-netns"
    netns_file.write_text("")
    agent = fake_agent(ok('{"cniVersion": "1.0.0"}'))
    stdin = conf(agent.path)
    code, out, _ = call(plugin, env(CNI_NETNS=str(netns_file)), stdin)
    assert (code, out) == (0, {"cniVersion": "1.0.0"})
    (request,) = agent.requests
    assert request == {"command": "ADD", "containerID": "ctr1", "ifname": "eth0",
                       "netns": str(netns_file), "args": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
                       "path": "/usr/lib/cni", "stdin": stdin}
    assert agent.fd_inodes == [[netns_file.stat().st_ino]]


def test_del_sends_no_namespace(plugin, fake_agent):
    agent = fake_agent(ok(""))
    code, out, raw = call(plugin, env("DEL", CNI_NETNS="/run/netns/gone-already"),
                          conf(agent.path))
    assert (code, out, raw) == (0, None, "")
    assert agent.fd_inodes == [[]]


def test_agent_errors_are_printed_verbatim(plugin, fake_agent):
    error = p.CniError(p.ERR_IPAM_EXHAUSTED, "pod CIDR 198.18.0.0/30 is exhausted").to_json("1.0.0")
    agent = fake_agent(ok(error, exit_code=1))
    code, out, _ = call(plugin, env(), conf(agent.path))
    assert code == 1
    assert out == json.loads(error)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (lambda request: None, p.ERR_TRY_AGAIN_LATER),
        (lambda request: b"\x00\x00\x00\x05{bad}", p.ERR_AGENT_PROTOCOL),
        (lambda request: b"\x00\x00\x00\x0d" + b'{"exit": 0}', p.ERR_AGENT_PROTOCOL),
        (lambda request: p.RESPONSE_MAGIC + (256).to_bytes(4, "big") + bytes(4),
         p.ERR_AGENT_PROTOCOL),
        (lambda request: p.encode_response(0, "{}")[:-1], p.ERR_AGENT_PROTOCOL),
        (lambda request: p.encode_response(0, "{}") * 2, p.ERR_AGENT_PROTOCOL),
        (lambda request: b"", p.ERR_TRY_AGAIN_LATER),
    ],
    ids=["agent hangs", "garbage frame", "an answer in JSON", "bad exit status",
         "answer cut short", "two answers", "hangs up"],
)
def test_a_misbehaving_agent(plugin, fake_agent, answer, code):
    agent = fake_agent(answer)
    exit_code, out, _ = call(plugin, env(), conf(agent.path, timeout=0.5))
    assert exit_code != 0
    assert out["code"] == code


def test_the_shim_is_one_module_that_imports_only_builtins():
    """The binary's start-up cost is the interpreter's: nothing but built-in modules."""
    source = Path(__file__).resolve().parents[2] / "cni" / "plugin.py"
    probe = ("import sys; base = set(sys.modules); path = sys.argv[1]; "
             "exec(compile(open(path).read(), path, 'exec'), {'__name__': 'probe'}); "
             "print(' '.join(sorted(set(sys.modules) - base)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(source)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert set(out) <= {"_socket"}, out


def test_the_happy_path_loads_no_json_decoder(plugin, fake_agent):
    """A good ADD is forwarded as raw bytes: `_json` (a shared object) is never loaded."""
    agent = fake_agent(ok('{"cniVersion": "1.0.0"}'))
    python = plugin.read_text().splitlines()[0][2:].split()[0]
    proc = subprocess.run([python, "-I", "-S", "-X", "importtime", str(plugin)],
                          input=conf(agent.path).encode(), env=env(), capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.decode().splitlines()}
    assert "_socket" in imported
    assert "_json" not in imported and "json" not in imported


# --- the quick scan for the agent's address ---------------------------------------------

_KEYS = st.sampled_from(["socket", "timeout", "cniVersion", "name", "x"])
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100) | st.floats(-1, 100, allow_nan=False)
    | st.sampled_from(["/run/a.sock", "rel.sock", "", "socket", "a\"b", "c\\\\d", "{[", "/x:y,}"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(_KEYS | st.text(max_size=4), children, max_size=3),
    max_leaves=12,
)
_CONFIGS = st.dictionaries(_KEYS | st.text(max_size=4), _VALUES, max_size=6)


def _full_address(text: str) -> tuple[str, float] | None:
    try:
        return plugin_module.compute_agent_address(json.loads(text))
    except p.CniError:
        return None


@given(_CONFIGS, st.sampled_from([None, 0, 2]), st.booleans())
def test_the_quick_scan_agrees_with_a_decoder_or_gives_up(config, indent, compact):
    text = json.dumps(config, indent=indent, separators=(",", ":") if compact else None)
    quick = plugin_module.compute_quick_address(text.encode())
    assert quick is None or quick == _full_address(text), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"cniVersion": "1.0.0", "socket": "/run/s.sock", "timeout": 2.5}', ("/run/s.sock", 2.5)),
        ('{"plugins": [{"socket": "/nested"}], "name": "n"}', (p.DEFAULT_SOCKET, 30.0)),
        ('{"prevResult": {"timeout": 1}, "timeout": 4}', (p.DEFAULT_SOCKET, 4.0)),
        ('{"name": "socket", "x": ["timeout", "socket"]}', (p.DEFAULT_SOCKET, 30.0)),
        ('{"socket": "/a\\"b"}', None),
        ('{"socket": "relative"}', None),
        ('{"timeout": true}', None),
        ('{"timeout": -1}', None),
        ('[{"socket": "/a"}]', None),
    ],
    ids=["plain", "nested socket", "nested timeout", "keys as values", "escape", "relative",
         "bool timeout", "negative timeout", "not an object"],
)
def test_the_quick_scan(text, expected):
    assert plugin_module.compute_quick_address(text.encode()) == expected


# --- the agent validates what the shim forwards unchecked ---------------------------------


@pytest.fixture
def real_agent(tmp_path) -> Iterator[Path]:
    """The real server and service (kernel faked) on a unix socket: no root needed."""
    from cni.server import serve
    from cni.service import CniService
    from cni.wiring import FakeWiring

    path = tmp_path / "agent.sock"
    service = CniService(IPv4Network("198.18.0.0/24"), tmp_path / "state", wiring=FakeWiring())
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(path, service, stop), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield path
    stop.set()
    thread.join(10)


@pytest.mark.parametrize(
    ("environment", "config", "code"),
    [
        (env("FLY"), {}, p.ERR_INVALID_ENV),
        (env(CNI_IFNAME="way-too-long-ifname"), {}, p.ERR_INVALID_ENV),
        (env(CNI_CONTAINERID="-bad"), {}, p.ERR_INVALID_ENV),
        (env(CNI_ARGS="K8S_POD_NAME"), {"mtu": 1}, p.ERR_INVALID_ENV),
        (env("DEL", CNI_CONTAINERID=""), {}, p.ERR_INVALID_ENV),
        (env(), {"cniVersion": "0.3.1"}, p.ERR_INCOMPATIBLE_VERSION),
        (env("GC"), {}, p.ERR_INCOMPATIBLE_VERSION),
        (env(), {"cniVersion": None}, p.ERR_INVALID_CONFIG),
        (env(), {"mtu": 1}, p.ERR_INVALID_CONFIG),
    ],
    ids=["unknown command", "ifname too long", "bad container id", "bad CNI_ARGS before mtu",
         "DEL without container id", "version too old", "GC needs 1.1", "no cniVersion",
         "bad mtu"],
)
def test_a_reachable_agent_reports_what_the_shim_would(plugin, real_agent, environment,
                                                       config, code):
    settings = {"cniVersion": "1.0.0", "name": "n", "type": "meshgress-cni",
                "socket": str(real_agent), **config}
    stdin = json.dumps({k: v for k, v in settings.items() if v is not None})
    exit_code, out, raw = call(plugin, environment, stdin)
    assert exit_code == 1, raw
    assert out["code"] == code, out
    # The same invocation with the agent down: the shim's own validation agrees (it does
    # not know the agent's own keys, such as mtu: "try again later" then, as always).
    _, local, _ = call(plugin, environment, stdin.replace(str(real_agent), "/run/mgt-none"))
    agent_only = "mtu" in config and environment.get("CNI_ARGS") == env()["CNI_ARGS"]
    assert local["code"] == (p.ERR_TRY_AGAIN_LATER if agent_only else code), local


def test_invalid_json_the_quick_scan_lets_through_is_rejected_by_the_agent(plugin, real_agent):
    stdin = '{"cniVersion": "1.0.0", "socket": "' + str(real_agent) + '", "mtu": }'
    assert plugin_module.compute_quick_address(stdin.encode()) is not None
    exit_code, out, _ = call(plugin, env(), stdin)
    assert (exit_code, out["code"]) == (1, p.ERR_DECODE)


def test_an_add_through_the_real_server(plugin, real_agent, tmp_path):
    netns = tmp_path / "pod-netns"  # the fake kernel's stand-in for a pod's namespace
    netns.touch()
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshgress-cni",
                        "socket": str(real_agent)})
    exit_code, out, _ = call(plugin, env(CNI_NETNS=str(netns)), stdin)
    assert exit_code == 0
    assert out["ips"][0]["address"] == "198.18.0.1/32"
    exit_code, out, raw = call(plugin, env("DEL"), stdin)
    assert (exit_code, raw) == (0, "")


def test_the_agents_own_namespace_is_refused_as_a_pods(plugin, real_agent):
    """The shim runs on the node: /proc/self/ns/net is the node's network namespace."""
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshgress-cni",
                        "socket": str(real_agent)})
    exit_code, out, _ = call(plugin, env(CNI_NETNS="/proc/self/ns/net"), stdin)
    assert (exit_code, out["code"]) == (1, p.ERR_INVALID_ENV)
    assert "node's own network namespace" in out["msg"]


# --- hostile input: every answer is the spec's error object, with a code that says why ------


def _conf_for(agent: Path, **extra: Any) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "meshgress-cni",
                       "socket": str(agent), **extra})


@pytest.mark.parametrize(
    "case",
    [
        (lambda agent: _conf_for(agent)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
         {}, p.ERR_DECODE),
        (lambda agent: _conf_for(agent)[:-1] + ', "x": ' + "[" * 65 + "]" * 65 + "}",
         {}, p.ERR_DECODE),
        (lambda agent: _conf_for(agent) + " " * (17 * 1024 * 1024), {}, p.ERR_INVALID_CONFIG),
        (lambda agent: _conf_for(agent) + " " * p.MAX_CONFIG, {}, p.ERR_INVALID_CONFIG),
        (lambda agent: _conf_for(agent), {"CNI_ARGS": "K8S_POD_NAME=" + "p" * 100_000},
         p.ERR_INVALID_ENV),
        (lambda agent: _conf_for(agent), {"CNI_CONTAINERID": "c" * 100_000}, p.ERR_INVALID_ENV),
        (lambda agent: _conf_for(agent), {"CNI_NETNS": "/" * 5000}, p.ERR_INVALID_ENV),
        (lambda agent: _conf_for(agent, dns="10.96.0.10"), {}, p.ERR_INVALID_CONFIG),
        (lambda agent: _conf_for(agent, prevResult={"interfaces": 5}), {},
         p.ERR_INVALID_CONFIG),
        (lambda agent: _conf_for(agent, mtu="1500"), {}, p.ERR_INVALID_CONFIG),
    ],
    ids=["nested 100000 deep", "nested 66 deep", "17 MiB", "just over the config limit",
         "100 KB pod name", "100 KB container id", "netns path too long", "dns a string",
         "prevResult interfaces a number", "mtu a string"],
)
def test_hostile_input_gets_a_clear_non_retryable_error(plugin, real_agent, tmp_path, case):
    """Deep nesting used to end in a traceback (shim) or a dropped connection (agent:
    "agent not reachable", 11); a frame over the agent's limit in 11 too."""
    make_stdin, environment, code = case
    netns = tmp_path / "pod-netns"
    netns.touch()
    exit_code, out, raw = call(plugin, env(**{"CNI_NETNS": str(netns), **environment}),
                               make_stdin(real_agent))
    assert exit_code == 1, raw
    assert out is not None and set(out) == {"cniVersion", "code", "msg", "details"}, raw
    assert out["code"] == code, out


def test_the_shim_acknowledges_the_answer_once_it_is_on_stdout(plugin, fake_agent, tmp_path):
    """Killed between the two, the shim has failed for the runtime and for the agent. Its
    stdout is a full pipe here, so the answer cannot be written until the test reads: no
    acknowledgement may come before that."""
    acknowledged = threading.Event()
    sent: list[bytes] = []
    agent = fake_agent(ok('{"cniVersion": "1.0.0"}'))
    agent.after_reply = lambda data: (sent.append(data), acknowledged.set())
    netns = tmp_path / "pod-netns"
    netns.touch()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += os.write(write_end, b"x" * 4096)
    os.set_blocking(write_end, True)
    shim = subprocess.Popen([str(plugin)], stdin=subprocess.PIPE, stdout=write_end,
                            env=env(CNI_NETNS=str(netns)))
    os.close(write_end)
    try:
        assert shim.stdin is not None
        shim.stdin.write(conf(agent.path).encode())
        shim.stdin.close()
        assert not acknowledged.wait(1.0), "acknowledged before the answer was written"
        with os.fdopen(read_end, "rb") as output:
            data = output.read()
        assert acknowledged.wait(10)
        assert shim.wait(10) == 0
    finally:
        if shim.poll() is None:
            shim.kill()
            shim.wait()
    assert json.loads(data[filler:]) == {"cniVersion": "1.0.0"}
    assert sent == [p.ACK]
