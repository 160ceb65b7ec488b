"""MADV_GUARD_INSTALL / MADV_GUARD_REMOVE (mm/madvise.c madvise_guard_install()/remove()):
guard PTE markers on the simulator, and the same programs on the running kernel.

Each program is in the language of thpcow.lab.programs; ``expect`` is what Linux 6.18 (this
machine: THP enabled=madvise) returned for it: return values, then per VMA (start, end, perms,
VmFlags, AnonHugePages kB, Rss kB, Referenced kB, pagemap present / exclusive / swapped / guard
page counts).
"""

from __future__ import annotations

import pytest

from thpcow.kernel import MADV_COLLAPSE, MADV_HUGEPAGE, Kernel, KernelError, SegmentationFault
from thpcow.kernel.constants import (
    MADV_DONTFORK, MADV_DONTNEED, MADV_FREE, MADV_GUARD_INSTALL, MADV_GUARD_REMOVE, MADV_WIPEONFORK,
)
from thpcow.lab import procfs, scenario
from thpcow.lab import programs as prg

K, M, RW, R = prg.K, prg.M, prg.RW, prg.R
GI, GR = MADV_GUARD_INSTALL, MADV_GUARD_REMOVE
FLAGS = "rd wr mr mw me gu ac"

CASES = {
    # a guard over 8 pages of a PMD-mapped THP: the PMD is split (thp_split_pmd), the 8 pages
    # zapped and marked; the other PMD stays huge
    "install_splits_the_pmd": (
        [("map", 0, 4 * M, RW), ("adv", 0, 4 * M, MADV_HUGEPAGE), ("touch", 0, 4 * M), ("adv", 8 * K, 16 * K, GI)],
        [0, 0, 0], [[0, 4 * M, "rw-p", "rd wr mr mw me gu ac hg", 2048, 4064, 4064, 1016, 1016, 8, 8]]),
    # remove clears the markers; VM_MAYBE_GUARD stays
    "remove": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("adv", 0, 4 * M, GR)],
        [0, 0, 0], [[0, 4 * M, "rw-p", FLAGS, 0, 0, 0, 0, 0, 0, 0]]),
    # MADV_DONTNEED and MADV_FREE keep the markers
    "dontneed_keeps": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("touch", 0, 8 * K), ("adv", 0, 4 * M, MADV_DONTNEED),
         ("adv", 0, 4 * M, MADV_FREE)],
        [0, 0, 0, 0], [[0, 4 * M, "rw-p", FLAGS, 0, 0, 0, 0, 0, 8, 8]]),
    # fork copies the markers (VM_MAYBE_GUARD: page tables copied); the child's pages are old
    "fork_copies": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("touch", 16 * K, 4 * M), ("fork",)],
        [0, 0], [[0, 4 * M, "rw-p", FLAGS, 0, 4032, 0, 1008, 0, 8, 8]]),
    # ... but not into a VM_WIPEONFORK VMA, nor a VM_DONTCOPY one
    "wipeonfork": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("adv", 0, 4 * M, MADV_WIPEONFORK), ("fork",)],
        [0, 0, 0], [[0, 4 * M, "rw-p", "rd wr mr mw me gu ac wf", 0, 0, 0, 0, 0, 0, 0]]),
    "dontfork": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("adv", 0, 4 * M, MADV_DONTFORK), ("fork",)],
        [0, 0, 0], []),
    # MADV_COLLAPSE: a marker counts as a swap entry; its swap-in faults SIGSEGV: SCAN_FAIL, EINVAL
    # (after allocating the THP); the block without markers collapses
    "collapse_refused": (
        [("map", 0, 4 * M, RW), ("touch", 0, 4 * M), ("adv", 2 * M + 8 * K, 2 * M + 16 * K, GI),
         ("adv", 0, 4 * M, MADV_COLLAPSE)],
        [0, 0, "EINVAL"], [[0, 4 * M, "rw-p", FLAGS, 2048, 4064, 4064, 1016, 1016, 8, 8]]),
    # a hole in the range: the mapped part is guarded, then ENOMEM
    "hole": (
        [("map", 0, 4 * M, RW), ("adv", 3 * M, 6 * M, GI)],
        [0, "ENOMEM"], [[0, 4 * M, "rw-p", FLAGS, 0, 0, 0, 0, 0, 256, 256]]),
    # mremap moves the markers with the pages
    "mremap_moves": (
        [("map", 0, 4 * M, RW), ("adv", 8 * K, 16 * K, GI), ("remap", 0, 4 * M, 4 * M, prg.MAYMOVE | prg.FIXED, 8 * M)],
        [0, 0, 8 * M], [[8 * M, 12 * M, "rw-p", FLAGS, 0, 0, 0, 0, 0, 8, 8]]),
    # the guard install's anon_vma_prepare() takes the neighbour's anon_vma although the new
    # VM_MAYBE_GUARD differs (anon_vma_compatible() ignores it), so PROT_NONE over both merges
    # them (found by validate --programs 200 --seed 3, shrunk)
    "anon_vma_of_a_neighbour": (
        [("map", 2 * M, 1768 * K, RW), ("touch", 1301 * K, 1520 * K, 16 * K), ("prot", 2 * M, 7947 * K, R),
         ("map", 0, 2 * M, RW), ("adv", 61 * K, 2 * M, GI), ("prot", 0, 1768 * K, prg.NONE)],
        [0, "ENOMEM", 0, 0, 0], [[0, 1768 * K, "---p", "mr mw me gu ac", 0, 56, 56, 14, 14, 451, 451]]),
    # VM_MAYBE_GUARD is sticky: ignored by the merge rule, kept by the merged VMA
    "sticky_merge": (
        [("map", 0, 2 * M, RW), ("adv", 8 * K, 16 * K, GI), ("map", 2 * M, 4 * M, RW)],
        [0, 0, 0], [[0, 4 * M, "rw-p", FLAGS, 0, 0, 0, 0, 0, 8, 8]]),
}


def _sim(program):
    return prg.run_sim(program, prg.sim_kernel({"enabled": "madvise"}), wide=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_guard_programs_give_what_6_18_gave(name: str) -> None:
    program, rcs, vmas = CASES[name]
    assert _sim(program) == {"rcs": rcs, "vmas": vmas}


def test_install_counts_one_pmd_split() -> None:
    k = Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    a = p.mmap(4 * M)
    a = (a + 2 * M - 1) & ~(2 * M - 1) if a % (2 * M) else a
    p.madvise(a, 2 * M, MADV_HUGEPAGE)
    p.write(a, 2 * M, 1)
    before = k.vmstat_snapshot()
    p.madvise(a + 8 * K, 8 * K, GI)
    after = k.vmstat_snapshot()
    assert after["thp_split_pmd"] - before["thp_split_pmd"] == 1


@pytest.mark.parametrize("op", ["read", "write"])
def test_an_access_to_a_guard_page_is_sigsegv(op: str) -> None:
    k = Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    a = p.mmap(16 * K)
    p.write(a, 16 * K, 1)
    p.madvise(a + 4 * K, 4 * K, GI)                     # pages 4-7
    access = p.read if op == "read" else (lambda addr, n: p.write(addr, n, 2))
    access(a, 4 * K)                                    # the page before is fine
    with pytest.raises(SegmentationFault, match="guard region"):
        access(a, 8 * K)                                # a batch reaching the guard page
    with pytest.raises(SegmentationFault, match="guard region"):
        access(a + 4 * K, 1)
    p.madvise(a, 16 * K, GR)
    access(a + 4 * K, 1)                                # removed: faults in a fresh page
    assert p.smaps_fields(a)["Rss"] == (52 if op == "write" else 48)     # kB: 12 pages left, +1 written


def test_install_on_a_locked_vma_is_einval() -> None:
    from thpcow.kernel.constants import VM_LOCKED

    k = Kernel(ram=1 << 30, check=True)
    p = k.spawn()
    a = p.mmap(16 * K)
    p.mm.find_vma(a).flags |= VM_LOCKED                 # (no mlock() syscall in the simulator)
    with pytest.raises(KernelError) as e:
        p.madvise(a, 4 * K, GI)
    assert e.value.errno == 22
    p.madvise(a, 4 * K, GR)                             # removal is allowed on VM_LOCKED


def test_munmap_drops_the_markers() -> None:
    program = [("map", 0, 4 * M, RW), ("adv", 0, 4 * M, GI), ("unmap", 0, 4 * M), ("map", 0, 4 * M, RW),
               ("touch", 0, 4 * M)]
    res = _sim(program)
    assert res["rcs"] == [0, 0, 0, 0] and res["vmas"][0][5] == 4096 and res["vmas"][0][-1] == 0


@pytest.mark.realkernel
@pytest.mark.parametrize("name", sorted(CASES))
def test_guard_programs_on_the_running_kernel(name: str) -> None:
    reason = prg.real_kernel_reason()
    if reason:
        pytest.skip(reason)
    knobs = procfs.read_thp_knobs()
    if knobs.get("enabled") != "madvise":
        pytest.skip("the expectations were taken with THP enabled=madvise")
    program, _, _ = CASES[name]
    with scenario.lab_lock():
        real = prg.run_real_forked(program, wide=True)
        if real != _sim(program) and "touch" in {s[0] for s in program}:
            real = prg.run_real_forked(program, wide=True)  # once more: khugepaged may have collapsed meanwhile
    assert real == _sim(program)
