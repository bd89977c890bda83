"""The `encodings` package of the plugin's private interpreter home: UTF-8 without the rest.

CPython imports the package `encodings` while it starts, before any of our code runs, to
find the codecs of the file system and of the standard streams. The standard package
imports `encodings.aliases` (a table of ~300 names) and `encodings.utf_8` on every start:
~0.5 ms of a plugin whose whole ADD is ~12 ms. `cni.install` gives the plugin's
interpreter a private home (a `._pth` file: only the directories it lists are searched)
where this module is `encodings/__init__.py`, and starts it in UTF-8 mode (`-X utf8`), so
the only codec it needs while starting is UTF-8, which this module builds from the
built-in `_codecs` functions without importing anything.

Any other codec still works, exactly as in the standard library: the standard package's
directory (further down `sys.path`: the `._pth` file lists the interpreter's own library
after the private one) is part of this package's `__path__`, so its submodules import as
usual, and on the first lookup of another name this module runs the standard package's
`__init__.py` in its own namespace and from then on hands every other name to the
standard search function. Nothing registers here unless this file runs as `encodings`,
so importing it elsewhere (tests, linters) leaves the importing interpreter's codecs alone.
"""

# No `from __future__ import annotations`, no `typing`: each would be imported on every
# start of the plugin, and typing alone costs more than this module saves.
import codecs
import sys

_UTF8_NAMES = frozenset({"utf_8", "utf8"})


def is_utf8_name(name: str) -> bool:
    """True for the spellings CPython asks for while it starts (`utf-8`, `utf_8`, `UTF8`)."""
    return name.lower().replace("-", "_").replace(" ", "_") in _UTF8_NAMES


def _utf8_decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
    return codecs.utf_8_decode(data, errors, True)


class _IncrementalEncoder(codecs.IncrementalEncoder):
    def encode(self, input: str, final: bool = False) -> bytes:
        return codecs.utf_8_encode(input, self.errors)[0]


class _IncrementalDecoder(codecs.BufferedIncrementalDecoder):
    _buffer_decode = staticmethod(codecs.utf_8_decode)  # type: ignore[assignment]


class _StreamWriter(codecs.StreamWriter):
    encode = staticmethod(codecs.utf_8_encode)  # type: ignore[assignment]


class _StreamReader(codecs.StreamReader):
    decode = staticmethod(codecs.utf_8_decode)  # type: ignore[assignment]


UTF8 = codecs.CodecInfo(
    name="utf-8",
    encode=codecs.utf_8_encode,
    decode=_utf8_decode,  # type: ignore[arg-type]  # typeshed's Buffer is 3.12+
    incrementalencoder=_IncrementalEncoder,
    incrementaldecoder=_IncrementalDecoder,
    streamwriter=_StreamWriter,
    streamreader=_StreamReader,
)


def _standard_directories() -> list[str]:
    """Where the standard package may be: `encodings` under every other `sys.path` entry."""
    own = __file__.rsplit("/", 2)[0]
    return [f"{entry}/encodings" for entry in sys.path if entry != own]


def _load_standard_package() -> None:
    """Run the standard `encodings/__init__.py` in this module's namespace: it defines
    `search_function`, `normalize_encoding`, … and registers its search function."""
    for directory in _standard_directories():
        candidate = f"{directory}/__init__.py"
        try:
            with open(candidate, encoding="utf-8") as source:
                text = source.read()
        except OSError:
            continue
        exec(compile(text, candidate, "exec"), globals())  # noqa: S102
        return
    raise LookupError("the standard library's encodings package is not on sys.path")


def search(name: str) -> codecs.CodecInfo | None:
    """UTF-8 here; any other name from the standard package, loaded on first need."""
    if is_utf8_name(name):
        return UTF8
    namespace = globals()
    if "search_function" not in namespace:
        _load_standard_package()
    standard_search = namespace["search_function"]
    result: codecs.CodecInfo | None = standard_search(name)
    return result


if __name__ == "encodings":
    # The standard submodules (`encodings.aliases`, `encodings.latin_1`, …) are found under
    # this package, also when imported directly (`locale` does); only a lookup loads them.
    globals()["__path__"].extend(_standard_directories())
    codecs.register(search)
