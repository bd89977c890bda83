"""The versions the control plane runs are the versions tests/infra builds: the wrapper
modules' go.mod and build-binaries' wheel pins are the source, meshgress.lab.controlplane
names the same ones to find them in the cache."""

from __future__ import annotations

import re
from pathlib import Path

from meshgress.lab.controlplane import PINNED_VERSIONS

INFRA = Path(__file__).resolve().parents[1] / "infra"


def required(wrapper: str, module: str) -> str:
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(\S+)",
                      (INFRA / wrapper / "go.mod").read_text(), re.MULTILINE)
    assert match, f"{wrapper}/go.mod does not require {module}"
    return match.group(1)


def build_script_pin(name: str) -> str:
    match = re.search(rf'^{name} = "([^"]+)"', (INFRA / "build-binaries").read_text(),
                      re.MULTILINE)
    assert match, f"build-binaries has no {name}"
    return match.group(1)


def test_go_programs_match_their_wrapper_modules() -> None:
    assert PINNED_VERSIONS["kube-apiserver"] == required("kube-apiserver", "k8s.io/kubernetes")
    assert PINNED_VERSIONS["etcd"] == required("etcd", "go.etcd.io/etcd/server/v3")
    assert PINNED_VERSIONS["wireguard-go"] == required("wireguard-go",
                                                       "golang.zx2c4.com/wireguard")


def test_staging_modules_are_pinned_to_the_kubernetes_release() -> None:
    minor_patch = PINNED_VERSIONS["kube-apiserver"].removeprefix("v1.")
    go_mod = (INFRA / "kube-apiserver" / "go.mod").read_text()
    replaced = re.findall(r"^\s*(k8s\.io/\S+) => \1 (\S+)$", go_mod, re.MULTILINE)
    assert len(replaced) > 20
    assert {version for _, version in replaced} == {f"v0.{minor_patch}"}


def test_kubectl_and_helm_match_the_build_script() -> None:
    assert PINNED_VERSIONS["kubectl"] == build_script_pin("KUBECTL_VERSION")
    assert PINNED_VERSIONS["helm"] == build_script_pin("HELM_VERSION")
