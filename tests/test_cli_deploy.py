"""The deployment kit (deploy/) and what a running ``kvtier server`` tells its operator.

One real daemon (module-scoped) with a Redis tier pointed at a closed port (and a password in
its URL) backs the checks: the startup line names the bound ports, tiers and sizes with the
password redacted; systemd gets READY=1; ``/health`` says ``degraded`` naming the Redis tier;
``kvtier stats`` aimed at the protocol port says so in one line; and every metric the Grafana
dashboard queries is one this daemon exports. The manifests are linted and schema-validated
offline, and every ``kvtier server`` command line in them must parse with the real CLI parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvtier.cli import build_parser, main
from kvtier.config import Config
from kvtier.server.process import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def notify(tmp_path_factory: pytest.TempPathFactory) -> Iterator[socket.socket]:
    path = tmp_path_factory.mktemp("notify") / "sd.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(60)
    yield s
    s.close()


@pytest.fixture(scope="module")
def daemon(notify: socket.socket, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    shm = tmp_path_factory.mktemp("shm")
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "PYTHONPATH": str(ROOT / "src")}
    d = DaemonProcess(
        "--cpu-size",
        "8MiB",
        "--remote",
        f"redis://u:sekret@127.0.0.1:{_closed_port()}/0",
        "--set",
        "remote.timeout_s=2",
        "--shm-dir",
        str(shm),
        env=env,
    )
    d.start()
    try:
        yield d
    finally:
        d.terminate(30)
        d.cleanup()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def test_startup_line_names_ports_tiers_and_sizes(daemon: DaemonProcess, notify: socket.socket) -> None:
    deadline = time.monotonic() + 30  # the ready file is written just before the line is logged
    while "server ready" not in daemon.log_tail() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = daemon.log_tail()
    line = next(ln for ln in log.splitlines() if "kvtier server ready" in ln)
    assert f"protocol 127.0.0.1:{daemon.port}" in line and f"http://127.0.0.1:{daemon.http_port}" in line
    assert "cpu 8MiB > redis" in line and "u:***@127.0.0.1" in line
    assert "sekret" not in log
    assert notify.recv(4096).decode().startswith("READY=1")


def test_health_names_an_unreachable_tier(daemon: DaemonProcess) -> None:
    code, body = _get(daemon.http_url + "/health")
    h = json.loads(body)
    assert code == 200 and h["status"] == "degraded", h  # 200: a degraded daemon still serves (misses)
    assert list(h["failing"]) == ["redis"] and h["tiers"] == ["cpu", "redis"]


def test_stats_at_the_protocol_port_is_one_line(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--url", f"http://127.0.0.1:{daemon.port}", "--timeout", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "protocol port" in err and "8080" in err, err


def _dashboard_metrics() -> set[str]:
    doc = json.loads((DEPLOY / "grafana" / "kvtier.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
    names = {m for e in exprs for m in re.findall(r"\b((?:kvtier|process)_[a-z0-9_]+)\b", e)}
    assert len(names) > 20
    return names


def test_dashboard_queries_only_exported_metrics(daemon: DaemonProcess) -> None:
    from kvtier.engine import CacheEngine
    from kvtier.tiers.remote import RemoteTier
    from kvtier.wire.token_file import default_token_path

    token = default_token_path(daemon.port, daemon.args[daemon.args.index("--shm-dir") + 1])
    client = RemoteTier(daemon.url, timeout_s=30, token_file=str(token))  # labelled histograms need a request
    try:
        client.contains(bytes(16))
    finally:
        client.close()
    _, body = _get(daemon.http_url + "/metrics")
    engine = CacheEngine(Config.load(env={}, **{"cpu.max_bytes": "1MiB"}))
    try:  # the engine panels are scraped from the serving process (vLLM), not the daemon
        text = body.decode() + engine.metrics.render().decode()
    finally:
        engine.close()
    exported = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and ln[0] != "#"}
    # kvtier_vllm_* are series of vLLM's own /metrics: tests/vllm/test_serve_metrics.py checks them
    missing = sorted(m for m in _dashboard_metrics() - exported if not m.startswith("kvtier_vllm_"))
    assert not missing, f"the dashboard queries series kvtier does not export: {missing}"


def test_dashboard_json_is_the_generators_output() -> None:
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    assert (DEPLOY / "grafana" / "kvtier.json").read_text() == build_dashboard.render(), (
        "run python deploy/grafana/build_dashboard.py"
    )


def _tool(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]'"
    return found


def test_yaml_lint_kubernetes_schemas_and_dockerfile_lint() -> None:
    r = subprocess.run(
        [_tool("yamllint"), "-c", str(DEPLOY / ".yamllint.yaml"), "--strict", str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DEPLOY,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    r = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", *manifests],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [_tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _server_args(argv: list[str]) -> Any:
    """``argv`` after ``kvtier server``, parsed by the real parser (SystemExit on an unknown flag)."""
    return build_parser().parse_args(["server", *argv])


def _containers() -> Iterator[dict[str, Any]]:
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
            yield from ({**c, "_pod": spec} for c in spec.get("containers", []))


def test_manifests_use_real_flags_ports_and_probes() -> None:
    kvtier = [c for c in _containers() if c.get("command") == ["kvtier", "server"]]
    assert len(kvtier) == 2  # sidecar and DaemonSet
    for c in kvtier:
        args = _server_args(c["args"])
        size = Config.load(env={}, **{"cpu.max_bytes": args.cpu_size}).cpu.max_bytes
        ports = {p["containerPort"] for p in c["ports"]}
        assert args.http_port in ports
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": args.http_port}
        shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
        vol = next(v for v in c["_pod"]["volumes"] if v["name"] == shm["name"])
        assert vol["emptyDir"]["medium"] == "Memory"
        limit = Config.load(env={}, **{"cpu.max_bytes": vol["emptyDir"]["sizeLimit"] + "B"}).cpu.max_bytes
        assert limit > size, "the /dev/shm emptyDir must hold the whole pool"
    engines = [c for c in _containers() if c["name"] == "vllm"]
    for c in engines:
        env = {e["name"]: e["value"] for e in c["env"]}
        cfg = Config.load(env=env)  # every KVTIER_* variable is a real config field
        assert cfg.remote.url.endswith(":5555") and not cfg.cpu.enabled
        conf = json.loads(c["args"][c["args"].index("--kv-transfer-config") + 1])
        module = __import__("importlib").util.find_spec(conf["kv_connector_module_path"])
        assert module is not None and "class " + conf["kv_connector"] in Path(module.origin).read_text()


def test_compose_systemd_and_docker_command_lines_parse() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert entry and cmd
    entrypoint = json.loads(entry.group(1))
    assert entrypoint[:2] == ["kvtier", "server"]
    _server_args(entrypoint[2:] + json.loads(cmd.group(1)))
    args = _server_args(entrypoint[2:] + compose["services"]["kvtier"]["command"])
    assert Config.load(env={}, **{"remote.url": args.remote}).remote.url.startswith("redis://")
    Config.load(env=compose["services"]["vllm"]["environment"])
    unit = (DEPLOY / "systemd" / "kvtier.service").read_text()
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert exec_start[1] == "server" and "Type=notify" in unit
    _server_args(exec_start[2:])


def test_lookup_refuses_an_unknown_kv_dtype(daemon: DaemonProcess) -> None:
    from kvtier.wire.token_file import default_token_path

    token = (
        default_token_path(daemon.port, daemon.args[daemon.args.index("--shm-dir") + 1]).read_text().strip()
    )
    body = {"tokens": [1, 2, 3], "model_id": "m", "kv_dtype": "bfloat61", "kv_shape": [2, 2, 8]}
    req = urllib.request.Request(
        daemon.http_url + "/lookup",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(
        urllib.error.HTTPError
    ) as e:  # was 200 {"cached_tokens": 0}: a typo looked like a miss
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "kv_dtype" in json.loads(e.value.read())["error"]
