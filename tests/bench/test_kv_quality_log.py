"""The quality gate's resumable log: whole windows only, same settings only, each window once."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.bench import kv_quality_log as qlog
from kvtier.bench.kv_quality import CodecQuality, WindowScore

KEY = qlog.RunKey("m", "pydoc_data.topics", 384, 400, 256)
CODECS = ["none", "int8"]


def _scores(i: int) -> dict[str, WindowScore]:
    return {c: WindowScore(100.0 + i + k, 399, 399 - k, 1, 0.001 * k) for k, c in enumerate(CODECS)}


def test_appended_windows_load_back_and_sum(tmp_path: Path) -> None:
    log = tmp_path / "q.jsonl"
    assert qlog.load(log, KEY, CODECS) == {}
    for i in (0, 1, 2):
        qlog.append(log, KEY, i, _scores(i))
    done = qlog.load(log, KEY, CODECS)
    assert done == {i: _scores(i) for i in (0, 1, 2)}
    q = CodecQuality("int8")
    for s in done.values():
        q.add(s["int8"])
    assert (q.n_windows, q.n_tokens, q.agree) == (3, 3 * 399, 3 * 398)
    assert q.nll_sum == pytest.approx(3 * 101.0 + 3)


def test_torn_last_line_is_cut_off_and_the_next_append_is_clean(tmp_path: Path) -> None:
    log = tmp_path / "q.jsonl"
    qlog.append(log, KEY, 0, _scores(0))
    whole = log.read_bytes()
    qlog.append(log, KEY, 1, _scores(1))
    log.write_bytes(log.read_bytes()[:-1])  # died before the newline: window 1 not finished
    assert set(qlog.load(log, KEY, CODECS)) == {0}
    assert log.read_bytes() == whole
    qlog.append(log, KEY, 1, _scores(1))
    assert set(qlog.load(log, KEY, CODECS)) == {0, 1}


@pytest.mark.parametrize(
    ("key", "codecs", "needle"),
    [
        (qlog.RunKey("m", "pydoc_data.topics", 384, 128, 256), CODECS, "pass the same options"),
        (KEY, [*CODECS, "int4"], "no scores for int4"),
    ],
)
def test_other_settings_are_refused(tmp_path: Path, key: qlog.RunKey, codecs: list[str], needle: str) -> None:
    log = tmp_path / "q.jsonl"
    qlog.append(log, KEY, 0, _scores(0))
    with pytest.raises(qlog.QualityLogError, match=needle):
        qlog.load(log, key, codecs)


def test_corrupt_or_duplicate_lines_are_refused(tmp_path: Path) -> None:
    log = tmp_path / "q.jsonl"
    qlog.append(log, KEY, 0, _scores(0))
    qlog.append(log, KEY, 0, _scores(0))
    with pytest.raises(qlog.QualityLogError, match="window 0 appears twice"):
        qlog.load(log, KEY, CODECS)
    log.write_text('{"not": "ours"}\n')
    with pytest.raises(qlog.QualityLogError, match="not a quality-log line"):
        qlog.load(log, KEY, CODECS)
