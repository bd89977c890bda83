"""The `meshgress-cni` plugin binary: a shim between the container runtime and the agent.

The runtime executes a CNI plugin once per pod operation, so this process must start in
milliseconds and must not need anything the node may lack. It therefore imports only the
standard library's C-level modules (`posix`, `_socket`, via `cni.protocol` `_json`) and does
the least work that cannot be delegated:

- answers VERSION itself;
- validates the environment (code 4), decodes the network configuration (6, 7) and checks
  the spec version (1), so a broken invocation gets the right code even when the agent is
  down;
- opens the container's network namespace (3 if it is gone) and passes the open file
  descriptor to the agent over the unix socket (SCM_RIGHTS), so the agent never resolves
  the runtime's path in its own mount namespace;
- forwards the request, waits (with a timeout), prints the agent's answer verbatim and
  exits with the agent's status. An unreachable agent is "try again later" (11), or
  "plugin not available" (50) for STATUS.

Network configuration keys read here: `socket` (agent socket path, default
/run/meshgress/cni.sock) and `timeout` (seconds, default 30).
"""

import _socket
import posix
import sys

from cni import protocol as p

_NETNS_COMMANDS = ("ADD", "CHECK")
_RECV_CHUNK = 65536


def _environ() -> dict[str, str]:
    """The CNI variables of the process environment, decoded like os.environ does."""
    return {
        key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
        for key, value in posix.environ.items()
        if key.startswith(b"CNI_")
    }


def _decode_config(stdin: bytes) -> dict[str, object]:
    try:
        text = stdin.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise p.CniError(p.ERR_DECODE, "network configuration is not UTF-8", str(exc)) from None
    try:
        config = p.loads(text)
    except ValueError as exc:
        raise p.CniError(
            p.ERR_DECODE, "failed to decode the network configuration", str(exc)
        ) from None
    if not isinstance(config, dict):
        raise p.CniError(p.ERR_INVALID_CONFIG, "network configuration is not a JSON object")
    return config


def compute_request(command: str, env: dict[str, str], stdin: str) -> dict[str, str]:
    """Validate the environment for `command` and build the request for the agent."""
    for name in p.REQUIRED_ENV[command]:
        if not env.get(name):
            raise p.CniError(p.ERR_INVALID_ENV, f"{name} must be set for {command}")
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    if container_id or command in ("ADD", "CHECK", "DEL"):
        p.check_container_id(container_id)
    if ifname or command in ("ADD", "CHECK", "DEL"):
        p.check_ifname(ifname)
    args = env.get("CNI_ARGS", "")
    p.parse_cni_args(args)
    return {
        "command": command,
        "containerID": container_id,
        "ifname": ifname,
        "netns": env.get("CNI_NETNS", ""),
        "args": args,
        "path": env.get("CNI_PATH", ""),
        "stdin": stdin,
    }


def compute_agent_address(config: dict[str, object]) -> tuple[str, float]:
    """The agent's socket path and the shim's timeout from the network configuration."""
    path = config.get("socket", p.DEFAULT_SOCKET)
    if not isinstance(path, str) or not path.startswith("/"):
        raise p.CniError(p.ERR_INVALID_CONFIG, f"'socket' must be an absolute path, not {path!r}")
    timeout = config.get("timeout", p.DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise p.CniError(
            p.ERR_INVALID_CONFIG, f"'timeout' must be a positive number of seconds, not {timeout!r}"
        )
    return path, float(timeout)


def _open_netns(path: str) -> int:
    try:
        return posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        raise p.CniError(
            p.ERR_UNKNOWN_CONTAINER, f"network namespace {path} does not exist"
        ) from None
    except OSError as exc:
        raise p.CniError(p.ERR_IO, f"cannot open network namespace {path}", str(exc)) from None


def _unreachable(command: str, path: str, reason: str) -> p.CniError:
    if command == "STATUS":
        return p.CniError(p.ERR_NOT_AVAILABLE, f"meshgress agent not reachable at {path}", reason)
    return p.CniError(p.ERR_TRY_AGAIN_LATER, f"meshgress agent not reachable at {path}", reason)


def _recv_exactly(sock: _socket.socket, length: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = sock.recv(min(length, _RECV_CHUNK))
        if not chunk:
            raise ConnectionError("agent closed the connection before answering")
        chunks.append(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def call_agent(
    path: str, timeout: float, request: dict[str, str], netns_fd: int | None
) -> tuple[int, str]:
    """Send one request (with the namespace fd, if any) and return (exit code, stdout)."""
    command = request["command"]
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise _unreachable(command, path, str(exc)) from None
        try:
            frame = p.encode_frame(request)
            if netns_fd is None:
                sock.sendall(frame)
            else:
                fds = netns_fd.to_bytes(4, sys.byteorder, signed=True)
                sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
                if sent < len(frame):  # sendall(b"") would still send, and may hit EPIPE
                    sock.sendall(frame[sent:])
            body = _recv_exactly(sock, p.frame_length(_recv_exactly(sock, 4)))
        except TimeoutError:
            raise p.CniError(
                p.ERR_TRY_AGAIN_LATER, f"meshgress agent did not answer within {timeout:g}s"
            ) from None
        except ValueError as exc:
            raise p.CniError(p.ERR_AGENT_PROTOCOL, "bad answer from the agent", str(exc)) from None
        except OSError as exc:
            raise _unreachable(command, path, str(exc)) from None
    finally:
        sock.close()
    try:
        response = p.loads(body.decode())
    except ValueError as exc:
        raise p.CniError(p.ERR_AGENT_PROTOCOL, "bad answer from the agent", str(exc)) from None
    if (
        not isinstance(response, dict)
        or not isinstance(response.get("exit"), int)
        or not isinstance(response.get("stdout"), str)
    ):
        raise p.CniError(p.ERR_AGENT_PROTOCOL, "bad answer from the agent", repr(response)[:200])
    return response["exit"], response["stdout"]


def run(env: dict[str, str], stdin: bytes) -> tuple[int, str]:
    """One plugin invocation: (exit code, text for stdout)."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, p.compute_version_json()
    version = p.LATEST_VERSION
    try:
        config: dict[str, object] | None = None
        decode_error: p.CniError | None = None
        try:
            config = _decode_config(stdin)
        except p.CniError as exc:
            decode_error = exc
        if config is not None and isinstance(config.get("cniVersion"), str):
            version = str(config["cniVersion"])
        if command not in p.COMMANDS:
            raise p.CniError(
                p.ERR_INVALID_ENV,
                f"CNI_COMMAND {command!r} is not one of " + ", ".join(p.COMMANDS),
            )
        if decode_error is not None or config is None:
            raise decode_error or p.CniError(p.ERR_DECODE, "no network configuration")
        p.check_version(command, config.get("cniVersion"))
        request = compute_request(command, env, stdin.decode())
        path, timeout = compute_agent_address(config)
        netns_fd = _open_netns(request["netns"]) if command in _NETNS_COMMANDS else None
        try:
            return call_agent(path, timeout, request, netns_fd)
        finally:
            if netns_fd is not None:
                posix.close(netns_fd)
    except p.CniError as exc:
        return 1, exc.to_json(version)


def main() -> int:
    code, output = run(_environ(), sys.stdin.buffer.read())
    if output:
        sys.stdout.write(output)
        if not output.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
    return code


def run_and_exit() -> None:
    """The installed launcher's entry: `main`, then exit without finalising the interpreter.

    Finalisation costs ~2 ms per invocation and has nothing to do here: the socket and the
    namespace fd are closed by then and stdout is flushed explicitly.
    """
    code = main()
    sys.stdout.flush()
    posix._exit(code)


if __name__ == "__main__":
    sys.exit(main())
