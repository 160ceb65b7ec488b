"""Model of struct folio (include/linux/mm_types.h) as a struct of arrays.

A folio is identified by an integer id; ``PhysMem.folio[pfn]`` maps every frame
of a folio to its id.  Fields follow the kernel, with counts stored as plain
counts (the kernel stores mapcounts -1 based):

- ``refcount`` (``_refcount``): one per PTE mapping, one per PMD mapping,
  ``nr_pages`` more while in the swap cache, plus pins;
- ``entire`` (``_entire_mapcount``): number of PMD mappings;
- ``large`` (``_large_mapcount``): PMD mappings + every PTE mapping;
- ``mm_id``/``mm_cnt`` (``_mm_id[2]``/``_mm_id_mapcount[2]``) and the
  ``FOLIO_MM_IDS_SHARED`` bit, which together answer
  ``folio_maybe_mapped_shared()`` for large folios (CONFIG_MM_ID);
- ``flags``: PG_anon, PG_swapbacked, PG_swapcache, PG_dirty, on the deferred
  split list, PG_partially_mapped, ...

Per-page state (PTE mapcount, PG_anon_exclusive) lives in :class:`PhysMem`.
"""

from __future__ import annotations

import numpy as np

# folio flags
PG_ANON = 1 << 0
PG_SWAPBACKED = 1 << 1
PG_SWAPCACHE = 1 << 2
PG_DIRTY = 1 << 3
PG_LRU = 1 << 4
PG_DEFERRED = 1 << 5          # on the deferred split queue (folio->_deferred_list)
PG_PARTIALLY_MAPPED = 1 << 6
PG_MM_IDS_SHARED = 1 << 7     # FOLIO_MM_IDS_SHARED_BIT
PG_HUGE_ZERO = 1 << 8         # the huge zero folio (never rmapped)
PG_REFERENCED = 1 << 9

MM_ID_DUMMY = 0


class FolioTable:
    """All folios of one simulated kernel."""

    _FIELDS = (
        ("head", np.int64, -1), ("order", np.int8, 0), ("refcount", np.int32, 0),
        ("entire", np.int32, 0), ("large", np.int32, 0), ("flags", np.uint16, 0),
        ("mm_id0", np.int32, 0), ("mm_id1", np.int32, 0),
        ("mm_cnt0", np.int32, 0), ("mm_cnt1", np.int32, 0),
        ("swap", np.int64, -1),          # first swap slot while in the swap cache
        ("lru", np.int64, -1),           # LRU position stamp (smaller = older); -1: not on the LRU
    )

    def __init__(self, capacity: int = 1024, max_capacity: int = 1 << 40) -> None:
        self.capacity = min(capacity, max_capacity)
        self.max_capacity = max_capacity          # a folio has at least one frame: <= nr_frames
        capacity = self.capacity
        # NOTE: zero-filled (calloc: untouched pages cost no memory) for performance;
        # every id is _reset() to its field defaults when it is handed out, and
        # nothing reads an entry at or beyond _next.
        for name, dtype, _fill in self._FIELDS:
            setattr(self, name, np.zeros(capacity, dtype=dtype))
        self.used = np.zeros(capacity, dtype=bool)
        self.bugs: frozenset[str] = frozenset()   # injected bugs (bugs.py), set by the Kernel
        self._next = 0                     # ids below this were handed out once
        # Recycled ids, a LIFO stack in an array (Optimization: bulk push/pop).
        self._free_stack = np.empty(1024, dtype=np.int64)
        self._nfree = 0
        self.nr_live = 0

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        cap = min(cap, max(self.max_capacity, need))
        if cap == self.capacity:
            return
        for name, dtype, _fill in self._FIELDS:
            old = getattr(self, name)
            new = np.zeros(cap, dtype=dtype)
            new[: self.capacity] = old
            setattr(self, name, new)
        used = np.zeros(cap, dtype=bool)
        used[: self.capacity] = self.used
        self.used = used
        self.capacity = cap

    def _reset(self, ids) -> None:
        for name, _dtype, fill in self._FIELDS:
            getattr(self, name)[ids] = fill

    def alloc(self, head: int, order: int) -> int:
        """A new folio id for the block at ``head`` (refcount set by the caller)."""
        if self._nfree:
            self._nfree -= 1
            fid = int(self._free_stack[self._nfree])
        else:
            fid = self._next
            self._next += 1
            self._grow(self._next)
        self._reset(fid)
        self.head[fid] = head
        self.order[fid] = order
        self.used[fid] = True
        self.nr_live += 1
        return fid

    def alloc_bulk(self, heads: np.ndarray) -> np.ndarray:
        """Order-0 folio ids for many frames at once (Optimization: batched faults)."""
        n = len(heads)
        take = min(n, self._nfree)
        ids = np.empty(n, dtype=np.int64)
        if take:
            ids[:take] = self._free_stack[self._nfree - take: self._nfree][::-1]
            self._nfree -= take
            self._reset(ids[:take])
        if n > take:
            start = self._next
            self._next += n - take
            self._grow(self._next)
            fresh = np.arange(start, self._next)
            ids[take:] = fresh
            # Optimization: never-used entries are still zero (calloc); only the
            # fields whose default is not zero need writing.
            for name, _dtype, fill in self._FIELDS:
                if fill:
                    getattr(self, name)[fresh] = fill
        self.head[ids] = heads
        self.used[ids] = True
        self.nr_live += n
        return ids

    def release(self, fid: int) -> None:
        self._reset(fid)
        self.used[fid] = False
        if self._nfree < len(self._free_stack):
            self._free_stack[self._nfree] = fid
            self._nfree += 1
        else:
            self._push_free(np.array([fid], dtype=np.int64))
        self.nr_live -= 1

    def release_bulk(self, ids: np.ndarray) -> None:
        """Optimization: release many folio ids at once."""
        self._reset(ids)
        self.used[ids] = False
        self._push_free(np.asarray(ids, dtype=np.int64))
        self.nr_live -= len(ids)

    def _push_free(self, ids: np.ndarray) -> None:
        need = self._nfree + len(ids)
        if need > len(self._free_stack):
            stack = np.empty(max(need, 2 * len(self._free_stack)), dtype=np.int64)
            stack[: self._nfree] = self._free_stack[: self._nfree]
            self._free_stack = stack
        self._free_stack[self._nfree: need] = ids
        self._nfree = need

    def nr_pages(self, fid: int) -> int:
        return 1 << int(self.order[fid])

    def maybe_mapped_shared(self, fid: int, page_mapcount: int) -> bool:
        """Model of folio_maybe_mapped_shared() (CONFIG_MM_ID).

        A small folio is shared when its page is mapped more than once; a large
        folio when it has more than one mapping and the SHARED bit is set.
        """
        if self.order[fid] == 0:
            return page_mapcount > 1
        if self.large[fid] <= 1:
            return False
        return bool(self.flags[fid] & PG_MM_IDS_SHARED)

    def maybe_mapped_shared_many(self, fids: np.ndarray, page_mapcounts: np.ndarray) -> np.ndarray:
        """maybe_mapped_shared() of many (folio, page mapcount) pairs at once: a bool array."""
        small = self.order[fids] == 0
        return np.where(small, page_mapcounts > 1,
                        (self.large[fids] > 1) & (self.flags[fids] & PG_MM_IDS_SHARED).astype(bool))

    def expected_ref_count(self, fids: np.ndarray, head_mapcounts: np.ndarray) -> np.ndarray:
        """Model of folio_expected_ref_count(): the references its mappings and the swap cache
        hold (large mapcount, or the page's mapcount for a small folio; one per page cached)."""
        order = self.order[fids].astype(np.int64)
        maps = np.where(order > 0, self.large[fids], head_mapcounts)
        return maps + np.where(self.flags[fids] & PG_SWAPCACHE, 1 << order, 0)

    # -- CONFIG_MM_ID slot tracking (include/linux/rmap.h) --------------------------
    def set_large_mapcount(self, fid: int, count: int, mm_id: int) -> None:
        """Model of folio_set_large_mapcount(): a new folio, mapped by one mm."""
        self.large[fid] = count
        self.mm_id0[fid] = mm_id
        self.mm_cnt0[fid] = count
        self.mm_id1[fid] = MM_ID_DUMMY
        self.mm_cnt1[fid] = 0

    def add_large_mapcount(self, fid: int, diff: int, mm_id: int) -> int:
        """Model of folio_add_return_large_mapcount()."""
        old = int(self.large[fid])
        new = old + diff
        self.large[fid] = new
        if self.mm_id0[fid] == mm_id:
            self.mm_cnt0[fid] += diff
        elif self.mm_id1[fid] == mm_id:
            self.mm_cnt1[fid] += diff
        elif self.mm_id0[fid] == MM_ID_DUMMY:
            self.mm_id0[fid] = mm_id
            self.mm_cnt0[fid] = diff
            if old != 0:                 # we might have other mappings already
                self.flags[fid] |= PG_MM_IDS_SHARED
        elif self.mm_id1[fid] == MM_ID_DUMMY:
            self.mm_id1[fid] = mm_id
            self.mm_cnt1[fid] = diff
            self.flags[fid] |= PG_MM_IDS_SHARED   # slot 0 certainly has mappings
        else:
            # No free slot: the mappings are only in the total.
            self.flags[fid] |= PG_MM_IDS_SHARED
        return new

    def sub_large_mapcount(self, fid: int, diff: int, mm_id: int) -> int:
        """Model of folio_sub_return_large_mapcount()."""
        new = int(self.large[fid]) - diff
        self.large[fid] = new
        leak = "mm-ids-slot-leak" in self.bugs            # injected bug: keep an emptied slot
        if self.mm_id0[fid] == mm_id:
            self.mm_cnt0[fid] -= diff
            if self.mm_cnt0[fid] > 0:
                return new
            self.mm_cnt0[fid] = 0
            if not leak:
                self.mm_id0[fid] = MM_ID_DUMMY
        elif self.mm_id1[fid] == mm_id:
            self.mm_cnt1[fid] -= diff
            if self.mm_cnt1[fid] > 0:
                return new
            self.mm_cnt1[fid] = 0
            if not leak:
                self.mm_id1[fid] = MM_ID_DUMMY
        # If one slot owns all mappings, the folio is mapped exclusively
        # (an unmapped folio has both slots free and is exclusive too).
        c0 = self.mm_cnt0[fid] if self.mm_id0[fid] != MM_ID_DUMMY else 0
        c1 = self.mm_cnt1[fid] if self.mm_id1[fid] != MM_ID_DUMMY else 0
        if (c0 == new or c1 == new) and "mm-ids-shared-sticks" not in self.bugs:
            self.flags[fid] &= ~np.uint16(PG_MM_IDS_SHARED)
        return new

    def sub_large_mapcount_many(self, fids: np.ndarray, diffs: np.ndarray, mm_id: int) -> None:
        """Optimization: sub_large_mapcount() for many distinct folios of one mm at once."""
        diffs = diffs.astype(np.int32)
        new = self.large[fids] - diffs
        self.large[fids] = new
        for id_f, cnt_f in (("mm_id0", "mm_cnt0"), ("mm_id1", "mm_cnt1")):
            ids, cnts = getattr(self, id_f), getattr(self, cnt_f)
            mine = ids[fids] == mm_id
            sel = fids[mine]
            cnts[sel] -= diffs[mine]
            empty = sel[cnts[sel] <= 0]
            cnts[empty] = 0
            if "mm-ids-slot-leak" not in self.bugs:       # injected bug: keep an emptied slot
                ids[empty] = MM_ID_DUMMY
        # Folios whose slot of this mm still has mappings keep their SHARED bit
        # unchanged (the kernel returns early); the others may become exclusive.
        still = ((self.mm_id0[fids] == mm_id) & (self.mm_cnt0[fids] > 0)) | \
                ((self.mm_id1[fids] == mm_id) & (self.mm_cnt1[fids] > 0))
        c0 = np.where(self.mm_id0[fids] != MM_ID_DUMMY, self.mm_cnt0[fids], 0)
        c1 = np.where(self.mm_id1[fids] != MM_ID_DUMMY, self.mm_cnt1[fids], 0)
        clear = ~still & ((c0 == new) | (c1 == new)) & ("mm-ids-shared-sticks" not in self.bugs)
        self.flags[fids[clear]] &= np.uint16(~PG_MM_IDS_SHARED & 0xFFFF)
