"""YAML read the way Kubernetes reads it: into JSON's data model, with one error type.

Kubernetes turns YAML into JSON before anything looks at it, so `2024-02-28` is a string
there, while a plain YAML safe loader makes it a `date` (and raises ValueError for
`2024-02-30`). Every document a user or another process hands meshgress — manifests,
objects in the file datastore, the cluster configuration — goes through here, so a date-like
label value means what it means to the API server, and a malformed document is a
`KubeYamlError` the caller reports, never a traceback that stops a process.
"""

from __future__ import annotations

from typing import Any

import yaml

_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _KubeLoader(_SafeLoader):  # type: ignore[misc]
    """The safe loader, timestamps kept as the strings they are written as."""


_KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _TIMESTAMP]
    for first, resolvers in _SafeLoader.yaml_implicit_resolvers.items()
}
_KubeLoader.add_constructor(_TIMESTAMP, _SafeLoader.construct_yaml_str)


class KubeYamlError(ValueError):
    """The text is not a YAML document meshgress can read; the message says where."""


# Besides YAMLError, the safe constructors raise ValueError (`!!int abc`) and the parser's
# recursion RecursionError; all mean the same to a caller: the text is unreadable.
_UNREADABLE = (yaml.YAMLError, ValueError, TypeError, RecursionError)


def load(text: str | bytes) -> Any:
    """The one document in `text` (None when empty)."""
    try:
        return yaml.load(text, Loader=_KubeLoader)  # noqa: S506 - a safe loader
    except _UNREADABLE as exc:
        raise KubeYamlError(" ".join(str(exc).split()) or type(exc).__name__) from None


def load_all(text: str | bytes) -> list[Any]:
    """Every document in `text`, empty ones as None."""
    try:
        return list(yaml.load_all(text, Loader=_KubeLoader))
    except _UNREADABLE as exc:
        raise KubeYamlError(" ".join(str(exc).split()) or type(exc).__name__) from None
