"""The systemd unit passes ``systemd-analyze verify`` (where that binary exists).

``verify`` also checks that ``ExecStart``'s program exists; the unit names the installed
``/usr/local/bin/kvtier``, so the check runs on a copy pointing at an existing program (the
command line itself is parsed by kvtier's real CLI parser in ``test_cli_deploy.py``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "systemd" / "kvtier.service"
ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/kvtier server " in text
    true = shutil.which("true")
    assert true is not None
    unit = tmp_path / "kvtier.service"
    unit.write_text(text.replace("/usr/local/bin/kvtier", true))
    r = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "kvtier.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
