"""What the daemon says when it is up: one startup line, and readiness for systemd.

The startup line names everything an operator checks first: the bound addresses (protocol and
HTTP), each tier with its capacity, and the shared segment; any remote URL in it is redacted.
``notify_ready`` implements the one message of systemd's ``sd_notify`` protocol kvtier needs
(``READY=1`` to ``$NOTIFY_SOCKET``, a datagram), so a ``Type=notify`` unit is ready when clients
can connect, not when the process started. Without ``$NOTIFY_SOCKET`` it does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

from kvtier.config import Config, format_size
from kvtier.redact import redact_url
from kvtier.tiers.base import TierStats

__all__ = ["notify_ready", "startup_line"]

log = logging.getLogger(__name__)


def startup_line(config: Config, port: int, http_port: int, tiers: dict[str, TierStats], shm: str) -> str:
    """``kvtier server ready: protocol HOST:PORT, http http://HOST:PORT, tiers cpu 4GiB > disk ...``."""
    host = config.server.host
    parts = []
    for name, t in tiers.items():
        size = format_size(t.capacity_bytes) if t.capacity_bytes else "unbounded"
        parts.append(f"{name} {size}")
    remote = f", remote {redact_url(config.remote.url)}" if config.remote.url else ""
    auth = "token" if config.server.auth_token_file else "none"
    return (
        f"kvtier server ready: protocol {host}:{port}, http http://{host}:{http_port} (/health /metrics "
        f"/stats), tiers {' > '.join(parts) or 'none'}{remote}, chunk {config.chunk.chunk_tokens} tokens, "
        f"pool {shm}, auth {auth}"
    )


def notify_ready(status: str = "") -> bool:
    """Send ``READY=1`` to systemd if it asked (``$NOTIFY_SOCKET``); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    message = "READY=1" + (f"\nSTATUS={status}" if status else "")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True
