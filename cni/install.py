"""Putting the plugin where a container runtime finds it, and the conflist that names it.

`install_plugin(bin_dir)` writes `<bin_dir>/meshgress-cni`: a two-line launcher run by the
node's own Python with `-I -S` (isolated, no site: in a virtualenv with editable installs
the site machinery alone costs tens of milliseconds; Debian's /usr/bin/python3 also starts
~2-3 ms faster than a pyenv build) plus a private copy of the shim's three
standard-library modules, byte-compiled, in `<bin_dir>/.meshgress-cni/`. The copy makes
the binary independent of this checkout or virtualenv (the chart's init container can
install it onto the node the same way), and the pre-compiled bytecode spares every
invocation a compile.

`compute_conflist` renders the network configuration list the runtime reads (kept as
`cniVersion` 1.0.0 by default because podman 4 and containerd 1.6/1.7 speak at most that;
GC and STATUS need 1.1.0).

Command line: `python -m cni.install --bin-dir /opt/cni/bin [--conf-dir /etc/cni/net.d]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cni import protocol as p

PLUGIN_NAME = "meshgress-cni"
SHIM_MODULES = ("__init__.py", "protocol.py", "plugin.py")
DEFAULT_NETWORK_NAME = "meshgress"
CONFLIST_NAME = "10-meshgress.conflist"
PORTMAP: dict[str, Any] = {"type": "portmap", "capabilities": {"portMappings": True}}


def _default_python() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def install_plugin(bin_dir: Path | str, python: str | None = None) -> Path:
    """Install the shim as `<bin_dir>/meshgress-cni`; return the executable's path.

    `python` is the interpreter the launcher runs (default: /usr/bin/python3, else the
    current one); it needs only the standard library, version 3.11 or later.
    """
    bin_dir = Path(bin_dir)
    python = python or _default_python()
    package_root = bin_dir / f".{PLUGIN_NAME}"
    package = package_root / "cni"
    package.mkdir(parents=True, exist_ok=True)
    source = Path(__file__).resolve().parent
    for name in SHIM_MODULES:
        shutil.copyfile(source / name, package / name)
    # Byte-compile with the interpreter that will run it, so its cache tag matches.
    subprocess.run(
        [python, "-I", "-m", "compileall", "-q", str(package)], check=True,
        stdout=subprocess.DEVNULL,
    )
    launcher = bin_dir / PLUGIN_NAME
    tmp = launcher.with_name(f".{PLUGIN_NAME}.tmp")
    tmp.write_text(
        f"#!{python} -IS\n"
        f"import sys; sys.path.insert(0, {str(package_root)!r})\n"
        "from cni.plugin import run_and_exit; run_and_exit()\n"
    )
    tmp.chmod(0o755)
    tmp.replace(launcher)
    return launcher


def compute_conflist(
    socket_path: str = p.DEFAULT_SOCKET,
    *,
    name: str = DEFAULT_NETWORK_NAME,
    cni_version: str = "1.0.0",
    mtu: int | None = None,
    timeout: float | None = None,
    chain: Sequence[dict[str, Any]] = (PORTMAP,),
) -> dict[str, Any]:
    """The network configuration list: meshgress-cni first, then `chain` (e.g. portmap)."""
    plugin: dict[str, Any] = {"type": PLUGIN_NAME, "socket": socket_path}
    if mtu is not None:
        plugin["mtu"] = mtu
    if timeout is not None:
        plugin["timeout"] = timeout
    return {"cniVersion": cni_version, "name": name, "plugins": [plugin, *map(dict, chain)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cni.install", description="Install the meshgress CNI plugin."
    )
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--python", default=None)
    parser.add_argument("--conf-dir", default=None, help="also write the conflist here")
    parser.add_argument("--socket", default=p.DEFAULT_SOCKET)
    args = parser.parse_args(argv)
    launcher = install_plugin(args.bin_dir, args.python)
    print(launcher)
    if args.conf_dir:
        target = Path(args.conf_dir) / CONFLIST_NAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(compute_conflist(args.socket), indent=2) + "\n")
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
