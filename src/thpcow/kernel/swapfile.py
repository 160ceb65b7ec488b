"""Model of mm/swapfile.c: one swap device, its slots and their swap counts.

Slots are grouped in clusters of 512 (``SWAPFILE_CLUSTER``); a PMD-order
folio needs one whole free cluster to be swapped out without a split.
``swap_map[slot]`` counts the swap PTEs that reference a slot; a slot also
held by the swap cache (``in_cache``, the folio in ``cache``) is freed once
both are gone (the swap cache itself is :mod:`.swap_state`).  The device
stores one content token per slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .constants import HPAGE_PMD_NR, PHYS_PFN
from .folio import PG_DIRTY
from .swap_state import delete_from_swap_cache

if TYPE_CHECKING:
    from .kernel import Kernel

CLUSTER = HPAGE_PMD_NR


class SwapDevice:
    """A swap area of ``size`` bytes (rounded down to whole clusters)."""

    def __init__(self, size: int) -> None:
        """Slot 0 holds the swap header; a partial last cluster serves 4 KiB entries only
        (setup_swap_clusters_info())."""
        n = PHYS_PFN(size)
        if n < 2:
            raise ValueError(f"swap size {size}: too small for a header and one slot")
        self.nr_slots = n
        nclusters = (n + CLUSTER - 1) // CLUSTER
        self.swap_map = np.zeros(n, dtype=np.int32)     # swap PTE references per slot
        self.in_cache = np.zeros(n, dtype=bool)         # SWAP_HAS_CACHE
        self.cache = np.full(n, -1, dtype=np.int64)     # the swap cache: the folio holding the slot, or -1
        self.used = np.zeros(nclusters * CLUSTER, dtype=bool)
        self.used[n:] = True                            # beyond the device: never free
        self.used[0] = True                             # the swap header
        self.content = np.zeros(n, dtype=np.int64)
        self.cluster_used = np.zeros(nclusters, dtype=np.int32)
        self.cluster_used[0] = 1
        if n % CLUSTER:
            self.cluster_used[-1] += CLUSTER - n % CLUSTER
        self.free_clusters: dict[int, None] = dict.fromkeys(
            c for c in range(nclusters) if self.cluster_used[c] == 0)
        self.partial: dict[int, None] = dict.fromkeys(
            c for c in range(nclusters) if 0 < self.cluster_used[c] < CLUSTER)
        self.nr_free = n - 1

    def alloc_cluster(self) -> int:
        """A whole free cluster for a PMD-order folio: its first slot, or -1."""
        if not self.free_clusters:
            return -1
        c = next(iter(self.free_clusters))
        del self.free_clusters[c]
        base = c * CLUSTER
        self.used[base: base + CLUSTER] = True
        self.cluster_used[c] = CLUSTER
        self.nr_free -= CLUSTER
        return base

    def alloc_slots(self, nr: int) -> int:
        """``nr`` (a power of two) naturally aligned contiguous free slots: the first, or -1.

        A PMD-order folio takes a whole free cluster; smaller ones take an
        aligned run inside a partly used cluster, else a fresh cluster.
        """
        if nr == 1:
            return self.alloc_slot()
        if nr >= CLUSTER:
            return self.alloc_cluster()
        for c in list(self.partial) + list(self.free_clusters)[:1]:
            base = c * CLUSTER
            free = ~self.used[base: base + CLUSTER].reshape(-1, nr)
            runs = np.flatnonzero(free.all(axis=1))
            if not len(runs):
                continue
            first = base + int(runs[0]) * nr
            self.free_clusters.pop(c, None)
            self.used[first: first + nr] = True
            self.cluster_used[c] += nr
            self.nr_free -= nr
            if self.cluster_used[c] == CLUSTER:
                self.partial.pop(c, None)
            else:
                self.partial[c] = None
            return first
        return -1

    def alloc_many(self, n: int) -> np.ndarray:
        """Up to ``n`` single slots at once (Optimization: batched reclaim)."""
        out = []
        need = n
        for c in list(self.partial) + list(self.free_clusters):
            if not need:
                break
            base = c * CLUSTER
            free = np.flatnonzero(~self.used[base: base + CLUSTER])[:need] + base
            if not len(free):
                continue
            self.free_clusters.pop(c, None)
            self.used[free] = True
            self.cluster_used[c] += len(free)
            if self.cluster_used[c] == CLUSTER:
                self.partial.pop(c, None)
            else:
                self.partial[c] = None
            out.append(free)
            need -= len(free)
        got = np.concatenate(out) if out else np.empty(0, dtype=np.int64)
        self.nr_free -= len(got)
        return got

    def alloc_slot(self) -> int:
        """One free slot (partial clusters first, as the per-CPU cluster allocator does), or -1."""
        if not self.partial:
            if not self.free_clusters:
                return -1
            c = next(iter(self.free_clusters))
            del self.free_clusters[c]
            self.partial[c] = None
        c = next(iter(self.partial))
        base = c * CLUSTER
        slot = base + int(np.flatnonzero(~self.used[base: base + CLUSTER])[0])
        self.used[slot] = True
        self.cluster_used[c] += 1
        self.nr_free -= 1
        if self.cluster_used[c] == CLUSTER:
            del self.partial[c]
        return slot

    def free_slot(self, slot: int) -> None:
        c = slot // CLUSTER
        self.used[slot] = False
        self.swap_map[slot] = 0
        self.in_cache[slot] = False
        self.cache[slot] = -1
        self.nr_free += 1
        self.cluster_used[c] -= 1
        if self.cluster_used[c] == 0:
            self.partial.pop(c, None)
            self.free_clusters[c] = None
        else:
            self.partial[c] = None

    def put(self, slot: int, refs: int = 1) -> None:
        """swap_free(): drop swap PTE references; free the slot when nothing holds it."""
        self.swap_map[slot] -= refs
        if self.swap_map[slot] <= 0 and not self.in_cache[slot]:
            self.free_slot(slot)


def free_swap_and_cache(k: Kernel, slot: int) -> None:
    """Model of swap_free() / free_swap_and_cache(): one swap entry of ``slot`` is gone.

    When it was the last one, a folio still in the swap cache for that slot
    leaves it (and is freed if nothing maps it).  A mapped one is then the only
    copy of its data, so it is marked dirty, as folio_free_swap() does (a clean
    one could be dropped: MADV_FREE then reclaim).  Simplification: the kernel
    keeps a mapped folio cached until reclaim or a write frees the swap
    (should_try_to_free_swap()); here it leaves at once, with the same
    result for reuse on a later write.
    """
    sw = k.swap
    sw.swap_map[slot] -= 1
    if sw.swap_map[slot] > 0:
        return
    fid = int(sw.cache[slot])
    if fid >= 0:
        if k.mem.mapcount[int(k.folios.head[fid])] > 0:
            k.folios.flags[fid] |= PG_DIRTY
        delete_from_swap_cache(k, fid)
    elif not sw.in_cache[slot]:
        sw.free_slot(slot)
