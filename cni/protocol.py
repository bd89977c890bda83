"""What the plugin shim and the agent's CNI server agree on: error codes, versions, framing.

Both halves import this module, and the shim runs once per pod operation, so it imports
only C-level standard modules that cost nothing measurable at start-up (`_json`, no `json`,
`re`, `enum`, `typing` or `os`: on this class of machine `import json` alone costs ~12 ms
and `import os` ~2 ms, more than the whole server-side ADD).

Owns:
- the CNI spec's well-known error codes and meshgress's own (100+), and `CniError`;
- the supported spec versions and their ordering;
- `CNI_ARGS` parsing and the spec's syntax rules for container ids and interface names;
- the wire protocol between shim and server: one request and one response per
  connection, each a 4-byte big-endian length followed by that many bytes of UTF-8 JSON.
  The shim may pass the container's network namespace as an open file descriptor
  (SCM_RIGHTS) with the request, so the server never needs to resolve the runtime's path
  in its own mount namespace.

Request:  {"command", "containerID", "ifname", "netns", "args", "path", "stdin"}
          (`args` is the raw CNI_ARGS string, `stdin` the raw network configuration text).
Response: {"exit": int, "stdout": str}; the shim prints `stdout` verbatim and exits
          with `exit`.

Purely computational: no I/O happens here.
"""

import _json

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
"""An unexpected failure inside the agent; the message says what."""

ERROR_NAMES = {
    ERR_INCOMPATIBLE_VERSION: "incompatible CNI version",
    ERR_UNSUPPORTED_FIELD: "unsupported field in network configuration",
    ERR_UNKNOWN_CONTAINER: "container unknown or does not exist",
    ERR_INVALID_ENV: "invalid necessary environment variables",
    ERR_IO: "I/O failure",
    ERR_DECODE: "failed to decode content",
    ERR_INVALID_CONFIG: "invalid network config",
    ERR_TRY_AGAIN_LATER: "try again later",
    ERR_NOT_AVAILABLE: "plugin not available",
    ERR_NOT_AVAILABLE_LIMITED: "plugin not available, existing containers may be impaired",
    ERR_IPAM_EXHAUSTED: "pod CIDR exhausted",
    ERR_WIRING: "pod wiring failed",
    ERR_CHECK_FAILED: "attachment check failed",
    ERR_HOOK_FAILED: "pod-ready hook failed",
    ERR_ANTISPOOF_UNAVAILABLE: "anti-spoofing unavailable",
    ERR_IFNAME_IN_USE: "interface name in use",
    ERR_AGENT_PROTOCOL: "agent protocol error",
    ERR_INTERNAL: "internal agent error",
}

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

DEFAULT_SOCKET = "/run/meshgress/cni.sock"
DEFAULT_TIMEOUT = 30.0
"""Seconds the shim waits for the agent (ADD includes the pod-ready hook)."""
MAX_FRAME = 16 * 1024 * 1024
IFNAMSIZ = 16


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
    """The spec's error object as text."""
    return dumps({"cniVersion": cni_version, "code": code, "msg": msg, "details": details})


def compute_version_json() -> str:
    """The VERSION answer: the supported spec versions."""
    return dumps({"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)})


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
    """The spec's rule: alphanumeric first, then alphanumerics, '_', '.' or '-'."""
    if not value:
        raise CniError(ERR_INVALID_ENV, "CNI_CONTAINERID is empty")
    if not (value[0].isascii() and value[0].isalnum()) or not all(
        c.isascii() and (c.isalnum() or c in "_.-") for c in value
    ):
        raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID {value!r} has invalid characters")
    return value


def check_ifname(value: str) -> str:
    """A Linux interface name: 1..15 bytes, no '/', ':' or whitespace, not '.' or '..'."""
    if not value:
        raise CniError(ERR_INVALID_ENV, "CNI_IFNAME is empty")
    if len(value.encode()) >= IFNAMSIZ:
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {value!r} is longer than 15 bytes")
    if value in (".", "..") or any(c in "/:" or c.isspace() for c in value):
        raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME {value!r} is not a valid interface name")
    return value


# --- JSON without importing `json` -------------------------------------------------------


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


# typeshed types the context as a make_scanner; any object with these attributes works.
_scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]


def _raise_type_error(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_encode = _json.make_encoder(
    None, _raise_type_error, _json.encode_basestring_ascii, None, ": ", ", ", False, False, False
)
_WHITESPACE = " \t\n\r"


def loads(text: str) -> object:
    """Decode one JSON document; raise ValueError with the position on bad input."""
    try:
        obj, end = _scan(text, len(text) - len(text.lstrip(_WHITESPACE)))
    except Exception:  # the C scanner raises odd types on bad input; re-parse below
        obj, end = None, -1
    if end < 0 or text[end:].strip(_WHITESPACE):
        # Slow path only for bad input: the full decoder gives a precise message.
        import json  # noqa: PLC0415

        return json.loads(text)
    return obj


def dumps(obj: object) -> str:
    """Encode plain data (dict, list, str, int, float, bool, None) as compact JSON."""
    return "".join(_encode(obj, 0))


def encode_frame(obj: object) -> bytes:
    data = dumps(obj).encode()
    return len(data).to_bytes(4, "big") + data


def frame_length(header: bytes) -> int:
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length
