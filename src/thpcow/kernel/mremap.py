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


def check_mremap_params(old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> None:
    """Model of check_mremap_params(): the argument checks made before the VMA is looked up (EINVAL).

    Unknown flags, an unaligned old address, a zero or too large new length;
    and when a new address is implied (MREMAP_FIXED, or MREMAP_DONTUNMAP, for
    which it is a hint): a new range past TASK_SIZE or unaligned, no
    MREMAP_MAYMOVE, MREMAP_DONTUNMAP with a change of size, or an overlap of
    the old and new ranges.
    """
    call = "mremap"
    if flags & ~(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP):
        raise einval(call, f"flags={flags:#x}: unknown bits")
    if offset_in_page(old_addr):
        raise einval(call, f"old_address={old_addr:#x}: not page aligned")
    if not new_len:
        raise einval(call, "new_size=0")
    if new_len > TASK_SIZE:
        raise einval(call, f"new_size={new_len:#x}: larger than the address space")
    if not flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):        # vrm_implies_new_addr()
        return
    if new_addr > TASK_SIZE - new_len:
        raise einval(call, f"new_address={new_addr:#x}: the new range ends past the address space")
    if offset_in_page(new_addr):
        raise einval(call, f"new_address={new_addr:#x}: not page aligned")
    if not flags & MREMAP_MAYMOVE:
        raise einval(call, f"flags={flags:#x}: MREMAP_FIXED and MREMAP_DONTUNMAP need MREMAP_MAYMOVE")
    if flags & MREMAP_DONTUNMAP and old_len != new_len:
        raise einval(call, "MREMAP_DONTUNMAP needs old_size == new_size")
    if old_addr + old_len > new_addr and new_addr + new_len > old_addr:      # vrm_overlaps()
        raise einval(call, "old and new ranges overlap")


def check_prep_vma(old_addr: int, old_len: int, new_len: int, flags: int, vma: VMA | None) -> None:
    """Model of check_prep_vma(): the checks on the VMA at the old address.

    There must be a VMA containing ``old_addr`` (EFAULT).  Nothing more is
    asked of a call that maps nothing new: an in-place shrink (its unmapped
    tail may cross VMA boundaries and holes) or a same-size call without a
    new address.  A call that grows or moves needs a non-zero old length on a
    private mapping (EINVAL), and [old_addr, old_addr + old_len) inside that
    VMA (EFAULT); for a shrink that moves, only the part kept,
    [old_addr, old_addr + new_len).
    """
    call = "mremap"
    if vma is None:
        raise KernelError(E.EFAULT, call, f"old_address={old_addr:#x}: not mapped")
    if not (new_len > old_len or flags & (MREMAP_FIXED | MREMAP_DONTUNMAP)):   # vrm_will_map_new()
        return
    if not old_len:
        raise einval(call, "old_size=0 is only valid for shared mappings")
    checked = min(old_len, new_len)
    if checked > vma.end - old_addr:
        raise KernelError(E.EFAULT, call,
                          f"old_address={old_addr:#x} size={checked:#x}: not inside the mapping at old_address")


def do_mremap(k: Kernel, mm: MM, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int = 0) -> int:
    """Model of the mremap() system call (do_mremap() of Linux 6.18).

    The lengths are page aligned, check_mremap_params() rejects bad arguments
    (EINVAL), and a same-size MREMAP_FIXED call moves every VMA of the old
    range (remap_move()).  Otherwise check_prep_vma() judges the VMA at
    ``old_addr`` (EFAULT, EINVAL); then mremap_to() handles MREMAP_FIXED and
    MREMAP_DONTUNMAP, and mremap_at() resizes in place or moves.  ENOMEM: the
    mapping cannot grow in place and may not move, or there is no room.
    """
    old_len = PAGE_ALIGN(old_len)
    new_len = PAGE_ALIGN(new_len)
    check_mremap_params(old_addr, old_len, new_len, flags, new_addr)
    if flags & MREMAP_FIXED and old_len == new_len:          # vrm_move_only()
        return remap_move(k, mm, old_addr, old_len, new_addr, flags)
    vma = mm.find_vma(old_addr)
    check_prep_vma(old_addr, old_len, new_len, flags, vma)
    if flags & (MREMAP_FIXED | MREMAP_DONTUNMAP):
        return mremap_to(k, mm, old_addr, old_len, new_len, flags, new_addr)
    return mremap_at(k, mm, vma, old_addr, old_len, new_len, flags)


def mremap_at(k: Kernel, mm: MM, vma: VMA, old_addr: int, old_len: int, new_len: int, flags: int) -> int:
    """Model of mremap_at(): resize in place, or move to a free range (MREMAP_MAYMOVE).

    Same size: nothing to do.  Shrink: unmap [old_addr + new_len,
    old_addr + old_len), whatever it holds.  Grow (expand_vma()): in place
    when the old range ends where its VMA ends and the space after it is free
    (vma_merge_extend()), else move with MREMAP_MAYMOVE, else ENOMEM.
    """
    call = "mremap"
    if new_len == old_len:
        return old_addr
    if new_len < old_len:                                       # shrink_vma()
        do_munmap(k, mm, old_addr + new_len, old_len - new_len)
        return old_addr
    if vma.end - old_addr == old_len and not mm.vmas_in(vma.end, old_addr + new_len) and \
            old_addr + new_len <= TASK_SIZE:                    # vrm_can_expand_in_place()
        vma.end = old_addr + new_len
        merge_vmas(mm, vma.start, vma.end)
        return old_addr
    if not flags & MREMAP_MAYMOVE:
        raise KernelError(E.ENOMEM, call, f"old_address={old_addr:#x}: cannot grow in place without MREMAP_MAYMOVE")
    dest = get_unmapped_area(mm, new_len)
    if dest < 0:
        raise KernelError(E.ENOMEM, call, f"new_size={new_len:#x}: no room to move the mapping")
    return move_vma(k, mm, old_addr, old_len, new_len, dest, flags)


def mremap_to(k: Kernel, mm: MM, old_addr: int, old_len: int, new_len: int, flags: int, new_addr: int) -> int:
    """Model of mremap_to(): move to ``new_addr`` (MREMAP_FIXED) or to a free range (MREMAP_DONTUNMAP).

    MREMAP_FIXED first unmaps the new range; a shrink first unmaps the tail
    of the old range; MREMAP_DONTUNMAP takes ``new_addr`` as a hint.
    """
    call = "mremap"
    if flags & MREMAP_FIXED:
        do_munmap(k, mm, new_addr, new_len)
        if mm.find_vma(old_addr) is None:
            raise KernelError(E.EFAULT, call, f"old_address={old_addr:#x}: not mapped")
    if new_len < old_len:                                       # shrink_vma(), then move what is left
        do_munmap(k, mm, old_addr + new_len, old_len - new_len)
        if mm.find_vma(old_addr) is None:
            raise KernelError(E.EFAULT, call, f"old_address={old_addr:#x}: not mapped")
        old_len = new_len
    if not flags & MREMAP_FIXED:                                # vrm_set_new_addr(): a hint
        new_addr = get_unmapped_area(mm, new_len, new_addr)
        if new_addr < 0:
            raise KernelError(E.ENOMEM, call, f"new_size={new_len:#x}: no room to move the mapping")
    return move_vma(k, mm, old_addr, old_len, new_len, new_addr, flags)


def remap_move(k: Kernel, mm: MM, old_addr: int, length: int, new_addr: int, flags: int) -> int:
    """Model of remap_move() (since v6.17): a same-size MREMAP_FIXED move of every VMA in the old range.

    The old range must start inside a VMA (EFAULT); gaps after that are
    allowed and kept between the moved VMAs.  Each VMA's part is moved as by
    mremap_to(), which unmaps only that part's destination: whatever is
    mapped across from a gap stays.  MREMAP_DONTUNMAP applies to each part.
    """
    parts = [(max(v.start, old_addr), min(v.end, old_addr + length), v.start, v.end)
             for v in mm.vmas_in(old_addr, old_addr + length)]
    if not parts or parts[0][0] > old_addr:
        raise KernelError(E.EFAULT, "mremap", f"old_address={old_addr:#x}: not mapped")
    target = new_addr
    last_end = None
    for lo, hi, vstart, vend in parts:
        dest = target + (vstart - last_end if last_end is not None else 0)
        last_end = vend
        moved = mremap_to(k, mm, lo, hi - lo, hi - lo, flags, dest)
        target = moved + (hi - lo)
    return new_addr


def move_vma(k: Kernel, mm: MM, old_addr: int, old_len: int, new_len: int, new_addr: int, flags: int) -> int:
    """Model of move_vma(): copy_vma(), move_page_tables(), then unmap the old range.

    The new VMA takes the old one's flags and anon_vma; its pgoff follows the
    pages, or the new address for a VMA never faulted in.  MREMAP_DONTUNMAP
    leaves the old VMA in place, whole (not split), with its pages gone; it
    loses its anon_vma only when all of it was moved (dontunmap_complete()).
    """
    vma = mm.find_vma(old_addr)
    pgoff = vma.pgoff + PHYS_PFN(old_addr - vma.start) if vma.anon_vma else PHYS_PFN(new_addr)
    if flags & MREMAP_DONTUNMAP:
        src = vma
    else:
        (src,) = split_range(k, mm, old_addr, old_addr + old_len)
    dst = VMA(new_addr, new_addr + new_len, src.flags, src.anon_vma, pgoff, src.uncowed_parents)   # anon_vma_clone()
    mm.insert_vma(dst)
    move_page_tables(k, mm, src, old_addr, new_addr, old_len)
    if not flags & MREMAP_DONTUNMAP:
        mm.vmas.remove(src)
        free_pgtables(k, mm, old_addr, old_addr + old_len)
    elif src.start == old_addr and src.end == old_addr + old_len:
        src.anon_vma, src.uncowed_parents = 0, False      # unlink_anon_vmas()
    merge_vmas(mm, new_addr, new_addr + new_len)
    return new_addr
