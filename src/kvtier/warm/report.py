"""What a warm run did: documents warmed / skipped, tokens computed and stored, bytes per tier."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvtier.observability import CacheStats


@dataclass
class TierDelta:
    """One tier's growth during the run: chunks put, bytes written (0 where the tier does not
    count them: a daemon's CPU tier), bytes it holds more, and bytes held at the end."""

    chunks: int = 0
    written_bytes: int = 0
    added_bytes: int = 0
    bytes_used: int = 0


@dataclass
class WarmReport:
    documents: int = 0
    warmed: int = 0
    skipped: int = 0
    """Documents already stored (in-process: the engine's lookup; --url: the state file)."""
    tokens: int = 0
    """Tokens of the documents warmed."""
    computed_tokens: int = 0
    """Tokens the model ran (in-process; a partly stored document computes only the rest)."""
    stored_tokens: int = 0
    """Tokens newly stored (in-process; over HTTP the server's connector stores them)."""
    failed: int = 0
    """Documents the server refused (``--url``: an HTTP 4xx, e.g. longer than its context)."""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    server: str = ""
    """``--url``: the server the documents went to (its connector computed and stored them)."""
    tiers: dict[str, TierDelta] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["tiers"] = {k: dict(vars(v)) for k, v in self.tiers.items()}
        return d

    def lines(self) -> list[str]:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"documents {self.documents}: warmed {self.warmed}, already stored {self.skipped}"
            + (f", refused {self.failed}" if self.failed else ""),
            f"tokens {self.tokens} in {self.seconds:.1f} s ({rate:.0f} tokens/s); "
            + (
                f"sent to {self.server}"
                if self.server
                else f"computed {self.computed_tokens}, stored {self.stored_tokens}"
            ),
        ]
        out += [f"refused: {f}" for f in self.failures[:5]]
        for name, t in self.tiers.items():
            out.append(
                f"tier {name}: +{t.chunks} chunks, +{_size(t.added_bytes)} held, {_size(t.bytes_used)} in all"
            )
        return out


def tier_deltas(before: CacheStats, after: CacheStats) -> dict[str, TierDelta]:
    """Per tier: puts and written bytes between two ``engine.stats()``, bytes held ``after``."""
    out: dict[str, TierDelta] = {}
    for name, a in after.tiers.items():
        b = before.tiers.get(name)
        out[name] = TierDelta(
            a.puts - (b.puts if b else 0),
            a.written_bytes - (b.written_bytes if b else 0),
            a.bytes_used - (b.bytes_used if b else 0),
            a.bytes_used,
        )
    return out


def daemon_deltas(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, TierDelta]:
    """The same from two ``GET /stats`` of a kvtier daemon (its ``tier:NAME`` sections)."""
    out: dict[str, TierDelta] = {}
    for key, a in after.items():
        if not key.startswith("tier:"):
            continue
        b = before.get(key, {})
        out[key.removeprefix("tier:")] = TierDelta(
            int(a.get("puts", 0)) - int(b.get("puts", 0)),
            int(a.get("written_bytes", 0)) - int(b.get("written_bytes", 0)),
            int(a.get("bytes_used", 0)) - int(b.get("bytes_used", 0)),
            int(a.get("bytes_used", 0)),
        )
    return out


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
