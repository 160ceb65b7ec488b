"""Model of mm/swap_state.c: the swap cache.

A folio being swapped out, or swapped in from a slot that other swap entries
still share, sits in the swap cache: ``SwapDevice.cache[slot]`` names it and
``in_cache`` holds its slots; the folio is PG_swapcache and holds one
reference per page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .folio import PG_SWAPCACHE
from . import rmap

if TYPE_CHECKING:
    from .kernel import Kernel


def add_to_swap_cache(k: Kernel, fid: int, slot: int) -> None:
    """Model of add_to_swap_cache(): the folio holds slots [slot, slot + nr), one reference each."""
    f = k.folios
    nr = 1 << int(f.order[fid])
    f.flags[fid] |= PG_SWAPCACHE
    f.swap[fid] = slot
    f.refcount[fid] += nr
    k.swap.in_cache[slot: slot + nr] = True
    k.swap.used[slot: slot + nr] = True
    k.swap.cache[slot: slot + nr] = fid


def delete_from_swap_cache(k: Kernel, fid: int) -> None:
    """Model of delete_from_swap_cache(): drop the cache's references and slot hold."""
    f = k.folios
    slot = int(f.swap[fid])
    nr = 1 << int(f.order[fid])
    f.flags[fid] &= np.uint16(~PG_SWAPCACHE & 0xFFFF)
    f.swap[fid] = -1
    for s in range(slot, slot + nr):
        k.swap.in_cache[s] = False
        k.swap.cache[s] = -1
        if k.swap.swap_map[s] <= 0:
            k.swap.free_slot(s)
    rmap.folio_put(k, fid, nr)
