"""The `meshgress-cni` plugin binary: a shim between the container runtime and the agent.

The runtime executes a CNI plugin once per pod operation, so this process must start in
milliseconds and must not need anything the node may lack. Starting the interpreter is
most of its cost (~10 ms on a small VM); everything here is arranged to add as little as
possible to that:

- it is one flat module that imports nothing but the interpreter's built-in `posix`,
  `_socket` and `sys` on the happy path (no `cni` package, no `json`, not even `_json`,
  whose shared object costs ~0.4 ms to load), so `cni.install` can install it as a single
  pre-compiled file. It is therefore also the one definition of what the shim and the
  agent agree on (error codes, versions, the spec's syntax rules, the wire format);
  `cni.protocol` re-exports it for the agent;
- it answers VERSION itself;
- for the other commands it does not decode the network configuration: it finds the two
  keys it needs (`socket`, `timeout`) with a scan that gives up on anything unusual
  (`compute_quick_address`), opens the container's network namespace, passes the open
  file descriptor to the agent over the unix socket (SCM_RIGHTS: the agent never resolves
  the runtime's path in its own mount namespace), sends the raw environment and stdin
  bytes in a trivial binary frame, waits (blocking socket with SO_RCVTIMEO/SO_SNDTIMEO),
  acknowledges the answer, writes it verbatim and exits with the agent's status. The agent
  validates the request, with the same codes;
- when anything goes wrong locally (no quick answer, the namespace cannot be opened, the
  agent cannot be reached or answers nonsense), it validates the invocation fully, as the
  agent would, before reporting: a broken invocation gets its own code (4 environment,
  6 decode, 7 configuration, 1 version) even when the agent is down; only a valid one gets
  "try again later" (11), "plugin not available" (50) for STATUS, 3 for a namespace that
  is gone or 106 for an answer it cannot understand. Whatever the input, the answer is
  the spec's error object: sizes and JSON nesting are bounded (`MAX_CONFIG`,
  `MAX_ENV_VALUE`, `MAX_JSON_DEPTH`) before anything decodes or sends them.

Wire format, one request and one response per connection (integers big-endian):

  request:  REQUEST_MAGIC, u32 body length, body = the values of CNI_COMMAND,
            CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS, CNI_ARGS and CNI_PATH, each followed by
            a NUL byte (environment values cannot contain one), then stdin as given
  response: RESPONSE_MAGIC, u32 exit status, u32 length, that many bytes for stdout
  then:     ACK, one byte from the shim once it holds the whole response

The acknowledgement is what lets an ADD be all or nothing for the runtime: the agent
keeps a successful ADD only if the shim acknowledged its answer, and undoes it when the
shim hung up first (its timeout passed while the agent was stalled, or the runtime killed
it): whatever the runtime hears, the node agrees. A shim acknowledges every answer; the
agent waits for it only where it matters. The agent still serves shims of the previous
request version (`LEGACY_REQUEST_MAGIC`: the same frame, no acknowledgement), so a shim
installed before an upgrade keeps working. An agent that predates the acknowledgement
rejects this shim's requests ("bad request", 6, naming the request's first bytes): the
shim is installed with its agent (`cni.install`, run before the agent starts), so the two
meet only if an old agent still runs after a new shim was installed.

Network configuration keys read here: `socket` (agent socket path, default
/run/meshgress/cni.sock) and `timeout` (seconds, default 30).
"""

import _socket
import posix
import sys

# --- CNI spec 1.1 well-known error codes -------------------------------------------------
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_NOT_AVAILABLE = 50
ERR_NOT_AVAILABLE_LIMITED = 51

# --- meshgress's own codes (the spec leaves 100+ to plugins) -----------------------------
ERR_IPAM_EXHAUSTED = 100
"""Every usable address of the node's pod CIDR is allocated."""
ERR_WIRING = 101
"""The kernel refused a step of the pod's wiring (veth, address, route, sysctl)."""
ERR_CHECK_FAILED = 102
"""CHECK found the attachment differs from what ADD built."""
ERR_HOOK_FAILED = 103
"""The agent's pod-ready hook (egress steering) failed; ADD was undone."""
ERR_ANTISPOOF_UNAVAILABLE = 104
"""Strict reverse-path filtering cannot be guaranteed on this node."""
ERR_IFNAME_IN_USE = 105
"""CNI_IFNAME already exists in the container's network namespace."""
ERR_AGENT_PROTOCOL = 106
"""The agent answered something the shim cannot understand."""
ERR_INTERNAL = 107
"""An unexpected failure inside the agent (or the plugin); the message says what."""

# --- versions and commands ---------------------------------------------------------------
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
COMMANDS_SINCE_1_1 = ("GC", "STATUS")
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}
VERSION_JSON = (
    f'{{"cniVersion": "{LATEST_VERSION}", "supportedVersions": ["'
    + '", "'.join(SUPPORTED_VERSIONS)
    + '"]}'
)
"""The VERSION answer, as `json.dumps` would write it."""

DEFAULT_SOCKET = "/run/meshgress/cni.sock"
DEFAULT_TIMEOUT = 30.0
"""Seconds the shim waits for the agent (ADD includes the pod-ready hook)."""
MAX_FRAME = 16 * 1024 * 1024
"""The largest request body or response the other side accepts."""
MAX_CONFIG = 8 * 1024 * 1024
"""The largest network configuration (stdin) accepted: far above any real one (a few KiB,
with a prevResult), and with six environment values of at most MAX_ENV_VALUE it still
fits a frame."""
MAX_ENV_VALUE = 128 * 1024
"""The largest CNI_* value accepted: Linux's own limit for one environment string."""
MAX_CONTAINER_ID = 1024
"""Runtimes use 64 hex characters; the spec sets no limit, the allocation record needs one."""
MAX_NETNS_PATH = 4095
"""PATH_MAX without the terminating NUL."""
MAX_POD_NAME = 253
"""K8S_POD_NAMESPACE and K8S_POD_NAME: Kubernetes' longest object name."""
MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects accepted in a network configuration (real
ones nest about 5 deep): JSON decoders and encoders recurse, and Python's would otherwise
fail with RecursionError somewhere near 1000, possibly only while the answer is encoded."""
IFNAMSIZ = 16

# --- wire format -------------------------------------------------------------------------
REQUEST_MAGIC = b"MGC\x03"
"""Starts every request of a shim that acknowledges the answer (see the module docstring)."""
LEGACY_REQUEST_MAGIC = b"MGC\x02"
"""The same request from a shim that does not acknowledge (installed before this version)."""
RESPONSE_MAGIC = b"MGC\x82"
ACK = b"\x06"
"""What the shim sends once it holds the whole response."""
REQUEST_FIELDS = ("command", "containerID", "ifname", "netns", "args", "path")
REQUEST_ENV = (b"CNI_COMMAND", b"CNI_CONTAINERID", b"CNI_IFNAME", b"CNI_NETNS", b"CNI_ARGS",
               b"CNI_PATH")
"""The environment variable each of REQUEST_FIELDS carries, in frame order."""

_NETNS_COMMANDS = (b"ADD", b"CHECK")
_AGENT_COMMANDS = (b"ADD", b"DEL", b"CHECK", b"GC", b"STATUS")
_READ_SIZE = 8192
"""Small reads: a 64 KiB buffer costs more in page faults (~0.1 ms) than a second read."""
_NUMBER_CHARS = frozenset("0123456789.eE+-")


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> str:
        return compute_error_json(cni_version, self.code, self.msg, self.details)


def compute_error_json(cni_version: str, code: int, msg: str, details: str = "") -> str:
    """The spec's error object as text (as `json.dumps` would write it)."""
    from _json import encode_basestring_ascii as quote  # noqa: PLC0415 (error paths only)

    return (f'{{"cniVersion": {quote(cni_version)}, "code": {int(code)}, '
            f'"msg": {quote(msg)}, "details": {quote(details)}}}')


def parse_version(text: object) -> tuple[int, int, int] | None:
    """'1.0.0' -> (1, 0, 0); anything that is not three dot-separated numbers -> None."""
    if not isinstance(text, str):
        return None
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def check_version(command: str, cni_version: object) -> str:
    """Return the configuration's cniVersion if this plugin speaks it for `command`."""
    if not isinstance(cni_version, str) or not cni_version:
        raise CniError(ERR_INVALID_CONFIG, "network configuration has no cniVersion")
    if cni_version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {cni_version}",
            "supported versions: " + ", ".join(SUPPORTED_VERSIONS),
        )
    version = parse_version(cni_version)
    if command in COMMANDS_SINCE_1_1 and version is not None and version < (1, 1, 0):
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"{command} needs cniVersion 1.1.0 or later, configuration says {cni_version}",
        )
    return cni_version


def parse_cni_args(text: str) -> dict[str, str]:
    """Parse CNI_ARGS ('K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p') into a dict.

    Empty segments are ignored; a segment without '=' or with an empty key is an invalid
    environment variable (code 4). Values may contain '='.
    """
    result: dict[str, str] = {}
    for segment in text.split(";"):
        if not segment:
            continue
        key, sep, value = segment.partition("=")
        if not sep or not key:
            raise CniError(ERR_INVALID_ENV, f"CNI_ARGS: invalid pair {segment!r}")
        result[key] = value
    return result


def check_container_id(value: str) -> str:
    """The spec's rule: alphanumeric first, then alphanumerics, '_', '.' or '-'; at most
    MAX_CONTAINER_ID characters."""
    if not value:
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is empty")
    if len(value) > MAX_CONTAINER_ID:
        raise CniError(ERR_INVALID_ENV,
                       f"CNI_CONTAINERID is {len(value)} characters long, more than "
                       f"{MAX_CONTAINER_ID}")
    if not (value[0].isascii() and value[0].isalnum()) or not all(
        c.isascii() and (c.isalnum() or c in "_.-") for c in value
    ):
        raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID {value!r} has invalid characters")
    return value


def check_ifname(value: str) -> str:
    """A Linux interface name: 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'."""
    if not value:
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME is empty")
    try:
        encoded = value.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, as os.environ decodes them
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {value!r} is not UTF-8") from None
    if len(encoded) >= IFNAMSIZ:
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {value!r} is longer than 15 bytes")
    if value in (".", "..") or any(c in "/:" or c.isspace() for c in value):
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {value!r} is not a valid interface name")
    return value


def check_netns_path(value: str) -> str:
    """CNI_NETNS: a path no longer than PATH_MAX allows (empty is checked by REQUIRED_ENV)."""
    if len(value.encode("utf-8", "surrogateescape")) > MAX_NETNS_PATH:
        raise CniError(ERR_INVALID_ENV, f"CNI_NETNS is longer than {MAX_NETNS_PATH} bytes")
    return value


def check_pod_identity(args: dict[str, str]) -> None:
    """K8S_POD_NAMESPACE and K8S_POD_NAME, which the agent records: bounded in length.
    (Their syntax is the runtime's business: podman passes container names here.)"""
    for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
        if len(args.get(key, "")) > MAX_POD_NAME:
            raise CniError(ERR_INVALID_ENV,
                           f"CNI_ARGS: {key} is longer than {MAX_POD_NAME} characters")


def check_env_sizes(values: dict[str, str]) -> None:
    """Every CNI_* value within MAX_ENV_VALUE (a runtime cannot pass more on Linux)."""
    for name, value in values.items():
        size = len(value.encode("utf-8", "surrogateescape"))  # the bytes the runtime passed
        if size > MAX_ENV_VALUE:
            raise CniError(ERR_INVALID_ENV,
                           f"{name} is {size} bytes long, more than {MAX_ENV_VALUE}")


def check_json_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise CniError(ERR_DECODE) if arrays and objects nest deeper than `limit`.

    Iterative (the point is not to recurse) and only through containers."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise CniError(ERR_DECODE,
                           f"network configuration nests deeper than {limit} levels")
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, dict | list))


def check_config_size(stdin: bytes) -> None:
    if len(stdin) > MAX_CONFIG:
        raise CniError(ERR_INVALID_CONFIG,
                       f"network configuration is {len(stdin)} bytes, more than {MAX_CONFIG}")


# --- JSON without importing `json` (off the happy path) ----------------------------------


class _DecodeContext:
    """The attributes `_json.make_scanner` reads; mirrors json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return float(name)


_WHITESPACE = " \t\n\r"


def loads(text: str) -> object:
    """Decode one JSON document; raise ValueError with the position on bad input, and on
    nesting too deep for the decoder (which raises RecursionError)."""
    from _json import make_scanner  # noqa: PLC0415 (off the happy path)

    # typeshed types the context as a make_scanner; any object with these attributes works.
    scan = make_scanner(_DecodeContext())  # type: ignore[arg-type]
    try:
        obj, end = scan(text, len(text) - len(text.lstrip(_WHITESPACE)))
    except RecursionError:
        raise ValueError("JSON nested too deeply to decode") from None
    except Exception:  # the C scanner raises odd types on bad input; re-parse below
        obj, end = None, -1
    if end < 0 or text[end:].strip(_WHITESPACE):
        # Bad input only: the full decoder gives a precise message.
        import json  # noqa: PLC0415

        return json.loads(text)
    return obj


# --- wire format -------------------------------------------------------------------------


def encode_request(values: list[bytes], stdin: bytes) -> bytes:
    """The request frame: `values` in REQUEST_FIELDS order (no NUL bytes), then stdin."""
    body = b"\0".join(values) + b"\0" + stdin
    return REQUEST_MAGIC + len(body).to_bytes(4, "big") + body


def decode_request(body: bytes) -> tuple[dict[str, str], bytes]:
    """A request frame's body (after magic and length) -> (fields by name, stdin bytes)."""
    *values, stdin = body.split(b"\0", len(REQUEST_FIELDS))
    if len(values) != len(REQUEST_FIELDS):
        raise ValueError(f"request has {len(values)} of {len(REQUEST_FIELDS)} fields")
    fields = {
        name: value.decode("utf-8", "surrogateescape")
        for name, value in zip(REQUEST_FIELDS, values, strict=True)
    }
    return fields, stdin


def encode_response(exit_code: int, stdout: str) -> bytes:
    data = stdout.encode()
    return RESPONSE_MAGIC + exit_code.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data


def decode_response_header(header: bytes) -> tuple[int, int]:
    """The first 12 bytes of a response -> (exit status, stdout length)."""
    if header[:4] != RESPONSE_MAGIC:
        raise ValueError(f"not a meshgress-cni answer (an agent of another version?): "
                         f"{header[:12]!r}")
    exit_code = int.from_bytes(header[4:8], "big")
    length = int.from_bytes(header[8:12], "big")
    if exit_code > 255:
        raise ValueError(f"exit status {exit_code} out of range")
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return exit_code, length


# --- the shim ------------------------------------------------------------------------------


def compute_quick_address(stdin: bytes) -> tuple[str, float] | None:
    """The top-level `socket` and `timeout` of a plain configuration, without a decoder.

    Splitting on '"' alternates text outside and inside strings, as long as there is no
    backslash (no escaped quote); brace and bracket counts outside strings give each
    string's depth. A key is a depth-1 string preceded by '{' or ',' and followed by ':'.
    Anything unusual (a backslash, not UTF-8, not an object, a value that is not a plain
    absolute path or positive number) -> None, and the caller decodes the text properly.
    Invalid JSON this accepts is rejected by the agent, with the code the shim would give.
    """
    try:
        text = stdin.decode()
    except UnicodeDecodeError:
        return None
    if "\\" in text or not text.lstrip(_WHITESPACE).startswith("{"):
        return None
    parts = text.split('"')
    if len(parts) % 2 == 0:
        return None
    path, timeout = DEFAULT_SOCKET, DEFAULT_TIMEOUT
    depth = 0
    for i in range(1, len(parts) - 1, 2):
        before = parts[i - 1]
        depth += (before.count("{") + before.count("[")
                  - before.count("}") - before.count("]"))
        key = parts[i]
        if depth != 1 or key not in ("socket", "timeout"):
            continue
        after = parts[i + 1].strip(_WHITESPACE)
        if not after.startswith(":") or before.rstrip(_WHITESPACE)[-1:] not in ("{", ","):
            continue  # a value, not a key
        if key == "socket":
            if after != ":" or i + 2 >= len(parts):
                return None  # not a string
            path = parts[i + 2]
            if not path.startswith("/"):
                return None
        else:
            number = after[1:].split(",", 1)[0].split("}", 1)[0].strip(_WHITESPACE)
            if not number or not _NUMBER_CHARS.issuperset(number):
                return None
            try:
                timeout = float(number)
            except ValueError:
                return None
            if not timeout > 0:
                return None
    return path, timeout


def _decode_config(stdin: bytes) -> dict[str, object]:
    check_config_size(stdin)
    try:
        text = stdin.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CniError(ERR_DECODE, "network configuration is not UTF-8", str(exc)) from None
    try:
        config = loads(text)
    except ValueError as exc:
        raise CniError(ERR_DECODE, "failed to decode the network configuration", str(exc)) from None
    if not isinstance(config, dict):
        raise CniError(ERR_INVALID_CONFIG, "network configuration is not a JSON object")
    check_json_depth(config)
    return config


def compute_agent_address(config: dict[str, object]) -> tuple[str, float]:
    """The agent's socket path and the shim's timeout from the network configuration."""
    path = config.get("socket", DEFAULT_SOCKET)
    if not isinstance(path, str) or not path.startswith("/"):
        raise CniError(ERR_INVALID_CONFIG, f"'socket' must be an absolute path, not {path!r}")
    timeout = config.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise CniError(
            ERR_INVALID_CONFIG, f"'timeout' must be a positive number of seconds, not {timeout!r}"
        )
    return path, float(timeout)


def validate(env: dict[str, str], stdin: bytes) -> tuple[str, float]:
    """Check the invocation as the agent would; return the agent's address and timeout.

    The order decides which code a doubly broken invocation gets: command (4), decode (6,
    7: size, syntax, nesting), version (1, 7), environment (4), then the shim's own keys (7).
    """
    command = env.get("CNI_COMMAND", "")
    config: dict[str, object] | None = None
    decode_error: CniError | None = None
    try:
        config = _decode_config(stdin)
    except CniError as exc:
        decode_error = exc
    if command not in COMMANDS:
        raise CniError(
            ERR_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of " + ", ".join(COMMANDS)
        )
    if decode_error is not None or config is None:
        raise decode_error or CniError(ERR_DECODE, "no network configuration")
    check_version(command, config.get("cniVersion"))
    for name in REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(ERR_INVALID_ENV, f"{name} must be set for {command}")
    check_env_sizes({name.decode(): env.get(name.decode(), "") for name in REQUEST_ENV})
    container_id = env.get("CNI_CONTAINERID", "")
    ifname = env.get("CNI_IFNAME", "")
    if container_id or command in ("ADD", "CHECK", "DEL"):
        check_container_id(container_id)
    if ifname or command in ("ADD", "CHECK", "DEL"):
        check_ifname(ifname)
    check_netns_path(env.get("CNI_NETNS", ""))
    check_pod_identity(parse_cni_args(env.get("CNI_ARGS", "")))
    return compute_agent_address(config)


def requested_version(stdin: bytes) -> str:
    """The configuration's cniVersion, for error objects, even if the request is bad."""
    if len(stdin) > MAX_CONFIG:
        return LATEST_VERSION
    try:
        config = loads(stdin.decode())
    except ValueError:  # includes UnicodeDecodeError and nesting too deep
        return LATEST_VERSION
    version = config.get("cniVersion") if isinstance(config, dict) else None
    return version if isinstance(version, str) and version else LATEST_VERSION


def _text_environ(environ: dict[bytes, bytes]) -> dict[str, str]:
    """The CNI variables of the environment, decoded like os.environ does."""
    return {
        key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
        for key, value in environ.items()
        if key.startswith(b"CNI_")
    }


def _open_netns(path: bytes) -> int:
    try:
        return posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except FileNotFoundError:
        raise CniError(
            ERR_UNKNOWN_CONTAINER, f"network namespace {path.decode(errors='replace')} does "
            "not exist"
        ) from None
    except OSError as exc:
        raise CniError(
            ERR_IO, f"cannot open network namespace {path.decode(errors='replace')}", str(exc)
        ) from None


def _unreachable(command: bytes, path: str, reason: str) -> CniError:
    code = ERR_NOT_AVAILABLE if command == b"STATUS" else ERR_TRY_AGAIN_LATER
    return CniError(code, f"meshgress agent not reachable at {path}", reason)


def _recv_response(sock: _socket.socket) -> tuple[int, bytes]:
    data = sock.recv(_READ_SIZE)  # almost always the whole answer
    if not data:
        raise ConnectionError("agent closed the connection without answering")
    while len(data) < 12:
        more = sock.recv(_READ_SIZE)
        if not more:
            raise ValueError(f"agent closed the connection mid-answer: {data!r}")
        data += more
    exit_code, length = decode_response_header(data)
    while len(data) < 12 + length:
        more = sock.recv(12 + length - len(data))
        if not more:
            raise ValueError("agent closed the connection mid-answer")
        data += more
    if len(data) > 12 + length:
        raise ValueError("agent sent more than one answer")
    return exit_code, data[12:]


def call_agent(
    path: str, timeout: float, command: bytes, frame: bytes, netns_fd: int | None, *,
    emit_to: int | None = None,
) -> tuple[int, bytes]:
    """Send one request frame (with the namespace fd, if any); return (exit, stdout).

    Once the whole answer is here it is acknowledged. With `emit_to`, it is first written
    there (and b"" returned in its place): the runtime holds the answer before the agent
    hears that it was taken, so a shim killed in between fails on both sides."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        # Kernel timeouts on a blocking socket: no poll() before every call. A zero
        # timeval would mean "forever", hence at least 1 us; at most ~31 years.
        timeout = timeout if timeout < 1e9 else 1e9
        seconds = int(timeout)
        micros = max(int((timeout - seconds) * 1e6), 0 if seconds else 1)
        timeval = seconds.to_bytes(8, sys.byteorder) + micros.to_bytes(8, sys.byteorder)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(path)
        except OSError as exc:
            raise _unreachable(command, path, str(exc)) from None
        try:
            if netns_fd is None:
                sock.sendall(frame)
            else:
                fds = netns_fd.to_bytes(4, sys.byteorder, signed=True)
                sent = sock.sendmsg([frame], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
                if sent < len(frame):  # sendall(b"") would still send, and may hit EPIPE
                    sock.sendall(frame[sent:])
            exit_code, stdout = _recv_response(sock)
        except (BlockingIOError, TimeoutError):  # EAGAIN: SO_RCVTIMEO/SO_SNDTIMEO expired
            raise CniError(
                ERR_TRY_AGAIN_LATER, f"meshgress agent did not answer within {timeout:g}s"
            ) from None
        except ValueError as exc:
            raise CniError(ERR_AGENT_PROTOCOL, "bad answer from the agent", str(exc)) from None
        except OSError as exc:
            raise _unreachable(command, path, str(exc)) from None
        if emit_to is not None:
            _write_all(emit_to, stdout)
            stdout = b""
        try:  # noqa: SIM105 (no contextlib: the shim imports built-in modules only)
            sock.send(ACK)
        except OSError:  # the agent no longer listens: its answer stands
            pass
        return exit_code, stdout
    finally:
        sock.close()


def run(environ: dict[bytes, bytes], stdin: bytes, emit_to: int | None = None
        ) -> tuple[int, bytes]:
    """One plugin invocation: (exit code, bytes for stdout). With `emit_to`, the agent's
    answer is written there before it is acknowledged (see `call_agent`), and b"" is
    returned in its place; answers of the shim's own are returned."""
    command = environ.get(b"CNI_COMMAND", b"")
    if command == b"VERSION":
        return 0, VERSION_JSON.encode()
    netns_fd = None
    try:
        try:
            address = compute_quick_address(stdin) if command in _AGENT_COMMANDS else None
            if address is None:
                address = validate(_text_environ(environ), stdin)
            values = [environ.get(name, b"") for name in REQUEST_ENV]
            if len(stdin) > MAX_CONFIG or max(map(len, values)) > MAX_ENV_VALUE:
                validate(_text_environ(environ), stdin)  # says which
                raise CniError(ERR_INVALID_ENV, "the invocation is too large")
            if command in _NETNS_COMMANDS:
                netns_fd = _open_netns(environ.get(b"CNI_NETNS", b""))
            frame = encode_request(values, stdin)
            return call_agent(*address, command, frame, netns_fd, emit_to=emit_to)
        except CniError:
            validate(_text_environ(environ), stdin)  # the invocation's own fault comes first
            raise
        finally:
            if netns_fd is not None:
                posix.close(netns_fd)
    except CniError as exc:
        return 1, exc.to_json(requested_version(stdin)).encode()


def _read_stdin() -> bytes:
    chunks = []
    try:
        while chunk := posix.read(0, _READ_SIZE):
            chunks.append(chunk)
    except OSError:  # no stdin at all: the same as an empty one
        pass
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    if data and not data.endswith(b"\n"):
        data += b"\n"
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]


def main() -> int:
    stdin = b""
    try:
        stdin = _read_stdin()
        code, output = run(posix.environ, stdin, emit_to=1)
    except Exception as exc:  # a bug: the runtime still gets the spec's error object
        error = CniError(ERR_INTERNAL, f"meshgress-cni failed: {type(exc).__name__}: {exc}")
        code, output = 1, error.to_json(requested_version(stdin)).encode()
    _write_all(1, output)
    return code


def run_and_exit() -> None:
    """The installed launcher's entry: `main`, then exit without finalising the interpreter.

    Finalisation costs ~2 ms per invocation and has nothing to do here: the socket and the
    namespace fd are closed by then and stdout is written with write(2), unbuffered.
    """
    posix._exit(main())


if __name__ == "__main__":
    run_and_exit()
