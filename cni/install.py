"""Putting the plugin where a container runtime finds it, and the conflist that names it.

`install_plugin(bin_dir)` writes `<bin_dir>/meshgress-cni`, a launcher run by the node's
own Python with `-I -S` (isolated, no site: in a virtualenv with editable installs the
site machinery alone costs tens of milliseconds; Debian's /usr/bin/python3 also starts
~2-3 ms faster than a pyenv build), and a private copy of the shim, `cni/plugin.py`, in
`<bin_dir>/.meshgress-cni/`: the source and its code object compiled ahead by that same
interpreter (no docstrings, no column tables: a smaller file to unmarshal). The launcher
unmarshals and runs that code object itself instead of importing a module: the import
system's path search, stat and cache checks cost ~0.3 ms per invocation. If the node's
interpreter changes version, the compiled file's magic number no longer matches and the
launcher runs the source instead (compiled on every run: slower, still correct) until the
next install. The
copy makes the binary independent of this checkout or virtualenv (the chart's init
container can install it onto the node the same way).

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
SHIM_MODULE = "meshgress_cni"
"""The shim's name in the private directory: `<name>.py` and `<name>.code` (marshalled)."""
DEFAULT_NETWORK_NAME = "meshgress"
CONFLIST_NAME = "10-meshgress.conflist"
PORTMAP: dict[str, Any] = {"type": "portmap", "capabilities": {"portMappings": True}}

_COMPILE = """
import marshal, sys
from importlib.util import MAGIC_NUMBER
source, target = sys.argv[1:3]
with open(source, encoding="utf-8") as f:
    code = compile(f.read(), source, "exec", dont_inherit=True, optimize=2)
with open(target, "wb") as f:
    f.write(MAGIC_NUMBER + marshal.dumps(code))
"""
"""Run by the target interpreter: its magic number, then the marshalled module code."""

_LAUNCHER = """#!{python} -IS
import gc, marshal, _frozen_importlib_external as b
gc.disable()
d = open({code!r}, "rb").read()
exec(marshal.loads(d[4:]) if d[:4] == b.MAGIC_NUMBER else open({source!r}).read())
"""
"""The shim runs as __main__, so its `if __name__ == "__main__"` block starts it. The
launcher itself is compiled on every run, so it is kept to a few tokens (each line costs
~15 us). The garbage collector is off: a process this short has nothing to collect, and
one collection triggered by the allocations of unmarshalling costs ~0.1 ms."""


def _default_python() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def _tmp(path: Path) -> Path:
    """Where `path` is written before it replaces the old one, so it appears complete or
    not at all (a runtime may run the plugin meanwhile)."""
    return path.with_name(f".{path.name}.tmp")


def install_plugin(bin_dir: Path | str, python: str | None = None) -> Path:
    """Install the shim as `<bin_dir>/meshgress-cni`; return the executable's path.

    `python` is the interpreter the launcher runs (default: /usr/bin/python3, else the
    current one); it needs only the standard library, version 3.11 or later.
    """
    bin_dir = Path(bin_dir)
    python = python or _default_python()
    private = bin_dir / f".{PLUGIN_NAME}"
    private.mkdir(parents=True, exist_ok=True)
    base = private / SHIM_MODULE
    source, code = base.with_suffix(".py"), base.with_suffix(".code")
    launcher = bin_dir / PLUGIN_NAME
    shutil.copyfile(Path(__file__).resolve().parent / "plugin.py", _tmp(source))
    _tmp(source).replace(source)
    # Compiled by the interpreter that will run it, so the magic number matches.
    subprocess.run([python, "-I", "-X", "no_debug_ranges", "-c", _COMPILE, str(source),
                    str(_tmp(code))], check=True, stdout=subprocess.DEVNULL)
    _tmp(code).replace(code)
    _tmp(launcher).write_text(_LAUNCHER.format(python=python, code=str(code), source=str(source)))
    _tmp(launcher).chmod(0o755)
    _tmp(launcher).replace(launcher)
    shutil.rmtree(private / "cni", ignore_errors=True)  # the layout of earlier versions
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
