"""Where a same-host client finds the daemon's auth token, and how it reads it.

A daemon started without ``--auth-token-file`` generates a token into
``<shm dir>/kvtier-<port>.token`` (mode 0600, beside its pool segment; ``server/auth.py``), so
only its own user (and root) can read it: a client of that user finds it by the daemon's port;
another local user cannot, and is refused at the handshake. A daemon with a non-default
``--shm-dir`` needs its clients' ``server.auth_token_file`` pointed at the file.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_SHM_DIR = "/dev/shm"
MAX_TOKEN_CHARS = 256


def default_token_path(port: int, shm_dir: str | os.PathLike[str] = DEFAULT_SHM_DIR) -> Path:
    return Path(shm_dir) / f"kvtier-{port}.token"


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path``, or ``""`` if there is none this user may read (no such file,
    another user's file): the daemon then refuses the handshake, which the client sees as misses."""
    try:
        token = Path(path).read_text().strip()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return ""
    return token if 0 < len(token) <= MAX_TOKEN_CHARS else ""
