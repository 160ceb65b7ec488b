"""Model of mm/page_alloc.c: physical memory as 4 KiB frames, the buddy allocator, the watermarks.

Frames are NumPy arrays indexed by PFN; there is no Python object per page.
Free blocks of each order (0..MAX_PAGE_ORDER) sit on a free list; allocating
an order takes the smallest free block that is large enough and splits it
(``expand()``), freeing merges a block with its buddy as long as the buddy is
free too (``__free_one_page()``).

Free lists are insertion-ordered dicts used as ordered sets: allocation takes
the most recently freed block first (the kernel puts freed pages at the head
of the list and allocates from the head), which keeps runs deterministic.

The zone's watermarks are set at boot as ``__setup_per_zone_wmarks()`` sets
them (:func:`setup_per_zone_wmarks`); kswapd's use of them is in
:mod:`.vmscan`.  :func:`alloc_thp` is the allocator's path for one THP: the
free lists, then what the caller's gfp reclaim bits allow (direct compaction
or waking kcompactd).

Simplification: one node, one zone, no per-CPU lists, no migratetypes;
page-table pages are not taken from simulated RAM.
"""

from __future__ import annotations

import numpy as np

import enum
from typing import TYPE_CHECKING

from .constants import HPAGE_PMD_ORDER, MAX_PAGE_ORDER, PAGE_SHIFT, PAGE_SIZE
from .errors import InvariantViolation

if TYPE_CHECKING:
    from .kernel import Kernel

ZERO_PFN = 0                  # the shared zero page (a reserved frame)
PG_ANON_EXCLUSIVE = np.uint8(1)
PG_HWPOISON = np.uint8(2)     # memory_failure() marked the page poisoned (PageHWPoison())


class Gfp(enum.IntFlag):
    """Model of gfp_t (include/linux/gfp_types.h): the reclaim bits a THP allocation passes.

    The values are the kernel's bits; the names drop the leading underscores
    of __GFP_DIRECT_RECLAIM and __GFP_KSWAPD_RECLAIM.  No other gfp bit
    changes what the simulated allocator does.
    """

    DIRECT_RECLAIM = 1 << 10      # the caller may stall in direct reclaim and compaction
    KSWAPD_RECLAIM = 1 << 11      # wake kswapd (and through it kcompactd) when short


GFP_TRANSHUGE_LIGHT = Gfp(0)                     # fail fast: neither reclaim bit
GFP_TRANSHUGE = GFP_TRANSHUGE_LIGHT | Gfp.DIRECT_RECLAIM


def gfp_from(gfp) -> Gfp:
    """``gfp`` as a :class:`Gfp`.  Also takes the values thpcow used before: "direct",
    "kswapd", "light", and True/False for direct/light."""
    if isinstance(gfp, Gfp):
        return gfp
    if gfp is True or gfp == "direct":
        return GFP_TRANSHUGE
    if gfp is False or gfp == "light":
        return GFP_TRANSHUGE_LIGHT
    if gfp == "kswapd":
        return GFP_TRANSHUGE_LIGHT | Gfp.KSWAPD_RECLAIM
    if isinstance(gfp, int) and not isinstance(gfp, bool):
        return Gfp(gfp)
    raise ValueError(f"gfp={gfp!r}: not a Gfp, 'direct', 'kswapd', 'light', True or False")


class PhysMem:
    """Frames, their per-page state and the buddy free lists."""

    def __init__(self, nr_frames: int) -> None:
        if nr_frames < (1 << MAX_PAGE_ORDER) * 2:
            raise ValueError(f"nr_frames={nr_frames}: need at least {(1 << MAX_PAGE_ORDER) * 2} frames (8 MiB)")
        n = nr_frames
        self.nr_frames = n
        self.content = np.zeros(n, dtype=np.int64)     # token per frame (what the page holds)
        self.folio = np.full(n, -1, dtype=np.int32)    # owning folio id, -1 if none
        self.mapcount = np.zeros(n, dtype=np.int32)    # per-page PTE mapcount (CONFIG_PAGE_MAPCOUNT)
        self.pflags = np.zeros(n, dtype=np.uint8)      # PG_anon_exclusive, ...
        # Virtual page number a page was mapped at (page->index for anon): the
        # rmap walk looks there first in every mm and verifies what it finds.
        self.vpn = np.full(n, -1, dtype=np.int64)
        self.free_order = np.full(n, -1, dtype=np.int8)  # order of the free block headed here
        self.free_lists: list[dict[int, None]] = [{} for _ in range(MAX_PAGE_ORDER + 1)]
        self.nr_free = 0
        self.ptc = None                                # page_table_check, when on: frees are checked
        self.reserved = np.zeros(n, dtype=bool)
        # Reserve the first max-order block: pfn 0 is the zero page, the rest
        # stands for memory the kernel itself uses.
        self.reserved[: 1 << MAX_PAGE_ORDER] = True
        top = 1 << MAX_PAGE_ORDER
        for pfn in range(top, n - (n % top), top):
            self._add_free(pfn, MAX_PAGE_ORDER)
        # Tail frames that do not fill a max-order block.
        pfn = n - (n % top)
        for order in range(MAX_PAGE_ORDER - 1, -1, -1):
            if pfn + (1 << order) <= n:
                self._add_free(pfn, order)
                pfn += 1 << order

    # -- free list primitives ---------------------------------------------------
    def _add_free(self, pfn: int, order: int) -> None:
        self.free_lists[order][pfn] = None
        self.free_order[pfn] = order
        self.nr_free += 1 << order

    def _del_free(self, pfn: int, order: int) -> None:
        del self.free_lists[order][pfn]
        self.free_order[pfn] = -1
        self.nr_free -= 1 << order

    # -- allocation ---------------------------------------------------------------
    def has_free_order(self, order: int) -> bool:
        """True if a block of at least this order is free (no compaction)."""
        return any(self.free_lists[o] for o in range(order, MAX_PAGE_ORDER + 1))

    def alloc(self, order: int) -> int:
        """Model of __rmqueue_smallest() + expand(): a block's first PFN, or -1."""
        for current in range(order, MAX_PAGE_ORDER + 1):
            fl = self.free_lists[current]
            if not fl:
                continue
            pfn, _ = fl.popitem()
            self.free_order[pfn] = -1
            self.nr_free -= 1 << current
            # expand(): give back the upper halves.
            while current > order:
                current -= 1
                self._add_free(pfn + (1 << current), current)
            return pfn
        return -1

    def alloc_bulk(self, count: int) -> np.ndarray | None:
        """Model of alloc_pages_bulk(): ``count`` order-0 frames, or None if short.

        Optimization: whole free blocks are handed out as ranges rather than
        split page by page.  Nothing is taken when the request cannot be met.
        """
        if count > self.nr_free:
            return None
        out: list[np.ndarray] = []
        need = count
        fl0 = self.free_lists[0]
        while need and fl0:
            pfn, _ = fl0.popitem()
            self.free_order[pfn] = -1
            self.nr_free -= 1
            out.append(np.array([pfn], dtype=np.int64))
            need -= 1
        while need:
            order = next(o for o in range(MAX_PAGE_ORDER + 1) if self.free_lists[o])
            pfn, _ = self.free_lists[order].popitem()
            self.free_order[pfn] = -1
            self.nr_free -= 1 << order
            # Split the block: take whole lower halves while they fit, return the rest.
            while need and order >= 0:
                size = 1 << order
                if need >= size:
                    out.append(np.arange(pfn, pfn + size, dtype=np.int64))
                    need -= size
                    break
                order -= 1
                self._add_free(pfn + (1 << order), order)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def take_block(self, pfn: int, order: int = 0) -> bool:
        """Take the free block of ``order`` at ``pfn`` out of the free lists, splitting the
        larger free block that contains it.  Returns False if it is not wholly free."""
        for cur in range(order, MAX_PAGE_ORDER + 1):
            head = pfn & ~((1 << cur) - 1)
            if self.free_order[head] == cur:
                break
        else:
            return False
        self._del_free(head, cur)
        while cur > order:
            cur -= 1
            half = 1 << cur
            if pfn >= head + half:
                self._add_free(head, cur)
                head += half
            else:
                self._add_free(head + half, cur)
        return True

    def take_pfn(self, pfn: int) -> bool:
        """Take one specific free frame out of the allocator for good (an unmovable or
        poisoned page).  Returns False if the frame is not free."""
        if not self.take_block(pfn, 0):
            return False
        self.reserved[pfn] = True
        return True

    def fragment(self, share: float, rng) -> int:
        """Scatter unmovable pages: one in ``share`` of the free 2 MiB blocks.

        Models a long-running machine whose kernel allocations (slab, page
        tables, pinned buffers) sit in otherwise free pageblocks, so fewer
        order-9 blocks can be formed.  Returns the number of pages taken.
        """
        from .constants import HPAGE_PMD_NR
        blocks = [pfn for order in range(9, MAX_PAGE_ORDER + 1) for head in self.free_lists[order]
                  for pfn in range(head, head + (1 << order), HPAGE_PMD_NR)]
        blocks.sort()
        n = int(round(share * len(blocks)))
        chosen = rng.choice(len(blocks), size=n, replace=False) if n else []
        taken = 0
        for i in sorted(int(c) for c in chosen):
            taken += self.take_pfn(blocks[i] + int(rng.integers(0, HPAGE_PMD_NR)))
        return taken

    # -- freeing --------------------------------------------------------------------
    def free(self, pfn: int, order: int) -> None:
        """Model of __free_one_page(): merge with free buddies and put on a list."""
        if self.ptc is not None:
            self.ptc.check_free(pfn, 1 << order)       # page_table_check_free()
        while order < MAX_PAGE_ORDER:
            buddy = pfn ^ (1 << order)
            if buddy >= self.nr_frames or self.free_order[buddy] != order:
                break
            self._del_free(buddy, order)
            pfn &= ~(1 << order)
            order += 1
        self._add_free(pfn, order)

    def free_bulk(self, pfns: np.ndarray) -> None:
        """Free many order-0 frames (model of free_unref_folios()).

        Optimization: buddies are merged order by order with array operations;
        the result equals freeing the frames one by one (the buddy system's
        final state does not depend on the order of frees), up to the order
        of blocks within a free list.
        """
        blocks = np.unique(np.asarray(pfns, dtype=np.int64))
        if self.ptc is not None:
            self.ptc.check_free_pfns(blocks)           # page_table_check_free()
        if len(blocks) <= 64:                      # small batches: the scalar path is cheaper
            for pfn in blocks.tolist():
                self.free(pfn, 0)
            return
        for order in range(MAX_PAGE_ORDER + 1):
            if not len(blocks):
                return
            if order == MAX_PAGE_ORDER:
                for pfn in blocks.tolist():
                    self._add_free(pfn, order)
                return
            size = 1 << order
            buddy = blocks ^ size
            # pairs inside the batch
            in_batch = np.isin(buddy, blocks)
            # buddies already free at this order
            in_lists = ~in_batch & (buddy < self.nr_frames)
            in_lists[in_lists] = self.free_order[buddy[in_lists]] == order
            for b in buddy[in_lists].tolist():
                self._del_free(b, order)
            merged = np.unique((blocks[in_batch | in_lists]) & ~size)
            for pfn in blocks[~(in_batch | in_lists)].tolist():
                self._add_free(pfn, order)
            blocks = merged

    # -- checks ---------------------------------------------------------------------
    def check(self) -> None:
        """Free lists agree with free_order, blocks are aligned and disjoint."""
        covered = np.zeros(self.nr_frames, dtype=bool)
        total = 0
        for order, fl in enumerate(self.free_lists):
            for pfn in fl:
                if pfn & ((1 << order) - 1):
                    raise InvariantViolation(f"buddy: free block pfn {pfn:#x} is not aligned to order {order}")
                if self.free_order[pfn] != order:
                    raise InvariantViolation(f"buddy: pfn {pfn:#x} on order-{order} list but free_order={self.free_order[pfn]}")
                seg = covered[pfn: pfn + (1 << order)]
                if seg.any():
                    raise InvariantViolation(f"buddy: free block pfn {pfn:#x} order {order} overlaps another")
                seg[:] = True
                total += 1 << order
        if total != self.nr_free:
            raise InvariantViolation(f"buddy: nr_free={self.nr_free} but the free lists hold {total}")
        heads = np.flatnonzero(self.free_order >= 0)
        if len(heads) != sum(len(fl) for fl in self.free_lists):
            raise InvariantViolation("buddy: free_order marks a block that is on no free list")
        bad = np.flatnonzero(covered & ((self.folio >= 0) | self.reserved))
        if len(bad):
            raise InvariantViolation(f"buddy: pfn {int(bad[0]):#x} is free but belongs to a folio or is reserved")


# -- watermarks -----------------------------------------------------------------------
def setup_per_zone_wmarks(k: Kernel) -> None:
    """Model of __setup_per_zone_wmarks(): the zone's min, low and high watermarks, in pages.

    min comes from min_free_kbytes = sqrt(16 x RAM in kB), clamped to
    [128 kB, 256 MiB] (init_per_zone_wmark_min()); low and high sit one and
    two gaps above it, a gap being max(min/4, managed pages x
    watermark_scale_factor/10000) with the default factor 10.
    """
    managed = k.mem.nr_frames
    lowmem_kbytes = managed * (PAGE_SIZE >> 10)
    min_free_kbytes = min(max(int((lowmem_kbytes * 16) ** 0.5), 128), 256 << 10)
    k.wmark_min = min_free_kbytes >> (PAGE_SHIFT - 10)
    gap = max(k.wmark_min >> 2, managed * 10 // 10000)
    k.wmark_low = k.wmark_min + gap
    k.wmark_high = k.wmark_min + 2 * gap


# -- THP allocation -----------------------------------------------------------------------
def alloc_thp(k: Kernel, gfp: Gfp) -> int:
    """Model of __alloc_pages() for one order-9 folio: a block's first PFN, or -1.

    The free lists first (get_page_from_freelist()); when they have no
    order-9 block, __alloc_pages_slowpath() does what ``gfp`` allows:
    KSWAPD_RECLAIM wakes kcompactd (wake_all_kswapds(); kswapd hands
    high-order work to kcompactd), which compacts one block in the background
    a little later on the simulated clock; DIRECT_RECLAIM stalls in direct
    compaction (__alloc_pages_direct_compact()), which builds a block by
    migrating the movable pages out of a pageblock (compact_stall/success/
    fail); with neither bit it just fails.  Last, the kernel build may have
    a block of its own (``alloc_thp_fallback``).  The caller falls back.
    """
    pfn = k.mem.alloc(HPAGE_PMD_ORDER)
    if pfn < 0 and gfp & Gfp.KSWAPD_RECLAIM:
        from .compaction import wakeup_kcompactd
        wakeup_kcompactd(k)
    if pfn < 0 and gfp & Gfp.DIRECT_RECLAIM:
        from .compaction import compact_for_thp
        pfn = compact_for_thp(k)
    if pfn < 0:
        pfn = k.build.alloc_thp_fallback(k)
    return pfn
