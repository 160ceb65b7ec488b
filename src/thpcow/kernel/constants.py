"""Constants with the kernel's names and values (x86-64, 4 KiB base pages), and the
address-arithmetic macros built on them (include/linux/pfn.h, align.h, mm.h).

The page-table index helpers (pmd_index(), pte_index(), ...) are in
:mod:`.pgtable`.
"""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PMD_MASK = ~(PMD_SIZE - 1)
PTRS_PER_PTE = 512
PTRS_PER_PMD = 512                 # PMD entries per PMD table: one table maps PUD_SIZE (1 GiB)
PUD_SIZE = PTRS_PER_PMD << PMD_SHIFT
HPAGE_PMD_SHIFT = PMD_SHIFT
HPAGE_PMD_ORDER = HPAGE_PMD_SHIFT - PAGE_SHIFT
HPAGE_PMD_NR = 1 << HPAGE_PMD_ORDER
HPAGE_PMD_SIZE = 1 << HPAGE_PMD_SHIFT
HPAGE_PMD_MASK = ~(HPAGE_PMD_SIZE - 1)
MAX_PAGE_ORDER = 10          # buddy orders 0..10 (4 KiB .. 4 MiB)


# -- address arithmetic ------------------------------------------------------------------------
# Plain operators on their arguments, so that each works on a Python int and on a
# NumPy integer array alike (one array expression, no loop).  Alignments are powers of two.
# thpcow also counts virtual pages (a "vpn" is addr >> PAGE_SHIFT); PFN_PHYS() and
# PHYS_PFN() convert those too.

def PFN_PHYS(pfn):
    """PFN_PHYS(): the address of page number ``pfn``."""
    return pfn << PAGE_SHIFT


def PHYS_PFN(addr):
    """PHYS_PFN(): the number of the page holding ``addr``."""
    return addr >> PAGE_SHIFT


def ALIGN(x, a):
    """ALIGN(): ``x`` rounded up to a multiple of ``a``."""
    return (x + (a - 1)) & ~(a - 1)


def ALIGN_DOWN(x, a):
    """ALIGN_DOWN(): ``x`` rounded down to a multiple of ``a``."""
    return x & ~(a - 1)


def IS_ALIGNED(x, a):
    """IS_ALIGNED(): is ``x`` a multiple of ``a``?"""
    return (x & (a - 1)) == 0


def PAGE_ALIGN(addr):
    """PAGE_ALIGN(): ``addr`` rounded up to a page boundary."""
    return (addr + (PAGE_SIZE - 1)) & PAGE_MASK


def PAGE_ALIGNED(addr):
    """PAGE_ALIGNED(): is ``addr`` on a page boundary?"""
    return (addr & ~PAGE_MASK) == 0


def offset_in_page(addr):
    """offset_in_page(): the offset of ``addr`` within its page."""
    return addr & ~PAGE_MASK

# Anonymous mTHP orders that have sysfs controls on x86-64: 16K .. 2M.
# Order 1 is never used for anonymous memory.
ANON_ORDERS = tuple(range(2, HPAGE_PMD_ORDER + 1))

# User address space (x86-64, 4-level paging).
TASK_SIZE = (1 << 47) - PAGE_SIZE
MMAP_MIN_ADDR = 0x10000
# Top of the mmap area for a task: below the stack gap.  The kernel picks it
# with randomization; the simulator uses a fixed base so that runs repeat.
MMAP_BASE = 0x7F00_0000_0000

# mmap / mprotect
PROT_NONE = 0x0
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
PROT_SEM = 0x8                # accepted on x86 (arch_validate_prot)
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
MAP_POPULATE = 0x8000
MAP_FIXED_NOREPLACE = 0x100000

# mremap
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MREMAP_DONTUNMAP = 4

# madvise (include/uapi/asm-generic/mman-common.h)
MADV_NORMAL = 0
MADV_RANDOM = 1
MADV_SEQUENTIAL = 2
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_FREE = 8
MADV_REMOVE = 9
MADV_DONTFORK = 10
MADV_DOFORK = 11
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15
MADV_DONTDUMP = 16
MADV_DODUMP = 17
MADV_WIPEONFORK = 18
MADV_KEEPONFORK = 19
MADV_COLD = 20
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_DONTNEED_LOCKED = 24
MADV_COLLAPSE = 25
MADV_GUARD_INSTALL = 102
MADV_GUARD_REMOVE = 103
# The 2026 series "mm: Support selecting doing direct COW for anonymous pmd entry".
MADV_THP_SETUP_BASE = 256
MADV_THP_COW = MADV_THP_SETUP_BASE + (1 << 0)
MADV_THP_SETUP_END = 258

U64 = (1 << 64) - 1

MADV_NAMES = {
    v: k for k, v in dict(globals()).items()
    if k.startswith("MADV_") and isinstance(v, int)
    and k not in ("MADV_THP_SETUP_BASE", "MADV_THP_SETUP_END")
}

# prctl
PR_SET_THP_DISABLE = 41
PR_GET_THP_DISABLE = 42
PR_THP_DISABLE_EXCEPT_ADVISED = 1 << 1

# vm_flags (include/linux/mm.h)
VM_READ = 0x00000001
VM_WRITE = 0x00000002
VM_EXEC = 0x00000004
VM_SHARED = 0x00000008
VM_MAYREAD = 0x00000010
VM_MAYWRITE = 0x00000020
VM_MAYEXEC = 0x00000040
VM_GROWSDOWN = 0x00000100
VM_MAYBE_GUARD = 0x00000800   # guard markers may be in the page tables (bit 11, shown "gu")
VM_LOCKED = 0x00002000
VM_DONTCOPY = 0x00020000
VM_DONTEXPAND = 0x00040000
VM_ACCOUNT = 0x00100000
VM_NORESERVE = 0x00200000
VM_HUGEPAGE = 0x20000000
VM_NOHUGEPAGE = 0x40000000
VM_WIPEONFORK = 0x02000000
VM_MERGEABLE = 0x80000000
VM_DONTDUMP = 0x04000000
VM_THP_COW = 1 << 43          # the 2026 series, VMA bit 43

# Two-letter mnemonics that /proc/PID/smaps prints in VmFlags (fs/proc/task_mmu.c)
VM_FLAG_MNEMONICS = (
    (VM_READ, "rd"), (VM_WRITE, "wr"), (VM_EXEC, "ex"), (VM_SHARED, "sh"),
    (VM_MAYREAD, "mr"), (VM_MAYWRITE, "mw"), (VM_MAYEXEC, "me"),
    (VM_GROWSDOWN, "gd"), (VM_MAYBE_GUARD, "gu"), (VM_LOCKED, "lo"), (VM_DONTCOPY, "dc"),
    (VM_DONTEXPAND, "de"), (VM_ACCOUNT, "ac"), (VM_NORESERVE, "nr"),
    (VM_WIPEONFORK, "wf"), (VM_DONTDUMP, "dd"), (VM_HUGEPAGE, "hg"),
    (VM_NOHUGEPAGE, "nh"), (VM_MERGEABLE, "mg"), (VM_THP_COW, "tc"),
)


def order_to_kb(order: int) -> int:
    return (PAGE_SIZE << order) >> 10

