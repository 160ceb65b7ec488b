"""The read-timing model (machine/tlb.py read_ns), its fit, and the read sweeps of lab/tlbmeasure.py.

Model tests run anywhere; the ``realkernel`` ones measure a few small regions
of this process on the running kernel (its smaps line) and skip without THP.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from conftest import skip_without_real_thp

from thpcow.lab import tlbmeasure as tm
from thpcow.machine.presets import (
    READ_SWEEPS, READ_TIMINGS, PresetError, get_preset, get_read_timing, read_timing_for_cpu, sweep_cases,
)
from thpcow.machine.tlb import (
    PAGE_SHIFT_2M, PAGE_SHIFT_4K, ReadTiming, cache_hit_ratio, read_ns, read_rates,
)

MiB = 1 << 20
NAME = "intel-emr-kvm"


@pytest.fixture(scope="module")
def fitted():
    t = get_read_timing(NAME)
    return t, get_preset(t.tlb_preset)


def pred(t, knobs, pattern, backing, size_mib):
    return tm.predict_case(t, knobs, pattern, backing, size_mib, accesses=60_000)["ns"]


# -- the form ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["gather", "chase", "seq"])
@pytest.mark.parametrize("backing", ["4k", "thp"])
def test_predicted_time_grows_with_the_region(fitted, pattern, backing):
    t, knobs = fitted
    sizes = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    ns = [pred(t, knobs, pattern, backing, s) for s in sizes]
    assert all(b >= a * 0.999 for a, b in zip(ns, ns[1:])), list(zip(sizes, ns))
    assert ns[-1] > ns[0]


@pytest.mark.parametrize("pattern", ["gather", "chase"])
def test_thp_is_faster_than_4k_past_the_4k_tlb_reach(fitted, pattern):
    t, knobs = fitted
    reach_4k = knobs.l2_entries * 4096 // MiB                  # 8 MiB of 4 KiB entries in the STLB
    for size in (4 * reach_4k, 64 * reach_4k, 512 * reach_4k):
        p4 = tm.predict_case(t, knobs, pattern, "4k", size, accesses=60_000)
        ph = tm.predict_case(t, knobs, pattern, "thp", size, accesses=60_000)
        assert ph["ns"] < p4["ns"], (size, p4, ph)
        assert ph["translation"] < 0.2 * p4["translation"]
        assert ph["data"] == pytest.approx(p4["data"])        # the same lines; only translation differs
    # The TLB cost of 4 KiB pages grows with the region (PTE lines fall out of the caches).
    gaps = [pred(t, knobs, pattern, "4k", s) - pred(t, knobs, pattern, "thp", s) for s in (64, 512, 4096)]
    assert gaps[0] < gaps[1] < gaps[2], gaps


def test_model_is_not_linear_in_the_walks(fitted):
    """Doubling the region does not scale the translation time by the ratio of walks: the cost of one
    PTE reference itself grows once the page tables outgrow the caches."""
    t, knobs = fitted
    per_ref = []
    for s in (64, 4096):
        r = read_rates(knobs, s * MiB, PAGE_SHIFT_4K, 60_000)
        p = read_ns(t, knobs, "chase", s * MiB, r, PAGE_SHIFT_4K)
        per_ref.append((p["translation"] - r["l2_hits"] * knobs.l2_hit_cycles / knobs.cpu_ghz) / r["walks"])
    assert per_ref[1] > 1.5 * per_ref[0], per_ref


def test_cache_hit_ratio():
    assert cache_hit_ratio(4 * MiB, 8 * MiB) == 1.0
    assert cache_hit_ratio(16 * MiB, 8 * MiB) == pytest.approx(0.5)
    assert cache_hit_ratio(16 * MiB, 8 * MiB, 2.0) == pytest.approx(0.25)


def test_read_rates_are_deterministic_and_see_the_page_size(fitted):
    _, knobs = fitted
    a = read_rates(knobs, 256 * MiB, PAGE_SHIFT_4K, 40_000, seed=3)
    b = read_rates(knobs, 256 * MiB, lambda v: np.full(len(v), PAGE_SHIFT_4K, np.uint8), 40_000, seed=3)
    assert a == b
    h = read_rates(knobs, 256 * MiB, PAGE_SHIFT_2M, 40_000, seed=3)
    assert a["pte_refs"] > 0.9 and h["pte_refs"] == 0 and h["walks"] < 0.01   # 128 PMDs fit the STLB
    assert read_rates(knobs, 256 * MiB, PAGE_SHIFT_4K, 40_000, seed=4) != a


def test_bad_timing_and_pattern_are_refused(fitted):
    t, knobs = fitted
    with pytest.raises(ValueError, match="pattern"):
        read_ns(t, knobs, "scatter", MiB, {"l2_hits": 0, "pte_refs": 0, "pmd_refs": 0})
    with pytest.raises(ValueError, match="'mlp'"):
        ReadTiming(mlp=0.0).validate()
    with pytest.raises(ValueError, match="'dram_ns'"):
        ReadTiming(dram_ns=-1.0).validate()
    with pytest.raises(PresetError, match="unknown"):
        get_read_timing("no-such-cpu")
    for timing in READ_TIMINGS.values():
        timing.validate()
        get_preset(timing.tlb_preset)


def test_cpu_lookup():
    assert read_timing_for_cpu("GenuineIntel", "6", "207").name == NAME
    assert read_timing_for_cpu("AuthenticAMD", "25", "17") is None


def test_cpu_identity_from_a_fake_root(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
                                           "model\t\t: 207\nmodel name\t: x\n\nprocessor\t: 1\nmodel\t: 1\n")
    assert tm.cpu_identity(str(tmp_path)) == ("GenuineIntel", "6", "207")
    t, knobs = tm.machine_timing(str(tmp_path))
    assert t.name == NAME and knobs.name == t.tlb_preset
    assert tm.machine_timing(str(tmp_path / "nowhere")) == (None, None)


# -- the fit -----------------------------------------------------------------------------------
def _median_error(t, knobs, cases):
    return statistics.median(abs(r["error"]) for r in tm.errors(t, knobs, cases))


def test_stored_timing_reproduces_its_sweep(fitted):
    """The stored parameters predict the sweep they were fitted to, and the sizes left out of the fit."""
    t, knobs = fitted
    cases = sweep_cases(NAME)
    assert len(cases) == sum(len(r) for r in READ_SWEEPS[NAME].values())
    fit_set, check_set = tm.split_sets(cases)
    assert {c["size_mib"] for c in fit_set} == {4, 16, 64, 256, 1024, 4096}
    assert _median_error(t, knobs, fit_set) < 0.10
    assert _median_error(t, knobs, check_set) < 0.10


def test_fit_recovers_a_known_timing(fitted):
    """Cases made by a known timing are fitted back from another start to (nearly) no error."""
    truth, knobs = fitted
    cases = [{"pattern": p, "backing": b, "size_mib": s, "ns": pred(truth, knobs, p, b, s)}
             for p in ("gather", "chase", "seq") for b in ("4k", "thp") for s in (4, 16, 64, 256, 1024, 4096)]
    start = ReadTiming(tlb_preset=knobs.name)
    assert _median_error(start, knobs, cases) > 0.05
    got = tm.fit_timing(cases, knobs, start=start, restarts=4)
    assert _median_error(got, knobs, cases) < 0.03
    assert got.dram_ns == pytest.approx(truth.dram_ns, rel=0.15)
    assert got.tlb_preset == knobs.name


def test_nelder_mead_finds_a_minimum():
    x = tm.nelder_mead(lambda v: float((v[0] - 1.5) ** 2 + 3 * (v[1] + 2) ** 2), np.array([0.0, 0.0]))
    assert x == pytest.approx([1.5, -2.0], abs=1e-3)


def test_split_sets_alternate_sizes():
    cases = [{"size_mib": s} for s in (64, 4, 16, 4, 256)]
    fit_set, check_set = tm.split_sets(cases)
    assert [c["size_mib"] for c in fit_set] == [64, 4, 4, 256]     # sizes 4, 16, 64, 256: odd ones + last
    assert [c["size_mib"] for c in check_set] == [16]


# -- the sweep's pieces ------------------------------------------------------------------------
def test_chase_is_one_cycle_through_distinct_lines():
    u64 = np.zeros(4 * MiB // 8, dtype=np.uint64)
    for n in (1000, 10 ** 6):                               # fewer lines than the region has; all of them
        lines = tm.chase_lines(4 * MiB, n, 0)
        assert len(np.unique(lines)) == len(lines) == min(n, 4 * MiB // 64)
        start = tm.link_chase(u64, lines)
        seen = {start}
        i = start
        for _ in range(len(lines) - 1):
            i = int(u64[i])
            seen.add(i)
        assert len(seen) == len(lines) and int(u64[i]) == start
        assert tm.chase(u64, start, len(lines)) == start


def test_sweep_config_is_checked():
    with pytest.raises(ValueError, match="sizes_mib"):
        tm.SweepConfig(sizes_mib=(3,)).check()
    with pytest.raises(ValueError, match="patterns"):
        tm.SweepConfig(patterns=("scatter",)).check()
    with pytest.raises(ValueError, match="backings"):
        tm.SweepConfig(backings=("1g",)).check()


def test_dtlb_counter_says_why_without_a_pmu(tmp_path):
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/perf_event_paranoid").write_text("2\n")
    (tmp_path / "sys/bus/event_source/devices/software").mkdir(parents=True)
    ok, why = tm.dtlb_counter_available(str(tmp_path))
    assert not ok and "PMU is not exposed" in why and "software" in why
    ok, why = tm.dtlb_counter_available(str(tmp_path / "nowhere"))
    assert not ok and "perf_event_paranoid" in why


def test_dtlb_counter_on_this_machine():
    """Counts this process's dTLB misses where the PMU is readable; skips saying why elsewhere."""
    ok, why = tm.dtlb_counter_available()
    if not ok:
        assert why
        pytest.skip(f"no dTLB counter here: {why}")
    u64 = np.ones(256 * MiB // 8, dtype=np.uint64)
    idx = tm.gather_indices(256 * MiB, 200_000, 0)
    c = tm.DtlbCounter()
    try:
        with c:
            np.take(u64, idx)
    finally:
        c.close()
    assert c.count > 10_000


def test_random_read_validation_uses_the_timing(fitted):
    from thpcow.lab import calibrate as cal
    from thpcow.lab import validate as val

    t, _ = fitted
    model = cal.reference_random_model()
    size, m = 256 * MiB, 1_000_000
    thp = val.predict_random_reads(size, "thp", m, model, sim_accesses=40_000, read_timing=t)
    again = val.predict_random_reads(size, "thp", m, model, sim_accesses=40_000, read_timing=t)
    split = val.predict_random_reads(size, "split", m, model, sim_accesses=40_000, read_timing=t)
    assert thp.ns == again.ns and split.ns > thp.ns
    assert thp.parts_ns["memory"] == pytest.approx(split.parts_ns["memory"])
    assert thp.ns == pytest.approx(m * pred(t, get_preset(t.tlb_preset), "gather", "thp", 256), rel=0.02)


# -- the running kernel ------------------------------------------------------------------------

@pytest.mark.realkernel
@pytest.mark.parametrize("backing", ["4k", "thp", "split"])
def test_measure_a_small_region(real_kernel, backing):
    from thpcow.lab import calibrate as cal

    cfg = tm.SweepConfig(sizes_mib=(8,), gather_accesses=100_000, chase_steps=50_000, repeats=3,
                         counters=False)
    for attempt in range(3):                     # another process may hold the huge pages a moment
        with cal.Region(8 * MiB, "4k" if backing == "4k" else "thp") as r:
            tm.prepare(r, backing)
            try:
                res = tm.measure_region(r, backing, tm.PATTERNS, cfg)
                break
            except tm.WrongBackingError:
                if attempt == 2:
                    raise
    by = {c.pattern: c for c in res}
    assert set(by) == set(tm.PATTERNS)
    assert by["gather"].anon_huge_kb == (8 * 1024 if backing == "thp" else 0)
    for c in res:
        assert len(c.runs_ns) == 3 and c.ns == pytest.approx(statistics.median(c.runs_ns), abs=1e-3) and c.ns > 0
        assert c.extra["wall_ns"] > 0
    assert by["chase"].accesses == 50_000 and by["seq"].accesses == 8 * MiB // 8
    # A dependent load waits for the previous one; a sequential word is streamed.
    assert by["chase"].ns > by["gather"].ns > by["seq"].ns


@pytest.mark.realkernel
def test_wrong_backing_is_refused(real_kernel):
    from thpcow.lab import calibrate as cal

    with cal.Region(4 * MiB, "4k") as r:
        tm.prepare(r, "4k")
        with pytest.raises(tm.WrongBackingError, match="AnonHugePages"):
            tm.measure_region(r, "thp", ("seq",), tm.SweepConfig(repeats=1))


@pytest.mark.realkernel
def test_llc_probe_and_a_probed_sweep(real_kernel):
    probe = tm.LlcProbe(steps=5_000)
    try:
        best = probe.settle(tries=3, pause_s=0.0)
        assert 0 < best < 10_000 and probe.best == best
        ok, ns = probe.quiet(ratio=1e9)
        assert ok and ns >= probe.best
    finally:
        probe.close()


@pytest.mark.realkernel
def test_a_probed_sweep():
    """A whole (tiny) sweep: both regions measured together, the probe gating every timed run
    (sweep() takes the lab lock itself)."""
    skip_without_real_thp()
    res = tm.sweep(tm.SweepConfig(sizes_mib=(4,), backings=("4k", "thp"), gather_accesses=50_000,
                                  chase_steps=20_000, repeats=2, probe_wait_s=0.2))
    assert [(c["pattern"], c["backing"]) for c in res["cases"]] == [
        (p, b) for b in ("4k", "thp") for p in tm.PATTERNS]
    assert all(c["extra"]["probe_ns"] > 0 and c["ns"] > 0 for c in res["cases"])
    assert res["metadata"]["probe_best_ns"] > 0 and res["metadata"]["sizes_dropped_mib"] == []
