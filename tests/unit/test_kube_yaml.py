"""YAML is read into JSON's data model, as the API server reads it, and every way a
document can be unreadable is one error type."""

import pytest

from meshgress import kube_yaml


@pytest.mark.parametrize(("text", "value"), [
    ("since: 2024-02-28", {"since": "2024-02-28"}),
    ("since: 2024-02-30", {"since": "2024-02-30"}),
    ("at: 2024-02-28T10:00:00Z", {"at": "2024-02-28T10:00:00Z"}),
    ("at: !!timestamp 2024-13-01", {"at": "2024-13-01"}),
    ("n: 0x10\nb: yes\nf: 1.5\nz: ~", {"n": 16, "b": True, "f": 1.5, "z": None}),
])
def test_dates_stay_the_strings_they_are_written_as(text, value):
    assert kube_yaml.load(text) == value


@pytest.mark.parametrize("text", [
    "n: !!int many", "f: !!float much", "b: !!binary ab", "[unclosed", "x: !!python/name:os.system",
    "[" * 5000 + "]" * 5000, b"a: \xc3\n",
])
def test_every_unreadable_document_is_one_error(text):
    with pytest.raises(kube_yaml.KubeYamlError) as raised:
        kube_yaml.load(text)
    assert str(raised.value)


def test_documents_of_a_stream():
    assert kube_yaml.load_all("a: 1\n---\n---\nb: 2022-01-01\n") == [{"a": 1}, None,
                                                                     {"b": "2022-01-01"}]
    with pytest.raises(kube_yaml.KubeYamlError):
        kube_yaml.load_all("a: 1\n---\nb: !!int two\n")
