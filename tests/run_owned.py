"""Names a test run owns, so that runs side by side never remove each other's objects.

Every privileged test session names what it creates (network namespaces, cgroups,
folders) `<base><pid>-...` with its own PID. Leftovers of a crashed run are then what
carries another PID that is no longer alive: those are removed before a session starts;
objects of a run that is still going are left alone.
"""

from __future__ import annotations

import os
import re

from meshgress.lab.netns import pid_alive

OWNER = os.getpid()


def owned(base: str) -> str:
    """The prefix of this run's names under `base`."""
    return f"{base}{OWNER}-"


def is_crashed_runs(name: str, base: str) -> bool:
    """True when `name` was made by another run under `base` that no longer runs."""
    match = re.match(rf"^{re.escape(base)}(\d+)-", name)
    if match is None:
        return False
    pid = int(match.group(1))
    return pid != OWNER and not pid_alive(pid)
