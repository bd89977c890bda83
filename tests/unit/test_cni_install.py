"""Installing the plugin into a CNI bin directory, and the conflist the runtime reads."""

from __future__ import annotations

import json
import os
import subprocess

from cni.install import PLUGIN_NAME, SHIM_MODULE, compute_conflist, install_plugin


def _version(launcher):
    proc = subprocess.run([str(launcher)], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                          capture_output=True, check=True)
    return json.loads(proc.stdout)["supportedVersions"]


def test_install_makes_a_self_contained_precompiled_binary(tmp_path):
    launcher = install_plugin(tmp_path)
    assert launcher == tmp_path / PLUGIN_NAME
    assert os.access(launcher, os.X_OK)
    first_line = launcher.read_text().splitlines()[0]
    assert first_line.startswith("#!/") and first_line.endswith(" -IS")
    private = tmp_path / f".{PLUGIN_NAME}"
    assert sorted(p.name for p in private.iterdir()) == [f"{SHIM_MODULE}.code",
                                                         f"{SHIM_MODULE}.py"]
    assert _version(launcher) == ["0.4.0", "1.0.0", "1.1.0"]


def test_a_stale_compiled_shim_falls_back_to_the_source(tmp_path):
    """Another interpreter version (another magic number) must not run foreign bytecode."""
    launcher = install_plugin(tmp_path)
    code = tmp_path / f".{PLUGIN_NAME}" / f"{SHIM_MODULE}.code"
    code.write_bytes(b"\0\0\r\n" + code.read_bytes()[4:])
    assert _version(launcher) == ["0.4.0", "1.0.0", "1.1.0"]


def test_install_replaces_the_layout_of_earlier_versions(tmp_path):
    old = tmp_path / f".{PLUGIN_NAME}" / "cni"
    old.mkdir(parents=True)
    (old / "plugin.py").write_text("")
    install_plugin(tmp_path)
    assert not old.exists()


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
