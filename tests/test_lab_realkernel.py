"""Real-kernel lab tests: run thpcow.lab scenarios on the running kernel.

These validate the facts the simulator models (kernel-semantics.md §3.2, §5.1, §5.3, §9,
§12.5) on a mainline-semantics kernel. They skip when THP cannot be had by an
MADV_HUGEPAGE region, when not on Linux, or when /proc/self/pagemap is unreadable.
Nothing here changes a sysfs knob.

About exactness: /proc/vmstat is system-wide. Per-process views (smaps AnonHugePages,
pagemap) are exact and asserted with ==. For vmstat:
- pgfault moves with every fault of every process, so it is only bounded from below;
- thp_* counters move only when some process faults, splits or collapses THPs. On a box
  with enabled=madvise that is rare, lab scenarios are serialised by lab_lock(), and
  run_fork_split() returns the quietest of 3 runs, so the counts are asserted with ==.
  A failure message prints every delta and the noise scores of all runs, so background
  THP activity (e.g. numpy madvises arrays >= 4 MiB in another process) is visible.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from thpcow.lab import procfs, scenario

from conftest import skip_unless_settled, skip_without_real_thp

pytestmark = pytest.mark.realkernel


def _pagemap_unreadable() -> str | None:
    """Why /proc/self/pagemap cannot be read here, or None."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            if len(f.read(8)) != 8:
                return "/proc/self/pagemap: short read"
    except OSError as e:
        return f"/proc/self/pagemap unreadable: {e}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _real_kernel() -> None:
    """Skip the module with the reason when the lab cannot run here."""
    skip_without_real_thp(_pagemap_unreadable)


@pytest.fixture(scope="module")
def fork_split() -> scenario.ForkSplitResult:
    """run_fork_split(size_mib=8) once for the whole module (4 PMDs, 1 child write each)."""
    r = scenario.run_fork_split(size_mib=8)
    skip_unless_settled(r.settled, r.noise_scores, "run_fork_split")
    return r


def _explain(r: scenario.ForkSplitResult) -> str:
    """Every THP delta per stage, the views and the noise scores, for failure messages."""
    views = {k: getattr(r, k) for k in vars(r) if k.startswith("anon_huge_kb_")}
    return json.dumps({"deltas": r.thp_deltas(), "views": views, "noise": r.noise_scores,
                       "chosen_run": r.chosen_run, "knobs": r.knobs,
                       "kernel": r.kernel_release}, indent=1)


def test_fork_split_populate(fork_split: scenario.ForkSplitResult) -> None:
    """Writing 8 MiB of an MADV_HUGEPAGE region faults 4 PMD THPs (§4.2)."""
    r = fork_split
    assert r.nr_pmds == 4
    assert "hg" in r.range_vm_flags, _explain(r)
    # Per process, exact: all 8 MiB are PMD-mapped.
    assert r.anon_huge_kb_parent_after_populate == 8192, _explain(r)
    # System-wide; see module docstring for why == is reasonable.
    assert r.delta("thp_fault_alloc", "populate") == 4, _explain(r)
    assert r.delta("thp_fault_fallback", "populate") == 0, _explain(r)
    # One fault per PMD plus whatever the interpreter and other processes fault.
    assert r.delta("pgfault", "populate") >= 4, _explain(r)


def test_fork_split_child_writes(fork_split: scenario.ForkSplitResult) -> None:
    """A child write to a shared THP splits only the child's PMD and copies 4 KiB (§5.1, §5.3)."""
    r = fork_split
    # Per process, exact: the child's 4 PMDs are split, the parent's are untouched.
    assert r.anon_huge_kb_child_after_child_writes == 0, _explain(r)
    assert r.anon_huge_kb_parent_after_child_writes == 8192, _explain(r)
    # One PMD split per written PMD, in the child only.
    assert r.delta("thp_split_pmd", "child_writes") == 4, _explain(r)
    # Mainline COW allocates no THP (the 2026 thp_cow series would give 4 here) ...
    assert r.delta("thp_fault_alloc", "child_writes") == 0, _explain(r)
    # ... and does not split the folio or queue it: the parent still PMD-maps it.
    assert r.delta("thp_split_page", "child_writes") == 0, _explain(r)
    assert r.delta("thp_deferred_split_page", "child_writes") == 0, _explain(r)
    # The child's 4 COW faults, plus its interpreter's COW faults on the heap.
    assert r.delta("pgfault", "child_writes") >= 4, _explain(r)


def test_fork_split_child_exit(fork_split: scenario.ForkSplitResult) -> None:
    """After the child exits the parent still PMD-maps all 4 THPs; nothing was split."""
    r = fork_split
    assert r.anon_huge_kb_parent_after_child_exit == 8192, _explain(r)
    # The child's PTE mappings go away while the parent's PMD mapping remains, so the
    # folios are never partially mapped without a PMD: no deferred split (§5.3).
    assert r.delta("thp_deferred_split_page", "child_exit") == 0, _explain(r)
    assert r.delta("thp_split_page", "child_exit") == 0, _explain(r)
    assert r.delta("thp_split_pmd", "child_exit") == 0, _explain(r)


def test_fork_split_result_metadata(fork_split: scenario.ForkSplitResult) -> None:
    """The result carries kernel release, knobs and the noise choice."""
    r = fork_split
    assert r.kernel_release == os.uname().release
    assert r.knobs["enabled"] in ("always", "madvise", "never")
    assert 3 <= len(r.noise_scores) <= 9 and 0 <= r.chosen_run < len(r.noise_scores)
    assert r.noise_scores[r.chosen_run] == min(r.noise_scores)
    assert r.settled == scenario.settled(r.noise_scores)
    if len(r.noise_scores) > 3:                       # more runs only until the floor came up twice
        assert not scenario.settled(r.noise_scores[:-1])


def test_pagemap_kpageflags_of_thp() -> None:
    """A freshly faulted PMD THP: every page present and exclusive, PFNs contiguous from a
    512-aligned head; kpageflags THP on all, COMPOUND_HEAD on the head, COMPOUND_TAIL on the
    rest; kpagecount 1 (§9.2, §9.3). PFNs need CAP_SYS_ADMIN: skip if they read as 0."""
    pmd = procfs.hpage_pmd_size()
    nr = pmd // procfs.PAGE_SIZE
    size = 2 * pmd
    with scenario.lab_lock(), scenario.thp_region(size) as region:
        region.write_bytes(list(range(0, size, procfs.PAGE_SIZE)))
        ahp = procfs.smaps_field_in_range(procfs.read_smaps(os.getpid()), region.addr,
                                          region.end, "AnonHugePages")
        entries = procfs.read_pagemap(os.getpid(), region.addr, size // procfs.PAGE_SIZE)
        pfns = procfs.pagemap_pfn(entries)
        if not pfns.any():
            pytest.skip("pagemap PFNs read as 0: reader lacks CAP_SYS_ADMIN")
        flags = procfs.read_kpageflags(pfns)
        counts = procfs.read_kpagecount(pfns)

    assert ahp == size // 1024
    assert procfs.pagemap_flag(entries, procfs.PM_PRESENT).all()
    assert procfs.pagemap_flag(entries, procfs.PM_MMAP_EXCLUSIVE).all()
    assert not procfs.pagemap_flag(entries, procfs.PM_FILE).any()
    assert not procfs.pagemap_flag(entries, procfs.PM_SWAP).any()

    for k in range(size // pmd):
        block = pfns[k * nr:(k + 1) * nr].astype(np.int64)
        bflags = flags[k * nr:(k + 1) * nr]
        assert block[0] % nr == 0, f"PMD {k}: head pfn {block[0]:#x} not {nr}-aligned"
        assert (np.diff(block) == 1).all(), f"PMD {k}: pfns not contiguous"
        assert procfs.kpf_test(bflags, procfs.KPF_THP).all(), procfs.kpf_names(bflags[0])
        assert procfs.kpf_test(bflags, procfs.KPF_ANON).all()
        assert procfs.kpf_test(bflags[:1], procfs.KPF_COMPOUND_HEAD).all(), \
            procfs.kpf_names(bflags[0])
        assert not procfs.kpf_test(bflags[1:], procfs.KPF_COMPOUND_HEAD).any()
        assert procfs.kpf_test(bflags[1:], procfs.KPF_COMPOUND_TAIL).all()
    assert (counts == 1).all(), np.unique(counts)
