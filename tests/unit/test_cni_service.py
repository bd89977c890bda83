"""CniService's command semantics with a fake kernel: ordering, undo, idempotence, GC."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from cni import protocol as p
from cni.model import PodAttachment, WiringPlan, compute_host_ifname
from cni.service import CniService


@dataclass
class FakeWiring:
    """Records what the service asks of the kernel; can be told to fail."""

    links: dict[str, WiringPlan] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    fail_add: Exception | None = None
    antispoof: str | None = None
    opened: bool = False
    own_gateway: bool | None = None

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def prepare_node(self, own_gateway: bool) -> None:
        self.own_gateway = own_gateway

    def antispoof_problem(self) -> str | None:
        return self.antispoof

    def add_pod(self, plan: WiringPlan, netns_fd: int) -> None:
        self.log.append(f"add {plan.host_ifname}")
        self.links[plan.host_ifname] = plan
        if self.fail_add is not None:
            raise self.fail_add

    def remove_pod(self, host_ifname: str) -> bool:
        self.log.append(f"remove {host_ifname}")
        return self.links.pop(host_ifname, None) is not None

    def check_pod(self, host_ifname: str, pod_ifname: str, ip: IPv4Address,
                  netns_fd: int) -> list[str]:
        plan = self.links.get(host_ifname)
        if plan is None:
            return [f"host interface {host_ifname} is missing"]
        return [] if plan.ip == ip else [f"address {ip}/32 is missing"]

    def host_links(self) -> list[str]:
        return sorted(self.links)


CIDR = IPv4Network("198.18.0.0/24")


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

    svc = CniService(CIDR, tmp_path, pod_ready_hook=ready, pod_removed_hook=removed,
                     wiring=wiring, random_bytes=lambda n: bytes(range(1, n + 1)))
    svc.open()
    return svc


def request(command: str, container: str = "c1", version: str = "1.0.0",
            args: str = "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web", **config: Any) -> dict[str, Any]:
    return {"command": command, "containerID": container if command not in ("GC", "STATUS") else "",
            "ifname": "eth0" if command not in ("GC", "STATUS") else "",
            "netns": f"/run/netns/{container}", "args": args, "path": "",
            "stdin": json.dumps({"cniVersion": version, "name": "n", "type": "t", **config})}


def handle(service: CniService, raw: dict[str, Any], fd: int | None = 3) -> tuple[int, Any]:
    code, out = service.handle(raw, fd)
    return code, (json.loads(out) if out else None)


def test_add_wires_then_calls_the_hook_then_answers(service, wiring, events):
    code, result = handle(service, request("ADD"))
    assert code == 0
    (event, attachment, wiring_log) = events[0]
    assert event == "ready"
    assert wiring_log == [f"add {compute_host_ifname('c1', 'eth0')}"]  # wired before the hook
    assert attachment == PodAttachment("c1", "eth0", "/run/netns/c1", "ns", "web",
                                       IPv4Address("198.18.0.1"),
                                       compute_host_ifname("c1", "eth0"))
    assert result["ips"][0]["address"] == "198.18.0.1/32"
    assert result["interfaces"][1]["mac"] == "02:02:03:04:05:06"
    assert service.requests_total[("ADD", 0)] == 1


def test_failing_hook_undoes_wiring_and_allocation(service, wiring, events):
    code, error = handle(service, request("ADD", args="K8S_POD_NAMESPACE=ns;K8S_POD_NAME=fail-me"))
    assert code == 1
    assert error["code"] == p.ERR_HOOK_FAILED
    assert "ns/fail-me" in error["msg"]
    assert "no steering for you" in error["details"]
    assert wiring.links == {}
    assert [e[0] for e in events] == ["ready", "removed"]
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


@pytest.mark.parametrize(
    ("failure", "code"),
    [(OSError(17, "File exists"), p.ERR_WIRING),
     (p.CniError(p.ERR_IFNAME_IN_USE, "eth0 exists"), p.ERR_IFNAME_IN_USE)],
    ids=["kernel error", "name in use"],
)
def test_failed_wiring_releases_the_address(service, wiring, events, failure, code):
    wiring.fail_add = failure
    status, error = handle(service, request("ADD"))
    assert (status, error["code"]) == (1, code)
    assert wiring.links == {}
    assert events == []
    wiring.fail_add = None
    assert handle(service, request("ADD"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_add_is_idempotent_per_attachment(service):
    first = handle(service, request("ADD"))[1]
    again = handle(service, request("ADD"))[1]
    assert first["ips"] == again["ips"]


def test_add_refuses_without_anti_spoofing(service, wiring):
    wiring.antispoof = "rp_filter is loose"
    _, error = handle(service, request("ADD"))
    assert error["code"] == p.ERR_ANTISPOOF_UNAVAILABLE
    assert wiring.links == {}
    assert handle(service, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE


def test_add_needs_the_namespace_fd(service):
    assert handle(service, request("ADD"), fd=None)[1]["code"] == p.ERR_INVALID_ENV


def test_del_unwires_before_the_hook_and_release_and_is_idempotent(service, wiring, events):
    handle(service, request("ADD"))
    assert handle(service, request("DEL"), fd=None) == (0, None)
    removed = [e for e in events if e[0] == "removed"]
    assert len(removed) == 1
    assert f"remove {compute_host_ifname('c1', 'eth0')}" in removed[0][2]
    assert handle(service, request("DEL"), fd=None) == (0, None)
    assert len([e for e in events if e[0] == "removed"]) == 1
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_del_of_something_never_added_succeeds(service, wiring):
    assert handle(service, request("DEL", "never"), fd=None) == (0, None)
    assert wiring.log == [f"remove {compute_host_ifname('never', 'eth0')}"]


def test_check(service, wiring):
    added = handle(service, request("ADD"))[1]
    assert handle(service, request("CHECK", prevResult=added)) == (0, None)
    wiring.links.clear()
    _, error = handle(service, request("CHECK", prevResult=added))
    assert error["code"] == p.ERR_CHECK_FAILED
    assert "is missing" in error["msg"]
    assert handle(service, request("CHECK", "other"))[1]["code"] == p.ERR_UNKNOWN_CONTAINER


def test_gc_releases_stale_attachments(service, wiring, events):
    for container in ("keep", "stale"):
        handle(service, request("ADD", container))
    wiring.links["mgcorphan00000"] = wiring.links[compute_host_ifname("keep", "eth0")]
    valid = [{"containerID": "keep", "ifname": "eth0"}]
    code, out = handle(service, request("GC", version="1.1.0",
                                        **{"cni.dev/valid-attachments": valid}), fd=None)
    assert (code, out) == (0, None)
    assert sorted(wiring.links) == [compute_host_ifname("keep", "eth0")]
    assert [e[1].container_id for e in events if e[0] == "removed"] == ["stale"]


def test_not_ready_until_the_pod_cidr_is_known(tmp_path, wiring):
    svc = CniService(None, tmp_path, wiring=wiring)
    svc.open()
    assert handle(svc, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE
    assert handle(svc, request("ADD"))[1]["code"] == p.ERR_TRY_AGAIN_LATER
    assert handle(svc, request("DEL"), fd=None) == (0, None)
    svc.set_pod_cidr(CIDR)
    assert handle(svc, request("STATUS", version="1.1.0")) == (0, None)
    assert handle(svc, request("ADD"))[0] == 0


def test_not_ready_before_open(tmp_path, wiring):
    svc = CniService(CIDR, tmp_path, wiring=wiring)
    assert handle(svc, request("STATUS", version="1.1.0"))[1]["code"] == p.ERR_NOT_AVAILABLE
    svc.open()
    assert wiring.own_gateway is True
    assert handle(svc, request("STATUS", version="1.1.0")) == (0, None)


def test_unexpected_errors_are_reported_not_raised(service, wiring):
    wiring.fail_add = ZeroDivisionError("boom")
    code, error = handle(service, request("ADD"))
    assert (code, error["code"]) == (1, p.ERR_INTERNAL)
    assert "boom" in error["msg"]
    assert wiring.links == {}  # undone like any other failure
    wiring.fail_add = None
    assert handle(service, request("ADD", "c2"))[1]["ips"][0]["address"] == "198.18.0.2/32"


def test_errors_use_the_requested_version(service):
    raw = request("ADD", version="0.4.0")
    raw["containerID"] = "-bad"
    assert handle(service, raw)[1]["cniVersion"] == "0.4.0"
