"""NftablesAdapter against a stub libnftables context: what it sends, and how it fails.

The real libnftables is exercised by tests/privileged/test_nft_table.py; here a stub
records every call so the adapter's own logic (one transaction per plan, nothing for an
empty plan, a missing table told apart without reading error texts) is checked
without root.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from meshgress.kernel.nft_model import NftPlan, plan_ruleset
from meshgress.kernel.nftables import NftablesAdapter, NftError
from meshgress.kernel_ids import NFT_FAMILY, NFT_TABLE
from nodeagent.firewall import FirewallSpec, compute_ruleset

RULESET = compute_ruleset(FirewallSpec((ipaddress.IPv4Network("198.18.0.0/16"),)))
META = {"metainfo": {"version": "1.0.6", "json_schema_version": 1}}


class StubNft:
    """Records calls; answers `list tables` from `tables` and everything else from `reply`."""

    def __init__(self, tables: tuple[str, ...] = (), reply: Any = None, rc: int = 0,
                 error: str = "") -> None:
        self.tables = tables
        self.reply = reply
        self.rc = rc
        self.error = error
        self.calls: list[tuple[str, Any]] = []
        self.flags: dict[str, bool] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("set_") and name.endswith("_output"):
            return lambda value: self.flags.__setitem__(name[4:-7], value)
        raise AttributeError(name)

    def cmd(self, line: str) -> tuple[int, str, str]:
        self.calls.append(("cmd", line))
        return 0, "", ""

    def json_cmd(self, root: dict[str, Any]) -> tuple[int, Any, str]:
        self.calls.append(("json", root))
        (first, *_) = root["nftables"]
        if first == {"list": {"tables": {"family": "inet"}}}:
            return 0, {"nftables": [META] + [
                {"table": {"family": "inet", "name": n, "handle": 1}} for n in self.tables]}, ""
        return self.rc, self.reply if self.rc == 0 else "", self.error


def test_output_flags_are_set_for_json_with_counter_values() -> None:
    stub = StubNft()
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub)
    assert stub.flags == {"json": True, "echo": False, "stateless": False, "handle": False}


def test_read_of_a_missing_table_is_none_without_listing_it() -> None:
    stub = StubNft(tables=("filter",))
    assert NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).read() is None
    assert len(stub.calls) == 1


def test_read_returns_the_listing() -> None:
    listing = {"nftables": [META, {"table": {"family": "inet", "name": "meshgress"}}]}
    stub = StubNft(tables=("meshgress",), reply=listing)
    assert NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).read() == listing
    assert stub.calls[-1] == ("json", {"nftables": [
        {"list": {"table": {"family": "inet", "name": "meshgress"}}}]})


def test_a_plan_is_one_transaction_and_the_table_comment_is_set_on_creation() -> None:
    stub = StubNft()
    plan = plan_ruleset(RULESET, None)
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).apply(plan)
    assert stub.calls == [
        ("cmd", 'add table inet meshgress { comment "managed by meshgress; do not edit"; }'),
        ("json", {"nftables": plan.commands()}),
    ]


def test_an_empty_plan_sends_nothing() -> None:
    stub = StubNft()
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).apply(NftPlan(NFT_FAMILY, NFT_TABLE))
    assert stub.calls == []


def test_an_update_does_not_touch_the_table() -> None:
    stub = StubNft()
    plan = NftPlan(NFT_FAMILY, NFT_TABLE, flush_chains=("guard_out",))
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).apply(plan)
    assert stub.calls == [("json", {"nftables": plan.commands()})]


def test_errors_carry_nfts_text_and_what_was_sent() -> None:
    stub = StubNft(rc=1, error="Error: Could not process rule: Operation not supported\n")
    plan = NftPlan(NFT_FAMILY, NFT_TABLE, flush_chains=("guard_out",))
    with pytest.raises(NftError) as info:
        NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).apply(plan)
    assert info.value.error == "Error: Could not process rule: Operation not supported"
    assert "Operation not supported" in str(info.value)
    assert info.value.commands == plan.commands()


def test_counters_of_a_missing_table_are_empty() -> None:
    assert NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=StubNft()).counters() == {}


def test_counters_are_read_by_name() -> None:
    stub = StubNft(tables=("meshgress",), reply={"nftables": [META, {"counter": {
        "family": "inet", "table": "meshgress", "name": "leak_out", "handle": 3,
        "packets": 4, "bytes": 336}}]})
    assert NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).counters() == {"leak_out": (4, 336)}


def test_delete_table_tolerates_a_missing_table() -> None:
    stub = StubNft()
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).delete_table()
    assert len(stub.calls) == 1  # only the look-up
    stub = StubNft(tables=("meshgress",), reply={"nftables": []})
    NftablesAdapter(NFT_FAMILY, NFT_TABLE, nft=stub).delete_table()
    assert stub.calls[-1] == ("json", {"nftables": [
        {"delete": {"table": {"family": "inet", "name": "meshgress"}}}]})
