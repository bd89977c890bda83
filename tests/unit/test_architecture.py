"""The layering the import contracts cannot see on their own.

`make check` runs import-linter with the contracts in pyproject.toml. Two things escape
them, and are checked here: a new module of the core package that nobody added to the
`layers` contract would be outside every layer, and rtnetlink plumbing written by hand
(a raw NETLINK_ROUTE socket, nlmsghdr structs) is not an import at all.
"""

from __future__ import annotations

import pkgutil
import re
import tomllib
from pathlib import Path

import meshgress

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("gateway", "nodeagent", "cni", "wireguard")


def _layers() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return [name.strip() for layer in layers for name in re.split(r"[|:]", layer)]


def test_every_module_of_the_core_package_sits_in_a_layer():
    listed = set(_layers())
    modules = {f"meshgress.{m.name}" for m in pkgutil.iter_modules(meshgress.__path__)}
    missing = sorted(m for m in modules if m not in listed)
    assert missing == [], f"add these to the layers contract in pyproject.toml: {missing}"
    assert set(COMPONENTS) - {"wireguard"} <= listed and "wireguard" in listed


NETLINK_SOCKET = re.compile(r"AF_NETLINK|NETLINK_ROUTE")
NETLINK_MESSAGES = re.compile(r"nlmsghdr|NLMSGHDR|IFINFOMSG|RTMSG")
CNI_SHIM = "cni/plugin.py"
"""Standard library only by contract, so it cannot use the kernel library; it opens the
rtnetlink socket it hands the agent inside the pod's namespace, and never speaks on it."""


def test_netlink_is_spoken_only_by_the_kernel_library_and_wireguard():
    allowed = ("meshgress/kernel/", "wireguard/")
    offenders = []
    for folder in ("meshgress", "nodeagent", "gateway", "cni", "wireguard"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            if relative.startswith(allowed):
                continue
            text = path.read_text()
            if NETLINK_MESSAGES.search(text) or (
                    NETLINK_SOCKET.search(text) and relative != CNI_SHIM):
                offenders.append(relative)
    assert offenders == [], f"netlink plumbing outside meshgress/kernel: {offenders}"


def test_no_other_installed_distribution_claims_our_top_level_names():
    """The components install as top-level packages (see README, "Choices worth
    knowing"): in meshgress's own virtualenv or image nothing else may provide them, or
    one would silently shadow the other."""
    import importlib.metadata

    owners = importlib.metadata.packages_distributions()
    for name in ("meshgress", *COMPONENTS):
        assert set(owners.get(name, ["meshgress"])) == {"meshgress"}, (name, owners.get(name))
