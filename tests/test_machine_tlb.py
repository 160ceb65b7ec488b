"""The TLB model (thpcow.machine.tlb): hand-computed access sequences, invalidation, numba == reference, presets.

The sequences run on tiny TLBs (a 2-entry L1 per page size, a 4-entry 2-way
L2, a 2-entry PDE cache) and assert exact counters, as drcachesim's unit
tests do; every one runs on both engines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thpcow.machine import (
    PRESETS, Metric, PresetError, ReferenceTlbSimulator, SimMetric, Tlb, TlbKnobs, TlbSimulator, WalkCache,
    get_preset, load_preset, page_shifts_of, save_preset,
)

BASE = 0x7F00_0000_0000            # 2 MiB aligned; 4 KiB page numbers from here are even
K4 = 4096
M2 = 2 << 20
ENGINES = [TlbSimulator, ReferenceTlbSimulator]


def tiny(**kw) -> TlbKnobs:
    knobs = dict(name="tiny", l1_4k_entries=2, l1_4k_assoc=2, l1_2m_entries=2, l1_2m_assoc=2,
                 l2_entries=4, l2_assoc=2, pwc_entries=2, pwc_assoc=2)
    knobs.update(kw)
    return TlbKnobs(**knobs)


def pages(sim, nums, shift=12, asid=0, base=BASE):
    """Access 4 KiB page ``n`` (or 2 MiB page when shift=21) of ``base`` for each n, in order."""
    v = np.array([base + (n << shift) for n in nums], dtype=np.uint64)
    sim.simulate(v, None, shift, asid)


def counts(sim, level):
    return tuple(sim.get_metric(m, level) for m in (Metric.HITS, Metric.MISSES, Metric.EVICTIONS))


@pytest.mark.parametrize("engine", ENGINES)
class TestSequences:
    def test_cold_misses_then_hits(self, engine):
        sim = engine(tiny())
        pages(sim, [0, 1])              # two cold misses everywhere; same 2 MiB region
        assert counts(sim, "l1d_4k") == (0, 2, 0)
        assert counts(sim, "l2") == (0, 2, 0)
        assert sim.get_metric("walks_pte_pwc_miss") == 1     # first walk fills the PDE cache
        assert sim.get_metric("walks_pte_pwc_hit") == 1      # second walk finds the PMD entry
        assert sim.get_metric(SimMetric.WALK_MEM_REFS) == 2 + 1
        pages(sim, [0, 1, 1])
        assert counts(sim, "l1d_4k") == (3, 2, 0)
        assert sim.get_metric("accesses") == 5

    def test_lru_eviction_order(self, engine):
        sim = engine(tiny())
        # L1 (2 ways): A B A C -> C evicts B (least recently used), not A.
        pages(sim, [0, 1, 0, 2])
        assert counts(sim, "l1d_4k") == (1, 3, 1)
        pages(sim, [0])                  # A still there
        assert counts(sim, "l1d_4k") == (2, 3, 1)
        pages(sim, [1])                  # B was evicted: miss; evicts C (LRU now)
        assert counts(sim, "l1d_4k") == (2, 4, 2)
        pages(sim, [0])
        assert counts(sim, "l1d_4k") == (3, 4, 2)
        assert sorted(v for _, v, _ in sim.contents("l1d_4k")) == [BASE, BASE + K4]

    def test_l2_hit_after_l1_eviction(self, engine):
        sim = engine(tiny())
        pages(sim, [0, 1, 2])            # L1 keeps 1, 2; L2 set 0 = {0, 2}, set 1 = {1}
        pages(sim, [0])
        assert counts(sim, "l1d_4k") == (0, 4, 2)
        assert counts(sim, "l2") == (1, 3, 0)
        assert sim.get_metric("walks_pte_pwc_miss") + sim.get_metric("walks_pte_pwc_hit") == 3

    def test_l2_set_lru_eviction(self, engine):
        sim = engine(tiny())
        pages(sim, [0, 2, 4])            # all in L2 set 0 (2 ways): 4 evicts 0
        pages(sim, [0])                  # L1 holds 2, 4: miss; L2 miss: a fourth walk
        assert counts(sim, "l2") == (0, 4, 2)
        assert sim.get_metric("walks_pte_pwc_miss") + sim.get_metric("walks_pte_pwc_hit") == 4

    def test_pmd_split_turns_hits_into_misses(self, engine):
        sim = engine(tiny())
        offsets = [k * 7 * K4 for k in range(8)]          # 8 distinct 4 KiB pages of one 2 MiB region
        v = np.array([BASE + o for o in offsets], dtype=np.uint64)
        sim.simulate(v, None, 21, 0)                      # PMD-mapped THP: one entry covers all 8
        assert counts(sim, "l1d_2m") == (7, 1, 0)
        assert sim.get_metric("walks_pmd") == 1
        # COW splits the PMD: the kernel flushes the 2 MiB translation.
        removed = sim.invalidate_page(0, BASE >> 21, M2)
        assert removed == 2                               # the L1 2M entry and the L2 entry
        sim.simulate(v, None, 12, 0)                      # now PTE-mapped: 8 different 4 KiB pages
        assert counts(sim, "l1d_4k") == (0, 8, 6)
        assert sim.get_metric("walks_pte_pwc_miss") == 1
        assert sim.get_metric("walks_pte_pwc_hit") == 7
        assert sim.get_metric(SimMetric.WALK_MEM_REFS) == 1 + 2 + 7
        assert sim.get_metric("shootdowns") == 1

    def test_stale_2m_entry_is_not_used_for_4k_accesses(self, engine):
        sim = engine(tiny())
        sim.simulate(np.array([BASE], dtype=np.uint64), None, 21, 0)
        sim.simulate(np.array([BASE], dtype=np.uint64), None, 12, 0)   # split without a flush
        assert counts(sim, "l1d_4k") == (0, 1, 0)
        assert counts(sim, "l1d_2m") == (0, 1, 0)

    def test_unified_l1_holds_both_sizes(self, engine):
        sim = engine(tiny(l1_unified=True))
        assert list(sim.levels) == ["l1d", "l2", "pwc"]
        sim.simulate(np.array([BASE, BASE + M2], dtype=np.uint64), None,
                     np.array([21, 12], dtype=np.uint8), 0)
        sim.simulate(np.array([BASE + 3 * K4], dtype=np.uint64), None, 21, 0)   # same 2 MiB page
        assert counts(sim, "l1d") == (1, 2, 0)

    def test_invalidate_page_4k_keeps_pde_cache(self, engine):
        sim = engine(tiny())
        pages(sim, [0])
        assert sim.invalidate_page(0, (BASE >> 12), K4) == 2      # L1 and L2 entries
        assert sim.get_metric(Metric.INVALIDATIONS, "l1d_4k") == 1
        assert sim.get_metric(Metric.INVALIDATIONS, "pwc") == 0
        pages(sim, [0])
        assert counts(sim, "l1d_4k") == (0, 2, 0)
        assert sim.get_metric("walks_pte_pwc_hit") == 1            # the PMD entry survived

    def test_invalidate_range_drops_pde_cache_of_the_region(self, engine):
        sim = engine(tiny(l1_4k_entries=4, l1_4k_assoc=4))
        pages(sim, [0, 1, 512, 513])                # two pages in each of two 2 MiB regions
        removed = sim.invalidate_range(0, BASE, BASE + M2)
        assert removed == 2 + 2 + 1                 # L1: 2, L2: 2, PDE cache: 1
        pages(sim, [512, 0])
        assert counts(sim, "l1d_4k") == (1, 5, 0)   # 512 still cached, 0 gone
        assert sim.get_metric("walks_pte_pwc_miss") == 3    # region 0's PMD entry must be re-read

    def test_flush_asid_only_touches_that_asid(self, engine):
        sim = engine(tiny(l1_4k_entries=4, l1_4k_assoc=4))
        pages(sim, [0], asid=1)
        pages(sim, [0], asid=2)                     # same address, other address space: a miss
        assert counts(sim, "l1d_4k") == (0, 2, 0)
        sim.flush_asid(1)
        pages(sim, [0], asid=2)
        pages(sim, [0], asid=1)
        assert counts(sim, "l1d_4k") == (1, 3, 0)
        assert sim.get_metric("shootdowns") == 1
        sim.flush_all()
        assert sim.contents("l1d_4k") == []

    def test_skip_warmup_and_sim_refs(self, engine):
        sim = engine(tiny(skip_refs=3, warmup_refs=5, sim_refs=10))
        v = np.array([BASE + (i % 4) * K4 for i in range(30)], dtype=np.uint64)
        sim.simulate(v[:7], None, 12, 0)            # 3 skipped, 4 warm-up
        sim.simulate(v[7:], None, 12, 0)            # 1 warm-up, 10 simulated, 12 ignored
        assert (sim.refs_skipped, sim.refs_warmup, sim.refs_simulated, sim.refs_ignored) == (3, 5, 10, 12)
        assert sim.get_metric("accesses") == 10
        assert sim.stats_at_reset["accesses"] == 5
        hits, misses, _ = counts(sim, "l1d_4k")
        assert hits + misses == 10

    def test_reads_writes_and_results(self, engine):
        sim = engine(tiny())
        v = np.array([BASE, BASE + K4, BASE], dtype=np.uint64)
        sim.simulate(v, np.array([True, False, True]), 12, 0)
        assert (sim.get_metric("reads"), sim.get_metric("writes")) == (1, 2)
        text = sim.results_text()
        for name in ("l1d_4k", "l1d_2m", "l2", "pwc", "Page walks", "Shootdowns"):
            assert name in text
        json.dumps(sim.stats_dict())
        assert sim.translation_ns() == pytest.approx(
            (0 * 7 + sim.get_metric("walk_mem_refs") * 40) / 3.0)


def test_bad_accesses_are_rejected_before_simulating():
    sim = TlbSimulator(tiny())
    v = np.array([BASE, BASE + K4], dtype=np.uint64)
    with pytest.raises(ValueError, match="page_shift: 13 at index 1"):
        sim.simulate(v, None, np.array([12, 13], dtype=np.uint8), 0)
    with pytest.raises(ValueError, match="vaddr"):
        sim.simulate(np.array([1 << 47], dtype=np.uint64), None, 12, 0)
    with pytest.raises(ValueError, match="asid"):
        sim.simulate(v, None, 12, -1)
    with pytest.raises(ValueError, match="is_write"):
        sim.simulate(v, np.array([True]), 12, 0)
    assert sim.get_metric("accesses") == 0
    with pytest.raises(ValueError, match="size"):
        sim.invalidate_page(0, 1, 8192)
    with pytest.raises(ValueError, match="asid"):
        sim.flush_asid(1 << 20)
    with pytest.raises(ValueError, match="range"):
        sim.invalidate_range(0, BASE + K4, BASE)


def test_knob_errors_name_the_field():
    with pytest.raises(ValueError, match="l2_assoc"):
        TlbKnobs(l2_entries=100, l2_assoc=3).validate()
    with pytest.raises(ValueError, match="power of two"):
        TlbKnobs(l2_entries=96, l2_assoc=8).validate()
    with pytest.raises(ValueError, match="cpu_ghz"):
        TlbKnobs(cpu_ghz=0).validate()


def test_devices_linked_by_parent():
    """A hierarchy built from devices, drcachesim style, behaves as the same knobs do."""
    stlb = Tlb("stlb", 4, 2, page_sizes=(K4, M2))
    l1 = [Tlb("dtlb4k", 2, 2, (K4,), parent=stlb), Tlb("dtlb2m", 2, 2, (M2,), parent=stlb)]
    a = TlbSimulator(tiny(), l1=l1, pwc=WalkCache("pde", 2, 2))
    b = TlbSimulator(tiny())
    for sim in (a, b):
        pages(sim, [0, 1, 2, 0, 3, 512])
    assert a.get_metric("misses", "stlb") == b.get_metric("misses", "l2")
    assert a.get_metric("hits", "dtlb4k") == b.get_metric("hits", "l1d_4k")
    with pytest.raises(ValueError, match="exactly one"):
        TlbSimulator(tiny(), l1=[Tlb("a", 2, 2, (K4,))])


# -- numba == reference -------------------------------------------------------------------------
def _random_program(seed: int, n: int, footprint_pages: int, nasids: int):
    rng = np.random.default_rng(seed)
    v = (BASE + rng.integers(0, footprint_pages, n) * K4 + rng.integers(0, K4, n)).astype(np.uint64)
    huge_region = rng.random(footprint_pages // 512 + 1) < 0.5
    ps = np.where(huge_region[(v - BASE) >> 21], 21, 12).astype(np.uint8)
    return v, rng.random(n) < 0.3, ps, rng.integers(0, nasids, n), rng


def _same(knobs: TlbKnobs, seed: int, n: int, footprint_pages: int, nasids: int = 3) -> None:
    v, w, ps, asid, rng = _random_program(seed, n, footprint_pages, nasids)
    a, b = TlbSimulator(knobs), ReferenceTlbSimulator(knobs)
    for lo in range(0, n, n // 5):
        hi = lo + n // 5
        for sim in (a, b):
            sim.simulate(v[lo:hi], w[lo:hi], ps[lo:hi], asid[lo:hi])
        op, x = int(rng.integers(0, 3)), int(rng.integers(0, footprint_pages))
        for sim in (a, b):
            if op == 0:
                sim.invalidate_page(x % nasids, (BASE >> 12) + x, K4)
            elif op == 1:
                sim.invalidate_range(x % nasids, BASE + x * K4, BASE + (x + 700) * K4)
            else:
                sim.flush_asid(x % nasids)
        assert a.stats_dict() == b.stats_dict()
    for level in a.levels:
        assert a.contents(level) == b.contents(level), level


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_numba_matches_reference_on_presets(preset):
    _same(get_preset(preset), seed=len(preset), n=30_000, footprint_pages=16_384)


@pytest.mark.parametrize("seed", range(4))
def test_numba_matches_reference_on_tiny_tlbs(seed):
    _same(tiny(l1_unified=bool(seed % 2)), seed=seed, n=5_000, footprint_pages=2_048)


@pytest.mark.parametrize("geometry", [
    dict(l1_unified=True, l1_4k_entries=8, l1_4k_assoc=8, l2_entries=16, l2_assoc=16, pwc_entries=4,
         pwc_assoc=4),                                          # every level fully associative
    dict(l1_4k_entries=8, l1_4k_assoc=8, l1_2m_entries=4, l1_2m_assoc=2, l2_entries=32, l2_assoc=4),
    dict(l2_entries=2048, l2_assoc=2048),                       # a large fully associative L2
    dict(l2_holds_2m=False),                                    # 2 MiB L1 misses go straight to the walk
    dict(l2_entries=0),                                         # no L2
    dict(pwc_entries=0, l1_unified=True, l1_4k_entries=4, l1_4k_assoc=4),   # no PDE cache
    dict(l1_4k_entries=4, l1_4k_assoc=1, l1_2m_entries=1, l1_2m_assoc=1, l2_entries=8, l2_assoc=1),
])
def test_numba_matches_reference_on_geometries(geometry):
    """Fully associative and set-associative devices in every position, with flushes between
    blocks: same counts, and the same entries in the same LRU order, as the reference."""
    knobs = tiny(**geometry)
    _same(knobs, seed=7, n=6_000, footprint_pages=1_024)
    v, w, ps, asid, _ = _random_program(8, 3_000, 512, 2)
    a, b = TlbSimulator(knobs), ReferenceTlbSimulator(knobs)
    for sim in (a, b):
        sim.simulate(v, w, ps, asid)
        sim.invalidate_range(1, BASE, BASE + 64 * K4)
        sim.simulate(v[:700], w[:700], ps[:700], asid[:700])
    for level in a.levels:
        assert a.contents(level) == b.contents(level), level


def test_numba_matches_reference_on_batched_flushes_resets_and_warmup():
    """invalidate_pages, flush_all, reset_stats and the skip/warmup/sim_refs counts give the
    reference's counters and LRU order."""
    knobs = tiny(l1_unified=True, l1_4k_entries=8, l1_4k_assoc=8, l2_entries=16, l2_assoc=4,
                 skip_refs=100, warmup_refs=900, sim_refs=3_000)
    v, w, ps, asid, rng = _random_program(11, 6_000, 1_024, 2)
    a, b = TlbSimulator(knobs), ReferenceTlbSimulator(knobs)
    for lo in range(0, 6_000, 1_000):
        pages = rng.integers(BASE >> 12, (BASE >> 12) + 1_024, 300)
        for sim in (a, b):
            sim.simulate(v[lo:lo + 1_000], w[lo:lo + 1_000], ps[lo:lo + 1_000], asid[lo:lo + 1_000])
            sim.invalidate_pages(lo // 1_000 % 2, pages)
        assert a.stats_dict() == b.stats_dict()
        for level in a.levels:
            assert a.contents(level) == b.contents(level), level
    assert a.stats_at_reset == b.stats_at_reset and a.stats_at_reset is not None
    for sim in (a, b):
        sim.reset_stats()
        sim.flush_all()
        sim.invalidate_range(0, BASE, 1 << 64)          # an end past 64 bits is clamped, not an error
    assert a.stats_dict() == b.stats_dict()
    assert a.get_metric("shootdowns") == 2 and all(not a.contents(level) for level in a.levels)


@pytest.mark.parametrize("engine", [TlbSimulator, ReferenceTlbSimulator])
@pytest.mark.parametrize("vpns, match", [
    ([5, 1 << 51], "vpns: page 0x8000000000000 is outside"),
    ([-1, 5], "vpns: page -0x1 is outside"),
    ([1.5], "vpns: expected integer page numbers"),
])
def test_invalidate_pages_rejects_pages_outside_user_space(engine, vpns, match):
    sim = engine(tiny())
    pages(sim, [5])
    before = sim.stats_dict()
    with pytest.raises(ValueError, match=match):
        sim.invalidate_pages(0, vpns)
    assert sim.stats_dict() == before and sim.contents("l1d_4k") == [(0, BASE + 5 * K4, K4)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2047), st.booleans(), st.integers(0, 1)),
                    min_size=1, max_size=80),
       l1_assoc=st.sampled_from([1, 2]), l2_assoc=st.sampled_from([1, 2, 4]), pwc_assoc=st.sampled_from([1, 2]),
       unified=st.booleans())
def test_numba_matches_reference_hypothesis(ops, l1_assoc, l2_assoc, pwc_assoc, unified):
    """Single accesses and flushes of every kind, on tiny TLBs whose levels are fully associative
    (one set) or set-associative: same counts and the same LRU order as the reference."""
    knobs = tiny(l1_4k_assoc=l1_assoc, l1_2m_assoc=l1_assoc, l2_assoc=l2_assoc, pwc_assoc=pwc_assoc,
                 l1_unified=unified)
    a, b = TlbSimulator(knobs), ReferenceTlbSimulator(knobs)
    for kind, page, huge, asid in ops:
        for sim in (a, b):
            if kind <= 6:
                sim.simulate(np.array([BASE + page * K4], dtype=np.uint64), None, 21 if huge else 12, asid)
            elif kind == 7:
                sim.invalidate_page(asid, (BASE >> 21) + (page >> 9), M2)
            elif kind == 8:
                sim.invalidate_page(asid, (BASE >> 12) + page, K4)
            elif kind == 9:
                sim.invalidate_range(asid, BASE + page * K4, BASE + (page + 600) * K4)
            else:
                sim.flush_asid(asid)
    assert a.stats_dict() == b.stats_dict()
    for level in a.levels:
        assert a.contents(level) == b.contents(level), level


# -- presets ------------------------------------------------------------------------------------
def test_presets_build_and_cite_a_source():
    assert len(PRESETS) >= 3
    for name in PRESETS:
        knobs = get_preset(name)
        assert knobs.source
        sim = TlbSimulator(knobs)
        pages(sim, [0, 1, 2])
        assert sim.get_metric("accesses") == 3
    zen4 = get_preset("amd-zen4-genoa")
    assert (zen4.l1_4k_entries, zen4.l2_entries, zen4.l2_assoc) == (72, 3072, 24)
    with pytest.raises(PresetError, match="unknown"):
        get_preset("pentium-4")


def test_preset_toml_round_trip(tmp_path):
    for name in PRESETS:
        path = save_preset(get_preset(name), tmp_path / f"{name}.toml")
        assert load_preset(path) == get_preset(name)


def test_preset_file_with_partial_fields(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('l1_unified = true\nl1_4k_entries = 16\nl1_4k_assoc = 16\ncpu_ghz = 2\n')
    knobs = load_preset(path)
    assert knobs.name == "mine" and knobs.l1_unified and knobs.cpu_ghz == 2
    assert knobs.l2_entries == TlbKnobs().l2_entries


@pytest.mark.parametrize("text, match", [
    ("l2_entries = \n", "not valid TOML"),
    ("l2_entriez = 64\n", "field 'l2_entriez': not a TLB knob"),
    ('l2_entries = "many"\n', "field 'l2_entries': expected int"),
    ("l1_unified = 1\n", "field 'l1_unified': expected bool"),
    ("l2_entries = true\n", "field 'l2_entries': expected int"),
    ("l2_entries = 100\nl2_assoc = 3\n", "field 'l2_assoc'"),
    ("l2_entries = 96\nl2_assoc = 8\n", "not a power of two"),
    ("pwc_entries = -4\n", "field 'pwc_entries'"),
])
def test_bad_preset_files_name_the_field(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PresetError, match=match) as err:
        load_preset(path)
    assert "bad.toml" in str(err.value)


def test_missing_preset_file(tmp_path):
    with pytest.raises(PresetError, match="cannot read"):
        load_preset(tmp_path / "absent.toml")


# -- the simulated kernel gives the page sizes ----------------------------------------------------
def test_page_shifts_follow_the_kernel_through_a_cow_split():
    from thpcow.kernel import Kernel

    from conftest import thp_region

    k = Kernel(ram=1 << 30, seed=0)
    p = k.spawn()
    a = thp_region(p, 4 << 20)
    addrs = np.array([a + i * 7 * K4 for i in range(8)], dtype=np.uint64)
    assert set(page_shifts_of(p, addrs).tolist()) == {21}
    p.fork()
    sim = TlbSimulator(tiny())
    sim.simulate(addrs, None, page_shifts_of(p, addrs), p.pid)
    split_before = k.vmstat_snapshot()["thp_split_pmd"]
    p.write(a + K4, 1, token=2)                        # COW: the parent's PMD is split
    assert k.vmstat_snapshot()["thp_split_pmd"] == split_before + 1
    sim.invalidate_page(p.pid, a >> 21, M2)
    shifts = page_shifts_of(p, addrs)
    assert set(shifts.tolist()) == {12}
    sim.simulate(addrs, None, shifts, p.pid)
    assert counts(sim, "l1d_4k") == (0, 8, 6)
    assert page_shifts_of(p, np.array([a + (2 << 20)], dtype=np.uint64)).tolist() == [21]


def test_invalidate_pages_equals_one_flush_per_page():
    """The batched flush of many 4 KiB pages removes what single-page flushes remove."""
    import numpy as np
    from thpcow.machine import TlbSimulator, get_preset

    rng = np.random.default_rng(3)
    vaddr = (rng.integers(0, 1 << 18, size=20000, dtype=np.int64) << 12).astype(np.uint64)
    shifts = np.where(rng.random(20000) < 0.3, 21, 12).astype(np.uint8)
    a, b = TlbSimulator(get_preset("amd-zen4-genoa")), TlbSimulator(get_preset("amd-zen4-genoa"))
    a.simulate(vaddr, False, shifts, 1)
    b.simulate(vaddr, False, shifts, 1)
    vpns = np.unique(rng.integers(0, 1 << 18, size=500, dtype=np.int64))
    removed_batch = a.invalidate_pages(1, vpns)
    removed_single = sum(b.invalidate_page(1, int(v), 4096) for v in vpns)
    assert removed_batch == removed_single > 0
    assert a.get_metric("shootdowns") == b.get_metric("shootdowns") == len(vpns)
    for level in a.levels:
        assert sorted(a.contents(level)) == sorted(b.contents(level))


def test_sampled_windows_estimate_within_their_error():
    """A sampled estimate of a stationary stream lands within its reported 99.7 % band of
    the exact count, and says that it is sampled."""
    import numpy as np
    import pytest
    from thpcow.machine import TlbSimulator, get_preset
    from thpcow.machine.sampling import sample_windows

    rng = np.random.default_rng(7)
    n = 2_000_000
    vaddr = (rng.integers(0, 1 << 17, size=n, dtype=np.int64) << 12).astype(np.uint64)
    shifts = np.where((vaddr >> 21) % 2 == 0, 21, 12).astype(np.uint8)
    exact = sample_windows(TlbSimulator(get_preset("amd-zen4-genoa")), vaddr, None, shifts, 1, every=1)
    assert exact.exact and exact.simulated == n
    est = sample_windows(TlbSimulator(get_preset("amd-zen4-genoa")), vaddr, None, shifts, 1,
                         window=50_000, every=8, warmup=20_000)
    assert not est.exact and est.windows == 5 and est.simulated == 250_000
    assert abs(est.walks - exact.walks) <= 3 * est.walks_stderr + 1e-3 * exact.walks
    assert "sampled 250,000 of 2,000,000" in est.describe()
    with pytest.raises(ValueError, match="window"):
        sample_windows(TlbSimulator(get_preset("amd-zen4-genoa")), vaddr, window=0)
