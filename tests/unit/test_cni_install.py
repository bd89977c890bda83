"""Installing the plugin into a CNI bin directory, and the conflist the runtime reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cni.install import (
    CONFLIST_NAME,
    PLUGIN_NAME,
    PRIVATE_PYTHON,
    SHEBANG_LIMIT,
    SHIM_MODULE,
    STAMP_NAME,
    _default_python,
    compute_conflist,
    compute_interpreter_line,
    install_plugin,
    main,
    plugin_is_current,
    write_conflist,
)


def _version(launcher):
    proc = subprocess.run([str(launcher)], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                          capture_output=True, check=True)
    return json.loads(proc.stdout)["supportedVersions"]


def test_install_makes_a_self_contained_precompiled_binary(tmp_path):
    launcher = install_plugin(tmp_path)
    assert launcher == tmp_path / PLUGIN_NAME
    assert os.access(launcher, os.X_OK)
    private = tmp_path / f".{PLUGIN_NAME}"
    assert launcher.read_text().splitlines()[0] == f"#!{private / PRIVATE_PYTHON} -ISXutf8"
    assert sorted(p.name for p in private.iterdir()) == sorted([
        f"{SHIM_MODULE}.code", f"{SHIM_MODULE}.py", "lib", PRIVATE_PYTHON,
        f"{PRIVATE_PYTHON}._pth", STAMP_NAME])
    assert (private / PRIVATE_PYTHON).readlink() == Path(_default_python())
    assert _version(launcher) == ["0.4.0", "1.0.0", "1.1.0"]


def _private_python(tmp_path, code, stdin=""):
    """Run `code` in the launcher's interpreter, started the way the launcher starts it."""
    python = tmp_path / f".{PLUGIN_NAME}" / PRIVATE_PYTHON
    proc = subprocess.run([str(python), "-ISXutf8", "-c", code], env={}, input=stdin,
                          capture_output=True, text=True, encoding="utf-8", check=True)
    return proc.stdout.strip()


def test_the_private_home_starts_with_only_the_utf8_codec(tmp_path):
    install_plugin(tmp_path)
    private = tmp_path / f".{PLUGIN_NAME}"
    found = json.loads(_private_python(tmp_path, (
        "import sys, encodings, json; print(json.dumps([sys.path, encodings.__file__, "
        "sorted(m for m in sys.modules if m.startswith('encodings')), sys.flags.isolated, "
        "sys.flags.no_site, sys.flags.utf8_mode]))")))
    path, encodings_file, loaded, isolated, no_site, utf8_mode = found
    assert path[0] == str(private / "lib")
    assert not [entry for entry in path if "-packages" in entry]  # no site directories
    assert encodings_file == str(private / "lib" / "encodings" / "__init__.py")
    # What the interpreter loaded before `json` was imported by the check itself.
    assert loaded == ["encodings"]
    assert (isolated, no_site, utf8_mode) == (1, 1, 1)
    cached = list((private / "lib" / "encodings" / "__pycache__").iterdir())
    assert len(cached) == 1  # compiled at install time, by the interpreter that runs it


def test_the_private_utf8_codec_serves_the_standard_streams(tmp_path):
    install_plugin(tmp_path)
    text = "gr\u00fc\u00dfe \u20ac \U0001f600 " * 2000  # multi-byte sequences split by buffers
    read_in_pieces = "import sys; d = ''.join(iter(lambda: sys.stdin.read(7), ''))"
    out = _private_python(tmp_path, f"{read_in_pieces}; print(len(d)); print(d)", stdin=text)
    assert out.split("\n", 1) == [str(len(text)), text.strip()]


def test_the_private_home_still_has_every_other_codec(tmp_path):
    install_plugin(tmp_path)
    out = _private_python(tmp_path, (
        "import codecs, encodings.aliases, locale; print(repr(["
        "'\u00e9'.encode('latin-1'), '\u20ac'.encode('cp1252'), b'a'.decode('ascii'), "
        "'\u00fc'.encode('UTF8'), '\u00fc'.encode('u8'), 'b\u00fccher.de'.encode('idna'), "
        "codecs.lookup('utf-16').name, encodings.normalize_encoding('Latin 1')]))"))
    assert out == repr([b"\xe9", b"\x80", "a", b"\xc3\xbc", b"\xc3\xbc",
                        b"xn--bcher-kva.de", "utf-16", "Latin_1"])


def test_a_stale_compiled_shim_falls_back_to_the_source(tmp_path):
    """Another interpreter version (another magic number) must not run foreign bytecode,
    nor rely on a private home that lists another version's library: the launcher runs
    the interpreter plainly on the source."""
    launcher = install_plugin(tmp_path)
    private = tmp_path / f".{PLUGIN_NAME}"
    code = private / f"{SHIM_MODULE}.code"
    code.write_bytes(b"\0\0\r\n" + code.read_bytes()[4:])
    (private / f"{PRIVATE_PYTHON}._pth").write_text(f"{private / 'lib'}\n/nonexistent\n")
    assert _version(launcher) == ["0.4.0", "1.0.0", "1.1.0"]
    # An error path of the shim imports json, which the plain interpreter finds.
    proc = subprocess.run([str(launcher)], env={"CNI_COMMAND": "ADD"}, input=b"{",
                          capture_output=True, check=False)
    assert proc.returncode != 0 and json.loads(proc.stdout)["code"] == 6  # decode


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


def test_a_bin_directory_too_deep_for_a_shebang_runs_the_plain_interpreter(tmp_path):
    """The kernel would cut a long `#!` line (or split one with a blank): the launcher then
    names the node's interpreter itself and still works."""
    deep = tmp_path / ("d" * 60) / "with blank" / ("e" * 60)
    launcher = install_plugin(deep)
    assert launcher.read_text().splitlines()[0] == f"#!{_default_python()} -IS"
    assert _version(launcher) == ["0.4.0", "1.0.0", "1.1.0"]


def test_the_interpreter_line():
    python = "/usr/bin/python3"
    short = Path("/opt/cni/bin/.meshgress-cni/python3")
    assert compute_interpreter_line(short, python) == f"{short} -ISXutf8"
    assert compute_interpreter_line(Path("/a b/python3"), python) == f"{python} -IS"
    longest = Path("/" + "x" * (SHEBANG_LIMIT - len("#!/ -ISXutf8")))
    assert compute_interpreter_line(longest, python) == f"{longest} -ISXutf8"
    assert compute_interpreter_line(Path(f"{longest}y"), python) == f"{python} -IS"


def _snapshot(directory):
    """Every file below `directory` with its inode and bytes (a rewrite changes the inode:
    every file is renamed into place)."""
    return {str(path.relative_to(directory)): (path.lstat().st_ino,
                                               path.read_bytes() if path.is_file() else None)
            for path in sorted(directory.rglob("*"))}


def test_skip_if_current_rewrites_nothing_on_a_current_install(tmp_path, capsys):
    assert not plugin_is_current(tmp_path)
    assert main(["--bin-dir", str(tmp_path), "--skip-if-current"]) == 0
    assert plugin_is_current(tmp_path)
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(["--bin-dir", str(tmp_path), "--skip-if-current"]) == 0
    assert capsys.readouterr().out.strip() == f"{tmp_path / PLUGIN_NAME} is current"
    assert _snapshot(tmp_path) == before
    # Without the option it installs again, each file renamed over the old one.
    assert main(["--bin-dir", str(tmp_path)]) == 0
    after = _snapshot(tmp_path)
    assert after.keys() == before.keys()
    assert after[PLUGIN_NAME][0] != before[PLUGIN_NAME][0]


def test_another_plugin_version_or_interpreter_is_not_current(tmp_path):
    install_plugin(tmp_path)
    private = tmp_path / f".{PLUGIN_NAME}"
    assert sys.executable != _default_python()
    assert not plugin_is_current(tmp_path, python=sys.executable)
    stamp = json.loads((private / STAMP_NAME).read_text())
    (private / STAMP_NAME).write_text(json.dumps({**stamp, "sha256": "0" * 64}))
    assert not plugin_is_current(tmp_path)
    install_plugin(tmp_path)
    assert plugin_is_current(tmp_path)
    (private / f"{SHIM_MODULE}.code").unlink()  # a file gone behind its back
    assert not plugin_is_current(tmp_path)


def test_an_interrupted_install_is_never_current(tmp_path, monkeypatch):
    install_plugin(tmp_path)

    def broken_compile(*args, **kwargs):
        raise subprocess.CalledProcessError(1, "python")

    monkeypatch.setattr(subprocess, "run", broken_compile)
    with pytest.raises(subprocess.CalledProcessError):
        install_plugin(tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / f".{PLUGIN_NAME}" / STAMP_NAME).exists()
    assert not plugin_is_current(tmp_path)


def test_the_conflist_is_written_atomically_and_only_when_it_changes(tmp_path):
    other = tmp_path / "05-other.conflist"
    other.write_text("{}")
    written = write_conflist(tmp_path, "/run/meshgress/cni.sock")
    assert written == tmp_path / CONFLIST_NAME
    assert json.loads(written.read_text()) == compute_conflist("/run/meshgress/cni.sock")
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    inode = written.stat().st_ino
    assert write_conflist(tmp_path, "/run/meshgress/cni.sock") is None
    assert written.stat().st_ino == inode
    assert write_conflist(tmp_path, "/run/other.sock") == written
    assert written.stat().st_ino != inode  # renamed into place, never rewritten in place
    assert json.loads(written.read_text())["plugins"][0]["socket"] == "/run/other.sock"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["05-other.conflist", CONFLIST_NAME]
    assert other.read_text() == "{}"
