"""nftables as frozen values: a generic model of one table, and the plan that diffs it.

Why it exists: meshgress owns nftables tables whole — the node agent its `inet meshgress`
(the fail-closed guard, masquerade, egress steering), each gateway its `inet meshgress-gw`
(SNAT, tunnel filters) — and both need the same thing: say what the table should hold,
compare with what `nft -j list table` shows, and change only the difference. This module is
the pure half:

- the model: `NftSet`, `NftMap`, `NftCounter`, `NftChain` of `Rule`s, gathered in a
  `Ruleset` that names its family and table and checks its own references (every `@set`,
  named counter and jump target exists), so a bad compute fails in a unit test instead of
  at the kernel; expression helpers build the libnftables JSON of rules;
- `plan_ruleset(desired, observed)` diffs a ruleset against the parsed listing (None: no
  table) and returns the smallest `NftPlan` that makes the kernel match: set and map
  *elements* are added and deleted one by one, a chain whose rules differ is flushed and
  refilled, named counters are created when missing and never reset (deleted only when
  they belong to something gone, see `Ruleset.pruned_counters`), and the table is never
  flushed or deleted;
- `NftPlan.commands()` renders the plan as libnftables JSON commands; the adapter
  (`meshgress.kernel.nftables`) sends them as one atomic transaction.

How rules are recognised: every rule carries a comment `mg:<hash>` — a hash of its chain
name and its canonical JSON expression. The plan compares the sequence of comments of a
chain with the desired one and never parses rule expressions back (nft prints them in a
normalised form that differs from what was sent). A foreign rule (no or another comment),
a missing rule or a reordered rule makes the plan replace that chain's rules.

What a table holds is for its owner to compute (`nodeagent.firewall`, `gateway.rules`).

Purely computational: no I/O, no clocks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

Json = Any
"""A JSON value as libnftables reads and prints it (dict, list, str, int, None)."""

RULE_COMMENT_PREFIX = "mg:"


def canonical_json(value: Json) -> str:
    """One spelling per JSON value (sorted keys, no spaces): what hashes and diffs use."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# --- expression helpers (libnftables JSON), all purely computational ------------------


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def payload(protocol: str, field_name: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field_name}}


def match(left: Json, right: Json, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def set_ref(name: str) -> str:
    """A reference to a named set or map, as a rule's right-hand side."""
    return "@" + name


def counter_ref(name: str) -> Json:
    """The statement `counter name <name>` (a named counter object)."""
    return {"counter": name}


ACCEPT: Json = {"accept": None}
DROP: Json = {"drop": None}
MASQUERADE: Json = {"masquerade": None}


def jump(chain: str) -> Json:
    return {"jump": {"target": chain}}


def goto(chain: str) -> Json:
    return {"goto": {"target": chain}}


# --- the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A verdict as the value of a verdict map element (`accept`, `jump <chain>`, …)."""

    kind: str
    target: str | None = None

    def to_json(self) -> Json:
        return {self.kind: None if self.target is None else {"target": self.target}}


Scalar = ipaddress.IPv4Address | ipaddress.IPv4Network | int | str
Key = Scalar | tuple[Scalar, ...]
"""A set element (or map key): an address, a prefix (interval sets only), an integer
(marks, ports), a string (interface names) or a tuple of these (concatenated types)."""
Value = Scalar | Verdict


def _scalar_json(value: Scalar | Verdict) -> Json:
    if isinstance(value, Verdict):
        return value.to_json()
    if isinstance(value, ipaddress.IPv4Network):
        if value.prefixlen == value.max_prefixlen:
            # nft lists a /32 in an interval set as the bare address.
            return str(value.network_address)
        return {"prefix": {"addr": str(value.network_address), "len": value.prefixlen}}
    if isinstance(value, ipaddress.IPv4Address):
        return str(value)
    if isinstance(value, bool):  # bool is an int; never a valid element
        raise TypeError("booleans are not nftables values")
    return value


def element_json(key: Key) -> Json:
    """A set element exactly as `nft -j list` prints it (so observed and desired compare)."""
    if isinstance(key, tuple):
        return {"concat": [_scalar_json(part) for part in key]}
    return _scalar_json(key)


def _check_name(kind: str, name: str) -> None:
    if not name or not all(c.isalnum() or c == "_" for c in name) or not name[0].isalpha():
        raise ValueError(f"{kind} name {name!r}: use letters, digits and '_', starting "
                         f"with a letter")


def _check_elements(name: str, flags: tuple[str, ...], keys: Iterable[Key]) -> None:
    seen: set[str] = set()
    for key in keys:
        parts = key if isinstance(key, tuple) else (key,)
        for part in parts:
            if (isinstance(part, ipaddress.IPv4Network)
                    and part.prefixlen != part.max_prefixlen and "interval" not in flags):
                raise ValueError(f"set {name}: prefix {part} needs flags interval")
        text = canonical_json(element_json(key))
        if text in seen:
            raise ValueError(f"set {name}: duplicate element {text}")
        seen.add(text)


def _type_json(type_: str | tuple[str, ...]) -> Json:
    return list(type_) if isinstance(type_, tuple) else type_


@dataclass(frozen=True)
class NftSet:
    """A named set. `type` is an nft type name (`ipv4_addr`, `mark`, `ifname`, …) or a
    tuple of them for a concatenation. Elements keep the order compute gave them (which
    must be deterministic); the plan compares them as a set. Interval sets must not hold
    overlapping elements (nft refuses them): callers collapse prefixes first."""

    name: str
    type: str | tuple[str, ...]
    flags: tuple[str, ...] = ()
    elements: tuple[Key, ...] = ()

    kind = "set"

    def __post_init__(self) -> None:
        _check_name("set", self.name)
        object.__setattr__(self, "flags", tuple(sorted(set(self.flags))))
        _check_elements(self.name, self.flags, self.elements)

    def definition(self) -> dict[str, Json]:
        """The fields that, when they differ, force the set to be recreated."""
        return {"type": _type_json(self.type), "flags": list(self.flags)}

    def elements_json(self) -> tuple[Json, ...]:
        return tuple(element_json(key) for key in self.elements)


@dataclass(frozen=True)
class NftMap:
    """A named map from keys of `type` to values of `data` (`mark`, `verdict`, …)."""

    name: str
    type: str | tuple[str, ...]
    data: str
    flags: tuple[str, ...] = ()
    elements: tuple[tuple[Key, Value], ...] = ()

    kind = "map"

    def __post_init__(self) -> None:
        _check_name("map", self.name)
        object.__setattr__(self, "flags", tuple(sorted(set(self.flags))))
        _check_elements(self.name, self.flags, (key for key, _ in self.elements))

    def definition(self) -> dict[str, Json]:
        return {"type": _type_json(self.type), "map": self.data, "flags": list(self.flags)}

    def elements_json(self) -> tuple[Json, ...]:
        return tuple([element_json(key), _scalar_json(value)] for key, value in self.elements)


NamedSet = NftSet | NftMap


@dataclass(frozen=True)
class NftCounter:
    """A named counter object. Created when missing, never reset; deleted only when its
    name has one of the ruleset's `pruned_counters` prefixes and it is no longer wanted."""

    name: str
    comment: str = ""

    def __post_init__(self) -> None:
        _check_name("counter", self.name)


@dataclass(frozen=True)
class Hook:
    """What makes a chain a base chain: `type filter hook postrouting priority 110`."""

    type: str
    hook: str
    priority: int
    policy: str = "accept"


@dataclass(frozen=True)
class Rule:
    """One rule: its statements as canonical JSON (so the value is frozen and hashable).

    Build with `Rule.of(match(...), counter_ref(...), DROP)`.
    """

    expr: str

    @classmethod
    def of(cls, *statements: Json) -> Rule:
        if not statements:
            raise ValueError("a rule needs at least one statement")
        return cls(canonical_json(list(statements)))

    @property
    def statements(self) -> list[Json]:
        result: list[Json] = json.loads(self.expr)
        return result


def rule_comment(chain: str, rule: Rule) -> str:
    """The rule's identity in the kernel: a short stable hash of its chain and expression."""
    digest = hashlib.sha256(f"{chain}\n{rule.expr}".encode()).hexdigest()
    return RULE_COMMENT_PREFIX + digest[:12]


@dataclass(frozen=True)
class NftChain:
    """A chain and its rules, in order. `hook` None makes it a regular (jump-target) chain."""

    name: str
    rules: tuple[Rule, ...] = ()
    hook: Hook | None = None

    def __post_init__(self) -> None:
        _check_name("chain", self.name)
        comments = self.rule_comments()
        if len(set(comments)) != len(comments):
            raise ValueError(f"chain {self.name}: the same rule twice")

    def rule_comments(self) -> tuple[str, ...]:
        return tuple(rule_comment(self.name, rule) for rule in self.rules)


def _references(value: Json) -> Iterator[tuple[str, str]]:
    """(kind, name) of every set, counter and chain a JSON expression refers to."""
    if isinstance(value, str):
        if value.startswith("@"):
            yield "set", value[1:]
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "counter" and isinstance(item, str):
                yield "counter", item
            elif key in ("jump", "goto") and isinstance(item, dict):
                yield "chain", str(item.get("target"))
            else:
                yield from _references(item)


@dataclass(frozen=True)
class Ruleset:
    """Everything the table `family table` should hold. Sets, counters and chains keep
    compute's order; `comment` is for people reading `nft list ruleset`."""

    family: str
    table: str
    sets: tuple[NamedSet, ...] = ()
    counters: tuple[NftCounter, ...] = ()
    chains: tuple[NftChain, ...] = ()
    comment: str = ""
    pruned_counters: tuple[str, ...] = ()
    """Name prefixes of counters that come and go with what they count (one per egress
    policy, say): an observed counter with such a prefix that is not desired is deleted.
    Every other counter is kept forever, as the class says."""

    def __post_init__(self) -> None:
        for kind, names in (("set/map", [s.name for s in self.sets]),
                            ("counter", [c.name for c in self.counters]),
                            ("chain", [c.name for c in self.chains])):
            if len(set(names)) != len(names):
                raise ValueError(f"ruleset: duplicate {kind} name in {names}")
        known = {"set": {s.name for s in self.sets},
                 "counter": {c.name for c in self.counters},
                 "chain": {c.name for c in self.chains if c.hook is None}}
        sources: list[tuple[str, Json]] = [
            (f"chain {chain.name}", rule.statements) for chain in self.chains
            for rule in chain.rules]
        sources += [(f"map {m.name}", list(m.elements_json())) for m in self.sets
                    if isinstance(m, NftMap)]
        for where, statements in sources:
            for kind, name in _references(statements):
                if name not in known[kind]:
                    raise ValueError(f"ruleset: {where} refers to unknown {kind} {name!r}"
                                     + (" (jump targets must be regular chains)"
                                        if kind == "chain" else ""))

    def chain(self, name: str) -> NftChain:
        return next(c for c in self.chains if c.name == name)

    def named_set(self, name: str) -> NamedSet:
        return next(s for s in self.sets if s.name == name)


# --- observed state ---------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedChain:
    name: str
    hook: Hook | None
    rule_comments: tuple[str | None, ...]


@dataclass(frozen=True)
class ObservedSet:
    name: str
    kind: str  # "set" or "map"
    definition: str  # canonical JSON of the same fields as NftSet.definition()
    elements: tuple[str, ...]  # canonical JSON of each element, in listed order


@dataclass(frozen=True)
class ObservedTable:
    """The parts of a listed table the plan compares. Built by `parse_observed`."""

    chains: Mapping[str, ObservedChain] = field(default_factory=dict)
    sets: Mapping[str, ObservedSet] = field(default_factory=dict)
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def _definition_of(kind: str, obj: Mapping[str, Json]) -> str:
    type_ = obj.get("type")
    fields: dict[str, Json] = {"type": type_, "flags": sorted(obj.get("flags") or [])}
    if kind == "map":
        fields["map"] = obj.get("map")
    return canonical_json(fields)


def _desired_definition(named: NamedSet) -> str:
    fields = named.definition()
    fields["flags"] = sorted(fields["flags"])
    return canonical_json(fields)


def parse_observed(doc: Mapping[str, Json] | None, family: str,
                   table: str) -> ObservedTable | None:
    """Parse `nft -j list table <family> <table>` output (None: the table is missing).

    Objects of other tables are ignored, so a whole `list ruleset` may be passed too.
    Purely computational.
    """
    if doc is None:
        return None
    found_table = False
    chains: dict[str, ObservedChain] = {}
    rules: dict[str, list[str | None]] = {}
    sets: dict[str, ObservedSet] = {}
    counters: dict[str, tuple[int, int]] = {}
    for kind, obj in _objects_of(doc, family):
        if kind == "table":
            found_table = found_table or obj.get("name") == table
        elif obj.get("table") != table:
            continue
        elif kind == "chain":
            chains[obj["name"]] = ObservedChain(obj["name"], _hook_of(obj), ())
        elif kind == "rule":
            comment = obj.get("comment")
            rules.setdefault(obj["chain"], []).append(
                comment if isinstance(comment, str) else None)
        elif kind in ("set", "map"):
            sets[obj["name"]] = ObservedSet(
                obj["name"], kind, _definition_of(kind, obj),
                tuple(canonical_json(e) for e in obj.get("elem") or ()))
        elif kind == "counter":
            counters[obj["name"]] = (int(obj.get("packets", 0)), int(obj.get("bytes", 0)))
    if not found_table:
        return None
    for name, comments in rules.items():
        if name in chains:
            chains[name] = ObservedChain(name, chains[name].hook, tuple(comments))
    return ObservedTable(chains=chains, sets=sets, counters=counters)


def _objects_of(doc: Mapping[str, Json], family: str) -> Iterator[tuple[str, dict[str, Json]]]:
    """(kind, object) of every listed object of `family`."""
    for item in doc.get("nftables", []):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, obj),) = item.items()
        if isinstance(obj, dict) and obj.get("family") == family:
            yield kind, obj


def _hook_of(chain: Mapping[str, Json]) -> Hook | None:
    if "hook" not in chain:
        return None
    return Hook(str(chain.get("type")), str(chain["hook"]), int(chain.get("prio", 0)),
                str(chain.get("policy", "accept")))


# --- plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ElementChange:
    """Elements to add to or delete from one named set or map, as canonical JSON."""

    set_name: str
    elements: tuple[str, ...]


@dataclass(frozen=True)
class NftPlan:
    """What one transaction changes. Empty: nothing is sent.

    The commands run in this order, inside ONE atomic transaction (so no packet ever
    sees a half-applied state and the order is only about what nft accepts): add the
    table when missing; flush chains that are refilled or deleted; delete obsolete set
    elements (before adding new ones: nft refuses an interval that overlaps an existing
    one even when that one is deleted later in the same transaction); delete sets and
    chains that are obsolete or whose definition changed; add sets, counters and
    chains; add elements; add rules.
    """

    family: str
    table: str
    table_comment: str = ""
    create_table: bool = False
    flush_chains: tuple[str, ...] = ()
    delete_elements: tuple[ElementChange, ...] = ()
    delete_sets: tuple[tuple[str, str], ...] = ()  # (kind, name)
    delete_chains: tuple[str, ...] = ()
    delete_counters: tuple[str, ...] = ()
    add_sets: tuple[NamedSet, ...] = ()
    add_counters: tuple[NftCounter, ...] = ()
    add_chains: tuple[NftChain, ...] = ()
    add_elements: tuple[ElementChange, ...] = ()
    add_rules: tuple[tuple[str, Rule], ...] = ()  # (chain, rule)

    @property
    def empty(self) -> bool:
        return not (self.create_table or self.flush_chains or self.delete_elements
                    or self.delete_sets or self.delete_chains or self.delete_counters
                    or self.add_sets
                    or self.add_counters or self.add_chains or self.add_elements
                    or self.add_rules)

    def _ref(self, **extra: Json) -> dict[str, Json]:
        return {"family": self.family, "table": self.table, **extra}

    def commands(self) -> list[Json]:
        """The plan as libnftables JSON commands (the list under "nftables")."""
        cmds: list[Json] = []
        if self.create_table:
            # 1.0.6 ignores "comment" here; the adapter sets it (see kernel.nftables).
            cmds.append({"add": {"table": {"family": self.family, "name": self.table}}})
        cmds += [{"flush": {"chain": self._ref(name=name)}} for name in self.flush_chains]
        cmds += [{"delete": {"element": self._ref(
            name=c.set_name, elem=[json.loads(e) for e in c.elements])}}
            for c in self.delete_elements]
        cmds += [{"delete": {kind: self._ref(name=name)}} for kind, name in self.delete_sets]
        cmds += [{"delete": {"chain": self._ref(name=name)}} for name in self.delete_chains]
        # After the flushes: the kernel refuses to delete a counter a rule still uses.
        cmds += [{"delete": {"counter": self._ref(name=name)}} for name in self.delete_counters]
        cmds += [{"add": {s.kind: self._ref(name=s.name, **s.definition())}}
                 for s in self.add_sets]
        for counter in self.add_counters:
            note = {"comment": counter.comment} if counter.comment else {}
            cmds.append({"add": {"counter": self._ref(name=counter.name, **note)}})
        for chain in self.add_chains:
            hook = chain.hook
            extra: dict[str, Json] = {} if hook is None else {
                "type": hook.type, "hook": hook.hook, "prio": hook.priority,
                "policy": hook.policy}
            cmds.append({"add": {"chain": self._ref(name=chain.name, **extra)}})
        cmds += [{"add": {"element": self._ref(
            name=c.set_name, elem=[json.loads(e) for e in c.elements])}}
            for c in self.add_elements]
        cmds += [{"add": {"rule": self._ref(chain=chain, comment=rule_comment(chain, rule),
                                            expr=rule.statements)}}
                 for chain, rule in self.add_rules]
        return cmds

    def describe(self) -> list[str]:
        """For logs: one line saying what the plan touches, or none when it is empty."""
        return [] if self.empty else [self.summary()]

    def summary(self) -> str:
        """One line for logs: what the plan touches."""
        if self.empty:
            return "no change"
        parts = []
        if self.create_table:
            parts.append(f"create table {self.family} {self.table}")
        for label, names in (
                ("delete chains", self.delete_chains),
                ("delete counters", self.delete_counters),
                ("delete sets", tuple(name for _, name in self.delete_sets)),
                ("add sets", tuple(s.name for s in self.add_sets)),
                ("add counters", tuple(c.name for c in self.add_counters)),
                ("add chains", tuple(c.name for c in self.add_chains)),
                ("refill chains", tuple(n for n in self.flush_chains
                                        if n not in self.delete_chains))):
            if names:
                parts.append(f"{label} {','.join(names)}")
        for label, changes in (("-", self.delete_elements), ("+", self.add_elements)):
            for change in changes:
                parts.append(f"{change.set_name} {label}{len(change.elements)} elements")
        if self.add_rules:
            parts.append(f"{len(self.add_rules)} rules")
        return "; ".join(parts)


def _all_elements(named: NamedSet) -> tuple[str, ...]:
    return tuple(canonical_json(e) for e in named.elements_json())


def _set_users(desired: Ruleset, set_name: str) -> set[str]:
    """Chains whose desired rules refer to a set (they must be refilled if it is recreated)."""
    return {chain.name for chain in desired.chains for rule in chain.rules
            if ("set", set_name) in set(_references(rule.statements))}


def plan_ruleset(desired: Ruleset,
                 observed: Mapping[str, Json] | ObservedTable | None) -> NftPlan:
    """The smallest transaction that turns the observed table into `desired`.

    `observed` is the parsed output of `nft -j list table` (None or a listing without the
    table: it is missing). Purely computational.

    Guarantees: an equal table gives an empty plan; element changes are element adds and
    deletes only; a chain with different rules is flushed and refilled (never a chain
    that matches); named counters are added when missing and never recreated, so their
    values survive every plan; the table itself is never deleted or flushed. Objects the
    agent does not know in its own table (other chains, sets) are removed: it owns the
    table whole. Counters it does not want are left alone (deleting one would lose its
    values, and they are harmless) unless their name has one of the ruleset's
    `pruned_counters` prefixes: those belong to something that is gone.
    """
    table = observed if isinstance(observed, ObservedTable) else parse_observed(
        observed, desired.family, desired.table)
    if table is None:
        return NftPlan(
            family=desired.family, table=desired.table, table_comment=desired.comment,
            create_table=True,
            add_sets=desired.sets, add_counters=desired.counters, add_chains=desired.chains,
            add_elements=tuple(ElementChange(s.name, _all_elements(s))
                               for s in desired.sets if s.elements),
            add_rules=tuple((c.name, r) for c in desired.chains for r in c.rules),
        )

    sets = _plan_sets(desired, table)
    chains = _plan_chains(desired, table, sets.refill_chains)
    desired_counter_names = {c.name for c in desired.counters}
    delete_counters = tuple(
        name for name in sorted(table.counters)
        if name not in desired_counter_names
        and any(name.startswith(prefix) for prefix in desired.pruned_counters))

    return NftPlan(
        family=desired.family, table=desired.table, table_comment=desired.comment,
        flush_chains=chains.flush,
        delete_elements=sets.delete_elements,
        delete_sets=sets.delete_sets,
        delete_chains=chains.delete,
        delete_counters=delete_counters,
        add_sets=sets.add_sets,
        add_counters=tuple(c for c in desired.counters if c.name not in table.counters),
        add_chains=chains.add,
        add_elements=sets.add_elements,
        add_rules=chains.add_rules,
    )


@dataclass(frozen=True)
class _SetsPlan:
    delete_elements: tuple[ElementChange, ...]
    delete_sets: tuple[tuple[str, str], ...]
    add_sets: tuple[NamedSet, ...]
    add_elements: tuple[ElementChange, ...]
    refill_chains: frozenset[str]
    """Chains that refer to a set being recreated: they must be refilled with it."""


def _plan_sets(desired: Ruleset, table: ObservedTable) -> _SetsPlan:
    delete_elements: list[ElementChange] = []
    delete_sets: list[tuple[str, str]] = []
    add_sets: list[NamedSet] = []
    add_elements: list[ElementChange] = []
    refill_for_sets: set[str] = set()
    for named in desired.sets:
        wanted = _all_elements(named)
        seen = table.sets.get(named.name)
        if seen is not None and (seen.kind != named.kind
                                 or seen.definition != _desired_definition(named)):
            delete_sets.append((seen.kind, named.name))
            refill_for_sets |= _set_users(desired, named.name)
            seen = None
        if seen is None:
            add_sets.append(named)
            if wanted:
                add_elements.append(ElementChange(named.name, wanted))
            continue
        wanted_set, seen_set = set(wanted), set(seen.elements)
        stale = tuple(e for e in seen.elements if e not in wanted_set)
        missing = tuple(e for e in wanted if e not in seen_set)
        if stale:
            delete_elements.append(ElementChange(named.name, stale))
        if missing:
            add_elements.append(ElementChange(named.name, missing))
    desired_set_names = {s.name for s in desired.sets}
    delete_sets += [(seen.kind, name) for name, seen in sorted(table.sets.items())
                    if name not in desired_set_names]
    return _SetsPlan(tuple(delete_elements), tuple(delete_sets), tuple(add_sets),
                     tuple(add_elements), frozenset(refill_for_sets))


@dataclass(frozen=True)
class _ChainsPlan:
    flush: tuple[str, ...]
    delete: tuple[str, ...]
    add: tuple[NftChain, ...]
    add_rules: tuple[tuple[str, Rule], ...]


def _plan_chains(desired: Ruleset, table: ObservedTable,
                 refill_for_sets: frozenset[str]) -> _ChainsPlan:
    flush: list[str] = []
    delete_chains: list[str] = []
    add_chains: list[NftChain] = []
    add_rules: list[tuple[str, Rule]] = []
    for chain in desired.chains:
        seen_chain = table.chains.get(chain.name)
        if seen_chain is None:
            add_chains.append(chain)
        elif seen_chain.hook != chain.hook:
            # Type, hook or priority cannot change in place: recreate in the transaction.
            flush.append(chain.name)
            delete_chains.append(chain.name)
            add_chains.append(chain)
        elif seen_chain.rule_comments != chain.rule_comments() or chain.name in refill_for_sets:
            flush.append(chain.name)
        else:
            continue
        add_rules += [(chain.name, rule) for rule in chain.rules]
    desired_chain_names = {c.name for c in desired.chains}
    for name in sorted(table.chains):
        if name not in desired_chain_names:
            flush.append(name)
            delete_chains.append(name)
    return _ChainsPlan(tuple(flush), tuple(delete_chains), tuple(add_chains), tuple(add_rules))


def ruleset_commands(desired: Ruleset) -> list[Json]:
    """Every command that creates `desired` from nothing (what a missing table gets)."""
    return plan_ruleset(desired, None).commands()

