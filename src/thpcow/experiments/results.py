"""``make results``: regenerate docs/results.md and its figures from the built-in scenarios.

The text lives in a template, ``docs/results.in.md`` (Jinja2).  Every figure in it is an
expression over the runs this module makes, never a number typed in, and every sentence that
states a result is wrapped in ``claim(condition, text)``: when a change to the simulator makes a
claim false, the generated page marks it ("does not hold in this run") and the command lists it
and exits 1.  So the page says what the code computes, and a stale sentence cannot survive a
regeneration.

Three kinds of figure, and the page labels each:

- **simulated**: the simulated Linux 6.18 kernel and the latency model (every scenario table);
- **measured**: the running kernel of this machine (the real Redis BGSAVE, the latency model
  against measured times);
- **extrapolated**: kernel builds this machine cannot run (the 2026 series, pre-5.8, mTHP COW,
  directed khugepaged) priced from measured primitives (their rows carry a dagger).

Scenarios run in worker processes (``jobs``); a run is deterministic for its seed, so the tables
do not depend on ``jobs``.  ``quick`` shrinks every scenario (smaller datasets, shorter runs) for
tests: the page still renders, its claims are then not expected to hold.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from . import summarize as sm

# The repository's docs/ (an editable install; ``make results`` runs from the checkout).
DOCS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs"))
TEMPLATE = "results.in.md"
MIB = 1 << 20

# Kernel builds that this machine's kernel cannot run: their rows are extrapolated.
EXTRAPOLATED_PREFIXES = ("thp-cow-", "pre-5.8", "mthp-cow", "directed-khugepaged", "cow-density")


@dataclass(frozen=True)
class Spec:
    """One scenario run of the page: a built-in scenario file, optionally with another seed or
    fewer policies."""

    key: str
    file: str
    seed: int | None = None
    policies: tuple[str, ...] | None = None


SPECS: tuple[Spec, ...] = (
    Spec("copy-64k", "copy-64k.yaml"),
    Spec("copy-2m", "copy-2m.yaml"),
    Spec("copy-8m", "copy-8m.yaml"),
    Spec("copy-whole", "copy-whole.yaml"),
    Spec("copy-2m-frag", "copy-2m-frag.yaml"),
    Spec("redis-zipf", "redis-zipf.yaml"),
    Spec("redis-uniform", "redis-uniform.yaml"),
    Spec("redis-zipf-seed1", "redis-zipf.yaml", seed=1, policies=("upstream", "thp-cow-v1")),
    Spec("forkserver", "forkserver.yaml"),
    Spec("forkserver-seed1", "forkserver.yaml", seed=1, policies=("upstream", "thp-cow-v1")),
    Spec("redis-recovery", "redis-recovery.yaml"),
    Spec("redis-zipf-frag", "redis-zipf-frag.yaml"),
    Spec("read-heavy", "read-heavy.yaml"),
)

# The read-rate crossovers (docs/scenarios/read-crossover.yaml and read-crossover-closed.yaml):
# the scenario each sweeps, open loop (CPU time) and closed loop (throughput).
CROSSOVERS = {"read-crossover": "read-heavy.yaml", "read-crossover-closed": "read-heavy-closed.yaml"}
CROSSOVER_RATES = (0, 1_000_000, 2_000_000, 4_000_000, 8_000_000)
CROSSOVER_POLICIES = ("upstream", "thp-cow-meant", "collapse-after-fork:who=parent")


def extrapolated(policy: str) -> bool:
    """True for a kernel build the running kernel does not have (its figures are extrapolated)."""
    return policy.startswith(EXTRAPOLATED_PREFIXES)


def _quick(sc):
    """A smaller version of a scenario (``--quick``): datasets and runs shrunk, same shape."""
    from dataclasses import replace

    wl = dict(sc.params)
    if sc.workload == "copy-after-fork":          # already small: a few seconds each
        return sc
    caps = {"dataset_mib": 32, "data_mib": 16, "hot_mib": 4, "children": 40, "tail_ms": 20.0}
    for k, cap in caps.items():
        if k in wl:
            wl[k] = type(wl[k])(min(wl[k], cap))
    if "reads_per_s" in wl:
        wl["reads_per_s"] = min(float(wl["reads_per_s"]), 500_000.0)
    return replace(sc, params=wl)


def _scenario(spec: Spec, quick: bool, reads_per_s: float | None = None):
    from dataclasses import replace

    from .scenario import load_scenario

    sc = load_scenario(os.path.join(DOCS, "scenarios", spec.file))
    if spec.seed is not None:
        sc = replace(sc, seed=spec.seed)
    if spec.policies:
        sc = sc.with_policies(list(spec.policies))
    if reads_per_s is not None:
        sc = replace(sc, params={**sc.params, "reads_per_s": float(reads_per_s)})
    return _quick(sc) if quick else sc


def _run_spec(args: tuple[Spec, bool, float | None]):
    """Worker: one scenario, every policy (a picklable result)."""
    spec, quick, reads = args
    from .runner import run_compare

    t0 = time.perf_counter()
    res = run_compare(_scenario(spec, quick, reads))
    return spec.key, reads, res.scenario, res.summary, res.ops, res.samples, time.perf_counter() - t0


class Row:
    """The figures of one policy in one scenario, by attribute (``r['copy-2m'].p.upstream``)."""

    def __init__(self, rec: dict[str, Any], lat_us: np.ndarray, stores: int):
        self.rec = rec
        self.policy = rec["policy"]
        self.extrapolated = extrapolated(self.policy)
        self.cow_mib = rec["sim_cow_bytes"] / MIB
        self.collapse_mib = rec["sim_collapse_bytes"] / MIB
        self.copy_ms = float(lat_us.sum()) / 1000.0
        self.writes = stores
        self.ops = len(lat_us)
        q = (lambda p: float(np.percentile(lat_us, p))) if len(lat_us) else (lambda p: float("nan"))
        self.p50_us, self.p99_us, self.p999_us = q(50), q(99), q(99.9)
        self.max_us = float(lat_us.max()) if len(lat_us) else float("nan")
        self.over_100us = int((lat_us > 100).sum())

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["rec"][name]
        except KeyError:
            raise AttributeError(f"no figure {name!r} for policy {self.__dict__.get('policy')}") from None


class Policies:
    """``p['thp-cow-v1']`` or ``p.upstream``: the Row of a policy."""

    def __init__(self, rows: dict[str, Row]):
        self._rows = rows

    def __getitem__(self, pol: str) -> Row:
        if pol not in self._rows:
            raise KeyError(f"policy {pol!r} was not run (have: {', '.join(self._rows)})")
        return self._rows[pol]

    def __getattr__(self, name: str) -> Row:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name.replace("_", "-")]

    def __iter__(self):
        return iter(self._rows.values())


@dataclass
class ScenarioRun:
    """One scenario's runs, with the tables the page prints."""

    key: str
    scenario: Any
    summary: Any
    ops: Any
    samples: Any
    wall_s: float
    phase: str = ""
    p: Policies = field(init=False)

    def __post_init__(self) -> None:
        self.phase = self.scenario.make_workload().measure_phase
        rows = {}
        for rec in self.summary.to_dict("records"):
            lat, stores = sm.phase_costs_us(self.ops, rec["policy"], self.phase)
            rows[rec["policy"]] = Row(rec, lat, stores)
        self.p = Policies(rows)

    def header(self) -> str:
        sc = self.scenario
        model = self.summary["latency_model"].iloc[0]
        return (f"`scenario {sc.name}: seed {sc.seed}, ram {sc.ram_mib} MiB, fragmentation "
                f"{sc.fragmentation}, latency model {model}; measured phase: {self.phase}` (simulated)")

    def _mark(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            pol = row["policy"].split("`")[1]
            if extrapolated(pol):
                row["policy"] += " †"
        return rows

    def table(self, copy: bool = False) -> str:
        return self.header() + "\n\n" + sm.markdown(self._mark(sm.main_rows(self.summary, self.ops, self.phase, copy)))

    def coverage(self, n: int) -> str:
        return sm.markdown(self._mark(sm.coverage_rows(self.summary, self.samples, n)))

    def recovered_s(self, pol: str) -> float:
        """Simulated seconds from the run's start until the parent's THP coverage, having dropped,
        is back at 1.0 (NaN if it never drops or never comes back)."""
        s = self.samples[self.samples["policy"] == pol].sort_values("t_ns")
        cov, t = s["thp_coverage"].to_numpy(), s["t_ns"].to_numpy()
        low = np.flatnonzero(cov < 0.999)
        if not len(low):
            return float("nan")
        back = np.flatnonzero((cov >= 0.999) & (np.arange(len(cov)) > low[0]))
        return float(t[back[0]]) / 1e9 if len(back) else float("nan")

    def verdict(self, rank_by: str = "p99") -> str:
        from .report import verdict
        return verdict(self.summary, rank_by)


@dataclass
class Claims:
    """The page's claims: each sentence that states a result, and whether it held."""

    failed: list[str] = field(default_factory=list)
    held: int = 0

    def __call__(self, cond: Any, text: str) -> str:
        if bool(cond):
            self.held += 1
            return text
        self.failed.append(" ".join(text.split()))
        return f"**[does not hold in this run:]** {text}"


# --- formatting helpers for the template ---------------------------------------------------

def f(x: float, nd: int = 2) -> str:
    """``x`` with ``nd`` decimals and thousands separators ("n/a" for NaN)."""
    return f"{x:,.{nd}f}" if np.isfinite(x) else "n/a"


def i(x: float) -> str:
    """``x`` as an integer with thousands separators ("n/a" for NaN)."""
    return f"{int(round(x)):,}" if np.isfinite(x) else "n/a"


def crossing(points: list[dict[str, Any]], a: str, b: str, figure: str = "cpu_ms") -> float:
    """The read rate where policy ``a``'s ``figure`` first drops below ``b``'s (linear between the
    rates run; NaN when it never does).  For a figure where more is better, pass its negation's
    name: ``-loads_per_s``."""
    sign = -1.0 if figure.startswith("-") else 1.0
    figure = figure.lstrip("-")
    pa = {c["reads_per_s"]: sign * c[figure] for c in points if c["policy"] == a}
    pb = {c["reads_per_s"]: sign * c[figure] for c in points if c["policy"] == b}
    rates = sorted(set(pa) & set(pb))
    for lo, hi in zip(rates, rates[1:]):
        d0, d1 = pa[lo] - pb[lo], pa[hi] - pb[hi]
        if d0 > 0 >= d1:
            return lo + (hi - lo) * d0 / (d0 - d1)
    return float("nan")


def ratio(a: float, b: float, nd: int = 2) -> str:
    """a / b with ``nd`` decimals ("n/a" when b is 0)."""
    return f"{a / b:.{nd}f}" if b else "n/a"


# --- measured sections ------------------------------------------------------------------------

@dataclass
class Measured:
    """What the running kernel gave, or why a section was not measured."""

    kernel: str
    available: bool
    reason: str = ""
    redis: list[dict[str, Any]] = field(default_factory=list)
    redis_reason: str = ""
    validate: list[dict[str, Any]] = field(default_factory=list)
    validate_reason: str = ""
    validate_profile: str = ""
    validate_band: tuple[float, float] = (0.0, 0.0)
    e2e: list[Any] = field(default_factory=list)              # endtoend.ScenarioResult
    e2e_table: str = ""
    e2e_summary: str = ""
    e2e_reason: str = ""
    e2e_profile: str = ""


def _profile_words(choice) -> str:
    """Which profile a run used, for the page (no machine paths)."""
    name = f"`{choice.profile.name}`"
    return {"cached": f"{name}, this machine's, calibrated by this run or an earlier one",
            "fitted": f"{name}, this machine's", "file": f"{name}, a profile file",
            "preset": f"the cost preset {name}", "cpu-preset": f"the cost preset {name} of this CPU"
            }.get(choice.how, f"the reference profile {name}")


def _measure(progress: Callable[[str], None], quick: bool) -> Measured:
    from ..lab import procfs

    say = progress
    ok, why = procfs.thp_available()
    m = Measured(kernel=platform.release(), available=bool(ok), reason="" if ok else why)
    if not ok:
        m.redis_reason = m.validate_reason = m.e2e_reason = why
        return m
    progress("measured: latency model against the running kernel (validate --quick --calibrate)")
    try:
        from ..lab.calibrate import CalibrationConfig, cache_profile
        from ..lab.validate import BAND, ValidationConfig, calibrate_and_validate
        # this machine's profile, calibrated interleaved with the validation (holds the lab lock itself)
        fitted, rep = calibrate_and_validate(CalibrationConfig.quick_config(), ValidationConfig.quick_config())
        try:
            cache_profile(fitted)            # the end-to-end runs below price with it (profile auto)
        except OSError:
            pass                             # not cached: profile auto falls back to this CPU's preset
        m.validate_profile = (f"profile {fitted.profile.name}, calibrated by the same run, interleaved with it "
                              f"(random reads x{rep.metadata['read_scale']:.2f})")
        m.validate_band = tuple(BAND)
        for row in rep.rows:
            m.validate.append({"scenario": row.label, "measured_ms": row.measured_ns / 1e6,
                               "predicted_ms": row.predicted_ns / 1e6,
                               "ratio": row.ratio,
                               "in_band": row.in_band})
    except Exception as e:  # the page says why instead of failing the whole regeneration
        m.validate_reason = f"{type(e).__name__}: {e}"
    try:
        from ..lab import redis as rl
        binary = rl.find_redis_server()
        cases = [(thp, label, rate) for thp in (True, False)
                 for label, rate in (("light", 20_000.0), ("heavy", 60_000.0))]
        for thp, label, rate in cases:
            pages = "THP" if thp else "4 KiB"
            progress(f"measured: a real Redis BGSAVE under {label} SET load ({rate:,.0f}/s), {pages} heap")
            real = rl.run_redis_bgsave(16 if quick else 64, rate, server=binary, thp=thp)
            cmp = rl.compare_with_sim(real)
            m.redis.append({"load": label, "pages": pages, "set_rate": rate,
                            "real_cow_mib": cmp["cow"]["real_rdb_last_cow_size"] / MIB,
                            "sim_cow_mib": cmp["cow"]["sim_cow_bytes"] / MIB,
                            "ratio": cmp["cow"]["sim_over_real"],
                            "real_split": cmp["split"]["real_parent_thps_split"],
                            "sim_split": cmp["split"]["sim_thp_split_pmd"],
                            "fork_usec": real.get("latest_fork_usec")})
    except Exception as e:
        m.redis_reason = f"{type(e).__name__}: {e}"
    try:
        from ..machine import cost_presets
        from . import endtoend
        scenarios = endtoend.SCENARIOS[:3] if quick else endtoend.SCENARIOS
        m.e2e = endtoend.run(say, scenarios)
        m.e2e_profile = _profile_words(cost_presets.select())
        m.e2e_table = endtoend.markdown(m.e2e)
        m.e2e_summary = endtoend.summary_line(m.e2e)
    except Exception as e:
        m.e2e_reason = f"{type(e).__name__}: {e}"
    return m


# --- figures ---------------------------------------------------------------------------------

def _save(fig, outdir: str, name: str) -> str:
    """Write one figure as a PNG in ``outdir`` and close it; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(outdir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figures(runs: dict[str, ScenarioRun], crossover: dict[str, list[dict[str, Any]]], outdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    made = []

    # 1. Memory copied by COW against the worst write latency, per policy and scenario.
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key in ("redis-zipf", "redis-uniform", "forkserver"):
        if key not in runs:
            continue
        rows = list(runs[key].p)
        ax.scatter([r.cow_mib for r in rows], [r.p99_us for r in rows], label=key, s=18)
        for r in rows:
            if r.policy in ("upstream", "thp-cow-v1"):
                ax.annotate(r.policy, (r.cow_mib, r.p99_us), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("COW MiB (simulated)")
    ax.set_ylabel("p99 write latency, µs (simulated)")
    ax.set_title("Memory copied against tail latency, per policy")
    ax.legend(fontsize=8)
    made.append(_save(fig, outdir, "cow-vs-p99.png"))

    # 2. THP coverage over time after a snapshot (redis-recovery).
    if "redis-recovery" in runs:
        rr = runs["redis-recovery"]
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for pol in rr.summary["policy"]:
            s = rr.samples[rr.samples["policy"] == pol].sort_values("t_ns")
            ax.step(s["t_ns"] / 1e9, s["thp_coverage"], where="post", label=pol, lw=1.2)
        ax.set_xlabel("simulated time, s")
        ax.set_ylabel("parent THP coverage")
        ax.set_title("THP coverage after a BGSAVE, khugepaged at its defaults (simulated)")
        ax.legend(fontsize=7)
        made.append(_save(fig, outdir, "coverage-recovery.png"))

    # 3. The read crossovers: CPU time (open loop) and loads per second (closed loop) against read rate.
    if any(crossover.values()):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 4))
        for pol in CROSSOVER_POLICIES:
            pts = [c for c in crossover.get("read-crossover", []) if c["policy"] == pol]
            ax1.plot([c["reads_per_s"] / 1e6 for c in pts], [c["cpu_ms"] for c in pts], marker="o", label=pol)
        base = {c["reads_per_s"]: c["loads_per_s"] for c in crossover.get("read-crossover-closed", [])
                if c["policy"] == "upstream"}
        for pol in CROSSOVER_POLICIES:
            pts = [c for c in crossover.get("read-crossover-closed", []) if c["policy"] == pol and base.get(c["reads_per_s"])]
            ax2.plot([c["reads_per_s"] / 1e6 for c in pts], [c["loads_per_s"] / base[c["reads_per_s"]] for c in pts],
                     marker="o", label=pol)
        ax2.axhline(1.0, color="grey", lw=0.6)
        for ax in (ax1, ax2):
            ax.set_xlabel("GETs per second offered (millions)")
        ax1.set_ylabel("CPU time, ms (fg + bg; simulated)")
        ax2.set_ylabel("loads/s relative to upstream (simulated)")
        ax1.set_title("CPU time (open loop)", fontsize=10)
        ax2.set_title("throughput (closed loop)", fontsize=10)
        ax1.legend(fontsize=7)
        fig.suptitle("Where keeping THPs after fork pays back")
        made.append(_save(fig, outdir, "read-crossover.png"))
    return made


def _profile():
    from ..machine.latency import DEFAULT_PROFILE
    return DEFAULT_PROFILE


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Outcome:
    path: str
    figures: list[str]
    claims: Claims
    seconds: float


def generate(out: str | None = None, *, template: str | None = None, figures_dir: str | None = None,
             quick: bool = False, real: bool = True, jobs: int = 2, validation_md: str | None = None,
             progress: Callable[[str], None] | None = None) -> Outcome:
    """Run every scenario of the page, measure what the running kernel can, write the page.

    ``validation_md``: also write the end-to-end table into that file's generated block
    (docs/validation.md), when it was measured."""
    import jinja2

    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    out = out or os.path.join(DOCS, "results.md")
    template = template or os.path.join(DOCS, TEMPLATE)
    figures_dir = figures_dir or os.path.join(os.path.dirname(out), "results")
    tasks = [(s, quick, None) for s in SPECS]
    for key, file in CROSSOVERS.items():
        tasks += [(Spec(key, file, policies=CROSSOVER_POLICIES), quick, float(rate)) for rate in CROSSOVER_RATES]
    runs: dict[str, ScenarioRun] = {}
    crossover: dict[str, list[dict[str, Any]]] = {key: [] for key in CROSSOVERS}
    done = 0

    def collect(result) -> None:
        nonlocal done
        key, reads, sc, summ, ops, samples, wall = result
        done += 1
        if reads is None:
            runs[key] = ScenarioRun(key, sc, summ, ops, samples, wall)
            say(f"[{done}/{len(tasks)}] {key}: {len(summ)} policies, {wall:.1f} s")
        else:
            for rec in summ.to_dict("records"):
                crossover[key].append({"reads_per_s": reads, "policy": rec["policy"],
                                       "cpu_ms": rec["model_ms"] + rec["bg_ms"], "peak_mib": rec["peak_mib"],
                                       "p99_us": rec["lat_p99_us"], "loads_per_s": rec["loads_per_s"],
                                       "ops_per_s": rec["ops_per_s"], "end_ms": rec["end_ms"]})
            say(f"[{done}/{len(tasks)}] {key} at {reads:,.0f} GETs/s, {wall:.1f} s")

    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for result in pool.map(_run_spec, tasks):
                collect(result)
    else:
        for t in tasks:
            collect(_run_spec(t))
    for pts in crossover.values():
        pts.sort(key=lambda c: (CROSSOVER_POLICIES.index(c["policy"]), c["reads_per_s"]))
    nr = "not measured (--no-real)"
    measured = _measure(say, quick) if real else Measured(platform.release(), False, nr, redis_reason=nr,
                                                          validate_reason=nr, e2e_reason=nr)
    say("figures")
    figs = _figures(runs, crossover, figures_dir)
    claims = Claims()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.dirname(os.path.abspath(template))),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters.update(f=f, i=i)
    page = env.get_template(os.path.basename(template)).render(
        r=runs, crossover=crossover, m=measured, claim=claims, f=f, i=i, ratio=ratio, crossing=crossing,
        prof=_profile(), abs=abs, min=min, max=max, nan=float('nan'), isnan=lambda x: x != x,
        figdir=os.path.relpath(figures_dir, os.path.dirname(os.path.abspath(out))),
        generated=_dt.date.today().isoformat(), commit=_git_commit(), quick=quick,
        python=platform.python_version(), extrapolated=extrapolated,
        seconds=round(time.perf_counter() - t0))
    with open(out + ".tmp", "w") as fh:
        fh.write(page)
    os.replace(out + ".tmp", out)
    if validation_md and measured.e2e_table:
        from . import endtoend
        endtoend.write_into(validation_md, f"Linux {measured.kernel}, made by `make results` on "
                            f"{_dt.date.today().isoformat()} (commit `{_git_commit()}`): "
                            f"{measured.e2e_summary}; simulator priced with {measured.e2e_profile}.\n\n"
                            f"{measured.e2e_table}")
    return Outcome(out, figs, claims, time.perf_counter() - t0)
