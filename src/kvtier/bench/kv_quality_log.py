"""A resumable record of a quality-gate run: one JSON line per finished window.

The full gate (52 windows of SmolLM2 on a loaded CPU box) runs for long enough that a crash or a
deadline must not lose what is done. Each finished window is appended as one line and flushed, so
the file always holds whole windows; ``load`` returns them and the table is recomputed from the file
(the printed table and the file can never disagree).

Invariants:
* A line carries the run's settings (``RunKey``); resuming with other settings is refused with an
  error naming the difference (summing windows of different runs would be a wrong figure).
* A torn last line (the process died mid-write) is cut off the file by ``load``, never parsed into
  a window, so the next ``append`` starts on a clean line; a torn line anywhere else means the
  file is not this writer's: refused.
* A window appears once; a second line for the same window is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from kvtier.bench.kv_quality import WindowScore
from kvtier.bench.workloads import WorkloadError


class QualityLogError(WorkloadError):
    """A quality log cannot be resumed (other settings, a corrupt line, a duplicate window)."""


@dataclass(frozen=True)
class RunKey:
    """What makes two windows' scores summable: same model, text, window sizes and chunking."""

    model: str
    text: str
    prefix: int
    cont: int
    chunk_tokens: int


def load(path: Path, key: RunKey, codecs: list[str]) -> dict[int, dict[str, WindowScore]]:
    """Finished windows in ``path`` (``{}`` if it does not exist), each with every name in ``codecs``."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    *lines, tail = data.decode().split("\n")
    if tail:  # torn last line (no newline: the window was not finished): cut it off
        with path.open("r+b") as f:
            f.truncate(len(data) - len(tail.encode()))
    done: dict[int, dict[str, WindowScore]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            got = RunKey(**rec["key"])
            window = int(rec["window"])
            scores = rec["scores"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise QualityLogError(
                f"{path}:{n}: not a quality-log line; use another --log file or remove this one"
            ) from None
        if got != key:
            raise QualityLogError(
                f"{path}:{n} was written with {got}, this run is {key}: "
                "pass the same options or another --log file"
            )
        missing = [c for c in codecs if c not in scores]
        if missing:
            raise QualityLogError(
                f"{path}:{n} has no scores for {', '.join(missing)}: "
                "pass the same --codecs or another --log file"
            )
        if window in done:
            raise QualityLogError(f"{path}:{n}: window {window} appears twice; remove one line")
        done[window] = {c: WindowScore(**scores[c]) for c in codecs}
    return done


def append(path: Path, key: RunKey, window: int, scores: dict[str, WindowScore]) -> None:
    """Append one finished window as one line, flushed and fsynced before returning."""
    rec = {"key": asdict(key), "window": window, "scores": {c: asdict(s) for c, s in scores.items()}}
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
