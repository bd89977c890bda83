"""Pure CNI logic: names, CNI_ARGS, requests, results per spec version, GC and allocation."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import protocol as p
from cni.model import (
    AttachmentKey,
    GcPlan,
    HostLinkClaim,
    PodAttachment,
    WiringPlan,
    compute_check_problems,
    compute_host_ifname,
    compute_host_link_claims,
    compute_host_mac,
    compute_mac,
    compute_next_free,
    compute_pod_cidr_usable,
    compute_result,
    compute_wiring_plan,
    parse_request,
    parse_valid_attachments,
    plan_gc,
)

CONTAINER_IDS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=80
).filter(lambda s: s[0].isalnum())


# --- host interface names ---------------------------------------------------------------


def test_host_ifname_is_prefix_plus_hash():
    name = compute_host_ifname("abc123", "eth0")
    assert name.startswith("mgc")
    assert len(name) == 14
    assert all(c in "0123456789abcdef" for c in name[3:])


def test_host_ifname_and_mac_are_pinned():
    """A restarted agent finds its veths by these: they must not change between releases
    (an earlier release's names are still claimed through the allocation's record)."""
    assert compute_host_ifname("abc123", "eth0") == "mgc16d0a1c7662"
    assert compute_host_mac("abc123", "eth0") == "0a:a9:c5:6d:cc:2d"


@given(CONTAINER_IDS, st.sampled_from(["eth0", "net1", "eth1"]))
def test_host_ifname_fits_the_kernel_limit_and_is_stable(container_id, ifname):
    name = compute_host_ifname(container_id, ifname)
    assert len(name.encode()) <= 15
    assert name == compute_host_ifname(container_id, ifname)


def test_host_ifname_differs_per_interface_of_the_same_container():
    assert compute_host_ifname("c1", "eth0") != compute_host_ifname("c1", "net1")


def test_attachments_that_concatenate_alike_get_different_names():
    """Hashing container id and ifname run together gave ('abc', 'eth0') and ('abce',
    'th0') one host veth: one pod's ADD or DEL then destroyed the other's."""
    assert compute_host_ifname("abc", "eth0") != compute_host_ifname("abce", "th0")
    assert compute_host_mac("abc", "eth0") != compute_host_mac("abce", "th0")


@given(st.text(alphabet="abc0", min_size=2, max_size=20), st.data())
def test_every_split_of_one_string_is_a_different_attachment(joined, data):
    first = data.draw(st.integers(1, len(joined) - 1))
    second = data.draw(st.integers(1, len(joined) - 1).filter(lambda n: n != first))
    names = {compute_host_ifname(joined[:n], joined[n:]) for n in (first, second)}
    assert len(names) == 2


def test_host_mac_is_locally_administered_unicast_and_not_the_name_hash():
    mac = compute_host_mac("abc123", "eth0")
    assert int(mac[:2], 16) & 0x03 == 0x02
    assert mac.replace(":", "")[2:] not in compute_host_ifname("abc123", "eth0")


def test_a_claim_recognises_its_veth_by_name_and_mac():
    claim = HostLinkClaim("mgc0123456789a", "02:11:22:33:44:55")
    assert claim.owns("mgc0123456789a", "02:11:22:33:44:55", "veth")
    assert claim.owns("mgc0123456789a", "02:11:22:33:44:55".upper(), "veth")
    assert not claim.owns("mgc0123456789a", "02:11:22:33:44:56", "veth")  # another's
    assert not claim.owns("mgc0123456789a", "02:11:22:33:44:55", "bridge")
    assert not claim.owns("mgc0123456789b", "02:11:22:33:44:55", "veth")


LEGACY_C1_ETH0 = "mgc63877c11219"
"""The name an earlier version gave ('c1', 'eth0'): sha256 of the two run together."""


def test_an_allocation_recorded_by_an_earlier_version_claims_its_name_alone():
    key = AttachmentKey("c1", "eth0")
    (own,) = compute_host_link_claims(key)
    assert compute_host_link_claims(key, own.name) == (own,)
    own_again, legacy = compute_host_link_claims(key, LEGACY_C1_ETH0)
    assert own_again == own
    assert legacy == HostLinkClaim(LEGACY_C1_ETH0, own.mac, by_name=True)
    assert legacy.owns(LEGACY_C1_ETH0, "0a:0b:0c:0d:0e:0f", "veth")


@given(st.binary(min_size=6, max_size=6))
def test_mac_is_locally_administered_unicast(seed):
    mac = compute_mac(seed)
    first = int(mac.split(":")[0], 16)
    assert first & 0x01 == 0
    assert first & 0x02 == 2
    assert len(mac) == 17


# --- CNI_ARGS and syntax rules ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "p"}),
        ("IgnoreUnknown=1;K8S_POD_NAME=p;", {"IgnoreUnknown": "1", "K8S_POD_NAME": "p"}),
        ("A=;B=x=y", {"A": "", "B": "x=y"}),
    ],
    ids=["empty", "pod namespace and name", "trailing semicolon", "empty and '=' in value"],
)
def test_parse_cni_args(text, expected):
    assert p.parse_cni_args(text) == expected


@pytest.mark.parametrize("text", ["K8S_POD_NAME", "=value", "A=1;junk"],
                         ids=["no equals", "empty key", "one bad pair"])
def test_parse_cni_args_rejects_bad_pairs(text):
    with pytest.raises(p.CniError) as err:
        p.parse_cni_args(text)
    assert err.value.code == p.ERR_INVALID_ENV


@pytest.mark.parametrize("value", ["", "-abc", "a b", "ä1", "a/b"],
                         ids=["empty", "leading dash", "space", "non-ascii", "slash"])
def test_container_id_rules(value):
    with pytest.raises(p.CniError) as err:
        p.check_container_id(value)
    assert err.value.code == p.ERR_INVALID_ENV


@pytest.mark.parametrize("value", ["", "a" * 16, "a/b", "a b", ".", "..", "eth:0"],
                         ids=["empty", "16 bytes", "slash", "space", "dot", "dotdot", "colon"])
def test_ifname_rules(value):
    with pytest.raises(p.CniError) as err:
        p.check_ifname(value)
    assert err.value.code == p.ERR_INVALID_ENV


def test_valid_names_pass():
    assert p.check_container_id("0a_b.c-d") == "0a_b.c-d"
    assert p.check_ifname("a" * 15) == "a" * 15


# --- requests ---------------------------------------------------------------------------


def raw_request(command="ADD", config=None, **fields):
    config = config if config is not None else {"cniVersion": "1.0.0", "name": "n", "type": "t"}
    base = {"command": command, "containerID": "c1", "ifname": "eth0",
            "netns": "/run/netns/x", "args": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", "path": "",
            "stdin": json.dumps(config) if not isinstance(config, str) else config}
    base.update(fields)
    return base


def test_parse_request_keeps_kubernetes_identity():
    request = parse_request(raw_request())
    assert (request.pod_namespace, request.pod_name) == ("ns", "p")
    assert request.key == AttachmentKey("c1", "eth0")
    assert request.cni_version == "1.0.0"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (raw_request(config="{nope"), p.ERR_DECODE),
        (raw_request(config="[1]"), p.ERR_INVALID_CONFIG),
        (raw_request(config={"name": "n"}), p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "0.3.1"}), p.ERR_INCOMPATIBLE_VERSION),
        (raw_request("GC", config={"cniVersion": "1.0.0"}), p.ERR_INCOMPATIBLE_VERSION),
        (raw_request(containerID=""), p.ERR_INVALID_ENV),
        (raw_request(netns=""), p.ERR_INVALID_ENV),
        (raw_request(args="broken"), p.ERR_INVALID_ENV),
        (raw_request(command="FLY"), p.ERR_INVALID_ENV),
        (raw_request(config={"cniVersion": "1.0.0", "mtu": 20}), p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "mtu": True}), p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "dns": "10.96.0.10"}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "dns": {"nameservers": "10.96.0.10"}}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "dns": {"domain": 5}}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "prevResult": []}), p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "prevResult": {"interfaces": 5}}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "prevResult": {"ips": ["10.0.0.1"]}}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config={"cniVersion": "1.0.0", "prevResult": {"dns": []}}),
         p.ERR_INVALID_CONFIG),
        (raw_request(config='{"cniVersion": "1.0.0", "x": ' + "[" * 65 + "]" * 65 + "}"),
         p.ERR_DECODE),
        (raw_request(config='{"cniVersion": "1.0.0", "x": ' + "[" * 5000 + "]" * 5000 + "}"),
         p.ERR_DECODE),
        (raw_request(config=" " * (p.MAX_CONFIG + 1)), p.ERR_INVALID_CONFIG),
        (raw_request(containerID="c" * (p.MAX_CONTAINER_ID + 1)), p.ERR_INVALID_ENV),
        (raw_request(ifname="\udcff"), p.ERR_INVALID_ENV),
        (raw_request(netns="/" + "n" * p.MAX_NETNS_PATH), p.ERR_INVALID_ENV),
        (raw_request(args="K8S_POD_NAME=" + "p" * 254), p.ERR_INVALID_ENV),
        (raw_request(path="/" * (p.MAX_ENV_VALUE + 1)), p.ERR_INVALID_ENV),
        (raw_request(containerID=5), p.ERR_INVALID_ENV),
    ],
    ids=["bad json", "not an object", "no version", "old version", "GC before 1.1",
         "no container id", "ADD without netns", "bad CNI_ARGS", "unknown command",
         "tiny mtu", "boolean mtu", "dns a string", "nameservers a string",
         "domain a number", "prevResult a list", "prevResult interfaces a number",
         "prevResult ips not objects", "prevResult dns a list", "nested 66 deep",
         "nested 5000 deep", "config too large", "container id too long",
         "ifname not utf-8", "netns path too long", "pod name too long",
         "CNI_PATH too large", "container id not a string"],
)
def test_parse_request_errors(raw, code):
    with pytest.raises(p.CniError) as err:
        parse_request(raw)
    assert err.value.code == code


def test_a_config_nested_64_deep_is_accepted():
    config = '{"cniVersion": "1.0.0", "x": ' + "[" * 63 + "]" * 63 + "}"
    assert parse_request(raw_request(config=config)).cni_version == "1.0.0"


def test_prev_result_and_dns_of_the_right_shape_are_accepted():
    config = {"cniVersion": "1.0.0", "dns": {"nameservers": ["10.96.0.10"], "domain": "c.l",
                                              "search": [], "options": ["ndots:5"]},
              "prevResult": {"interfaces": None, "ips": [{"address": "10.0.0.2/24"}],
                             "dns": {}}}
    assert parse_request(raw_request(config=config)).prev_result == config["prevResult"]


def test_del_does_not_need_a_namespace():
    assert parse_request(raw_request("DEL", netns="")).netns == ""


# --- results ----------------------------------------------------------------------------


def attachment(ip="198.18.0.7"):
    return PodAttachment("c1", "eth0", "/run/netns/x", "ns", "p", IPv4Address(ip),
                         compute_host_ifname("c1", "eth0"))


def plan(mtu=None) -> WiringPlan:
    return compute_wiring_plan(attachment(), "02:00:00:00:00:02", mtu)


def test_wiring_plan_claims_the_host_veth_by_the_attachment():
    assert plan().host_claim == HostLinkClaim(compute_host_ifname("c1", "eth0"),
                                              compute_host_mac("c1", "eth0"))
    legacy = PodAttachment("c1", "eth0", "/x", None, None, IPv4Address("198.18.0.7"),
                           LEGACY_C1_ETH0)
    claim = compute_wiring_plan(legacy, "02:00:00:00:00:02").host_claim
    assert claim == HostLinkClaim(LEGACY_C1_ETH0, compute_host_mac("c1", "eth0"), True)


def test_result_1_0_0():
    result = compute_result("1.0.0", plan(), "/run/netns/x")
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": compute_host_ifname("c1", "eth0"), "mac": compute_host_mac("c1", "eth0")},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/run/netns/x"},
        ],
        "ips": [{"address": "198.18.0.7/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {},
    }


def test_result_0_4_0_has_ip_versions():
    result = compute_result("0.4.0", plan(), "/run/netns/x")
    assert result["ips"][0]["version"] == "4"


@pytest.mark.parametrize(("version", "has_mtu"), [("1.0.0", False), ("1.1.0", True)])
def test_result_interface_mtu_only_from_1_1_0(version, has_mtu):
    result = compute_result(version, plan(mtu=1400), "/run/netns/x")
    assert ("mtu" in result["interfaces"][1]) == has_mtu


def test_result_appends_to_prev_result_with_shifted_interface_index():
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "lo0"}, {"name": "net0", "sandbox": "/x"}],
            "ips": [{"address": "10.0.0.2/24", "interface": 1}],
            "dns": {"nameservers": ["10.0.0.10"]}}
    result = compute_result("1.0.0", plan(), "/run/netns/x", prev_result=prev)
    assert [i["name"] for i in result["interfaces"]] == ["lo0", "net0",
                                                          compute_host_ifname("c1", "eth0"), "eth0"]
    assert result["ips"][0] == {"address": "10.0.0.2/24", "interface": 1}
    assert result["ips"][1]["interface"] == 3
    assert result["dns"] == {"nameservers": ["10.0.0.10"]}


def test_result_passes_configured_dns():
    result = compute_result("1.0.0", plan(), "/x", dns={"nameservers": ["10.96.0.10"]})
    assert result["dns"] == {"nameservers": ["10.96.0.10"]}


def test_check_problems_against_prev_result():
    good = compute_result("1.0.0", plan(), "/run/netns/x")
    config = {"cniVersion": "1.0.0", "prevResult": good}
    request = parse_request(raw_request("CHECK", config=config))
    assert compute_check_problems(request, IPv4Address("198.18.0.7"),
                                  compute_host_ifname("c1", "eth0")) == ()
    problems = compute_check_problems(request, IPv4Address("198.18.0.8"), "mgcother")
    assert any("198.18.0.8/32" in problem for problem in problems)
    assert any("mgcother" in problem for problem in problems)


# --- GC -----------------------------------------------------------------------------------


def test_valid_attachments_from_either_key():
    entry = [{"containerID": "c1", "ifname": "eth0"}]
    expected = frozenset({AttachmentKey("c1", "eth0")})
    assert parse_valid_attachments({"cni.dev/valid-attachments": entry}) == expected
    assert parse_valid_attachments({"cni.dev/attachments": entry}) == expected
    assert parse_valid_attachments({}) == frozenset()


@pytest.mark.parametrize("value", [{"a": 1}, [1], [{"containerID": 1, "ifname": "eth0"}]],
                         ids=["not a list", "not objects", "wrong types"])
def test_valid_attachments_rejects_garbage(value):
    with pytest.raises(p.CniError) as err:
        parse_valid_attachments({"cni.dev/valid-attachments": value})
    assert err.value.code == p.ERR_INVALID_CONFIG


def test_plan_gc_keeps_the_name_a_valid_allocation_records():
    keep = AttachmentKey("keep", "eth0")
    legacy = "mgc620b13766e3"  # an earlier version's name for ("keep", "eth0")
    links = [legacy, compute_host_ifname("keep", "eth0"), "mgcorphan0000"]
    result = plan_gc([keep], [keep], links, {keep: legacy})
    assert result == GcPlan(release=(), delete_links=("mgcorphan0000",))


def test_plan_gc_selects_what_no_valid_attachment_owns():
    keep, stale = AttachmentKey("keep", "eth0"), AttachmentKey("stale", "eth0")
    links = [compute_host_ifname("keep", "eth0"), compute_host_ifname("stale", "eth0"),
             "mgcorphan0000", "eth0", "meshgress0"]
    result = plan_gc([keep], [keep, stale], links)
    assert result.release == (stale,)
    assert result.delete_links == tuple(sorted([compute_host_ifname("stale", "eth0"),
                                                "mgcorphan0000"]))


@given(st.sets(CONTAINER_IDS, max_size=8), st.sets(CONTAINER_IDS, max_size=8))
def test_plan_gc_never_touches_a_valid_attachment(valid_ids, allocated_ids):
    valid = [AttachmentKey(c, "eth0") for c in valid_ids]
    allocated = [AttachmentKey(c, "eth0") for c in allocated_ids]
    links = [compute_host_ifname(k.container_id, k.ifname) for k in valid + allocated]
    result = plan_gc(valid, allocated, links)
    assert not set(result.release) & set(valid)
    assert not set(result.delete_links) & {compute_host_ifname(k.container_id, "eth0")
                                           for k in valid}
    assert set(result.release) == set(allocated) - set(valid)


# --- address selection --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "first", "last"),
    [("198.18.0.0/24", "198.18.0.1", "198.18.0.254"),
     ("198.18.0.0/30", "198.18.0.1", "198.18.0.2"),
     ("198.18.0.0/31", "198.18.0.0", "198.18.0.1"),
     ("198.18.0.9/32", "198.18.0.9", "198.18.0.9")],
    ids=["/24", "/30", "/31", "/32"],
)
def test_usable_range_skips_network_and_broadcast(cidr, first, last):
    lo, hi = compute_pod_cidr_usable(IPv4Network(cidr))
    assert (IPv4Address(lo), IPv4Address(hi)) == (IPv4Address(first), IPv4Address(last))


def test_next_free_starts_after_the_last_allocation_and_wraps():
    cidr = IPv4Network("198.18.0.0/29")  # .1 .. .6
    ip = IPv4Address
    taken = {ip("198.18.0.1"), ip("198.18.0.3")}
    assert compute_next_free(cidr, taken) == ip("198.18.0.2")
    assert compute_next_free(cidr, taken, after=ip("198.18.0.3")) == ip("198.18.0.4")
    assert compute_next_free(cidr, taken, after=ip("198.18.0.6")) == ip("198.18.0.2")


def test_next_free_none_when_exhausted():
    cidr = IPv4Network("198.18.0.0/30")
    assert compute_next_free(cidr, {IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2")}) is None


@given(st.sets(st.integers(1, 14)), st.integers(0, 15))
def test_next_free_is_free_and_usable(taken_offsets, after_offset):
    cidr = IPv4Network("198.18.0.0/28")
    taken = {cidr.network_address + o for o in taken_offsets}
    found = compute_next_free(cidr, taken, after=cidr.network_address + after_offset)
    if len(taken) == 14:
        assert found is None
    else:
        assert found is not None
        assert found not in taken
        assert found not in (cidr.network_address, cidr.broadcast_address)
        assert found in cidr
