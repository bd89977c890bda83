"""Shared test set-up: root checks, a unique name per lab so runs never collide, and the
datastore every end-to-end test runs its lab on (each runs on both: ids `file`, `kube`)."""

import os
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Shared test bodies live outside test_*.py files; their asserts should explain themselves.
pytest.register_assert_rewrite("tests.datastore_contract", "tests.crd_corpus")

MESHGRESS = str(Path(sys.executable).with_name("meshgress"))


def pytest_collection_modifyitems(config, items):
    """Privileged and end-to-end tests need root; without it they fail loudly (never
    skip silently): `make test` is meant to run as root."""
    if os.geteuid() == 0:
        return
    for item in items:
        if "privileged" in item.keywords or "e2e" in item.keywords:
            item.add_marker(pytest.mark.usefixtures("_require_root"))


@pytest.fixture
def _require_root():
    pytest.fail("this test needs root (it creates network namespaces): run `make test` as root")


def run_meshgress(*args, check=True, timeout=120):
    proc = subprocess.run([MESHGRESS, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"meshgress {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


DATASTORES = ("file", "kube")
"""Every end-to-end test runs once on each: the embedded file datastore, and a real
kube-apiserver with agents and gateways under their own ServiceAccounts."""
LAB_UP_TIMEOUT = 300


class LabName(str):
    """A lab's name that knows which datastore its test brings the lab up on."""

    datastore: str


def lab_named(name, datastore):
    named = LabName(name)
    named.datastore = datastore
    return named


def lab(name, *args, **kw):
    """`meshgress lab --name NAME ARGS...`: `up` and `demo` on the name's datastore."""
    args = list(args)
    if args and args[0] in ("up", "demo"):
        if getattr(name, "datastore", None):
            args += ["--datastore", name.datastore]
        kw.setdefault("timeout", LAB_UP_TIMEOUT)
    return run_meshgress("lab", "--name", name, *args, **kw)


def lab_store(name):
    """The lab's datastore with an administrator's rights (file, or kube as admin)."""
    from meshgress.lab.lab import Lab

    return Lab(str(name)).admin_datastore()


LAB_STATE_ROOT = Path("/run/meshgress-lab")
KEPT_LOGS_ROOT = Path("/tmp/meshgress-test-labs")
"""Where a failed test's lab logs are kept: `lab down` removes the lab's own copy."""


def _copy_regular_file(source: str, target: str) -> None:
    """Files only: a lab's state directory also holds unix sockets (UAPI, CNI)."""
    if stat.S_ISREG(os.lstat(source).st_mode):
        shutil.copy2(source, target)


def keep_lab_logs(name: str, test_id: str) -> Path | None:
    """Copy the lab's logs (agents, gateways, anchors, on kube the control plane's) and its
    record out of its state directory before `lab down` removes it; print where they are
    and each log's tail. etcd's data and the control plane's keys stay behind."""
    state = LAB_STATE_ROOT / name
    if not state.exists():
        return None
    target = KEPT_LOGS_ROOT / f"{name}-{test_id.replace('/', '_').replace('::', '.')[-80:]}"
    shutil.copytree(state, target, dirs_exist_ok=True, symlinks=True,
                    copy_function=_copy_regular_file,
                    ignore=shutil.ignore_patterns("etcd", "pki", "*.key"))
    print(f"\nlab {name} failed a test: its logs are kept in {target}")
    for log in sorted([*(target / "logs").glob("*.log"),
                       *(target / "controlplane" / "logs").glob("*.log")]):
        lines = log.read_text(errors="replace").splitlines()[-15:]
        print(f"--- {log.name} (last {len(lines)} lines)")
        print("\n".join(lines))
    return target


def _fresh_lab(request, datastore):
    name = lab_named("t" + secrets.token_hex(3), datastore)
    failed_before = request.session.testsfailed
    yield name
    if request.session.testsfailed > failed_before:
        keep_lab_logs(name, request.node.nodeid)
    run_meshgress("lab", "--name", name, "down", check=False)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    leftover = [ns for ns in listed.split() if ns.startswith(f"mg-{name}-")]
    assert not leftover, f"lab {name} left namespaces behind: {leftover}"
    assert not Path(f"/run/meshgress-lab/{name}").exists()


@pytest.fixture(params=DATASTORES)
def lab_name(request):
    """A fresh lab name (its namespaces are mg-<name>-*) for each datastore; the lab is
    removed afterwards, and its logs are kept (and their tails printed) if the test
    failed."""
    yield from _fresh_lab(request, request.param)


@pytest.fixture
def kube_lab_name(request):
    """As `lab_name`, for the tests of what only a lab on kube has."""
    yield from _fresh_lab(request, "kube")


@pytest.fixture(scope="session")
def have_tool():
    def check(tool):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    return check


def eventually(check, timeout=15.0, interval=0.2):
    """Wait for a condition: `check()` until it returns something true or `timeout` seconds
    pass; returns its last value (assert on it)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def observe_for(seconds):
    """A measurement window, not a wait: traffic the test started runs for this long by
    design (a baseline before a fault, a fault's duration, how long a result must hold)."""
    time.sleep(seconds)
