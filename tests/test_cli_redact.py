"""Issue 22 item 9: no password inside a URL reaches stdout, stderr or a log line.

``kvtier config show`` printed ``redis://u:PASSWORD@h:1/0`` in clear although the README
promises ``***``; error messages and log records built from a URL did the same.
"""

from __future__ import annotations

import io
import logging

import pytest

from kvtier.cli import main
from kvtier.logs import setup_logging

SECRET = "hunter2-PASSWORD"


@pytest.mark.parametrize("how", ["env", "set", "yaml"])
def test_config_show_redacts_url_passwords(
    how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://u:{SECRET}@h:1/0"
    argv = ["config", "show", "--set", f"remote.endpoint_url=http://AKIA:{SECRET}@minio:9000"]
    if how == "env":
        monkeypatch.setenv("KVTIER_REMOTE__URL", url)
    elif how == "set":
        argv += ["--set", f"remote.url={url}"]
    else:
        cfg = tmp_path / "c.yaml"  # type: ignore[operator]
        cfg.write_text(f"remote: {{url: '{url}', password: '{SECRET}'}}\n")
        argv += ["--config", str(cfg)]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert "url: redis://u:***@h:1/0" in out.out and "endpoint_url: http://AKIA:***@minio:9000" in out.out


def test_errors_about_a_url_redact_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--set", f"remote.url=kvtier://u:{SECRET}@nohost"]) == 2
    assert main(["config", "show", "--set", f"remote.url=ftp://u:{SECRET}@x"]) == 2
    assert main(["stats", "--url", f"http://u:{SECRET}@127.0.0.1:9", "--timeout", "2"]) == 2
    assert main(["bench", "--url", f"http://u:{SECRET}@127.0.0.1:9/v1"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and err.count("u:***@") == 4, err


def test_log_records_are_redacted_whatever_the_caller_did() -> None:
    stream = io.StringIO()
    setup_logging(logging.INFO, "text", stream)
    log = logging.getLogger("kvtier.tiers.redis")
    log.warning("cannot reach %s", f"rediss://{SECRET}@cache:6380")  # a bare token as the user part
    log.info("s3 at %s", f"https://minio:9000/b?X-Token=1&token={SECRET}")
    try:
        raise ConnectionError(f"dial redis://:{SECRET}@h:6379 failed")
    except ConnectionError:
        log.exception("outage")
    text = stream.getvalue()
    assert SECRET not in text, text
    assert "rediss://***@cache:6380" in text and "token=***" in text
