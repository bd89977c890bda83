"""What an idle lab's agents and gateways cost: CPU over a minute with no traffic and no
changes, with the egress slots held and with none held.

Run as root:  .venv/bin/python tests/bench/idle_bench.py [--seconds 60] [--settle 15]
                  [--datastore file|kube] [--name biXXXX]

Builds its own lab (`meshgress lab --name bi<hex> up --nodes 2 --gateway-nodes 2`, on the
chosen datastore) and removes it afterwards, also on failure. Two phases, each after
`--settle` seconds of quiet and measured over `--seconds` from /proc/<pid>/stat (utime +
stime) of every process:

- held: both slots held. The gateways renew their leases every second and every node
  probes every slot through its tunnel every 100 ms: that is the product's health checking
  (traffic), which runs whenever a slot has a holder;
- unheld: both gateways stopped (`lab gateway stop`, which drains: the slots are released).
  No slot has a holder, so nothing is probed and nothing renewed: the agents' floor.

Listed: every agent and gateway (the target: under 1 % of a core each), and, apart, every
wireguard-go they started (separate processes: the mesh interface, the slot tunnels).
Ends with one JSON line ({"bench": "idle", ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.cpu_usage import Window, children, command_line  # noqa: E402 - after the path

TARGET = 0.01


def lab_cli(name: str, *args: str, timeout: float = 300) -> None:
    subprocess.run([sys.executable, "-m", "meshgress.cli", "lab", "--name", name, *args],
                   check=True, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def processes(name: str) -> tuple[dict[str, int], dict[str, int]]:
    """(meshgress's processes, the wireguard-go processes they started) by label."""
    from meshgress.lab.lab import Lab

    record = Lab(name).load_record()
    if record is None:
        raise SystemExit(f"lab {name} has no record")
    ours = {f"{node} agent": pid for node, pid in sorted(record.agents.items())}
    ours |= {f"{node} gateway": pid for node, pid in sorted(record.gateways.items())}
    theirs = {}
    for label, pid in ours.items():
        for child in children(pid):
            argv = command_line(child)
            if argv and argv[0].endswith("wireguard-go"):
                theirs[f"{label}: wireguard-go {argv[-1]}"] = child
    return ours, theirs


def measure(name: str, seconds: float) -> dict[str, dict[str, float | None]]:
    ours, theirs = processes(name)
    window = Window(ours | theirs).start()
    time.sleep(seconds)
    window.stop()
    for line in window.describe():
        print(f"  {line}", flush=True)
    return {"meshgress": {label: window.shares[label] for label in ours},
            "wireguard-go": {label: window.shares[label] for label in theirs}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--datastore", choices=("file", "kube"), default="file")
    parser.add_argument("--name", default="bi" + secrets.token_hex(2))
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmark builds a lab in network namespaces: run it as root")
    load = os.getloadavg()
    phases: dict[str, dict[str, dict[str, float | None]]] = {}
    try:
        lab_cli(args.name, "up", "--nodes", "2", "--gateway-nodes", "2", "--datastore",
                args.datastore)
        time.sleep(args.settle)
        print(f"held: both slots held, {args.seconds:.0f}s", flush=True)
        phases["held"] = measure(args.name, args.seconds)
        for node in ("gw1", "gw2"):
            lab_cli(args.name, "gateway", "stop", node)
        time.sleep(args.settle)
        print(f"unheld: gateways stopped, no slot held, {args.seconds:.0f}s", flush=True)
        phases["unheld"] = measure(args.name, args.seconds)
    finally:
        subprocess.run([sys.executable, "-m", "meshgress.cli", "lab", "--name", args.name,
                        "down"], check=False, capture_output=True, timeout=300, cwd=REPO)
    worst = {phase: max((s for s in shares["meshgress"].values() if s is not None),
                        default=None) for phase, shares in phases.items()}
    print(f"idle lab on {args.datastore}: load average {load[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at the end; the busiest meshgress process: "
          + ", ".join(f"{phase} {share:.2%}" for phase, share in worst.items()
                      if share is not None)
          + f" (target < {TARGET:.0%})")
    print(json.dumps({"bench": "idle", "datastore": args.datastore, "seconds": args.seconds,
                      "load": {"start": load[0], "end": os.getloadavg()[0]},
                      "phases": phases, "busiest": worst,
                      "target_met": all(w is not None and w < TARGET for w in worst.values())},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
