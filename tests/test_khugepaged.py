"""khugepaged and MADV_COLLAPSE on the simulated clock (mm/khugepaged.c semantics)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_COLLAPSE, MADV_HUGEPAGE, MADV_NOHUGEPAGE, PAGE_SIZE, PR_SET_THP_DISABLE, Kernel,
    KernelError,
)
from thpcow.kernel.clock import NSEC_PER_SEC

from conftest import thp_region

RAM = 1 << 30


def split_region(k: Kernel, size: int, child_lives: bool):
    """A THP region whose parent PMDs are all COW-split; the child exits unless child_lives."""
    p = k.spawn()
    a = thp_region(p, size)
    c = p.fork()
    p.write_many(a + np.arange(size // HPAGE_PMD_SIZE) * HPAGE_PMD_SIZE, 2)
    assert p.smaps_fields(a)["AnonHugePages"] == 0
    if not child_lives:
        c.exit()
    return p, c, a


def time_to_collapse(k: Kernel, n: int, limit_s: int = 7200) -> float:
    t0 = k.now
    while k.vmstat.events["thp_collapse_alloc"] < n:
        nxt = k.clock.peek()
        assert nxt is not None and nxt - t0 < limit_s * NSEC_PER_SEC, "khugepaged stopped making progress"
        k.run_until(nxt)
    return (k.now - t0) / NSEC_PER_SEC


def test_default_khugepaged_recollapses_1gib_in_640s():
    """Defaults: pages_to_scan=4096 is 8 PTE tables a pass, one pass every 10 s: 512 PMDs take 64 passes."""
    k = Kernel(ram=4 << 30, check=False)
    p, _, a = split_region(k, 1 << 30, child_lives=False)
    assert time_to_collapse(k, 512) == 640.0
    assert p.smaps_fields(a)["AnonHugePages"] == 1 << 20
    assert k.khugepaged_counters["pages_collapsed"] == 512
    assert k.khugepaged.passes == 64
    assert (p.read(a, 1 << 30)[::512] == 2).all() and (p.read(a + PAGE_SIZE, PAGE_SIZE) == 1).all()
    k.check()


def test_tuned_khugepaged_recollapses_1gib_in_under_a_second():
    k = Kernel(ram=4 << 30, check=False)
    k.sysfs.write("khugepaged/scan_sleep_millisecs", "100")
    k.sysfs.write("khugepaged/pages_to_scan", str(64 * 512))
    p, _, a = split_region(k, 1 << 30, child_lives=False)
    assert time_to_collapse(k, 512) == pytest.approx(0.7)
    assert p.smaps_fields(a)["AnonHugePages"] == 1 << 20
    k.check()


def test_khugepaged_refuses_while_the_child_still_shares():
    """511 shared PTEs > max_ptes_shared=256: thp_scan_exceed_share_pte, no collapse."""
    k = Kernel(ram=RAM, check=True)
    p, c, a = split_region(k, 4 << 20, child_lives=True)
    k.advance(30 * NSEC_PER_SEC)
    v = k.vmstat_snapshot()
    assert v["thp_collapse_alloc"] == 0
    assert v["thp_scan_exceed_share_pte"] >= 2
    c.exit()
    k.advance(20 * NSEC_PER_SEC)
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 2
    # max_ptes_shared=511 lets it collapse the parent's copy while the child lives
    k2 = Kernel(ram=RAM, check=True)
    k2.sysfs.write("khugepaged/max_ptes_shared", "511")
    p2, c2, a2 = split_region(k2, 2 << 20, child_lives=True)
    k2.advance(10 * NSEC_PER_SEC)
    assert p2.smaps_fields(a2)["AnonHugePages"] == 2048 and c2.smaps_fields(a2)["AnonHugePages"] == 2048
    assert (c2.read(a2, 2 << 20) == 1).all()


def test_max_ptes_none_limits_khugepaged_not_madv_collapse():
    for present, collapses in ((256, True), (255, False)):
        k = Kernel(ram=RAM, check=True)
        k.sysfs.write("khugepaged/max_ptes_none", "256")
        p = k.spawn()
        a = p.mmap(2 << 20)
        p.madvise(a, 2 << 20, MADV_NOHUGEPAGE)
        p.write_many(a + np.arange(present) * PAGE_SIZE, 1)
        p.madvise(a, 2 << 20, MADV_HUGEPAGE)
        k.advance(10 * NSEC_PER_SEC)
        v = k.vmstat_snapshot()
        assert (v["thp_collapse_alloc"] == 1) == collapses
        assert (v["thp_scan_exceed_none_pte"] >= 1) == (not collapses)
        if not collapses:
            p.madvise(a, 2 << 20, MADV_COLLAPSE)              # no limits for MADV_COLLAPSE
            assert p.smaps_fields(a)["AnonHugePages"] == 2048
            assert p.status()["RssAnon"] == 2048               # empty PTEs became zero-filled pages


def test_registration_and_stop():
    k = Kernel(ram=RAM, check=True)
    p = k.spawn()
    a = p.mmap(2 << 20)
    p.madvise(a, 2 << 20, MADV_HUGEPAGE)
    assert not p.mm.khugepaged                          # no anon_vma yet: not registered
    p.write(a, 8, 1)
    assert p.mm.khugepaged and p.pid in k.khugepaged_mms
    c = p.fork()
    assert c.mm.khugepaged                              # khugepaged_fork()
    k.sysfs.write("enabled", "never")
    assert not k.khugepaged.running
    passes = k.khugepaged.passes
    k.advance(60 * NSEC_PER_SEC)
    assert k.khugepaged.passes == passes
    k.sysfs.write("enabled", "madvise")
    k.advance(11 * NSEC_PER_SEC)
    assert k.khugepaged.passes == passes + 1
    assert k.khugepaged_counters["full_scans"] >= 1
    assert k.sysfs.read("khugepaged/full_scans") == f"{k.khugepaged_counters['full_scans']}\n"


def test_madv_collapse_errors():
    k = Kernel(ram=RAM, check=True)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.write(a, 4 << 20, 1)                              # enabled=madvise: no THP without the advice
    # MADV_COLLAPSE ignores the sysfs masks
    p.madvise(a, 2 << 20, MADV_COLLAPSE)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 1 and k.vmstat_snapshot()["thp_fault_alloc"] == 0
    # ... but not VM_NOHUGEPAGE or PR_SET_THP_DISABLE
    p.madvise(a + (2 << 20), 2 << 20, MADV_NOHUGEPAGE)
    with pytest.raises(KernelError) as ei:
        p.madvise(a + (2 << 20), 2 << 20, MADV_COLLAPSE)
    assert ei.value.errno == errno.EINVAL
    q = k.spawn()
    b = q.mmap(2 << 20)
    q.write(b, 2 << 20, 1)
    q.prctl(PR_SET_THP_DISABLE, 1)
    with pytest.raises(KernelError) as ei:
        q.madvise(b, 2 << 20, MADV_COLLAPSE)
    assert ei.value.errno == errno.EINVAL
    # an untouched region: nothing to collapse -> EINVAL (SCAN_PMD_NULL)
    r = k.spawn()
    c = r.mmap(2 << 20)
    r.write(c, 8, 1)
    r.madvise(c, 2 << 20, MADV_DONTNEED := 4)
    with pytest.raises(KernelError):
        r.madvise(c, 2 << 20, MADV_COLLAPSE)
    # a range that starts on a block boundary but holds no whole block succeeds and does nothing;
    # one whose rounded-up start lies past its rounded-down end is EINVAL (as on Linux 6.18)
    p.madvise(a, PAGE_SIZE, MADV_COLLAPSE)
    with pytest.raises(KernelError) as ei:
        p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_COLLAPSE)
    assert ei.value.errno == errno.EINVAL
    # no THP can be allocated, not even by compaction (an unmovable page in
    # every pageblock): ENOMEM, thp_collapse_alloc_failed
    k2 = Kernel(ram=RAM, check=True, fragmentation=1.0)
    s = k2.spawn()
    d = s.mmap(2 << 20)
    s.write(d, 2 << 20, 1)
    with pytest.raises(KernelError) as ei:
        s.madvise(d, 2 << 20, MADV_COLLAPSE)
    assert ei.value.errno == errno.ENOMEM
    assert k2.vmstat_snapshot()["thp_collapse_alloc_failed"] == 1
    assert k2.vmstat_snapshot()["compact_fail"] >= 1
    # ... while with the pages movable, direct compaction makes room and it succeeds
    k3 = Kernel(ram=RAM, check=True)
    s3 = k3.spawn()
    d3 = s3.mmap(2 << 20)
    s3.write(d3, 2 << 20, 1)
    k3.mem.fragment(1.0, np.random.default_rng(1))
    s3.madvise(d3, 2 << 20, MADV_COLLAPSE)
    v = k3.vmstat_snapshot()
    assert v["compact_success"] == 1 and v["thp_collapse_alloc"] == 1
    assert (s3.read(d3, 2 << 20) == 1).all()


def test_process_madvise_collapse_on_another_process():
    k = Kernel(ram=RAM, check=True)
    p = k.spawn()
    a = p.mmap(2 << 20)
    p.write(a, 2 << 20, 3)
    tool = k.spawn()
    tool.process_madvise(p, a, 2 << 20, MADV_COLLAPSE)
    assert p.smaps_fields(a)["AnonHugePages"] == 2048
    with pytest.raises(KernelError) as ei:
        tool.process_madvise(p, a, 2 << 20, MADV_HUGEPAGE)
    assert ei.value.errno == errno.EINVAL


def test_clock_is_deterministic_and_monotonic():
    k = Kernel(ram=RAM)
    with pytest.raises(KernelError):
        k.advance(-1)
    order = []
    k.clock.schedule(5, lambda: order.append("b"), priority=1)
    k.clock.schedule(5, lambda: order.append("a"), priority=0)
    k.clock.schedule(5, lambda: order.append("c"), priority=1)
    k.advance(10)
    assert order == ["a", "b", "c"] and k.now == 10


@pytest.mark.parametrize("offset, length, expect", [
    (4096, 4096, errno.EINVAL),          # rounded start (next block) past rounded end: EINVAL
    (0, 4096, 0),                        # rounded start == rounded end: nothing to do, success
    (4096, 3 << 20, 0),                  # one whole block inside: collapsed (already a THP)
    (0, 4 << 20, 0),
])
def test_madvise_collapse_range_rounding_as_the_running_kernel(offset, length, expect):
    """madvise_collapse() rounds the range inward to whole PMDs; the results are the ones
    Linux 6.18 returned for these four calls on a populated MADV_HUGEPAGE region."""
    from thpcow.kernel import MADV_COLLAPSE, MADV_HUGEPAGE, Kernel, KernelError
    k = Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    p.write(a, 4 << 20, 1)
    if expect:
        with pytest.raises(KernelError) as ei:
            p.madvise(a + offset, length, MADV_COLLAPSE)
        assert ei.value.errno == expect
    else:
        p.madvise(a + offset, length, MADV_COLLAPSE)
