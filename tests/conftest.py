"""Shared test set-up: root checks and a unique name per lab so runs never collide."""

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def lab_name():
    """A fresh lab name (its namespaces are mg-<name>-*); the lab is removed afterwards."""
    name = "t" + secrets.token_hex(3)
    yield name
    run_meshgress("lab", "--name", name, "down", check=False)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    leftover = [ns for ns in listed.split() if ns.startswith(f"mg-{name}-")]
    assert not leftover, f"lab {name} left namespaces behind: {leftover}"
    assert not Path(f"/run/meshgress-lab/{name}").exists()


@pytest.fixture(scope="session")
def have_tool():
    def check(tool):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    return check
