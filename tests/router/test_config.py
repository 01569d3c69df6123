"""Router settings: backend specs, the /lookup namespace, validation, the command's one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.config import Config, ConfigError
from kvtier.router.config import RouterConfigError, lookup_namespace, parse_backends


def test_backend_specs_attach_options_to_the_url_before_them(tmp_path: Path) -> None:
    tok = tmp_path / "t"
    tok.write_text("secret\n")
    got = parse_backends(f"http://a:1/v1,lookup=http://d:2,token={tok} http://b:3;http://c:4")
    assert [(b.url, b.lookup_url, b.token) for b in got] == [
        ("http://a:1", "http://d:2", "secret"),
        ("http://b:3", "", ""),
        ("http://c:4", "", ""),
    ]
    assert [b.url for b in parse_backends(["http://a:1", "http://b:2"])] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("a:1", "not an http"),
        ("http://a:1,weight=2", "unknown option"),
        ("http://a:1 http://a:1/", "listed twice"),
        ("http://a:1,lookup=http://d:2,token=/nonexistent/t", "cannot read token file"),
    ],
)
def test_bad_backend_specs_name_the_fix(spec: str, match: str) -> None:
    with pytest.raises(RouterConfigError, match=match):
        parse_backends(spec)


def test_lookup_namespace_from_the_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "hidden_size": 576,
                "dtype": "bfloat16",
            }
        )
    )
    cfg = Config.from_dict({"chunk": {"chunk_tokens": 128}})
    ns = lookup_namespace(cfg, str(tmp_path))
    assert ns is not None and ns.kv_shape == (30, 3, 64) and ns.kv_dtype == "bfloat16"
    assert ns.model_id == str(tmp_path) and ns.chunk_tokens == 128
    cfg = Config.from_dict({"model": {"kv_dtype": "float32", "model_id": "m"}})
    ns = lookup_namespace(cfg, str(tmp_path))
    assert ns is not None and ns.kv_dtype == "float32" and ns.model_id == "m"
    assert lookup_namespace(Config()) is None  # nothing says what the engines serve
    with pytest.raises(RouterConfigError, match="cannot read"):
        lookup_namespace(cfg, str(tmp_path / "missing"))


def test_router_settings_are_validated_and_come_from_env() -> None:
    assert Config.load(env={"KVTIER_ROUTER__POLICY": "session"}).router.policy == "session"
    for bad in ({"policy": "random"}, {"fallback_policy": "kv-aware"}, {"prefill": "http://a:1"}):
        with pytest.raises(ConfigError):
            Config.from_dict({"router": bad})


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([], "no engine instances"),
        (["--backend", "foo"], "is not an http"),
        (["--pd", "prefill=http://a:1", "x=1"], "--pd: expected"),
        (["--policy", "kv-aware", "--set", "router.balance_gap=0", "--backend", "http://a:1"], "balance_gap"),
    ],
)
def test_the_command_fails_in_one_line(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["router", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
