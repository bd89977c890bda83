"""Backend choice, the one-call reconcile, and the in-memory fake backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from wireguard import backend as backend_module
from wireguard.backend import (
    WireGuardBackend,
    apply_device,
    detect_backend,
    select_backend_kind,
)
from wireguard.errors import BackendUnavailableError, UapiError
from wireguard.fake import FakeBackend
from wireguard.kernel import KernelBackend
from wireguard.keys import encode_key
from wireguard.model import Device, Peer
from wireguard.userspace import UserspaceBackend


def key(n: int) -> str:
    return encode_key(bytes([n]) * 32)


@pytest.mark.parametrize(
    ("override", "kernel", "userspace", "expected"),
    [
        pytest.param(None, True, True, "kernel", id="auto-prefers-kernel"),
        pytest.param(None, False, True, "userspace", id="auto-falls-back-to-wireguard-go"),
        pytest.param("auto", True, False, "kernel", id="auto-kernel-only"),
        pytest.param("userspace", True, True, "userspace", id="override-userspace"),
        pytest.param(" Kernel ", True, False, "kernel", id="override-is-case-insensitive"),
    ],
)
def test_select_backend_kind(override: str | None, kernel: bool, userspace: bool,
                             expected: str) -> None:
    assert select_backend_kind(override, kernel=kernel, userspace=userspace) == expected


@pytest.mark.parametrize(
    ("override", "kernel", "userspace", "message"),
    [
        pytest.param(None, False, False, "no WireGuard implementation", id="neither"),
        pytest.param("kernel", False, True, "no wireguard module", id="kernel-missing"),
        pytest.param("userspace", True, False, "wireguard-go is not on PATH",
                     id="wireguard-go-missing"),
        pytest.param("boringtun", True, True, "unknown WireGuard backend", id="unknown"),
    ],
)
def test_select_backend_kind_errors(override: str | None, kernel: bool, userspace: bool,
                                   message: str) -> None:
    with pytest.raises(BackendUnavailableError, match=message):
        select_backend_kind(override, kernel=kernel, userspace=userspace)


def test_detect_backend_builds_the_chosen_backend(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setattr(backend_module, "kernel_module_available", lambda: False)
    monkeypatch.setattr(backend_module, "userspace_available", lambda _name: True)
    chosen = detect_backend(socket_dir=tmp_path, netns="mgt-wg-x")
    assert isinstance(chosen, UserspaceBackend)
    assert chosen.kind == "userspace" and chosen.socket_dir == tmp_path
    assert chosen.netns == "mgt-wg-x"
    monkeypatch.setattr(backend_module, "kernel_module_available", lambda: True)
    assert isinstance(detect_backend(), KernelBackend)
    assert isinstance(detect_backend("userspace"), UserspaceBackend)


def test_every_backend_satisfies_the_protocol() -> None:
    for candidate in (KernelBackend(), UserspaceBackend(), FakeBackend()):
        assert isinstance(candidate, WireGuardBackend)


DESIRED = Device("meshgress0", private_key=key(1), listen_port=51820, peers=(
    Peer(key(10), endpoint="192.0.2.10:51820", allowed_ips=["198.18.10.0/24"]),
    Peer(key(11), endpoint="192.0.2.11:51820", allowed_ips=["198.18.11.0/24"]),
))


def test_apply_device_converges_and_then_sends_nothing() -> None:
    fake = FakeBackend()
    first = apply_device(fake, DESIRED)
    assert first.create and fake.read("meshgress0") == DESIRED
    second = apply_device(fake, DESIRED)
    assert second.empty
    assert fake.applied == [first]  # the empty plan was not applied at all


def test_apply_device_changes_only_the_changed_peer() -> None:
    fake = FakeBackend({"meshgress0": DESIRED})
    moved = Device("meshgress0", private_key=key(1), listen_port=51820, peers=(
        DESIRED.peers[0],
        Peer(key(11), endpoint="192.0.2.99:51820", allowed_ips=["198.18.11.0/24"]),
    ))
    plan = apply_device(fake, moved)
    assert [u.public_key for u in plan.update_peers] == [key(11)]
    assert not plan.add_peers and not plan.remove_peers
    assert fake.read("meshgress0") == moved


def test_fake_backend_failure_injection_and_delete() -> None:
    fake = FakeBackend()
    fake.fail_next = UapiError("meshgress0", "set", -5)
    with pytest.raises(UapiError):
        apply_device(fake, DESIRED)
    assert fake.read("meshgress0") is None
    apply_device(fake, DESIRED)
    assert [s.public_key for s in fake.stats("meshgress0")] == [key(10), key(11)]
    fake.delete("meshgress0")
    fake.delete("meshgress0")
    assert fake.read("meshgress0") is None and fake.stats("meshgress0") == ()
