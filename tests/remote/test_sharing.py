"""Cross-instance sharing: process A stores, process B (another PYTHONHASHSEED) retrieves."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.remote import servers

WORKER = Path(__file__).with_name("share_worker.py")
ROOT = Path(__file__).parents[2]


def run(role: str, url: str, endpoint: str, salt: str, out: Path, seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT / "src")}
    env = {k: v for k, v in env.items() if not k.startswith("KVTIER_")}
    p = subprocess.run(
        [sys.executable, str(WORKER), role, url, endpoint, salt, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("store", ["redis", "s3"])
def test_process_b_retrieves_what_process_a_stored(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if store == "redis":
        if servers.REDIS_SERVER is None:
            pytest.skip(servers.NO_REDIS_REASON)
        url, endpoint = servers.shared_redis().url, ""
    else:
        s3 = request.getfixturevalue("s3_server")
        import boto3

        boto3.client("s3", endpoint_url=s3.endpoint_url).create_bucket(Bucket="kvtier-share")
        url, endpoint = f"s3://kvtier-share/{uuid.uuid4().hex[:8]}", s3.endpoint_url
    salt = uuid.uuid4().hex  # a namespace of its own: nothing from an earlier run can be a hit
    a = run("store", url, endpoint, salt, tmp_path / "a.pt", "1")
    b = run("retrieve", url, endpoint, salt, tmp_path / "b.pt", "2")
    # the invariant first: B gets exactly what A stored, bit for bit (whatever the machine's speed)
    assert b["lookup"] == b["num_tokens"] == a["stored"]
    assert b["kv"].dtype == torch.bfloat16 and torch.equal(b["kv"], a["kv"][:, :, : a["stored"]])
    assert a["stored"] == 100  # with the worker's 60 s timeout a short store is a defect, not load
