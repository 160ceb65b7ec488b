"""The series' patch 4 as posted (v1): every PMD collapse oopses.

collapse_huge_page() hands map_anon_folio_pmd_nopf() a vm_fault whose .pmd
was never set, so set_pmd_at() stores through a NULL pointer: with
page_table_check the check reads the old entry first and faults in
__page_table_check_pmds_set() (as syzbot reported it), without it the store
faults in map_anon_folio_pmd_nopf() (as the kernel test robot reported it).
The series as meant sets .pmd and collapses normally.
"""

from __future__ import annotations

import numpy as np
import pytest

from thpcow.experiments.report import table_rows, verdict
from thpcow.experiments.runner import run_compare
from thpcow.kernel import MADV_HUGEPAGE, PAGE_SIZE, Kernel, KernelError, KernelOops
from thpcow.kernel.constants import MADV_COLLAPSE

RAM = 512 << 20


def _pte_mapped_region(k: Kernel):
    """4 MiB written as 4 KiB pages (half of each block), then made THP-eligible."""
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.write_many(a + np.arange(0, 1024, 2) * PAGE_SIZE, 7)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    return p, a


@pytest.mark.parametrize("ptc, rip, first", [
    (True, "__page_table_check_pmds_set", "KASAN: null-ptr-deref"),
    (False, "map_anon_folio_pmd_nopf", "BUG: kernel NULL pointer dereference"),
])
def test_v1_madv_collapse_oopses_with_a_kernel_like_report(ptc, rip, first):
    k = Kernel(ram=RAM, build="thp-cow-v1", check=ptc)
    p, a = _pte_mapped_region(k)
    with pytest.raises(KernelOops) as ei:
        p.madvise(a, 4 << 20, MADV_COLLAPSE)
    e = ei.value
    assert str(e).startswith("Oops: ") and e.function == rip
    assert first in e.report and f"RIP: 0010:{rip}" in e.report
    # the Call Trace: from the PMD store down to the system call, innermost first
    calls = e.stack
    assert calls.index("collapse_huge_page") < calls.index("madvise_collapse") < calls.index("__x64_sys_madvise")
    if ptc:
        assert calls[:2] == ["set_pmd_at", "map_anon_folio_pmd_nopf"]
    else:
        assert calls[0] == "collapse_huge_page"
    assert "Oops in " + rip in e.summary()


def test_v1_khugepaged_oopses_in_its_own_thread():
    k = Kernel(ram=RAM, build="thp-cow-v1", check=True)
    k.sysfs.write("khugepaged/scan_sleep_millisecs", "10")
    p, a = _pte_mapped_region(k)
    with pytest.raises(KernelOops) as ei:
        k.advance(60 * 10**9)
    e = ei.value
    assert "Comm: khugepaged" in e.report
    assert "khugepaged_do_scan" in e.stack and e.stack[-1] == "kthread"
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 1      # the first collapse got as far as the store


def test_the_kernel_is_dead_after_an_oops():
    k = Kernel(ram=RAM, build="thp-cow-v1", check=True)
    p, a = _pte_mapped_region(k)
    with pytest.raises(KernelOops):
        p.madvise(a, 4 << 20, MADV_COLLAPSE)
    for call in (lambda: p.write(a, 8, 1), lambda: p.read(a, 8), lambda: p.fork(), lambda: p.exit(),
                 lambda: k.advance(1000), lambda: k.spawn().mmap(PAGE_SIZE)):
        with pytest.raises(KernelOops, match="the kernel oopsed earlier"):
            call()


@pytest.mark.parametrize("kwargs", [
    {"build": "thp-cow-v1"},
    {"cow_policy": "thp-cow-v1"},                     # the former name still names that build
    {"series_thp_cow": "v1"},                         # upstream with v1 applied, thp_cow=never
])
def test_v1_oopses_whatever_thp_cow_says(kwargs):
    k = Kernel(ram=RAM, check=True, **kwargs)
    for mode in ("never", "always"):
        k = Kernel(ram=RAM, check=True, **kwargs)
        k.sysfs.write("thp_cow", mode)
        p, a = _pte_mapped_region(k)
        with pytest.raises(KernelOops):
            p.madvise(a, 4 << 20, MADV_COLLAPSE)


@pytest.mark.parametrize("kwargs", [{"build": "thp-cow-meant"}, {"build": "upstream"}, {}])
def test_as_meant_and_upstream_collapse(kwargs):
    k = Kernel(ram=RAM, check=True, **kwargs)
    p, a = _pte_mapped_region(k)
    p.madvise(a, 4 << 20, MADV_COLLAPSE)
    assert k.vmstat_snapshot()["thp_collapse_alloc"] == 2 and k.oops is None
    assert p.smaps_fields(a)["AnonHugePages"] == 4096
    got = p.read_many(a + np.arange(1024) * PAGE_SIZE)
    assert (got[::2] == 7).all() and (got[1::2] == 0).all()


def test_v1_without_a_collapse_does_not_oops():
    k = Kernel(ram=RAM, build="thp-cow-v1", check=True)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    p.write(a, 4 << 20, 1)
    c = p.fork()
    c.write(a, 8, 2)
    with pytest.raises(KernelError):                  # nothing to collapse: EINVAL, no oops
        p.madvise(a + PAGE_SIZE, PAGE_SIZE, MADV_COLLAPSE)
    assert k.oops is None and c.read(a)[0] == 2


def test_a_comparison_reports_the_oopsed_policy(tmp_path):
    """A run whose kernel oopses stops there; its row and the verdict say so.  Both
    builds run the series with thp_cow=never, so COW splits PMDs and khugepaged
    collapses them again."""
    d = {"name": "v1-collapse", "ram_mib": 1024, "seed": 1,
         "sysfs": {"khugepaged/scan_sleep_millisecs": "10", "thp_cow": "never"},
         "workload": {"name": "copy-after-fork", "size_mib": 8, "copy_mib": 4, "range_kib": 4,
                      "order": "sequential", "fork_after_ms": 2, "hold_ms": 200},
         "policies": ["thp-cow-meant", "thp-cow-v1"]}
    res = run_compare(d)
    rows = res.summary.set_index("policy")
    assert rows.loc["thp-cow-meant", "oops"] == "" and rows.loc["thp-cow-meant", "thp_collapse_alloc"] > 0
    oops = rows.loc["thp-cow-v1", "oops"]
    assert oops.startswith("Oops in __page_table_check_pmds_set") or oops.startswith("Oops in map_anon_folio")
    cells = {r[0] for r in table_rows(res.summary)}
    assert "thp-cow-v1 (oops)" in cells
    v = verdict(res.summary)
    assert "the kernel oopsed: thp-cow-v1 (Oops in " in v
