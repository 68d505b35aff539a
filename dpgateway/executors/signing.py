"""Private key files and HMAC-SHA256 request signatures, shared by the he key holder and the mpc parties.

A key file is ``name base64`` lines, written 0600 where it holds a secret (``write_key_file`` sets the mode
with ``fchmod``, which the umask does not reduce) and refused by ``read_key_file(private=True)`` if others
may read it. A signature is HMAC-SHA256 under a 32-byte key over the canonical JSON (sorted keys, no
spaces) of a message without its ``mac`` field, so changing any field after signing invalidates it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from dpgateway.errors import InvalidParameterError


def sign(key: bytes, message: dict[str, Any]) -> str:
    """HMAC-SHA256 over the canonical JSON of ``message`` without its ``mac``."""
    body = {k: v for k, v in message.items() if k != "mac"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def signed(key: bytes, message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its ``mac``."""
    return {**message, "mac": sign(key, message)}


def signed_by(key: bytes, message: dict[str, Any]) -> bool:
    """Whether ``message`` carries a valid ``mac`` under ``key`` (constant-time comparison)."""
    mac = message.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, sign(key, message))


def read_key_file(path: Path, *, private: bool) -> dict[str, bytes]:
    """The parts of a key file; ``private=True`` refuses a file that others than its owner may read."""
    try:
        text = path.read_text(encoding="ascii")
        mode = path.stat().st_mode & 0o777
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise InvalidParameterError(f"key file {str(path)!r} cannot be read ({reason})") from None
    if private and mode & 0o077:
        raise InvalidParameterError(f"key file {path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        return {name: base64.b64decode(value) for name, value in (line.split(" ", 1) for line in text.splitlines())}
    except ValueError:
        raise InvalidParameterError(f"{path} is not a dpgateway key file") from None


def write_key_file(path: Path, parts: dict[str, bytes], mode: int) -> None:
    """Write ``parts`` to ``path`` atomically with exactly ``mode`` (0o600 for secrets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        os.fchmod(handle.fileno(), mode)  # O_CREAT's mode is reduced by the umask; fchmod is not
        for name, data in parts.items():
            handle.write(f"{name} {base64.b64encode(data).decode()}\n")
    os.replace(temporary, path)
