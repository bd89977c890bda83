"""The shim/server protocol: JSON without `json`, framing, versions, error objects."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cni import protocol as p

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(JSON_VALUES)
def test_dumps_and_loads_agree_with_the_json_module(value):
    assert json.loads(p.dumps(value)) == value
    assert p.loads(json.dumps(value)) == value


@pytest.mark.parametrize("text", ["", "{", '{"a": 1} trailing', "[1,]", "nul"],
                         ids=["empty", "unterminated", "trailing data", "trailing comma", "junk"])
def test_loads_rejects_bad_json_with_value_error(text):
    with pytest.raises(ValueError):
        p.loads(text)


def test_loads_accepts_surrounding_whitespace():
    assert p.loads('  \n{"cniVersion": "1.0.0"}\n ') == {"cniVersion": "1.0.0"}


def test_frames_carry_their_length():
    frame = p.encode_frame({"exit": 0, "stdout": "x"})
    assert p.frame_length(frame[:4]) == len(frame) - 4
    assert json.loads(frame[4:]) == {"exit": 0, "stdout": "x"}


def test_oversized_frames_are_refused():
    with pytest.raises(ValueError):
        p.frame_length((p.MAX_FRAME + 1).to_bytes(4, "big"))


def test_error_object_has_the_spec_fields():
    error = json.loads(p.CniError(p.ERR_INVALID_CONFIG, "bad", "worse").to_json("1.0.0"))
    assert error == {"cniVersion": "1.0.0", "code": 7, "msg": "bad", "details": "worse"}


def test_version_answer():
    answer = json.loads(p.compute_version_json())
    assert answer == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize(
    ("command", "version", "code"),
    [("ADD", "0.3.1", p.ERR_INCOMPATIBLE_VERSION), ("ADD", None, p.ERR_INVALID_CONFIG),
     ("GC", "1.0.0", p.ERR_INCOMPATIBLE_VERSION), ("STATUS", "0.4.0", p.ERR_INCOMPATIBLE_VERSION),
     ("ADD", "2.0.0", p.ERR_INCOMPATIBLE_VERSION)],
    ids=["too old", "missing", "GC before 1.1", "STATUS before 1.1", "from the future"],
)
def test_version_checks(command, version, code):
    with pytest.raises(p.CniError) as err:
        p.check_version(command, version)
    assert err.value.code == code


@pytest.mark.parametrize("version", p.SUPPORTED_VERSIONS)
def test_supported_versions_pass_for_add(version):
    assert p.check_version("ADD", version) == version


def test_own_error_codes_are_outside_the_reserved_range():
    own = [v for k, v in vars(p).items() if k.startswith("ERR_") and v >= 100]
    assert own
    assert len(set(own)) == len(own)
    assert all(code in p.ERROR_NAMES for code in own)
