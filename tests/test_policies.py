"""The 2026 THP COW series and the alternatives from its review: kernel builds and userspace strategies.

Each test names the piece of the series (thp_cow v1 n/5) or the alternative it checks.
"""

from __future__ import annotations

import errno
import itertools

import numpy as np
import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_THP_COW, MADV_THP_SETUP_BASE, PAGE_SIZE,
    PR_SET_THP_DISABLE, InvariantViolation, Kernel, KernelError,
)
from thpcow.kernel import huge_memory as hm
from thpcow.kernel.constants import VM_HUGEPAGE, VM_NOHUGEPAGE as VMF_NOHUGEPAGE, VM_THP_COW
from thpcow.kernel.builds import BUILDS, parse_build
from thpcow.kernel.memory import FAULT_FLAG_UNSHARE, VmFault
from thpcow.experiments.policies import parse_policy, policy_names
from thpcow.strategies import STRATEGIES, parse_strategy
from thpcow.kernel.page_alloc import PG_ANON_EXCLUSIVE

from conftest import vmstat_delta

RAM = 512 << 20


def thp_region(k: Kernel, size: int = 4 << 20, token: int = 1):
    p = k.spawn()
    a = p.mmap(size)
    p.madvise(a, size, MADV_HUGEPAGE)
    p.write(a, size, token)
    return p, a


def exhaust_thp_blocks(k: Kernel) -> None:
    """Break every free 2 MiB block with an unmovable page: no order-9 block is left."""
    k.mem.fragment(1.0, np.random.default_rng(0))
    assert not k.mem.has_free_order(9) and k.mem.nr_free > 1000


# -- series thp_cow v1 1/5: MADV_THP_COW --------------------------------------------------------
def test_madv_thp_cow_sets_flag_splits_vma_and_is_inherited():
    k = Kernel(ram=RAM, check=True)
    p = k.spawn()
    a = p.mmap(8 << 20)
    p.madvise(a + (2 << 20), 2 << 20, MADV_THP_COW)
    vmas = p.vmas()
    assert [(v.start - a, v.end - a, bool(v.flags & VM_THP_COW)) for v in vmas] == [
        (0, 2 << 20, False), (2 << 20, 4 << 20, True), (4 << 20, 8 << 20, False)]
    assert "tc" in p.smaps().split("VmFlags:")[2]
    c = p.fork()
    assert [bool(v.flags & VM_THP_COW) for v in c.vmas()] == [False, True, False]
    # MADV_THP_SETUP_BASE is accepted and does nothing; there is no way to clear the flag.
    p.madvise(a, 8 << 20, MADV_THP_SETUP_BASE)
    assert len(p.vmas()) == 3


def test_madv_thp_cow_is_einval_without_the_series():
    k = Kernel(ram=RAM, check=True, series_thp_cow=False)
    p = k.spawn()
    a = p.mmap(2 << 20)
    for advice in (MADV_THP_SETUP_BASE, MADV_THP_COW, MADV_THP_SETUP_BASE + 2):
        with pytest.raises(KernelError) as ei:
            p.madvise(a, 2 << 20, advice)
        assert ei.value.errno == errno.EINVAL
    assert not p.vmas()[0].flags & VM_THP_COW
    k = Kernel(ram=RAM, check=True)                    # with the series: 258 is past MADV_THP_SETUP_END
    p = k.spawn()
    a = p.mmap(2 << 20)
    with pytest.raises(KernelError) as ei:
        p.madvise(a, 2 << 20, MADV_THP_SETUP_BASE + 2)
    assert ei.value.errno == errno.EINVAL


# -- series thp_cow v1 2/5: the sysfs knob --------------------------------------------------------
def test_thp_cow_knob_syntax():
    k = Kernel(ram=RAM)
    assert k.sysfs.read("thp_cow") == "always madvise [never]\n"
    k.sysfs.write("thp_cow", "madvise\n")
    assert k.sysfs.read("thp_cow") == "always [madvise] never\n"
    for bad in ("Always", "always ", "inherit", "1", "never\n\n"):
        with pytest.raises(KernelError) as ei:
            k.sysfs.write("thp_cow", bad)
        assert ei.value.errno == errno.EINVAL
        assert k.sysfs.thp_cow == "madvise"
    k.sysfs.write("thp_cow", "")              # a zero-byte write changes nothing
    assert k.sysfs.thp_cow == "madvise"


# -- the series is decided by its own knob -----------------------------------------------------------
def _fork_and_child_write(k: Kernel, advise_cow: bool = False):
    """MADV_HUGEPAGE region of 4 PMDs, every page written, fork, the child writes one page."""
    p = k.spawn()
    a = p.mmap(8 << 20)
    p.madvise(a, 8 << 20, MADV_HUGEPAGE)
    if advise_cow:
        p.madvise(a, 8 << 20, MADV_THP_COW)
    p.write(a, 8 << 20, 1)
    c = p.fork()
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 1, 2)
    after = k.vmstat_snapshot()
    return p, c, a, {n: after[n] - before[n] for n in ("thp_split_pmd", "thp_fault_alloc", "sim_cow_bytes")}


@pytest.mark.parametrize("series", [True, "v1", "meant"])
def test_default_kernel_follows_the_thp_cow_knob(series):
    """Kernel() carries the series; thp_cow=always copies 2 MiB whole, never splits as upstream."""
    k = Kernel(ram=1 << 30, check=True, series_thp_cow=series)
    k.sysfs.write("thp_cow", "always")
    p, c, a, d = _fork_and_child_write(k)
    assert d == {"thp_split_pmd": 0, "thp_fault_alloc": 1, "sim_cow_bytes": HPAGE_PMD_SIZE}
    assert c.smaps_fields(a)["AnonHugePages"] == 8192
    k = Kernel(ram=1 << 30, check=True, series_thp_cow=series)       # thp_cow=never: upstream
    p, c, a, d = _fork_and_child_write(k)
    assert d == {"thp_split_pmd": 1, "thp_fault_alloc": 0, "sim_cow_bytes": PAGE_SIZE}
    assert c.smaps_fields(a)["AnonHugePages"] == 6144


def test_thp_cow_madvise_needs_the_advice():
    for advise, split in ((False, 1), (True, 0)):
        k = Kernel(ram=1 << 30, check=True)
        k.sysfs.write("thp_cow", "madvise")
        _, _, _, d = _fork_and_child_write(k, advise_cow=advise)
        assert d["thp_split_pmd"] == split and d["thp_fault_alloc"] == 1 - split


def test_the_knob_is_read_at_each_fault():
    """Switching thp_cow between two faults switches the behaviour: no state is cached."""
    k = Kernel(ram=1 << 30, check=True)
    p, c, a, d = _fork_and_child_write(k)
    assert d["thp_split_pmd"] == 1
    k.sysfs.write("thp_cow", "always")
    c.write(a + (2 << 20), 1, 3)
    v = k.vmstat_snapshot()
    assert v["thp_split_pmd"] == 1 and c.smaps_fields(a)["AnonHugePages"] == 6144


def test_without_the_series_upstream_is_all_there_is():
    k = Kernel(ram=1 << 30, check=True, series_thp_cow=False)
    assert k.build.series is None and not k.series_thp_cow
    _, _, _, d = _fork_and_child_write(k)
    assert d["thp_split_pmd"] == 1


# -- series thp_cow v1 3/5: hugepage_cow_enabled() ------------------------------------------------
@pytest.mark.parametrize("enabled,pmd,thp_cow,hg,nh,tc,prctl", [c for c in itertools.product(
    ("always", "madvise", "never"), ("inherit", "never", "always"), ("always", "madvise", "never"),
    (False, True), (False, True), (False, True), (False, True)) if not (c[3] and c[4])])
def test_hugepage_cow_enabled_truth_table(enabled, pmd, thp_cow, hg, nh, tc, prctl):
    got = {}
    for series in ("v1", "meant"):
        k = Kernel(ram=RAM, series_thp_cow=series)
        k.sysfs.write("enabled", enabled)
        k.sysfs.write("hugepages-2048kB/enabled", pmd)
        k.sysfs.write("thp_cow", thp_cow)
        p = k.spawn()
        p.mmap(2 << 20)
        if prctl:
            p.prctl(PR_SET_THP_DISABLE, 1)
        vma = p.vmas()[0]
        vma.flags |= (VM_HUGEPAGE if hg else 0) | (VMF_NOHUGEPAGE if nh else 0) | (VM_THP_COW if tc else 0)
        got[series] = hm.hugepage_cow_enabled(k, p.mm, vma)
    # As written (v1): only the global knob and thp_cow.
    global_ok = enabled == "always" or (enabled == "madvise" and hg)
    knob_ok = thp_cow == "always" or (thp_cow == "madvise" and tc)
    assert got["v1"] == (global_ok and knob_ok)
    # As meant: the PMD order must be allowed for a fault in this VMA.
    pmd_ok = pmd == "always" or (pmd == "inherit" and global_ok)
    assert got["meant"] == (pmd_ok and not nh and not prctl and knob_ok)


def test_documented_gaps_between_written_and_intended():
    """v1 COWs 2 MiB with hugepages-2048kB=never, with VM_NOHUGEPAGE, under PR_SET_THP_DISABLE."""
    for setup in ("pmd-never", "nohugepage", "prctl"):
        got = {}
        for pol in ("thp-cow-v1", "thp-cow-meant"):
            k = Kernel(ram=RAM, check=True, build=pol)
            k.sysfs.write("enabled", "always")
            p, a = thp_region(k, 2 << 20)
            if setup == "pmd-never":
                k.sysfs.write("hugepages-2048kB/enabled", "never")
            elif setup == "nohugepage":
                p.madvise(a, 2 << 20, MADV_NOHUGEPAGE)
            else:
                p.prctl(PR_SET_THP_DISABLE, 1)
            c = p.fork()
            c.write(a, 8, 2)
            got[pol] = (k.vmstat_snapshot()["thp_split_pmd"], c.smaps_fields(a)["AnonHugePages"])
        assert got["thp-cow-v1"] == (0, 2048), setup
        assert got["thp-cow-meant"] == (1, 0), setup


# -- series thp_cow v1 4/5 and 5/5: mapping the copy, the COW path ------------------------------------
def test_series_copy_path_counters_contents_and_reuse():
    k = Kernel(ram=RAM, check=True, build="thp-cow-v1")
    p, a = thp_region(k, 2 << 20, token=7)
    p.write(a + 5 * PAGE_SIZE, 8, 8)
    c = p.fork()
    before = k.vmstat_snapshot()
    mthp_before = k.vmstat.mthp_stat(9, "anon_fault_alloc")
    c.write(a + PAGE_SIZE, 8, 99)
    after = k.vmstat_snapshot()
    assert after["thp_fault_alloc"] - before["thp_fault_alloc"] == 1
    assert k.vmstat.mthp_stat(9, "anon_fault_alloc") - mthp_before == 1
    assert after["thp_split_pmd"] == before["thp_split_pmd"]
    assert after["pgfault"] - before["pgfault"] == 1
    assert after["nr_anon_transparent_hugepages"] - before["nr_anon_transparent_hugepages"] == 1
    assert c.smaps_fields(a)["AnonHugePages"] == 2048 and c.smaps_fields(a)["Private_Dirty"] == 2048
    # contents: the copy carries every page, the parent is untouched
    expect = np.full(512, 7)
    expect[5] = 8
    assert (p.read(a, 2 << 20) == expect).all()
    expect[1] = 99
    assert (c.read(a, 2 << 20) == expect).all()
    # the new folio: refcount 1, AnonExclusive head, PMD writable; nr_ptes unchanged
    s = c.mm.pt.slot_of[a >> 21]
    fid = int(c.mm.pt.pmd_folio[s])
    assert k.folios.refcount[fid] == 1 and k.folios.entire[fid] == 1
    assert k.mem.pflags[int(k.folios.head[fid])] & PG_ANON_EXCLUSIVE
    assert c.mm.nr_ptes == 1
    # the parent's next write reuses the old THP: no copy, no split
    before = k.vmstat_snapshot()
    p.write(a + 9 * PAGE_SIZE, 8, 3)
    after = k.vmstat_snapshot()
    assert after["thp_fault_alloc"] == before["thp_fault_alloc"]
    assert after["thp_split_pmd"] == before["thp_split_pmd"]
    assert after["sim_cow_bytes"] == before["sim_cow_bytes"]


def test_series_allocation_failure_falls_back_to_split():
    k = Kernel(ram=RAM, check=True, build="thp-cow-v1")
    p, a = thp_region(k, 2 << 20)
    c = p.fork()
    exhaust_thp_blocks(k)
    before = k.vmstat_snapshot()
    fb = k.vmstat.mthp_stat(9, "anon_fault_fallback")
    c.write(a, 8, 2)
    after = k.vmstat_snapshot()
    assert after["thp_fault_fallback"] - before["thp_fault_fallback"] == 1
    assert k.vmstat.mthp_stat(9, "anon_fault_fallback") - fb == 1
    assert after["thp_split_pmd"] - before["thp_split_pmd"] == 1
    assert after["thp_fault_alloc"] == before["thp_fault_alloc"]
    assert after["sim_cow_bytes"] - before["sim_cow_bytes"] == PAGE_SIZE
    assert c.read(a)[0] == 2 and p.read(a)[0] == 1


def test_series_unshare_maps_the_copy_read_only():
    k = Kernel(ram=RAM, check=True, build="thp-cow-v1")
    p, a = thp_region(k, 2 << 20)
    c = p.fork()
    s = c.mm.pt.slot_of[a >> 21]
    from thpcow.kernel.mm import _PAGE_SOFT_DIRTY
    vmf = VmFault(c.mm, c.vmas()[0], a, FAULT_FLAG_UNSHARE, pmd=s, orig_pmd=int(c.mm.pt.pmd_flags[s]) | _PAGE_SOFT_DIRTY)
    assert hm.do_huge_pmd_wp_page(k, vmf) == 0
    assert c.mm.pt.pmd_flags[s] & _PAGE_SOFT_DIRTY          # copied from the old PMD
    k.check()
    from thpcow.kernel.mm import _PAGE_DIRTY, _PAGE_RW
    assert not c.mm.pt.pmd_flags[s] & (_PAGE_RW | _PAGE_DIRTY)
    fid = int(c.mm.pt.pmd_folio[s])
    assert k.mem.pflags[int(k.folios.head[fid])] & PG_ANON_EXCLUSIVE
    # the next write is a reuse of the exclusive copy: no second copy
    before = k.vmstat_snapshot()
    c.write(a, 8, 5)
    assert k.vmstat_snapshot()["thp_fault_alloc"] == before["thp_fault_alloc"]


def test_injected_missing_accounting_is_caught_by_the_checker(monkeypatch):
    """An injected bug in the series' mapping of its copy: map_anon_folio_pmd_nopf()
    'forgets' the rmap, and the checker sees the folio's counts disagree.  (Not the bug
    the series' CI hit: that was a NULL PMD pointer in collapse_huge_page(), which
    oopses in set_pmd_at(); see test_series_oops.py.)"""
    k = Kernel(ram=RAM, check=True, build="thp-cow-v1")
    p, a = thp_region(k, 2 << 20)
    c = p.fork()
    monkeypatch.setattr(hm.rmap, "folio_add_new_anon_rmap", lambda *args, **kw: None)
    with pytest.raises(InvariantViolation) as ei:
        c.write(a, 8, 2)
    msg = str(ei.value)
    assert "folio" in msg and ("mapcount" in msg or "AnonExclusive" in msg or "refcount" in msg)


# -- the alternatives -----------------------------------------------------------------------------------
def test_pre58_copies_512_small_pages_when_no_thp():
    k = Kernel(ram=RAM, check=True, build="pre-5.8")
    p, a = thp_region(k, 2 << 20, token=4)
    c = p.fork()
    exhaust_thp_blocks(k)
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    after = k.vmstat_snapshot()
    assert after["thp_fault_fallback"] - before["thp_fault_fallback"] == 1
    assert after["thp_split_pmd"] == before["thp_split_pmd"]
    assert after["sim_cow_pages"] - before["sim_cow_pages"] == 512
    assert c.smaps_fields(a)["AnonHugePages"] == 0 and c.smaps_fields(a)["Private_Dirty"] == 2048
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert c.read(a + PAGE_SIZE)[0] == 6 and c.read(a)[0] == 4 and p.read(a + PAGE_SIZE)[0] == 4


def test_pre58_copies_a_thp_when_it_can():
    k = Kernel(ram=RAM, check=True, build="pre-5.8")
    p, a = thp_region(k, 2 << 20)
    c = p.fork()
    c.write(a, 8, 2)
    v = k.vmstat_snapshot()
    assert v["thp_fault_alloc"] == 2 and v["thp_split_pmd"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 2048


def _pre58_shared_thp_in_a_fragmented_machine(enabled: str, defrag: str, advise: bool):
    """A THP shared by fork in a pre-5.8 kernel whose free pageblocks all hold an unmovable page;
    one pageblock of movable 4 KiB pages (a filler process) is what compaction can free."""
    k = Kernel(ram=RAM, check=True, build="pre-5.8")
    k.sysfs.write("enabled", enabled)
    k.sysfs.write("defrag", defrag)
    p = k.spawn()
    a = p.mmap(2 << 20)
    if advise:
        p.madvise(a, 2 << 20, MADV_HUGEPAGE)
    p.write(a, 2 << 20, 4)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    filler = k.spawn()
    b = filler.mmap(2 << 20)
    filler.madvise(b, 2 << 20, MADV_NOHUGEPAGE)
    filler.write(b, 2 << 20, 1)
    exhaust_thp_blocks(k)
    return k, p, p.fork(), a, filler, b


@pytest.mark.parametrize("enabled, defrag, advise", [
    ("madvise", "madvise", True), ("always", "always", False), ("always", "defer+madvise", True)])
def test_pre58_cow_allocates_its_thp_with_direct_compaction_where_a_fault_would(enabled, defrag, advise):
    """Before v5.8 do_huge_pmd_wp_page() allocated the copy with alloc_hugepage_vma() and
    alloc_hugepage_direct_gfpmask(): the fault's gfp, so direct compaction (compact_stall) runs
    when ``defrag`` lets a fault stall (always; madvise and defer+madvise in MADV_HUGEPAGE
    regions) and builds the THP the copy goes to."""
    k, p, c, a, filler, b = _pre58_shared_thp_in_a_fragmented_machine(enabled, defrag, advise)
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["compact_stall"] == 1 and d["compact_success"] == 1
    assert d["thp_fault_alloc"] == 1 and d["thp_fault_fallback"] == 0 and d["sim_cow_pages"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 2048 and p.smaps_fields(a)["AnonHugePages"] == 2048
    assert c.read(a + PAGE_SIZE)[0] == 6 and c.read(a)[0] == 4 and p.read(a + PAGE_SIZE)[0] == 4
    assert (filler.read(b, 2 << 20) == 1).all()


@pytest.mark.parametrize("enabled, defrag, advise, kcompactd", [
    ("madvise", "never", True, False),          # never stall
    ("always", "madvise", False, False),        # madvise: only MADV_HUGEPAGE regions may stall
    ("madvise", "defer", True, True),           # defer: wake kcompactd, fail now
    ("always", "defer+madvise", False, True),   # defer+madvise outside MADV_HUGEPAGE: wake kcompactd
])
def test_pre58_cow_without_direct_compaction_copies_small_pages(enabled, defrag, advise, kcompactd):
    """Where ``defrag`` does not let a fault stall, the pre-5.8 copy does not compact either: no
    free order-9 block means do_huge_pmd_wp_page_fallback()'s 512 small copies (one
    thp_fault_fallback); with defer it wakes kcompactd, whose block a later fault can use."""
    k, p, c, a, filler, b = _pre58_shared_thp_in_a_fragmented_machine(enabled, defrag, advise)
    before = k.vmstat_snapshot()
    c.write(a + PAGE_SIZE, 8, 6)
    d = vmstat_delta(k, before)
    assert d["compact_stall"] == 0 and d["thp_fault_alloc"] == 0
    assert d["thp_fault_fallback"] == 1 and d["sim_cow_pages"] == 512 and d["thp_split_pmd"] == 0
    assert c.smaps_fields(a)["AnonHugePages"] == 0 and c.read(a + PAGE_SIZE)[0] == 6
    k.advance(2_000_000)
    assert vmstat_delta(k, before)["compact_daemon_wake"] == (1 if kcompactd else 0)


@pytest.mark.parametrize("order", [2, 4, 6, 8])
def test_mthp_cow_copies_the_aligned_block(order):
    k = Kernel(ram=RAM, check=True, build=f"mthp-cow:order={order}")
    p, a = thp_region(k, 2 << 20, token=3)
    c = p.fork()
    nr_before = k.vmstat.mthp_stat(order, "nr_anon")
    addr = a + 37 * PAGE_SIZE
    c.write(addr, 8, 9)
    v = k.vmstat_snapshot()
    assert v["thp_split_pmd"] == 1
    assert v["sim_cow_bytes"] == PAGE_SIZE << order
    assert k.vmstat.mthp_stat(order, "nr_anon") - nr_before == 1
    # the rest of the block is writable without a fault
    first = 37 & ~((1 << order) - 1)
    pf = k.vmstat_snapshot()["pgfault"]
    c.write_many(a + (first + np.arange(1 << order)) * PAGE_SIZE, 5)
    assert k.vmstat_snapshot()["pgfault"] == pf
    assert (p.read(a, 2 << 20) == 3).all()


def test_mthp_cow_order9_is_a_whole_thp_copy():
    k = Kernel(ram=RAM, check=True, build="mthp-cow:order=9")
    p, a = thp_region(k, 2 << 20)
    c = p.fork()
    c.write(a, 8, 2)
    assert k.vmstat_snapshot()["thp_fault_alloc"] == 2
    assert c.smaps_fields(a)["AnonHugePages"] == 2048


def test_collapse_after_fork_gives_the_parent_its_thps_back():
    k = Kernel(ram=RAM, check=True)
    strategy = parse_strategy("collapse-after-fork:who=parent")
    p, a = thp_region(k, 4 << 20)
    c = p.fork()
    p.write_many(a + np.arange(0, 4 << 20, 1 << 20), 5)       # splits both PMDs of the parent
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    strategy.phase_end(p, [c])
    assert p.smaps_fields(a)["AnonHugePages"] == 4096
    assert c.smaps_fields(a)["AnonHugePages"] == 4096           # the child kept the old THPs
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 2
    assert (c.read(a, 4 << 20) == 1).all()


def test_dontfork_leaves_unneeded_memory_out_of_the_child():
    k = Kernel(ram=RAM, check=True)
    p, a = thp_region(k, 8 << 20)
    parse_strategy("dontfork").before_fork(p, [(a, 2 << 20)])
    c = p.fork()
    assert [(v.start - a, v.end - a) for v in c.vmas()] == [(0, 2 << 20)]
    assert c.status()["RssAnon"] == 2048


def test_directed_khugepaged_collapses_once_the_child_is_gone():
    k = Kernel(ram=RAM, check=True, build="directed-khugepaged")
    k.sysfs.write("khugepaged/pages_to_scan", "512")      # room for one PTE table a pass
    p, a = thp_region(k, 4 << 20)
    c = p.fork()
    p.write(a + (2 << 20), 8, 2)                        # COW split of the second PMD: a hint
    assert list(k.khugepaged.hint) == [(p.pid, a + (2 << 20))]
    k.advance(10 * 10**9)                               # one pass: 511 shared PTEs > max_ptes_shared
    v = k.vmstat_snapshot()
    assert v["thp_scan_exceed_share_pte"] == 1 and v["thp_collapse_alloc"] == 0
    assert k.khugepaged.hint                            # kept for the next pass
    c.exit()
    k.advance(10 * 10**9)                               # the hint goes first, ahead of the cursor
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 1
    assert p.smaps_fields(a)["AnonHugePages"] == 4096 and not k.khugepaged.hint
    assert p.read(a + (2 << 20))[0] == 2 and p.read(a + (2 << 20) + PAGE_SIZE)[0] == 1


def test_reservation_serves_thp_when_the_buddy_cannot():
    k = Kernel(ram=RAM, check=True, build="reservation:pool_mib=4")
    assert k.build.cost_bytes(k) == 4 << 20
    exhaust_thp_blocks(k)
    p, a = thp_region(k, 2 << 20)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert len(k.build.pool) == 1
    k2 = Kernel(ram=RAM, check=True)               # the same without a pool: no THP
    exhaust_thp_blocks(k2)
    p2, a2 = thp_region(k2, 2 << 20)
    assert p2.smaps_fields(a2)["AnonHugePages"] == 0
    assert k2.vmstat_snapshot()["thp_fault_fallback"] == 1


def test_cow_density_copies_the_block_after_threshold_cows():
    k = Kernel(ram=RAM, check=True, build="cow-density:threshold=4")
    p, a = thp_region(k, 2 << 20, token=1)
    c = p.fork()
    for i in range(3):
        c.write(a + i * PAGE_SIZE, 8, 10 + i)
    assert c.smaps_fields(a)["AnonHugePages"] == 0
    c.write(a + 3 * PAGE_SIZE, 8, 13)                  # the 4th COW: collapse into a THP
    assert c.smaps_fields(a)["AnonHugePages"] == 2048
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 1
    assert list(c.read(a, 5 * PAGE_SIZE)) == [10, 11, 12, 13, 1]
    assert (p.read(a, 2 << 20) == 1).all()
    # sparse writes in another block never reach the threshold
    k2 = Kernel(ram=RAM, check=True, build="cow-density:threshold=4")
    p2, a2 = thp_region(k2, 4 << 20)
    c2 = p2.fork()
    for blk in range(2):
        for i in range(3):
            c2.write(a2 + blk * HPAGE_PMD_SIZE + i * 64 * PAGE_SIZE, 8, 2)
    assert k2.vmstat_snapshot()["thp_collapse_alloc"] == 0


# -- the registry ---------------------------------------------------------------------------------------------
def test_registry_parses_names_and_parameters():
    assert set(BUILDS) == {"upstream", "thp-cow-v1", "thp-cow-meant", "pre-5.8", "mthp-cow",
                           "directed-khugepaged", "reservation", "cow-density"}
    assert set(STRATEGIES) == {"collapse-after-fork", "dontfork"}
    assert set(policy_names()) == set(BUILDS) | set(STRATEGIES)
    assert repr(parse_build("mthp-cow:order=6")) == "mthp-cow:order=6"
    assert parse_policy("thp-cow-intended").build == "thp-cow-intended"      # the former name
    assert Kernel(ram=RAM, build="thp-cow-intended").build.series == "meant"
    pol = parse_policy("collapse-after-fork:who=both")
    assert pol.kind == "userspace" and pol.build == "upstream" and pol.strategy.who == "both"
    with pytest.raises(ValueError, match="who=all"):
        parse_policy("collapse-after-fork:who=all")
    with pytest.raises(ValueError, match="unknown kernel build"):
        Kernel(ram=RAM, build="dontfork")            # a userspace strategy is not a kernel build
    with pytest.raises(ValueError, match="unknown COW policy"):
        parse_policy("nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_policy("mthp-cow:size=4")
    with pytest.raises(ValueError, match="key=value"):
        parse_policy("mthp-cow:4")
    with pytest.raises(ValueError, match="order=.x. is not int"):
        parse_policy("mthp-cow:order=x")
    with pytest.raises(ValueError, match="order"):
        Kernel(ram=RAM, build="mthp-cow:order=1")
    with pytest.raises(ValueError, match="build= and cow_policy="):
        Kernel(ram=RAM, build="upstream", cow_policy="pre-5.8")
    assert Kernel(ram=RAM, cow_policy="pre-5.8").build.name == "pre-5.8"      # the former keyword


def test_policy_table_matches_the_counters():
    from thpcow.experiments.policy_table import COLUMNS, run_scenario, table_scenario
    from thpcow.experiments.runner import run_point
    row = run_scenario("dense", "upstream", size_mib=8, check=True)
    # the child rewrites 4 MiB page by page: 2 PMDs split, 1024 pages copied; khugepaged collapses them again
    assert row["thp_split_pmd"] == 2 and row["sim_cow_pages"] == 1024 and row["pgfault"] == 1024
    assert row["thp_collapse_alloc"] == 2 and row["cow_mib"] == 4.0 and row["collapse_mib"] == 4.0
    assert row["thp_min"] == 1.0 and row["thp_child_min"] == 0.5 and row["thp_child_end"] == 1.0
    row = run_scenario("dense", "thp-cow-v1", size_mib=8, check=True)
    assert row["thp_fault_alloc"] == 2 and row["thp_split_pmd"] == 0 and row["sim_huge_cow"] == 2
    assert row["cow_mib"] == 4.0 and row["thp_child_min"] == 1.0
    row = run_scenario("sparse", "thp-cow-v1", size_mib=8, check=True)
    assert row["cow_mib"] == 8.0 and row["peak_extra_mib"] == 8.0 and row["thp_min"] == 1.0
    row = run_scenario("sparse", "upstream", size_mib=8)
    assert row["thp_split_pmd"] == 4 and row["thp_min"] == 0.0 and row["thp_child_min"] == 1.0
    # the row is the runner's summary row, rounded
    summary = run_point(table_scenario("forkserver", size_mib=8), "reservation:pool_mib=16").summary
    row = run_scenario("forkserver", "reservation:pool_mib=16", size_mib=8)
    for c in COLUMNS:
        assert row[c] == (pytest.approx(summary[c], abs=0.05) if isinstance(summary[c], float) else summary[c]), c
    assert row["policy_cost_mib"] == 16.0 and row["thp_split_pmd"] == 64     # 32 children x the 2 PMDs of 4 MiB
    with pytest.raises(ValueError, match="size_mib=7"):
        run_scenario("dense", "upstream", size_mib=7)


def test_thp_cow_file_exists_only_with_the_series():
    k = Kernel(ram=RAM, series_thp_cow=False)
    assert "thp_cow" not in k.sysfs.listdir() and "thp_cow" not in k.sysfs.paths()
    for call in (lambda: k.sysfs.read("thp_cow"), lambda: k.sysfs.write("thp_cow", "always")):
        with pytest.raises(KernelError) as ei:
            call()
        assert ei.value.errno == errno.ENOENT
    with pytest.raises(ValueError, match="contradicts"):
        Kernel(ram=RAM, series_thp_cow=False, build="thp-cow-v1")   # the build applies the series
    assert "thp_cow" in Kernel(ram=RAM).sysfs.listdir()
    assert "thp_cow" not in Kernel(ram=RAM, build="pre-5.8").sysfs.listdir()   # not on a pre-5.8 kernel
