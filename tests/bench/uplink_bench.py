"""A gateway that loses its own underlay link: how long until its slot serves again.

Run as root:  .venv/bin/python tests/bench/uplink_bench.py [--rounds 6] [--down 6]
                  [--name buXXXX] [--json FILE]

Builds its own lab (`lab up --nodes 2 --gateway-nodes 4`) and removes it afterwards, also
on failure or Ctrl-C. Besides the lab's EgressGateway `egress` (192.0.2.201/.202, the
`payments` namespace) it adds `solo` with one egress IP, 192.0.2.203, and a policy sending
the `web` namespace through it: web's traffic has no other slot to fail over to, so its
egress comes back only when another gateway process takes the slot over. Four gateway
nodes, one slot each normally: three hold a slot, one is a standby with room (on a loaded
machine gateways may start far enough apart that one takes two slots; each round then
says how many slots the victim held).

Each round the node holding solo's slot loses its underlay link for `--down` seconds —
alternately `ip link set eth0 down` in the node (the kernel drops its routes) and the
switch side of its cable (carrier lost) — through `Lab.link`, in process, so the moment is
known. Meanwhile each web pod sends one UDP probe every 10 ms to the outside echo (answers
matched by sequence number), each payments pod does the same through its slot, and node1
itself sends a control stream that crosses no gateway (losses common to everything — a
starved machine — show there too). Measured per round: the web streams' largest gap (from
the first unanswered probe to the next answered one), when another process held solo's
lease after the link went down, probes lost on the payments streams of the slots the
victim did not hold and on the control stream (with their largest gaps), and how long
after the link came back its node was seen holding none of the gateway's objects (egress
IPs, slot interfaces, reply rules and routes; a look takes three `ip` commands). Then
median and worst. A gap is the longest time between two answered probes, so a sender the
machine starved counts against it: under load the gaps are upper bounds, and the control
stream shows how much of them is the machine's. The victim ends each round as the
standby with room, so every round starts from the same shape.

Exits non-zero only when it could not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gateway.claims import ORPHAN_GRACE_SECONDS  # noqa: E402
from meshgress.datastore.file import FileDatastore  # noqa: E402
from meshgress.lab.lab import Lab  # noqa: E402
from meshgress.slots import LEASE_DURATION_SECONDS  # noqa: E402

OUTSIDE, ECHO_PORT = "192.0.2.254", 7777
SOLO_IP = "192.0.2.203"
SOLO_LEASE = "egress-solo-0"
EGRESS_IPS = {"192.0.2.201", "192.0.2.202", SOLO_IP}
GATEWAY_TABLES = range(52076, 52076 + 126)
GATEWAY_RULE_PRIORITY = 101

# argv: host port seconds. One datagram every 10 ms for `seconds`, answers matched by
# sequence number; prints [[send time, source seen or null], ...].
STREAM = r"""
import json, select, socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sock.setblocking(False)
sent, answers, end, next_t = [], {}, time.time() + seconds, time.time()
while time.time() < end + 0.3:
    now = time.time()
    if now >= next_t and now < end:
        sent.append(now)
        try:
            sock.sendto(str(len(sent)).encode(), (host, port))
        except OSError:
            pass
        next_t = max(next_t + 0.01, now)
    if select.select([sock], [], [], max(0.0, min(next_t, end + 0.3) - time.time()))[0]:
        while True:
            try:
                data = sock.recv(512).decode().split()
            except OSError:
                break
            if len(data) >= 3 and data[2].isdigit():
                answers.setdefault(int(data[2]), data[0])
print(json.dumps([[t, answers.get(i + 1)] for i, t in enumerate(sent)]))
"""


class BenchError(RuntimeError):
    """The benchmark could not measure; the message says why."""


def meshgress(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run([str(Path(sys.executable).with_name("meshgress")), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode:
        raise BenchError(f"meshgress {' '.join(args)}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def largest_gap(samples: list[list[Any]]) -> float:
    """The longest time between two answered probes (sent times). A sender the machine
    starves sends nothing for a while and that counts too: on a loaded machine the figure
    is an upper bound, and the control stream says how much of it is the machine's."""
    answered = [t for t, seen in samples if seen is not None]
    if not answered:
        return float("inf")
    return max((b - a for a, b in itertools.pairwise(answered)), default=0.0)


def lost(samples: list[list[Any]]) -> int:
    return sum(1 for _, seen in samples if seen is None)


def holder_node(store: FileDatastore, lease_name: str) -> str | None:
    lease = store.get_lease(lease_name)
    if lease is None or lease.holder is None or lease.expired(time.time()):
        return None
    return lease.holder.split("/")[0]  # the lab's gateways are NODE/PID


def holders(store: FileDatastore) -> dict[str, str | None]:
    return {ip: holder_node(store, name) for ip, name in
            (("192.0.2.201", "egress-egress-0"), ("192.0.2.202", "egress-egress-1"),
             (SOLO_IP, SOLO_LEASE))}


def ip_json(netns: str, *argv: str) -> Any:
    out = subprocess.run(["ip", "-n", netns, "-j", *argv], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out) if out.strip() else []


def leftovers(netns: str) -> list[str]:
    """The gateway's objects still on a node that holds no slot (empty: a clean standby)."""
    found = []
    for link in ip_json(netns, "address", "show"):
        if link["ifname"].startswith("mgeg"):
            found.append(f"interface {link['ifname']}")
        found += [f"address {a['local']}" for a in link.get("addr_info", [])
                  if a.get("local") in EGRESS_IPS]
    found += [f"rule fwmark {r.get('fwmark')}" for r in ip_json(netns, "rule", "show")
              if r.get("priority") == GATEWAY_RULE_PRIORITY]
    routes = ip_json(netns, "route", "show", "table", "all")
    found += [f"route table {r['table']}" for r in routes
              if str(r.get("table", "")).isdigit() and int(r["table"]) in GATEWAY_TABLES]
    if not any(r.get("dst") == "default" and "table" not in r for r in routes):
        found.append("no default route")
    return found


@contextlib.contextmanager
def stream(netns: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-I",
                             "-c", STREAM, OUTSIDE, str(ECHO_PORT), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def samples_of(proc: subprocess.Popen[str]) -> list[list[Any]]:
    out, err = proc.communicate(timeout=60)
    try:
        return list(json.loads(out))
    except ValueError as exc:
        raise BenchError(f"a probe stream gave no samples: {out[-300:]} {err[-300:]}") from exc


def one_round(lab: Lab, store: FileDatastore, index: int, down: float) -> dict[str, Any]:
    carrier = index % 2 == 1
    before = holders(store)
    victim = before[SOLO_IP]
    if victim is None:
        raise BenchError(f"nobody holds {SOLO_IP}: {before}")
    prefix = f"mg-{lab.name}-"
    names = {"web1": f"{prefix}pod-web-app-node1", "web2": f"{prefix}pod-web-app-node2",
             "pay1": f"{prefix}pod-payments-app-node1",
             "pay2": f"{prefix}pod-payments-app-node2", "control": f"{prefix}node1"}
    seconds = 2 + down + 2
    with contextlib.ExitStack() as stack:
        procs = {key: stack.enter_context(stream(ns, seconds)) for key, ns in names.items()}
        time.sleep(2)
        went_down = time.time()
        lab.link(victim, "down", carrier=carrier)
        taken: float | None = None
        taker = None
        while time.time() - went_down < down:
            if taken is None:
                taker = holder_node(store, SOLO_LEASE)
                if taker not in (None, victim):
                    taken = time.time() - went_down
            time.sleep(0.01)
        lab.link(victim, "up", carrier=carrier)
        came_up = time.time()
        clean_after = None
        while time.time() - came_up < 10:
            if not leftovers(f"{prefix}{victim}"):
                clean_after = time.time() - came_up
                break
            time.sleep(0.02)
        results = {key: samples_of(proc) for key, proc in procs.items()}
    healthy_lost, healthy_gap = 0, 0.0
    for key in ("pay1", "pay2"):
        seen = {s for _, s in results[key] if s}
        if len(seen) == 1 and before.get(next(iter(seen))) != victim:
            healthy_lost += lost(results[key])
            healthy_gap = max(healthy_gap, largest_gap(results[key]))
    return {
        "round": index + 1, "mode": "carrier lost" if carrier else "link down",
        "victim": victim, "victim_slots": sum(1 for n in before.values() if n == victim),
        "taker": taker, "taken_s": taken,
        "web_gap_s": max(largest_gap(results["web1"]), largest_gap(results["web2"])),
        "web_back_on": sorted({s for _, s in results["web1"][-20:] + results["web2"][-20:]
                               if s}),
        "healthy_lost": healthy_lost, "healthy_gap_s": healthy_gap,
        "control_lost": lost(results["control"]),
        "control_gap_s": largest_gap(results["control"]),
        "clean_after_up_s": clean_after,
        "left_over": leftovers(f"{prefix}{victim}") if clean_after is None else [],
    }


def setup(lab: Lab, store: FileDatastore) -> None:
    store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressGateway",
                 "metadata": {"name": "solo"},
                 "spec": {"egressIPs": [SOLO_IP], "interface": "eth0"}})
    store.apply({"apiVersion": "meshgress.io/v1alpha1", "kind": "EgressPolicy",
                 "metadata": {"name": "web"},
                 "spec": {"gateway": "solo",
                          "namespaceSelector": {"matchLabels": {"team": "web"}}}})
    deadline = time.time() + 60
    while time.time() < deadline:
        held = holders(store)
        if all(held.values()) and (len(set(held.values())) == 3 or time.time() > deadline - 50):
            return
        time.sleep(0.2)
    raise BenchError(f"the three slots are not all held: {holders(store)}")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--down", type=float, default=6.0,
                        help="seconds the link stays down (default 6)")
    parser.add_argument("--name", default="bu" + secrets.token_hex(2), help="lab name")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    lab = Lab(args.name)
    rounds: list[dict[str, Any]] = []
    try:
        meshgress("lab", "--name", args.name, "up", "--nodes", "2", "--gateway-nodes", "4")
        store = FileDatastore(lab.datastore_dir)
        try:
            setup(lab, store)
            time.sleep(2)
            for index in range(args.rounds):
                rounds.append(one_round(lab, store, index, args.down))
                r = rounds[-1]
                print(f"round {r['round']} {r['mode']:12} {r['victim']} "
                      f"({r['victim_slots']} slots) -> {r['taker']}: "
                      f"web gap {fmt(r['web_gap_s'])}, slot taken after "
                      f"{fmt(r['taken_s'])}, back on {r['web_back_on']}; healthy slots "
                      f"lost {r['healthy_lost']} (gap {fmt(r['healthy_gap_s'])}), control "
                      f"lost {r['control_lost']} (gap {fmt(r['control_gap_s'])}); clean at "
                      f"the first look {fmt(r['clean_after_up_s'])} after up "
                      f"{r['left_over'] or ''}",
                      flush=True)
                time.sleep(2)
        finally:
            store.close()
    except BenchError as exc:
        print(f"uplink bench: {exc}", file=sys.stderr)
        return 1
    finally:
        lab.down()
    gaps = [r["web_gap_s"] for r in rounds]
    taken = [r["taken_s"] for r in rounds if r["taken_s"] is not None]
    print(f"\nweb egress gap over {len(gaps)} link losses: median "
          f"{fmt(statistics.median(gaps))}, worst {fmt(max(gaps))} (budget: the slot "
          f"taken within the lease {LEASE_DURATION_SECONDS:.0f} s + the orphan grace "
          f"{ORPHAN_GRACE_SECONDS} s + 0.5 s, traffic back within 1.5 s of that)")
    print(f"solo's slot held by another process after: median "
          f"{fmt(statistics.median(taken) if taken else None)}, worst "
          f"{fmt(max(taken) if taken else None)}; never taken in "
          f"{len(rounds) - len(taken)} rounds")
    print(json.dumps({"bench": "uplink", "rounds": len(rounds),
                      "web_gap_s": {"median": statistics.median(gaps) if gaps else None,
                                    "worst": max(gaps, default=None)},
                      "taken_s": {"median": statistics.median(taken) if taken else None,
                                  "worst": max(taken, default=None)},
                      "never_taken": len(rounds) - len(taken)}, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=2))
    return 0 if rounds else 1


if __name__ == "__main__":
    sys.exit(main())
