"""The latency model (thpcow.machine.latency): profiles, pricing vmstat deltas, latency histograms."""

from __future__ import annotations

import json

import pytest

from thpcow.machine.latency import (
    DEFAULT_PROFILE, HDR_AVAILABLE, CalibrationProfile, LatencyHistogram, LatencyRecorder, cost_vmstat_delta,
    fork_hints,
)

US = 1000.0
M2 = 2 << 20


# -- profiles -----------------------------------------------------------------------------------
def test_default_profile_has_the_calibration_numbers():
    p = DEFAULT_PROFILE
    assert p.fault_4k_zero_ns == pytest.approx(1530)
    assert p.fault_thp_zero_ns == pytest.approx(221_000)
    assert p.split_pmd_ns == pytest.approx(8_880)
    assert p.copy_2m_ns == pytest.approx(166_000)
    assert p.collapse_ns == pytest.approx(169_000)
    assert p.fork_pmd_ns == pytest.approx(918, rel=0.01)
    assert p.fork_pte_ns * 512 + p.fork_pte_table_ns == pytest.approx(34_304)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_profile_round_trip(tmp_path, suffix):
    p = CalibrationProfile(name="other", source='say "hi" \\ there', fault_4k_zero_ns=1234.5, collapse_ns=1)
    path = p.save(tmp_path / f"profile{suffix}")
    assert CalibrationProfile.load(path) == p
    if suffix == ".json":
        assert json.loads(path.read_text())["fault_4k_zero_ns"] == 1234.5


def test_profile_file_with_some_fields(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('name = "fast"\nfault_thp_zero_ns = 50000\n')
    p = CalibrationProfile.load(path)
    assert p.name == "fast" and p.fault_thp_zero_ns == 50_000.0
    assert p.cow_4k_ns == DEFAULT_PROFILE.cow_4k_ns


@pytest.mark.parametrize("text, match", [
    ("fault_thp_zero = 5\n", "field 'fault_thp_zero': not a profile field"),
    ("cow_4k_ns = -1\n", "field 'cow_4k_ns'"),
    ('cow_4k_ns = "fast"\n', "field 'cow_4k_ns'"),
    ("cow_4k_ns = true\n", "field 'cow_4k_ns'"),
    ("name = 3\n", "field 'name'"),
    ("cow_4k_ns = \n", "cannot parse"),
])
def test_bad_profile_files_name_the_field(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        CalibrationProfile.load(path)


# -- pricing vmstat deltas ----------------------------------------------------------------------------
@pytest.mark.parametrize("delta, hints, expect_us", [
    # first touch of a THP region: one fault allocating and clearing 2 MiB
    ({"pgfault": 1, "thp_fault_alloc": 1}, None, 221),
    # 512 4 KiB zero-fill faults (calibration: 931 us per 2 MiB at the mean, 783 at p50)
    ({"pgfault": 512}, None, 512 * 1.53),
    # first COW write into a shared PMD-mapped THP: split + 4 KiB COW = 10.7 us
    ({"pgfault": 1, "thp_split_pmd": 1, "sim_cow_pages": 1, "sim_cow_bytes": 4096}, None, 10.7 - 1.82 + 1.80),
    # the thp_cow series: one fault, a new THP (alloc + clear) and a 2 MiB copy
    ({"pgfault": 1, "thp_fault_alloc": 1, "sim_huge_cow": 1, "sim_cow_bytes": M2}, None, 221 + 166),
    # pre-5.8 fallback: 512 pages copied inside one fault
    ({"pgfault": 1, "sim_cow_pages": 512, "sim_cow_bytes": M2}, None, 1.80 + 511 * 0.299),
    # write after the child exited: reuse faults, no copy
    ({"pgfault": 10, "pgreuse": 10}, None, 10 * 0.70),
    # reads of never-touched memory: the zero page (vmstat cannot tell; a hint can)
    ({"pgfault": 4}, {"zero_page_reads": 4}, 4 * 0.61),
    ({"pgfault": 1}, {"thp_reuse": 1}, 8.0),
    # MADV_COLLAPSE of one PTE-mapped 2 MiB
    ({"thp_collapse_alloc": 1, "sim_collapse_bytes": M2, "pgfault": 0}, None, 169),
    # fork of a 1 GiB THP-backed process: 160 us + 512 PMDs
    ({}, {"forks": 1, "fork_pmds": 512, "fork_pte_tables": 0}, 160 + 470),
    ({"pswpout": 2, "pswpin": 1, "nr_tlb_remote_flush": 3}, {"compact_pages": 5}, 40 + 30 + 6 + 10),
    # a swap-in is a major fault: priced as the swap-in alone, not also as a zero-fill fault
    ({"pgfault": 3, "pgmajfault": 1, "pswpin": 1}, None, 30 + 2 * 1.53),
    # direct compaction that migrated 12 pages, then the THP fault it made possible
    ({"pgfault": 1, "thp_fault_alloc": 1, "compact_stall": 1, "compact_success": 1,
      "pgmigrate_success": 12, "sim_compact_pages": 12}, None, 221 + 12 * 2.0),
    ({"nr_anon_pages": -512, "thp_deferred_split_page": 1}, None, 0),
])
def test_cost_of_known_deltas(delta, hints, expect_us):
    cost = cost_vmstat_delta(delta, hints=hints)
    assert cost.total_ns / US == pytest.approx(expect_us, rel=1e-9, abs=1e-9)
    assert cost.total_ns == pytest.approx(sum(cost.parts_ns.values()))
    assert DEFAULT_PROFILE.fault_cost_ns(delta, hints) == pytest.approx(cost.total_ns)


def test_cost_uses_the_given_profile():
    slow = CalibrationProfile(fault_thp_zero_ns=4_713_000)          # calibration.md "cold" THP fault
    assert cost_vmstat_delta({"pgfault": 1, "thp_fault_alloc": 1}, slow).total_ns == 4_713_000
    assert "fault_thp_zero 1 x" in str(cost_vmstat_delta({"pgfault": 1, "thp_fault_alloc": 1}, slow))


def test_cost_rejects_bad_input():
    with pytest.raises(ValueError, match="hint 'forkz'"):
        cost_vmstat_delta({}, hints={"forkz": 1})
    with pytest.raises(ValueError, match="'pgfault': negative"):
        cost_vmstat_delta({"pgfault": -1})


def test_cost_of_a_simulated_kernel_operation():
    """The parent's first write into a shared THP after fork, as the simulated kernel counts it."""
    from thpcow.kernel import Kernel
    from thpcow.kernel.vmstat import delta

    from conftest import thp_region

    k = Kernel(ram=1 << 30, seed=0)
    p = k.spawn()
    a = thp_region(p, 4 << 20, populate=False)
    before = k.vmstat_snapshot()
    p.write(a, 4 << 20, token=1)
    first_touch = cost_vmstat_delta(delta(k.vmstat_snapshot(), before))
    assert first_touch.events["fault_thp_zero"] == 2
    assert first_touch.total_ns == pytest.approx(2 * 221_000)
    hints = fork_hints(p)
    assert hints == {"forks": 1, "fork_pmds": 2, "fork_pte_tables": 0, "fork_ptes": 0}
    p.fork()
    before = k.vmstat_snapshot()
    p.write(a + 4096, 1, token=2)
    cost = cost_vmstat_delta(delta(k.vmstat_snapshot(), before))
    assert cost.events["split_pmd"] == 1 and cost.events["cow_4k"] == 1
    assert cost.total_ns / US == pytest.approx(10.68)


# -- histograms -----------------------------------------------------------------------------------
BACKENDS = [pytest.param(False, id="hdr" if HDR_AVAILABLE else "fallback"), pytest.param(True, id="log-buckets")]


@pytest.mark.parametrize("fallback", BACKENDS)
def test_histogram_percentiles_on_known_data(fallback):
    h = LatencyHistogram(fallback=fallback)
    for v in range(1, 1001):
        h.record(v * 1000)                   # 1 us .. 1 ms
    s = h.summary()
    assert s["count"] == 1000
    assert s["p50"] == pytest.approx(500_000, rel=0.011)
    assert s["p99"] == pytest.approx(990_000, rel=0.011)
    assert s["p99.9"] == pytest.approx(999_000, rel=0.011)
    assert s["max"] == pytest.approx(1_000_000, rel=0.001)
    assert s["mean"] == pytest.approx(500_500, rel=0.001)


@pytest.mark.parametrize("fallback", BACKENDS)
def test_histogram_tail_and_empty(fallback):
    h = LatencyHistogram(fallback=fallback)
    assert h.summary()["p99"] == 0.0 and h.max() == 0.0
    h.record(1_800, count=999)               # 999 COW faults ...
    h.record(10_700)                         # ... and one that split a PMD
    assert h.percentile(50) == pytest.approx(1_800, rel=0.011)
    assert h.percentile(99.9) == pytest.approx(1_800, rel=0.011)
    assert h.percentile(100) == pytest.approx(10_700, rel=0.011)
    assert h.max() == pytest.approx(10_700, rel=0.001)


def test_hdrhistogram_is_used_when_installed():
    assert LatencyHistogram().backend == ("hdrhistogram" if HDR_AVAILABLE else "log-buckets")


def test_recorder_prices_and_records_operations(capsys):
    rec = LatencyRecorder()
    rec.record_delta("store", {"pgfault": 1, "thp_split_pmd": 1, "sim_cow_pages": 1, "sim_cow_bytes": 4096})
    for _ in range(9):
        rec.record_delta("store", {"pgfault": 1, "sim_cow_pages": 1, "sim_cow_bytes": 4096})
    rec.record_delta("fork", {}, hints={"forks": 1, "fork_pmds": 512}, extra_ns=1000)
    s = rec.summary()
    assert s["store"]["count"] == 10
    assert s["store"]["p50"] == pytest.approx(1_800, rel=0.011)
    assert s["store"]["max"] == pytest.approx(10_680, rel=0.001)
    assert s["fork"]["max"] == pytest.approx(631_000, rel=0.001)
    rec.print_summary()
    out = capsys.readouterr().out
    assert "store" in out and "p99.9 us" in out
