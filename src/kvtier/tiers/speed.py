"""Live cost estimates: ``seconds = fixed + per_unit * units``, fitted over recent measurements.

Used for two things the engine weighs against each other when it decides whether loading a
cached range beats recomputing it (``CacheEngine.lookup_by_cost``):

* each tier's reads (units = bytes): ``fixed`` is its latency per call, ``1 / per_unit`` its
  bandwidth (``TierManager`` feeds every timed ``get``/``batched_get``, and its writes as a
  prior until the first read is measured);
* the bound model's prefill (units = tokens computed): ``per_unit`` is what one more cached
  token saves; ``fixed`` is the per-forward cost every request pays anyway.

The fit is an exponentially weighted least-squares line (``half_life`` observations), so it
follows a tier that slows down or recovers within a few dozen calls and needs no window.
Invariants: estimates are never negative; with too little spread in ``units`` to separate the
two terms (every read one chunk of one size), the line goes through a latency measured another
way (``fixed_hint``) or the origin, which still predicts exactly the sizes that were measured.
``Ewma`` is the plain exponentially weighted mean for costs without units (a lookup's round
trip). Thread-safe.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from kvtier.tiers.base import TierError

MIN_SPREAD = 0.05
"""Relative spread of ``units`` (std / mean) below which no intercept is fitted."""


@dataclass(frozen=True)
class Fit:
    """A fitted line: ``seconds(units) = fixed_s + per_unit_s * units``."""

    fixed_s: float
    per_unit_s: float
    samples: int

    def seconds(self, units: float, calls: int = 1) -> float:
        return self.fixed_s * calls + self.per_unit_s * units


class CostEstimate:
    """An exponentially weighted line fit of ``seconds`` against ``units`` (see module docstring)."""

    def __init__(self, half_life: float = 16.0) -> None:
        if half_life <= 0:
            raise TierError(f"half_life must be > 0, got {half_life}")
        self._decay = 0.5 ** (1.0 / half_life)
        self._s = [0.0] * 5  # sum of w, w*x, w*y, w*x*x, w*x*y
        self._n = 0
        self._lock = threading.Lock()

    def observe(self, units: float, seconds: float) -> None:
        """Add one measurement; ignored unless both are finite, ``units`` > 0 and ``seconds`` >= 0."""
        if not (math.isfinite(units) and math.isfinite(seconds)) or units <= 0 or seconds < 0:
            return
        d = self._decay
        with self._lock:
            s = self._s
            s[0] = s[0] * d + 1.0
            s[1] = s[1] * d + units
            s[2] = s[2] * d + seconds
            s[3] = s[3] * d + units * units
            s[4] = s[4] * d + units * seconds
            self._n += 1

    @property
    def samples(self) -> int:
        return self._n

    def fit(self, fixed_hint: float | None = None) -> Fit | None:
        """The current line, or ``None`` before the first measurement. Without the spread to fit
        an intercept, the line goes through ``(0, fixed_hint)`` (a latency measured elsewhere,
        e.g. the tier's lookups; capped at the mean) or else through the origin."""
        with self._lock:
            if not self._n:
                return None
            w, sx, sy, sxx, sxy = self._s
            n = self._n
        mean_x = sx / w
        var_x = max(sxx / w - mean_x * mean_x, 0.0)
        if math.sqrt(var_x) >= MIN_SPREAD * mean_x:
            slope = (w * sxy - sx * sy) / (w * sxx - sx * sx)
            fixed = (sy - slope * sx) / w
            if slope > 0 and fixed >= 0:
                return Fit(fixed, slope, n)
        fixed = min(max(fixed_hint or 0.0, 0.0), sy / w)
        return Fit(fixed, (sy - fixed * w) / sx if sx > 0 else 0.0, n)


class Ewma:
    """An exponentially weighted mean (``alpha`` per observation); ``None`` before the first."""

    def __init__(self, alpha: float = 0.125) -> None:
        self.alpha = alpha
        self.value: float | None = None
        self._lock = threading.Lock()

    def observe(self, x: float) -> None:
        if not math.isfinite(x) or x < 0:
            return
        with self._lock:
            self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
