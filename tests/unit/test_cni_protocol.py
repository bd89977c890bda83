"""The shim/server protocol: JSON without `json`, framing, versions, error objects."""

from __future__ import annotations

import json
import socket

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


# --- the binary wire format, and the server answering both protocols ----------------------


@given(st.lists(st.binary(max_size=8).filter(lambda v: b"\0" not in v),
                min_size=len(p.REQUEST_FIELDS), max_size=len(p.REQUEST_FIELDS)),
       st.binary(max_size=64))
def test_requests_round_trip(values, stdin):
    """Environment values are any bytes but NUL (not necessarily UTF-8); they arrive as the
    str that os.environ would give for them."""
    frame = p.encode_request(values, stdin)
    assert frame[:4] == p.REQUEST_MAGIC
    assert int.from_bytes(frame[4:8], "big") == len(frame) - 8
    fields, raw = p.decode_request(frame[8:])
    expected = [v.decode("utf-8", "surrogateescape") for v in values]
    assert (list(fields.values()), raw) == (expected, stdin)
    assert list(fields) == list(p.REQUEST_FIELDS)


def test_responses_round_trip():
    frame = p.encode_response(1, '{"code": 7}')
    assert p.decode_response_header(frame[:12]) == (1, len(frame) - 12)
    assert frame[12:] == b'{"code": 7}'


class _EchoService:
    def handle(self, request, netns_fd=None, caller=None):
        return 0, json.dumps(request, sort_keys=True)


def _serve(frame: bytes) -> bytes:
    from cni.server import _serve_connection

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(frame)
        _serve_connection(theirs, _EchoService())  # type: ignore[arg-type]
        theirs.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := ours.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


REQUEST = {"command": "ADD", "containerID": "c", "ifname": "eth0", "netns": "/n", "args": "",
           "path": "/p", "stdin": '{"cniVersion": "1.0.0"}'}


def test_the_server_answers_the_binary_protocol_in_kind():
    values = [REQUEST[name].encode() for name in p.REQUEST_FIELDS]
    reply = _serve(p.encode_request(values, REQUEST["stdin"].encode()))
    exit_code, length = p.decode_response_header(reply[:12])
    assert (exit_code, json.loads(reply[12:12 + length])) == (0, REQUEST)


def test_the_server_rejects_a_configuration_that_is_not_utf8():
    values = [REQUEST[name].encode() for name in p.REQUEST_FIELDS]
    reply = _serve(p.encode_request(values, b"\xff{}"))
    exit_code, length = p.decode_response_header(reply[:12])
    assert (exit_code, json.loads(reply[12:12 + length])["code"]) == (1, p.ERR_DECODE)
