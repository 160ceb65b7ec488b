"""System calls of a simulated process: what each one does, and how each rejects bad input.

Every call is checked against Linux 6.18 semantics (mm/mmap.c, mm/vma.c, mm/mprotect.c,
mm/mremap.c, mm/madvise.c, kernel/sys.c and kernel-semantics.md sections 2, 3, 4, 6, 9).
A failing call must raise KernelError with the kernel's errno and leave everything as it was:
the VMA list (start, end, flags), every vmstat counter and the number of free frames. Where
the kernel itself changes state before returning an error (a hole inside an mprotect() or
madvise() range), the test checks exactly those changes.

All kernels run with check=True, so the invariant checker runs after every call.
"""

from __future__ import annotations

import errno

import pytest

from thpcow.kernel import (
    HPAGE_PMD_SIZE, MADV_DOFORK, MADV_DONTDUMP, MADV_DONTFORK, MADV_DONTNEED, MADV_FREE,
    MADV_HUGEPAGE, MADV_KEEPONFORK, MADV_NOHUGEPAGE, MADV_WIPEONFORK, MAP_ANONYMOUS, MAP_FIXED,
    MAP_FIXED_NOREPLACE, MAP_NORESERVE, MAP_POPULATE, MAP_PRIVATE, MAP_SHARED, MREMAP_DONTUNMAP, MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PAGE_SIZE, PR_GET_THP_DISABLE, PR_SET_THP_DISABLE, PR_THP_DISABLE_EXCEPT_ADVISED, PROT_NONE,
    PROT_READ, TASK_SIZE, VM_DONTCOPY, VM_HUGEPAGE, VM_NOHUGEPAGE, VM_READ,
    VM_WIPEONFORK, VM_WRITE, Kernel, KernelError, Process, SegmentationFault,
)
from thpcow.kernel.vmstat import delta
from thpcow.lab import procfs

from conftest import ANON, RW, MiB, small_region, smaps_anon_huge_kb, thp_region, vmstat_delta

KiB = 1 << 10
PMD = HPAGE_PMD_SIZE
PAGE = PAGE_SIZE
PROT_SEM = 0x8            # asm-generic/mman-common.h: accepted by arch_validate_prot()
PROT_GROWSDOWN = 0x01000000
PROT_GROWSUP = 0x02000000
UNKNOWN_PROT = 0x100      # no PROT_* bit on any architecture (0x10 is arch-specific)
U64 = 1 << 64             # the syscall arguments are unsigned long

# A fixed, 2 MiB aligned spot far below the mmap base, for MAP_FIXED layouts.
FIXED_BASE = 0x7E00_0000_0000


# -------------------------------------------------------------------------------------------
# helpers
# -------------------------------------------------------------------------------------------

def vma_list(p: Process) -> list[tuple[int, int, int]]:
    return [(v.start, v.end, v.flags) for v in p.vmas()]


def vma_at(p: Process, addr: int):
    for v in p.vmas():
        if v.start <= addr < v.end:
            return v
    return None


def state(k: Kernel, procs) -> tuple:
    return ([vma_list(q) for q in procs], k.vmstat_snapshot(), k.mem.nr_free)


def expect_error(k: Kernel, procs, err: int, fn, *args, **kwargs) -> KernelError:
    """Call fn, which must fail with ``err`` and change nothing observable."""
    vmas0, stat0, free0 = state(k, procs)
    with pytest.raises(KernelError) as info:
        fn(*args, **kwargs)
    e = info.value
    assert e.errno == err, (f"errno {errno.errorcode.get(e.errno, e.errno)}, expected "
                            f"{errno.errorcode[err]}: {e}")
    vmas1, stat1, free1 = state(k, procs)
    assert vmas1 == vmas0, "VMA list changed by a failing call"
    assert stat1 == stat0, f"vmstat changed by a failing call: {delta(stat1, stat0)}"
    assert free1 == free0, f"nr_free changed by a failing call: {free0} -> {free1}"
    return e


def smaps_vmas(p: Process) -> list[procfs.Vma]:
    """The simulator's smaps text, parsed by the lab's parser for the real file."""
    return procfs.parse_smaps(p.smaps())


def smaps_vma(p: Process, addr: int) -> procfs.Vma:
    (v,) = [v for v in smaps_vmas(p) if v.start <= addr < v.end]
    return v


def rss_kb(p: Process) -> int:
    return p.status()["RssAnon"]


def tokens(p: Process, addr: int, npages: int) -> list[int]:
    return p.read(addr, npages * PAGE).tolist()


# -------------------------------------------------------------------------------------------
# mmap
# -------------------------------------------------------------------------------------------

class TestMmap:
    def test_topdown_and_consecutive_mappings_merge(self, p: Process) -> None:
        """Addresses come top-down, the second mapping right below the first; two anonymous
        mappings with equal flags side by side are one VMA (vma_merge_new_range())."""
        a = p.mmap(4 * MiB)
        b = p.mmap(4 * MiB)
        assert b < a
        assert b + 4 * MiB == a
        assert vma_list(p) == [(b, a + 4 * MiB, vma_list(p)[0][2])]
        assert len(p.vmas()) == 1

    def test_different_flags_do_not_merge(self, p: Process) -> None:
        a = p.mmap(4 * PAGE)
        b = p.mmap(4 * PAGE, prot=PROT_READ)
        assert b + 4 * PAGE == a
        assert [(v.start, v.end) for v in p.vmas()] == [(b, a), (a, a + 4 * PAGE)]
        assert not p.vmas()[0].flags & VM_WRITE and p.vmas()[1].flags & VM_WRITE

    def test_pmd_multiple_lengths_are_2m_aligned(self, p: Process) -> None:
        """__get_unmapped_area(): an anonymous mapping without hint whose length is a
        multiple of PMD_SIZE goes through thp_get_unmapped_area(); others do not."""
        small = p.mmap(PAGE)
        assert small % PMD != 0     # right below the simulator's fixed, 2 MiB aligned base
        two = p.mmap(2 * MiB)
        assert two % PMD == 0
        assert two + 2 * MiB <= small
        six = p.mmap(6 * MiB)
        assert six % PMD == 0
        odd = p.mmap(2 * MiB + PAGE)
        # Not PMD-multiple: plain top-down placement right below the previous mapping.
        assert odd == six - (2 * MiB + PAGE)
        assert odd % PMD != 0

    def test_map_fixed_replaces(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=7, addr=FIXED_BASE)
        rss = rss_kb(p)
        free = k.mem.nr_free
        b = p.mmap(2 * PAGE, flags=ANON | MAP_FIXED, addr=a + PAGE)
        assert b == a + PAGE
        assert rss_kb(p) == rss - 8                     # the old pages are gone ...
        assert k.mem.nr_free == free + 2                # ... and freed
        assert tokens(p, a, 4) == [7, 0, 0, 7]
        # The replacement lacks MADV_NOHUGEPAGE, so it is a VMA of its own.
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + PAGE), (a + PAGE, a + 3 * PAGE),
                                                        (a + 3 * PAGE, a + 4 * PAGE)]

    def test_map_fixed_replacement_with_equal_flags_merges_back(self, p: Process) -> None:
        a = p.mmap(4 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=FIXED_BASE)
        p.write(a, 4 * PAGE, token=3)
        flags = vma_list(p)[0][2]
        assert p.mmap(2 * PAGE, flags=ANON | MAP_FIXED, addr=a + PAGE) == a + PAGE
        assert vma_list(p) == [(a, a + 4 * PAGE, flags)]
        assert tokens(p, a, 4) == [3, 0, 0, 3]

    def test_map_fixed_noreplace(self, k: Kernel, p: Process) -> None:
        a = p.mmap(4 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=FIXED_BASE)
        assert a == FIXED_BASE
        p.write(a, 4 * PAGE, token=5)
        e = expect_error(k, [p], errno.EEXIST, p.mmap, 2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE,
                         addr=a + 3 * PAGE)
        assert not isinstance(e, SegmentationFault)
        assert tokens(p, a, 4) == [5] * 4
        # Into a free range it maps exactly there.
        assert p.mmap(PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 8 * PAGE) == a + 8 * PAGE

    def test_map_populate(self, k: Kernel, p: Process) -> None:
        before = k.vmstat_snapshot()
        a = p.mmap(8 * PAGE, flags=ANON | MAP_POPULATE)
        assert rss_kb(p) == 32
        assert k.vmstat_snapshot()["pgfault"] > before["pgfault"]
        faults = k.vmstat_snapshot()["pgfault"]
        p.write(a, 8 * PAGE, token=2)                   # already writable: no fault
        assert k.vmstat_snapshot()["pgfault"] == faults
        assert tokens(p, a, 8) == [2] * 8

    def test_map_populate_thp(self, k: Kernel, p: Process) -> None:
        k.sysfs.write("enabled", "always")
        before = k.vmstat_snapshot()
        a = p.mmap(4 * MiB, flags=ANON | MAP_POPULATE)
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 2
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 4096
        assert rss_kb(p) == 4096

    def test_length_zero(self, k: Kernel, p: Process) -> None:
        expect_error(k, [p], errno.EINVAL, p.mmap, 0)

    def test_unknown_prot_bits(self, k: Kernel, p: Process) -> None:
        # Simulator convention (the brief's): unknown PROT bits are refused with EINVAL.
        # NB: the real do_mmap() does not validate prot; calc_vm_prot_bits() drops them.
        expect_error(k, [p], errno.EINVAL, p.mmap, PAGE, prot=RW | UNKNOWN_PROT)

    @pytest.mark.parametrize("flags", [MAP_SHARED | MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED],
                             ids=["shared-anon", "private-file", "shared-file"])
    def test_unmodelled_mapping_types(self, k: Kernel, p: Process, flags: int) -> None:
        expect_error(k, [p], errno.EINVAL, p.mmap, PAGE, flags=flags)

    @pytest.mark.parametrize("off", [1, 0x800, PAGE - 1])
    def test_unaligned_map_fixed(self, k: Kernel, p: Process, off: int) -> None:
        expect_error(k, [p], errno.EINVAL, p.mmap, PAGE, flags=ANON | MAP_FIXED, addr=FIXED_BASE + off)
        expect_error(k, [p], errno.EINVAL, p.mmap, PAGE, flags=ANON | MAP_FIXED_NOREPLACE,
                     addr=FIXED_BASE + off)

    @pytest.mark.parametrize("length", [TASK_SIZE + PAGE, 1 << 48, U64 - PAGE, U64 - 1],
                             ids=["task_size+1p", "2^48", "2^64-4k", "2^64-1"])
    def test_length_overflowing_address_space(self, k: Kernel, p: Process, length: int) -> None:
        # PAGE_ALIGN() wrapping to 0 and len > TASK_SIZE both give ENOMEM.
        expect_error(k, [p], errno.ENOMEM, p.mmap, length)


# -------------------------------------------------------------------------------------------
# munmap
# -------------------------------------------------------------------------------------------

def test_a_fork_childs_vma_with_an_anon_vma_does_not_merge_with_one_without(k: Kernel, p: Process) -> None:
    """is_mergeable_anon_vma(): a VMA without anon_vma may join one that has one only if that
    one's anon_vma_chain is singular; a fork child's copy of a written VMA also links the
    parent's anon_vma (vma_had_uncowed_parents()), so a new mapping next to it stays apart.
    Two parts of one such VMA (same anon_vma) still merge back."""
    a = FIXED_BASE
    p.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
    p.mmap(4 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 16 * PAGE)
    p.write(a, 1, token=1)
    p.write(a + 16 * PAGE, 1, token=1)
    c = p.fork()
    c.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * PAGE)
    assert [(v.start - a, v.end - a) for v in c.vmas()][:2] == [(0, 2 * PAGE), (2 * PAGE, 4 * PAGE)]
    c.mprotect(a + 18 * PAGE, 2 * PAGE, PROT_READ)
    c.mprotect(a + 18 * PAGE, 2 * PAGE, RW)
    assert [(v.start - a, v.end - a) for v in c.vmas()][2:] == [(16 * PAGE, 20 * PAGE)]
    p.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * PAGE)     # the parent's chain is singular
    assert [(v.start - a, v.end - a) for v in p.vmas()][0] == (0, 4 * PAGE)


class TestMunmap:
    def test_partial_unmap_splits_vma_and_pmd(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=9)
        free = k.mem.nr_free
        before = k.vmstat_snapshot()
        p.munmap(a + PAGE, PAGE)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 1, d
        assert d["thp_deferred_split_page"] == 1, d     # folio now partially mapped
        assert d["thp_split_page"] == 0, d
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + PAGE), (a + 2 * PAGE, a + 4 * MiB)]
        assert all(v.flags & VM_HUGEPAGE for v in p.vmas())
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 2048      # the second PMD is untouched
        assert rss_kb(p) == 4096 - 4
        # The folio stays (on the deferred split queue) until it is split or freed.
        assert k.mem.nr_free == free
        with pytest.raises(SegmentationFault) as info:
            p.read(a + PAGE)
        assert info.value.addr == a + PAGE
        assert tokens(p, a, 1) == [9]
        assert tokens(p, a + 2 * PAGE, 1) == [9]

    def test_unmap_whole_thps_frees_them(self, k: Kernel, p: Process) -> None:
        free0 = k.mem.nr_free
        a = thp_region(p, 4 * MiB)
        assert k.mem.nr_free == free0 - 2 * 512
        before = k.vmstat_snapshot()
        p.munmap(a, 2 * MiB)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 0 and d["thp_deferred_split_page"] == 0, d
        assert k.mem.nr_free == free0 - 512
        assert d["nr_anon_transparent_hugepages"] == -1, d
        p.munmap(a + 2 * MiB, 2 * MiB)
        assert k.mem.nr_free == free0
        assert p.vmas() == []
        assert rss_kb(p) == 0
        snap = k.vmstat_snapshot()
        assert snap["nr_anon_pages"] == 0 and snap["nr_anon_transparent_hugepages"] == 0

    def test_unmap_across_vmas_and_holes(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        small_region(p, 2, addr=a + 4 * PAGE)           # two pages of gap after a
        free = k.mem.nr_free
        p.munmap(a + PAGE, 5 * PAGE)
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + PAGE)]
        assert k.mem.nr_free == free + 3

    def test_unmap_of_unmapped_range_succeeds(self, k: Kernel, p: Process) -> None:
        small_region(p, 2, addr=FIXED_BASE)
        before = state(k, [p])
        p.munmap(FIXED_BASE + 16 * PAGE, 4 * MiB)
        p.munmap(FIXED_BASE - 4 * MiB, 4 * MiB)
        assert state(k, [p]) == before

    @pytest.mark.parametrize("off", [1, 0x10, PAGE - 1])
    def test_unaligned_addr(self, k: Kernel, p: Process, off: int) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        expect_error(k, [p], errno.EINVAL, p.munmap, a + off, PAGE)

    def test_length_zero(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        expect_error(k, [p], errno.EINVAL, p.munmap, a, 0)

    def test_range_beyond_task_size(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        expect_error(k, [p], errno.EINVAL, p.munmap, a, TASK_SIZE)


# -------------------------------------------------------------------------------------------
# mprotect
# -------------------------------------------------------------------------------------------

class TestMprotect:
    def test_read_only_then_write_faults_with_the_address(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=4)
        p.mprotect(a, 4 * PAGE, PROT_READ)
        assert not vma_at(p, a).flags & VM_WRITE
        before = state(k, [p])
        with pytest.raises(SegmentationFault) as info:
            p.write(a + 2 * PAGE, 1, token=5)
        e = info.value
        assert e.addr == a + 2 * PAGE
        assert hex(a + 2 * PAGE) in str(e)
        assert state(k, [p]) == before                  # bad_area: no fault accounted
        assert tokens(p, a, 4) == [4] * 4               # reads still work

    def test_segfault_names_the_exact_byte_address(self, p: Process) -> None:
        """si_addr is the faulting address itself, not its page."""
        a = small_region(p, 2, token=4)
        p.mprotect(a, 2 * PAGE, PROT_READ)
        with pytest.raises(SegmentationFault) as info:
            p.write(a + PAGE + 0x123, 1, token=5)
        assert info.value.addr == a + PAGE + 0x123
        assert hex(a + PAGE + 0x123) in str(info.value)

    def test_partial_mprotect_on_thp_splits_pmd(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=6)
        before = k.vmstat_snapshot()
        p.mprotect(a + PAGE, PAGE, PROT_READ)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 1, d
        assert d["thp_deferred_split_page"] == 0, d   # every page is still mapped
        assert [(v.start, v.end) for v in p.vmas()] == [
            (a, a + PAGE), (a + PAGE, a + 2 * PAGE), (a + 2 * PAGE, a + 4 * MiB)]
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 2048
        assert rss_kb(p) == 4096
        with pytest.raises(SegmentationFault):
            p.write(a + PAGE, 1)

    def test_rw_again_makes_exclusive_pages_writable_without_faults(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=6)
        flags = vma_list(p)[0][2]
        p.mprotect(a + PAGE, PAGE, PROT_READ)
        p.mprotect(a + PAGE, PAGE, RW)
        assert vma_list(p) == [(a, a + 4 * MiB, flags)]     # merged back into one VMA
        faults = k.vmstat_snapshot()["pgfault"]
        p.write(a + PAGE, 1, token=8)                       # AnonExclusive: PTE already writable
        p.write(a, 4 * MiB, token=8)                        # PTE-mapped and PMD-mapped parts
        assert k.vmstat_snapshot()["pgfault"] == faults

    def test_rw_again_small_pages(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4)
        p.mprotect(a, 4 * PAGE, PROT_READ)
        p.mprotect(a, 4 * PAGE, RW)
        faults = k.vmstat_snapshot()["pgfault"]
        p.write(a, 4 * PAGE, token=2)
        assert k.vmstat_snapshot()["pgfault"] == faults

    def test_rw_again_after_fork_still_faults(self, k: Kernel, p: Process) -> None:
        """cow.c "mprotect optimisation": pages that lost AnonExclusive at fork stay
        read-only after RO->RW and take a COW fault on the next write."""
        a = small_region(p, 1, token=1)
        c = p.fork()
        p.mprotect(a, PAGE, PROT_READ)
        p.mprotect(a, PAGE, RW)
        faults = k.vmstat_snapshot()["pgfault"]
        p.write(a, 1, token=2)
        assert k.vmstat_snapshot()["pgfault"] == faults + 1
        assert tokens(c, a, 1) == [1]
        assert tokens(p, a, 1) == [2]

    def test_prot_none(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, token=3)
        p.mprotect(a, 2 * PAGE, PROT_NONE)
        assert not vma_at(p, a).flags & (VM_READ | VM_WRITE)
        before = state(k, [p])
        with pytest.raises(SegmentationFault) as info:
            p.read(a + PAGE)
        assert info.value.addr == a + PAGE and hex(a + PAGE) in str(info.value)
        with pytest.raises(SegmentationFault):
            p.write(a, 1)
        assert state(k, [p]) == before
        p.mprotect(a, 2 * PAGE, PROT_READ)
        assert tokens(p, a, 2) == [3, 3]                # the data survived

    @pytest.mark.parametrize("off", [1, 0x800, PAGE - 1])
    def test_unaligned(self, k: Kernel, p: Process, off: int) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mprotect, a + off, PAGE, PROT_READ)

    @pytest.mark.parametrize("prot", [UNKNOWN_PROT, RW | UNKNOWN_PROT, 0x80000000,
                                      PROT_READ | PROT_GROWSDOWN | PROT_GROWSUP],
                             ids=["0x100", "rw|0x100", "bit31", "growsdown|growsup"])
    def test_unknown_prot(self, k: Kernel, p: Process, prot: int) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mprotect, a, PAGE, prot)

    def test_unmapped_start(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE + 4 * PAGE)
        expect_error(k, [p], errno.ENOMEM, p.mprotect, FIXED_BASE, 8 * PAGE, PROT_READ)
        expect_error(k, [p], errno.ENOMEM, p.mprotect, a + 2 * PAGE, PAGE, PROT_READ)
        assert all(v.flags & VM_WRITE for v in p.vmas())

    def test_hole_in_the_middle(self, k: Kernel, p: Process) -> None:
        """do_mprotect_pkey() applies mprotect_fixup() VMA by VMA and stops at the first
        gap with ENOMEM: the part before the hole keeps the new protection."""
        a = small_region(p, 2, token=1, addr=FIXED_BASE)
        b = small_region(p, 2, token=2, addr=FIXED_BASE + 3 * PAGE)
        b_flags = vma_at(p, b).flags
        with pytest.raises(KernelError) as info:
            p.mprotect(a, 5 * PAGE, PROT_READ)
        assert info.value.errno == errno.ENOMEM
        assert not vma_at(p, a).flags & VM_WRITE
        assert vma_at(p, b).flags == b_flags
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + 2 * PAGE), (b, b + 2 * PAGE)]
        with pytest.raises(SegmentationFault):
            p.write(a, 1)
        p.write(b, 1, token=3)

    def test_hole_at_the_end(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        with pytest.raises(KernelError) as info:
            p.mprotect(a + PAGE, 4 * PAGE, PROT_READ)
        assert info.value.errno == errno.ENOMEM
        assert [(v.start, v.end, bool(v.flags & VM_WRITE)) for v in p.vmas()] == [
            (a, a + PAGE, True), (a + PAGE, a + 2 * PAGE, False)]

    def test_range_wraps(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.ENOMEM, p.mprotect, a, U64 - PAGE, PROT_READ)

    def test_zero_length_returns_before_prot_is_checked(self, k: Kernel, p: Process) -> None:
        """do_mprotect_pkey(): "if (!len) return 0" comes before arch_validate_prot()."""
        a = small_region(p, 2)
        before = state(k, [p])
        p.mprotect(a, 0, UNKNOWN_PROT)
        p.mprotect(FIXED_BASE, 0, PROT_READ)            # unmapped, but nothing to do
        assert state(k, [p]) == before

    def test_prot_sem_is_accepted(self, k: Kernel, p: Process) -> None:
        """x86 arch_validate_prot() accepts PROT_READ|PROT_WRITE|PROT_EXEC|PROT_SEM."""
        a = small_region(p, 2, token=1)
        p.mprotect(a, 2 * PAGE, PROT_READ | PROT_SEM)
        assert not vma_at(p, a).flags & VM_WRITE
        assert tokens(p, a, 2) == [1, 1]


    # The commit-accounting rule of mprotect_fixup() (Linux 6.18, verified on the running kernel
    # with the same layouts: tests/test_realkernel_vma.py).  VM_ACCOUNT ("ac") is one of the
    # flags vma_merge compares, so it decides which neighbours merge.

    @pytest.mark.parametrize("fault, merges", [(None, True), ("read", True), ("write", False)])
    def test_write_removal_uncharges_a_vma_never_written(self, p: Process, fault, merges: bool) -> None:
        """RW -> R drops VM_ACCOUNT while the VMA has no anon_vma (a read fault maps the zero page
        and prepares none); the read-only VMA then merges with a read-only neighbour."""
        a = FIXED_BASE
        p.mmap(3 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        if fault == "read":
            p.read(a, 3 * PAGE)
        elif fault == "write":
            p.write(a, 1, token=1)
        p.mprotect(a, 3 * PAGE, PROT_READ)
        assert ("ac" in smaps_vma(p, a).vm_flags) == (fault == "write")
        p.mmap(2 * PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 3 * PAGE)
        spans = [(v.start - a, v.end - a) for v in p.vmas()]
        assert spans == ([(0, 5 * PAGE)] if merges else [(0, 3 * PAGE), (3 * PAGE, 5 * PAGE)])

    def test_write_removal_lets_an_unwritten_vma_merge_with_a_read_only_prev(self, p: Process) -> None:
        a = FIXED_BASE
        p.mmap(2 * PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        p.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * PAGE)
        p.mprotect(a + 2 * PAGE, 2 * PAGE, PROT_READ)
        assert [(v.start - a, v.end - a) for v in p.vmas()] == [(0, 4 * PAGE)]
        p.mprotect(a, 4 * PAGE, PROT_NONE)
        assert "ac" not in smaps_vma(p, a).vm_flags

    def test_write_back_recharges_and_remerges(self, p: Process) -> None:
        a = FIXED_BASE
        p.mmap(3 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        p.mprotect(a + PAGE, PAGE, PROT_READ)
        assert ["ac" in v.vm_flags for v in smaps_vmas(p)] == [True, False, True]
        p.mprotect(a + PAGE, PAGE, RW)
        assert [(v.start - a, v.end - a) for v in p.vmas()] == [(0, 3 * PAGE)]
        assert "ac" in smaps_vma(p, a).vm_flags

    def test_map_noreserve_is_never_charged(self, p: Process) -> None:
        """MAP_NORESERVE sets VM_NORESERVE ("nr"; overcommit_memory is not 2), so neither mmap()
        nor mprotect() to writable sets VM_ACCOUNT, and it does not merge with plain mappings."""
        a = FIXED_BASE
        p.mmap(3 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE | MAP_NORESERVE, addr=a)
        assert "nr" in smaps_vma(p, a).vm_flags and "ac" not in smaps_vma(p, a).vm_flags
        p.mprotect(a, 3 * PAGE, PROT_READ)
        p.mprotect(a, 3 * PAGE, RW)
        assert "ac" not in smaps_vma(p, a).vm_flags and "nr" in smaps_vma(p, a).vm_flags
        p.mprotect(a, 3 * PAGE, PROT_READ)
        p.mmap(2 * PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 3 * PAGE)
        assert len(p.vmas()) == 2


# -------------------------------------------------------------------------------------------
# mremap
# -------------------------------------------------------------------------------------------

class TestMremap:
    def test_shrink(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=3, addr=FIXED_BASE)
        free = k.mem.nr_free
        assert p.mremap(a, 4 * PAGE, PAGE) == a
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + PAGE)]
        assert rss_kb(p) == 4
        assert k.mem.nr_free == free + 3
        assert tokens(p, a, 1) == [3]
        with pytest.raises(SegmentationFault):
            p.read(a + PAGE)

    def test_grow_in_place(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, token=3, addr=FIXED_BASE)
        flags = vma_list(p)[0][2]
        assert p.mremap(a, 2 * PAGE, 4 * PAGE) == a
        assert vma_list(p) == [(a, a + 4 * PAGE, flags)]
        assert tokens(p, a, 4) == [3, 3, 0, 0]
        assert rss_kb(p) == 8

    def test_move_with_maymove(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 3, addr=FIXED_BASE)
        p.write(a, 1, token=1)
        p.write(a + PAGE, 1, token=2)
        p.write(a + 2 * PAGE, 1, token=3)
        blocker = p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 3 * PAGE)
        free = k.mem.nr_free
        faults = k.vmstat_snapshot()["pgfault"]
        new = p.mremap(a, 3 * PAGE, 6 * PAGE, MREMAP_MAYMOVE)
        assert new != a
        assert k.vmstat_snapshot()["pgfault"] == faults     # page tables moved, nothing faulted
        assert k.mem.nr_free == free
        assert vma_at(p, a) is None and vma_at(p, blocker) is not None
        assert vma_at(p, new).flags & VM_NOHUGEPAGE
        assert tokens(p, new, 6) == [1, 2, 3, 0, 0, 0]
        assert rss_kb(p) == 12
        with pytest.raises(SegmentationFault):
            p.read(a)

    def test_aligned_pmds_move_whole(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=5)
        p.write(a + 3 * MiB, 1, token=6)
        dest = FIXED_BASE
        before = k.vmstat_snapshot()
        free = k.mem.nr_free
        assert p.mremap(a, 4 * MiB, 4 * MiB, MREMAP_MAYMOVE | MREMAP_FIXED, dest) == dest
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 0, d
        assert smaps_anon_huge_kb(p, dest, dest + 4 * MiB) == 4096
        assert "hg" in smaps_vma(p, dest).vm_flags
        assert k.mem.nr_free == free
        assert vma_at(p, a) is None
        got = tokens(p, dest, 1024)
        assert got[:768] == [5] * 768 and got[768] == 6 and got[769:] == [5] * 255

    def test_grow_with_maymove_keeps_thps(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 2 * MiB, token=5)
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * MiB)
        before = k.vmstat_snapshot()
        new = p.mremap(a, 2 * MiB, 4 * MiB, MREMAP_MAYMOVE)
        assert new != a and new % PMD == 0              # a PMD-multiple new length is THP aligned
        assert vmstat_delta(k, before)["thp_split_pmd"] == 0
        assert smaps_anon_huge_kb(p, new, new + 4 * MiB) == 2048
        assert tokens(p, new, 1) == [5]

    def test_unaligned_destination_splits_pmds(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=5)
        dest = FIXED_BASE + PAGE
        before = k.vmstat_snapshot()
        p.mremap(a, 4 * MiB, 4 * MiB, MREMAP_MAYMOVE | MREMAP_FIXED, dest)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 2, d
        assert d["thp_deferred_split_page"] == 0, d
        assert smaps_anon_huge_kb(p, dest, dest + 4 * MiB) == 0
        assert rss_kb(p) == 4096
        assert tokens(p, dest, 1024) == [5] * 1024

    def test_fixed_replaces_destination(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, token=1, addr=FIXED_BASE)
        d = small_region(p, 4, token=9, addr=FIXED_BASE + 16 * PAGE)
        free = k.mem.nr_free
        assert p.mremap(a, 2 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, d + PAGE) == d + PAGE
        assert tokens(p, d, 4) == [9, 1, 1, 9]
        assert k.mem.nr_free == free + 2                # the two replaced pages
        assert vma_at(p, a) is None
        assert rss_kb(p) == 16

    @pytest.mark.parametrize("off", [1, 0x800, PAGE - 1])
    def test_unaligned_old_addr(self, k: Kernel, p: Process, off: int) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mremap, a + off, PAGE, 2 * PAGE, MREMAP_MAYMOVE)

    def test_new_len_zero(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mremap, a, 2 * PAGE, 0, MREMAP_MAYMOVE)

    def test_fixed_without_maymove(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mremap, a, 2 * PAGE, 2 * PAGE, MREMAP_FIXED, FIXED_BASE)

    def test_unknown_flags(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.mremap, a, 2 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | 0x100)

    def test_old_range_not_in_one_vma(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        # An adjacent mapping with other flags: a VMA of its own.
        p.mmap(2 * PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * PAGE)
        assert len(p.vmas()) == 2
        # Growing: check_prep_vma() needs [addr, addr+old_len) inside the VMA at addr.
        expect_error(k, [p], errno.EFAULT, p.mremap, a, 4 * PAGE, 8 * PAGE, MREMAP_MAYMOVE)
        expect_error(k, [p], errno.EFAULT, p.mremap, a + PAGE, 2 * PAGE, 3 * PAGE, MREMAP_MAYMOVE)

    def test_old_addr_unmapped(self, k: Kernel, p: Process) -> None:
        small_region(p, 2, addr=FIXED_BASE + 4 * PAGE)
        expect_error(k, [p], errno.EFAULT, p.mremap, FIXED_BASE, PAGE, 2 * PAGE, MREMAP_MAYMOVE)
        expect_error(k, [p], errno.EFAULT, p.mremap, FIXED_BASE, 5 * PAGE, 6 * PAGE, MREMAP_MAYMOVE)

    def test_cannot_grow_without_maymove(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2, addr=FIXED_BASE)
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a + 2 * PAGE)
        expect_error(k, [p], errno.ENOMEM, p.mremap, a, 2 * PAGE, 4 * PAGE)
        # Not at the end of its VMA: no in-place growth either.
        expect_error(k, [p], errno.ENOMEM, p.mremap, a, PAGE, 2 * PAGE)

    # Kernel details of 6.18 mm/mremap.c beyond the basic errno table.

    def test_shrink_may_cross_vma_boundaries(self, k: Kernel, p: Process) -> None:
        """check_prep_vma(): "We permit crossing of boundaries for the range being unmapped
        due to a shrink" - only [addr, addr+new_len) must lie in the VMA."""
        a = small_region(p, 2, token=1, addr=FIXED_BASE)
        b = small_region(p, 2, token=2, addr=FIXED_BASE + 2 * PAGE)
        p.mprotect(b, 2 * PAGE, PROT_READ)
        assert p.mremap(a, 4 * PAGE, PAGE) == a
        assert [(v.start, v.end) for v in p.vmas()] == [(a, a + PAGE)]

    def test_same_size_without_move_is_a_no_op(self, k: Kernel, p: Process) -> None:
        """MREMAP_NO_RESIZE needs only a VMA at addr: check_prep_vma() asks nothing more of a
        call that maps nothing new (vrm_will_map_new() false), so the range may span VMAs."""
        a = small_region(p, 2, addr=FIXED_BASE)
        b = small_region(p, 2, addr=FIXED_BASE + 2 * PAGE)
        p.mprotect(b, 2 * PAGE, PROT_READ)
        before = state(k, [p])
        assert p.mremap(a, 4 * PAGE, 4 * PAGE) == a
        assert state(k, [p]) == before

    def test_fixed_move_of_several_vmas(self, k: Kernel, p: Process) -> None:
        """Since v6.17 remap_move() moves every VMA of [addr, addr+old_len) when
        MREMAP_FIXED is given and old_len == new_len, keeping the gaps between them."""
        a = small_region(p, 2, token=1, addr=FIXED_BASE)
        small_region(p, 2, token=2, addr=a + 3 * PAGE)  # one page of gap after a
        dest = FIXED_BASE + 64 * PAGE
        assert p.mremap(a, 5 * PAGE, 5 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest) == dest
        assert [(v.start, v.end) for v in p.vmas()] == [(dest, dest + 2 * PAGE),
                                                        (dest + 3 * PAGE, dest + 5 * PAGE)]
        assert tokens(p, dest, 2) == [1, 1] and tokens(p, dest + 3 * PAGE, 2) == [2, 2]

    # Which of check_prep_vma()'s checks apply to which call (Linux 6.18, verified on the
    # running kernel with the same layouts: tests/test_realkernel_vma.py).

    @pytest.mark.parametrize("layout, old_pages, new_pages", [
        ("two", 3, 2),          # the kept range [a, a+2) spans the R VMA and the RW one
        ("two", 3, 1),          # the unmapped tail spans both
        ("hole", 4, 2),         # the old range runs into a hole
        ("hole", 4, 3),         # the kept range itself runs into the hole
    ])
    def test_shrink_in_place_needs_only_a_vma_at_old_addr(self, k: Kernel, p: Process, layout: str,
                                                          old_pages: int, new_pages: int) -> None:
        """An in-place shrink (old_len > new_len, no MREMAP_FIXED/DONTUNMAP) maps nothing new:
        check_prep_vma() returns after finding the VMA at addr, and shrink_vma() unmaps
        [addr + new_len, addr + old_len) whatever it holds."""
        a = FIXED_BASE
        if layout == "two":
            p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
            small_region(p, 2, token=2, addr=a + PAGE)
        else:
            small_region(p, 1, token=2, addr=a)
        assert p.mremap(a, old_pages * PAGE, new_pages * PAGE) == a
        kept = [(v.start - a, v.end - a) for v in p.vmas()]
        if layout == "two":
            assert kept == ([(0, PAGE), (PAGE, 2 * PAGE)] if new_pages == 2 else [(0, PAGE)])
        else:
            assert kept == [(0, PAGE)]
        for flags in (MREMAP_MAYMOVE, 0):                  # MREMAP_MAYMOVE changes nothing here
            assert p.mremap(a, 4 * PAGE, PAGE, flags) == a

    def test_shrink_with_unmapped_old_addr_is_efault(self, k: Kernel, p: Process) -> None:
        small_region(p, 2, addr=FIXED_BASE + PAGE)
        expect_error(k, [p], errno.EFAULT, p.mremap, FIXED_BASE, 4 * PAGE, PAGE)
        expect_error(k, [p], errno.EFAULT, p.mremap, FIXED_BASE, 2 * PAGE, 2 * PAGE)   # same size too

    def test_zero_old_len_looks_up_the_vma_first(self, k: Kernel, p: Process) -> None:
        """old_len 0 on a private mapping is EINVAL, but only once a VMA was found at addr."""
        a = small_region(p, 1, addr=FIXED_BASE)
        expect_error(k, [p], errno.EINVAL, p.mremap, a, 0, PAGE, MREMAP_MAYMOVE)
        expect_error(k, [p], errno.EFAULT, p.mremap, a + 8 * PAGE, 0, PAGE, MREMAP_MAYMOVE)

    def test_shrink_and_move_needs_the_kept_part_in_one_vma(self, k: Kernel, p: Process) -> None:
        """A shrink that moves (MREMAP_FIXED) checks [addr, addr + new_len) against the VMA at
        addr (old_len = new_len in check_prep_vma()); the tail may cross boundaries."""
        a = FIXED_BASE
        dest = FIXED_BASE + 40 * PAGE
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        small_region(p, 2, token=2, addr=a + PAGE)
        expect_error(k, [p], errno.EFAULT, p.mremap, a, 3 * PAGE, 2 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest)
        assert p.mremap(a, 3 * PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest) == dest
        assert [(v.start - a, v.end - a, v.perms()) for v in p.vmas()] == [(40 * PAGE, 41 * PAGE, "r--p")]
        b = small_region(p, 1, token=3, addr=a)                   # then a hole after it
        assert p.mremap(b, 3 * PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest + 8 * PAGE) == dest + 8 * PAGE
        assert tokens(p, dest + 8 * PAGE, 1) == [3] and vma_at(p, b) is None

    def test_fixed_move_of_several_vmas_must_start_in_a_vma(self, k: Kernel, p: Process) -> None:
        """remap_move(): "No gap permitted at the start of the range"."""
        small_region(p, 2, addr=FIXED_BASE + PAGE)
        expect_error(k, [p], errno.EFAULT, p.mremap, FIXED_BASE, 3 * PAGE, 3 * PAGE,
                     MREMAP_MAYMOVE | MREMAP_FIXED, FIXED_BASE + 40 * PAGE)

    def test_fixed_move_of_several_vmas_unmaps_only_each_part_destination(self, k: Kernel, p: Process) -> None:
        """Each VMA's part goes through mremap_to(), which unmaps that part's destination only:
        what is mapped across from a gap, or past the last VMA, stays."""
        a, dest = FIXED_BASE, FIXED_BASE + 40 * PAGE
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        small_region(p, 1, token=2, addr=a + 2 * PAGE)
        p.mmap(8 * PAGE, prot=PROT_NONE, flags=ANON | MAP_FIXED_NOREPLACE, addr=dest)
        assert p.mremap(a, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, dest) == dest
        assert [(v.start - dest, v.end - dest, v.perms()) for v in p.vmas()] == [
            (0, PAGE, "r--p"), (PAGE, 2 * PAGE, "---p"), (2 * PAGE, 3 * PAGE, "rw-p"), (3 * PAGE, 8 * PAGE, "---p")]
        assert tokens(p, dest + 2 * PAGE, 1) == [2]

    def test_dontunmap_with_fixed_moves_several_vmas(self, k: Kernel, p: Process) -> None:
        """MREMAP_FIXED with old_len == new_len is a remap_move() with MREMAP_DONTUNMAP too."""
        a, dest = FIXED_BASE, FIXED_BASE + 40 * PAGE
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=a)
        small_region(p, 2, token=2, addr=a + PAGE)
        flags = MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP
        assert p.mremap(a, 3 * PAGE, 3 * PAGE, flags, dest) == dest
        assert [(v.start - a, v.end - a) for v in p.vmas()] == [(0, PAGE), (PAGE, 3 * PAGE),
                                                                 (40 * PAGE, 41 * PAGE), (41 * PAGE, 43 * PAGE)]
        assert tokens(p, dest + PAGE, 2) == [2, 2] and tokens(p, a + PAGE, 2) == [0, 0]
        # without MREMAP_FIXED it is mremap_to() of one VMA: the range must lie in it
        expect_error(k, [p], errno.EFAULT, p.mremap, a, 3 * PAGE, 3 * PAGE, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)

    @pytest.mark.parametrize("fixed", [False, True])
    def test_dontunmap_leaves_the_old_vma_whole(self, k: Kernel, p: Process, fixed: bool) -> None:
        """move_vma() with MREMAP_DONTUNMAP copies the VMA and moves the pages; the old VMA is
        neither unmapped nor split, and keeps its anon_vma unless all of it moved."""
        a = small_region(p, 6, token=4, addr=FIXED_BASE)
        dest = FIXED_BASE + 40 * PAGE
        flags = MREMAP_MAYMOVE | MREMAP_DONTUNMAP | (MREMAP_FIXED if fixed else 0)
        assert p.mremap(a + 2 * PAGE, 2 * PAGE, 2 * PAGE, flags, dest) == dest
        assert [(v.start - a, v.end - a) for v in p.vmas()] == [(0, 6 * PAGE), (40 * PAGE, 42 * PAGE)]
        assert tokens(p, a, 6) == [4, 4, 0, 0, 4, 4] and tokens(p, dest, 2) == [4, 4]
        assert vma_at(p, a).anon_vma

    @pytest.mark.parametrize("new_off", [2 * PAGE, 40 * PAGE + 1])
    def test_dontunmap_hint_is_checked_like_a_fixed_address(self, k: Kernel, p: Process, new_off: int) -> None:
        """check_mremap_params() checks new_addr whenever one is implied, MREMAP_DONTUNMAP's
        hint included: overlapping the old range or unaligned is EINVAL."""
        a = small_region(p, 6, addr=FIXED_BASE)
        expect_error(k, [p], errno.EINVAL, p.mremap, a, 4 * PAGE, 4 * PAGE,
                     MREMAP_MAYMOVE | MREMAP_DONTUNMAP, a + new_off)


# -------------------------------------------------------------------------------------------
# madvise
# -------------------------------------------------------------------------------------------

class TestMadvise:
    def test_hugepage_nohugepage_split_merge_and_vmflags(self, k: Kernel, p: Process) -> None:
        a = p.mmap(8 * MiB)
        p.madvise(a + 2 * MiB, 2 * MiB, MADV_HUGEPAGE)
        sm = smaps_vmas(p)
        assert [(v.start, v.end) for v in sm] == [(a, a + 2 * MiB), (a + 2 * MiB, a + 4 * MiB),
                                                  (a + 4 * MiB, a + 8 * MiB)]
        assert ["hg" in v.vm_flags for v in sm] == [False, True, False]
        assert [v.thp_eligible for v in sm] == [0, 1, 0]          # enabled=madvise
        p.madvise(a + 2 * MiB, 2 * MiB, MADV_NOHUGEPAGE)
        sm = smaps_vmas(p)
        assert len(sm) == 3
        assert "nh" in sm[1].vm_flags and "hg" not in sm[1].vm_flags
        assert sm[1].thp_eligible == 0
        p.madvise(a, 8 * MiB, MADV_HUGEPAGE)
        sm = smaps_vmas(p)
        assert [(v.start, v.end) for v in sm] == [(a, a + 8 * MiB)]
        assert "hg" in sm[0].vm_flags and "nh" not in sm[0].vm_flags
        p.madvise(a, 8 * MiB, MADV_NOHUGEPAGE)
        assert len(p.vmas()) == 1 and p.vmas()[0].flags & VM_NOHUGEPAGE

    def test_hugepage_leaves_existing_mappings(self, k: Kernel, p: Process) -> None:
        a = p.mmap(4 * MiB)
        p.write(a, 4 * MiB, token=1)                    # enabled=madvise: small pages
        before = k.vmstat_snapshot()
        p.madvise(a, 4 * MiB, MADV_HUGEPAGE)
        assert vmstat_delta(k, before) == {}
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 0
        assert rss_kb(p) == 4096

    def test_hugepage_affects_later_faults(self, k: Kernel, p: Process) -> None:
        a = p.mmap(4 * MiB)
        p.madvise(a, 2 * MiB, MADV_HUGEPAGE)
        before = k.vmstat_snapshot()
        p.write(a, 4 * MiB, token=1)
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 1
        assert smaps_anon_huge_kb(p, a, a + 2 * MiB) == 2048
        assert smaps_anon_huge_kb(p, a + 2 * MiB, a + 4 * MiB) == 0

    def test_dontfork_and_dofork(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=7, addr=FIXED_BASE)
        keep = small_region(p, 1, token=8, addr=FIXED_BASE + 8 * PAGE)
        p.madvise(a, 4 * PAGE, MADV_DONTFORK)
        assert vma_at(p, a).flags & VM_DONTCOPY
        assert "dc" in smaps_vma(p, a).vm_flags
        c = p.fork()
        assert vma_at(c, a) is None
        assert [(v.start, v.end) for v in c.vmas()] == [(keep, keep + PAGE)]
        assert rss_kb(c) == 4
        before = state(k, [p, c])
        with pytest.raises(SegmentationFault) as info:
            c.read(a + PAGE)
        assert info.value.addr == a + PAGE
        with pytest.raises(SegmentationFault):
            c.write(a, 1)
        assert state(k, [p, c]) == before
        assert tokens(p, a, 4) == [7] * 4
        p.madvise(a, 4 * PAGE, MADV_DOFORK)
        assert not vma_at(p, a).flags & VM_DONTCOPY
        c2 = p.fork()
        assert tokens(c2, a, 4) == [7] * 4
        assert rss_kb(c2) == 20

    def test_wipeonfork_and_keeponfork(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=7)
        t = thp_region(p, 2 * MiB, token=6)
        p.madvise(a, 4 * PAGE, MADV_WIPEONFORK)
        p.madvise(t, 2 * MiB, MADV_WIPEONFORK)
        assert vma_at(p, a).flags & VM_WIPEONFORK and "wf" in smaps_vma(p, a).vm_flags
        c = p.fork()
        assert vma_at(c, a) is not None and vma_at(c, t) is not None
        assert rss_kb(c) == 0                           # nothing copied
        assert tokens(c, a, 4) == [0] * 4
        assert tokens(c, t, 512) == [0] * 512
        assert tokens(p, a, 4) == [7] * 4
        assert tokens(p, t, 512) == [6] * 512
        c.write(a, 1, token=9)                          # the child's pages are its own
        assert tokens(p, a, 1) == [7]
        p.madvise(a, 4 * PAGE, MADV_KEEPONFORK)
        p.madvise(t, 2 * MiB, MADV_KEEPONFORK)
        assert not vma_at(p, a).flags & VM_WIPEONFORK
        c2 = p.fork()
        assert tokens(c2, a, 4) == [7] * 4
        assert tokens(c2, t, 1) == [6]
        assert smaps_anon_huge_kb(c2, t, t + 2 * MiB) == 2048

    def test_dontneed_zeroes_and_drops_rss(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=7)
        free = k.mem.nr_free
        p.madvise(a + PAGE, 2 * PAGE, MADV_DONTNEED)
        assert rss_kb(p) == 8
        assert k.mem.nr_free == free + 2
        assert tokens(p, a, 4) == [7, 0, 0, 7]
        assert rss_kb(p) == 8                           # read faults map the zero page
        assert len(p.vmas()) == 1                       # no VMA change

    def test_dontneed_on_part_of_a_thp_splits_the_pmd(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=7)
        before = k.vmstat_snapshot()
        p.madvise(a + PAGE, PAGE, MADV_DONTNEED)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 1, d
        assert d["thp_deferred_split_page"] == 1, d
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 2048
        assert rss_kb(p) == 4096 - 4
        assert tokens(p, a, 3) == [7, 0, 7]

    def test_dontneed_of_whole_thp_frees_it(self, k: Kernel, p: Process) -> None:
        a = thp_region(p, 4 * MiB, token=7)
        free = k.mem.nr_free
        before = k.vmstat_snapshot()
        p.madvise(a, 2 * MiB, MADV_DONTNEED)
        d = vmstat_delta(k, before)
        assert d["thp_split_pmd"] == 0, d
        assert k.mem.nr_free == free + 512
        assert rss_kb(p) == 2048

    def test_free_marks_exclusive_pages_lazyfree(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 4, token=7)
        t = thp_region(p, 2 * MiB, token=6)
        p.madvise(a, 4 * PAGE, MADV_FREE)
        p.madvise(t, 2 * MiB, MADV_FREE)
        assert smaps_vma(p, a).kb("LazyFree") == 16
        assert smaps_vma(p, t).kb("LazyFree") == 2048
        assert smaps_vma(p, t).kb("AnonHugePages") == 2048   # a whole PMD stays mapped
        assert rss_kb(p) == 16 + 2048
        # Until reclaim comes, the data is still there; a write makes the page dirty again.
        assert tokens(p, a, 1) == [7]
        p.write(a, 1, token=8)
        assert smaps_vma(p, a).kb("LazyFree") == 12

    def test_free_skips_shared_thp(self, k: Kernel, p: Process) -> None:
        """madvise_free_huge_pmd(): a folio that may be mapped by another mm is skipped."""
        t = thp_region(p, 2 * MiB, token=6)
        c = p.fork()
        before = k.vmstat_snapshot()
        p.madvise(t, 2 * MiB, MADV_FREE)
        assert vmstat_delta(k, before) == {}
        assert smaps_vma(p, t).kb("LazyFree") == 0
        assert smaps_vma(c, t).kb("LazyFree") == 0
        assert smaps_anon_huge_kb(p, t, t + 2 * MiB) == 2048

    def test_unknown_advice(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.madvise, a, 2 * PAGE, 12345)
        expect_error(k, [p], errno.EINVAL, p.madvise, a, 0, 12345)   # advice checked first
        expect_error(k, [p], errno.EINVAL, p.madvise, a, 2 * PAGE, -1)

    @pytest.mark.parametrize("off", [1, 0x800, PAGE - 1])
    def test_unaligned_start(self, k: Kernel, p: Process, off: int) -> None:
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.madvise, a + off, PAGE, MADV_DONTNEED)

    def test_hole_applies_advice_to_mapped_parts(self, k: Kernel, p: Process) -> None:
        """madvise_walk_vmas(): a gap sets ENOMEM but the walk goes on."""
        a = p.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=FIXED_BASE)
        b = p.mmap(2 * PAGE, flags=ANON | MAP_FIXED_NOREPLACE, addr=FIXED_BASE + 3 * PAGE)
        with pytest.raises(KernelError) as info:
            p.madvise(a, 5 * PAGE, MADV_HUGEPAGE)
        assert info.value.errno == errno.ENOMEM
        assert vma_at(p, a).flags & VM_HUGEPAGE and vma_at(p, b).flags & VM_HUGEPAGE
        p.write(a, 2 * PAGE, token=4)
        p.write(b, 2 * PAGE, token=5)
        with pytest.raises(KernelError) as info:
            p.madvise(a + PAGE, 6 * PAGE, MADV_DONTNEED)    # hole in the middle and at the end
        assert info.value.errno == errno.ENOMEM
        assert tokens(p, a, 2) == [4, 0]
        assert tokens(p, b, 2) == [0, 0]

    def test_wholly_unmapped_range(self, k: Kernel, p: Process) -> None:
        small_region(p, 2, addr=FIXED_BASE + 4 * PAGE)
        expect_error(k, [p], errno.ENOMEM, p.madvise, FIXED_BASE, 2 * PAGE, MADV_HUGEPAGE)
        expect_error(k, [p], errno.ENOMEM, p.madvise, FIXED_BASE, 2 * PAGE, MADV_DONTNEED)

    def test_zero_length_is_a_no_op(self, k: Kernel, p: Process) -> None:
        before = state(k, [p])
        p.madvise(FIXED_BASE, 0, MADV_HUGEPAGE)
        assert state(k, [p]) == before

    def test_range_wraps(self, k: Kernel, p: Process) -> None:
        """check_input_range(): start + len < start (or len rounding up to 0) is EINVAL."""
        a = small_region(p, 2)
        expect_error(k, [p], errno.EINVAL, p.madvise, a, U64 - PAGE, MADV_DONTNEED)
        expect_error(k, [p], errno.EINVAL, p.madvise, a, U64 - 1, MADV_DONTNEED)

    def test_dontdump_is_valid_advice(self, k: Kernel, p: Process) -> None:
        """MADV_DONTDUMP is in madvise_behavior_valid(): it sets VM_DONTDUMP ("dd")."""
        a = small_region(p, 2)
        p.madvise(a, 2 * PAGE, MADV_DONTDUMP)
        assert "dd" in smaps_vma(p, a).vm_flags


# -------------------------------------------------------------------------------------------
# prctl(PR_SET_THP_DISABLE / PR_GET_THP_DISABLE)
# -------------------------------------------------------------------------------------------

class TestPrctlThpDisable:
    def test_disable_completely(self, k: Kernel, p: Process) -> None:
        assert p.prctl(PR_GET_THP_DISABLE) == 0
        assert p.prctl(PR_SET_THP_DISABLE, 1) == 0
        assert p.prctl(PR_GET_THP_DISABLE) == 1
        a = thp_region(p, 4 * MiB, populate=False)
        assert smaps_vma(p, a).thp_eligible == 0
        before = k.vmstat_snapshot()
        p.write(a, 4 * MiB, token=1)
        d = vmstat_delta(k, before)
        assert d["thp_fault_alloc"] == 0 and d["thp_fault_fallback"] == 0, d
        assert smaps_anon_huge_kb(p, a, a + 4 * MiB) == 0
        assert rss_kb(p) == 4096

    def test_reenable(self, k: Kernel, p: Process) -> None:
        p.prctl(PR_SET_THP_DISABLE, 1)
        p.prctl(PR_SET_THP_DISABLE, 0)
        assert p.prctl(PR_GET_THP_DISABLE) == 0
        a = thp_region(p, 2 * MiB, populate=False)
        assert smaps_vma(p, a).thp_eligible == 1
        before = k.vmstat_snapshot()
        p.write(a, 2 * MiB)
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 1

    def test_disable_except_advised(self, k: Kernel, p: Process) -> None:
        k.sysfs.write("enabled", "always")
        assert p.prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED) == 0
        assert p.prctl(PR_GET_THP_DISABLE) == 1 | PR_THP_DISABLE_EXCEPT_ADVISED
        plain = p.mmap(4 * MiB)
        advised = p.mmap(4 * MiB)
        p.madvise(advised, 4 * MiB, MADV_HUGEPAGE)
        assert smaps_vma(p, plain).thp_eligible == 0
        assert smaps_vma(p, advised).thp_eligible == 1
        before = k.vmstat_snapshot()
        p.write(plain, 4 * MiB)
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 0
        p.write(advised, 4 * MiB)
        assert vmstat_delta(k, before)["thp_fault_alloc"] == 2
        assert smaps_anon_huge_kb(p, plain, plain + 4 * MiB) == 0
        assert smaps_anon_huge_kb(p, advised, advised + 4 * MiB) == 4096
        # Switching to "completely" drops the exception.
        p.prctl(PR_SET_THP_DISABLE, 1)
        assert p.prctl(PR_GET_THP_DISABLE) == 1
        assert smaps_vma(p, advised).thp_eligible == 0

    @pytest.mark.parametrize("flags", [0, PR_THP_DISABLE_EXCEPT_ADVISED])
    def test_inherited_by_fork(self, k: Kernel, p: Process, flags: int) -> None:
        p.prctl(PR_SET_THP_DISABLE, 1, flags)
        c = p.fork()
        assert c.prctl(PR_GET_THP_DISABLE) == 1 | flags
        a = thp_region(c, 2 * MiB, populate=False)
        b = c.mmap(2 * MiB)
        before = k.vmstat_snapshot()
        c.write(a, 2 * MiB)
        c.write(b, 2 * MiB)
        expected = 1 if flags else 0                    # only the MADV_HUGEPAGE region, if any
        assert vmstat_delta(k, before)["thp_fault_alloc"] == expected

    @pytest.mark.parametrize("args", [
        (PR_SET_THP_DISABLE, 1, 0, 1, 0),
        (PR_SET_THP_DISABLE, 1, 0, 0, 1),
        (PR_SET_THP_DISABLE, 0, PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0),   # flags only to disable
        (PR_SET_THP_DISABLE, 1, 1, 0, 0),                                # unknown flag bits
        (PR_SET_THP_DISABLE, 1, 4, 0, 0),
        (PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED | 1, 0, 0),
        (PR_GET_THP_DISABLE, 1, 0, 0, 0),
        (PR_GET_THP_DISABLE, 0, 1, 0, 0),
        (PR_GET_THP_DISABLE, 0, 0, 1, 0),
        (PR_GET_THP_DISABLE, 0, 0, 0, 1),
    ])
    def test_bad_args(self, k: Kernel, p: Process, args: tuple) -> None:
        p.prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED)
        expect_error(k, [p], errno.EINVAL, p.prctl, *args)
        assert p.prctl(PR_GET_THP_DISABLE) == 1 | PR_THP_DISABLE_EXCEPT_ADVISED

    def test_unknown_option(self, k: Kernel, p: Process) -> None:
        expect_error(k, [p], errno.EINVAL, p.prctl, 0x7fff_0000)

    def test_arg2_is_a_boolean(self, k: Kernel, p: Process) -> None:
        """prctl_set_thp_disable(bool thp_disable, ...): any non-zero arg2 disables."""
        assert p.prctl(PR_SET_THP_DISABLE, 2) == 0
        assert p.prctl(PR_GET_THP_DISABLE) == 1


# -------------------------------------------------------------------------------------------
# fork / exit
# -------------------------------------------------------------------------------------------

class TestForkExit:
    def test_child_rss_counters(self, k: Kernel, p: Process) -> None:
        t = thp_region(p, 4 * MiB, token=1)
        s = small_region(p, 3, token=2)
        assert rss_kb(p) == 4096 + 12
        c = p.fork()
        assert rss_kb(c) == rss_kb(p) == 4096 + 12
        assert smaps_anon_huge_kb(c, t, t + 4 * MiB) == 4096
        assert p.status()["VmPTE"] > 0 and c.status()["VmPTE"] > 0
        c.write(t + PAGE, 1, token=3)                   # PMD split + 4 KiB COW: same rss
        c.write(s, 1, token=3)
        assert rss_kb(c) == rss_kb(p) == 4096 + 12
        assert smaps_anon_huge_kb(c, t, t + 4 * MiB) == 2048
        assert smaps_anon_huge_kb(p, t, t + 4 * MiB) == 4096
        c.madvise(s + PAGE, PAGE, MADV_DONTNEED)
        assert rss_kb(c) == 4096 + 8
        assert rss_kb(p) == 4096 + 12
        c.munmap(t, 2 * MiB)
        assert rss_kb(c) == 2048 + 8
        c.exit()
        assert rss_kb(p) == 4096 + 12
        assert tokens(p, t, 2) == [1, 1] and tokens(p, s, 3) == [2, 2, 2]

    def test_exit_frees_everything(self, k: Kernel) -> None:
        free0 = k.mem.nr_free
        p = k.spawn()
        t = thp_region(p, 8 * MiB, token=1)
        s = small_region(p, 16, token=2)
        p.munmap(t + 6 * MiB + PAGE, PAGE)             # a partially mapped THP (deferred split)
        c = p.fork()
        for i in range(4):
            c.write(t + i * PMD + 2 * PAGE, 1, token=3)
        c.write(s, 16 * PAGE, token=4)
        g = c.fork()
        g.write(t, 8 * MiB - 2 * MiB, token=5)
        p.write(t + PMD, 1, token=6)
        assert k.mem.nr_free < free0
        for q in (c, p, g):
            q.exit()
        assert k.mem.nr_free == free0
        snap = k.vmstat_snapshot()
        assert snap["nr_anon_pages"] == 0
        assert snap["nr_anon_transparent_hugepages"] == 0
        assert snap["nr_free_pages"] == free0
        assert snap["nr_page_table_pages"] == 0
        assert k.meminfo_anon_huge_kb() == 0

    def test_calls_on_an_exited_process(self, k: Kernel, p: Process) -> None:
        a = small_region(p, 2)
        other = k.spawn()
        other.mmap(PAGE)
        p.exit()
        calls = [
            (p.mmap, (PAGE,)), (p.munmap, (a, PAGE)), (p.mprotect, (a, PAGE, PROT_READ)),
            (p.mremap, (a, PAGE, 2 * PAGE, MREMAP_MAYMOVE)), (p.madvise, (a, PAGE, MADV_DONTNEED)),
            (p.prctl, (PR_GET_THP_DISABLE,)), (p.prctl, (PR_SET_THP_DISABLE, 1)),
            (p.fork, ()), (p.exit, ()), (p.read, (a,)), (p.write, (a, 1)),
        ]
        for fn, args in calls:
            e = expect_error(k, [other], errno.ESRCH, fn, *args)
            assert not isinstance(e, SegmentationFault), fn.__name__

    def test_fork_copies_vma_layout_and_flags(self, k: Kernel, p: Process) -> None:
        small_region(p, 2, addr=FIXED_BASE)
        t = thp_region(p, 2 * MiB)
        p.mmap(PAGE, prot=PROT_READ, flags=ANON | MAP_FIXED_NOREPLACE, addr=FIXED_BASE + 4 * PAGE)
        c = p.fork()
        assert vma_list(c) == vma_list(p)
        assert vma_at(c, t).flags & VM_HUGEPAGE


def test_mprotect_to_the_protection_a_range_has_is_a_no_op():
    """mprotect_fixup() returns before touching a VMA whose flags would not change: no VMA split,
    no PMD split (the running kernel keeps the THP; thp_split_pmd does not move)."""
    from thpcow.kernel import MADV_HUGEPAGE, PROT_READ, PROT_WRITE
    k = Kernel(ram=512 << 20, check=True)
    p = k.spawn()
    a = p.mmap(4 << 20)
    p.madvise(a, 4 << 20, MADV_HUGEPAGE)
    p.write(a, 4 << 20, 1)
    p.mprotect(a + (1 << 20), 4096, PROT_READ | PROT_WRITE)
    assert len(p.vmas()) == 1
    assert k.vmstat_snapshot()["thp_split_pmd"] == 0
    assert p.smaps_fields(a)["AnonHugePages"] == 4096
    p.mprotect(a + (1 << 20), 4096, PROT_READ)         # a real change still splits both
    assert len(p.vmas()) == 3 and k.vmstat_snapshot()["thp_split_pmd"] == 1
