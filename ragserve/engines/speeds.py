"""Measured engine speed: what a prompt token, a decode step and an answer cost on this engine now.

Who owns what: each engine owns one `SpeedTracker` and feeds it its own measurements (the
embedded engine times its prefill and decode steps; the vLLM client times its calls); the
engine's `stats()` snapshot carries the tracker's `EngineSpeeds` (ragserve.domain, which
states the time model); the cost model prices plans in seconds from that snapshot. Nothing
here imports torch.

Recent = a sliding window of the last `window` measurements, so the figures follow the
machine (another tenant, thermal limits) without a restart. Until an engine has measured
anything the tracker answers with its `prior` (the engine's own first guess).
"""
from __future__ import annotations

import threading
from collections import deque

from ragserve.domain import EngineSpeeds

# Fewer samples than this and a figure keeps leaning on the prior.
MIN_SAMPLES = 4


class SpeedTracker:
    """Sliding-window measurements -> `EngineSpeeds`. Thread-safe: the engine's worker thread
    records, `stats()` reads from the event loop."""

    def __init__(self, prior: EngineSpeeds, window: int = 256) -> None:
        if window < MIN_SAMPLES:
            raise ValueError(f"speed window={window} must be >= {MIN_SAMPLES}")
        self.prior = prior
        self._prefills: deque[tuple[int, float]] = deque(maxlen=window)   # (tokens, seconds)
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)      # (batch rows, seconds)
        self._outputs: dict[str, deque[int]] = {}
        self._decodes: deque[tuple[float, float, int]] = deque(maxlen=window)   # (wall s, steps s, steps)
        self._window = window
        self._lock = threading.Lock()
        self._cached: EngineSpeeds | None = prior

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self._prefills.append((tokens, seconds))
                self._cached = None

    def record_step(self, batch: int, seconds: float) -> None:
        if batch > 0 and seconds > 0:
            with self._lock:
                self._steps.append((batch, seconds))
                self._cached = None

    def record_decode(self, wall_s: float, steps_s: float, steps: int) -> None:
        """A finished call's decode: first token to last, and the time and number of the steps
        it rode in; the rest of its wall time it waited for other calls' prefills."""
        if wall_s > 0 and steps > 0:
            with self._lock:
                self._decodes.append((wall_s, steps_s, steps))
                self._cached = None

    def record_output(self, tag: str, tokens: int) -> None:
        with self._lock:
            self._outputs.setdefault(tag or "call", deque(maxlen=self._window)).append(tokens)
            self._cached = None

    def speeds(self) -> EngineSpeeds:
        with self._lock:
            if self._cached is None:
                self._cached = self._fit()
            return self._cached

    def _fit(self) -> EngineSpeeds:
        p = self.prior
        prefill = p.prefill_tok_s
        if len(self._prefills) >= MIN_SAMPLES:
            prefill = sum(t for t, _ in self._prefills) / sum(s for _, s in self._prefills)
        base, slope = p.step_base_s, p.step_per_row_s
        if len(self._steps) >= MIN_SAMPLES:
            base, slope = _fit_line(self._steps, p)
        outputs = {tag: sum(v) / len(v) for tag, v in self._outputs.items() if v}
        pause = p.prefill_pause_s
        if len(self._decodes) >= MIN_SAMPLES:
            pause = prefill_pause(self._decodes)
        return EngineSpeeds(prefill, base, slope, len(self._prefills), len(self._steps), outputs, pause)


def prefill_pause(decodes) -> float:
    """Seconds of other calls' prefill per decode step, over (wall s, steps s, steps) records."""
    waited = sum(max(0.0, w - s) for w, s, _ in decodes)
    return waited / max(1, sum(n for _, _, n in decodes))


def _fit_line(steps: deque[tuple[int, float]], prior: EngineSpeeds) -> tuple[float, float]:
    """Least squares of step seconds on batch rows. With one batch size seen, the slope keeps
    the prior's ratio to the intercept (one point fixes a level, not a slope)."""
    n = len(steps)
    mean_b = sum(b for b, _ in steps) / n
    mean_s = sum(s for _, s in steps) / n
    var_b = sum((b - mean_b) ** 2 for b, _ in steps)
    if var_b < 1e-9:
        ratio = prior.step_per_row_s / prior.step_base_s
        base = mean_s / (1.0 + ratio * (mean_b - 1))
        return base, base * ratio
    slope = sum((b - mean_b) * (s - mean_s) for b, s in steps) / var_b
    slope = max(0.0, slope)
    base = max(1e-6, mean_s - slope * (mean_b - 1))
    return base, slope
