"""The daemon's default auth token: generated once into a 0600 file beside its pool.

Why a token by default even on loopback: KV reveals the prompts it was computed from, and any
local user can connect to a loopback port. The file's mode (0600) is the access control: the
daemon's own user's clients read it (``wire/token_file.py``), other users cannot.

Invariants:
* the file is created atomically (0600 temp file, then rename), never through a symlink, and
  reused only if it is a regular file owned by this user with no group/other access, so a file
  another user planted in a world-writable ``/dev/shm`` is never trusted;
* a generated file is removed when the daemon stops gracefully; one left by a killed daemon is
  reused by the next daemon on the same port, so its clients keep working across the restart.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from kvtier.errors import KVTierError
from kvtier.wire.token_file import MAX_TOKEN_CHARS


class TokenFileError(KVTierError, ValueError):
    """The default token file exists but cannot be trusted (another user's, not a file)."""


def ensure_token_file(path: Path) -> str:
    """The token in ``path`` if it is ours and private, else a fresh one written there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise TokenFileError(
                f"auth token file {path} exists but is not a regular file owned by uid {os.geteuid()}: "
                "remove it, or pass --auth-token-file FILE"
            )
        if st.st_mode & 0o077 == 0:
            token = path.read_text().strip()
            if 0 < len(token) <= MAX_TOKEN_CHARS:
                return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token
