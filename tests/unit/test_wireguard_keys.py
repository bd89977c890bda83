"""Keys: base64/hex forms, public key derivation, and the private key file's rules."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from wireguard.errors import InvalidKeyError, KeyFileError
from wireguard.keys import (
    encode_key,
    generate_private_key,
    is_valid_key,
    key_from_hex,
    key_to_hex,
    load_or_create_private_key,
    normalise_key,
    parse_key,
    public_key,
)

# RFC 7748 section 6.1 test vector (Alice).
ALICE_PRIVATE_HEX = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC_HEX = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def b64(hex_text: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_text)).decode()


def test_public_key_matches_rfc7748_vector() -> None:
    assert public_key(b64(ALICE_PRIVATE_HEX)) == b64(ALICE_PUBLIC_HEX)


@pytest.mark.skipif(shutil.which("wg") is None, reason="wg (wireguard-tools) not installed")
def test_public_key_matches_wg_pubkey() -> None:
    private = generate_private_key()
    out = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert public_key(private) == out


def test_generated_keys_are_valid_and_distinct() -> None:
    a, b = generate_private_key(), generate_private_key()
    assert is_valid_key(a) and is_valid_key(b) and a != b
    assert len(a) == 44 and a.endswith("=")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("not base64!", id="not-base64"),
        pytest.param(base64.b64encode(b"x" * 31).decode(), id="31-bytes"),
        pytest.param(base64.b64encode(b"x" * 33).decode(), id="33-bytes"),
        pytest.param(base64.b64encode(b"x" * 32).decode()[:-1], id="bad-padding"),
        pytest.param(None, id="not-a-string"),
    ],
)
def test_invalid_keys_are_refused(text: str) -> None:
    assert not is_valid_key(text)
    with pytest.raises(InvalidKeyError):
        parse_key(text)


def test_normalise_strips_whitespace_and_is_canonical() -> None:
    key = encode_key(bytes(range(32)))
    assert normalise_key(f"  {key}\n") == key
    # base64 that differs only in unused trailing bits decodes to the same bytes
    sloppy = key[:-2] + chr(ord(key[-2]) + 1) + "="
    assert parse_key(sloppy) == parse_key(key)
    assert normalise_key(sloppy) == key


def test_hex_round_trip() -> None:
    key = b64(ALICE_PUBLIC_HEX)
    assert key_to_hex(key) == ALICE_PUBLIC_HEX
    assert key_from_hex(ALICE_PUBLIC_HEX) == key
    with pytest.raises(InvalidKeyError):
        key_from_hex("zz" * 32)
    with pytest.raises(InvalidKeyError):
        key_from_hex("ab" * 31)


# --- the key file --------------------------------------------------------------------


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_file_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wg" / "private.key"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        key = load_or_create_private_key(path)
    finally:
        os.umask(old_umask)
    assert is_valid_key(key)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_text() == key + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["private.key"]  # no temp file left


def test_key_file_is_reused_across_calls(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    first = load_or_create_private_key(path)
    second = load_or_create_private_key(str(path))
    assert first == second
    assert path.read_text() == first + "\n"


def test_existing_wg_genkey_style_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    key = generate_private_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, f"{key}\n".encode())
    os.close(fd)
    assert load_or_create_private_key(path) == key


@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_accessible_file_is_refused(tmp_path: Path, bad_mode: int) -> None:
    path = tmp_path / "private.key"
    key = load_or_create_private_key(path)
    os.chmod(path, bad_mode)
    with pytest.raises(KeyFileError, match="chmod 600") as info:
        load_or_create_private_key(path)
    assert key not in str(info.value)  # the key never goes into an error
    assert path.read_text() == key + "\n"  # and the file is left alone


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello\n", id="not-a-key"),
        pytest.param(base64.b64encode(b"k" * 16) + b"\n", id="short-key"),
        pytest.param(b"\xff\xfe\n", id="binary"),
        pytest.param(b"A" * 43 + b"=\n" + b"B" * 43 + b"=\n", id="two-keys"),
    ],
)
def test_malformed_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "private.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeyFileError, match="does not hold a WireGuard key"):
        load_or_create_private_key(path)
    assert path.read_bytes() == content  # never overwritten


def test_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    load_or_create_private_key(real)
    link = tmp_path / "private.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_private_key(link)


def test_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "private.key"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_or_create_private_key(path)


def test_world_writable_parent_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(KeyFileError, match="writable by group or others"):
        load_or_create_private_key(parent / "private.key")
    assert list(parent.iterdir()) == []


def test_concurrent_creators_agree_on_one_key(tmp_path: Path) -> None:
    """Two processes racing to create the file both end up with the same key."""
    path = tmp_path / "private.key"
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        keys = list(pool.map(load_or_create_private_key, [path] * 8))
    assert len(set(keys)) == 1
    assert path.read_text() == keys[0] + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["private.key"]
