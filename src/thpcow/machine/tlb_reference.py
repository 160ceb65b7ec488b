"""The readable reference of :mod:`thpcow.machine.tlb`: the same model in plain Python, one access at a time.

Each set is an ``OrderedDict`` in LRU order (oldest first): a hit moves the
key to the end, a miss in a full set pops the oldest.  It is slow (about a
million accesses per second) and exists so that tests can check that the
numba engine gives exactly the same counts on random streams.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from .tlb import (
    ASID_SHIFT, PAGE_SHIFT_2M, Metric, SimMetric, Tlb, TlbKnobs, WalkCache, _TlbModel, _VPN_MASK,
)


class ReferenceTlbSimulator(_TlbModel):
    """Model of drcachesim's ``tlb_simulator_t`` for one core, in plain Python (the reference engine)."""

    engine = "reference"

    def __init__(self, knobs: TlbKnobs | None = None, *, l1: Iterable[Tlb] | None = None,
                 pwc: WalkCache | None = None) -> None:
        super().__init__(knobs, l1=l1, pwc=pwc)
        self._sets = [[OrderedDict() for _ in range(d.nsets)] for d in self.devices]
        self._i_l1 = [self._index(d) for d in self.l1_for]
        self._i_l2 = [self._index(d) for d in self.l2_for]
        self._i_pwc = self._index(self.pwc)

    def _request(self, d: int, key: int, idx: int) -> bool:
        """Model of ``tlb_t::request()`` at one level; counts the hit or the miss (and eviction)."""
        dev = self.devices[d]
        ways = self._sets[d][idx & (dev.nsets - 1)]
        if key in ways:
            ways.move_to_end(key)
            dev.stats[Metric.HITS] += 1
            return True
        dev.stats[Metric.MISSES] += 1
        if len(ways) == dev.assoc:
            ways.popitem(last=False)
            dev.stats[Metric.EVICTIONS] += 1
        ways[key] = None
        return False

    def _simulate_chunk(self, acc) -> None:
        k = self.knobs
        st = self.sim_stats
        for v, sh, a in zip(acc.vaddr.tolist(), acc.full("page_shift").tolist(), acc.full("asid").tolist()):
            big = 1 if sh == PAGE_SHIFT_2M else 0
            vpn = v >> sh
            key = (a << ASID_SHIFT) | (vpn << 1) | big
            if self._request(self._i_l1[big], key, vpn):
                continue
            d2 = self._i_l2[big]
            if d2 >= 0 and self._request(d2, key, vpn):
                continue
            if big:
                st[SimMetric.WALKS_PMD] += 1
                st[SimMetric.WALK_MEM_REFS] += k.pmd_walk_refs
                continue
            region = v >> PAGE_SHIFT_2M
            if self._i_pwc >= 0 and self._request(self._i_pwc, (a << ASID_SHIFT) | (region << 1) | 1, region):
                st[SimMetric.WALKS_PTE_PWC_HIT] += 1
                st[SimMetric.WALK_MEM_REFS] += k.pte_walk_refs_pwc_hit
            else:
                st[SimMetric.WALKS_PTE_PWC_MISS] += 1
                st[SimMetric.WALK_MEM_REFS] += k.pte_walk_refs_pwc_miss

    def _invalidate(self, asid: int, start: int, end: int, with_pwc: bool) -> int:
        total = 0
        for d, dev in enumerate(self.devices):
            if d == self._i_pwc and not with_pwc:
                continue
            n = 0
            for ways in self._sets[d]:
                for key in list(ways):
                    if asid >= 0 and key >> ASID_SHIFT != asid:
                        continue
                    shift = 21 if key & 1 else 12
                    lo = ((key >> 1) & _VPN_MASK) << shift
                    if lo < end and lo + (1 << shift) > start:
                        del ways[key]
                        n += 1
            dev.stats[Metric.INVALIDATIONS] += n
            total += n
        return total

    def contents(self, level: str) -> list[tuple[int, int, int]]:
        """The valid entries of one level as (asid, vaddr, size), most recently used first per set."""
        from .tlb import _decode
        d = self._index(self.levels[level])
        return [_decode(key) for ways in self._sets[d] for key in reversed(ways)]
