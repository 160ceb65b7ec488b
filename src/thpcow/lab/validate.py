"""Compare the latency model's predictions with times measured on the running kernel (``thpcow validate``).

Every scenario runs twice:

* **measured**: on the running kernel, with the method of
  :mod:`thpcow.lab.calibrate` (anonymous mmap through ctypes, numpy strided
  stores, ``os.fork``, the "warm" pre-touch, median of repeats), recording
  the /proc/vmstat deltas and the region's smaps line;
* **predicted**: the same system calls and stores on the simulated kernel
  (:class:`thpcow.kernel.Kernel`, its THP knobs set like the running
  kernel's), priced with :func:`thpcow.machine.latency.cost_vmstat_delta` and
  the profile (plus fork hints, the memset of a whole-region rewrite, and for
  random reads the TLB simulator over the simulated page sizes plus a
  per-access memory cost).

The real run must take the simulator's path: each THP counter
(``thp_fault_alloc``, ``thp_split_pmd``, ``thp_collapse_alloc``) of the
real delta must be at least the simulator's and exceed it by less than half
the region's PMDs (other processes only add), ``pgfault`` at least the
simulator's, and AnonHugePages of the measured process equal the
simulator's.  Otherwise the scenario raises
:class:`~thpcow.lab.calibrate.WrongPathError` rather than compare two
different things.

A ratio predicted / measured inside :data:`BAND` passes.  docs/validation.md
has the figures of the lab VM and the reasons for the misses.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Mapping

import numpy as np

from ..kernel.vmstat import delta as vmstat_delta
from ..machine.latency import DEFAULT_PROFILE, CalibrationProfile, cost_vmstat_delta, fork_hints
from . import calibrate as cal
from . import procfs
from .calibrate import GiB, MiB, PAGE, PMD, Child, Counters, Expect, Region, check_path, populate
from .tlbmeasure import cpu_timed_ns

BAND = (0.90, 1.10)                    # within 10 % (issue #17)
SIM_COUNTERS = ("pgfault", "pgreuse", "thp_fault_alloc", "thp_split_pmd", "thp_collapse_alloc")
THP_PATH_COUNTERS = ("thp_fault_alloc", "thp_split_pmd", "thp_collapse_alloc")
MIRRORED_KNOBS = ("enabled", "defrag", "use_zero_page", "hugepages-2048kB/enabled")


@dataclass
class ValidationConfig:
    """Sizes and repeats; :meth:`quick_config` halves the work."""

    size: int = 256 * MiB                 # first touch, COW storm, rewrite
    fork_size: int = 1 * GiB              # 4 KiB-backed fork
    fork_thp_size: int = 4 * GiB          # THP-backed fork: 2048 PMDs, above the fork's own noise
    random_size: int = 1 * GiB
    random_accesses: int = 8_000_000
    repeats: int = 5
    fork_repeats: int = 31
    warm: bool = True
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> "ValidationConfig":
        base = dict(size=64 * MiB, random_accesses=4_000_000, repeats=3, fork_repeats=21, quick=True)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Prediction:
    """The simulated side of a scenario: total ns, its parts, the simulator's counters and smaps."""

    ns: float
    parts_ns: dict[str, float] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    sim_delta: dict[str, int] = field(default_factory=dict)
    sim_anon_huge_kb: int = 0
    nr_pmds: int = 0


@dataclass
class Measurement:
    """The real side of a scenario: median total ns, every run, and one run's counters."""

    ns: float
    runs: list[float]
    observed: dict[str, int]


@dataclass
class Row:
    key: str
    label: str
    measured_ns: float
    predicted_ns: float
    measured_runs: list[float]
    prediction: Prediction
    observed: dict[str, int]
    checked: list[str]
    per_op: str = ""
    ops: int = 1
    round_ratios: list[float] = field(default_factory=list)    # interleaved: each round's own ratio

    @property
    def ratio(self) -> float:
        """predicted / measured; for an interleaved run the median of the rounds' own ratios."""
        if self.round_ratios:
            return float(statistics.median(self.round_ratios))
        return self.predicted_ns / self.measured_ns if self.measured_ns > 0 else float("nan")

    @property
    def in_band(self) -> bool:
        return BAND[0] <= self.ratio <= BAND[1]

    def to_dict(self) -> dict:
        p = self.prediction
        return {"scenario": self.key, "label": self.label, "measured_ns": round(self.measured_ns, 1),
                "predicted_ns": round(self.predicted_ns, 1), "ratio": round(self.ratio, 4),
                "in_band": self.in_band, "ops": self.ops, "per_op": self.per_op,
                "measured_runs_ns": [round(x, 1) for x in self.measured_runs],
                "predicted_parts_ns": {k: round(v, 1) for k, v in p.parts_ns.items() if v},
                "predicted_events": {k: v for k, v in p.events.items() if v},
                **({"round_ratios": [round(x, 4) for x in self.round_ratios]} if self.round_ratios else {}),
                "sim_delta": p.sim_delta, "real_observed": self.observed, "checked": self.checked}


# ---------------------------------------------------------------------------------------------
# The simulated side
# ---------------------------------------------------------------------------------------------

class SimRun:
    """One simulated kernel with one process and a 2 MiB-aligned region advised like the real one."""

    def __init__(self, size: int, backing: str, knobs: Mapping[str, str] | None = None) -> None:
        from ..kernel import MADV_HUGEPAGE, Kernel
        from ..kernel.constants import MADV_NOHUGEPAGE

        self.k = Kernel(ram=max(1 * GiB, 2 * size + 512 * MiB), seed=0)
        for name in MIRRORED_KNOBS:
            if knobs and name in knobs:
                self.k.sysfs.write(name, str(knobs[name]))
        self.p = self.k.spawn()
        raw = self.p.mmap(size + PMD)
        self.addr = (raw + PMD - 1) & ~(PMD - 1)
        self.size = size
        self.p.madvise(self.addr, size, MADV_HUGEPAGE if backing == "thp" else MADV_NOHUGEPAGE)

    def pages(self, start: int = 0, step: int = PAGE) -> np.ndarray:
        return np.arange(self.addr + start, self.addr + self.size, step, dtype=np.int64)

    def populate(self) -> None:
        self.p.write_many(self.pages(), 1)

    def delta(self, fn: Callable[[], object]) -> dict[str, int]:
        before = self.k.vmstat_snapshot()
        fn()
        return {k: int(v) for k, v in vmstat_delta(self.k.vmstat_snapshot(), before).items()}

    def anon_huge_kb(self, proc=None) -> int:
        return int((proc or self.p).smaps_fields(self.addr).get("AnonHugePages", 0))

    def priced(self, delta: Mapping[str, int], profile: CalibrationProfile, hints: Mapping[str, int] | None = None,
               proc=None, extra: Mapping[str, float] | None = None) -> Prediction:
        cost = cost_vmstat_delta(delta, profile, hints)
        parts = dict(cost.parts_ns)
        parts.update(extra or {})
        return Prediction(ns=float(sum(parts.values())), parts_ns=parts, events=dict(cost.events),
                          sim_delta={k: int(delta.get(k, 0)) for k in SIM_COUNTERS},
                          sim_anon_huge_kb=self.anon_huge_kb(proc), nr_pmds=self.size // PMD)


def predict_first_touch(size: int, backing: str, profile: CalibrationProfile,
                        knobs: Mapping[str, str] | None = None) -> Prediction:
    """Write one byte in every 4 KiB page of a fresh region."""
    s = SimRun(size, backing, knobs)
    d = s.delta(s.populate)
    return s.priced(d, profile)


def predict_fork(size: int, backing: str, profile: CalibrationProfile,
                 knobs: Mapping[str, str] | None = None) -> Prediction:
    """The page-table copy fork() does for the populated region: its PMDs or PTE tables, no fork_base.

    fork_base_ns is the fork of everything else (on the lab, the interpreter's own
    mappings, which vary with its heap); the measured side subtracts it too.
    """
    s = SimRun(size, backing, knobs)
    s.populate()
    hints = {**fork_hints(s.p), "forks": 0}
    d = s.delta(s.p.fork)
    return s.priced(d, profile, hints)


def predict_cow_storm(size: int, profile: CalibrationProfile, knobs: Mapping[str, str] | None = None) -> Prediction:
    """THP region populated, fork; the child writes one byte in every 4 KiB page."""
    s = SimRun(size, "thp", knobs)
    s.populate()
    child = s.p.fork()
    d = s.delta(lambda: child.write_many(s.pages(), 2))
    return s.priced(d, profile, proc=child)


def predict_rewrite(size: int, backing: str, profile: CalibrationProfile, extras: Mapping[str, float],
                    knobs: Mapping[str, str] | None = None) -> Prediction:
    """Region populated, fork; the parent rewrites the whole region (memset) while the child lives.

    Priced as the memset without faults + the COW faults (and PMD splits) the
    simulator counts + a dense-overwrite extra per COW fault (``cow_dense_4k_ns``).
    """
    s = SimRun(size, backing, knobs)
    s.populate()
    s.p.fork()
    d = s.delta(lambda: s.p.write_many(s.pages(), 3))
    # Every COW fault is taken by the memset, which goes on to overwrite the whole page.
    return s.priced(d, profile, {"dense_cow_pages": int(d.get("sim_cow_pages", 0))},
                    extra={"memset": extras["memset_2m_ns"] * size / PMD})


def predict_random_reads(size: int, mode: str, accesses: int, model: cal.RandomReadModel,
                         knobs: Mapping[str, str] | None = None, seed: int = 0,
                         sim_accesses: int = 400_000, read_timing=None) -> Prediction:
    """``accesses`` random 8-byte reads over a THP region, as populated ("thp") or COW-split ("split").

    Split: fork, the parent writes one byte per 2 MiB (its PMDs split), the
    child exits.  The TLB simulator sees the page size of every access from
    page_shifts_of() on the simulated parent; ``sim_accesses`` of the same
    random stream are simulated and the rates scaled to ``accesses``.
    With ``read_timing`` (a fitted :class:`~thpcow.machine.tlb.ReadTiming`,
    see machine_read_timing()) the reads are priced by its gather form
    (machine/tlb.py read_ns); otherwise by ``model``.
    """
    from ..machine.tlb import page_shifts_of

    s = SimRun(size, "thp", knobs)
    s.populate()
    d: dict[str, int] = {}
    if mode == "split":
        child = s.p.fork()
        d = s.delta(lambda: s.p.write_many(s.pages(PAGE, PMD), 2))
        child.exit()
    if read_timing is not None:
        from ..machine.presets import get_preset
        from ..machine.tlb import read_ns, read_rates

        tk = get_preset(read_timing.tlb_preset)
        rates = read_rates(tk, size, lambda v: page_shifts_of(s.p, v), sim_accesses, seed, base=s.addr)
        t = read_ns(read_timing, tk, "gather", size, rates)
        mem, tr = t["data"] * accesses, t["translation"] * accesses
        l2, refs = rates["l2_hits"], rates["pte_refs"] + rates["pmd_refs"]
    else:
        l2, refs = cal.tlb_rates(size, lambda v: page_shifts_of(s.p, v), model.knobs(size), sim_accesses, seed,
                                 base=s.addr)
        mem = model.mem_ns(size) * accesses
        tr = model.translation_ns(l2, refs, size) * accesses
    pred = Prediction(ns=mem + tr, parts_ns={"memory": mem, "translation": tr},
                      events={"l2_tlb_hits": int(round(l2 * accesses)), "walk_refs": int(round(refs * accesses))},
                      sim_delta={k: int(d.get(k, 0)) for k in SIM_COUNTERS},
                      sim_anon_huge_kb=s.anon_huge_kb(), nr_pmds=size // PMD)
    return pred


def machine_read_timing():
    """The read timing fitted for this machine's CPU (machine/presets.py READ_TIMINGS), or None."""
    from .tlbmeasure import machine_timing

    return machine_timing()[0]


# ---------------------------------------------------------------------------------------------
# The real side
# ---------------------------------------------------------------------------------------------

def path_rules(pred: Prediction) -> list[Expect]:
    """The real run must take the simulator's path; see the module docstring."""
    slack = max(1, pred.nr_pmds // 2)
    rules = [Expect(c, min=pred.sim_delta.get(c, 0), max=pred.sim_delta.get(c, 0) + slack,
                    why=f"the simulator counts {pred.sim_delta.get(c, 0)}") for c in THP_PATH_COUNTERS]
    rules.append(Expect("pgfault", min=pred.sim_delta.get("pgfault", 0),
                        why=f"the simulator counts {pred.sim_delta.get('pgfault', 0)} faults"))
    rules.append(Expect("smaps:AnonHugePages", min=pred.sim_anon_huge_kb, max=pred.sim_anon_huge_kb,
                        why="the simulated process has this much PMD-mapped"))
    return rules


class _Real:
    """The measured side of every scenario (the caller holds lab_lock())."""

    def __init__(self, cfg: ValidationConfig, root: str = "/") -> None:
        self.cfg = cfg
        self.root = root

    def warm(self, size: int, backing: str) -> None:
        cal.prewarm(size, backing, self.cfg.warm)

    def first_touch(self, size: int, backing: str) -> list[tuple[float, dict]]:
        out = []
        for _ in range(self.cfg.repeats):
            self.warm(size, backing)
            with Region(size, backing) as r:
                with Counters(self.root) as c:
                    t = cal.timed_ns(lambda: cal._store(r.buf, np.s_[::PAGE], 1))
                out.append((t, {**c.delta, **r.smaps()}))
        return out

    def fork(self, size: int, backing: str) -> list[tuple[float, dict]]:
        """fork() with the populated region minus a paired fork() without it (MADV_DONTFORK)."""
        self.warm(size, backing)
        with Region(size, backing) as r:
            populate(r)
            with Counters(self.root) as c:
                pairs = cal.fork_pairs(r, self.cfg.fork_repeats)
            obs = {**c.delta, **r.smaps()}
        return [(fr - fb, obs) for fb, fr, _, _ in pairs]

    def cow_storm(self, size: int) -> list[tuple[float, dict]]:
        out = []
        for _ in range(self.cfg.repeats):
            self.warm(size, "thp")
            with Region(size, "thp") as r:
                populate(r)

                def task() -> dict:
                    for _ in range(2):                      # settle the child's heap: see Calibrator.batch()
                        cal.timed_ns(lambda: cal._store(r.buf, np.s_[0:0], 2))
                    t = cal.timed_ns(lambda: cal._store(r.buf, np.s_[::PAGE], 2))
                    return {"ns": t, **r.smaps()}

                child, _ = Child.fork(task)
                try:
                    self.warm(size, "4k")
                    with Counters(self.root) as c:
                        rep = child.run()
                finally:
                    child.exit()
                out.append((float(rep.pop("ns")), {**c.delta, **{k: int(v) for k, v in rep.items()}}))
        return out

    def rewrite(self, size: int, backing: str) -> list[tuple[float, dict]]:
        out = []
        for _ in range(self.cfg.repeats):
            self.warm(size, backing)
            with Region(size, backing) as r:
                populate(r)
                child, _ = Child.fork()
                try:
                    self.warm(size, "4k")
                    for _ in range(2):                      # settle the heap: see Calibrator.batch()
                        with Counters(self.root):
                            cal.timed_ns(lambda: ctypes.memset(r.addr, 3, 0))
                    with Counters(self.root) as c:
                        t = cal.timed_ns(lambda: ctypes.memset(r.addr, 3, size))
                    obs = {**c.delta, **r.smaps()}
                finally:
                    child.exit()
                out.append((t, obs))
        return out

    def random_reads(self, size: int, mode: str) -> list[tuple[float, dict]]:
        m = self.cfg.random_accesses
        idx = cal.random_indices(size, m, self.cfg.seed)
        res = np.empty(m, dtype=np.uint64)
        self.warm(size, "thp")
        out = []
        with Region(size, "thp") as r:
            populate(r)
            obs: dict[str, int] = {}
            if mode == "split":
                child, _ = Child.fork()
                try:
                    with Counters(self.root) as c:
                        cal._store(r.buf, np.s_[PAGE::PMD], 2)
                    obs = dict(c.delta)
                finally:
                    child.exit()
            obs.update(r.smaps())
            u64 = r.buf.view(np.uint64)
            np.take(u64, idx, out=res, mode="clip")      # warm-up pass
            for _ in range(self.cfg.repeats):
                with Counters(self.root) as c:       # CPU time: preemption is not the reads' cost
                    t, _ = cpu_timed_ns(lambda: np.take(u64, idx, out=res, mode="clip"))
                check_path(f"random reads ({mode})", c.delta,
                           cal.RULES["no_faults"](0, 0))
                out.append((t, obs))
        return out


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------

def _fmt_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


@dataclass
class Scenario:
    key: str
    label: str
    ops: Callable[[ValidationConfig], tuple[int, str]]
    measure: Callable[[_Real], list[tuple[float, dict]]]
    predict: Callable[[ValidationConfig, CalibrationProfile, Mapping, "cal.RandomReadModel", Mapping | None,
                       object], Prediction]     # (config, profile, extras, read model, knobs, ReadTiming | None)


def scenarios(cfg: ValidationConfig) -> list[Scenario]:
    """The micro-scenarios, in table order."""
    S, R = cfg.size, cfg.random_size
    out = []
    for b, name in (("4k", "4 KiB"), ("thp", "THP")):
        out.append(Scenario(
            f"first_touch_{b}", f"first touch {name} {_fmt_size(S)}",
            lambda c: (c.size // PAGE, "store"),
            lambda real, b=b: real.first_touch(real.cfg.size, b),
            lambda c, p, x, m, k, t, b=b: predict_first_touch(c.size, b, p, k)))
    for b, name in (("thp", "THP"), ("4k", "4 KiB")):
        out.append(Scenario(
            f"fork_{b}", f"fork() of {name} {_fmt_size(cfg.fork_thp_size if b == 'thp' else cfg.fork_size)}",
            lambda c: (1, "fork"),
            lambda real, b=b: real.fork(real.cfg.fork_thp_size if b == "thp" else real.cfg.fork_size, b),
            lambda c, p, x, m, k, t, b=b: predict_fork(c.fork_thp_size if b == "thp" else c.fork_size, b, p, k)))
    out.append(Scenario(
        "cow_storm", f"COW-split storm THP {_fmt_size(S)}",
        lambda c: (c.size // PAGE, "fault"),
        lambda real: real.cow_storm(real.cfg.size),
        lambda c, p, x, m, k, t: predict_cow_storm(c.size, p, k)))
    for b, name in (("thp", "THP"), ("4k", "4 KiB")):
        out.append(Scenario(
            f"rewrite_{b}", f"rewrite after fork {name} {_fmt_size(S)}",
            lambda c: (c.size // PMD, "2 MiB"),
            lambda real, b=b: real.rewrite(real.cfg.size, b),
            lambda c, p, x, m, k, t, b=b: predict_rewrite(c.size, b, p, x, k)))
    for mode, name in (("thp", "THP"), ("split", "COW-split")):
        out.append(Scenario(
            f"random_{mode}", f"random reads {name} {_fmt_size(R)}",
            lambda c: (c.random_accesses, "read"),
            lambda real, mode=mode: real.random_reads(real.cfg.random_size, mode),
            lambda c, p, x, m, k, t, mode=mode: predict_random_reads(c.random_size, mode, c.random_accesses, m,
                                                                     k, c.seed, read_timing=t)))
    return out


SCENARIO_KEYS = tuple(s.key for s in scenarios(ValidationConfig()))


@dataclass
class ValidationResult:
    rows: list[Row]
    profile: CalibrationProfile
    metadata: dict
    knobs: dict
    config: ValidationConfig
    random_model: dict
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {"band": list(BAND), "profile": self.profile.name, "profile_source": self.profile.source,
                "profile_cpu": self.profile.cpu, "profile_kernel": self.profile.kernel,
                "all_in_band": all(r.in_band for r in self.rows), "rows": [r.to_dict() for r in self.rows],
                "config": self.config.to_dict(), "random_model": self.random_model, "metadata": self.metadata,
                "knobs": self.knobs, "elapsed_s": round(self.elapsed_s, 1)}


def predict_all(cfg: ValidationConfig, profile: CalibrationProfile = DEFAULT_PROFILE, lab: Mapping | None = None,
                knobs: Mapping[str, str] | None = None, only: tuple[str, ...] | None = None,
                read_scale: float = 1.0) -> dict[str, Prediction]:
    """The simulated side of every scenario (no real kernel needed; deterministic).  Random reads
    are priced by this CPU's read timing (machine_read_timing()), its times times ``read_scale``
    (read_scale_of()), else by the profile's random-read model."""
    extras = cal.lab_extras(lab or {})
    model = cal.random_model(lab or {})
    timing = machine_read_timing()
    if timing is not None and read_scale != 1.0:
        timing = scaled_timing(timing, read_scale)
    return {s.key: s.predict(cfg, profile, extras, model, knobs, timing) for s in scenarios(cfg)
            if only is None or s.key in only}


TIME_PARAMS = ("llc_ns", "dram_ns", "walk_hit_ns", "walk_miss_ns", "gather_ns", "seq_cache_ns", "seq_dram_ns")


def scaled_timing(timing, factor: float):
    """A ReadTiming whose memory and walk times are ``factor`` times ``timing``'s (the machine's
    memory slower or faster than when it was fitted; the L2 TLB hit, priced in cycles, stays)."""
    return timing.with_params([getattr(timing, p) * (factor if p in TIME_PARAMS else 1.0)
                               for p in timing.PARAMS])


def read_scale_of(points: list[dict], timing=None, seed: int = 0, size: int | None = None) -> float:
    """How much slower (above 1) this machine read now than ``timing`` (this CPU's read timing)
    predicts: the median over calibration random-read points ({size_mib, backing, ns}, numpy
    take over 4 KiB- or THP-backed memory) of measured / predicted; 1.0 without either.  With
    ``size``: only the points of the measured region size nearest to it."""
    from ..machine.presets import get_preset
    from ..machine.tlb import read_ns, read_rates

    timing = timing if timing is not None else machine_read_timing()
    if timing is None or not points:
        return 1.0
    if size is not None:
        near = min({int(p["size_mib"]) for p in points}, key=lambda m: abs(m * MiB - size))
        points = [p for p in points if int(p["size_mib"]) == near]
    tk = get_preset(timing.tlb_preset)
    ratios = []
    for p in points:
        region = int(p["size_mib"]) * MiB
        shift = 21 if p["backing"] == "thp" else 12
        pred = read_ns(timing, tk, "gather", region, read_rates(tk, region, shift, seed=seed))["ns"]
        if pred > 0:
            ratios.append(float(p["ns"]) / pred)
    return float(statistics.median(ratios)) if ratios else 1.0


def reprice(pred: Prediction, profile: CalibrationProfile, memset_factor: float = 1.0,
            read_factor: float = 1.0) -> float:
    """``pred``'s total with another profile's costs: each priced event's count times the
    profile's cost, the memset part times ``memset_factor`` and the random reads' parts times
    ``read_factor`` (ratios of the new extras and read scale to those ``pred`` was priced with)."""
    total = 0.0
    for part, ns in pred.parts_ns.items():
        if part in ("memory", "translation"):
            total += ns * read_factor
        elif part == "memset":
            total += ns * memset_factor
        elif part in pred.events and hasattr(profile, part + "_ns"):
            total += pred.events[part] * getattr(profile, part + "_ns")
        else:
            total += ns
    return total


def predict_isolated(cfg: ValidationConfig, profile: CalibrationProfile, lab: Mapping | None,
                     knobs: Mapping[str, str] | None, only: tuple[str, ...],
                     read_scale: float = 1.0) -> dict[str, Prediction]:
    """predict_all() in a forked child, so that this process stays as small as it was.

    The simulated kernels leave the interpreter's heap hundreds of MiB larger
    (glibc keeps freed arenas), and every fork() measured afterwards would copy
    those page tables too.
    """
    def task() -> dict:
        return {k: asdict(v) for k, v in predict_all(cfg, profile, lab, knobs, only, read_scale).items()}

    child, _ = Child.fork(task)
    try:
        report = child.run()
    finally:
        child.exit()
    return {k: Prediction(**v) for k, v in report.items()}


def _scenarios_to_run(cfg: ValidationConfig, only: tuple[str, ...] | None, root: str) -> list[Scenario]:
    ok, reason = procfs.thp_available(root)
    if not ok:
        raise procfs.LabError(f"cannot validate the THP scenarios: {reason}")
    if only:
        unknown = set(only) - set(SCENARIO_KEYS)
        if unknown:
            raise ValueError(f"unknown scenario(s) {', '.join(sorted(unknown))}; known: {', '.join(SCENARIO_KEYS)}")
    return [s for s in scenarios(cfg) if only is None or s.key in only]


def _measured(sc: Scenario, real: _Real, pred: Prediction,
              attempts: int = cal.STEP_ATTEMPTS) -> tuple[list[tuple[float, dict]], list[str]]:
    """The scenario's runs on the running kernel, each checked against the simulator's path
    (up to ``attempts`` tries, as calibrate.run_step()); (runs, the rules checked)."""
    for attempt in range(1, attempts + 1):
        runs = sc.measure(real)
        try:
            checked: list[str] = []
            for _, obs in runs:
                checked = check_path(sc.key, obs, path_rules(pred))
            return runs, checked
        except cal.WrongPathError as e:
            if attempt == attempts:
                raise cal.WrongPathError(f"{e} (refused in all {attempt} attempts)" if attempts > 1 else str(e)) \
                    from None
    raise AssertionError("unreachable")


def _row(sc: Scenario, cfg: ValidationConfig, pred: Prediction, runs: list[tuple[float, dict]],
         checked: list[str]) -> Row:
    ops, per = sc.ops(cfg)
    return Row(key=sc.key, label=sc.label, measured_ns=float(statistics.median(t for t, _ in runs)),
               predicted_ns=pred.ns, measured_runs=[t for t, _ in runs], prediction=pred,
               observed=runs[len(runs) // 2][1], checked=checked, per_op=per, ops=ops)


def validate(cfg: ValidationConfig | None = None, profile: CalibrationProfile = DEFAULT_PROFILE,
             lab: Mapping | None = None, progress: Callable[[str, int, int], None] | None = None,
             only: tuple[str, ...] | None = None, root: str = "/") -> ValidationResult:
    """Measure and predict every scenario; see the module docstring.

    Holds lab_lock() while measuring, with the garbage collector off.
    Raises procfs.LabError when THP is unavailable and WrongPathError when a
    real run took another path than the simulator.
    """
    from .scenario import lab_lock

    cfg = cfg or ValidationConfig()
    todo = _scenarios_to_run(cfg, only, root)
    t0 = time.perf_counter()
    knobs = procfs.read_thp_knobs(root)
    meta = cal.collect_metadata(root)
    model = cal.random_model(lab or {})
    real = _Real(cfg, root)
    total = len(todo) + 1
    if progress:
        progress(f"simulating {len(todo)} scenarios (simulated kernel, TLB simulator)", 0, total)
    preds = predict_isolated(cfg, profile, lab, knobs, tuple(s.key for s in todo))
    rows = []
    gc_was = gc.isenabled()
    gc.disable()
    load = cal.MachineLoad(root)
    try:
        with lab_lock(), load:
            meta["probe"] = {k: round(v, 3) for k, v in cal.speed_probe().items()}
            for i, sc in enumerate(todo):
                if progress:
                    progress(sc.label, 1 + i, total)
                runs, checked = _measured(sc, real, preds[sc.key])
                rows.append(_row(sc, cfg, preds[sc.key], runs, checked))
    finally:
        if gc_was:
            gc.enable()
    meta["other_cpu_busy"] = load.meta_value()
    if progress:
        progress("done", total, total)
    return ValidationResult(rows=rows, profile=profile, metadata=meta, knobs=knobs, config=cfg,
                            random_model=model.to_dict(), elapsed_s=time.perf_counter() - t0)


def calibrate_and_validate(cal_cfg: "cal.CalibrationConfig | None" = None, cfg: ValidationConfig | None = None,
                           progress: Callable[[str, int, int], None] | None = None,
                           only: tuple[str, ...] | None = None,
                           root: str = "/") -> tuple["cal.CalibrationResult", ValidationResult]:
    """Calibrate this machine and validate with that profile, the two interleaved.

    A shared VM's speed drifts by 20-50 % within minutes with what the host runs
    beside it (docs/validation.md).  Here each of the calibration's rounds (every
    figure once, fork pairs and random reads split over the rounds) is followed by
    one run of every scenario, so the profile's medians and the measured medians
    come from the same minutes.  The prediction is still the model's: the
    scenarios' costs composed from the figures of other regions and processes.
    Random reads are priced by this CPU's read timing scaled by the calibration's
    random-read points of the size nearest the scenarios' (read_scale_of(); the
    scale is in the result's metadata).
    Each row's ratio is the median of the rounds' own ratios: each round's runs
    against the prediction priced with that round's figures alone (reprice()),
    so that the drift from round to round cancels too; measured and predicted
    are the medians over the whole run.
    Returns (the calibration, the validation); raises as calibrate() and validate().
    """
    cal_cfg = cal_cfg or cal.CalibrationConfig()
    cfg = cfg or ValidationConfig()
    todo = _scenarios_to_run(cfg, only, root)
    t0 = time.perf_counter()
    knobs = procfs.read_thp_knobs(root)
    keys = tuple(s.key for s in todo)
    if progress:
        progress(f"simulating {len(todo)} scenarios (the paths the real runs must take)", 0, 1)
    paths = predict_isolated(cfg, DEFAULT_PROFILE, {}, knobs, keys)     # sim deltas: the same with any profile
    runs: dict[str, list[list[tuple[float, dict]]]] = {k: [] for k in keys}      # per round
    checked: dict[str, list[str]] = {}

    def one_run(sc: Scenario, real: _Real, i: int) -> None:
        got, checked[sc.key] = _measured(sc, real, paths[sc.key], attempts=1)    # run_step() retries
        while len(runs[sc.key]) <= i:
            runs[sc.key].append([])
        runs[sc.key][i] += got

    def between(i: int, rounds: int) -> "cal.Steps":
        real = _Real(replace(cfg, repeats=1, fork_repeats=-(-cfg.fork_repeats // rounds)), root)
        return [(f"{sc.label} ({i + 1}/{rounds})", lambda sc=sc: one_run(sc, real, i)) for sc in todo]

    res = cal.calibrate(cal_cfg, progress=progress, root=root, between=between)
    scale = read_scale_of(list(res.lab.get("random_reads", {}).get("points", {}).values()), seed=cal_cfg.seed,
                          size=cfg.random_size)
    preds = predict_isolated(cfg, res.profile, res.lab, knobs, keys, read_scale=scale)
    timed = machine_read_timing() is not None
    memset = cal.lab_extras(res.lab)["memset_2m_ns"]
    rows = []
    for sc in todo:
        ratios = []
        for rnd, got in zip(res.rounds, runs[sc.key]):
            if not got:
                continue
            r_scale = read_scale_of(rnd.random_points, seed=cal_cfg.seed, size=cfg.random_size) if timed else scale
            pred = reprice(preds[sc.key], rnd.profile, rnd.extras.get("memset_2m_ns", memset) / memset,
                           r_scale / scale)
            ratios.append(pred / float(statistics.median(t for t, _ in got)))
        row = _row(sc, cfg, preds[sc.key], [x for got in runs[sc.key] for x in got], checked[sc.key])
        row.round_ratios = ratios
        rows.append(row)
    meta = {**res.lab["metadata"], "probe": res.lab.get("probe"), "interleaved": True,
            "read_scale": round(scale, 4)}
    out = ValidationResult(rows=rows, profile=res.profile, metadata=meta, knobs=knobs, config=cfg,
                           random_model=cal.random_model(res.lab).to_dict(), elapsed_s=time.perf_counter() - t0)
    return res, out
