"""The licence inventory of an installation: every Python distribution and every Debian
package in it, with its version and licence.

Why it exists: a platform team decides whether it may run the meshgress image by what is
inside it, and many ban AGPL (and GPL-3) code in what they run. The image build runs

    python -m meshgress.licences --output-dir /usr/share/meshgress

as its last step, which writes `licences.json` (for tools) and `licences.txt` (for people)
and fails the build when a Python distribution is under a licence of the forbidden family
(any AGPL, any GPL-3.0: only, or-later, or unqualified) unless it is named with `--allow`.
Python distributions are the ones policed because they are loaded into the meshgress
process itself; Debian packages (iproute2, nftables, the C library...) are separate programs
and system libraries, listed with their licences so nothing is hidden.

Where licences come from:
- a Python distribution: its metadata's `License-Expression` (PEP 639), else `License`
  when it is a name rather than a pasted licence text, else its `License ::` classifiers;
- a Debian package: `/usr/share/doc/<package>/copyright`; the `License:` names of a
  machine-readable (DEP-5) file, else the `/usr/share/common-licenses/<NAME>` files a
  free-form one refers to, else the licence its wording is recognised as;
- a program in /usr/local/bin (wireguard-go, copied in, not packaged): the Go modules in
  its embedded build information (what `go version -m` prints), each with its licence
  from `GO_MODULE_LICENCES`; a program that is not a Go binary is listed as UNKNOWN.

`compute_*` and `parse_*` are purely computational; `collect_*` read the installation.
"""

from __future__ import annotations

import argparse
import email.message
import importlib.metadata
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEBIAN_DOC_ROOT = Path("/usr/share/doc")
PROGRAM_DIR = Path("/usr/local/bin")
GO_MODULE_LICENCES = (
    ("golang.zx2c4.com/wireguard", "MIT"),
    ("golang.org/x/", "BSD-3-Clause"),
    ("std", "BSD-3-Clause"),
)
"""Licences of the Go modules the image's programs are built from (path prefix, licence),
read from each module's own LICENSE file; the Go standard library is `std`. A module not
listed here shows as UNKNOWN in the inventory, which the image test refuses."""
GO_BUILDINFO_MAGIC = b"\xff Go buildinf:"
SYSTEM_PYTHON_PATHS = ("/usr/lib/python3/dist-packages",)
"""Where Debian's own Python packages put their distributions (outside any virtualenv)."""
UNKNOWN = "UNKNOWN"
LONG_LICENCE_FIELD = 120
"""A `License` field longer than this (or with a line break) is a pasted licence text,
not a name; the classifiers say it better."""

_FORBIDDEN = re.compile(
    r"\bAGPL|Affero"
    r"|(?<![L])GPL-?v?3"                    # GPL-3.0-only, GPL-3.0+, GPLv3, GPL3 (not LGPL)
    r"|(?<!Lesser )General Public License,? v(?:ersion )?3",  # classifier / prose forms
    re.IGNORECASE)
_OR = re.compile(r"\s+OR\s+")
_COMMON_LICENCE = re.compile(r"/usr/share/common-licenses/([A-Za-z0-9][A-Za-z0-9.+_-]*)")
_RECOGNISED_WORDING = tuple((name, re.compile(wording, re.IGNORECASE)) for name, wording in (
    ("PSF-2.0", r"PYTHON\s+SOFTWARE\s+FOUNDATION\s+LICENSE"),
    ("LGPL", r"GNU\s+(?:Lesser|Library)\s+General\s+Public\s+License"),
    ("GPL", r"GNU\s+General\s+Public\s+License"),
    ("Apache", r"Apache\s+License"),
    ("BSD-style", r"Redistribution\s+and\s+use\s+in\s+source\s+and\s+binary\s+forms"),
    ("MIT-style", r"Permission\s+is\s+hereby\s+granted,\s+free\s+of\s+charge"),
    ("permissive-notice", r"permission\s+to\s+use,\s+copy,\s+modify"),
    ("public-domain", r"public\s+domain"),
))
"""Licences recognised by their wording in a free-form copyright file (which names none)."""
_DEP5_FORMAT = re.compile(r"^Format:\s*\S*copyright-format", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class PythonDistribution:
    name: str
    version: str
    licence: str
    licence_source: str  # License-Expression | License | classifiers | none


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    architecture: str
    source: str
    licences: tuple[str, ...]
    copyright_format: str  # dep5 | free-form | missing
    copyright_package: str  # whose copyright file was read: this one, or one of its source


@dataclass(frozen=True)
class GoModule:
    path: str
    version: str
    licence: str


@dataclass(frozen=True)
class Program:
    path: str
    kind: str  # go | unknown
    modules: tuple[GoModule, ...]


# --- pure ---------------------------------------------------------------------------------


def parse_python_licence(metadata: email.message.Message) -> tuple[str, str]:
    """(licence, where it came from) of one distribution's metadata. Purely computational."""
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression, "License-Expression"
    field = (metadata.get("License") or "").strip()
    if field and "\n" not in field and len(field) <= LONG_LICENCE_FIELD \
            and field.upper() != UNKNOWN:
        return field, "License"
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::") and c.count("::") >= 2]
    if classifiers:
        # Several classifiers are read as all applying (AND): the cautious reading.
        return " AND ".join(classifiers), "classifiers"
    return UNKNOWN, "none"


def parse_debian_copyright(text: str | None) -> tuple[tuple[str, ...], str]:
    """(licence names, format) of a Debian copyright file; None: the file is missing.
    Purely computational."""
    if text is None:
        return (), "missing"
    if _DEP5_FORMAT.search(text.split("\n\n", 1)[0]):
        names: list[str] = []
        for match in re.finditer(r"^License:[ \t]*(\S[^\n]*)", text, re.MULTILINE):
            name = match.group(1).strip()
            if name not in names:
                names.append(name)
        return tuple(names), "dep5"
    found = [name for name, wording in _RECOGNISED_WORDING if wording.search(text)]
    for referred in _COMMON_LICENCE.findall(text):
        if referred.rstrip(".") not in found:
            found.append(referred.rstrip("."))
    return tuple(found), "free-form"


def parse_go_buildinfo(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(Go version, [(module path, version)]) from a Go binary's embedded build
    information, main module first; ValueError if there is none in the inline-string form
    every Go since 1.18 writes. Purely computational."""
    start = data.find(GO_BUILDINFO_MAGIC)
    if start < 0:
        raise ValueError("not a Go binary (no build information)")
    flags = data[start + 15]
    if not flags & 0x2:
        raise ValueError("Go build information from before Go 1.18 (pointer form)")
    offset = start + 32
    strings: list[bytes] = []
    for _ in range(2):
        length = shift = 0
        while True:
            byte = data[offset]
            offset += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        strings.append(data[offset:offset + length])
        offset += length
    # The module information sits between two 16-byte sentinels (binary, not text).
    go_version, modinfo = strings[0].decode(), strings[1][16:-16].decode()
    modules = []
    for line in modinfo.splitlines():
        fields = line.split("\t")
        if fields[0] in ("mod", "dep") and len(fields) >= 3:
            modules.append((fields[1], fields[2]))
    return go_version, modules


def compute_go_module_licence(path: str) -> str:
    """A Go module's licence from `GO_MODULE_LICENCES`, or UNKNOWN. Purely computational."""
    for prefix, licence in GO_MODULE_LICENCES:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return licence
    return UNKNOWN


def compute_program(path: str, data: bytes) -> Program:
    """What the inventory says of one program file. Purely computational."""
    try:
        go_version, modules = parse_go_buildinfo(data)
    except (ValueError, IndexError, UnicodeDecodeError):
        return Program(path, "unknown", ())
    listed = [GoModule(module, version, compute_go_module_licence(module))
              for module, version in modules]
    listed.append(GoModule("std", go_version, compute_go_module_licence("std")))
    return Program(path, "go", tuple(listed))


def is_forbidden_licence(licence: str) -> bool:
    """True when every alternative of an SPDX-style `A OR B` licence names a forbidden
    licence (AGPL, GPL-3.0). `GPL-2.0-or-later OR Apache-2.0` is therefore fine, and an
    unknown licence is not forbidden (it is listed as UNKNOWN for a person to judge).
    Purely computational."""
    alternatives = [part.strip(" ()") for part in _OR.split(licence) if part.strip(" ()")]
    return bool(alternatives) and all(_FORBIDDEN.search(part) for part in alternatives)


def compute_violations(distributions: Iterable[PythonDistribution],
                       allowed: Iterable[str] = ()) -> list[PythonDistribution]:
    """Python distributions under a forbidden licence and not explicitly allowed (names
    compared as PyPI does: case, `-`, `_` and `.` do not matter). Purely computational."""
    allow = {canonical_name(name) for name in allowed}
    return [d for d in distributions
            if is_forbidden_licence(d.licence) and canonical_name(d.name) not in allow]


def canonical_name(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503). Purely computational."""
    return re.sub(r"[-_.]+", "-", name).lower()


def compute_inventory(python: Sequence[PythonDistribution], debian: Sequence[DebianPackage],
                      programs: Sequence[Program] = (),
                      allowed: Sequence[str] = ()) -> dict[str, Any]:
    """The inventory as JSON-ready data, sorted by name. Purely computational."""
    return {
        "policy": {
            "forbiddenForPython": "AGPL (any version), GPL-3.0 (only, or-later, unqualified)",
            "allowed": sorted(canonical_name(n) for n in allowed),
        },
        "python": [asdict(d) for d in sorted(python, key=lambda d: canonical_name(d.name))],
        "debian": [{**asdict(p), "licences": list(p.licences)}
                   for p in sorted(debian, key=lambda p: (p.name, p.architecture))],
        "programs": [{"path": p.path, "kind": p.kind,
                      "modules": [asdict(m) for m in p.modules]}
                     for p in sorted(programs, key=lambda p: p.path)],
    }


def render_text(inventory: dict[str, Any]) -> str:
    """A readable table of the inventory. Purely computational."""
    lines = ["Licences of everything installed in this image (generated at build time).", "",
             f"Python distributions ({len(inventory['python'])}):"]
    width = max((len(d["name"]) for d in inventory["python"]), default=0)
    vwidth = max((len(d["version"]) for d in inventory["python"]), default=0)
    lines += [f"  {d['name']:<{width}}  {d['version']:<{vwidth}}  {d['licence']}"
              for d in inventory["python"]]
    lines += ["", f"Debian packages ({len(inventory['debian'])}):"]
    width = max((len(p["name"]) for p in inventory["debian"]), default=0)
    vwidth = max((len(p["version"]) for p in inventory["debian"]), default=0)
    for p in inventory["debian"]:
        licences = ", ".join(p["licences"]) or f"{UNKNOWN} ({p['copyright_format']})"
        lines.append(f"  {p['name']:<{width}}  {p['version']:<{vwidth}}  {licences}")
    lines += ["", f"Programs copied in, not packaged ({len(inventory['programs'])}):"]
    for program in inventory["programs"]:
        lines.append(f"  {program['path']} ({program['kind']})")
        lines += [f"    {m['path']} {m['version']}  {m['licence']}" for m in program["modules"]]
        if not program["modules"]:
            lines.append(f"    {UNKNOWN}: not a Go binary")
    policy = inventory["policy"]
    lines += ["", f"Not accepted in Python distributions: {policy['forbiddenForPython']}.",
              f"Explicitly allowed: {', '.join(policy['allowed']) or 'none'}.", ""]
    return "\n".join(lines)


# --- reading the installation --------------------------------------------------------------


def collect_python(paths: Sequence[str] | None = None) -> list[PythonDistribution]:
    """Every distribution importlib.metadata finds on `paths` (default: this interpreter's
    path plus Debian's dist-packages), once each."""
    search = list(sys.path if paths is None else paths)
    if paths is None:
        search += [p for p in SYSTEM_PYTHON_PATHS if Path(p).is_dir() and p not in search]
    found: dict[str, PythonDistribution] = {}
    for dist in importlib.metadata.distributions(path=search):
        name = dist.metadata["Name"]
        if not name or canonical_name(name) in found:
            continue  # the first on the path is the one imported
        licence, source = parse_python_licence(dist.metadata)  # type: ignore[arg-type]
        found[canonical_name(name)] = PythonDistribution(name, dist.version, licence, source)
    return list(found.values())


def collect_debian(doc_root: Path = DEBIAN_DOC_ROOT) -> list[DebianPackage]:
    """Every installed Debian package ("ii"), with the licences of its copyright file. A
    package whose documentation folder is a symlink to another package of the same
    source (gone where documentation is left out, as in slim images) is read through
    that package's copyright file."""
    listing = subprocess.run(
        ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t"
                                   "${Architecture}\t${source:Package}\n"],
        capture_output=True, text=True, check=True).stdout
    installed = [fields for fields in (line.split("\t") for line in listing.splitlines())
                 if fields[0].startswith("ii")]

    def copyright_text(package: str) -> str | None:
        try:
            return (doc_root / package / "copyright").read_text(errors="replace")
        except OSError:
            return None

    packages = []
    for _, name, version, architecture, source in installed:
        reader, text = name, copyright_text(name)
        siblings = (other for _, other, _, _, other_source in installed
                    if other_source == source and other != name)
        while text is None and (sibling := next(siblings, None)) is not None:
            reader, text = sibling, copyright_text(sibling)
        licences, copyright_format = parse_debian_copyright(text)
        packages.append(DebianPackage(name, version, architecture, source, licences,
                                      copyright_format, reader if text is not None else ""))
    return packages


def collect_programs(directory: Path = PROGRAM_DIR) -> list[Program]:
    """Every regular file in `directory`, read for Go build information."""
    if not directory.is_dir():
        return []
    return [compute_program(str(path), path.read_bytes())
            for path in sorted(directory.iterdir()) if path.is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshgress.licences",
        description="Write the licence inventory of this installation; fail on a forbidden "
                    "licence in a Python distribution that is not explicitly allowed.")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where licences.json and licences.txt are written")
    parser.add_argument("--program-dir", type=Path, default=PROGRAM_DIR,
                        help=f"programs copied in, not packaged (default {PROGRAM_DIR})")
    parser.add_argument("--allow", action="append", default=[], metavar="DISTRIBUTION",
                        help="accept this Python distribution whatever its licence")
    args = parser.parse_args(argv)
    python = collect_python()
    inventory = compute_inventory(python, collect_debian(), collect_programs(args.program_dir),
                                  args.allow)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "licences.json").write_text(json.dumps(inventory, indent=2) + "\n")
    (args.output_dir / "licences.txt").write_text(render_text(inventory))
    violations = compute_violations(python, args.allow)
    for dist in violations:
        print(f"licences: {dist.name} {dist.version} is under {dist.licence}, which is not "
              f"accepted (allow it explicitly with --allow {dist.name})", file=sys.stderr)
    print(f"licences: {len(inventory['python'])} Python distributions, "
          f"{len(inventory['debian'])} Debian packages and {len(inventory['programs'])} "
          f"programs listed in {args.output_dir}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
