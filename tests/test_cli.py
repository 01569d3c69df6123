"""``kvtier`` CLI conventions: one-line user errors with exit 2, fast --help, flags and logging.

Every case issue 18 lists gets its own assertion: the message names the problem and the fix, is
one line, and no traceback reaches the user.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.cli import build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # one line, whatever the logging said
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["server", "--cpu-size", "0"], ["kvtier server: cpu.max_bytes", "4GiB"]),
        (["server", "--remote", "kvtier://nohost"], ["remote.url", "kvtier://HOST:PORT"]),
        (["server", "--remote", "kvtier://h:notaport"], ["remote.url", "not a valid URL"]),
        (["server", "--remote", "s3://"], ["remote.url", "s3://BUCKET"]),
        (["server", "--remote", "s3://u:pw@bucket"], ["remote.url", "s3://BUCKET"]),
        (["server", "--remote", "ftp://x"], ["remote.url", "redis"]),
        (["config", "show", "--set", "cpu=5"], ["'cpu' is a section", "cpu.max_bytes"]),
        (["demo", "--model", "no/such/model"], ["kvtier demo: --model", "random:NAME"]),
        (["demo", "--model", "random:nope"], ["unknown random model", "llama-tiny"]),
        (["demo", "--device", "tpu"], ["--device", "cpu, cuda or cuda:N"]),
        (["stats", "--url", "http://127.0.0.1:9", "--timeout", "2"], ["cannot read stats", "kvtier server"]),
        (["bench", "--url", "http://127.0.0.1:9/v1"], ["kvtier bench: cannot reach", "start the server"]),
    ],
)
def test_user_errors_are_one_line_exit_2(
    argv: list[str], want: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, *(["--shm-dir", str(tmp_path)] if argv[0] == "server" else [])]) == 2
    line = _err(capsys)
    for w in want:
        assert w in line, line


def test_disk_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["server", "--disk-path", str(f), "--shm-dir", str(tmp_path)]) == 2
    line = _err(capsys)
    assert "disk.path" in line and "is a file" in line and "choose a directory" in line


def test_yaml_section_given_a_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cpu: 5\n")
    assert main(["config", "show", "--config", str(cfg)]) == 2
    line = _err(capsys)
    assert "'cpu' is a section" in line and "unknown key" not in line and str(cfg) in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_demo_cuda_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cuda"]) == 2
    assert "CUDA is not available" in _err(capsys)


def test_port_in_use_names_the_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for flag, other, name in (("--http-port", "--port", "HTTP"), ("--port", "--http-port", "protocol")):
            rc = main(
                ["server", "--cpu-size", "4MiB", flag, str(port), other, "0", "--shm-dir", str(tmp_path)]
            )
            assert rc == 2
            line = _err(capsys)
            assert f"{name} port 127.0.0.1:{port} is already in use" in line and flag in line, line


def test_missing_optional_dependency_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mod in [m for m in sys.modules if m == "redis" or m.startswith(("redis.", "kvtier.tiers.redis"))]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ModuleNotFoundError(name="redis")
    rc = main(
        [
            "server",
            "--cpu-size",
            "4MiB",
            "--remote",
            "redis://127.0.0.1:9",
            "--port",
            "0",
            "--http-port",
            "0",
            "--shm-dir",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "pip install 'kvtier[redis]'" in _err(capsys)


def test_every_extra_named_exists_in_pyproject() -> None:
    import tomllib

    from kvtier.commands.user_errors import EXTRAS, missing_module_message

    extras = tomllib.loads((Path(SRC).parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, extra in EXTRAS.items():
        assert extra in extras, (module, extra)
    assert missing_module_message("boto3.session") == (
        "needs the optional package 'boto3', which is not installed — pip install 'kvtier[s3]'"
    )
    assert missing_module_message("numpy") is None  # not an extra: a real bug, keeps its traceback


def test_bugs_keep_their_traceback_with_v(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kvtier.commands.config_cmd as cc

    def boom(args: object) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cc, "_show", boom)
    assert main(["config", "show"]) == 1
    line = _err(capsys)
    assert "internal error: RuntimeError: a bug" in line and "-v" in line
    with pytest.raises(RuntimeError, match="a bug"):
        main(["-v", "config", "show"])


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = (
        "import sys, kvtier, kvtier.cli as c; c.build_parser(); "
        "print(kvtier.__version__, 'torch' in sys.modules)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert r.returncode == 0, r.stderr
    version, torch_loaded = r.stdout.split()
    assert torch_loaded == "False" and version[0].isdigit()


def test_help_shows_defaults_and_conventions() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    text = " ".join(sub["bench"].format_help().split())  # undo line wrapping
    assert (
        "default: cpu" in text and "(default: http)" in text and "default: 0" in text
    )  # --device, --send, --seed
    assert text.count("(default: 4)") == 0  # '--users ... (4)' already says it
    args = parser.parse_args(["server", "--chunk-size", "128", "--eviction-policy", "LRU"])
    assert args.chunk_tokens == 128 and args.eviction_policy == "lru"
    assert parser.parse_args(["bench", "--chunk-size", "32"]).chunk_tokens == 32
    assert parser.parse_args(["demo", "--chunk-size", "32"]).chunk_tokens == 32


def test_policy_names_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["config", "show", "--set", "cpu.eviction_policy=LRU", "--set", "disk.eviction_policy=S3FIFO"])
        == 0
    )
    out = capsys.readouterr().out
    assert "eviction_policy: lru" in out and "eviction_policy: s3fifo" in out


def test_log_level_env_and_json_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "bogus")
    assert main(["config", "show"]) == 2
    assert "KVTIER_LOG_LEVEL='bogus'" in _err(capsys)
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "debug")
    assert main(["--log-format", "json", "config", "show"]) == 0
    assert logging.getLogger().level == logging.DEBUG
    capsys.readouterr()
    logging.getLogger("kvtier.test").info("to redis://u:hunter2@h:1/0")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert rec["level"] == "INFO" and rec["logger"] == "kvtier.test"
    assert rec["message"] == "to redis://u:***@h:1/0" and "hunter2" not in line


def test_progress_off_when_stderr_is_not_a_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    import kvtier.commands.bench_cmd as bc

    seen: list[bool] = []
    monkeypatch.setattr(bc, "run", lambda args: seen.append(args.no_progress) or 0)
    assert main(["bench"]) == 0  # pytest's captured stderr is no terminal
    assert seen == [True]


def test_library_logger_gets_a_handler_only_when_nothing_would_print(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.logs import attach_if_unhandled

    root, kv = logging.getLogger(), logging.getLogger("kvtier")
    monkeypatch.setattr(root, "handlers", [])  # as under vllm serve: vLLM configures only its own logger
    monkeypatch.setattr(kv, "handlers", [])
    monkeypatch.setattr(kv, "propagate", True)
    monkeypatch.setenv("KVTIER_LOG_LEVEL", "info")
    attach_if_unhandled()
    assert len(kv.handlers) == 1 and kv.level == logging.INFO and not kv.propagate
    attach_if_unhandled()
    assert len(kv.handlers) == 1  # idempotent: no doubled lines
