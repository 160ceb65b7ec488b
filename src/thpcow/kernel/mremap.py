"""Model of mm/mremap.c for private anonymous mappings."""

from __future__ import annotations

import errno as E
from typing import TYPE_CHECKING

import numpy as np

from .constants import (
    HPAGE_PMD_NR, HPAGE_PMD_SIZE, MREMAP_DONTUNMAP, MREMAP_FIXED, MREMAP_MAYMOVE, PAGE_ALIGN, PHYS_PFN, TASK_SIZE,
    offset_in_page,
)
from .errors import KernelError, einval
from .mm import MM, PMD_LEAF, PMD_NONE, PMD_TABLE, VMA, _PAGE_SPECIAL, pmd_index, pte_index
from .pgtable import pmd_addr_end
from . import huge_memory as hm
from . import memory, pgtable
from .mmap import do_munmap, get_unmapped_area, merge_vmas, split_range, free_pgtables

if TYPE_CHECKING:
    from .kernel import Kernel


def move_page_tables(k: Kernel, mm: MM, vma: VMA, old: int, new: int, length: int) -> None:
    """Model of move_page_tables(): move the entries of [old, old+length) to new.

    A whole, aligned PMD leaf moves as a PMD (move_huge_pmd()); anything else
    is moved PTE by PTE after splitting the source PMD.  Mappings keep their
    folios, references and mapcounts: only the address changes.
    """
    pt = mm.pt
    k.flush_tlb_range(mm, old, old + length)
    old_end, new_end = old + length, new + length
    off = 0
    while off < length:
        src = old + off
        dst = new + off
        # get_extent(): up to the end of the source's PMD block, the destination's, or the range
        chunk = min(pmd_addr_end(src, old_end) - src, pmd_addr_end(dst, new_end) - dst)
        s = pt.slot_of.get(pmd_index(src))
        if s is None or pt.pmd_kind[s] == PMD_NONE:
            off += chunk
            continue
        if pt.pmd_kind[s] == PMD_LEAF:
            if chunk == HPAGE_PMD_SIZE:
                d = pt.slot(pmd_index(dst))
                if pt.pmd_kind[d] == PMD_TABLE:              # an empty table there: free it
                    memory.pte_free(k, mm, d)
                # move_huge_pmd(): pmdp_huge_get_and_clear() at the source, set_pmd_at() at the destination
                fid, flags = pgtable.pmdp_huge_get_and_clear(k, mm, s)
                pgtable.set_pmd_at(k, mm, d, fid, flags)
                head = int(k.folios.head[fid])
                k.mem.vpn[head: head + HPAGE_PMD_NR] = PHYS_PFN(dst) + np.arange(HPAGE_PMD_NR)
                off += chunk
                continue
            hm.split_huge_pmd(k, mm, vma, s)
        srow = int(pt.pmd_row[s])
        d = pt.slot(pmd_index(dst))
        drow = memory.pte_alloc(k, mm, d)
        si = pte_index(src)
        di = pte_index(dst)
        n = PHYS_PFN(chunk)
        moved = pt.pte_pfn[srow, si: si + n]
        normal = (moved >= 0) & ~(pt.pte_flags[srow, si: si + n] & _PAGE_SPECIAL).astype(bool)
        k.mem.vpn[moved[normal]] = PHYS_PFN(dst) + np.flatnonzero(normal)
        pgtable.move_ptes(k, mm, srow, si, drow, di, n)
        off += chunk


def do_mremap(k: Kernel, mm: MM, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> int:
    """Model of the mremap() system call.

    EINVAL: unaligned addresses, unknown flags, MREMAP_FIXED without
    MREMAP_MAYMOVE, a zero new length, a zero old length on a private
    mapping, overlapping old and new ranges.  EFAULT: the old range is not
    inside one VMA.  ENOMEM: the mapping cannot grow in place and may not
    move, or there is no room to move it.
    """
    call = "mremap"
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        raise einval(call, f"flags={flags:#x}: unknown bits")
    if flags & MREMAP_FIXED and not flags & MREMAP_MAYMOVE:
        raise einval(call, "MREMAP_FIXED needs MREMAP_MAYMOVE")
    if flags & MREMAP_DONTUNMAP and not flags & MREMAP_MAYMOVE:
        raise einval(call, "MREMAP_DONTUNMAP needs MREMAP_MAYMOVE")
    if offset_in_page(old_addr):
        raise einval(call, f"old_address={old_addr:#x}: not page aligned")
    old_len = PAGE_ALIGN(old_len)
    new_len = PAGE_ALIGN(new_len)
    if not new_len:
        raise einval(call, "new_size=0")
    if not old_len:
        raise einval(call, "old_size=0 is only valid for shared mappings")
    if flags & MREMAP_DONTUNMAP and old_len != new_len:
        raise einval(call, "MREMAP_DONTUNMAP needs old_size == new_size")
    if flags & MREMAP_FIXED:
        if offset_in_page(new_addr):
            raise einval(call, f"new_address={new_addr:#x}: not page aligned")
        if new_addr + new_len > TASK_SIZE:
            raise einval(call, f"new_address={new_addr:#x}: outside the address space")
        if new_addr < old_addr + old_len and old_addr < new_addr + new_len:
            raise einval(call, "old and new ranges overlap")
    if not flags & (MREMAP_FIXED | MREMAP_DONTUNMAP) and new_len == old_len:
        return old_addr                          # nothing to do, before any range check
    vma = mm.find_vma(old_addr)
    if not flags & MREMAP_FIXED and new_len < old_len:
        # A shrink only needs what stays to be one mapping; the tail may span several.
        if vma is None or old_addr + new_len > vma.end:
            raise KernelError(E.EFAULT, call, f"old_address={old_addr:#x} new_size={new_len:#x}: not inside one mapping")
        do_munmap(k, mm, old_addr + new_len, old_len - new_len)
        return old_addr
    if vma is None or old_addr + old_len > vma.end:
        if flags & MREMAP_FIXED and old_len == new_len and not flags & MREMAP_DONTUNMAP and \
                mm.vmas_in(old_addr, old_addr + old_len):
            return _move_multi(k, mm, old_addr, old_len, new_addr)
        raise KernelError(E.EFAULT, call, f"old_address={old_addr:#x} old_size={old_len:#x}: not inside one mapping")
    if flags & MREMAP_FIXED:
        return _move(k, mm, old_addr, old_len, new_len, new_addr, flags)
    if flags & MREMAP_DONTUNMAP:                 # always moves; new_address is only a hint
        dest = get_unmapped_area(mm, new_len, new_addr)
        if dest < 0:
            raise KernelError(E.ENOMEM, call, f"new_size={new_len:#x}: no room to move the mapping")
        return _move(k, mm, old_addr, old_len, new_len, dest, flags)
    # Grow in place when the VMA ends here and the space after it is free.
    if vma.end == old_addr + old_len and not mm.vmas_in(vma.end, old_addr + new_len) and \
            old_addr + new_len <= TASK_SIZE:
        vma.end = old_addr + new_len
        merge_vmas(mm, vma.start, vma.end)
        return old_addr
    if not flags & MREMAP_MAYMOVE:
        raise KernelError(E.ENOMEM, call, f"old_address={old_addr:#x}: cannot grow in place without MREMAP_MAYMOVE")
    dest = get_unmapped_area(mm, new_len)
    if dest < 0:
        raise KernelError(E.ENOMEM, call, f"new_size={new_len:#x}: no room to move the mapping")
    return _move(k, mm, old_addr, old_len, new_len, dest, flags)


def _move_multi(k: Kernel, mm: MM, old_addr: int, length: int, new_addr: int) -> int:
    """Since v6.17: a same-size MREMAP_FIXED move of a range holding several VMAs
    moves each of them, keeping the gaps between them."""
    if mm.vmas_in(new_addr, new_addr + length):
        do_munmap(k, mm, new_addr, length)
    for v in split_range(k, mm, old_addr, old_addr + length):
        start, end = v.start, v.end
        _move(k, mm, start, end - start, end - start, new_addr + (start - old_addr), MREMAP_MAYMOVE)
    return new_addr


def _move(k: Kernel, mm: MM, old_addr: int, old_len: int, new_len: int, new_addr: int, flags: int) -> int:
    """Model of move_vma(): move [old_addr, +old_len) to new_addr, growing to new_len."""
    if mm.vmas_in(new_addr, new_addr + new_len):
        do_munmap(k, mm, new_addr, new_len)
    if new_len < old_len:
        do_munmap(k, mm, old_addr + new_len, old_len - new_len)
        old_len = new_len
    (src,) = split_range(k, mm, old_addr, old_addr + old_len)
    # copy_vma(): the pgoff follows the pages; a never-faulted VMA takes the new address's.
    dst = VMA(new_addr, new_addr + new_len, src.flags, src.anon_vma,
              src.pgoff if src.anon_vma else PHYS_PFN(new_addr))
    mm.insert_vma(dst)
    move_page_tables(k, mm, dst, old_addr, new_addr, old_len)
    if flags & MREMAP_DONTUNMAP:
        src.anon_vma = 0                       # the old VMA stays, empty: unlink_anon_vmas()
    else:
        mm.vmas.remove(src)
        free_pgtables(k, mm, old_addr, old_addr + old_len)
    merge_vmas(mm, new_addr, new_addr + new_len)
    return new_addr
