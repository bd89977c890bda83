"""What the plugin shim and the agent's CNI server agree on, as the agent imports it.

The definitions live in `cni.plugin`: the shim is installed as one flat file that cannot
import anything of this package, so it is the single source of the error codes, versions,
the spec's syntax rules (`CNI_ARGS`, container ids, interface names), `CniError` and the
binary wire format (see its docstring). This module re-exports them for the agent and the
tests and adds what only the agent needs:

- `ERROR_NAMES`, for logs and metrics;
- `dumps`, compact JSON without importing `json`;
- `frame_length`, the bounded length of a frame.

Purely computational: no I/O happens here.
"""

import _json

from cni.plugin import (
    ACK,
    COMMANDS,
    COMMANDS_SINCE_1_1,
    DEFAULT_SOCKET,
    DEFAULT_TIMEOUT,
    ERR_AGENT_PROTOCOL,
    ERR_ANTISPOOF_UNAVAILABLE,
    ERR_CHECK_FAILED,
    ERR_DECODE,
    ERR_HOOK_FAILED,
    ERR_IFNAME_IN_USE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_IO,
    ERR_IPAM_EXHAUSTED,
    ERR_NOT_AVAILABLE,
    ERR_NOT_AVAILABLE_LIMITED,
    ERR_TRY_AGAIN_LATER,
    ERR_UNKNOWN_CONTAINER,
    ERR_UNSUPPORTED_FIELD,
    ERR_WIRING,
    IFNAMSIZ,
    LATEST_VERSION,
    LEGACY_REQUEST_MAGIC,
    MAX_CONFIG,
    MAX_CONTAINER_ID,
    MAX_ENV_VALUE,
    MAX_FRAME,
    MAX_JSON_DEPTH,
    MAX_NETNS_PATH,
    MAX_POD_NAME,
    REQUEST_FIELDS,
    REQUEST_MAGIC,
    REQUIRED_ENV,
    RESPONSE_MAGIC,
    SUPPORTED_VERSIONS,
    VERSION_JSON,
    CniError,
    check_config_size,
    check_container_id,
    check_env_sizes,
    check_ifname,
    check_json_depth,
    check_netns_path,
    check_pod_identity,
    check_version,
    compute_error_json,
    decode_request,
    decode_response_header,
    encode_request,
    encode_response,
    loads,
    parse_cni_args,
    parse_version,
)

__all__ = [
    "ACK", "COMMANDS", "COMMANDS_SINCE_1_1", "DEFAULT_SOCKET", "DEFAULT_TIMEOUT", "ERROR_NAMES",
    "ERR_AGENT_PROTOCOL", "ERR_ANTISPOOF_UNAVAILABLE", "ERR_CHECK_FAILED", "ERR_DECODE",
    "ERR_HOOK_FAILED", "ERR_IFNAME_IN_USE", "ERR_INCOMPATIBLE_VERSION", "ERR_INTERNAL",
    "ERR_INVALID_CONFIG", "ERR_INVALID_ENV", "ERR_IO", "ERR_IPAM_EXHAUSTED",
    "ERR_NOT_AVAILABLE", "ERR_NOT_AVAILABLE_LIMITED", "ERR_TRY_AGAIN_LATER",
    "ERR_UNKNOWN_CONTAINER", "ERR_UNSUPPORTED_FIELD", "ERR_WIRING", "IFNAMSIZ",
    "LATEST_VERSION", "LEGACY_REQUEST_MAGIC", "MAX_CONFIG", "MAX_CONTAINER_ID", "MAX_ENV_VALUE",
    "MAX_FRAME", "MAX_JSON_DEPTH", "MAX_NETNS_PATH", "MAX_POD_NAME", "REQUEST_FIELDS",
    "REQUEST_MAGIC", "REQUIRED_ENV", "RESPONSE_MAGIC", "SUPPORTED_VERSIONS", "VERSION_JSON",
    "CniError", "check_config_size", "check_container_id", "check_env_sizes", "check_ifname",
    "check_json_depth", "check_netns_path", "check_pod_identity", "check_version",
    "compute_error_json", "compute_version_json", "decode_request", "decode_response_header",
    "dumps", "encode_request", "encode_response", "frame_length", "loads", "parse_cni_args",
    "parse_version",
]

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

# --- JSON without importing `json` ------------------------------------------------------


def _raise_type_error(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_encode = _json.make_encoder(
    None, _raise_type_error, _json.encode_basestring_ascii, None, ": ", ", ", False, False, False
)


def dumps(obj: object) -> str:
    """Encode plain data (dict, list, str, int, float, bool, None) as compact JSON."""
    return "".join(_encode(obj, 0))


def compute_version_json() -> str:
    """The VERSION answer: the supported spec versions."""
    return VERSION_JSON


def frame_length(header: bytes) -> int:
    length = int.from_bytes(header, "big")
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length
