"""The kernel WireGuard suite runs only where a kernel has WireGuard: run it via run-vm.

`tests/kernel/run-vm` runs this folder natively when the host kernel has the wireguard
module, and otherwise inside a throwaway QEMU guest with a stock Debian kernel (it sets
MESHGRESS_KERNEL_WG to "native" or "vm"). Run directly with pytest on a host without
the module, every test here fails at once with a message saying so — never a silent
skip. `make test` leaves this folder out of its main pytest run and calls run-vm.

Under TCG emulation Python runs 10-20 times slower, so pyroute2's timeouts for
opening a netlink socket inside a network namespace (a forked child hands the socket
back) are raised in the guest; they bound waiting, not what is tested.
"""

from __future__ import annotations

import os
import platform

import pytest

from wireguard.backend import kernel_module_available

HOW = "run it with tests/kernel/run-vm (a throwaway VM when this kernel has no WireGuard)"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs a kernel with WireGuard; " + HOW)
    if os.environ.get("MESHGRESS_KERNEL_WG") == "vm":
        from pyroute2 import config as pyroute2_config

        pyroute2_config.default_communicate_timeout = 30
        pyroute2_config.default_create_socket_timeout = 120


def pytest_report_header(config: pytest.Config) -> str:
    where = {"vm": "a throwaway QEMU guest", "native": "this host"}.get(
        os.environ.get("MESHGRESS_KERNEL_WG", ""), "this host (not via run-vm)")
    return f"kernel WireGuard: {where}, kernel {platform.release()}"


@pytest.fixture(scope="session", autouse=True)
def _kernel_wireguard() -> None:
    if os.geteuid() != 0:
        pytest.fail("the kernel WireGuard suite needs root (it creates network namespaces); "
                    + HOW, pytrace=False)
    if not kernel_module_available():
        pytest.fail(f"this kernel ({platform.release()}) has no WireGuard module; " + HOW,
                    pytrace=False)
