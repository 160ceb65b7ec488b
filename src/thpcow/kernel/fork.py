"""Model of kernel/fork.c:dup_mmap() and kernel/exit.c for the memory side."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import VM_DONTCOPY, VM_LOCKED, VM_MAYBE_GUARD, VM_WIPEONFORK
from .mm import MM, VMA
from .khugepaged import khugepaged_fork
from . import memory

if TYPE_CHECKING:
    from .kernel import Kernel


def dup_mmap(k: Kernel, child: MM, parent: MM) -> None:
    """Model of dup_mmap(): copy the VMAs and, where they have an anon_vma, the page tables.

    VM_DONTCOPY (MADV_DONTFORK) VMAs are left out; VM_WIPEONFORK VMAs are
    copied empty (the child reads zeros); VM_LOCKED is not inherited; a VMA
    never faulted in has no anon_vma and nothing to copy.  The child inherits
    the THP-disable flags and khugepaged registration of the parent.  A
    VM_MAYBE_GUARD VMA's page tables (its guard markers) are copied even
    without an anon_vma.
    """
    child.thp_disable = parent.thp_disable
    child.mmap_base = parent.mmap_base
    for v in parent.vmas:
        if v.flags & VM_DONTCOPY:
            continue
        cv = VMA(v.start, v.end, v.flags & ~VM_LOCKED, 0, v.pgoff)
        child.vmas.append(cv)
        if v.flags & VM_WIPEONFORK or not (v.anon_vma or v.flags & VM_MAYBE_GUARD):
            continue                                # vma_needs_copy(): VM_MAYBE_GUARD is VM_COPY_ON_FORK
        if v.anon_vma:
            cv.anon_vma = k.new_anon_vma_id()       # anon_vma_fork()
            cv.uncowed_parents = True               # the chain holds the parent's anon_vmas too
        memory.copy_page_range(k, child, parent, v)
    khugepaged_fork(k, child, parent)
    k.flush_tlb_range(parent, 0, 1 << 47)            # flush_tlb_mm(oldmm): the parent was write-protected
