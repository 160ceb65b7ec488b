"""End-to-end validation: each built-in scenario's runnable policies on the simulator and on the
running kernel, figure by figure, and whether the two rank the policies the same way.

A policy is runnable when the running kernel can run it (its own behaviour, ``upstream``, and the
userspace strategies: :func:`thpcow.lab.realrun.real_support`).  For each scenario and runnable
policy both sides run the same op stream (:func:`thpcow.experiments.runner.run_point` and
:func:`thpcow.lab.realrun.run_real`) and give:

- ``cow_mib``: bytes copied by COW (real: pagemap PFN changes);
- ``peak_anon_mib``: the most anonymous memory of all the workload's processes at one sample
  (real: smaps_rollup ``Anonymous`` of the agents; simulated: the runner's samples);
- ``p99_us``: the 99th percentile of the measured phase's write ops (real: wall time of each);
- ``ops_per_s``: the workload's ops per second of op time (real: the ops' wall time, not paced).

The simulator prices the ops with this machine's profile (``profile: auto``: the one `thpcow
calibrate` cached here, else this CPU's preset) unless the scenario names one.

A ratio sim / real within :data:`TOLERANCE` agrees.  The ranking of the runnable policies by a
figure agrees when no pair is ordered one way by the simulator and the other way by the kernel,
each by more than the tolerance (closer than that is a tie on that side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

MIB = 1 << 20
TOLERANCE = 0.15
FIGURES: tuple[tuple[str, str, int], ...] = (
    # (column, key, +1: lower is better / -1: higher is better)
    ("COW MiB", "cow_mib", +1),
    ("peak anon MiB", "peak_anon_mib", +1),
    ("write p99 µs", "p99_us", +1),
    ("ops/s", "ops_per_s", -1),
)

# The scenarios (docs/scenarios/NAME.yaml, None: the built-in default) and overrides that keep a
# real run short (the fork server's 1,000 children become 100 agents' worth).
SCENARIOS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
    ("default", None, {}),
    ("copy-64k", "copy-64k.yaml", {}),
    ("copy-2m", "copy-2m.yaml", {}),
    ("copy-8m", "copy-8m.yaml", {}),
    ("copy-whole", "copy-whole.yaml", {}),
    ("redis-zipf", "redis-zipf.yaml", {}),
    ("redis-uniform", "redis-uniform.yaml", {}),
    ("forkserver (100 children)", "forkserver.yaml", {"children": 100}),
    ("read-heavy", "read-heavy.yaml", {}),
)


@dataclass
class Point:
    """One scenario x policy: both sides' figures, or why the real side did not run."""

    scenario: str
    policy: str
    sim: dict[str, float]
    real: dict[str, float] | None
    why_not: str = ""
    notes: list[str] = field(default_factory=list)

    def ratio(self, key: str) -> float:
        if self.real is None:
            return math.nan
        s, r = self.sim.get(key, math.nan), self.real.get(key, math.nan)
        if r == 0:
            return 1.0 if s == 0 else math.nan
        return s / r

    def agrees(self, key: str) -> bool:
        x = self.ratio(key)
        return abs(x - 1.0) <= TOLERANCE if x == x else False


def _order_conflicts(points: list[Point], key: str, sign: int) -> list[tuple[str, str]]:
    """Pairs the simulator and the kernel order opposite ways, each by more than the tolerance."""
    out = []
    for a_i, a in enumerate(points):
        for b in points[a_i + 1:]:
            if a.real is None or b.real is None:
                continue

            def cmp(x: float, y: float) -> int:
                if not (x == x and y == y) or abs(x - y) <= TOLERANCE * max(abs(x), abs(y), 1e-12):
                    return 0
                return 1 if sign * (x - y) > 0 else -1

            s = cmp(a.sim[key], b.sim[key])
            r = cmp(a.real[key], b.real[key])
            if s and r and s != r:
                out.append((a.policy, b.policy))
    return out


@dataclass
class ScenarioResult:
    """The runnable policies of one scenario."""

    name: str
    points: list[Point]
    conflicts: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def ranking_agrees(self) -> bool:
        return not any(self.conflicts.values())


def _sim_figures(res) -> dict[str, float]:
    s = res.summary
    samples = res.samples
    anon = np.asarray(samples["anon_kb"], dtype=np.float64) + np.asarray(samples["child_anon_kb"], dtype=np.float64)
    ops = res.ops
    kinds = np.asarray(ops["kind"], dtype=object)
    costs = np.asarray(ops["cost_ns"], dtype=np.float64)
    busy = costs[np.isin(kinds, ("write", "read"))]
    nops = len(busy)
    return {"cow_mib": float(s["sim_cow_bytes"]) / MIB,
            "peak_anon_mib": float(anon.max()) / 1024.0 if len(anon) else math.nan,
            "p99_us": float(s["lat_p99_us"]),
            "ops_per_s": nops / (busy.sum() / 1e9) if busy.sum() else math.nan}


def _real_figures(real) -> dict[str, float]:
    s = real.summary
    rows, samples = real.ops, real.samples
    kinds = np.asarray(rows["kind"], dtype=object)
    wall = np.asarray(rows["wall_ns"], dtype=np.float64)
    busy = wall[np.isin(kinds, ("write", "read"))]
    _times, at = np.unique(np.asarray(samples["t_ns"]), return_inverse=True)
    per_sample = np.bincount(at, weights=np.asarray(samples["anon_kb"], dtype=np.float64))
    peak = float(per_sample.max()) / 1024.0 if len(per_sample) else math.nan
    return {"cow_mib": float(s["cow_mib"]), "peak_anon_mib": float(peak),
            "p99_us": float(s["lat_p99_us"]),
            "ops_per_s": len(busy) / (busy.sum() / 1e9) if busy.sum() else math.nan}


def _scenario(file: str | None, overrides: dict[str, Any]):
    import os
    from dataclasses import replace

    from .results import DOCS
    from .scenario import default_scenario, load_scenario

    if file is None:
        return default_scenario()
    sc = load_scenario(os.path.join(DOCS, "scenarios", file))
    return replace(sc, params={**sc.params, **overrides}) if overrides else sc


def run(progress: Callable[[str], None] | None = None,
        scenarios: tuple[tuple[str, str | None, dict[str, Any]], ...] = SCENARIOS) -> list[ScenarioResult]:
    """Run every scenario's runnable policies on both sides (needs root and THP)."""
    from ..lab import realrun
    from .runner import run_point

    say = progress or (lambda msg: None)
    out = []
    for name, file, overrides in scenarios:
        sc = _scenario(file, overrides)
        if sc.profile is None:          # priced with this machine's costs, as the real side runs here
            sc = replace(sc, profile="auto")
        points = []
        for pol in sc.policies:
            if realrun.real_support(pol):
                continue
            say(f"end to end: {name}, {pol}")
            sim = _sim_figures(run_point(sc, pol))
            try:
                real = realrun.run_real(sc, pol)
                points.append(Point(name, pol, sim, _real_figures(real), notes=list(real.notes)))
            except realrun.RealRunError as e:
                points.append(Point(name, pol, sim, None, why_not=str(e)))
        res = ScenarioResult(name, points)
        for _label, key, sign in FIGURES:
            res.conflicts[key] = _order_conflicts(points, key, sign)
        out.append(res)
    return out


def markdown(results: list[ScenarioResult]) -> str:
    """The end-to-end table: scenario x runnable policy, each figure sim / real (ratio), and the
    ranking agreement of the scenario's runnable policies."""
    head = ["scenario", "policy"] + [label + " sim / real (ratio)" for label, _k, _s in FIGURES] + ["ranking"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def cell(v: float) -> str:
        if v != v:
            return "-"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"

    for res in results:
        for n, p in enumerate(res.points):
            if p.real is None:
                cells = [f"{cell(p.sim[k])} / not run" for _l, k, _s in FIGURES]
            else:
                cells = []
                for _label, key, _sign in FIGURES:
                    mark = "" if p.agrees(key) else " ✗"
                    cells.append(f"{cell(p.sim[key])} / {cell(p.real[key])} ({p.ratio(key):.2f}{mark})")
            if n == 0:
                if len(res.points) < 2:
                    rank = "one runnable policy"
                elif res.ranking_agrees:
                    rank = "agrees"
                else:
                    rank = "differs: " + "; ".join(f"{k}: {a} vs {b}" for k, pairs in res.conflicts.items()
                                                   for a, b in pairs)
            else:
                rank = ""
            lines.append("| " + " | ".join([res.name, f"`{p.policy}`"] + cells + [rank]) + " |")
    return "\n".join(lines)


def summary_line(results: list[ScenarioResult]) -> str:
    """How many figures agree within the tolerance, and on how many scenarios the ranking agrees."""
    pts = [p for r in results for p in r.points if p.real is not None]
    per = {label: sum(p.agrees(k) for p in pts) for label, k, _s in FIGURES}
    ranked = [r for r in results if len([p for p in r.points if p.real is not None]) >= 2]
    agree = sum(r.ranking_agrees for r in ranked)
    figs = ", ".join(f"{label} {n}/{len(pts)}" for label, n in per.items())
    return (f"within {TOLERANCE:.0%}: {figs}; ranking agrees on {agree} of {len(ranked)} scenarios "
            f"with two or more runnable policies")


MARK_BEGIN = "<!-- end-to-end table: generated by make results; do not edit -->"
MARK_END = "<!-- end of the end-to-end table -->"


def write_into(path: str, text: str) -> None:
    """Replace the generated block of ``path`` (between the markers) with ``text``."""
    with open(path) as fh:
        doc = fh.read()
    if MARK_BEGIN not in doc or MARK_END not in doc:
        raise ValueError(f"{path}: no generated block ({MARK_BEGIN!r} ... {MARK_END!r})")
    a = doc.index(MARK_BEGIN) + len(MARK_BEGIN)
    b = doc.index(MARK_END)
    with open(path + ".tmp", "w") as fh:
        fh.write(doc[:a] + "\n" + text.strip() + "\n" + doc[b:])
    import os
    os.replace(path + ".tmp", path)
