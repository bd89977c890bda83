"""Putting the plugin where a container runtime finds it, and the conflist that names it.

`install_plugin(bin_dir)` writes `<bin_dir>/meshgress-cni`, a launcher script, and a
private directory `<bin_dir>/.meshgress-cni/` holding everything it runs, so the binary is
independent of this checkout or virtualenv (the chart's init container can install it onto
the node the same way):

    meshgress_cni.py    a copy of the shim, `cni/plugin.py`
    meshgress_cni.code  its code object, compiled ahead by the node's interpreter (no
                        docstrings, no column tables: a smaller file to unmarshal)
    python3             a symlink to the node's interpreter (default /usr/bin/python3:
                        Debian's starts ~2-3 ms faster than a pyenv build)
    python3._pth        the interpreter's private home: CPython reads `<executable>._pth`
                        (on every platform since 3.11) and then searches only the
                        directories it lists, in isolated mode, without `site`, and
                        without looking for its prefix on disk
    lib/encodings/      `cni/shim_encodings.py`: UTF-8 without the standard package's
                        alias table, which CPython would otherwise import on every start

The launcher runs that symlink with `-ISXutf8` (isolated, no site, UTF-8 mode: whatever
the runtime's locale, starting needs only the UTF-8 codec); under a bin directory whose
path cannot be part of a `#!` line it names the node's interpreter itself instead
(`compute_interpreter_line`). The private home and the
private `encodings` save ~0.7 ms of the interpreter's ~9.5 ms start, the largest part of a
pod's ADD that is ours to change. The launcher unmarshals and runs the shim's code object
itself instead of importing a module (the import system's path search, stat and cache
checks cost ~0.3 ms per invocation). If the node's interpreter changes version, the
compiled file's magic number no longer matches and the private home may list another
version's library, so the launcher re-executes the interpreter itself, plainly (`-IS`), on
the shim's source: slower, still correct, until the next install.

Every file is written beside its target under a temporary name and renamed over it, so
a runtime running the plugin meanwhile sees the old file or the new one, never half of
one. The install ends with a stamp (`installed.json`: a digest of what it installed and
for which interpreter); `plugin_is_current` compares it, so the chart's init container
(`--skip-if-current`) rewrites nothing on a node that already has this version.

`compute_conflist` renders the network configuration list the runtime reads (kept as
`cniVersion` 1.0.0 by default because podman 4 and containerd 1.6/1.7 speak at most that;
GC and STATUS need 1.1.0); `write_conflist` puts it in the runtime's configuration folder
the same atomic way, touching no other file there. The node agent calls it once its CNI
server listens (`meshgress agent --cni-conf-dir`): the runtime sees the network as ready
only when ADDs can be served.

Command line: `python -m cni.install --bin-dir /opt/cni/bin [--skip-if-current]
[--conf-dir /etc/cni/net.d]`.
"""

from __future__ import annotations

import argparse
import hashlib
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
PRIVATE_PYTHON = "python3"
"""The interpreter's name in the private directory; its home is `<name>._pth`."""
DEFAULT_NETWORK_NAME = "meshgress"
CONFLIST_NAME = "10-meshgress.conflist"
PORTMAP: dict[str, Any] = {"type": "portmap", "capabilities": {"portMappings": True}}
STAMP_NAME = "installed.json"
"""In the private directory, written last: what the install put there."""
INSTALL_FORMAT = 1
"""Changes whenever the installed layout does, so an older layout is never current."""

_COMPILE = """
import marshal, py_compile, sys
from importlib.util import MAGIC_NUMBER
source, target, encodings = sys.argv[1:4]
with open(source, encoding="utf-8") as f:
    code = compile(f.read(), source, "exec", dont_inherit=True, optimize=2)
with open(target, "wb") as f:
    f.write(MAGIC_NUMBER + marshal.dumps(code))
py_compile.compile(encodings, doraise=True)
print("\\n".join(sys.path))
"""
"""Run by the target interpreter with -I -S: the shim's code object after its magic
number; the private `encodings` compiled into its `__pycache__` (the bin directory may be
read-only when the plugin runs); then its own search path (the standard library and its
extension modules, no site-packages), which the private home lists after `encodings`."""

_LAUNCHER = """#!{interpreter}
import gc, marshal, _frozen_importlib_external as b
gc.disable()
d = open({code!r}, "rb").read()
if d[:4] == b.MAGIC_NUMBER: exec(marshal.loads(d[4:]))
else: import posix; posix.execv({python!r}, [{python!r}, "-IS", {source!r}])
"""
"""The shim runs as __main__, so its `if __name__ == "__main__"` block starts it. The
launcher itself is compiled on every run, so it is kept to a few tokens (each line costs
~15 us). The garbage collector is off: a process this short has nothing to collect, and
one collection triggered by the allocations of unmarshalling costs ~0.1 ms."""

SHEBANG_LIMIT = 127
"""The longest `#!` line every kernel a node may run reads whole (Linux before 5.1 reads
128 bytes, newline included, and silently cuts the rest)."""


def compute_interpreter_line(home_python: Path, python: str) -> str:
    """What follows `#!` in the launcher: the private interpreter, unless its path cannot
    be a `#!` line (too long for the kernel, or with blanks, where the kernel would split
    it); then the node's interpreter itself, without the private home (~0.7 ms slower)."""
    line = f"{home_python} -ISXutf8"
    if len(f"#!{line}") <= SHEBANG_LIMIT and not any(c.isspace() for c in str(home_python)):
        return line
    return f"{python} -IS"


def _default_python() -> str:
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else sys.executable


def _tmp(path: Path) -> Path:
    """Where `path` is written before it replaces the old one, so it appears complete or
    not at all (a runtime may run the plugin meanwhile)."""
    return path.with_name(f".{path.name}.tmp")


def _interpreter_version(python: str) -> str:
    """`sys.version` of `python`, which the compiled code object and the private home's
    library paths depend on."""
    return subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.version)"],
                          check=True, stdout=subprocess.PIPE, text=True).stdout.strip()


def compute_install_stamp(shim: bytes, encodings: bytes, bin_dir: Path, python: str,
                          python_version: str) -> dict[str, Any]:
    """What an install of `shim` (and the private `encodings`) into `bin_dir` for
    `python` consists of; two installs with equal stamps lay down the same files."""
    digest = hashlib.sha256()
    for part in (shim, encodings, _LAUNCHER.encode(), _COMPILE.encode()):
        digest.update(hashlib.sha256(part).digest())
    return {"format": INSTALL_FORMAT, "binDir": str(bin_dir), "python": python,
            "pythonVersion": python_version, "sha256": digest.hexdigest()}


def _wanted_stamp(bin_dir: Path, python: str) -> dict[str, Any]:
    here = Path(__file__).resolve().parent
    return compute_install_stamp((here / "plugin.py").read_bytes(),
                                 (here / "shim_encodings.py").read_bytes(), bin_dir, python,
                                 _interpreter_version(python))


def _installed_files(bin_dir: Path) -> list[Path]:
    private = bin_dir / f".{PLUGIN_NAME}"
    base = private / SHIM_MODULE
    return [bin_dir / PLUGIN_NAME, base.with_suffix(".py"), base.with_suffix(".code"),
            private / PRIVATE_PYTHON, private / f"{PRIVATE_PYTHON}._pth",
            private / "lib" / "encodings" / "__init__.py"]


def plugin_is_current(bin_dir: Path | str, python: str | None = None) -> bool:
    """True when `bin_dir` holds a complete install of this very plugin for `python`."""
    bin_dir = Path(bin_dir)
    python = python or _default_python()
    try:
        stamp = json.loads((bin_dir / f".{PLUGIN_NAME}" / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not all(path.exists() for path in _installed_files(bin_dir)):
        return False
    return bool(stamp == _wanted_stamp(bin_dir, python))


def install_plugin(bin_dir: Path | str, python: str | None = None) -> Path:
    """Install the shim as `<bin_dir>/meshgress-cni`; return the executable's path.

    `python` is the interpreter the launcher runs (default: /usr/bin/python3, else the
    current one); it needs only the standard library, version 3.11 or later.
    """
    bin_dir = Path(bin_dir)
    python = python or _default_python()
    private = bin_dir / f".{PLUGIN_NAME}"
    private.mkdir(parents=True, exist_ok=True)
    # Gone until the install is whole: an interrupted one is never taken as current.
    (private / STAMP_NAME).unlink(missing_ok=True)
    base = private / SHIM_MODULE
    source, code = base.with_suffix(".py"), base.with_suffix(".code")
    here = Path(__file__).resolve().parent
    _replace_copy(here / "plugin.py", source)
    encodings = private / "lib" / "encodings" / "__init__.py"
    encodings.parent.mkdir(parents=True, exist_ok=True)
    _replace_copy(here / "shim_encodings.py", encodings)
    # Compiled by the interpreter that will run it, so the magic numbers match.
    compiled = subprocess.run(
        [python, "-I", "-S", "-X", "no_debug_ranges", "-c", _COMPILE, str(source),
         str(_tmp(code)), str(encodings)],
        check=True, stdout=subprocess.PIPE, text=True,
    )
    _tmp(code).replace(code)
    library = [line for line in compiled.stdout.splitlines() if Path(line).is_dir()]
    home_python = _install_private_home(private, python, library)
    launcher = bin_dir / PLUGIN_NAME
    _tmp(launcher).write_text(_LAUNCHER.format(
        interpreter=compute_interpreter_line(home_python, python), python=python,
        code=str(code), source=str(source)))
    _tmp(launcher).chmod(0o755)
    _tmp(launcher).replace(launcher)
    shutil.rmtree(private / "cni", ignore_errors=True)  # the layout of earlier versions
    _write_atomically(private / STAMP_NAME,
                      json.dumps(_wanted_stamp(bin_dir, python), sort_keys=True) + "\n")
    return launcher


def _install_private_home(private: Path, python: str, library: list[str]) -> Path:
    """The private interpreter (a symlink to `python`) and its `._pth` file, which lists
    the private `lib` (for `encodings`) first and then `library`; return the symlink."""
    pth = private / f"{PRIVATE_PYTHON}._pth"
    _tmp(pth).write_text("".join(f"{entry}\n" for entry in [str(private / "lib"), *library]))
    _tmp(pth).replace(pth)
    link = private / PRIVATE_PYTHON
    _tmp(link).unlink(missing_ok=True)
    _tmp(link).symlink_to(python)
    _tmp(link).replace(link)
    return link


def _replace_copy(source: Path, target: Path) -> None:
    shutil.copyfile(source, _tmp(target))
    _tmp(target).replace(target)


def _write_atomically(target: Path, text: str, mode: int = 0o644) -> None:
    _tmp(target).write_text(text)
    _tmp(target).chmod(mode)
    _tmp(target).replace(target)


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


def write_conflist(conf_dir: Path | str, socket_path: str = p.DEFAULT_SOCKET) -> Path | None:
    """`<conf_dir>/10-meshgress.conflist` naming the agent's socket, written under a
    temporary name (which no runtime reads: it ends in .tmp) and renamed over the old one;
    nothing is written when it already says this. Other files in `conf_dir` are never
    touched. Returns the path when it was written."""
    target = Path(conf_dir) / CONFLIST_NAME
    text = json.dumps(compute_conflist(socket_path), indent=2) + "\n"
    try:
        if target.read_text() == text:
            return None
    except OSError:
        pass
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, text)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cni.install", description="Install the meshgress CNI plugin."
    )
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--python", default=None)
    parser.add_argument("--conf-dir", default=None, help="also write the conflist here")
    parser.add_argument("--socket", default=p.DEFAULT_SOCKET)
    parser.add_argument("--skip-if-current", action="store_true",
                        help="write nothing when the bin directory already holds this plugin "
                             "for this interpreter")
    args = parser.parse_args(argv)
    if args.skip_if_current and plugin_is_current(args.bin_dir, args.python):
        print(f"{Path(args.bin_dir) / PLUGIN_NAME} is current")
    else:
        print(install_plugin(args.bin_dir, args.python))
    if args.conf_dir:
        target = write_conflist(args.conf_dir, args.socket)
        print(target or f"{Path(args.conf_dir) / CONFLIST_NAME} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
