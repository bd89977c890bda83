"""Installing the plugin into a CNI bin directory, and the conflist the runtime reads."""

from __future__ import annotations

import json
import os
import subprocess

from cni.install import PLUGIN_NAME, compute_conflist, install_plugin


def test_install_makes_a_self_contained_precompiled_binary(tmp_path):
    launcher = install_plugin(tmp_path)
    assert launcher == tmp_path / PLUGIN_NAME
    assert os.access(launcher, os.X_OK)
    first_line = launcher.read_text().splitlines()[0]
    assert first_line.startswith("#!/") and first_line.endswith(" -IS")
    package = tmp_path / f".{PLUGIN_NAME}" / "cni"
    assert sorted(p.name for p in package.glob("*.py")) == ["__init__.py", "plugin.py",
                                                            "protocol.py"]
    assert len(list((package / "__pycache__").glob("*.pyc"))) == 3
    proc = subprocess.run([str(launcher)], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                          capture_output=True, check=True)
    assert json.loads(proc.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]


def test_install_twice_replaces_in_place(tmp_path):
    install_plugin(tmp_path)
    launcher = install_plugin(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [PLUGIN_NAME]
    assert launcher.exists()


def test_conflist_shape():
    conflist = compute_conflist("/run/meshgress/cni.sock", mtu=1420)
    assert conflist == {
        "cniVersion": "1.0.0",
        "name": "meshgress",
        "plugins": [
            {"type": "meshgress-cni", "socket": "/run/meshgress/cni.sock", "mtu": 1420},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def test_conflist_without_chain():
    assert compute_conflist(chain=())["plugins"] == [
        {"type": "meshgress-cni", "socket": "/run/meshgress/cni.sock"}]
