"""Sampling long access streams in windows, with the estimate's error reported.

Simulating every access of a very long stream can cost more than the
question is worth.  :func:`sample_windows` simulates one window of
``window`` accesses in every ``every``, each after ``warmup`` accesses that
only warm the TLBs (the accesses right before the window, so the window
starts from a realistic state), and estimates the page walks of the whole
stream from the windows' walk rates.  The result says how many accesses were
simulated and gives the standard error of the estimate from the spread of the
per-window rates, so a sampled figure is never passed off as an exact one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .tlb import SimMetric, TlbSimulator

_WALKS = (SimMetric.WALKS_PMD, SimMetric.WALKS_PTE_PWC_HIT, SimMetric.WALKS_PTE_PWC_MISS)


@dataclass(frozen=True)
class SampledWalks:
    """Page walks of a stream estimated from sampled windows."""

    accesses: int            # the whole stream
    simulated: int           # accesses simulated in counted windows
    warmed: int              # accesses simulated only to warm the TLBs
    windows: int
    walk_rate: float         # walks per access, mean of the windows
    walk_rate_stderr: float  # standard error of that mean (0 with one window)
    exact: bool              # every access was simulated and counted

    @property
    def walks(self) -> float:
        return self.walk_rate * self.accesses

    @property
    def walks_stderr(self) -> float:
        return self.walk_rate_stderr * self.accesses

    def describe(self) -> str:
        if self.exact:
            return f"{self.walks:,.0f} page walks (exact, {self.accesses:,} accesses)"
        return (f"{self.walks:,.0f} ± {1.96 * self.walks_stderr:,.0f} page walks (95 %, sampled "
                f"{self.simulated:,} of {self.accesses:,} accesses in {self.windows} windows)")


def _walks(sim: TlbSimulator) -> int:
    return sum(sim.get_metric(m) for m in _WALKS)


def sample_windows(sim: TlbSimulator, vaddr, is_write=None, page_shift=None, asid=0, *,
                   window: int = 1_000_000, every: int = 10, warmup: int = 100_000) -> SampledWalks:
    """Estimate the page walks of a stream by simulating one window in every ``every``.

    With ``every=1`` (or a stream no longer than one window) every access is
    simulated and the result is exact.  Errors (ValueError) name the argument.
    """
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1")
    if every < 1:
        raise ValueError(f"every={every}: must be >= 1")
    if warmup < 0:
        raise ValueError(f"warmup={warmup}: must be >= 0")
    vaddr = np.asarray(vaddr, dtype=np.uint64)
    n = len(vaddr)

    def part(arr, lo, hi):
        if arr is None or np.ndim(arr) == 0:
            return arr
        return np.asarray(arr)[lo:hi]

    if every == 1 or n <= window:
        before = _walks(sim)
        sim.simulate(vaddr, is_write, page_shift, asid)
        walks = _walks(sim) - before
        return SampledWalks(n, n, 0, 1, walks / n if n else 0.0, 0.0, True)
    rates = []
    simulated = warmed = 0
    for start in range(0, n, window * every):
        end = min(start + window, n)
        lo = max(0, start - warmup)
        if lo < start:
            sim.simulate(vaddr[lo:start], part(is_write, lo, start), part(page_shift, lo, start),
                         part(asid, lo, start))
            warmed += start - lo
        before = _walks(sim)
        sim.simulate(vaddr[start:end], part(is_write, start, end), part(page_shift, start, end),
                     part(asid, start, end))
        rates.append((_walks(sim) - before) / (end - start))
        simulated += end - start
    mean = float(np.mean(rates))
    stderr = float(np.std(rates, ddof=1) / math.sqrt(len(rates))) if len(rates) > 1 else 0.0
    return SampledWalks(n, simulated, warmed, len(rates), mean, stderr, False)
