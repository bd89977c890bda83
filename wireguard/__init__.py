"""WireGuard as a library: keys, the device model, plan(desired, observed), and two backends.

Owns: X25519 keys (private key file 0600, never published), the interface and its peers
as frozen values, the smallest change between a desired and an observed device, and the
backends that apply it — kernel (pyroute2 generic netlink) and userspace (wireguard-go's
UAPI socket) — behind one small interface, plus wg-quick export.

This package imports nothing from the rest of meshgress (see the import contract).

Modules, by layer:
- pure: `keys` (except the key file), `model`, `plan`, `uapi` (the UAPI text protocol),
  `export` (wg-quick text); the pure halves of `kernel` (`compute_netlink_requests`,
  `parse_netlink_info`); `fake` (an in-memory backend for tests of the layers above).
- apply: `backend` (the `WireGuardBackend` protocol, `detect_backend`, `apply_device`),
  `userspace`, `kernel`, `links` (rtnetlink for link add/delete/MTU/up).
- `errors`: every exception, with `temporary` telling retry from report.

Typical use:

    desired = Device("meshgress0", private_key=load_or_create_private_key(path),
                     listen_port=51820, mtu=1420, peers=(Peer(key, endpoint="192.0.2.7:51820",
                     allowed_ips=["198.18.7.0/24"]),))
    backend = detect_backend()
    plan = apply_device(backend, desired)   # read, plan, apply; log str(plan)

The top level re-exports only the pure core; import the backends from their modules.
"""

from wireguard.errors import (
    BackendUnavailableError,
    DeviceStartError,
    InvalidKeyError,
    KeyFileError,
    NetlinkRequestError,
    NotWireGuardDeviceError,
    UapiError,
    WireGuardError,
)
from wireguard.keys import (
    generate_private_key,
    is_valid_key,
    load_or_create_private_key,
    normalise_key,
    public_key,
)
from wireguard.model import Device, Peer, PeerStats
from wireguard.plan import DevicePlan, PeerUpdate, describe_plan, plan_device

__all__ = [
    "BackendUnavailableError",
    "Device",
    "DevicePlan",
    "DeviceStartError",
    "InvalidKeyError",
    "KeyFileError",
    "NetlinkRequestError",
    "NotWireGuardDeviceError",
    "Peer",
    "PeerStats",
    "PeerUpdate",
    "UapiError",
    "WireGuardError",
    "describe_plan",
    "generate_private_key",
    "is_valid_key",
    "load_or_create_private_key",
    "normalise_key",
    "plan_device",
    "public_key",
]
