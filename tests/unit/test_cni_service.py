"""CniService's command semantics with a fake kernel: ordering, undo, idempotence, GC, and
never harming what is not this attachment's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from cni import protocol as p
from cni.ipam import Allocation, Ipam
from cni.model import (
    AttachmentKey,
    PodAttachment,
    compute_host_ifname,
    compute_host_mac,
)
from cni.service import CniService
from cni.wiring import FakeWiring

CIDR = IPv4Network("198.18.0.0/24")


class Namespaces:
    """Stand-ins for pod network namespaces: one open file per name (the fake tells
    namespaces apart by the file an fd refers to, as the kernel does)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fds: dict[str, int] = {}

    def fd(self, name: str) -> int:
        if name not in self.fds:
            path = self.directory / f"netns-{name}"
            path.touch()
            self.fds[name] = os.open(path, os.O_RDONLY)
        return self.fds[name]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


@pytest.fixture
def namespaces(tmp_path) -> Iterator[Namespaces]:
    made = Namespaces(tmp_path)
    yield made
    made.close()


@pytest.fixture
def node_fd() -> Iterator[int]:
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    yield fd
    os.close(fd)


@pytest.fixture
def wiring() -> FakeWiring:
    return FakeWiring()


@pytest.fixture
def events() -> list[Any]:
    return []


@pytest.fixture
def service(tmp_path, wiring, events) -> CniService:
    def ready(attachment: PodAttachment) -> None:
        events.append(("ready", attachment, list(wiring.log)))
        if attachment.name == "fail-me":
            raise RuntimeError("no steering for you")

    def removed(attachment: PodAttachment) -> None:
        events.append(("removed", attachment, list(wiring.log)))

    svc = CniService(CIDR, tmp_path / "state", pod_ready_hook=ready, pod_removed_hook=removed,
                     wiring=wiring, random_bytes=lambda n: bytes(range(1, n + 1)))
    svc.open()
    return svc


def request(command: str, container: str = "c1", version: str = "1.0.0",
            args: str = "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web", ifname: str = "eth0",
            **config: Any) -> dict[str, Any]:
    return {"command": command, "containerID": container if command not in ("GC", "STATUS") else "",
            "ifname": ifname if command not in ("GC", "STATUS") else "",
            "netns": f"/run/netns/{container}", "args": args, "path": "",
            "stdin": json.dumps({"cniVersion": version, "name": "n", "type": "t", **config})}


@pytest.fixture
def handle(namespaces) -> Callable[..., tuple[int, Any]]:
    """service.handle with each container in its own namespace (unless `fd` is given)."""

    def call(service: CniService, raw: dict[str, Any], fd: int | str | None = "auto",
             caller: Any = None) -> tuple[int, Any]:
        if fd == "auto":
            fd = namespaces.fd(str(raw.get("containerID")))
        code, out = service.handle(raw, fd, caller)  # type: ignore[arg-type]
        return code, (json.loads(out) if out else None)

    return call


def allocations(service: CniService) -> list[Allocation]:
    assert service._ipam is not None
    return service._ipam.allocations()


def assert_nothing_left(service: CniService, wiring: FakeWiring) -> None:
    assert wiring.is_empty(), (wiring.links, wiring.namespaces)
    assert allocations(service) == []


def test_add_wires_then_calls_the_hook_then_answers(service, wiring, events, handle):
    code, result = handle(service, request("ADD"))
    assert code == 0
    (event, attachment, wiring_log) = events[0]
    assert event == "ready"
    assert wiring_log == [f"add {compute_host_ifname('c1', 'eth0')}"]  # wired before the hook
    assert attachment == PodAttachment("c1", "eth0", "/run/netns/c1", "ns", "web",
                                       IPv4Address("198.18.0.1"),
                                       compute_host_ifname("c1", "eth0"))
    assert result["ips"][0]["address"] == "198.18.0.1/32"
    assert result["interfaces"][0]["mac"] == compute_host_mac("c1", "eth0")
    assert result["interfaces"][1]["mac"] == "02:02:03:04:05:06"
    assert service.requests_total[("ADD", 0)] == 1


def test_failing_hook_undoes_wiring_and_allocation(service, wiring, events, handle):
    code, error = handle(service, request("ADD", args="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=fail-me"))
    assert code == 1
    assert error["code"] == p.ERR_HOOK_FAILED
    assert "ns/fail-me" in error["msg"]
    assert "no steering for you" in error["details"]
    assert_nothing_left(service, wiring)
    assert [e[0] for e in events] == ["ready", "removed"]
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


@pytest.mark.parametrize(
    "failure_and_code",
    [(OSError(17, "File exists"), p.ERR_WIRING),
     (p.CniError(p.ERR_IFNAME_IN_USE, "eth0 exists"), p.ERR_IFNAME_IN_USE)],
    ids=["kernel error", "name in use"],
)
def test_failed_wiring_releases_the_address(service, wiring, events, handle, failure_and_code):
    failure, code = failure_and_code
    wiring.fail_add = failure
    status, error = handle(service, request("ADD"))
    assert (status, error["code"]) == (1, code)
    assert_nothing_left(service, wiring)
    assert events == []
    wiring.fail_add = None
    assert handle(service, request("ADD"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_add_is_idempotent_per_attachment(service, wiring, handle):
    first = handle(service, request("ADD"))[1]
    again = handle(service, request("ADD"))[1]
    assert first["ips"] == again["ips"]
    assert list(wiring.links) == [compute_host_ifname("c1", "eth0")]


def test_add_refuses_without_anti_spoofing(service, wiring, handle):
    wiring.antispoof = "rp_filter is loose"
    _, error = handle(service, request("ADD"))
    assert error["code"] == p.ERR_ANTISPOOF_UNAVAILABLE
    assert_nothing_left(service, wiring)
    assert handle(service, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE


def test_add_needs_the_namespace_fd(service, handle):
    assert handle(service, request("ADD"), fd=None)[1]["code"] == p.ERR_INVALID_ENV


def test_del_unwires_before_the_hook_and_release_and_is_idempotent(service, wiring, events,
                                                                   handle):
    handle(service, request("ADD"))
    assert handle(service, request("DEL"), fd=None) == (0, None)
    removed = [e for e in events if e[0] == "removed"]
    assert len(removed) == 1
    assert f"remove {compute_host_ifname('c1', 'eth0')}" in removed[0][2]
    assert handle(service, request("DEL"), fd=None) == (0, None)
    assert len([e for e in events if e[0] == "removed"]) == 1
    assert_nothing_left(service, wiring)
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_del_of_something_never_added_succeeds(service, wiring, handle):
    assert handle(service, request("DEL", "never"), fd=None) == (0, None)
    assert wiring.log == []


def test_check(service, wiring, handle):
    added = handle(service, request("ADD"))[1]
    assert handle(service, request("CHECK", prevResult=added)) == (0, None)
    wiring.delete_host_link(wiring.links[compute_host_ifname("c1", "eth0")])
    _, error = handle(service, request("CHECK", prevResult=added))
    assert error["code"] == p.ERR_CHECK_FAILED
    assert "is missing" in error["msg"]
    assert handle(service, request("CHECK", "other"))[1]["code"] == p.ERR_UNKNOWN_CONTAINER


def test_gc_releases_stale_attachments(service, wiring, events, handle):
    for container in ("keep", "stale"):
        handle(service, request("ADD", container))
    wiring.add_foreign_link("mgcorphan00000")  # a veth of ours whose ADD crashed
    wiring.add_foreign_link("mgcbridge", kind="bridge")  # prefixed, but not a veth
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    code, out = handle(service, request("GC", version="1.1.0",
                                        **{"cni.dev/valid-attachments": valid}), fd=None)
    assert (code, out) == (0, None)
    assert sorted(wiring.links) == [compute_host_ifname("keep", "eth0"), "mgcbridge"]
    assert [e[1].container_id for e in events if e[0] == "removed"] == ["stale"]
    assert [a.key.container_id for a in allocations(service)] == ["keep"]


def test_not_ready_until_the_pod_cidr_is_known(tmp_path, wiring, handle):
    svc = CniService(None, tmp_path, wiring=wiring)
    svc.open()
    assert handle(svc, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE
    assert handle(svc, request("ADD"))[1]["code"] == p.ERR_TRY_AGAIN_LATER
    assert handle(svc, request("DEL"), fd=None) == (0, None)
    svc.set_pod_cidr(CIDR)
    assert handle(svc, request("STATUS", version="1.1.0")) == (0, None)
    assert handle(svc, request("ADD"))[0] == 0


def test_not_ready_before_open(tmp_path, wiring, handle):
    svc = CniService(CIDR, tmp_path, wiring=wiring)
    assert handle(svc, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE
    svc.open()
    assert wiring.own_gateway is True
    assert handle(svc, request("STATUS", version="1.1.0")) == (0, None)


def test_unexpected_errors_are_reported_not_raised(service, wiring, handle):
    wiring.fail_add = ZeroDivisionError("boom")
    code, error = handle(service, request("ADD"))
    assert (code, error["code"]) == (1, p.ERR_INTERNAL)
    assert "boom" in error["msg"]
    assert_nothing_left(service, wiring)  # undone like any other failure
    wiring.fail_add = None
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_errors_use_the_requested_version(service, handle):
    raw = request("ADD", version="0.4.0")
    raw["containerID"] = "-bad"
    assert handle(service, raw)[1]["cniVersion"] == "0.4.0"


# --- never harming what is not this attachment's ------------------------------------------


def test_the_nodes_own_namespace_is_refused(service, wiring, handle, node_fd):
    """A CNI_NETNS that is the node's namespace would have the node's default route
    replaced by the pod's (and removed again by DEL)."""
    code, error = handle(service, request("ADD"), fd=node_fd)
    assert (code, error["code"]) == (1, p.ERR_INVALID_ENV)
    assert "node's own network namespace" in error["msg"]
    assert_nothing_left(service, wiring)
    assert wiring.log == []
    assert handle(service, request("CHECK"), fd=node_fd)[1]["code"] == p.ERR_INVALID_ENV


def test_a_host_interface_of_the_same_name_that_is_not_ours_is_an_error(service, wiring,
                                                                         handle, events):
    name = compute_host_ifname("c1", "eth0")
    foreign = wiring.add_foreign_link(name, mac="02:00:5e:00:00:07")
    code, error = handle(service, request("ADD"))
    assert (code, error["code"]) == (1, p.ERR_WIRING)
    assert f"host interface {name} already exists" in error["msg"]
    assert wiring.links == {name: foreign}  # untouched
    assert allocations(service) == []
    assert events == []
    assert handle(service, request("DEL"), fd=None) == (0, None)
    assert wiring.links == {name: foreign}  # DEL leaves it alone too


def test_one_attachments_del_never_deletes_anothers_veth_of_the_same_name(service, wiring,
                                                                          handle):
    """Two attachments whose host names collide: the veth is the one that got there
    first (its MAC is derived from its own attachment); the other's DEL and GC leave it."""
    handle(service, request("ADD", "first"))
    link = wiring.links.pop(compute_host_ifname("first", "eth0"))
    impostor_name = compute_host_ifname("second", "eth0")
    wiring.links[impostor_name] = type(link)(link.index, impostor_name, link.mac, True, "veth",
                                             link.mtu)
    assert handle(service, request("DEL", "second"), fd=None) == (0, None)
    assert impostor_name in wiring.links
    assert handle(service, request("ADD", "second"))[1]["code"] == p.ERR_WIRING
    assert impostor_name in wiring.links


def test_a_veth_left_by_an_earlier_add_of_the_same_attachment_is_replaced(service, wiring,
                                                                          handle):
    handle(service, request("ADD"))
    first = wiring.links[compute_host_ifname("c1", "eth0")]
    code, _ = handle(service, request("ADD"))
    assert code == 0
    second = wiring.links[compute_host_ifname("c1", "eth0")]
    assert second.index != first.index and second.mac == first.mac
    assert len(wiring.peers) == 1


def test_a_veth_named_by_an_earlier_version_is_still_this_attachments(tmp_path, wiring,
                                                                      handle, namespaces):
    """Allocations written by a version that hashed container id and ifname run together
    record that name; its veth has a random MAC. DEL and GC still find and remove it."""
    state = tmp_path / "state"
    legacy_name = "mgc63877c11219"  # that version's name for ("c1", "eth0")
    ipam = Ipam(CIDR, state / "ipam")
    ipam.allocate(AttachmentKey("c1", "eth0"), netns="/run/netns/c1")
    ipam.close()
    record = next(p for p in (state / "ipam").iterdir() if p.name[0].isdigit())
    record.write_text(record.read_text().replace(compute_host_ifname("c1", "eth0"),
                                                 legacy_name))
    wiring.add_foreign_link(legacy_name, mac="7a:11:22:33:44:55")
    svc = CniService(CIDR, state, wiring=wiring)
    svc.open()
    valid = [{"containerID": "c1", "ifname": "eth0"}]
    assert handle(svc, request("GC", version="1.1.0",
                               **{"cni.dev/valid-attachments": valid}), fd=None) == (0, None)
    assert legacy_name in wiring.links
    assert handle(svc, request("DEL"), fd=None) == (0, None)
    assert legacy_name not in wiring.links


def test_a_foreign_route_to_the_pods_address_is_never_replaced(service, wiring, handle):
    foreign = wiring.add_foreign_route("198.18.0.1/32", protocol=4, oif=7)
    code, error = handle(service, request("ADD"))
    assert (code, error["code"]) == (1, p.ERR_WIRING)
    assert "198.18.0.1/32 already exists in the node's main table" in error["msg"]
    assert wiring.node.routes == {foreign.dst: foreign}
    assert_nothing_left(service, wiring)


def test_a_foreign_default_route_in_the_container_is_never_replaced(service, wiring, handle,
                                                                    namespaces):
    pod = namespaces.fd("c1")
    other = wiring.add_foreign_link("net0", netns_fd=pod)
    foreign = wiring.add_foreign_route("0.0.0.0/0", oif=other.index, netns_fd=pod)
    code, error = handle(service, request("ADD"))
    assert (code, error["code"]) == (1, p.ERR_WIRING)
    assert "0.0.0.0/0 already exists in the container's main table" in error["msg"]
    assert wiring.pod(pod).routes == {foreign.dst: foreign}
    assert list(wiring.pod(pod).links) == ["net0"]
    assert_nothing_left(service, wiring)


# --- a failed ADD leaves nothing behind ----------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [{"dns": "10.96.0.10"}, {"dns": {"nameservers": "10.96.0.10"}},
     {"prevResult": {"interfaces": 5}}, {"prevResult": {"dns": ["x"]}}],
    ids=["dns a string", "nameservers a string", "prevResult interfaces a number",
         "prevResult dns a list"],
)
def test_a_bad_field_fails_add_before_anything_is_done(service, wiring, events, handle, config):
    """A bad `dns` used to fail only when the answer was built: after the pod was wired
    and its address allocated, which stayed (reported as an internal error)."""
    code, error = handle(service, request("ADD", **config))
    assert (code, error["code"]) == (1, p.ERR_INVALID_CONFIG)
    assert wiring.log == [] and events == []
    assert_nothing_left(service, wiring)


class RecordingCaller:
    """A Caller that gives up at a chosen point: 'gave_up' calls answer from `gone_after`
    on (counting from 1), and `confirm` reports `acknowledged`."""

    def __init__(self, gone_after: int | None = None, acknowledged: bool = True) -> None:
        self.gone_after = gone_after
        self.acknowledged = acknowledged
        self.checks = 0
        self.confirmed: list[str] = []

    def gave_up(self) -> bool:
        self.checks += 1
        return self.gone_after is not None and self.checks >= self.gone_after

    def confirm(self, stdout: str) -> bool:
        self.confirmed.append(stdout)
        return self.acknowledged


@pytest.mark.parametrize(
    "caller_and_hook_calls",
    [(RecordingCaller(gone_after=1), 0), (RecordingCaller(gone_after=2), 0),
     (RecordingCaller(gone_after=3), 0), (RecordingCaller(acknowledged=False), 1)],
    ids=["gone before allocation", "gone before wiring", "gone before the hook",
         "hung up instead of acknowledging"],
)
def test_an_add_the_shim_gave_up_on_is_undone(service, wiring, events, handle,
                                              caller_and_hook_calls):
    caller, hook_calls = caller_and_hook_calls
    code, error = handle(service, request("ADD"), caller=caller)
    assert (code, error["code"]) == (1, p.ERR_TRY_AGAIN_LATER)
    assert "stopped waiting" in error["msg"]
    assert_nothing_left(service, wiring)
    assert [e[0] for e in events] == ["ready", "removed"] * hook_calls
    assert service.requests_total[("ADD", p.ERR_TRY_AGAIN_LATER)] == 1


def test_an_acknowledged_add_is_kept_and_answered_through_the_caller(service, wiring, handle):
    caller = RecordingCaller()
    code, result = handle(service, request("ADD"), caller=caller)
    assert code == 0
    assert [json.loads(text) for text in caller.confirmed] == [result]
    assert caller.checks == 3
    assert [a.key.container_id for a in allocations(service)] == ["c1"]
