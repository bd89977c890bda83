"""The licence inventory's pure parts: where a licence is read from, which are refused."""

from __future__ import annotations

import email.message
import struct

import pytest

from meshgress.licences import (
    DebianPackage,
    PythonDistribution,
    canonical_name,
    compute_inventory,
    compute_program,
    compute_violations,
    is_forbidden_licence,
    parse_debian_copyright,
    parse_go_buildinfo,
    parse_python_licence,
    render_text,
)


def metadata(**fields: str | list[str]) -> email.message.Message:
    message = email.message.Message()
    for key, value in fields.items():
        for item in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = item
    return message


@pytest.mark.parametrize(("fields", "expected"), [
    pytest.param({"License_Expression": "GPL-2.0-or-later OR Apache-2.0", "License": "x"},
                 ("GPL-2.0-or-later OR Apache-2.0", "License-Expression"), id="expression-first"),
    pytest.param({"License": "AGPL-3.0-or-later"}, ("AGPL-3.0-or-later", "License"),
                 id="license-field"),
    pytest.param({"License": "Copyright (c) someone\n\nPermission is hereby granted ...",
                  "Classifier": ["Programming Language :: Python",
                                 "License :: OSI Approved :: MIT License"]},
                 ("MIT License", "classifiers"), id="pasted-text-falls-back-to-classifiers"),
    pytest.param({"License": "UNKNOWN",
                  "Classifier": ["License :: OSI Approved :: GNU General Public License v2 "
                                 "(GPLv2)", "License :: OSI Approved :: MIT License"]},
                 ("GNU General Public License v2 (GPLv2) AND MIT License", "classifiers"),
                 id="several-classifiers-all-apply"),
    pytest.param({}, ("UNKNOWN", "none"), id="nothing"),
])
def test_python_licence_source(fields, expected):
    assert parse_python_licence(metadata(**fields)) == expected


@pytest.mark.parametrize(("licence", "forbidden"), [
    ("AGPL-3.0-or-later", True),
    ("AGPL-3.0-only", True),
    ("GNU Affero General Public License v3", True),
    ("GPL-3.0-only", True),
    ("GPL-3.0-or-later", True),
    ("GPLv3", True),
    ("GNU General Public License v3 (GPLv3)", True),
    ("GNU General Public License v3 or later (GPLv3+)", True),
    ("MIT AND GPL-3.0-only", True),
    ("AGPL-3.0-only OR GPL-3.0-only", True),
    ("(GPL-3.0-only OR MIT)", False),
    ("GPL-2.0-or-later OR Apache-2.0", False),
    ("GNU General Public License v2 (GPLv2)", False),
    ("LGPL-3.0-or-later", False),
    ("GNU Lesser General Public License v3 (LGPLv3)", False),
    ("Apache-2.0", False),
    ("UNKNOWN", False),
    ("", False),
])
def test_forbidden_licences(licence, forbidden):
    assert is_forbidden_licence(licence) is forbidden


def test_violations_skip_what_is_explicitly_allowed():
    dists = [PythonDistribution("wgconfig", "1.2.0", "AGPL-3.0-or-later", "License"),
             PythonDistribution("Some_Lib", "1", "GPL-3.0-only", "License-Expression"),
             PythonDistribution("pyroute2", "0.9", "GPL-2.0-or-later OR Apache-2.0", "x")]
    assert [d.name for d in compute_violations(dists)] == ["wgconfig", "Some_Lib"]
    assert [d.name for d in compute_violations(dists, ["some.lib"])] == ["wgconfig"]
    assert canonical_name("Some_Lib.x") == "some-lib-x"


DEP5 = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nftables

Files: *
Copyright: 2008-2014 Patrick McHardy
License: GPL-2

Files: doc/*
Copyright: someone
License: CC-BY-SA-4.0
 the licence text, indented

License: GPL-2
 On Debian systems, the full text is in /usr/share/common-licenses/GPL-2.
"""

FREE_FORM = """\
This is the Debian prepackaged version of something.

The overall license is the GNU Lesser General Public
License, version 2.1 (or, at your option, any later version).
On Debian systems, the complete text is in /usr/share/common-licenses/LGPL-2.1.
"""


def test_debian_copyright_files():
    assert parse_debian_copyright(DEP5) == (("GPL-2", "CC-BY-SA-4.0"), "dep5")
    assert parse_debian_copyright(FREE_FORM) == (("LGPL", "LGPL-2.1"), "free-form")
    assert parse_debian_copyright("no licence named at all") == ((), "free-form")
    assert parse_debian_copyright(None) == ((), "missing")


def go_binary(version: str, modinfo: str, *, flags: int = 2) -> bytes:
    """The layout Go (1.18+) writes: magic, pointer size, flags, padding to 32 bytes, then
    two varint-prefixed strings; the module information between 16-byte sentinels."""
    def varint_string(data: bytes) -> bytes:
        length, prefix = len(data), b""
        while length >= 0x80:
            prefix += struct.pack("B", (length & 0x7F) | 0x80)
            length >>= 7
        return prefix + struct.pack("B", length) + data
    sentinel = bytes(range(16))
    header = b"\xff Go buildinf:" + bytes([8, flags]) + bytes(16)
    return (b"\x7fELF" + bytes(100) + header + varint_string(version.encode())
            + varint_string(sentinel + modinfo.encode() + sentinel) + bytes(50))


MODINFO = ("path\tgolang.zx2c4.com/wireguard\n"
           "mod\tgolang.zx2c4.com/wireguard\tv0.0.0-20250522\th1:abc=\n"
           "dep\tgolang.org/x/sys\tv0.32.0\th1:def=\n"
           "dep\texample.com/unlisted\tv1.0.0\th1:ghi=\n"
           "build\tCGO_ENABLED=0\n" + "x" * 200)  # a long string: a two-byte varint


def test_go_build_information():
    data = go_binary("go1.26.8", MODINFO)
    assert parse_go_buildinfo(data) == ("go1.26.8", [
        ("golang.zx2c4.com/wireguard", "v0.0.0-20250522"), ("golang.org/x/sys", "v0.32.0"),
        ("example.com/unlisted", "v1.0.0")])
    program = compute_program("/usr/local/bin/wireguard-go", data)
    assert program.kind == "go"
    assert [(m.path, m.licence) for m in program.modules] == [
        ("golang.zx2c4.com/wireguard", "MIT"), ("golang.org/x/sys", "BSD-3-Clause"),
        ("example.com/unlisted", "UNKNOWN"), ("std", "BSD-3-Clause")]


def test_a_program_that_is_not_go_is_listed_as_unknown():
    assert compute_program("/usr/local/bin/x", b"#!/bin/sh\necho hi\n").kind == "unknown"
    with pytest.raises(ValueError, match=r"before Go 1\.18"):
        parse_go_buildinfo(go_binary("go1.17", MODINFO, flags=0))


def test_inventory_is_sorted_and_the_text_names_everything():
    python = [PythonDistribution("zlib-thing", "1", "MIT", "License"),
              PythonDistribution("Alpha", "2", "Apache-2.0", "License-Expression")]
    debian = [DebianPackage("nftables", "1.0.6", "amd64", "nftables", ("GPL-2",), "dep5",
                            "nftables"),
              DebianPackage("libgcc-s1", "12", "amd64", "gcc-12", (), "missing", "")]
    program = compute_program("/usr/local/bin/wireguard-go", go_binary("go1.26.8", MODINFO))
    inventory = compute_inventory(python, debian, [program], ["WgConfig"])
    assert [d["name"] for d in inventory["python"]] == ["Alpha", "zlib-thing"]
    assert [p["name"] for p in inventory["debian"]] == ["libgcc-s1", "nftables"]
    assert inventory["policy"]["allowed"] == ["wgconfig"]
    text = render_text(inventory)
    for name in ("Alpha", "zlib-thing", "nftables", "GPL-2", "UNKNOWN (missing)",
                 "golang.org/x/sys v0.32.0  BSD-3-Clause", "Explicitly allowed: wgconfig."):
        assert name in text
