"""Session-shared ``kvtier server`` processes for the conformance suite (tests/tiers).

One daemon per distinct capacity (the suite needs a small one to check eviction), started on
first use and stopped at session end (``stop_shared``, called from tests/tiers/conftest.py, with
``atexit`` as a backstop). Each factory call clears the daemon, so a test starts empty.
"""

from __future__ import annotations

import atexit
from pathlib import Path

from kvtier.server.process import DaemonProcess
from kvtier.tiers.base import Tier

_DAEMONS: dict[int, DaemonProcess] = {}


def shared_daemon(capacity: int) -> DaemonProcess:
    d = _DAEMONS.get(capacity)
    if d is None or d.proc is None or d.proc.poll() is not None:
        d = DaemonProcess("--cpu-size", str(capacity), "--lease-timeout", "30").start()
        _DAEMONS[capacity] = d
    return d


def stop_shared() -> None:
    while _DAEMONS:
        _, d = _DAEMONS.popitem()
        try:
            if d.terminate(20) == 0:
                d.cleanup()
        finally:
            d.kill()


atexit.register(stop_shared)


def daemon_tier(capacity: int, tmp_path: Path) -> Tier:
    """A ``RemoteTier`` on a fresh (cleared) daemon of ``capacity`` bytes, via shared memory."""
    from kvtier.tiers.remote import RemoteTier

    t = RemoteTier(shared_daemon(capacity).url, timeout_s=10.0)
    t.clear()
    return t


def daemon_socket_tier(capacity: int, tmp_path: Path) -> Tier:
    """The same over the socket only (``?shm=0``), as a client on another host would be."""
    from kvtier.tiers.remote import RemoteTier

    t = RemoteTier(shared_daemon(capacity).url + "?shm=0", timeout_s=10.0)
    t.clear()
    return t


DAEMON_TIER_FACTORIES = {"daemon-shm": daemon_tier, "daemon-tcp": daemon_socket_tier}
