"""Apply an nftables table: the adapter to libnftables, and its fake.

Why it exists: this is the only code of meshgress that talks to nftables. An adapter owns
one table (family and name given by its user). It reads the table as it is now (never
from memory), sends a plan computed by `meshgress.kernel.nft_model` as ONE atomic
libnftables JSON transaction, reads the named counters for metrics, and deletes the table
on an explicit uninstall only. Everything it sends comes from a plan; it decides nothing
itself.

- `NftablesPort` is the small interface callers code against.
- `NftablesAdapter` is the real one (the `nftables` module of pip-nftables, a ctypes
  wrapper of libnftables).
- `FakeNftablesAdapter` keeps a table in memory and applies plans with nft's semantics
  (atomic transactions, element add/delete, overlap and reference checks, counters that
  survive), so the layers above can be tested without root.
- `apply_ruleset(adapter, desired)` is one reconcile: read, plan, apply.

Network namespaces: libnftables opens its netlink socket when the `Nftables()` context is
created (checked on nft 1.0.6: a context created in namespace A keeps changing A after
its thread moved to B). An adapter therefore acts on the network namespace of the thread
that *constructed* it.

The table comment: libnftables 1.0.6 ignores "comment" on a table in JSON (input and
output), so when a plan creates the table the adapter first creates the empty table with
its comment in nft syntax — inert, it holds no chain — and then sends the transaction,
which is complete by itself (its own "add table" is a no-op then). Owners recognise their
table by family and name; the comment is for people reading `nft list ruleset`.
"""

from __future__ import annotations

import copy
import ipaddress
import threading
from collections.abc import Callable
from typing import Any, Protocol

import nftables

from meshgress.kernel.nft_model import (
    Json,
    NftPlan,
    Ruleset,
    canonical_json,
    plan_ruleset,
)


class NftError(Exception):
    """nftables refused a command. `error` is nft's own text; `commands` what was sent.

    Transient for a control loop (logged, counted, retried): the transaction was
    atomic, so nothing of it was applied.
    """

    def __init__(self, op: str, rc: int, error: str, commands: list[Json] | None = None):
        self.op = op
        self.rc = rc
        self.error = error.strip()
        self.commands = commands or []
        super().__init__(f"nft {op} failed (rc {rc}): {self.error}")


class NftablesPort(Protocol):
    """What an owner needs of nftables. Every method acts on the adapter's own table."""

    def read(self) -> dict[str, Json] | None:
        """The table as `nft -j list table` prints it, or None when it does not exist."""

    def apply(self, plan: NftPlan) -> None:
        """Send the plan as one atomic transaction (nothing at all when it is empty)."""

    def counters(self) -> dict[str, tuple[int, int]]:
        """{counter name: (packets, bytes)} of the table's named counters ({}: no table)."""

    def delete_table(self) -> None:
        """Remove the table (uninstall only). A missing table is not an error."""


def apply_ruleset(adapter: NftablesPort, desired: Ruleset) -> NftPlan:
    """One reconcile of the table: read it now, plan, apply. Returns the plan for logs."""
    plan = plan_ruleset(desired, adapter.read())
    if not plan.empty:
        adapter.apply(plan)
    return plan


class NftablesAdapter:
    """The real nftables, through libnftables' JSON API.

    Acts on the network namespace of the thread that constructs it (see the module
    docstring). Thread-safe: a libnftables context is not, so calls are serialised.
    """

    def __init__(self, family: str, table: str, *, nft: Any = None) -> None:
        if nft is None:
            nft = nftables.Nftables()  # opens the netlink socket: binds the namespace
        self.family = family
        self.table = table
        self._nft = nft
        self._nft.set_json_output(True)
        self._nft.set_echo_output(False)
        self._nft.set_stateless_output(False)  # counters must be listed with their values
        self._nft.set_handle_output(False)
        self._lock = threading.Lock()

    def _run(self, op: str, commands: list[Json]) -> Json:
        rc, output, error = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(op, rc, error or "(no message)", commands)
        return output if output else {"nftables": []}

    def _exists(self) -> bool:
        # Asked first, so a missing table is told apart without reading error texts.
        listed = self._run("list tables", [{"list": {"tables": {"family": self.family}}}])
        return any(item.get("table", {}).get("name") == self.table
                   for item in listed.get("nftables", []) if isinstance(item, dict))

    def read(self) -> dict[str, Json] | None:
        with self._lock:
            if not self._exists():
                return None
            result: dict[str, Json] = self._run(
                "list table", [{"list": {"table": {"family": self.family,
                                                   "name": self.table}}}])
            return result

    def apply(self, plan: NftPlan) -> None:
        if plan.empty:
            return
        with self._lock:
            if plan.create_table:
                comment = plan.table_comment.replace('"', "'")
                line = f'add table {plan.family} {plan.table} {{ comment "{comment}"; }}'
                rc, _, error = self._nft.cmd(line)
                if rc != 0:
                    raise NftError("create table", rc, error or "(no message)")
            self._run("apply", plan.commands())

    def counters(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            if not self._exists():
                return {}
            listed = self._run("list counters", [{"list": {"counters": {
                "family": self.family, "table": self.table}}}])
        result: dict[str, tuple[int, int]] = {}
        for item in listed.get("nftables", []):
            counter = item.get("counter") if isinstance(item, dict) else None
            if counter and counter.get("table") == self.table:
                result[counter["name"]] = (int(counter["packets"]), int(counter["bytes"]))
        return result

    def delete_table(self) -> None:
        with self._lock:
            if self._exists():
                self._run("delete table", [{"delete": {"table": {
                    "family": self.family, "name": self.table}}}])


# --- the fake ----------------------------------------------------------------------------


def _interval(elem: Json) -> tuple[int, int] | None:
    """The address range an IPv4 interval-set element covers (None: not an address)."""
    key = elem[0] if isinstance(elem, list) else elem
    try:
        if isinstance(key, str):
            addr = int(ipaddress.IPv4Address(key))
            return addr, addr
        if isinstance(key, dict) and "prefix" in key:
            net = ipaddress.IPv4Network(f"{key['prefix']['addr']}/{key['prefix']['len']}")
            return int(net.network_address), int(net.broadcast_address)
        if isinstance(key, dict) and "range" in key:
            low, high = key["range"]
            return int(ipaddress.IPv4Address(low)), int(ipaddress.IPv4Address(high))
    except (ValueError, KeyError, TypeError):
        return None
    return None


def _refs(value: Json, kind: str) -> set[str]:
    found: set[str] = set()
    if isinstance(value, str) and kind == "set" and value.startswith("@"):
        found.add(value[1:])
    elif isinstance(value, list):
        for item in value:
            found |= _refs(item, kind)
    elif isinstance(value, dict):
        for key, item in value.items():
            if kind == "counter" and key == "counter" and isinstance(item, str):
                found.add(item)
            elif kind == "chain" and key in ("jump", "goto") and isinstance(item, dict):
                found.add(str(item.get("target")))
            else:
                found |= _refs(item, kind)
    return found


class _FakeTable:
    def __init__(self, family: str, name: str) -> None:
        self.family = family
        self.name = name
        self.counters: dict[str, dict[str, Json]] = {}
        self.sets: dict[str, tuple[str, dict[str, Json]]] = {}  # name: (kind, object)
        self.chains: dict[str, dict[str, Json]] = {}
        self.rules: list[dict[str, Json]] = []


class FakeNftablesAdapter:
    """An in-memory table with nft's transaction semantics.

    `run(commands)` applies raw JSON commands (tests use it to cause drift); `hit()`
    makes a counter count, as traffic would; `applied` records every non-empty plan;
    `fail_next` makes the next `apply` raise it. No I/O.
    """

    def __init__(self, family: str, table: str) -> None:
        self.family = family
        self.table = table
        self.state: _FakeTable | None = None
        self.applied: list[NftPlan] = []
        self.fail_next: NftError | None = None
        self._handle = 0

    # -- NftablesPort

    def read(self) -> dict[str, Json] | None:
        state = self.state
        if state is None:
            return None
        out: list[Json] = [
            {"metainfo": {"version": "fake", "json_schema_version": 1}},
            {"table": {"family": state.family, "name": state.name, "handle": 1}},
        ]
        out += [{"counter": copy.deepcopy(c)} for c in state.counters.values()]
        out += [{kind: copy.deepcopy(obj)} for kind, obj in state.sets.values()]
        out += [{"chain": copy.deepcopy(c)} for c in state.chains.values()]
        for chain in state.chains:
            out += [{"rule": copy.deepcopy(r)} for r in state.rules if r["chain"] == chain]
        return {"nftables": out}

    def apply(self, plan: NftPlan) -> None:
        if plan.empty:
            return
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self.run(plan.commands())
        self.applied.append(plan)

    def counters(self) -> dict[str, tuple[int, int]]:
        if self.state is None:
            return {}
        return {name: (int(c["packets"]), int(c["bytes"]))
                for name, c in self.state.counters.items()}

    def delete_table(self) -> None:
        self.state = None

    # -- test helpers

    def hit(self, counter: str, packets: int = 1, size: int = 84) -> None:
        assert self.state is not None
        self.state.counters[counter]["packets"] += packets
        self.state.counters[counter]["bytes"] += packets * size

    def run(self, commands: list[Json]) -> None:
        """Apply commands atomically: all of them, or none and NftError."""
        state = copy.deepcopy(self.state)
        handle = self._handle
        for index, command in enumerate(commands):
            try:
                state, handle = self._one(state, handle, command)
            except (KeyError, ValueError, TypeError) as exc:
                raise NftError("apply", 1, f"command {index} {canonical_json(command)}: "
                               f"{exc}", commands) from None
        self.state, self._handle = state, handle

    def _one(self, state: _FakeTable | None, handle: int,
             command: Json) -> tuple[_FakeTable | None, int]:
        ((verb, body),) = command.items()
        ((kind, obj),) = body.items()
        handle += 1
        if kind == "table":
            return self._table(state, verb, obj), handle
        if state is None or obj.get("table") != self.table or obj.get("family") != self.family:
            raise KeyError("No such file or directory (table)")
        if kind == "element":
            self._elements(state, verb, obj.get("name"), obj["elem"])
            return state, handle
        action = self._ACTIONS.get((verb, "set" if kind == "map" else kind))
        if action is None:
            raise ValueError(f"unsupported command {verb} {kind}")
        action(self, state, handle, kind, obj)
        return state, handle

    def _table(self, state: _FakeTable | None, verb: str, obj: Json) -> _FakeTable | None:
        if (obj["family"], obj["name"]) != (self.family, self.table):
            raise ValueError("the fake holds only its own table")
        if verb == "add":
            return state or _FakeTable(self.family, self.table)
        if verb == "delete":
            if state is None:
                raise KeyError("No such file or directory")
            return None
        raise ValueError(f"unsupported {verb} table")

    def _flush_chain(self, state: _FakeTable, _handle: int, _kind: str, obj: Json) -> None:
        name = obj.get("name")
        if name not in state.chains:
            raise KeyError(f"no chain {name}")
        state.rules = [r for r in state.rules if r["chain"] != name]

    def _delete_chain(self, state: _FakeTable, _handle: int, _kind: str, obj: Json) -> None:
        name = obj.get("name")
        if name not in state.chains:
            raise KeyError(f"no chain {name}")
        users = [r for r in state.rules
                 if r["chain"] == name or name in _refs(r["expr"], "chain")]
        users += [s for _, s in state.sets.values() if name in _refs(s.get("elem"), "chain")]
        if users:
            raise ValueError(f"Device or resource busy: chain {name} in use")
        del state.chains[name]

    def _delete_set(self, state: _FakeTable, _handle: int, kind: str, obj: Json) -> None:
        name = obj.get("name")
        if name not in state.sets or state.sets[name][0] != kind:
            raise KeyError(f"no {kind} {name}")
        if any(name in _refs(r["expr"], "set") for r in state.rules):
            raise ValueError(f"Device or resource busy: {kind} {name} in use")
        del state.sets[name]

    def _delete_counter(self, state: _FakeTable, _handle: int, _kind: str, obj: Json) -> None:
        name = obj.get("name")
        if name not in state.counters:
            raise KeyError(f"no counter {name}")
        if any(name in _refs(r["expr"], "counter") for r in state.rules):
            raise ValueError(f"Device or resource busy: counter {name} in use")
        del state.counters[name]

    def _add_set(self, state: _FakeTable, handle: int, kind: str, obj: Json) -> None:
        name = obj.get("name")
        definition = {k: v for k, v in obj.items() if k in ("type", "map", "flags") and v}
        if name in state.sets:
            old_kind, old = state.sets[name]
            if old_kind != kind or any(old.get(k) != v for k, v in definition.items()):
                raise ValueError(f"File exists: {kind} {name} with another definition")
            return
        state.sets[name] = (kind, {"family": self.family, "name": name, "table": self.table,
                                   "handle": handle, **definition})

    def _add_counter(self, state: _FakeTable, handle: int, _kind: str, obj: Json) -> None:
        name = obj.get("name")
        if name not in state.counters:
            state.counters[name] = {
                "family": self.family, "name": name, "table": self.table, "handle": handle,
                **({"comment": obj["comment"]} if obj.get("comment") else {}),
                "packets": 0, "bytes": 0}

    def _add_chain(self, state: _FakeTable, handle: int, _kind: str, obj: Json) -> None:
        name = obj.get("name")
        hook = {k: obj[k] for k in ("type", "hook", "prio", "policy") if k in obj}
        if name in state.chains:
            old = state.chains[name]
            if any(old.get(k) != hook.get(k) for k in ("type", "hook", "prio")):
                raise ValueError("Operation not supported: chain hook cannot change")
            old.update(hook)
            return
        state.chains[name] = {"family": self.family, "table": self.table, "name": name,
                              "handle": handle, **hook}

    def _add_rule(self, state: _FakeTable, handle: int, _kind: str, obj: Json) -> None:
        chain = obj["chain"]
        if chain not in state.chains:
            raise KeyError(f"no chain {chain}")
        for ref_kind, known in (("set", state.sets), ("counter", state.counters),
                                ("chain", state.chains)):
            missing = _refs(obj["expr"], ref_kind) - set(known)
            if missing:
                raise KeyError(f"No such file or directory: {ref_kind} {missing}")
        rule = {"family": self.family, "table": self.table, "chain": chain, "handle": handle}
        if obj.get("comment"):
            rule["comment"] = obj["comment"]
        rule["expr"] = copy.deepcopy(obj["expr"])
        state.rules.append(rule)

    _ACTIONS: dict[tuple[str, str], Callable[[FakeNftablesAdapter, _FakeTable, int, str, Json],
                                             None]] = {
        ("flush", "chain"): _flush_chain,
        ("delete", "chain"): _delete_chain,
        ("delete", "set"): _delete_set,
        ("delete", "counter"): _delete_counter,
        ("add", "set"): _add_set,
        ("add", "counter"): _add_counter,
        ("add", "chain"): _add_chain,
        ("add", "rule"): _add_rule,
    }
    """What each (verb, kind) command does to the table (a map is handled as a set)."""

    def _elements(self, state: _FakeTable, verb: str, name: str, elems: list[Json]) -> None:
        if name not in state.sets:
            raise KeyError(f"no set {name}")
        _, obj = state.sets[name]
        current: list[Json] = obj.setdefault("elem", [])
        keys = {canonical_json(e[0] if isinstance(e, list) else e): i
                for i, e in enumerate(current)}
        interval = "interval" in obj.get("flags", [])
        for elem in elems:
            key = canonical_json(elem[0] if isinstance(elem, list) else elem)
            if verb == "delete":
                if key not in keys or canonical_json(current[keys[key]]) != canonical_json(elem):
                    raise KeyError(f"No such file or directory: element {key}")
                current.pop(keys[key])
            elif verb == "add":
                if key in keys:
                    if canonical_json(current[keys[key]]) != canonical_json(elem):
                        raise ValueError(f"File exists: element {key} with another value")
                    continue
                span = _interval(elem) if interval else None
                if span is not None:
                    for other in current:
                        other_span = _interval(other)
                        if other_span and span[0] <= other_span[1] and other_span[0] <= span[1]:
                            raise ValueError("interval overlaps with an existing one")
                current.append(copy.deepcopy(elem))
            else:
                raise ValueError(f"unsupported {verb} element")
            keys = {canonical_json(e[0] if isinstance(e, list) else e): i
                    for i, e in enumerate(current)}
        if not current:
            del obj["elem"]
