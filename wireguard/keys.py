"""WireGuard keys: X25519 key pairs, their text forms, and the node's private key file.

Why it exists: a node's WireGuard identity must survive restarts (a new key after a
reboot breaks every tunnel to that node until all peers learn it — Cilium #25492,
#35644), must never be readable by anyone but its owner, and only its *public* half may
ever leave the node. This module is the one place that touches the private key file.

Keys are passed around as strings in wg's own format: standard base64 of 32 bytes (44
characters ending in "="). `normalise_key` turns any accepted spelling into that
canonical form, so equal keys always compare equal. The UAPI of wireguard-go wants keys
in lowercase hex: `key_to_hex` / `key_from_hex`.

Everything here is purely computational except `load_or_create_private_key`, which
reads or creates the key file.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import functools
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from wireguard.errors import InvalidKeyError, KeyFileError

KEY_LEN = 32
"""Every WireGuard key (private, public, preshared) is 32 bytes."""

_MEMO = 1 << 15
"""Entries kept by the memoised conversions below. A node agent converts the same few
thousand peer keys on every resync (5,000 peers: 0.2 s of base64 each time without the
memo); the functions are pure, so remembering their answers changes nothing but the cost."""


def parse_key(text: str) -> bytes:
    """Decode a base64 WireGuard key to its 32 raw bytes; InvalidKeyError if it is not one.

    Purely computational."""
    if not isinstance(text, str):
        raise InvalidKeyError(f"a WireGuard key must be a string, not {type(text).__name__}")
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyError("not a WireGuard key: not valid base64") from None
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"not a WireGuard key: decodes to {len(raw)} bytes, not {KEY_LEN}")
    return raw


def encode_key(raw: bytes) -> str:
    """The canonical base64 form of 32 raw key bytes. Purely computational."""
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"a WireGuard key is {KEY_LEN} bytes, not {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def normalise_key(text: str) -> str:
    """Validate a base64 key and return its canonical spelling. Purely computational."""
    if not isinstance(text, str):
        return encode_key(parse_key(text))  # raises InvalidKeyError
    return _normalise_key(text)


@functools.lru_cache(maxsize=_MEMO)
def _normalise_key(text: str) -> str:
    return encode_key(parse_key(text))


def is_valid_key(text: object) -> bool:
    """True if `text` is a base64 string of exactly 32 bytes. Purely computational."""
    if not isinstance(text, str):
        return False
    try:
        _normalise_key(text)
    except InvalidKeyError:
        return False
    return True


def key_to_hex(key: str) -> str:
    """A base64 key in the lowercase hex form the UAPI uses. Purely computational."""
    return parse_key(key).hex()


@functools.lru_cache(maxsize=_MEMO)
def key_from_hex(text: str) -> str:
    """A UAPI hex key (64 hex digits) back in base64. Purely computational."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise InvalidKeyError("not a hex WireGuard key") from None
    return encode_key(raw)


def generate_private_key() -> str:
    """A fresh X25519 private key, base64 (like `wg genkey`)."""
    raw = X25519PrivateKey.generate().private_bytes_raw()
    return encode_key(raw)


def public_key(private: str) -> str:
    """The public key of a base64 private key (like `wg pubkey`). Purely computational.

    X25519 clamps the scalar, so any 32 bytes are a usable private key, exactly as in wg.
    """
    key = X25519PrivateKey.from_private_bytes(parse_key(private))
    return encode_key(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


# --- the private key file -------------------------------------------------------------

_FILE_MODE = 0o600
_DIR_MODE = 0o700


def load_or_create_private_key(path: str | os.PathLike[str]) -> str:
    """Return the node's private key, creating the key file the first time.

    The file holds one base64 key and a newline (the format of `wg genkey`). It is
    created once, never rewritten: a missing parent directory is made with mode 0700,
    the key is written to a temporary file opened with O_CREAT|O_EXCL and mode 0600,
    fsync'd, and then linked into place atomically without replacing anything — if two
    processes race, both end up with the key of whichever linked first. An existing file
    is refused (KeyFileError, with what to do about it) when it is not a regular file,
    is owned by another user, is readable or writable by group or others, or does not
    hold exactly one valid key. The key is never logged or put in an error message.
    """
    target = Path(path)
    _ensure_parent(target.parent)
    try:
        return _read_key_file(target)
    except FileNotFoundError:
        pass
    _create_key_file(target, generate_private_key())
    return _read_key_file(target)


def _ensure_parent(parent: Path) -> None:
    try:
        st = parent.stat()
    except FileNotFoundError:
        parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(parent, _DIR_MODE)  # mkdir's mode is filtered by the umask
        return
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"{parent} must be a directory to hold the WireGuard private key")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise KeyFileError(
            f"{parent} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
            f"someone else could replace the WireGuard private key; chmod 700 {parent}"
        )


def _read_key_file(target: Path) -> str:
    try:
        # O_NONBLOCK: a FIFO in place of the file must not hang the agent.
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"{target} is a symbolic link; the private key file must be a "
                               "regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{target} is not a regular file")
        if st.st_uid != os.geteuid():
            raise KeyFileError(f"{target} is owned by uid {st.st_uid}, not by this process "
                               f"(uid {os.geteuid()}); chown it or remove it")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{target} has mode {mode:04o}: a WireGuard private key must be readable by its "
                f"owner only. If it may have leaked, remove it (a new key is made); "
                f"otherwise chmod 600 {target}"
            )
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{target} does not hold a WireGuard key (not text)") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != 1 or not is_valid_key(lines[0]):
        raise KeyFileError(
            f"{target} does not hold a WireGuard key (one base64 line of 32 bytes, as "
            "`wg genkey` writes); fix it or remove it to have a new key made"
        )
    return normalise_key(lines[0])


def _create_key_file(target: Path, key: str) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # whatever the umask
            os.write(fd, (key + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, target)  # atomic, and never replaces an existing key
        except FileExistsError:
            pass  # another process won the race: its key is the key
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            # A file system without hard links: an atomic rename is the next best thing.
            if target.exists():
                return
            os.rename(tmp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
