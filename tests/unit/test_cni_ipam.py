"""Per-node IPAM on a real directory: idempotence, exhaustion, persistence, concurrency."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network

import pytest

from cni import protocol as p
from cni.ipam import Ipam, compute_key_filename
from cni.model import AttachmentKey, compute_host_ifname

CIDR = IPv4Network("198.18.0.0/24")


def key(n: int, ifname: str = "eth0") -> AttachmentKey:
    return AttachmentKey(f"ctr-{n}", ifname)


@pytest.fixture
def ipam(tmp_path):
    allocator = Ipam(CIDR, tmp_path / "ipam")
    yield allocator
    allocator.close()


def test_allocations_are_distinct_usable_and_recorded(ipam):
    first, created = ipam.allocate(key(1), namespace="ns", name="p", netns="/run/netns/x")
    second, _ = ipam.allocate(key(2))
    assert created
    assert first.ip == IPv4Address("198.18.0.1")
    assert second.ip == IPv4Address("198.18.0.2")
    assert (first.namespace, first.name, first.netns) == ("ns", "p", "/run/netns/x")
    assert first.host_ifname == compute_host_ifname("ctr-1", "eth0")
    assert ipam.lookup(key(1)) == first


def test_same_attachment_gets_the_same_address(ipam):
    first, created_first = ipam.allocate(key(1))
    again, created_again = ipam.allocate(key(1))
    assert (created_first, created_again) == (True, False)
    assert again == first
    other_if, _ = ipam.allocate(key(1, "net1"))
    assert other_if.ip != first.ip


def test_release_frees_and_is_idempotent(ipam):
    allocation, _ = ipam.allocate(key(1))
    assert ipam.release(key(1)) == allocation
    assert ipam.release(key(1)) is None
    assert ipam.lookup(key(1)) is None
    assert ipam.allocations() == []


def test_freed_address_is_not_reused_at_once(ipam):
    first, _ = ipam.allocate(key(1))
    ipam.release(key(1))
    second, _ = ipam.allocate(key(2))
    assert second.ip != first.ip


def test_exhaustion_names_the_cidr(tmp_path):
    small = Ipam(IPv4Network("198.18.5.0/30"), tmp_path)
    small.allocate(key(1))
    small.allocate(key(2))
    with pytest.raises(p.CniError) as err:
        small.allocate(key(3))
    assert err.value.code == p.ERR_IPAM_EXHAUSTED
    assert "198.18.5.0/30" in err.value.msg
    small.release(key(1))
    assert small.allocate(key(3))[0].ip == IPv4Address("198.18.5.1")


def test_allocations_survive_a_new_instance(tmp_path):
    before = Ipam(CIDR, tmp_path)
    allocation, _ = before.allocate(key(1), namespace="ns", name="p")
    before.close()
    after = Ipam(CIDR, tmp_path)
    assert after.lookup(key(1)) == allocation
    assert after.allocate(key(2))[0].ip != allocation.ip
    assert after.allocations()[0] == allocation


def test_concurrent_threads_never_share_an_address(ipam):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: ipam.allocate(key(n))[0].ip, range(100)))
    assert len(set(results)) == 100


def _allocate_many(directory: str, worker: int, count: int, out) -> None:
    allocator = Ipam(CIDR, directory)
    out.put([str(allocator.allocate(AttachmentKey(f"w{worker}-{n}", "eth0"))[0].ip)
             for n in range(count)])


def test_concurrent_processes_never_share_an_address(tmp_path):
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [context.Process(target=_allocate_many, args=(str(tmp_path), w, 30, out))
               for w in range(4)]
    for worker in workers:
        worker.start()
    addresses = [ip for _ in workers for ip in out.get(timeout=60)]
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    assert len(addresses) == 120
    assert len(set(addresses)) == 120
    assert len(Ipam(CIDR, tmp_path).allocations()) == 120


def test_prune_removes_what_does_not_point_back(ipam, tmp_path):
    kept, _ = ipam.allocate(key(1))
    directory = tmp_path / "ipam"
    (directory / "198.18.0.77").write_text("{not json")  # a writer crashed mid-write
    (directory / compute_key_filename(key(9))).symlink_to("198.18.0.99")  # index, no file
    orphan = ipam.allocate(key(2))[0]
    os.unlink(directory / compute_key_filename(key(2)))  # allocation without its index
    assert ipam.prune() == 3
    assert [a.ip for a in ipam.allocations()] == [kept.ip]
    assert ipam.lookup(key(1)) == kept
    assert ipam.lookup(key(2)) is None
    assert orphan.ip not in [a.ip for a in ipam.allocations()]


def test_an_allocation_from_an_old_cidr_is_listed_and_released(tmp_path):
    old = Ipam(IPv4Network("198.18.9.0/24"), tmp_path)
    allocation, _ = old.allocate(key(1))
    old.close()
    new = Ipam(CIDR, tmp_path)
    assert new.allocations() == [allocation]
    assert new.release(key(1)) == allocation


def test_a_stale_in_memory_view_never_double_allocates(tmp_path):
    first, second = Ipam(CIDR, tmp_path), Ipam(CIDR, tmp_path)
    a, _ = first.allocate(key(1))
    b, _ = second.allocate(key(2))  # second never saw first's allocation in memory
    c, _ = first.allocate(key(3))   # ...and first never saw second's
    assert len({a.ip, b.ip, c.ip}) == 3


def test_addresses_freed_by_another_process_are_found_before_exhaustion(tmp_path):
    cidr = IPv4Network("198.18.6.0/30")
    first, second = Ipam(cidr, tmp_path), Ipam(cidr, tmp_path)
    first.allocate(key(1))
    first.allocate(key(2))
    second.release(key(1))
    assert first.allocate(key(3))[0].ip == IPv4Address("198.18.6.1")
