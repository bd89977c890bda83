"""Node steering against the kernel: the pure plan (`plan_steering`), table by table, and
the two apply phases on fakes."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from meshgress.slots import DROP_MARK, DROP_TABLE
from nodeagent.managers import SteeringManager
from nodeagent.steering import SteeringState, slot_table_routes
from nodeagent.steering_kernel import (
    FakeSteering,
    ObservedSteering,
    SlotTunnelsFailed,
    SteeringPlan,
    apply_steering_adds,
    apply_steering_removes,
    plan_steering,
)
from wireguard.errors import DeviceStartError
from wireguard.fake import FakeBackend
from wireguard.keys import generate_private_key
from wireguard.model import Device

KEY = generate_private_key()
A, B = "mge0000000a", "mge0000000b"
SOURCE = ipaddress.IPv4Address("198.18.1.0")


def device(name: str) -> Device:
    return Device(name, private_key=KEY, listen_port=0, mtu=1420)


def desired(*names: str, tenures: dict[str, str] | None = None) -> SteeringState:
    numbered = {name: n for n, name in enumerate(names)}
    return SteeringState(
        devices=tuple(device(n) for n in names), probe_targets=(),
        rules=((DROP_MARK, DROP_TABLE), *(((n + 1) << 16, 51821 + n)
                                          for n in numbered.values())),
        routes=((DROP_TABLE, None), *(route for name, n in numbered.items()
                                      for route in slot_table_routes(n, name))),
        sets=(), chains=(), buckets={}, tenures=tenures or dict.fromkeys(names, "gw@1"))


EVERYTHING_A = ObservedSteering(
    interfaces=frozenset({A}), routes=frozenset({(DROP_TABLE, None), (51821, A), (51821, None)}),
    rules=frozenset({(DROP_MARK, DROP_TABLE), (0x10000, 51821)}),
    probe_addresses=frozenset({A}), loose_rp_filter=frozenset({A}))


@pytest.mark.parametrize(("want", "observed", "tenures", "expected"), [
    (desired(A), EVERYTHING_A, {A: "gw@1"}, SteeringPlan(devices=(device(A),))),
    (desired(A), ObservedSteering(), {}, SteeringPlan(
        devices=(device(A),), add_probe_addresses=(A,), set_rp_filter=(A,),
        add_routes=((DROP_TABLE, None), (51821, None), (51821, A)),
        add_rules=((0x10000, 51821), (DROP_MARK, DROP_TABLE)))),
    (desired(A, tenures={A: "gw@2"}), EVERYTHING_A, {A: "gw@1"},
     SteeringPlan(devices=(device(A),), reset_sessions=(A,))),
    (desired(), EVERYTHING_A, {A: "gw@1"}, SteeringPlan(
        remove_rules=((0x10000, 51821),), remove_routes=((51821, None), (51821, A)),
        remove_interfaces=(A,))),
    (desired(B), EVERYTHING_A, {}, SteeringPlan(
        devices=(device(B),), add_probe_addresses=(B,), set_rp_filter=(B,),
        add_routes=((51821, B),), remove_interfaces=(A,))),
    (desired(A), ObservedSteering(interfaces=frozenset({A, B}),
                                  routes=EVERYTHING_A.routes | {(51822, B), (51822, None)},
                                  rules=EVERYTHING_A.rules | {(0x20000, 51822)},
                                  probe_addresses=frozenset({A}),
                                  loose_rp_filter=frozenset()), {},
     SteeringPlan(devices=(device(A),), set_rp_filter=(A,),
                  remove_rules=((0x20000, 51822),),
                  remove_routes=((51822, None), (51822, B)),
                  remove_interfaces=(B,))),
], ids=["in step: nothing to do", "from nothing", "a new holder tenure resets the session",
        "everything goes", "a table changes its interface in place", "a stale slot goes"])
def test_plan_steering(want, observed, tenures, expected):
    plan = plan_steering(want, observed, tenures)
    assert plan == SteeringPlan(**{**expected.__dict__, "tenures": {
        name: want.tenures[name] for name in sorted(want.tenures)}})


def test_after_a_restart_what_is_found_is_adopted():
    # No remembered tenures: nothing is reset, nothing re-added.
    plan = plan_steering(desired(A, tenures={A: "gw@7"}), EVERYTHING_A, {})
    assert not plan.reset_sessions and not plan.add_routes and not plan.add_rules


def test_a_slot_table_without_its_blackhole_gets_one_and_nothing_else_changes():
    """A table written before slot tables had their fallback (or one whose blackhole
    someone deleted) is completed in place."""
    found = ObservedSteering(**{**EVERYTHING_A.__dict__,
                                "routes": EVERYTHING_A.routes - {(51821, None)}})
    plan = plan_steering(desired(A), found, {A: "gw@1"})
    assert plan == SteeringPlan(devices=(device(A),), add_routes=((51821, None),),
                                tenures={A: "gw@1"})


def test_a_tables_new_tunnel_route_replaces_the_old_one_and_keeps_the_blackhole():
    wireguard = FakeBackend()
    port = FakeSteering(wireguard)
    apply_steering_adds(port, wireguard, plan_steering(desired(A), port.read(SOURCE), {}),
                        SOURCE)
    apply_steering_adds(port, wireguard, plan_steering(desired(B), port.read(SOURCE), {}),
                        SOURCE)
    assert {r for r in port.routes if r[0] == 51821} == {(51821, B), (51821, None)}


def test_phases_add_everything_first_and_remove_only_in_phase_two():
    wireguard = FakeBackend()
    port = FakeSteering(wireguard)
    plan = plan_steering(desired(A), port.read(SOURCE), {})
    apply_steering_adds(port, wireguard, plan, SOURCE)
    assert port.read(SOURCE) == EVERYTHING_A
    plan = plan_steering(desired(B), port.read(SOURCE), {A: "gw@1"})
    apply_steering_adds(port, wireguard, plan, SOURCE)
    assert {A, B} <= port.interfaces and (51821, B) in port.routes
    apply_steering_removes(port, wireguard, plan)
    assert port.interfaces == {B} and wireguard.read(A) is None


class OneTunnelFails(FakeBackend):
    def __init__(self, failing: str) -> None:
        super().__init__()
        self.failing = failing

    def apply(self, plan: Any) -> None:
        if plan.name == self.failing:
            raise DeviceStartError(f"{plan.name}: wireguard-go did not start")
        super().apply(plan)


def test_a_tunnel_that_fails_does_not_keep_the_other_slots_from_their_tables_and_rules():
    wireguard = OneTunnelFails(A)
    port = FakeSteering(wireguard)
    steering = SteeringManager(port, wireguard)
    steering.read(SOURCE)
    plan = steering.plan(desired(A, B))
    with pytest.raises(SlotTunnelsFailed) as raised:
        steering.apply_adds(plan, SOURCE)
    assert set(raised.value.failed) == {A} and raised.value.temporary
    # B's packets are marked for table 51822 by the nftables step that follows: its route
    # and rule are there. A's table gets no rule while its tunnel is missing.
    assert (51822, B) in port.routes and (0x20000, 51822) in port.rules
    assert B in port.probe and B in port.loose
    assert not any(table == 51821 for _, table in port.rules)
    assert (DROP_MARK, DROP_TABLE) in port.rules and (DROP_TABLE, None) in port.routes
    # Once A's tunnel comes up, the next pass completes it, and B's session is left alone.
    wireguard.failing = ""
    steering.read(SOURCE)
    plan = steering.plan(desired(A, B))
    assert plan.reset_sessions == ()
    steering.apply_adds(plan, SOURCE)
    assert (0x10000, 51821) in port.rules and (51821, A) in port.routes
